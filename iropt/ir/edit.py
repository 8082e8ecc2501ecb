"""Shared bookkeeping for the elimination passes (merge_consecutive_*, eliminate_noop_ops).

Each of those passes makes one forward sweep over every graph of the model. `ModelEdit` holds
what the sweeps share (every graph's outputs, the tensor names in use); `GraphEdit` holds one
graph's sweep state and performs the two edits those passes need:

- `forward(node, source, result)`: `result` equals `source`, so consumers of `result` read
  `source` and `node` goes. Graph output names never change: when `result` is an output of
  this graph, the producer of `source` is re-pointed to write `result` instead, and when that
  is impossible (source is a graph input, a constant, another output, or made in an outer
  graph) nothing happens.
- `remove_if_dead(node)`: drop a node whose outputs nothing reads any more.

Removed nodes are collected and filtered out once in `finish`, and inputs are rewired without
graphsurgeon's consumer-list scans (see `GraphEdit`), so a sweep stays linear in the size of
the graph even around tensors with many consumers.

The module name starts with an underscore so the pass auto-import skips it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.ir.graph import constant_value, fresh_names, is_op, iter_graphs, replace_in
from iropt.ir.model import Model

Dims = list[int | None]


@dataclass(frozen=True)
class IntsParam:
    """An integer-list operand given as an attribute or an input (axes, pads, starts, ...).

    `present` is False when the node does not give it; `values` is None when it is given but
    not a constant, so the caller must leave the node alone.
    """

    present: bool
    values: list[int] | None


ABSENT = IntsParam(present=False, values=None)


class ModelEdit:
    """What the sweeps over one model share: protected tensors and fresh names."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.opset = model.opset
        self.graphs = iter_graphs(model.graph)
        # Outputs of any graph, nested bodies included: an outer tensor may be a body's output,
        # and no edit may leave an output without its producer.
        self.protected = {id(t) for g in self.graphs for t in g.outputs}
        # fresh_name(base): `base`, or `base_1`, ...: a tensor name not used anywhere in the model.
        self.fresh_name = fresh_names(self.graphs)

    def int64_constant(self, base: str, values: Sequence[int]) -> gs.Constant:
        """A new 1-D int64 constant (shape, axes, starts, ...) under a fresh name."""
        return gs.Constant(self.fresh_name(base), np.asarray(list(values), dtype=np.int64))

    def sweep(self, graph: gs.Graph) -> GraphEdit:
        return GraphEdit(self, graph)


class GraphEdit:
    """One sweep over one graph: node membership, outputs, removed nodes, and input rewiring.

    graphsurgeon keeps `tensor.outputs` (the consumers) in sync with `node.inputs`, but unlinking
    a consumer scans that list comparing nodes structurally: rewiring every consumer of a shared
    constant (an axes tensor read by thousands of Unsqueezes) would be quadratic. So inputs are
    rewired here without that scan; the consumer lists they leave stale are rebuilt once in
    `finish`, and until then `uses` counts the live reads of a tensor.
    """

    def __init__(self, edit: ModelEdit, graph: gs.Graph) -> None:
        self.edit = edit
        self.graph = graph
        self._outputs = {id(t) for t in graph.outputs}
        self._inputs = {id(t) for t in graph.inputs}
        self._local = {id(n) for n in graph.nodes}
        self._removed: set[int] = set()
        # id(tensor) -> (tensor, live input slots reading it), for tensors whose consumer list
        # has gone stale; the tensor is kept so that its id cannot be reused meanwhile.
        self._uses: dict[int, tuple[gs.Tensor, int]] = {}
        # id(node) -> {id(tensor): input slots}, built on first need: finding a slot by scanning
        # the inputs would make rewiring a Concat/Sum of n rewired inputs quadratic.
        self._slots: dict[int, dict[int, list[int]]] = {}

    def nodes(self) -> list[gs.Node]:
        """The nodes at the start of the sweep, in (topological) order."""
        return list(self.graph.nodes)

    def alive(self, node: gs.Node) -> bool:
        return id(node) not in self._removed

    def producer(self, tensor: gs.Tensor, *ops: str) -> gs.Node | None:
        """The live node of this graph that produces `tensor`, when it is one of `ops` (any if none)."""
        if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        if id(node) not in self._local or not self.alive(node) or (ops and not is_op(node, *ops)):
            return None
        return node

    def is_protected(self, tensor: gs.Tensor) -> bool:
        """True when `tensor` is an output of any graph in the model."""
        return id(tensor) in self.edit.protected

    def uses(self, tensor: gs.Tensor) -> int:
        """How many input slots (subgraphs included) read `tensor` now."""
        entry = self._uses.get(id(tensor))
        return len(tensor.outputs) if entry is None else entry[1]

    def _count(self, tensor: gs.Tensor, delta: int) -> None:
        self._uses[id(tensor)] = (tensor, self.uses(tensor) + delta)

    def set_input(self, node: gs.Node, index: int, tensor: gs.Tensor) -> None:
        """Make input `index` of `node` read `tensor` (appending empty inputs up to `index`)."""
        while len(node.inputs) <= index:
            self._link(node, gs.Variable.empty())
        old = node.inputs[index]
        if old is tensor:
            return
        self._count(old, -1)
        self._count(tensor, +1)
        list.__setitem__(node.inputs, index, tensor)
        list.append(tensor.outputs, node)
        slots = self._slots.get(id(node))
        if slots is not None:
            slots[id(old)].remove(index)
            slots.setdefault(id(tensor), []).append(index)

    def set_inputs(self, node: gs.Node, tensors: Sequence[gs.Tensor]) -> None:
        """Replace all inputs of `node` by `tensors`."""
        self._unlink_inputs(node)
        for tensor in tensors:
            self._link(node, tensor)

    def _link(self, node: gs.Node, tensor: gs.Tensor) -> None:
        self._count(tensor, +1)
        list.append(node.inputs, tensor)
        list.append(tensor.outputs, node)
        self._slots.pop(id(node), None)

    def _unlink_inputs(self, node: gs.Node) -> None:
        for tensor in node.inputs:
            self._count(tensor, -1)
        list.clear(node.inputs)
        self._slots.pop(id(node), None)

    def _slots_of(self, node: gs.Node, tensor: gs.Tensor) -> list[int]:
        """The input indices of `node` that read `tensor`."""
        slots = self._slots.get(id(node))
        if slots is None:
            slots = {}
            for index, slot in enumerate(node.inputs):
                slots.setdefault(id(slot), []).append(index)
            self._slots[id(node)] = slots
        return list(slots.get(id(tensor), []))

    def replace_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Point every live read of `old` (subgraph consumers included) at `new`."""
        seen: set[int] = set()
        for consumer in list(old.outputs):
            if id(consumer) in seen:
                continue
            seen.add(id(consumer))
            for index in self._slots_of(consumer, old):
                self.set_input(consumer, index, new)

    def forward(self, node: gs.Node, source: gs.Tensor, result: gs.Tensor) -> bool:
        """Remove `node`, whose output `result` equals `source`; False when names forbid it."""
        if self.is_protected(result):
            if id(result) not in self._outputs or not self._reroute(source, result):
                return False
        else:
            self.replace_uses(result, source)
        self.remove(node)
        return True

    def _reroute(self, source: gs.Tensor, result: gs.Tensor) -> bool:
        """Make the producer of `source` write the graph output `result` instead."""
        if self.is_protected(source) or id(source) in self._inputs:
            return False
        producer = self.producer(source)
        if producer is None:
            return False
        # `result` briefly has two producers; removing the bypassed node leaves just this one.
        replace_in(producer.outputs, source, result)
        self.replace_uses(source, result)
        return True

    def remove(self, node: gs.Node) -> None:
        self._unlink_inputs(node)
        node.outputs.clear()
        self._removed.add(id(node))

    def remove_if_dead(self, node: gs.Node) -> bool:
        """Remove `node` when none of its outputs is read or is a graph output."""
        if any(self.uses(t) or self.is_protected(t) for t in node.outputs):
            return False
        self.remove(node)
        return True

    def finish(self) -> None:
        """Drop removed nodes from the node list and rebuild stale consumer lists, once each."""
        _rebuild_consumers([tensor for tensor, _ in self._uses.values()])
        self._uses.clear()
        self._slots.clear()
        if self._removed:
            kept = [n for n in self.graph.nodes if id(n) not in self._removed]
            self.graph.nodes.clear()
            self.graph.nodes.extend(kept)


def _rebuild_consumers(tensors: list[gs.Tensor]) -> None:
    """Set each tensor's `outputs` to the nodes that read it, once per input slot.

    Every node that reads one of them is still listed (maybe stale) in its `outputs`, so each
    such node's inputs are scanned once for all the tensors together.
    """
    rebuilt: dict[int, list[gs.Node]] = {id(t): [] for t in tensors}
    scanned: set[int] = set()
    for tensor in tensors:
        for node in tensor.outputs:
            if id(node) in scanned:
                continue
            scanned.add(id(node))
            for slot in node.inputs:
                if id(slot) in rebuilt:
                    rebuilt[id(slot)].append(node)
    for tensor in tensors:
        # The base-class methods: graphsurgeon's synchronized list would edit the nodes' inputs too.
        list.clear(tensor.outputs)
        list.extend(tensor.outputs, rebuilt[id(tensor)])


def rank_of(tensor: gs.Tensor) -> int | None:
    """The rank of `tensor` when known."""
    shape = tensor.shape
    return None if shape is None else len(shape)


def dims_of(tensor: gs.Tensor) -> Dims | None:
    """Per-dimension sizes (None where symbolic or unknown), or None when the rank is unknown."""
    shape = tensor.shape
    if shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else None for d in shape]


def static_shape(tensor: gs.Tensor) -> list[int] | None:
    """The shape of `tensor` when every dimension is a known integer."""
    dims = dims_of(tensor)
    if dims is None or any(d is None for d in dims):
        return None
    return [int(d) for d in dims if d is not None]


def const_ints(tensor: gs.Tensor) -> list[int] | None:
    """The values of a constant integer tensor (scalar or 1-D), else None."""
    value = constant_value(tensor)
    if value is None and len(tensor.inputs) == 1 and is_op(tensor.inputs[0], "Constant"):
        attrs = tensor.inputs[0].attrs
        value = attrs.get("value_ints", attrs.get("value_int"))
        value = None if value is None else np.asarray(value)
    if value is None or value.ndim > 1 or value.dtype.kind not in "iu":
        return None
    return [int(v) for v in value.reshape(-1)]


def ints_param(node: gs.Node, *, attr: str, index: int, as_input: bool) -> IntsParam:
    """Read an integer-list operand from attribute `attr` or from input `index`."""
    if not as_input:
        if attr not in node.attrs:
            return ABSENT
        return IntsParam(present=True, values=[int(v) for v in node.attrs[attr]])
    if len(node.inputs) <= index or not node.inputs[index].name:
        return ABSENT
    return IntsParam(present=True, values=const_ints(node.inputs[index]))


def set_ints_param(
    sweep: GraphEdit, node: gs.Node, values: Sequence[int], *, attr: str, index: int, as_input: bool
) -> None:
    """Write an integer-list operand as attribute `attr` or as a new constant at input `index`."""
    if not as_input:
        node.attrs[attr] = [int(v) for v in values]
        return
    base = f"{node.name or node.outputs[0].name}_{attr}"
    sweep.set_input(node, index, sweep.edit.int64_constant(base, values))


def normalize_axes(axes: Sequence[int], rank: int | None) -> list[int] | None:
    """Axes made non-negative; None when a negative axis meets an unknown rank or one is out of range."""
    result = []
    for axis in axes:
        if axis < 0:
            if rank is None:
                return None
            axis += rank
        if axis < 0 or (rank is not None and axis >= rank):
            return None
        result.append(axis)
    return result
