"""dedupe_initializers: store each distinct constant once.

Initializers with the same dtype, shape and bytes hold the same value, so every node that reads
one of them can read the first instead, and the others disappear on export (graphsurgeon writes
only the constants that nodes read). Exporters duplicate weights more often than one would
think: tied embeddings, repeated blocks traced from one module, per-layer copies of the same
scale or mask.

Equality is bit-exact (0.0 and -0.0 differ, a NaN equals the same NaN). Constants are grouped by
dtype and shape first; only groups with more than one member are hashed (BLAKE2b of the bytes),
and a hash match is confirmed by comparing the bytes, so a collision can never merge different
values. Values are decoded only to be hashed or compared, and not kept: the model's tensors
stay as they were loaded.

Scopes are respected: a constant is replaced only by one visible where it is read (defined in
the same graph or an enclosing one). Constants that are graph outputs or graph inputs are not
touched: they are the model's interface. (graphsurgeon imports an initializer that is also
listed as a graph input as a plain initializer; such overridable inputs do not survive loading.)
"""

from __future__ import annotations

import hashlib
from collections import ChainMap, Counter
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.evaluate import is_storable_dtype
from iropt.ir.graph import iter_graphs, node_subgraphs, peek_values
from iropt.ir.model import Model


@register_pass("dedupe_initializers")
@dataclass(kw_only=True)
class DedupeInitializers(Pass):
    """Merge initializers that have the same dtype, shape and bytes."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graphs = iter_graphs(model.graph)
        interface = {id(t) for g in graphs for t in [*g.inputs, *g.outputs]}
        candidates = {
            id(t): t
            for g in graphs
            for n in g.nodes
            for t in n.inputs
            if id(t) not in interface and _is_candidate(t)
        }
        groups = Counter(_layout(t) for t in candidates.values())
        sweep = _Sweep(shared={i for i, t in candidates.items() if groups[_layout(t)] > 1})
        sweep.graph(model.graph, ChainMap())
        # A constant also read where no equal one is visible stays; its other readers changed.
        gone = [t for t in sweep.replaced.values() if not t.outputs]
        stats = {"merged": len(gone), "bytes_saved": sum(int(t._values.nbytes) for t in gone)}
        return PassResult(changed=bool(sweep.replaced), stats=stats)


def _is_candidate(tensor: gs.Tensor) -> bool:
    if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, SparseValues):
        return False
    # Checked before loading: values of exotic types would come back re-typed from numpy.
    return is_storable_dtype(tensor.dtype)


def _layout(tensor: gs.Constant) -> Hashable:
    return (str(np.dtype(tensor.dtype)), str(tensor._export_dtype), tuple(tensor.shape))


@dataclass
class _Sweep:
    shared: set[int]  # candidates whose dtype and shape another candidate has
    replaced: dict[int, gs.Constant] = field(default_factory=dict)
    _keys: dict[int, Hashable] = field(default_factory=dict)

    def graph(self, graph: gs.Graph, seen: ChainMap[Hashable, list[gs.Constant]]) -> None:
        """Point readers at the first equal constant visible to them; `seen` is per scope."""
        for node in graph.nodes:
            for index, tensor in enumerate(node.inputs):
                if id(tensor) not in self.shared:
                    continue
                first = self._first_equal(tensor, seen)
                if first is not tensor:
                    node.inputs[index] = first
                    self.replaced[id(tensor)] = tensor
            for subgraph in node_subgraphs(node):
                self.graph(subgraph, seen.new_child())

    def _first_equal(self, tensor: gs.Constant, seen: ChainMap[Hashable, list[gs.Constant]]) -> gs.Constant:
        key = self._key(tensor)
        for scope in seen.maps:
            for candidate in scope.get(key, ()):
                # Equal hashes; the bytes decide.
                if candidate is tensor or _bytes(candidate) == _bytes(tensor):
                    return candidate
        # New to this scope (a hash collision makes a second entry under the same key).
        seen.maps[0].setdefault(key, []).append(tensor)
        return tensor

    def _key(self, tensor: gs.Constant) -> Hashable:
        key = self._keys.get(id(tensor))
        if key is None:
            digest = hashlib.blake2b(_flat_bytes(tensor).data, digest_size=16).digest()
            key = (_layout(tensor), digest)
            self._keys[id(tensor)] = key
        return key


def _flat_bytes(tensor: gs.Constant) -> np.ndarray:
    return np.ascontiguousarray(peek_values(tensor)).reshape(-1).view(np.uint8)


def _bytes(tensor: gs.Constant) -> bytes:
    return _flat_bytes(tensor).tobytes()
