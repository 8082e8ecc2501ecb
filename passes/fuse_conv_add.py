"""fuse_conv_add: fold the Add of a per-output-channel constant into the Conv's bias.

Pattern: `y = Add(Conv(x, W, b?), c)` (either operand order), W and b constant, c a constant
that varies only along the channel axis of the Conv output: a scalar or single element,
[C, 1, ..., 1] or [1, C, 1, ..., 1] (broadcasting must not change the output's shape). The
Conv's output is read only by the Add. ConvTranspose is handled the same way.

Algebra: Conv(x, W, b)[n, o, ...] = (W * x)[n, o, ...] + b[o], so adding c[o] per channel
is the same Conv with bias b'[o] = b[o] + c[o] (b = 0 when the Conv has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.infra.registry import register_pass
from iropt.rewrite import Match, RewritePass, RewriteRule, const, op, take_outputs
from iropt.rewrite.conv import (
    conv_layout,
    conv_problem,
    conv_producer,
    new_constant,
    per_channel,
    set_input,
)


class ConvAdd(RewriteRule):
    """Add(Conv, per-channel constant) -> Conv with the constant added to its bias."""

    name = "conv_add"
    pattern = op("Add", inputs=[conv_producer(), const("c")], name="add", commutative=True)

    def check(self, match: Match) -> str | None:
        problem = conv_problem(match)
        if problem is not None:
            return problem
        vector = self._vector(match)
        return f"Add {vector}" if isinstance(vector, str) else None

    def _vector(self, match: Match) -> np.ndarray | str:
        weight = match.value("w")
        channels = conv_layout(match.nodes["conv"]).output_channels(weight.shape)
        return per_channel(match.value("c"), channels, weight.ndim)

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        conv, weight = match.nodes["conv"], match.value("w")
        vector = self._vector(match)
        assert not isinstance(vector, str)
        bias = match.values.get("b")
        new_bias = vector + (0.0 if bias is None else bias.astype(np.float64).reshape(-1))
        base = "b" if bias is not None else "w"
        set_input(conv, 2, new_constant(match, base, "add", new_bias, weight.dtype))
        # The Conv writes the Add's output tensor, so its name (maybe a graph output) is kept.
        conv.outputs[0] = take_outputs(match.nodes["add"])[0]


@register_pass("fuse_conv_add")
@dataclass(kw_only=True)
class FuseConvAdd(RewritePass):
    """Fold an Add of a per-channel constant after Conv/ConvTranspose into the bias."""

    def rules(self) -> list[RewriteRule]:
        return [ConvAdd()]
