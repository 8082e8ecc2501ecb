"""eliminate_common_subexpressions: compute each distinct value once.

Two nodes with the same op, domain and attributes that read the same tensors compute the same
values, provided the op is deterministic. The first one is kept and the readers of the second's
outputs read the first's instead. Nodes are hashed on (op, domain, attributes, input tensors,
which outputs are present) in one sweep in list order, which ONNX requires to be topological:
once a duplicate is merged, its readers read the same tensors as the original's readers, so
they in turn hash equal when the sweep reaches them and whole duplicated chains collapse in one
pass, in linear time.

Small constants (up to 1 KiB) with equal dtype, shape and bytes are merged first, so that nodes
reading equal but distinct constants (`Add(x, one_a)`, `Add(x, one_b)`) become identical.

Attributes are compared by value: floats bit for bit, tensors by dtype, shape and bytes, lists
element by element. Nodes with a subgraph attribute are never merged (their bodies are swept
on their own), nor are random ops (RandomNormal*, RandomUniform*, Multinomial, Bernoulli,
training-mode Dropout) or ops outside the default domain, whose determinism is unknown.

A node in a subgraph may be merged into an identical node of an enclosing graph that comes
before it: the enclosing graph's values are visible inside the subgraph.

Graph outputs keep their names: when the duplicate writes a graph output (of any graph), the
kept node is made to write that tensor instead, if both are in the same graph and the kept
node's own output is not a graph output; otherwise the pair is left alone.
"""

from __future__ import annotations

import struct
from collections import ChainMap
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.evaluate import has_subgraph, is_deterministic, is_storable_dtype
from iropt.ir.graph import iter_graphs, node_subgraphs, peek_values, replace_in, replace_uses
from iropt.ir.model import Model

# Constants up to this size are compared by value; larger ones are left to dedupe_initializers.
_SMALL_CONSTANT_BYTES = 1024
# Tensor attributes (Constant's value) up to this size are compared by value.
_ATTR_TENSOR_BYTES = 64 * 1024


@register_pass("eliminate_common_subexpressions")
@dataclass(kw_only=True)
class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same values from the same inputs, and equal small constants."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        sweep = _Sweep(protected={id(t) for g in iter_graphs(model.graph) for t in g.outputs})
        sweep.graph(model.graph, ChainMap(), ChainMap())
        constants = sum(1 for t in sweep.replaced_constants.values() if not t.outputs)
        # A constant still read where its replacement is not visible is not counted as merged,
        # but its other readers did change.
        changed = bool(sweep.merged or sweep.replaced_constants)
        return PassResult(changed=changed, stats={"merged": sweep.merged, "constants_merged": constants})


# A table entry: the node, and the graph it belongs to.
_Entry = tuple[gs.Node, gs.Graph]


@dataclass
class _Sweep:
    protected: set[int]
    merged: int = 0
    replaced_constants: dict[int, gs.Tensor] = field(default_factory=dict)
    # Value keys of the constants met so far: a shared constant is decoded once.
    _constant_keys: dict[int, Hashable | None] = field(default_factory=dict)

    def graph(
        self,
        graph: gs.Graph,
        nodes: ChainMap[Hashable, _Entry],
        constants: ChainMap[Hashable, gs.Constant],
    ) -> None:
        """Sweep `graph`; `nodes`/`constants` hold what enclosing graphs computed before it."""
        kept: list[gs.Node] = []
        for node in list(graph.nodes):
            self._merge_constants(node, constants)
            if has_subgraph(node):
                for subgraph in node_subgraphs(node):
                    self.graph(subgraph, nodes.new_child(), constants.new_child())
                kept.append(node)
                continue
            key = _node_key(node) if is_deterministic(node) else None
            if key is None:
                kept.append(node)
                continue
            original = nodes.get(key)
            if original is not None and self._merge(original, (node, graph)):
                self.merged += 1
                continue
            nodes[key] = (node, graph)
            kept.append(node)
        graph.nodes = kept

    def _merge_constants(self, node: gs.Node, constants: ChainMap[Hashable, gs.Constant]) -> None:
        """Make `node` read the first-seen constant equal to each of its small constant inputs."""
        for index, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or id(tensor) in self.protected:
                continue
            if id(tensor) not in self._constant_keys:
                self._constant_keys[id(tensor)] = _small_constant_key(tensor)
            key = self._constant_keys[id(tensor)]
            if key is None:
                continue
            first = constants.get(key)
            if first is None:
                constants[key] = tensor
            elif first is not tensor:
                node.inputs[index] = first
                self.replaced_constants[id(tensor)] = tensor

    def _merge(self, original: _Entry, duplicate: _Entry) -> bool:
        """Rewire the readers of `duplicate`'s outputs to `original`'s; False when impossible."""
        keep, keep_graph = original
        drop, drop_graph = duplicate
        pairs = [(a, b) for a, b in zip(keep.outputs, drop.outputs, strict=True) if b.name]
        for kept_out, dropped_out in pairs:
            if id(dropped_out) in self.protected and (
                keep_graph is not drop_graph or id(kept_out) in self.protected
            ):
                return False
        drop.inputs.clear()
        drop.outputs.clear()
        for kept_out, dropped_out in pairs:
            if id(dropped_out) in self.protected:
                # The duplicate writes a graph output: the kept node writes it from now on.
                replace_uses(kept_out, dropped_out)
                replace_in(keep.outputs, kept_out, dropped_out)
            else:
                replace_uses(dropped_out, kept_out)
        return True


def _node_key(node: gs.Node) -> Hashable | None:
    """What two nodes must share to compute the same outputs; None when not comparable."""
    attrs: list[tuple[str, Hashable]] = []
    for name in sorted(node.attrs):
        value = _attr_key(node.attrs[name])
        if value is None:
            return None
        attrs.append((name, value))
    return (
        node.op,
        node.domain or "",
        tuple(attrs),
        tuple(id(t) if t.name else None for t in node.inputs),
        tuple(bool(t.name) for t in node.outputs),
    )


def _attr_key(value: Any) -> Hashable | None:
    """A hashable form of an attribute value that is equal exactly when the values are."""
    if isinstance(value, (bool, int, str)):
        return (type(value).__name__, value)
    if isinstance(value, float):
        # Bit for bit: 0.0 and -0.0 differ, and a NaN equals itself.
        return ("float", struct.pack("<d", value))
    if isinstance(value, np.generic):
        return _attr_key(value.item())
    if isinstance(value, (list, tuple)):
        items = [_attr_key(v) for v in value]
        return None if any(i is None for i in items) else ("list", tuple(items))
    if isinstance(value, np.ndarray):
        return _array_key(value, _ATTR_TENSOR_BYTES)
    if isinstance(value, gs.Constant):
        if isinstance(value._values, SparseValues) or not is_storable_dtype(value.dtype):
            return None
        return _array_key(peek_values(value), _ATTR_TENSOR_BYTES, value._export_dtype)
    if isinstance(value, (np.dtype, type)):
        try:
            return ("dtype", str(np.dtype(value)))
        except TypeError:
            return None
    return None  # graphs, attribute references, anything unknown


def _array_key(array: np.ndarray, limit: int, export_dtype: Any = None) -> Hashable | None:
    if array.nbytes > limit:
        return None
    # dtype objects compare exactly (bfloat16 and float16 differ) and hash fast.
    return ("array", array.dtype, export_dtype, array.shape, np.ascontiguousarray(array).tobytes())


def _small_constant_key(tensor: gs.Tensor) -> Hashable | None:
    if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, SparseValues):
        return None
    if getattr(tensor._values, "nbytes", _SMALL_CONSTANT_BYTES + 1) > _SMALL_CONSTANT_BYTES:
        return None
    if not is_storable_dtype(tensor.dtype):
        return None
    return _array_key(peek_values(tensor), _SMALL_CONSTANT_BYTES, tensor._export_dtype)
