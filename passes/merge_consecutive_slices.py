"""merge_consecutive_slices: fold `Slice(Slice(x, p1), p2)` with constant parameters into one Slice.

A Slice selects, independently on each listed axis, the indices `start, start+step, ...` up to
`end` (after ONNX's clamping), so two Slices compose axis by axis:

- an axis only one of them slices keeps that slice (Slices on disjoint axes simply combine);
- an axis both slice selects `r1[r2]`, where `r1` is the first's index progression and `r2` the
  second's progression over `len(r1)`. That is again an arithmetic progression, written back as
  one (start, end, step). When the axis's size is static this is computed exactly, clamping
  included. When it is not, only positive steps with non-negative starts and ends compose:
  index `i` of the second is `s1 + i*t1` in x, and `i < min(e2, len(r1))` is
  `s1 + i*t1 < min(e1, size, s1 + e2*t1)`, so the pair is
  `(start, end, step) = (s1 + s2*t1, min(e1, s1 + e2*t1), t1*t2)` (the runtime clamps to size).
  Any other combination is left alone.

Parameters are attributes before opset 10 (no steps) and inputs from 10 on; they must all be
constants. Negative axes need the rank. The second Slice is rewritten in place (its output keeps
its name) with fresh int64 parameters; the first is removed once nothing else reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.edit import GraphEdit, ModelEdit, dims_of, rank_of
from iropt.ir.graph import is_op
from iropt.ir.layout_ops import INT64_MAX, INT64_MIN, AxisSlice, clamp_range, read_slice
from iropt.ir.model import Model


@register_pass("merge_consecutive_slices")
@dataclass(kw_only=True)
class MergeConsecutiveSlices(Pass):
    """Combine back-to-back Slices with constant parameters into one Slice when that is exact.

    Stats: `merged` (Slice pairs that became one Slice).
    """

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        edit = ModelEdit(model)
        merged = 0
        for graph in edit.graphs:
            sweep = edit.sweep(graph)
            for node in sweep.nodes():
                if sweep.alive(node) and is_op(node, "Slice") and node.inputs:
                    # Again while it merges: a pair left alone earlier may sit further up.
                    while _merge(edit, sweep, node):
                        merged += 1
            sweep.finish()
        return PassResult.from_stats(merged=merged)


def write_slice(sweep: GraphEdit, node: gs.Node, data: gs.Tensor, spec: dict[int, AxisSlice]) -> None:
    """Make `node` slice `data` by `spec` (attributes before opset 10, fresh constants after)."""
    edit = sweep.edit
    axes = sorted(spec)
    starts, ends, steps = ([spec[a][k] for a in axes] for k in range(3))
    if edit.opset < 10:
        node.attrs.update(starts=starts, ends=ends, axes=axes)
        sweep.set_input(node, 0, data)
        return
    base = node.name or node.outputs[0].name
    params = [edit.int64_constant(f"{base}_{name}", values) for name, values in
              (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
    sweep.set_inputs(node, [data, *params])


def _merge(edit: ModelEdit, sweep: GraphEdit, second: gs.Node) -> bool:
    first = sweep.producer(second.inputs[0], "Slice")
    if first is None or not first.inputs:
        return False
    source = first.inputs[0]
    rank = next((r for r in map(rank_of, (source, first.outputs[0], second.outputs[0])) if r is not None), None)
    outer, inner = read_slice(edit, first, rank), read_slice(edit, second, rank)
    if outer is None or inner is None:
        return False
    dims = dims_of(source) or []
    combined = dict(outer)
    for axis, slice2 in inner.items():
        if axis not in outer:
            combined[axis] = slice2
            continue
        size = dims[axis] if axis < len(dims) else None
        composed = compose_axis(outer[axis], slice2, size)
        if composed is None:
            return False
        combined[axis] = composed
    if edit.opset < 10 and any(step != 1 for _, _, step in combined.values()):
        return False
    write_slice(sweep, second, source, combined)
    sweep.remove_if_dead(first)
    return True


def compose_axis(first: AxisSlice, second: AxisSlice, size: int | None) -> AxisSlice | None:
    """One (start, end, step) selecting what `second` selects from `first`'s result."""
    if size is not None:
        return _compose_static(first, second, size)
    (s1, e1, t1), (s2, e2, t2) = first, second
    if min(s1, e1, s2, e2) < 0 or t1 <= 0 or t2 <= 0:
        return None
    return _int64(s1 + s2 * t1), _int64(min(e1, s1 + e2 * t1)), _int64(t1 * t2)


def _compose_static(first: AxisSlice, second: AxisSlice, size: int) -> AxisSlice:
    outer = clamp_range(*first, size)
    picked = clamp_range(*second, len(outer))
    if not picked:
        return 0, 0, 1
    step = outer.step * picked.step
    start = outer[picked[0]]
    last = start + (len(picked) - 1) * step
    end = last + step
    # A negative end would count from the back; -(size + 1) clamps to "before index 0".
    if end < 0:
        end = -(size + 1)
    return start, end, step


def _int64(value: int) -> int:
    return max(INT64_MIN, min(INT64_MAX, value))
