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

import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import node_subgraphs, relink_outer_scope
from iropt.ir.model import Model, iter_graphs


class GraphCycleError(ValueError):
    """The nodes of a graph form a cycle, so no topological order exists."""


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


def sorted_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The nodes of `graph` in a stable topological order; GraphCycleError on a cycle."""
    position = {id(node): index for index, node in enumerate(graph.nodes)}
    deps = [_dependencies(node, position) for node in graph.nodes]
    state = [_UNSEEN] * len(graph.nodes)
    order: list[gs.Node] = []
    for root in range(len(graph.nodes)):
        if state[root] == _UNSEEN:
            _visit(root, deps, state, order, graph)
    return order


_UNSEEN, _OPEN, _DONE = 0, 1, 2


def _visit(root: int, deps: list[list[int]], state: list[int], order: list[gs.Node], graph: gs.Graph) -> None:
    """Emit `root` after its dependencies (iterative depth-first post-order)."""
    # Each stack entry is (node, index of the next dependency to look at).
    stack = [(root, 0)]
    state[root] = _OPEN
    while stack:
        current, next_dep = stack[-1]
        if next_dep < len(deps[current]):
            stack[-1] = (current, next_dep + 1)
            dep = deps[current][next_dep]
            if state[dep] == _UNSEEN:
                state[dep] = _OPEN
                stack.append((dep, 0))
            elif state[dep] == _OPEN:
                cycle = [index for index, _ in stack[[i for i, _ in stack].index(dep) :]]
                raise GraphCycleError(_cycle_message(cycle, graph.nodes, graph.name))
            continue
        stack.pop()
        state[current] = _DONE
        order.append(graph.nodes[current])


def _dependencies(node: gs.Node, position: dict[int, int]) -> list[int]:
    """Positions of the nodes of `node`'s graph that `node` reads from, in their current order.

    Visiting them in that order makes late producers land in their original relative order.
    """
    deps: set[int] = set()
    for tensor in _read_tensors(node):
        for producer in tensor.inputs:
            index = position.get(id(producer))
            # Producers in an outer scope are not ordered by this graph.
            if index is not None:
                deps.add(index)
    return sorted(deps)


def _read_tensors(node: gs.Node) -> list[gs.Tensor]:
    """`node`'s inputs, then every tensor read by nodes of its subgraphs at any depth."""
    tensors = list(node.inputs)
    pending = node_subgraphs(node)
    while pending:
        graph = pending.pop()
        for inner in graph.nodes:
            tensors.extend(inner.inputs)
            pending.extend(node_subgraphs(inner))
        # A subgraph output may be an outer-scope tensor passed straight through.
        tensors.extend(graph.outputs)
    return tensors


def _cycle_message(cycle: list[int], nodes: list[gs.Node], graph_name: str) -> str:
    names = [_describe(nodes[i]) for i in cycle]
    # The stack runs from a node to the producer it reads, so each name reads the next.
    return (
        f"graph '{graph_name}' has a cycle, so no topological order exists "
        f"(each node reads the next): {' -> '.join([*names, names[0]])}"
    )


def _describe(node: gs.Node) -> str:
    return (
        f"{node.op} '{node.name}'"
        if node.name
        else f"{node.op} (writes {node.outputs[0].name if node.outputs else '?'})"
    )
