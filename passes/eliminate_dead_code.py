"""eliminate_dead_code: remove nodes whose results reach no graph output, and the weights only they used.

A node is live when one of its outputs is a graph output or an input of a live node. A node with
subgraphs (If, Loop, Scan) is live like any other; when it is, its subgraphs' outputs are live,
and so, transitively, are the outer-scope tensors that live subgraph nodes read. graphsurgeon
shares tensor objects between a graph and its subgraphs, so one backward walk over producer
links, starting at the main graph's outputs, marks every live node of every scope; every node
and tensor is visited once, which keeps the pass linear in the size of the model.

Everything not marked is removed: dead nodes of the main graph and of live subgraphs (a dead
node's own subgraphs go with it), and the initializers that only dead nodes read. Graph inputs
and outputs (of the main graph and of subgraphs) are never removed: they are the interface.
graphsurgeon writes initializers and value_info only for tensors that live nodes still
reference, so dropping a node drops its weights and shape annotations on export.

graphsurgeon only shares a tensor with a subgraph when its producer was imported first; the
stand-ins an out-of-order proto leaves behind are linked to the real tensors before the walk,
so a producer read only by a subgraph is never mistaken for dead.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import iter_graphs, node_subgraphs, relink_outer_scope
from iropt.ir.model import Model


@register_pass("eliminate_dead_code")
@dataclass(kw_only=True)
class EliminateDeadCode(Pass):
    """Remove nodes and initializers that no graph output depends on (subgraphs included)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # A producer read only through a stand-in tensor (an out-of-order import) must count as used.
        relink_outer_scope(model.graph)
        constants_before = _referenced_constants(model.graph)
        live = _live_nodes(model.graph)
        nodes = 0
        # Only graphs reachable through live nodes need sweeping: dead nodes take their
        # subgraphs with them.
        for graph in _live_graphs(model.graph, live):
            nodes += _sweep(graph, live)
        initializers = len(constants_before - _referenced_constants(model.graph)) if nodes else 0
        return PassResult.from_stats(nodes=nodes, initializers=initializers)


def _live_nodes(graph: gs.Graph) -> set[int]:
    """ids of every node, in any scope, that some output of `graph` depends on."""
    live: set[int] = set()
    seen_tensors: set[int] = set()
    pending: list[gs.Tensor] = list(graph.outputs)
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen_tensors:
            continue
        seen_tensors.add(id(tensor))
        for producer in tensor.inputs:
            if id(producer) in live:
                continue
            live.add(id(producer))
            pending.extend(producer.inputs)
            for subgraph in node_subgraphs(producer):
                pending.extend(subgraph.outputs)
    return live


def _live_graphs(graph: gs.Graph, live: set[int]) -> list[gs.Graph]:
    """`graph` and the subgraphs of its live nodes, recursively."""
    graphs = [graph]
    index = 0
    while index < len(graphs):
        for node in graphs[index].nodes:
            if id(node) in live:
                graphs.extend(node_subgraphs(node))
        index += 1
    return graphs


def _sweep(graph: gs.Graph, live: set[int]) -> int:
    """Drop the dead nodes of `graph`; returns how many nodes went, nested subgraphs included."""
    kept: list[gs.Node] = []
    removed = 0
    for node in graph.nodes:
        if id(node) in live:
            kept.append(node)
            continue
        removed += 1 + sum(len(sub.nodes) for inner in node_subgraphs(node) for sub in iter_graphs(inner))
        # Disconnect so live tensors forget this consumer (graphsurgeon keeps both directions).
        node.inputs.clear()
        node.outputs.clear()
    if removed:
        graph.nodes = kept
    return removed


def _referenced_constants(graph: gs.Graph) -> set[int]:
    """ids of the initializers that nodes (in any scope) or graph outputs refer to."""
    found: set[int] = set()
    for scope in iter_graphs(graph):
        for tensor in scope.outputs:
            if isinstance(tensor, gs.Constant):
                found.add(id(tensor))
        for node in scope.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant):
                    found.add(id(tensor))
    return found
