"""A weighted node as pruning sees it: its constant weight, bias, channel axes and matrix view.

The axes come from `iropt.ir.channels` (the one statement of the weight layouts); this adds what
pruning needs on top: the node, where its bias input is, and an `[out, in * kernel]` matrix view
for importance and least-squares reconstruction. Pruning handles what a single axis indexes:
a transA Gemm and a MatMul whose weight is not 2-D are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.ir.channels import weight_layout
from iropt.ir.graph import constant_value, is_op

WEIGHT_INPUT = 1
BIAS_INPUT = 2  # Conv, ConvTranspose and Gemm (C); MatMul has none


@dataclass(frozen=True)
class WeightedNode:
    """`node`'s constant weight (input 1): output and input channel axes, bias input, groups."""

    node: gs.Node
    out_axis: int
    in_axis: int
    bias_input: int | None
    groups: int
    weight_input: int = WEIGHT_INPUT

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


def weighted_node(node: gs.Node) -> WeightedNode | None:
    """`node` as a weighted node, or None when it has no constant weight pruning understands."""
    if not is_op(node, "Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) <= WEIGHT_INPUT:
        return None
    weight = constant_value(node.inputs[WEIGHT_INPUT])
    if weight is None or weight.ndim < 2 or (is_op(node, "Conv", "ConvTranspose") and weight.ndim < 3):
        return None
    if (is_op(node, "Gemm") and node.attrs.get("transA", 0)) or (is_op(node, "MatMul") and weight.ndim != 2):
        return None
    layout = weight_layout(node, weight.ndim)
    if layout is None:
        return None
    bias = None if is_op(node, "MatMul") else BIAS_INPUT
    return WeightedNode(node, layout.out_axis, layout.in_axis, bias, layout.groups)
