"""Small graph helpers shared by passes: op tests, constants, rewiring uses."""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

_DEFAULT_DOMAINS = (None, "", "ai.onnx")


class FreshNames:
    """Hands out names not in `used`, deterministically: `base`, else `base_1`, `base_2`, ..."""

    def __init__(self, used: Iterable[str]) -> None:
        self._used = set(used)
        # The last suffix given per base: a long run of one base does not rescan from _1.
        self._last: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        name = base
        while name in self._used:
            self._last[base] = self._last.get(base, 0) + 1
            name = f"{base}_{self._last[base]}"
        self._used.add(name)
        return name


def fresh_names(graphs: Iterable[gs.Graph]) -> FreshNames:
    """New tensor and node names, unique across `graphs` (pass `iter_graphs(model.graph)` to
    cover subgraphs too)."""
    used: set[str] = set()
    for graph in graphs:
        used.update(graph.tensors().keys())
        used.update(t.name for t in (*graph.inputs, *graph.outputs))
        used.update(node.name for node in graph.nodes if node.name)
    return FreshNames(used)


def is_default_domain(domain: str | None) -> bool:
    """True for the default ONNX operator domain, however it is spelled ("", "ai.onnx" or unset)."""
    return domain in _DEFAULT_DOMAINS


def is_op(node: gs.Node, *ops: str) -> bool:
    """True when `node` is one of `ops` in the default ONNX domain."""
    return node.op in ops and is_default_domain(node.domain)


def peek_values(tensor: gs.Constant) -> np.ndarray:
    """The value of a constant, without keeping the decoded array on the tensor.

    `tensor.values` replaces graphsurgeon's lazy reference to the original TensorProto by the
    decoded array, which changes how the tensor is written back (float_data becomes raw_data)
    and keeps a second copy of every weight in memory. Reading through this leaves both alone.
    """
    values = tensor._values
    if isinstance(values, SparseValues):
        return np.asarray(values.load())
    if isinstance(values, LazyValues):
        # Decoded by onnx directly: LazyValues.load warns about types numpy lacks (bfloat16)
        # although onnx decodes them into ml_dtypes arrays just fine.
        return np.asarray(onnx.numpy_helper.to_array(values.tensor))
    return np.asarray(values)


def constant_value(tensor: gs.Tensor, max_elements: int | None = None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output, else None; the one way
    constants are read.

    Reads through `peek_values`, so a pass that only looks (or a rewrite rule that then refuses)
    leaves the tensor as it was written. None too for a constant of more than `max_elements`
    elements, told from its shape before anything is decoded.
    """
    if not isinstance(tensor, gs.Constant):
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if producer is None or not is_op(producer, "Constant"):
            return None
        tensor = producer.attrs.get("value")
        if not isinstance(tensor, gs.Constant):
            return None
    if max_elements is not None and int(np.prod(tensor.shape or ())) > max_elements:
        return None
    return peek_values(tensor)


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


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphs held directly in `node`'s attributes (If branches, Loop/Scan bodies)."""
    found: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def relink_outer_scope(graph: gs.Graph) -> int:
    """Make subgraphs read outer-scope values through the outer tensor objects; returns how many.

    graphsurgeon shares a tensor object between a graph and the subgraphs that read it, but only
    when the producer was imported before the subgraph's node: a proto whose nodes are out of
    order gives the subgraph a producer-less stand-in with the same name. Rewrites that follow
    object links (dead-code elimination, sorting, rewiring uses) need the real object.
    """
    relinked = 0
    pending: list[tuple[gs.Graph, ChainMap[str, gs.Tensor]]] = [(graph, ChainMap())]
    while pending:
        current, outer = pending.pop()
        local: dict[str, gs.Tensor] = {t.name: t for t in current.inputs}
        local.update((t.name, t) for node in current.nodes for t in node.outputs if t.name)
        for node in current.nodes:
            relinked += _relink(node.inputs, outer, local)
        relinked += _relink(current.outputs, outer, local)
        visible = outer.new_child(local)
        for node in current.nodes:
            pending.extend((sub, visible) for sub in node_subgraphs(node))
    return relinked


def _relink(tensors: list[gs.Tensor], outer: Mapping[str, gs.Tensor], local: Mapping[str, gs.Tensor]) -> int:
    count = 0
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, gs.Variable) or tensor.inputs or tensor.name in local:
            continue
        real = outer.get(tensor.name)
        if real is not None and real is not tensor:
            tensors[index] = real
            count += 1
    return count


def iter_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and every subgraph nested in its nodes' attributes (If/Loop/Scan bodies)."""
    graphs = [graph]
    index = 0
    while index < len(graphs):
        for node in graphs[index].nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Graph):
                    graphs.append(value)
                elif isinstance(value, list):
                    graphs.extend(v for v in value if isinstance(v, gs.Graph))
        index += 1
    return graphs
