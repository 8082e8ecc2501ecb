"""Reading models: validate the file, refuse external data outside the model's folder."""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, Message

from iropt.errors import ModelLoadError
from iropt.io.external import (
    ExternalRef,
    check_external_data,
    check_tensor_data,
    load_external_data,
    read_array,
    readable_as_array,
)
from iropt.ir.model import Model
from iropt.util.text import shorten, shorten_path


def load_model(path: str | os.PathLike[str], *, external_data: bool = True) -> Model:
    """Read an ONNX model, with its external data, and explain what is wrong when it cannot.

    `external_data=False` checks the external references but reads none of them: the graph,
    its inputs and the weights' types and shapes, without the weights' bytes (enough to make
    inputs for it, or to see whether it has external data: `Model.source_data_files`).
    """
    model_path = Path(path)
    proto, refs = _load_unread(model_path)
    # The main graph's weights are read into arrays after the import, once each; everything
    # else (subgraphs, attributes, sparse tensors, other types) into its TensorProto now.
    as_arrays = _main_graph_refs(proto, refs) if external_data else {}
    if external_data:
        load_external_data([ref for ref in refs if ref.tensor.name not in as_arrays])
    try:
        model = Model.from_onnx(proto, model_path.resolve())
    except Exception as error:
        # The proto passed every check above, so what the graph library still refuses is a
        # damaged model (a field combination no check foresaw), not a bug in iropt.
        raise ModelLoadError(
            f"{path}: the model cannot be read into a graph: {type(error).__name__}: "
            f"{shorten(str(error), 300)}"
        ) from error
    _read_into_constants(model, as_arrays)
    return replace(model, source_data_files=frozenset(ref.file for ref in refs))


def _main_graph_refs(proto: onnx.ModelProto, refs: list[ExternalRef]) -> dict[str, ExternalRef]:
    """The references of the main graph's initializers that can be read as arrays, by name."""
    initializers = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    by_name = Counter(ref.tensor.name for ref in refs)
    return {
        ref.tensor.name: ref for ref in refs
        # A name that another external tensor (in a subgraph, say) shares is read the old way.
        if ref.tensor.name in initializers and by_name[ref.tensor.name] == 1 and readable_as_array(ref)
    }


def _read_into_constants(model: Model, refs: dict[str, ExternalRef]) -> None:
    """Give each of the graph's constants named in `refs` its data, read from the file."""
    if not refs:
        return
    for tensor in model.graph.tensors().values():
        ref = refs.get(tensor.name)
        if ref is not None and isinstance(tensor, gs.Constant):
            tensor.values = read_array(ref)
            tensor.data_location = onnx.TensorProto.DEFAULT


def load_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and validate a ModelProto, loading external data from inside the model's folder only."""
    proto, refs = _load_unread(Path(path))
    load_external_data(refs)
    return proto


def _load_unread(model_path: Path) -> tuple[onnx.ModelProto, list[ExternalRef]]:
    """The validated proto and its checked external references, none of them read yet."""
    _check_readable(model_path)
    try:
        proto = onnx.load_model(str(model_path), load_external_data=False)
    except PermissionError as exc:
        raise ModelLoadError(f"{model_path}: permission denied (the file cannot be read)") from exc
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{model_path}: not a readable ONNX model (the file is truncated or not ONNX protobuf: "
            f"{shorten(str(exc), 200)})"
        ) from exc
    _check_looks_like_onnx(model_path, proto)
    _check_text_fields(model_path, proto)
    _check_unique_definitions(model_path, proto)
    check_tensor_data(model_path, proto)
    return proto, check_external_data(model_path, proto)


def _check_readable(model_path: Path) -> None:
    try:
        model_path.stat()
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise ModelLoadError(f"{shorten_path(str(model_path))}: the file name is too long") from error
    if not model_path.exists():
        raise ModelLoadError(f"{model_path}: no such file")
    if model_path.is_dir():
        raise ModelLoadError(f"{model_path}: is a directory, expected an .onnx file")
    if not model_path.is_file():
        raise ModelLoadError(f"{model_path}: is not a regular file, expected an .onnx file")
    if not os.access(model_path, os.R_OK):
        raise ModelLoadError(f"{model_path}: permission denied (the file cannot be read)")
    if model_path.stat().st_size == 0:
        raise ModelLoadError(f"{model_path}: the file is empty")


def _check_looks_like_onnx(model_path: Path, proto: onnx.ModelProto) -> None:
    # Random bytes can decode as a protobuf message with a few unknown fields; a real model has
    # an IR version, an opset and a graph with at least one output.
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.output:
        raise ModelLoadError(
            f"{model_path}: not an ONNX model (no IR version, opset import or graph outputs)"
        )
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{model_path}: IR version {proto.ir_version} is newer than any this onnx knows "
            f"({onnx.IR_VERSION}); the file is damaged or needs a newer onnx"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelLoadError(
                f"{model_path}: imports opset {opset.version} of the default domain, newer than any "
                f"this onnx knows ({newest}); the file is damaged or needs a newer onnx"
            )


def _check_text_fields(model_path: Path, message: Message) -> None:
    """ModelLoadError for a text field (a name, a doc string) that is not UTF-8.

    ONNX's protobuf schema does not enforce UTF-8, and protobuf hands such a field over as bytes,
    which breaks whatever reads it as text later. Raw tensor data are bytes fields, not walked.
    """
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_MESSAGE, field.TYPE_STRING):
            continue
        items = value if field.is_repeated else [value]
        for item in items:
            if field.type == field.TYPE_MESSAGE:
                _check_text_fields(model_path, item)
            elif isinstance(item, bytes):
                raise ModelLoadError(
                    f"{model_path}: a {message.DESCRIPTOR.name}'s {field.name} is not UTF-8 text "
                    f"({shorten(repr(item))}); the file is damaged or not ONNX"
                )


def _check_unique_definitions(model_path: Path, proto: onnx.ModelProto) -> None:
    """ModelLoadError for a name given two values in one graph.

    Two initializers of one name, or a value both an initializer and a node's output, or the
    output of two nodes: runtimes and graph libraries each keep a different one, so the model
    has no single meaning. Refused rather than guessed at.
    """
    for graph in _graphs(proto.graph):
        definitions = Counter(
            [t.name for t in graph.initializer]
            + [s.values.name for s in graph.sparse_initializer]
            + [name for node in graph.node for name in node.output if name]
        )
        twice = [name for name, count in definitions.items() if count > 1]
        if twice:
            where = "" if graph is proto.graph else f" (in subgraph '{shorten(graph.name)}')"
            names = ", ".join(f"'{shorten(name)}'" for name in twice[:3])
            more = f" and {len(twice) - 3} more" if len(twice) > 3 else ""
            raise ModelLoadError(
                f"{model_path}: {names}{more} defined more than once{where} (two initializers, or "
                "an initializer and a node output, of the same name); runtimes disagree on which "
                "one counts, so the model is refused: give each value its own name"
            )


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graphs(subgraph)
