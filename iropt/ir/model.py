"""The Model that flows through iropt: an onnx-graphsurgeon graph plus the model-level fields.

A `Model` is a graph plus what a graph alone does not carry: the model's metadata, its
documentation and the files it was read from. Reading and writing models lives in `iropt.io`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.ir.graph import is_default_domain, iter_graphs, relink_outer_scope
from iropt.ir.unshadow import unshadow

_log = logging.getLogger("iropt.model")

# The first IR version where an initializer need not also be listed as a graph input.
_IR_INITIALIZERS_NOT_INPUTS = 4
# Protobuf refuses messages of 2 GiB and more.
PROTOBUF_LIMIT = 2**31 - 1
# Tensors past this go to external data: headroom under the limit for the graph structure itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20


@dataclass
class Model:
    """An ONNX model as a graphsurgeon graph plus the model-level fields a graph does not keep."""

    graph: gs.Graph
    metadata: dict[str, str] = field(default_factory=dict)
    doc_string: str = ""
    domain: str = ""
    model_version: int = 0
    source_path: Path | None = None
    # The input's external data files (resolved): a save never writes over them either.
    source_data_files: frozenset[Path] = frozenset()

    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, source_path: Path | None = None) -> Model:
        proto, renamed = unshadow(proto)
        if renamed:
            _log.info("renamed %d subgraph value(s) that reused a name of an enclosing graph", renamed)
        graph = gs.import_onnx(proto)
        # Out-of-order protos give subgraphs stand-in copies of outer tensors; every pass relies
        # on the shared objects, so repair that once here.
        relink_outer_scope(graph)
        return cls(
            graph=graph,
            metadata={p.key: p.value for p in proto.metadata_props},
            doc_string=proto.doc_string,
            domain=proto.domain,
            model_version=proto.model_version,
            source_path=source_path,
        )

    def to_onnx(self) -> onnx.ModelProto:
        """Export to a ModelProto (the graph is not modified)."""
        proto = gs.export_onnx(self.graph, do_type_check=False)
        if proto.ir_version < _IR_INITIALIZERS_NOT_INPUTS:
            # IR < 4 requires every initializer to be a graph input too; graphsurgeon imports
            # such inputs as constants and exports them as initializers only, which the checker
            # rejects at the old IR version. IR 4 is the same format without that rule.
            proto.ir_version = _IR_INITIALIZERS_NOT_INPUTS
        proto.doc_string = self.doc_string
        proto.domain = self.domain
        proto.model_version = self.model_version
        onnx.helper.set_model_props(proto, self.metadata)
        return proto

    def copy(self) -> Model:
        """A deep copy that shares nothing mutable with this model."""
        return self.rebuilt(self.to_onnx())

    def rebuilt(self, proto: onnx.ModelProto) -> Model:
        """A Model of `proto` that keeps this model's record of the files it was read from."""
        return replace(Model.from_onnx(proto, self.source_path), source_data_files=self.source_data_files)

    def input_files(self) -> tuple[Path, ...]:
        """The files this model was read from (the model first, then its external data)."""
        head = (self.source_path,) if self.source_path is not None else ()
        return head + tuple(sorted(self.source_data_files))

    @property
    def opset(self) -> int:
        """The default-domain opset version."""
        return int(self.graph.opset)

    def opset_of(self, domain: str) -> int | None:
        """The imported version of `domain`, or None when the model does not import it."""
        if is_default_domain(domain):
            return self.opset
        for opset_id in self.graph.import_domains or []:
            if opset_id.domain == domain:
                return int(opset_id.version)
        return None


def tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of tensor data in the model (initializers, Constant attributes, subgraphs).

    Computed from dims and element types, never by serializing: this runs on every save.
    """
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            total += int(info.length or 0)
        else:
            total += _dense_bytes(tensor)
    return total


def _dense_bytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return tensor.ByteSize()  # strings and other types without a fixed size
    return count * itemsize


@dataclass(frozen=True)
class GraphStats:
    """Size figures of a model: nodes (subgraphs included), parameters and their bytes."""

    nodes: int
    parameters: int
    parameter_bytes: int


def graph_stats(model: Model) -> GraphStats:
    """Count nodes in the graph and all subgraphs, and the elements and bytes of its constants."""
    nodes = 0
    seen: set[int] = set()
    params = 0
    nbytes = 0
    for graph in iter_graphs(model.graph):
        nodes += len(graph.nodes)
        # Weights are initializers or the values of Constant nodes (PaddlePaddle's exports,
        # some converters): both count.
        values = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
        values += [v for node in graph.nodes if node.op == "Constant" for v in node.attrs.values()
                   if isinstance(v, gs.Constant)]
        for tensor in values:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                count, size = _elements_and_bytes(tensor)
                params += count
                nbytes += size
    return GraphStats(nodes=nodes, parameters=params, parameter_bytes=nbytes)


def _elements_and_bytes(tensor: gs.Constant) -> tuple[int, int]:
    shape = tensor.shape if tensor.shape is not None else ()
    count = int(np.prod(shape)) if len(shape) else 1
    return count, count * np.dtype(tensor.dtype).itemsize if _is_numpy_dtype(tensor.dtype) else 0


def _is_numpy_dtype(dtype: object) -> bool:
    try:
        np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True
