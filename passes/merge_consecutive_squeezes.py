"""merge_consecutive_squeezes: combine or cancel back-to-back Squeeze/Unsqueeze pairs.

Axes are made non-negative first (a negative axis needs the rank, else the pair is skipped):
Unsqueeze axes count in its output, Squeeze axes in its input. With `x` the pair's input:

- `Unsqueeze(Unsqueeze(x, A), B)`: the second inserts size-1 axes at `B` of the output; the
  remaining output axes, in order, are the intermediate's, whose axes `A` were inserted by the
  first. So the pair is `Unsqueeze(x, B ∪ {k_j : j ∈ A})`, `k_j` the j-th output axis not in `B`.
- `Squeeze(Squeeze(x, A), B)`: the intermediate's axis j is x's j-th axis not in `A`, so the
  pair is `Squeeze(x, A ∪ {k_j : j ∈ B})`, `k_j` the j-th axis of x not in `A`.
- `Squeeze(Unsqueeze(x, A), B)` with `B = A`: the inserted axes are removed again: `x`.
  With `B ⊂ A` only inserted axes are removed: `Unsqueeze(x, A \\ B)`, each axis shifted down
  by the number of removed axes before it. With `A ⊂ B` every inserted axis is removed and
  some of x's too: `Squeeze(x, B \\ A)`, each axis shifted down by the inserted axes before it.
- `Unsqueeze(Squeeze(x, A), A)`: puts back the size-1 axes just removed: `x` (for every input
  the original accepts: Squeeze fails unless those axes have size 1).

Axes are an attribute before opset 13 and an input from 13 on; the input must be a constant.
A Squeeze without axes ("all size-1 axes") takes its axes from its input's static shape, and
is left alone when that shape is not fully known. The second node is rewritten in place (its
output keeps its name); the first is removed once nothing else reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.edit import (
    GraphEdit,
    ModelEdit,
    ints_param,
    normalize_axes,
    rank_of,
    set_ints_param,
    static_shape,
)
from iropt.ir.graph import is_op
from iropt.ir.model import Model

_OPS = ("Squeeze", "Unsqueeze")


@register_pass("merge_consecutive_squeezes")
@dataclass(kw_only=True)
class MergeConsecutiveSqueezes(Pass):
    """Fold Squeeze/Unsqueeze pairs into one node, or remove them when they cancel.

    Stats: `combined` (pairs that became one Squeeze or Unsqueeze), `cancelled` (pairs removed
    because the second undoes the first).
    """

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        edit = ModelEdit(model)
        combined = cancelled = 0
        for graph in edit.graphs:
            sweep = edit.sweep(graph)
            for node in sweep.nodes():
                if sweep.alive(node) and is_op(node, *_OPS) and node.inputs:
                    # Again while it combines: a pair that could not cancel (a graph output
                    # between graph input and output) may sit further up.
                    outcome: str | None = "combined"
                    while outcome == "combined":
                        outcome = _merge(edit, sweep, node)
                        combined += outcome == "combined"
                        cancelled += outcome == "cancelled"
            sweep.finish()
        return PassResult.from_stats(combined=combined, cancelled=cancelled)


def _axes(edit: ModelEdit, node: gs.Node) -> list[int] | None:
    """The node's axes as written (possibly negative), or None when they are not known."""
    param = ints_param(node, attr="axes", index=1, as_input=edit.opset >= 13)
    if param.present:
        return param.values
    if node.op == "Unsqueeze":
        return None
    # Squeeze without axes removes every size-1 axis: known only from a static shape.
    shape = static_shape(node.inputs[0])
    return None if shape is None else [i for i, d in enumerate(shape) if d == 1]


def _merge(edit: ModelEdit, sweep: GraphEdit, second: gs.Node) -> str | None:
    first = sweep.producer(second.inputs[0], *_OPS)
    if first is None or not first.inputs:
        return None
    raw_a, raw_b = _axes(edit, first), _axes(edit, second)
    if raw_a is None or raw_b is None or not raw_a or not raw_b:
        return None
    source = first.inputs[0]
    # The input's rank, from its own annotation or from the first node's output.
    rank, middle = rank_of(source), rank_of(first.outputs[0])
    if rank is None and middle is not None:
        rank = middle - _rank_change(first.op, raw_a)
    mid_rank = None if rank is None else rank + _rank_change(first.op, raw_a)
    out_rank = None if mid_rank is None else mid_rank + _rank_change(second.op, raw_b)
    a = normalize_axes(raw_a, mid_rank if first.op == "Unsqueeze" else rank)
    b = normalize_axes(raw_b, out_rank if second.op == "Unsqueeze" else mid_rank)
    if a is None or b is None or len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    plan = _plan(first.op, second.op, set(a), set(b))
    if plan is None:
        return None
    op, axes = plan
    if op == "":
        if not sweep.forward(second, source, second.outputs[0]):
            return None
        sweep.remove_if_dead(first)
        return "cancelled"
    second.op = op
    set_ints_param(sweep, second, axes, attr="axes", index=1, as_input=edit.opset >= 13)
    sweep.set_input(second, 0, source)
    sweep.remove_if_dead(first)
    return "combined"


def _rank_change(op: str, axes: list[int]) -> int:
    return len(axes) if op == "Unsqueeze" else -len(axes)


def _plan(first: str, second: str, a: set[int], b: set[int]) -> tuple[str, list[int]] | None:
    """The single op (and its axes) equal to the pair, "" for the identity, None when there is none."""
    if first == second == "Unsqueeze":
        outside = _positions_outside(b, max(a) + 1)
        return "Unsqueeze", sorted(b | {outside[j] for j in a})
    if first == second == "Squeeze":
        outside = _positions_outside(a, max(b) + 1)
        return "Squeeze", sorted(a | {outside[j] for j in b})
    if a == b:
        return "", []
    if first == "Unsqueeze" and b < a:
        return "Unsqueeze", sorted(axis - sum(1 for r in b if r < axis) for axis in a - b)
    if first == "Unsqueeze" and a < b:
        return "Squeeze", sorted(axis - sum(1 for r in a if r < axis) for axis in b - a)
    return None


def _positions_outside(excluded: set[int], count: int) -> list[int]:
    """The first `count` non-negative integers not in `excluded`, in order."""
    positions: list[int] = []
    candidate = 0
    while len(positions) < count:
        if candidate not in excluded:
            positions.append(candidate)
        candidate += 1
    return positions
