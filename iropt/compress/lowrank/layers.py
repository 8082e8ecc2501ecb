"""The layers low-rank factorization can rewrite, each with its weight as a matrix on its input.

A layer computes `y = x @ W (+ bias)` for rows `x` of length K drawn from its input activation:

- MatMul(x, W) with a constant 2-D W (K x N); x may have any number of leading (batch) axes.
- Gemm(A, B, C): x are the rows of A (of A^T with transA), W = alpha * B (B^T with transB), the
  bias is beta * C when C is a constant that broadcasts along rows.
- Conv with group 1: x are the input patches (Cin x k1 x k2 ... values around each output
  position, zeros where the patch hangs over the padding), W = weight.reshape(Cout, -1)^T.

Everything else is reported with the reason it is left alone (grouped Conv, non-constant or shared
weight, a MatMul whose constant is on the left, non-float weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from iropt.ir.channels import weight_layout
from iropt.ir.graph import constant_value, is_op

LayerKind = Literal["matmul", "gemm", "conv"]
OP_TYPES: tuple[str, ...] = ("Gemm", "MatMul", "Conv")


@dataclass(frozen=True)
class PatchGeometry:
    """How a Conv reads its input: the patch each output position sees."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end... as in ONNX; ignored unless auto_pad is NOTSET
    auto_pad: str

    def padding(self, spatial: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """(begin, end) padding per spatial axis for an input of size `spatial`."""
        rank = len(self.kernel)
        if self.auto_pad in ("NOTSET", ""):
            pads = self.pads or (0,) * (2 * rank)
            return tuple((pads[i], pads[i + rank]) for i in range(rank))
        if self.auto_pad == "VALID":
            return ((0, 0),) * rank
        result = []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations, strict=True):
            out = math.ceil(size / s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            result.append((small, large) if self.auto_pad == "SAME_UPPER" else (large, small))
        return tuple(result)

    def patches(self, x: np.ndarray) -> np.ndarray:
        """The rows (positions x Cin*prod(kernel)) of `x` (N, Cin, *spatial) that the Conv multiplies."""
        rank = len(self.kernel)
        padded = np.pad(x, ((0, 0), (0, 0), *self.padding(tuple(x.shape[2:]))))
        spans = tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True))
        axes = tuple(range(2, 2 + rank))
        windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=axes)
        picks = tuple(slice(None, None, s) for s in self.strides) + tuple(
            slice(None, None, d) for d in self.dilations
        )
        index = (slice(None), slice(None), *picks)
        windows = windows[index]
        # (N, Cin, *out, *kernel) -> (N, *out, Cin, *kernel): one row per output position.
        order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
        channels = x.shape[1]
        return windows.transpose(order).reshape(-1, channels * int(np.prod(self.kernel)))


@dataclass(frozen=True)
class RowSource:
    """Where a layer's rows x come from: a tensor, read as is, transposed (Gemm transA) or as patches."""

    tensor: str
    transposed: bool = False
    geometry: PatchGeometry | None = None

    def rows(self, value: np.ndarray) -> np.ndarray:
        if self.geometry is not None:
            return self.geometry.patches(value)
        if self.transposed:
            return value.T
        return value.reshape(-1, value.shape[-1]) if value.ndim > 1 else value.reshape(1, -1)


@dataclass
class Layer:
    """One layer to factorize: its node, its weight as K x N, and where its rows come from."""

    node: gs.Node
    kind: LayerKind
    weight: np.ndarray  # as stored (Conv: Cout x Cin x k..., Gemm: B, MatMul: K x N)
    matrix: np.ndarray  # K x N, float64, alpha and transB applied
    bias: np.ndarray | None  # length N, beta applied; None when absent or not a row vector
    source: RowSource
    positions: int  # output rows per run, counting dynamic axes as 1 (for MACs)
    # Kept from the start: the node loses its outputs when it is replaced.
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = f"{self.node.name or self.node.outputs[0].name} ({self.node.op})"

    @property
    def params(self) -> int:
        return int(self.weight.size)

    @property
    def in_features(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.matrix.shape[1])


def find_layer(node: gs.Node) -> Layer | str:
    """The layer `node` is, or the reason it cannot be factorized."""
    if is_op(node, "MatMul"):
        return _matmul(node)
    if is_op(node, "Gemm"):
        return _gemm(node)
    if is_op(node, "Conv"):
        return _conv(node)
    return f"{node.op} is not one of {', '.join(OP_TYPES)}"


def _constant_weight(node: gs.Node, index: int) -> np.ndarray | str:
    tensor = node.inputs[index]
    value = constant_value(tensor)
    if value is None:
        return "the weight is not a constant"
    if value.dtype.kind != "f":
        return f"the weight is {value.dtype}, not floating point"
    if len(tensor.outputs) > 1:
        return "the weight is shared with other nodes"
    return value


def _right_weight(node: gs.Node) -> np.ndarray | str:
    """The constant right operand of a MatMul or Gemm (the left one is the activation)."""
    if constant_value(node.inputs[0]) is not None:
        return "the constant is the left operand"
    return _constant_weight(node, 1)


def _matmul(node: gs.Node) -> Layer | str:
    weight = _right_weight(node)
    if isinstance(weight, str):
        return weight
    if weight.ndim != 2:
        return f"the weight has {weight.ndim} dimensions, not 2"
    return Layer(node, "matmul", weight, _in_by_out(node, weight), None,
                 RowSource(node.inputs[0].name), _positions(node.outputs[0], 1))


def _gemm(node: gs.Node) -> Layer | str:
    weight = _right_weight(node)
    if isinstance(weight, str):
        return weight
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    matrix = alpha * _in_by_out(node, weight)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        value = constant_value(node.inputs[2])
        if value is not None and value.size in (1, matrix.shape[1]) and value.ndim <= 2 and (
            value.ndim < 2 or value.shape[0] == 1
        ):
            bias = beta * np.broadcast_to(value.reshape(-1).astype(np.float64), (matrix.shape[1],))
    source = RowSource(node.inputs[0].name, transposed=bool(node.attrs.get("transA", 0)))
    return Layer(node, "gemm", weight, matrix, bias, source, _positions(node.outputs[0], 1))


def _conv(node: gs.Node) -> Layer | str:
    weight = _constant_weight(node, 1)
    if isinstance(weight, str):
        return weight
    layout = weight_layout(node, weight.ndim)
    if layout is None or layout.groups != 1:
        return f"grouped Conv (group={node.attrs.get('group')})"
    rank = weight.ndim - 2
    kernel = tuple(int(k) for k in weight.shape[2:])
    geometry = PatchGeometry(
        kernel=kernel,
        strides=tuple(node.attrs.get("strides", (1,) * rank)),
        dilations=tuple(node.attrs.get("dilations", (1,) * rank)),
        pads=tuple(node.attrs.get("pads", (0,) * (2 * rank))),
        auto_pad=str(node.attrs.get("auto_pad", "NOTSET")),
    )
    # Output channels first (the layout's out axis is 0), the rest flattened as the patch is.
    matrix = weight.reshape(weight.shape[layout.out_axis], -1).T.astype(np.float64)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        value = constant_value(node.inputs[2])
        bias = None if value is None else value.astype(np.float64).reshape(-1)
    source = RowSource(node.inputs[0].name, geometry=geometry)
    return Layer(node, "conv", weight, matrix, bias, source, _positions(node.outputs[0], 2))


def _in_by_out(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """A Gemm or 2-D MatMul weight as K x N (input channels by output channels), float64."""
    layout = weight_layout(node, weight.ndim)
    assert layout is not None
    return np.moveaxis(weight.astype(np.float64), (layout.in_axis, layout.out_axis), (0, 1))


def _positions(output: gs.Tensor, feature_axes_from_end: int) -> int:
    """Output rows per run: all axes but the feature one (MatMul: last; Conv: axis 1), dynamic ones as 1."""
    shape = output.shape
    if shape is None:
        return 1
    dims = list(shape)
    if feature_axes_from_end == 1:
        dims = dims[:-1]
    else:
        dims = dims[:1] + dims[2:]
    return int(np.prod([d for d in dims if isinstance(d, int) and d > 0] or [1]))
