"""Topological order of a graph's nodes, and a clear error for a graph with a cycle."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from iropt.ir.graph import node_subgraphs


class GraphCycleError(ValueError):
    """The nodes of a graph form a cycle, so no topological order exists."""


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
