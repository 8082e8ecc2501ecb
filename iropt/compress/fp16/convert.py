"""Retype a top-level graph to float16 following a `Decision`, with one Cast per boundary.

Every float32 tensor gets a home precision: its producer's (float16 for a float16 node), the
interface's for graph inputs (float32 while `keep_io_types`), and for a weight the precision
its readers want. A reader that wants the other precision reads a Cast of the tensor, shared by
every reader that wants it. A graph output keeps its name and the interface's type: when its
producer runs in the other precision, the producer writes a new tensor and a Cast writes the
output. Weights read only in float16 are stored in float16; a weight read both ways is kept
and gets a float16 copy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.fp16.policy import FLOAT, FLOAT16, Decision
from iropt.ir.graph import FreshNames, node_subgraphs, peek_values

_NUMPY: dict[int, np.dtype[Any]] = {FLOAT: np.dtype(np.float32), FLOAT16: np.dtype(np.float16)}
_SUFFIX: dict[int, str] = {FLOAT: "fp32", FLOAT16: "fp16"}
# Readers that take any precision (a Cast, or an op that reads the shape only): no Cast is
# added in front of them.
_ANY_PRECISION_READERS = ("Shape", "Size", "Cast")


@dataclass
class ConversionStats:
    """Counts of one conversion; weights are counted in elements of float32 weights."""

    half_nodes: int = 0
    casts: int = 0
    float_weight_elements: int = 0
    half_weight_elements: int = 0
    retyped: int = 0  # tensors and attributes that became float16

    @property
    def changed(self) -> bool:
        return bool(self.casts or self.half_weight_elements or self.retyped)


@dataclass
class _Reader:
    node: gs.Node
    index: int
    want: int


def convert_graph(
    graph: gs.Graph, dtypes: Mapping[str, int], decision: Decision, *, keep_io_types: bool
) -> ConversionStats:
    """Rewrite `graph` in place; nodes inside subgraphs are left as they are."""
    stats = ConversionStats(half_nodes=len(decision.half))
    names = FreshNames([*graph.tensors().keys(), *(n.name for n in graph.nodes if n.name)])
    main = {id(node) for node in graph.nodes}
    io_type = FLOAT if keep_io_types else FLOAT16
    outputs = {id(t) for t in graph.outputs}
    inputs = {id(t) for t in graph.inputs}
    new_nodes: list[gs.Node] = []
    for tensor in _float_tensors(graph, dtypes):
        readers = list(_readers(tensor, decision, main))
        read_inside = any(id(c) not in main for c in tensor.outputs)
        if isinstance(tensor, gs.Constant):
            _convert_weight(tensor, readers, read_inside or id(tensor) in outputs, names, stats)
            continue
        home = _home(tensor, decision, io_type, id(tensor) in inputs, read_inside)
        if id(tensor) in outputs and id(tensor) not in inputs and home != io_type and tensor.inputs:
            tensor = _split_output(tensor, home, io_type, readers, names, new_nodes)
        if home == FLOAT16 and tensor.dtype != _NUMPY[FLOAT16]:
            stats.retyped += 1
            tensor.dtype = _NUMPY[FLOAT16]
        _cast_for_readers(tensor, home, readers, names, new_nodes)
    for node in graph.nodes:
        if decision.is_half(node) and _retype_attributes(node):
            stats.retyped += 1
    stats.casts = len(new_nodes)
    graph.nodes.extend(new_nodes)
    return stats


def _float_tensors(graph: gs.Graph, dtypes: Mapping[str, int]) -> list[gs.Tensor]:
    return [t for name, t in graph.tensors().items() if name and dtypes.get(name) == FLOAT]


def _readers(tensor: gs.Tensor, decision: Decision, main: set[int]) -> Iterable[_Reader]:
    for node in tensor.outputs:
        if id(node) not in main:
            continue
        for index, value in enumerate(node.inputs):
            if value is not tensor:
                continue
            half = decision.is_half(node) and (id(node), index) not in decision.float_inputs
            yield _Reader(node, index, FLOAT16 if half else FLOAT)


def _home(tensor: gs.Tensor, decision: Decision, io_type: int, is_input: bool, read_inside: bool) -> int:
    if is_input:
        # A subgraph body reads the input as declared: it keeps float32.
        return FLOAT if read_inside else io_type
    if tensor.inputs and decision.is_half(tensor.inputs[0]):
        return FLOAT16
    return FLOAT


def _split_output(
    tensor: gs.Tensor, home: int, io_type: int, readers: list[_Reader], names: FreshNames,
    new_nodes: list[gs.Node],
) -> gs.Variable:
    """The producer writes a new tensor in `home`; a Cast writes the output under its own name."""
    inner = gs.Variable(names(f"{tensor.name}_{_SUFFIX[home]}"), dtype=_NUMPY[home], shape=tensor.shape)
    producer = tensor.inputs[0]
    producer.outputs[producer.outputs.index(tensor)] = inner
    tensor.dtype = _NUMPY[io_type]
    new_nodes.append(_cast(inner, tensor, io_type, names))
    # Readers that want the output's type read the output itself: no second Cast.
    readers[:] = [r for r in readers if r.want != io_type]
    return inner


def _cast_for_readers(
    tensor: gs.Tensor, home: int, readers: list[_Reader], names: FreshNames, new_nodes: list[gs.Node]
) -> None:
    casts: dict[int, gs.Variable] = {}
    for reader in readers:
        if reader.want == home or reader.node.op in _ANY_PRECISION_READERS:
            reader.node.inputs[reader.index] = tensor
            continue
        if reader.want not in casts:
            cast_out = gs.Variable(
                names(f"{tensor.name}_{_SUFFIX[reader.want]}"), dtype=_NUMPY[reader.want], shape=tensor.shape
            )
            new_nodes.append(_cast(tensor, cast_out, reader.want, names))
            casts[reader.want] = cast_out
        reader.node.inputs[reader.index] = casts[reader.want]


def _cast(source: gs.Tensor, target: gs.Variable, to: int, names: FreshNames) -> gs.Node:
    return gs.Node("Cast", name=names(f"{target.name}_cast"), attrs={"to": to}, inputs=[source], outputs=[target])


def _convert_weight(
    tensor: gs.Constant, readers: list[_Reader], keep_original: bool, names: FreshNames, stats: ConversionStats
) -> None:
    stats.float_weight_elements += int(np.prod(tensor.shape or ()))
    wants = defaultdict(list)
    for reader in readers:
        wants[reader.want].append(reader)
    if FLOAT16 not in wants:
        return
    stats.half_weight_elements += int(np.prod(tensor.shape or ()))
    half = peek_values(tensor).astype(np.float16)
    if FLOAT not in wants and not keep_original:
        tensor.values = half
        return
    copy = gs.Constant(names(f"{tensor.name}_fp16"), half)
    for reader in wants[FLOAT16]:
        reader.node.inputs[reader.index] = copy


def _retype_attributes(node: gs.Node) -> bool:
    """Attributes that carry a float32 type or value on a float16 node; True if one changed."""
    assert not node_subgraphs(node), "nodes with subgraphs stay float32"
    if node.op == "Cast" and node.attrs.get("to") == FLOAT:
        node.attrs["to"] = FLOAT16
        return True
    value = node.attrs.get("value")
    if node.op in ("Constant", "ConstantOfShape") and isinstance(value, gs.Constant):
        array = peek_values(value)
        if array.dtype == np.float32:
            value.values = array.astype(np.float16)
            return True
    return False
