"""Small graph helpers shared by passes: op tests, constants, rewiring uses."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

_DEFAULT_DOMAINS = (None, "", "ai.onnx")


def is_op(node: gs.Node, *ops: str) -> bool:
    """True when `node` is one of `ops` in the default ONNX domain."""
    return node.op in ops and node.domain in _DEFAULT_DOMAINS


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a Constant node's output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and is_op(tensor.inputs[0], "Constant"):
        attrs = tensor.inputs[0].attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            return np.asarray(attrs["value"].values)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(tensor is t for t in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(tensor is t for t in graph.inputs)


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every consumer of `old` (subgraph consumers included) at `new`."""
    for consumer in list(old.outputs):
        replace_in(consumer.inputs, old, new)


def replace_in(tensors: list[gs.Tensor], old: gs.Tensor, new: gs.Tensor) -> None:
    """Replace `old` by `new` in a node's input or output list.

    graphsurgeon keeps producer/consumer links in sync on item assignment, not on slices.
    """
    for index, tensor in enumerate(tensors):
        if tensor is old:
            tensors[index] = new


def detach(graph: gs.Graph, node: gs.Node) -> None:
    """Remove `node` from `graph` and disconnect it from its tensors."""
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
