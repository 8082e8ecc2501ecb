"""Streaming second-order statistics of weighted layers' inputs, for importance and reconstruction.

A consumer `y = W x + b` sees its input as rows of features: a Conv through im2col (one row per
output position, the features `C_in * kernel` in the order of `WeightedNode.as_matrix`), a Gemm
or MatMul as its input's last axis. Per consumer we accumulate, one batch at a time, the Gram
matrix of `[x, 1]` and, when a target is given, its cross product with the target output rows:
memory is `(K + 1)^2 + (K + 1) * M` floats whatever the number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.calibration import split_batches, with_outputs
from iropt.compress.prune.layout import WeightedNode
from iropt.ir.graph import is_op
from iropt.ir.model import Model
from iropt.verify.runner import Runner

Feeds = dict[str, np.ndarray]


@dataclass
class GramStats:
    """Sums over rows of `[x, 1] [x, 1]^T` and, optionally, `[x, 1] y^T`."""

    features: int
    xtx: np.ndarray = field(init=False)
    xty: np.ndarray | None = None
    rows: int = 0

    def __post_init__(self) -> None:
        self.xtx = np.zeros((self.features + 1, self.features + 1))

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        # One batch's products in float32 (fast), summed across batches in float64.
        augmented = np.concatenate([x, np.ones((x.shape[0], 1), dtype=x.dtype)], axis=1).astype(np.float32)
        self.xtx += augmented.T @ augmented
        if y is not None:
            cross = (augmented.T @ y.astype(np.float32)).astype(np.float64)
            self.xty = cross if self.xty is None else self.xty + cross
        self.rows += x.shape[0]

    @property
    def second_moment(self) -> np.ndarray:
        """E[x x^T] over the rows seen (without the constant column)."""
        return self.xtx[:-1, :-1] / max(self.rows, 1)


def kernel_size(layout: WeightedNode) -> int:
    """Weight columns per input channel in `as_matrix` order (the kernel's spatial size)."""
    shape = layout.weight.shape
    return int(np.prod([d for axis, d in enumerate(shape) if axis not in (layout.out_axis, layout.in_axis)]))


def input_rows(node: gs.Node, x: np.ndarray, layout: WeightedNode) -> np.ndarray | None:
    """The consumer's input as rows of features, or None for an op reconstruction cannot model."""
    if is_op(node, "Conv") and layout.groups == 1:
        return im2col(x, node, layout.weight.shape[2:])
    if is_op(node, "Gemm", "MatMul"):
        return x.reshape(-1, x.shape[-1])
    return None


def output_rows(node: gs.Node, y: np.ndarray) -> np.ndarray:
    """The node's output as rows of output channels, in the row order of `input_rows`."""
    if is_op(node, "Conv"):
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def conv_padding(node: gs.Node, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> list[int]:
    """Explicit begin and end pads of a Conv, `auto_pad` resolved."""
    dims = len(kernel)
    strides = list(node.attrs.get("strides", [1] * dims))
    dilations = list(node.attrs.get("dilations", [1] * dims))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=False):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    if auto_pad == "VALID":
        return [0] * (2 * dims)
    return list(node.attrs.get("pads", [0] * (2 * dims)))


def im2col(x: np.ndarray, node: gs.Node, kernel: tuple[int, ...]) -> np.ndarray:
    """Rows `[N * out_positions, C * prod(kernel)]` of a Conv's input patches."""
    dims = len(kernel)
    strides = list(node.attrs.get("strides", [1] * dims))
    dilations = list(node.attrs.get("dilations", [1] * dims))
    pads = conv_padding(node, tuple(x.shape[2:]), tuple(kernel))
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)])
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=False)]
    axes = tuple(range(2, 2 + dims))
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=axes)
    picks = (slice(None), slice(None), *(slice(None, None, s) for s in strides),
             *(slice(None, None, d) for d in dilations))
    windows = windows[picks]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    channels = x.shape[1] * int(np.prod(kernel))
    return np.ascontiguousarray(windows.transpose(order)).reshape(-1, channels)


def run_batches(
    model: Model,
    tensors: list[str],
    feeds: Iterable[Feeds],
    runner_factory: Callable[[Model], Runner],
    batch_size: int,
) -> Iterable[tuple[Feeds, dict[str, np.ndarray]]]:
    """Yield each batch and the values of `tensors` on it (graph inputs read from the batch)."""
    inputs = {t.name for t in model.graph.inputs}
    runner = runner_factory(with_outputs(model, [t for t in tensors if t not in inputs]))
    for feed in feeds:
        for batch in split_batches(feed, batch_size):
            outputs = runner.run(batch)
            yield batch, {name: batch[name] if name in inputs else outputs[name] for name in tensors}


def consumer_grams(
    model: Model,
    layouts: list[WeightedNode],
    feeds: Iterable[Feeds],
    runner_factory: Callable[[Model], Runner],
    batch_size: int,
) -> dict[int, GramStats]:
    """Gram matrices of each consumer's input rows, by `id(node)`, over `feeds`."""
    wanted = [layout for layout in layouts if is_op(layout.node, "Conv", "Gemm", "MatMul")]
    names = sorted({layout.node.inputs[0].name for layout in wanted})
    grams: dict[int, GramStats] = {}
    for _, values in run_batches(model, names, feeds, runner_factory, batch_size):
        for layout in wanted:
            rows = input_rows(layout.node, values[layout.node.inputs[0].name], layout)
            if rows is None:
                continue
            grams.setdefault(id(layout.node), GramStats(rows.shape[1])).add(rows)
    return grams
