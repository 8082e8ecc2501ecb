"""fuse_bn_conv: fold inference-mode BatchNormalization into the op that produces its input.

Pattern: `y = BatchNormalization(P(x, W, b?), scale, beta, mean, var)` with constant
parameters of shape [C], in inference mode (training_mode=0 and one output), where P is Conv,
ConvTranspose, Gemm, or MatMul with a constant 2-D weight and 2-D input, and P's output is
read only by the BatchNormalization (and is not a graph output).

Algebra: per channel c (axis 1), BN(t) = s[c] * (t - mean[c]) + beta[c] = s[c]*t + shift[c]
with s = scale / sqrt(var + eps) and shift = beta - mean * s. P is linear in its weight per
output channel, so the BN folds into the weight and the bias:

- Conv (any group count; channel o is weight row o):
  W'[o] = W[o] * s[o],  b'[o] = b[o] * s[o] + shift[o]  (b = 0 when absent).
- ConvTranspose with g groups, W of shape [C_in, C_out/g, k...]: output channel
  o = i*(C_out/g) + j is column j of input-channel block i, so
  W'[i*C_in/g:(i+1)*C_in/g, j] = W[...] * s[o];  b' as for Conv.
- Gemm, Y = alpha * A' B' + beta_g * C with channel n = column n of Y: the columns of B
  (transB=0, B is [K, N]) or the rows of B (transB=1, B is [N, K]) are scaled by s[n], and
  C' = beta_g * C * s + shift (C broadcast to [N] or [M, N]; 0 when absent), beta_g' = 1.
- MatMul, Y = A W with A 2-D and W constant [K, N]: W'[:, n] = W[:, n] * s[n], and the BN
  becomes `Add(Y, shift)`; the MatMul + Add is left for `fuse_matmul_add` to turn into Gemm.

A BatchNormalization with no fusable producer becomes, with `standalone=True`,
`Add(Mul(x, s), shift)` with s and shift shaped [C, 1, ..., 1] (rank(x) - 2 ones); that needs
x's rank (known shape, or a producer that fixes it). Folding into the *following* Conv is not
done: it is exact only without padding, which this pass does not try to establish.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.infra.registry import register_pass
from iropt.ir.channels import scale_output_channels
from iropt.rewrite import (
    Match,
    OpPattern,
    Pattern,
    RewritePass,
    RewriteRule,
    attribute,
    const,
    op,
    take_outputs,
    tensor,
    tensor_rank,
)
from iropt.rewrite.conv import (
    conv_layout,
    conv_problem,
    conv_producer,
    new_constant,
    set_input,
)

_PARAMS = ("scale", "beta", "mean", "var")


def _inference_mode(value: object) -> bool:
    """must be 0 (inference mode)"""
    return not value


def _spatial(value: object) -> bool:
    """must be 1: per-activation statistics (spatial=0) do not fold per channel"""
    return value in (None, 1)


def _bn(producer: Pattern) -> OpPattern:
    return op(
        "BatchNormalization",
        inputs=[producer, const("scale"), const("beta"), const("mean"), const("var")],
        attrs={"training_mode": _inference_mode, "spatial": _spatial},
        name="bn",
    )


def _bn_problem(match: Match, channels: int | None) -> str | None:
    """Why the BatchNormalization cannot be folded: training outputs, parameter shapes."""
    bn = match.nodes["bn"]
    outputs = [t for t in bn.outputs if t.name]
    if len(outputs) > 1:
        return f"BatchNormalization has {len(outputs)} outputs (training mode)"
    for param in _PARAMS:
        value = match.value(param)
        if value.dtype.kind != "f":
            return f"BatchNormalization.{param} is {value.dtype}, not floating point"
        if value.ndim != 1 or (channels is not None and value.shape[0] != channels):
            expected = f"[{channels}]" if channels is not None else "[C]"
            return f"BatchNormalization.{param} has shape {list(value.shape)}, expected {expected}"
    if len({match.value(p).shape for p in _PARAMS}) != 1:
        return "BatchNormalization parameters differ in length"
    return None


def _affine(match: Match) -> tuple[np.ndarray, np.ndarray]:
    """(s, shift) in float64: BN(t) = s * t + shift per channel."""
    eps = float(attribute(match.nodes["bn"], "epsilon", match.opset))
    scale, beta, mean, var = (match.value(p).astype(np.float64) for p in _PARAMS)
    s = scale / np.sqrt(var + eps)
    return s, beta - mean * s


def _bias(match: Match, channels: int) -> np.ndarray:
    bias = match.values.get("b")
    return np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(channels)


class ConvBn(RewriteRule):
    """BatchNormalization after Conv or ConvTranspose: fold into weight and bias."""

    def __init__(self, op_type: str) -> None:
        self.name = "conv_bn" if op_type == "Conv" else "conv_transpose_bn"
        self.pattern = _bn(conv_producer((op_type,)))

    def check(self, match: Match) -> str | None:
        problem = conv_problem(match)
        if problem is not None:
            return problem
        channels = conv_layout(match.nodes["conv"]).output_channels(match.value("w").shape)
        return _bn_problem(match, channels)

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        conv, weight = match.nodes["conv"], match.value("w")
        s, shift = _affine(match)
        new_weight = scale_output_channels(conv_layout(conv), weight, s)
        new_bias = _bias(match, s.shape[0]) * s + shift
        set_input(conv, 1, new_constant(match, "w", "bn", new_weight, weight.dtype))
        bias_base = "b" if match.tensors.get("b") is not None else "w"
        set_input(conv, 2, new_constant(match, bias_base, "bn_bias", new_bias, weight.dtype))
        # The Conv now writes the BN's output tensor: its name (maybe a graph output) is kept.
        conv.outputs[0] = take_outputs(match.nodes["bn"])[0]


class GemmBn(RewriteRule):
    """BatchNormalization after Gemm: scale B's output columns, fold into C."""

    name = "gemm_bn"
    pattern = _bn(
        op(
            "Gemm",
            inputs=[tensor("a"), const("w"), const("c", optional=True)],
            name="gemm",
            one_consumer=True,
        )
    )

    def check(self, match: Match) -> str | None:
        weight = match.value("w")
        if weight.ndim != 2 or weight.dtype.kind != "f":
            return (
                f"Gemm.B has shape {list(weight.shape)} and type {weight.dtype}; expected a 2-D float matrix"
            )
        return _bn_problem(match, self._columns(match))

    def _columns(self, match: Match) -> int:
        trans_b = attribute(match.nodes["gemm"], "transB", match.opset)
        return int(match.value("w").shape[0 if trans_b else 1])

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        gemm, weight = match.nodes["gemm"], match.value("w")
        s, shift = _affine(match)
        # transB=1: B is [N, K] and column n of Y comes from row n of B.
        axis_shape = (-1, 1) if attribute(gemm, "transB", match.opset) else (1, -1)
        new_weight = weight.astype(np.float64) * s.reshape(axis_shape)
        c = match.values.get("c")
        beta_g = float(attribute(gemm, "beta", match.opset))
        new_c = (0.0 if c is None else beta_g * c.astype(np.float64)) * s + shift
        set_input(gemm, 1, new_constant(match, "w", "bn", new_weight, weight.dtype))
        set_input(gemm, 2, new_constant(match, "c" if c is not None else "w", "bn_bias", new_c, weight.dtype))
        gemm.attrs["beta"] = 1.0
        gemm.outputs[0] = take_outputs(match.nodes["bn"])[0]


class MatMulBn(RewriteRule):
    """BatchNormalization after MatMul by a constant [K, N]: scale columns, then Add the shift."""

    name = "matmul_bn"
    pattern = _bn(op("MatMul", inputs=[tensor("a"), const("w")], name="matmul", one_consumer=True))

    def check(self, match: Match) -> str | None:
        weight = match.value("w")
        if weight.ndim != 2 or weight.dtype.kind != "f":
            return f"MatMul.B has shape {list(weight.shape)} and type {weight.dtype}; expected a 2-D float matrix"
        a = match.tensors["a"]
        rank = tensor_rank(a) if a is not None else None
        if rank != 2:
            # BatchNormalization normalizes axis 1, which is the weight's column axis only for 2-D A.
            return f"MatMul.A has {'unknown rank' if rank is None else f'rank {rank}'}; need rank 2"
        return _bn_problem(match, int(weight.shape[1]))

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        matmul, weight = match.nodes["matmul"], match.value("w")
        s, shift = _affine(match)
        set_input(matmul, 1, new_constant(match, "w", "bn", weight.astype(np.float64) * s, weight.dtype))
        bias = new_constant(match, "w", "bn_bias", shift, weight.dtype)
        # The MatMul keeps its output tensor (its only reader was the BN); the Add writes the BN's.
        graph.nodes.append(
            gs.Node(
                "Add",
                name=match.fresh_name(f"{matmul.name or 'matmul'}_bn_add"),
                inputs=[matmul.outputs[0], bias],
                outputs=take_outputs(match.nodes["bn"])[:1],
            )
        )


class StandaloneBn(RewriteRule):
    """A BatchNormalization on its own: Mul by s, Add shift, both shaped [C, 1, ...]."""

    name = "standalone_bn"
    pattern = _bn(tensor("x"))

    def check(self, match: Match) -> str | None:
        problem = _bn_problem(match, None)
        if problem is not None:
            return problem
        x = match.tensors["x"]
        rank = tensor_rank(x) if x is not None else None
        if rank is None or rank < 2:
            return f"BatchNormalization.X has {'unknown rank' if rank is None else f'rank {rank}'}; need rank >= 2"
        if self._dtype(match) is None:
            return "BatchNormalization.X has an unknown element type and the parameters' types differ"
        return None

    def _dtype(self, match: Match) -> np.dtype | None:
        x = match.tensors["x"]
        if x is not None and x.dtype is not None:
            return np.dtype(x.dtype)
        # Before opset 15 X and the parameters share one type; after, they usually still do.
        dtypes = {match.value(p).dtype for p in _PARAMS}
        return dtypes.pop() if len(dtypes) == 1 else None

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        bn, x = match.nodes["bn"], match.tensors["x"]
        assert x is not None
        rank, dtype = tensor_rank(x), self._dtype(match)
        assert rank is not None and dtype is not None
        s, shift = _affine(match)
        shape = (-1,) + (1,) * (rank - 2)
        base = bn.name or "bn"
        scale_c = match.constant(f"{base}_scale", s.reshape(shape).astype(dtype))
        shift_c = match.constant(f"{base}_shift", shift.reshape(shape).astype(dtype))
        outputs = take_outputs(bn)[:1]
        scaled = match.variable(f"{outputs[0].name}_scaled", like=outputs[0])
        graph.nodes.append(
            gs.Node("Mul", name=match.fresh_name(f"{base}_mul"), inputs=[x, scale_c], outputs=[scaled])
        )
        graph.nodes.append(
            gs.Node("Add", name=match.fresh_name(f"{base}_add"), inputs=[scaled, shift_c], outputs=outputs)
        )


@register_pass("fuse_bn_conv")
@dataclass(kw_only=True)
class FuseBnConv(RewritePass):
    """Fold inference BatchNormalization into a preceding Conv, ConvTranspose, Gemm or MatMul.

    `standalone`: turn a BatchNormalization that cannot be folded into a per-channel Mul + Add.
    """

    standalone: bool = True

    def rules(self) -> list[RewriteRule]:
        rules: list[RewriteRule] = [ConvBn("Conv"), ConvBn("ConvTranspose"), GemmBn(), MatMulBn()]
        if self.standalone:
            rules.append(StandaloneBn())
        return rules
