"""Writing a model file with its large tensors streamed straight from their buffers.

`gs.export_onnx` copies every weight several times on its way to a file (`ndarray.tobytes`,
`make_tensor`, `make_graph`'s extend, `make_model`'s CopyFrom, then serialization): with hundreds
of MB of folded weights those copies were most of an `iropt run`. Protobuf's wire format is a
sequence of (field, length, bytes) records, and parsers accept the fields of a message in any
order. So the graph is exported with small placeholders for its large tensors (the "skeleton"),
and each initializer is then written as its own record, large ones straight from their arrays.

The skeleton is what the ONNX checker sees before anything is written. Its placeholders have
no elements (`dims=[0]`), which the checker accepts; what it would have checked on the real
tensors (a known element type, data of exactly the size of the dims) holds by construction:
for an array both come from the array itself, and a tensor still as read from the input file
is streamed only when its raw data has exactly its dims' size (any other stays in the
skeleton, in front of the checker). Constants graphsurgeon exports more than once (graph
inputs and outputs, constants that subgraphs read) and sparse ones are never streamed.

With external data (models past protobuf's 2 GB limit) the same records point into a data file
instead (`StreamedModel.with_external_data`), so no tensor is copied for that either.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.descriptor import FieldDescriptor
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from iropt.errors import ModelSaveError
from iropt.ir.graph import iter_graphs
from iropt.ir.model import Model

# Smaller tensors go through graphsurgeon's exporter: copying them costs nothing that matters.
STREAM_MIN_BYTES = 64 * 1024
# With external data, tensors from this size go to the data file (onnx's own default threshold).
EXTERNAL_MIN_BYTES = 1024
# Large tensors start at page boundaries in the data file, so a runtime can map them directly.
_EXTERNAL_ALIGNMENT = 4096

_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_LENGTH_DELIMITED = 2  # protobuf wire type of strings, bytes and embedded messages
# Element kinds whose raw_data is the array's little-endian bytes: bool, ints, floats, complex.
_RAW_KINDS = frozenset("biufc")
# ONNX element types whose raw_data holds one element per itemsize bytes, like their numpy (and
# ml_dtypes) arrays. Not in it: strings, and the 4-, 2- and 6-bit types ONNX packs several to a
# byte, with any type a later onnx adds, until it is known to be byte-aligned.
_BYTE_ALIGNED_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT", "UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64", "BOOL", "FLOAT16", "DOUBLE",
        "UINT32", "UINT64", "COMPLEX64", "COMPLEX128", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
    )
    if hasattr(onnx.TensorProto, name)
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _field_header(field: int, length: int) -> bytes:
    """Key and length of a length-delimited field."""
    return _varint(field << 3 | _LENGTH_DELIMITED) + _varint(length)


@dataclass(frozen=True)
class StoredRaw:
    """The raw_data of a tensor still as read from the input file, read only when written:
    each read is a fresh copy, so holding one per tensor until the write would double memory.

    Its length is checked then too (against `nbytes`, what its type and dims call for): measuring
    it beforehand would cost a copy, or an encoding, of every such tensor.
    """

    name: str
    tensor: onnx.TensorProto
    nbytes: int

    @property
    def data(self) -> bytes:
        raw = self.tensor.raw_data
        if len(raw) != self.nbytes:
            raise ModelSaveError(
                f"tensor '{self.name}' holds {len(raw)} bytes of raw data where its type and dims "
                f"call for {self.nbytes}: the input model is broken"
            )
        return raw


# Element bytes to write as raw_data: an array's buffer (1-D uint8) or a stored tensor's.
RawData = np.ndarray | StoredRaw


@dataclass(frozen=True)
class InitializerRecord:
    """One graph initializer as written: encoded TensorProto fields, then `data` as raw_data."""

    fields: bytes
    data: RawData | None = None

    def body_size(self) -> int:
        if self.data is None:
            return len(self.fields)
        return len(self.fields) + len(_field_header(_RAW_DATA_FIELD, self.data.nbytes)) + self.data.nbytes

    def size(self) -> int:
        """Bytes of the whole record inside the GraphProto."""
        body = self.body_size()
        return len(_field_header(_INITIALIZER_FIELD, body)) + body

    def write(self, out: BinaryIO) -> None:
        out.write(_field_header(_INITIALIZER_FIELD, self.body_size()))
        out.write(self.fields)
        if self.data is not None:
            out.write(_field_header(_RAW_DATA_FIELD, self.data.nbytes))
            out.write(self.data.data)


@dataclass(frozen=True)
class StreamedModel:
    """A model ready to write: the checked skeleton and its initializers in export order."""

    skeleton: onnx.ModelProto
    initializers: list[InitializerRecord]

    @functools.cached_property
    def _head_and_graph(self) -> tuple[bytes, bytes]:
        """The encodings of the model without its graph and of the graph without initializers."""
        head = onnx.ModelProto()
        head.CopyFrom(self.skeleton)  # cheap: the large tensors are placeholders
        head.ClearField("graph")
        graph = onnx.GraphProto()
        graph.CopyFrom(self.skeleton.graph)
        graph.ClearField("initializer")
        return head.SerializeToString(), graph.SerializeToString()

    def _graph_size(self) -> int:
        return len(self._head_and_graph[1]) + sum(r.size() for r in self.initializers)

    def byte_size(self) -> int:
        """Bytes `write` writes: what protobuf's 2 GiB message limit applies to."""
        graph = self._graph_size()
        return len(self._head_and_graph[0]) + len(_field_header(_GRAPH_FIELD, graph)) + graph

    def write(self, out: BinaryIO) -> None:
        head, graph_fields = self._head_and_graph
        out.write(head)
        out.write(_field_header(_GRAPH_FIELD, self._graph_size()))
        out.write(graph_fields)
        for record in self.initializers:
            record.write(out)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()

    def with_external_data(self, location: str) -> tuple[StreamedModel, list[ExternalPayload]]:
        """The same model with its tensor data moved to the file `location` (relative to the
        model's folder), and what to write there."""
        records: list[InitializerRecord] = []
        payloads: list[ExternalPayload] = []
        end = 0
        for record in self.initializers:
            if record.data is None:
                records.append(record)
                continue
            offset = _aligned(end) if record.data.nbytes >= STREAM_MIN_BYTES else end
            reference = onnx.TensorProto(data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", location), ("offset", offset), ("length", record.data.nbytes)):
                entry = reference.external_data.add()
                entry.key, entry.value = key, str(value)
            # Concatenated encodings of one message type parse as one merged message.
            records.append(InitializerRecord(record.fields + reference.SerializeToString()))
            payloads.append(ExternalPayload(offset, record.data))
            end = offset + record.data.nbytes
        return StreamedModel(self.skeleton, records), payloads


@dataclass(frozen=True)
class ExternalPayload:
    """Tensor bytes to write at `offset` of the external data file."""

    offset: int
    data: RawData

    @staticmethod
    def write_all(payloads: list[ExternalPayload], out: BinaryIO) -> None:
        position = 0
        for payload in payloads:
            out.write(bytes(payload.offset - position))  # alignment padding
            out.write(payload.data.data)
            position = payload.offset + payload.data.nbytes


def _aligned(offset: int) -> int:
    return -(-offset // _EXTERNAL_ALIGNMENT) * _EXTERNAL_ALIGNMENT


def model_bytes(model: Model) -> bytes:
    """The serialized model, as `model.to_onnx().SerializeToString()` but without its copies."""
    return export_streamed(model).to_bytes()


def export_streamed(model: Model, min_bytes: int = STREAM_MIN_BYTES) -> StreamedModel:
    """Export `model` for `StreamedModel.write`, streaming top-level tensors of `min_bytes` and
    more; the model itself is left as it was."""
    large = _large_initializers(model.graph, min_bytes)
    with _placeholders([constant for constant, _ in large.values()]):
        skeleton = model.to_onnx()
    records = [
        large[t.name][1] if t.name in large else InitializerRecord(t.SerializeToString())
        for t in skeleton.graph.initializer
    ]
    return StreamedModel(skeleton, records)


def export_without_data(model: Model) -> onnx.ModelProto:
    """`model` exported with its top-level tensors of STREAM_MIN_BYTES and more as element type
    and dims only, without their data: enough for shape inference, which reads no weight, and
    no weight is copied or encoded."""
    large = [
        t for t in model.graph.tensors().values()
        if isinstance(t, gs.Constant) and not isinstance(t._values, SparseValues) and t._values.nbytes >= STREAM_MIN_BYTES
    ]
    with _placeholders(large, keep_dims=True):
        return model.to_onnx()


def _large_initializers(graph: gs.Graph, min_bytes: int) -> dict[str, tuple[gs.Constant, InitializerRecord]]:
    """The top-level constants worth streaming, with their records, by name."""
    pinned = _pinned_tensors(graph)
    large: dict[str, tuple[gs.Constant, InitializerRecord]] = {}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and id(tensor) not in pinned:
            record = _record_of(tensor, min_bytes)
            if record is not None:
                large[tensor.name] = (tensor, record)
    return large


def _pinned_tensors(graph: gs.Graph) -> set[int]:
    """Tensors graphsurgeon exports more than once: graph inputs and outputs (their value_info is
    built from the constant's shape) and what subgraphs read (copied into their initializers).
    A placeholder there would be written as it is, so these constants are never streamed."""
    pinned = {id(t) for t in (*graph.inputs, *graph.outputs)}
    for subgraph in iter_graphs(graph)[1:]:
        pinned.update(id(t) for node in subgraph.nodes for t in node.inputs)
        pinned.update(id(t) for t in subgraph.outputs)
    return pinned


def _record_of(constant: gs.Constant, min_bytes: int) -> InitializerRecord | None:
    # `_values` rather than `values`: reading `values` would decode a tensor still held as the
    # input file's TensorProto into a numpy array, the copy this module exists to avoid.
    stored = constant._values
    if isinstance(stored, SparseValues):  # a LazyValues too, but exported as a sparse initializer
        return None
    if isinstance(stored, LazyValues):
        return _record_of_stored(constant.name, stored) if stored.nbytes >= min_bytes else None
    if not _streamable_array(constant, stored, min_bytes):
        return None
    header = onnx.TensorProto(
        name=constant.name, data_type=onnx.helper.np_dtype_to_tensor_dtype(stored.dtype), dims=stored.shape
    )
    little_endian = stored.astype(stored.dtype.newbyteorder("<"), copy=False)
    return InitializerRecord(header.SerializeToString(), np.ascontiguousarray(little_endian).reshape(-1).view(np.uint8))


def _record_of_stored(name: str, stored: LazyValues) -> InitializerRecord | None:
    """A tensor still as read from the input file, its raw bytes written as they are.

    Left to graphsurgeon: a tensor without raw_data (typed fields such as float_data), and one of
    a packed type (4-, 2- or 6-bit elements, several to a byte).
    """
    tensor = stored.tensor
    if (
        not tensor.HasField("raw_data")
        or tensor.data_location == onnx.TensorProto.EXTERNAL
        or tensor.data_type not in _BYTE_ALIGNED_TYPES
    ):
        return None
    header = _header_of(tensor)
    header.name = name  # graphsurgeon's exporter renames the stored tensor too
    return InitializerRecord(header.SerializeToString(), StoredRaw(name, tensor, stored.nbytes))


def _header_of(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """`tensor` without its data: every other field (doc_string, metadata_props, ...) copied.

    Field by field, never touching raw_data: `ListFields` would copy it, `ByteSize` encode it.
    """
    header = onnx.TensorProto()
    for field in tensor.DESCRIPTOR.fields:
        if field.name == "raw_data":
            continue
        if _is_repeated(field):
            values = getattr(tensor, field.name)
            if len(values):
                getattr(header, field.name).extend(values)
        elif tensor.HasField(field.name):
            if field.type == field.TYPE_MESSAGE:
                getattr(header, field.name).CopyFrom(getattr(tensor, field.name))
            else:
                setattr(header, field.name, getattr(tensor, field.name))
    return header


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 removed `label` from upb's descriptors in favour of `is_repeated`.
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _streamable_array(constant: gs.Constant, stored: object, min_bytes: int) -> bool:
    if not isinstance(stored, np.ndarray) or stored.nbytes < min_bytes or not stored.dtype.isnative:
        return False
    # A constant exported as another type is converted by graphsurgeon (onnx before 1.20).
    if not (isinstance(constant.export_dtype, np.dtype) and constant.export_dtype == stored.dtype):
        return False
    return _raw_is_array_bytes(stored.dtype)


def _raw_is_array_bytes(dtype: np.dtype) -> bool:
    """Whether ONNX's raw_data of this element type is the array's own bytes: yes for bool,
    ints, floats, complex and the byte-sized ml_dtypes (bfloat16, float8); no for strings and
    for the 4-, 2- and 6-bit types, which ONNX packs several to a byte."""
    if dtype.kind in _RAW_KINDS:
        return True
    if dtype.kind != "V":
        return False
    try:
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    except (KeyError, TypeError, ValueError):
        return False
    return onnx_type in _BYTE_ALIGNED_TYPES


@contextmanager
def _placeholders(constants: list[gs.Constant], *, keep_dims: bool = False) -> Iterator[None]:
    """Give the constants stand-ins of their element type without data, restoring their values
    after: empty ones (dims [0]), or with their own dims (`keep_dims`; not a valid tensor, but
    what shape inference needs)."""
    saved = [constant._values for constant in constants]
    try:
        for constant in constants:
            dims = list(constant.shape) if keep_dims else [0]
            placeholder = onnx.TensorProto(name=constant.name, data_type=_onnx_type(constant), dims=dims)
            constant.values = LazyValues(placeholder)
        yield
    finally:
        for constant, values in zip(constants, saved, strict=True):
            constant.values = values


def _onnx_type(constant: gs.Constant) -> int:
    stored = constant._values
    if isinstance(stored, LazyValues):
        return int(stored.tensor.data_type)
    return int(onnx.helper.np_dtype_to_tensor_dtype(stored.dtype))
