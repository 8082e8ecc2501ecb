"""merge_consecutive_transposes: fold `Transpose(Transpose(x, p1), p2)` into one Transpose.

Algebra: `y = Transpose(x, p1)` has `y.shape[i] = x.shape[p1[i]]` (and likewise for elements),
so `z = Transpose(y, p2)` reads `z[..i..] = x` at axis `p1[p2[i]]`: the pair is
`Transpose(x, p)` with `p[i] = p1[p2[i]]`. When `p` is the identity the pair computes `x` and
the second Transpose goes (its consumers read `x`); otherwise the second Transpose is rewired to
read `x` with perm `p`. The first Transpose is removed once nothing reads it; when its output has
other consumers (or is a graph output) it stays for them.

A missing `perm` means "reverse the axes", which needs the rank: from an annotation of the
pair's tensors or from the other Transpose's perm; when it is not known the pair is left alone. Nodes are visited in topological order, so a chain of any length
collapses in one sweep (each Transpose already reads the chain's start when its successor is
visited).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.edit import GraphEdit, ModelEdit, rank_of
from iropt.ir.graph import is_op
from iropt.ir.layout_ops import perm_of
from iropt.ir.model import Model


@register_pass("merge_consecutive_transposes")
@dataclass(kw_only=True)
class MergeConsecutiveTransposes(Pass):
    """Compose back-to-back Transposes into one; drop the pair when the composition is the identity.

    Stats: `merged` (pairs that became one Transpose), `cancelled` (pairs whose composed perm is the
    identity, so the second Transpose was removed).
    """

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        edit = ModelEdit(model)
        merged = cancelled = 0
        for graph in edit.graphs:
            sweep = edit.sweep(graph)
            for node in sweep.nodes():
                if not sweep.alive(node) or not _is_transpose(node):
                    continue
                # Again while it merges: a pair that could not cancel (a graph output between
                # graph input and output) may sit further up.
                outcome: str | None = "merged"
                while outcome == "merged":
                    outcome = _merge(sweep, node)
                    merged += outcome == "merged"
                    cancelled += outcome == "cancelled"
            sweep.finish()
        return PassResult.from_stats(merged=merged, cancelled=cancelled)


def _is_transpose(node: gs.Node) -> bool:
    return is_op(node, "Transpose") and len(node.inputs) == 1


def _rank_hint(first: gs.Node, second: gs.Node) -> int | None:
    """The rank of the pair's tensors from any annotation or explicit perm that gives it."""
    for tensor in (first.inputs[0], first.outputs[0], second.outputs[0]):
        rank = rank_of(tensor)
        if rank is not None:
            return rank
    return len(second.attrs["perm"]) if "perm" in second.attrs else None


def _is_perm(perm: list[int]) -> bool:
    return sorted(perm) == list(range(len(perm)))


def _merge(sweep: GraphEdit, second: gs.Node) -> str | None:
    first = sweep.producer(second.inputs[0], "Transpose")
    if first is None or len(first.inputs) != 1:
        return None
    p1 = perm_of(first, _rank_hint(first, second))
    p2 = perm_of(second, None if p1 is None else len(p1))
    if p1 is None or p2 is None or not _is_perm(p1) or sorted(p2) != sorted(p1):
        return None
    composed = [p1[axis] for axis in p2]
    source = first.inputs[0]
    if composed == list(range(len(composed))):
        if not sweep.forward(second, source, second.outputs[0]):
            return None
        sweep.remove_if_dead(first)
        return "cancelled"
    second.attrs["perm"] = composed
    sweep.set_input(second, 0, source)
    sweep.remove_if_dead(first)
    return "merged"
