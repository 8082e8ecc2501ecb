"""Where the channels of a weighted op's constant weight lie.

Conv weights are `[C_out, C_in / groups, *kernel]`; ConvTranspose weights `[C_in, C_out / groups,
*kernel]`; Gemm's B is `[K, N]`, or `[N, K]` with `transB=1`; a MatMul's constant right-hand side
is `[K, N]`. Pruning slices these along the output axis (the producer's channels) or the input
axis (the consumer's channels), and reconstruction views them as an `[out, in * kernel]` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.ir.graph import constant_value, is_op


@dataclass(frozen=True)
class WeightLayout:
    """The constant weight of `node`: its input index, channel axes, bias input and groups."""

    node: gs.Node
    weight_input: int
    out_axis: int
    in_axis: int
    bias_input: int | None
    groups: int

    @property
    def weight(self) -> np.ndarray:
        value = constant_value(self.node.inputs[self.weight_input])
        assert value is not None
        return value

    @property
    def bias(self) -> np.ndarray | None:
        if self.bias_input is None or len(self.node.inputs) <= self.bias_input:
            return None
        tensor = self.node.inputs[self.bias_input]
        return None if tensor.name == "" else constant_value(tensor)

    def as_matrix(self, weight: np.ndarray) -> np.ndarray:
        """`[out, in * kernel]`: the input channel outermost, so a channel's columns are contiguous."""
        moved = np.moveaxis(weight, (self.out_axis, self.in_axis), (0, 1))
        return moved.reshape(moved.shape[0], -1)

    def from_matrix(self, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
        """The inverse of `as_matrix` for a weight of `like`'s shape."""
        moved_shape = np.moveaxis(like, (self.out_axis, self.in_axis), (0, 1)).shape
        moved = matrix.reshape(moved_shape)
        return np.moveaxis(moved, (0, 1), (self.out_axis, self.in_axis)).astype(like.dtype)


def weight_layout(node: gs.Node) -> WeightLayout | None:
    """The layout of `node`'s constant weight, or None when it has none that pruning understands."""
    if len(node.inputs) < 2 or constant_value(node.inputs[1]) is None:
        return None
    rank = len(node.inputs[1].shape or ())
    groups = int(node.attrs.get("group", 1))
    if is_op(node, "Conv") and rank >= 3:
        return WeightLayout(node, 1, 0, 1, 2, groups)
    if is_op(node, "ConvTranspose") and rank >= 3:
        return WeightLayout(node, 1, 1, 0, 2, groups)
    if is_op(node, "Gemm") and rank == 2 and not node.attrs.get("transA", 0):
        trans_b = bool(node.attrs.get("transB", 0))
        return WeightLayout(node, 1, 0 if trans_b else 1, 1 if trans_b else 0, 2, 1)
    if is_op(node, "MatMul") and rank == 2:
        return WeightLayout(node, 1, 1, 0, None, 1)
    return None
