"""eliminate_identity: remove Identity nodes, and Dropout nodes that are no-ops at inference.

`y = Identity(x)` and `y = Dropout(x)` (inference: no `training_mode` input set to true, mask
output unused) compute `y = x`, so every consumer of `y` can read `x` instead. When `y` is a
graph output the producer of `x` is re-pointed to write `y` directly, so output names never
change; when `x` is itself a graph input (or output) and `y` a graph output, the node stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.graph_utils import detach, is_graph_input, is_op, replace_in, replace_uses
from iropt.model import Model, iter_graphs
from iropt.pass_infra import Pass, PassContext, PassResult
from iropt.registry import register_pass


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
        removed = 0
        outputs = {id(t) for t in graph.outputs}
        for node in list(graph.nodes):
            if not self._is_noop(node):
                continue
            source, result = node.inputs[0], node.outputs[0]
            if id(result) in outputs:
                if not _reroute_producer(graph, source, result, outputs):
                    continue
            else:
                replace_uses(result, source)
            detach(graph, node)
            removed += 1
        return removed

    def _is_noop(self, node: gs.Node) -> bool:
        if is_op(node, "Identity"):
            return len(node.inputs) == 1
        if is_op(node, "Dropout") and self.dropout:
            return _is_inference_dropout(node)
        return False


def _is_inference_dropout(node: gs.Node) -> bool:
    mask_used = len(node.outputs) > 1 and (node.outputs[1].outputs or node.outputs[1].name)
    if mask_used:
        return False
    if len(node.inputs) >= 3 and node.inputs[2].name:
        training = node.inputs[2]
        return isinstance(training, gs.Constant) and not bool(np.asarray(training.values).any())
    return True


def _reroute_producer(graph: gs.Graph, source: gs.Tensor, result: gs.Tensor, outputs: set[int]) -> bool:
    """Make the producer of `source` write `result` instead; False when that is not possible."""
    if isinstance(source, gs.Constant) or not source.inputs or id(source) in outputs:
        return False
    # Consumers inside subgraphs hold the same tensor objects (graphsurgeon shares the outer
    # scope), so rewiring `tensor.outputs` covers them too.
    if is_graph_input(graph, source):
        return False
    producer = source.inputs[0]
    replace_in(producer.outputs, source, result)
    replace_uses(source, result)
    return True
