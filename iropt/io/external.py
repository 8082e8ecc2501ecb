"""The one guard for a model's external data: every reference is checked before any byte is read.

A tensor with `data_location = EXTERNAL` names a file (`location`), an `offset` and a `length`.
Such tensors hide in several places: dense and sparse initializers (a sparse tensor's values and
indices are tensors of their own), Constant and other node attributes (`t`, `tensors`,
`sparse_tensor`, `sparse_tensors`), the same again in every subgraph (If/Loop/Scan bodies), and
in the bodies of model-local functions. `external_tensors` finds all of them, so the check and
the read cannot disagree about which tensors there are.

A reference is accepted only when its file, symbolic links followed, is a regular file inside the
model's folder, and its byte range lies inside that file and matches the tensor's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from iropt.errors import ModelLoadError
from iropt.util.text import shorten

_EXTERNAL = onnx.TensorProto.EXTERNAL
_T = onnx.TensorProto
_WHOLE_BYTE_TYPES = frozenset({
    _T.FLOAT, _T.DOUBLE, _T.FLOAT16, _T.BFLOAT16, _T.BOOL, _T.INT8, _T.INT16, _T.INT32, _T.INT64,
    _T.UINT8, _T.UINT16, _T.UINT32, _T.UINT64, _T.COMPLEX64, _T.COMPLEX128,
})


def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model, in every graph, attribute and function body."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The tensors whose data lives in a file beside the model."""
    return (tensor for tensor in all_tensors(proto) if tensor.data_location == _EXTERNAL)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        sparse_tensors = list(attribute.sparse_tensors)
        if attribute.HasField("sparse_tensor"):
            sparse_tensors.append(attribute.sparse_tensor)
        for sparse in sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph)


@dataclass(frozen=True)
class ExternalRef:
    """A checked reference: the file (resolved), the byte range, and the tensor it fills."""

    tensor: onnx.TensorProto
    file: Path
    offset: int
    length: int


def check_external_data(model_path: Path, proto: onnx.ModelProto) -> list[ExternalRef]:
    """Every external reference of `proto`, checked; ModelLoadError naming the first bad one."""
    base = model_path.parent.resolve()
    return [_checked_ref(model_path, base, tensor) for tensor in external_tensors(proto)]


def load_external_data(refs: list[ExternalRef]) -> None:
    """Read each checked reference into its tensor, which then holds its data inline."""
    for ref in refs:
        try:
            with open(ref.file, "rb") as data:
                data.seek(ref.offset)
                payload = data.read(ref.length)
        except OSError as error:
            raise ModelLoadError(f"{ref.file}: cannot read external data: {_os_reason(error)}") from error
        if len(payload) != ref.length:
            raise ModelLoadError(f"{ref.file}: external data changed while it was read (a short read)")
        ref.tensor.raw_data = payload
        ref.tensor.data_location = onnx.TensorProto.DEFAULT
        del ref.tensor.external_data[:]


# Element types read straight into a numpy array of the same bytes (little-endian, one element
# per itemsize bytes); others are read into their TensorProto.
_ARRAY_TYPES = frozenset({
    _T.FLOAT, _T.DOUBLE, _T.FLOAT16, _T.BOOL, _T.INT8, _T.INT16, _T.INT32, _T.INT64,
    _T.UINT8, _T.UINT16, _T.UINT32, _T.UINT64, _T.COMPLEX64, _T.COMPLEX128,
})


def readable_as_array(ref: ExternalRef) -> bool:
    """Whether `read_array` can read this reference (a numpy type whose bytes are ONNX's)."""
    return ref.tensor.data_type in _ARRAY_TYPES


def read_array(ref: ExternalRef) -> np.ndarray:
    """A checked reference's data as an array of its type and shape, read from the file once.

    Unlike `load_external_data`, the bytes are not put into the TensorProto: protobuf copies what
    it is given, so a weight of several GB would be in memory twice while it is read.
    """
    dtype = onnx.helper.tensor_dtype_to_np_dtype(ref.tensor.data_type).newbyteorder("<")
    count = ref.length // dtype.itemsize
    try:
        array = np.fromfile(ref.file, dtype=dtype, count=count, offset=ref.offset)
    except (OSError, ValueError) as error:
        reason = _os_reason(error) if isinstance(error, OSError) else str(error)
        raise ModelLoadError(f"{ref.file}: cannot read external data: {reason}") from error
    if array.size != count:
        raise ModelLoadError(f"{ref.file}: external data changed while it was read (a short read)")
    return array.reshape(tuple(ref.tensor.dims))


def _checked_ref(model_path: Path, base: Path, tensor: onnx.TensorProto) -> ExternalRef:
    name = shorten(tensor.name)

    def refuse(reason: str) -> ModelLoadError:
        return ModelLoadError(f"{model_path}: external data of tensor '{name}' {reason}")

    fields = {entry.key: entry.value for entry in tensor.external_data}
    location = fields.get("location", "")
    if not location:
        raise refuse("names no file (no 'location')")
    shown = shorten(location)
    target = (base / location).resolve()
    if Path(location).is_absolute() or not target.is_relative_to(base):
        raise refuse(f"is outside the model's folder ({shown}); refusing to read it")
    if not target.exists():
        raise ModelLoadError(f"{model_path}: external data file '{shown}' of tensor '{name}' is missing")
    if not target.is_file():
        raise refuse(f"is in '{shown}', which is not a regular file")
    offset = _whole_number(fields.get("offset", "0"), refuse, "offset")
    size = target.stat().st_size
    length = _whole_number(fields["length"], refuse, "length") if "length" in fields else size - offset
    if offset > size or offset + length > size:
        raise refuse(
            f"lies past the end of '{shown}' (bytes {offset}..{offset + max(length, 0)} of a "
            f"{size}-byte file): the data file is truncated or not this model's"
        )
    expected = _expected_bytes(tensor)
    if expected is not None and length != expected:
        raise refuse(f"is {length} bytes in '{shown}', but its shape and type need {expected}")
    return ExternalRef(tensor, target, offset, length)


def _whole_number(text: str, refuse: Callable[[str], ModelLoadError], what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise refuse(f"has a bad {what} ({shorten(text)!r}); expected a non-negative whole number")
    return value


def check_tensor_data(model_path: Path, proto: onnx.ModelProto) -> None:
    """ModelLoadError for a tensor whose type is not an ONNX type, whose shape has a negative
    dimension, or whose inline bytes do not fill its shape (a truncated or damaged file)."""
    known = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    for tensor in all_tensors(proto):
        name = shorten(tensor.name)
        if tensor.data_type not in known:
            raise ModelLoadError(f"{model_path}: tensor '{name}' has no valid element type ({tensor.data_type})")
        if any(dim < 0 for dim in tensor.dims):
            raise ModelLoadError(f"{model_path}: tensor '{name}' has a negative dimension {list(tensor.dims)}")
        expected = _expected_bytes(tensor)
        inline = tensor.data_location != _EXTERNAL and tensor.HasField("raw_data")
        if inline and expected is not None and len(tensor.raw_data) != expected:
            raise ModelLoadError(
                f"{model_path}: tensor '{name}' holds {len(tensor.raw_data)} bytes, but its shape "
                f"{list(tensor.dims)} and type need {expected}: the file is damaged"
            )


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dims and type call for, or None for types without a fixed size."""
    if tensor.data_type not in _WHOLE_BYTE_TYPES:
        return None  # strings, and packed types narrower than a byte
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error)
