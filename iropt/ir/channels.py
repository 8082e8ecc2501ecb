"""Weight layout of the weighted ops: which axes of a constant weight hold output and input channels.

The one statement of these rules; fusion, quantization, the TensorRT lint, pruning and low-rank
read them from here.

- Conv: weight [C_out, C_in/g, k...]; output channel o is row o whatever the group count g.
- ConvTranspose: weight [C_in, C_out/g, k...]; output channel o = b*(C_out/g) + j is column j of
  input-channel block b, so with g > 1 no single axis indexes the output channels.
- Gemm: B is [K, N], or [N, K] with transB=1.
- MatMul: B is [..., K, N]; output channels are its last axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class WeightLayout:
    """Where the channels of a weighted op's weight (input 1) are.

    `out_axis` holds the output channels (per group for ConvTranspose), `in_axis` the input
    channels (per group for Conv), `groups` the op's group count (1 for Gemm and MatMul).
    """

    op: str
    out_axis: int
    in_axis: int
    groups: int = 1

    def output_channels(self, shape: Sequence[int]) -> int:
        """Output channels of the op for a weight of `shape`."""
        count = int(shape[self.out_axis])
        return count * self.groups if self.op == "ConvTranspose" else count

    def input_channels(self, shape: Sequence[int]) -> int:
        """Input channels the op reads, for a weight of `shape`."""
        count = int(shape[self.in_axis])
        return count * self.groups if self.op == "Conv" else count

    @property
    def per_channel_axis(self) -> int | None:
        """The weight axis whose index alone is the output channel (per-channel scales go there);
        None for a grouped ConvTranspose, whose output channels span two axes."""
        if self.op == "ConvTranspose" and self.groups != 1:
            return None
        return self.out_axis


def weight_layout(node: gs.Node, weight_rank: int) -> WeightLayout | None:
    """The layout of `node`'s weight of rank `weight_rank`, or None for an op without one."""
    groups = int(node.attrs.get("group", 1))
    if node.op == "Conv":
        return WeightLayout("Conv", out_axis=0, in_axis=1, groups=groups)
    if node.op == "ConvTranspose":
        return WeightLayout("ConvTranspose", out_axis=1, in_axis=0, groups=groups)
    if node.op == "Gemm":
        trans_b = int(node.attrs.get("transB", 0))
        return WeightLayout("Gemm", out_axis=0 if trans_b else 1, in_axis=1 if trans_b else 0)
    if node.op == "MatMul" and weight_rank >= 2:
        return WeightLayout("MatMul", out_axis=weight_rank - 1, in_axis=weight_rank - 2)
    return None


def scale_output_channels(layout: WeightLayout, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The weight with output channel o multiplied by `scale[o]` (float64).

    A grouped ConvTranspose weight is viewed as [g, C_in/g, C_out/g, k...] and scaled by `scale`
    viewed as [g, 1, C_out/g, 1...]; every other layout scales along `out_axis`.
    """
    w = weight.astype(np.float64)
    if layout.op == "ConvTranspose" and layout.groups != 1:
        kernel_ones = (1,) * (w.ndim - 2)
        c_in, per_group = w.shape[:2]
        blocks = w.reshape(layout.groups, c_in // layout.groups, per_group, *w.shape[2:])
        scaled = blocks * scale.reshape(layout.groups, 1, per_group, *kernel_ones)
        return scaled.reshape(w.shape)
    shape = [1] * w.ndim
    shape[layout.out_axis] = -1
    return w * scale.reshape(shape)
