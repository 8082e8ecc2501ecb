"""eliminate_identity: remove Identity nodes, and Dropout nodes that are no-ops at inference.

`y = Identity(x)` and `y = Dropout(x)` (inference: no `training_mode` input set to true, mask
output unused) compute `y = x`, so every consumer of `y` can read `x` instead. When `y` is a
graph output the producer of `x` is re-pointed to write `y` directly, so output names never
change; when `x` is itself a graph input (or output) and `y` a graph output, the node stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import constant_value, is_graph_input, is_op, iter_graphs, replace_in, replace_uses
from iropt.ir.model import Model


@register_pass("eliminate_identity")
@dataclass(kw_only=True)
class EliminateIdentity(Pass):
    """Remove Identity nodes and inference-time Dropout nodes, rewiring their consumers."""

    dropout: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = 0
        for graph in iter_graphs(model.graph):
            removed += self._eliminate(graph)
        return PassResult.from_stats(removed=removed)

    def _eliminate(self, graph: gs.Graph) -> int:
        removed: set[int] = set()
        outputs = {id(t) for t in graph.outputs}
        local_nodes = {id(n) for n in graph.nodes}
        for node in list(graph.nodes):
            if not self._is_noop(node, outputs):
                continue
            source, result = node.inputs[0], node.outputs[0]
            if id(result) in outputs:
                if not _reroute_producer(graph, source, result, outputs, local_nodes):
                    continue
            else:
                replace_uses(result, source)
            node.inputs.clear()
            node.outputs.clear()
            removed.add(id(node))
        # One rebuild instead of a list.remove per node (quadratic, and it compares nodes with
        # graphsurgeon's structural __eq__).
        if removed:
            graph.nodes = [n for n in graph.nodes if id(n) not in removed]
        return len(removed)

    def _is_noop(self, node: gs.Node, graph_outputs: set[int]) -> bool:
        if is_op(node, "Identity"):
            return len(node.inputs) == 1
        if is_op(node, "Dropout") and self.dropout:
            return _is_inference_dropout(node, graph_outputs)
        return False


def _is_inference_dropout(node: gs.Node, graph_outputs: set[int]) -> bool:
    # Old exporters name the mask output even when nothing reads it; only a read mask matters.
    if len(node.outputs) > 1 and (node.outputs[1].outputs or id(node.outputs[1]) in graph_outputs):
        return False
    if len(node.inputs) >= 3 and node.inputs[2].name:
        # An initializer or a Constant node; a computed training_mode keeps the node.
        training = constant_value(node.inputs[2])
        return training is not None and not bool(training.any())
    return True


def _reroute_producer(
    graph: gs.Graph, source: gs.Tensor, result: gs.Tensor, outputs: set[int], local_nodes: set[int]
) -> bool:
    """Make the producer of `source` write `result` instead; False when that is not possible."""
    if isinstance(source, gs.Constant) or not source.inputs or id(source) in outputs:
        return False
    # A subgraph that returns an outer-scope value needs its Identity: the producer lives in
    # the outer graph and must not be renamed to this subgraph's output.
    if id(source.inputs[0]) not in local_nodes:
        return False
    # Consumers inside subgraphs hold the same tensor objects (graphsurgeon shares the outer
    # scope), so rewiring `tensor.outputs` covers them too.
    if is_graph_input(graph, source):
        return False
    producer = source.inputs[0]
    replace_in(producer.outputs, source, result)
    replace_uses(source, result)
    return True
