"""toposort: order every graph's nodes so that each node comes after the producers of its inputs.

ONNX requires nodes in topological order; rewrites that append new nodes at the end of the list
can break it. A node depends on the producers (in its own graph) of its inputs and of every
outer-scope tensor that its subgraphs read, at any depth: an If must come after the nodes that
compute the values its branches use.

The order is *stable*: a depth-first walk visits nodes in their current order and emits each one
right after its not-yet-emitted producers, so an already sorted graph keeps its exact order and
an unsorted one moves only the producers that were late. (Kahn's algorithm with a FIFO queue
would reorder a valid graph by depth; with a priority queue it costs O(n log n).) The walk is
linear in nodes plus edges (each node's producer list is sorted, which is tiny), iterative (no
recursion limit on deep chains), and a cycle is an error that names the nodes on it. A node
with subgraphs costs the size of those subgraphs once per enclosing level.

An out-of-order proto imports with producer-less stand-ins for the outer values its subgraphs
read (graphsurgeon resolves names only against what it imported earlier); those are linked to
the real tensors first (`relinked`), which changes no exported byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import iter_graphs, relink_outer_scope
from iropt.ir.model import Model
from iropt.ir.toposort import sorted_nodes


@register_pass("toposort")
@dataclass(kw_only=True)
class Toposort(Pass):
    """Sort the nodes of the graph and its subgraphs topologically, keeping the given order where valid."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # Out-of-order protos import with stand-in tensors for outer-scope reads; link them to
        # the real producers first so that those reads count as dependencies.
        relinked = relink_outer_scope(model.graph)
        moved = 0
        for graph in iter_graphs(model.graph):
            order = sorted_nodes(graph)
            # Nodes now at a different position than before; zero for an already sorted graph.
            displaced = sum(a is not b for a, b in zip(order, graph.nodes, strict=True))
            if displaced:
                graph.nodes = order
                moved += displaced
        # Relinking alone changes no exported byte, so it is reported but is not a change.
        return PassResult(changed=moved > 0, stats={"moved": moved, "relinked": relinked})
