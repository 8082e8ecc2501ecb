"""Reading the parameters of data-movement ops: Slice ranges and Transpose permutations."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from iropt.ir.edit import ModelEdit, ints_param, normalize_axes, rank_of

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# (start, end, step) on one axis, as ONNX writes it.
AxisSlice = tuple[int, int, int]


def read_slice(edit: ModelEdit, node: gs.Node, rank: int | None) -> dict[int, AxisSlice] | None:
    """The Slice's constant parameters by non-negative axis, or None when any is not known."""
    as_input = edit.opset >= 10
    params = [
        ints_param(node, attr=name, index=index, as_input=as_input)
        for index, name in enumerate(("starts", "ends", "axes", "steps"), start=1)
    ]
    starts, ends, axes, steps = (p.values if p.present else None for p in params)
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    if any(p.present and p.values is None for p in params[2:]):
        return None
    axes = normalize_axes(axes if axes is not None else list(range(len(starts))), rank)
    steps = steps if steps is not None else [1] * len(starts)
    if axes is None or len(axes) != len(starts) or len(steps) != len(starts) or 0 in steps:
        return None
    if len(set(axes)) != len(axes):
        return None
    return {axis: (starts[i], ends[i], steps[i]) for i, axis in enumerate(axes)}


def clamp_range(start: int, end: int, step: int, size: int) -> range:
    """The indices ONNX Slice selects on an axis of `size` (its clamping rules, not Python's)."""
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), size), min(max(end, 0), size), step)
    return range(min(max(start, 0), size - 1), min(max(end, -1), size - 1), step)


def perm_of(node: gs.Node, rank: int | None = None) -> list[int] | None:
    """The Transpose's permutation, the default (reversed axes) resolved when the rank is known.

    `rank` is the input's rank when the caller knows it better than the input's annotation.
    """
    if "perm" in node.attrs:
        return [int(p) for p in node.attrs["perm"]]
    rank = rank_of(node.inputs[0]) if rank is None else rank
    return None if rank is None else list(reversed(range(rank)))
