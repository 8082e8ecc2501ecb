"""fuse_conv_mul: fold the Mul by a per-output-channel constant into the Conv's weight and bias.

Pattern: `y = Mul(Conv(x, W, b?), m)` (either operand order), W and b constant, m a constant
that varies only along the channel axis of the Conv output: a scalar or single element,
[C, 1, ..., 1] or [1, C, 1, ..., 1]. The Conv's output is read only by the Mul.
ConvTranspose is handled the same way (its output channel o = i*(C_out/g) + j is column j of
input-channel block i of the weight).

Algebra: Conv is linear per output channel, Conv(x, W, b)[n, o] = (W[o] * x)[n] + b[o], so
m[o] * Conv(x, W, b)[n, o] = (m[o] W[o] * x)[n] + m[o] b[o]:
W'[o] = W[o] * m[o] and b'[o] = b[o] * m[o] (no bias stays no bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.infra.registry import register_pass
from iropt.ir.channels import scale_output_channels
from iropt.rewrite import Match, RewritePass, RewriteRule, const, op, take_outputs
from iropt.rewrite.conv import (
    conv_layout,
    conv_problem,
    conv_producer,
    new_constant,
    per_channel,
    set_input,
)


class ConvMul(RewriteRule):
    """Mul(Conv, per-channel constant) -> Conv with scaled weight and bias."""

    name = "conv_mul"
    pattern = op("Mul", inputs=[conv_producer(), const("m")], name="mul", commutative=True)

    def check(self, match: Match) -> str | None:
        problem = conv_problem(match)
        if problem is not None:
            return problem
        vector = self._vector(match)
        return f"Mul {vector}" if isinstance(vector, str) else None

    def _vector(self, match: Match) -> np.ndarray | str:
        weight = match.value("w")
        channels = conv_layout(match.nodes["conv"]).output_channels(weight.shape)
        return per_channel(match.value("m"), channels, weight.ndim)

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        conv, weight = match.nodes["conv"], match.value("w")
        vector = self._vector(match)
        assert not isinstance(vector, str)
        new_weight = scale_output_channels(conv_layout(conv), weight, vector)
        set_input(conv, 1, new_constant(match, "w", "mul", new_weight, weight.dtype))
        bias = match.values.get("b")
        if bias is not None:
            new_bias = bias.astype(np.float64).reshape(-1) * vector
            set_input(conv, 2, new_constant(match, "b", "mul", new_bias, weight.dtype))
        # The Conv writes the Mul's output tensor, so its name (maybe a graph output) is kept.
        conv.outputs[0] = take_outputs(match.nodes["mul"])[0]


@register_pass("fuse_conv_mul")
@dataclass(kw_only=True)
class FuseConvMul(RewritePass):
    """Fold a Mul by a per-channel constant after Conv/ConvTranspose into weight and bias."""

    def rules(self) -> list[RewriteRule]:
        return [ConvMul()]
