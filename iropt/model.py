"""The Model that flows through iropt, and the only place models are read and written.

A `Model` is an onnx-graphsurgeon graph plus what a graph alone does not carry: the model's
metadata, its documentation and the files it was read from. Loading validates the file and
refuses external-data locations that escape the model's folder; saving is atomic (a temporary
file, then a rename), never writes over the model it was loaded from or that model's external
data, and switches to external data when the tensors would not fit the 2 GB protobuf limit.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from iropt.errors import ModelLoadError, ModelSaveError

if TYPE_CHECKING:
    from iropt.model_stream import StreamedModel

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
        from iropt.graph_utils import relink_outer_scope
        from iropt.unshadow import unshadow

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
        if domain in ("", "ai.onnx"):
            return self.opset
        for opset_id in self.graph.import_domains or []:
            if opset_id.domain == domain:
                return int(opset_id.version)
        return None


def load_model(path: str | os.PathLike[str]) -> Model:
    """Read an ONNX model, with its external data, and explain what is wrong when it cannot."""
    proto, data_files = _load(Path(path))
    return replace(Model.from_onnx(proto, Path(path).resolve()), source_data_files=data_files)


def load_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and validate a ModelProto, loading external data from inside the model's folder only."""
    return _load(Path(path))[0]


def _load(model_path: Path) -> tuple[onnx.ModelProto, frozenset[Path]]:
    """The validated proto, its external data loaded, and the external data files it read."""
    _check_readable(model_path)
    try:
        proto = onnx.load_model(str(model_path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{model_path}: not a readable ONNX model (the file is truncated or not ONNX protobuf: {exc})"
        ) from exc
    _check_looks_like_onnx(model_path, proto)
    if not _uses_external_data(proto):
        return proto, frozenset()
    data_files = _check_external_locations(model_path, proto)
    onnx.external_data_helper.load_external_data_for_model(proto, str(model_path.parent))
    return proto, data_files


def _check_readable(model_path: Path) -> None:
    if not model_path.exists():
        raise ModelLoadError(f"{model_path}: no such file")
    if model_path.is_dir():
        raise ModelLoadError(f"{model_path}: is a directory, expected an .onnx file")
    if model_path.stat().st_size == 0:
        raise ModelLoadError(f"{model_path}: the file is empty")


def _check_looks_like_onnx(model_path: Path, proto: onnx.ModelProto) -> None:
    # Random bytes can decode as a protobuf message with a few unknown fields; a real model has
    # an IR version, an opset and a graph with at least one output.
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.output:
        raise ModelLoadError(
            f"{model_path}: not an ONNX model (no IR version, opset import or graph outputs)"
        )


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(proto)
    )


def _check_external_locations(model_path: Path, proto: onnx.ModelProto) -> frozenset[Path]:
    """The external data files the model reads (resolved); ModelLoadError for a missing one or
    one outside the model's folder."""
    base = model_path.parent.resolve()
    files: set[Path] = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        target = (base / info.location).resolve()
        if not target.is_relative_to(base):
            raise ModelLoadError(
                f"{model_path}: tensor '{tensor.name}' points at external data outside the model's "
                f"folder ({info.location}); refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{model_path}: external data file '{info.location}' of tensor '{tensor.name}' is missing"
            )
        files.add(target)
    return frozenset(files)


# A check on a model about to be written (the ONNX checker, say): `save_model` hands it the
# model in memory (its skeleton, see iropt.model_stream), `save_proto` the staged file.
ModelCheck = Callable[[onnx.ModelProto | Path], None]


def save_model(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    check: ModelCheck | None = None,
) -> Path:
    """Write `model` atomically to `path`; returns the path written.

    `external_data=None` chooses external data when the tensors would pass the protobuf limit.
    Refuses to overwrite the file the model was loaded from. `check` (the ONNX checker, say)
    is given the model to be written, its large tensors as empty placeholders (see
    `iropt.model_stream`), before anything is written; if it raises, nothing is.
    """
    from iropt.model_stream import ExternalPayload

    out = Path(path)
    check_output_path(out, model.input_files())
    streamed, external = _export_for(model, out, external_data)
    if check is not None:
        check(streamed.skeleton)
    data_name = out.name + ".data"
    payloads: list[ExternalPayload] = []
    if external:
        streamed, payloads = streamed.with_external_data(data_name)
        if streamed.byte_size() > PROTOBUF_LIMIT:
            # Too much stays inline (tensors in or read by If/Loop bodies, graph inputs or
            # outputs, typed fields): onnx's own converter moves every tensor out, copies and all.
            return save_proto(model.to_onnx(), out, external_data=True, protected=model.input_files(), check=check)

    def write(staged: Path) -> None:
        _write_file(staged, streamed.write)
        if payloads:
            _write_file(staged.parent / data_name, lambda data: ExternalPayload.write_all(payloads, data))

    try:
        _stage_and_move(out, [data_name] if payloads else [], write)
    except OSError as error:
        raise ModelSaveError(f"{out}: could not write the model: {error}") from error
    return out


def _export_for(model: Model, out: Path, external_data: bool | None) -> tuple[StreamedModel, bool]:
    """The streamed export to write, and whether it goes with external data.

    `None` decides by size: first from the constants (counted once, so an estimate), then from
    the exact size of the export, which may still be past protobuf's limit.
    """
    from iropt.model_stream import EXTERNAL_MIN_BYTES, STREAM_MIN_BYTES, export_streamed

    external = external_data
    if external is None:
        external = graph_stats(model).parameter_bytes > EXTERNAL_DATA_THRESHOLD
    streamed = export_streamed(model, EXTERNAL_MIN_BYTES if external else STREAM_MIN_BYTES)
    if external or streamed.byte_size() <= PROTOBUF_LIMIT:
        return streamed, external
    if external_data is False:
        raise ModelSaveError(
            f"{out}: the model is {streamed.byte_size()} bytes, past protobuf's 2 GiB limit; "
            "save it with external data"
        )
    return export_streamed(model, EXTERNAL_MIN_BYTES), True


def save_proto(
    proto: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    protected: Collection[Path] = (),
    check: ModelCheck | None = None,
) -> Path:
    """Atomically write a ModelProto; see `save_model`. `protected`: files not to write over
    (the input model and its data; see `check_output_path`). `check` is given the staged file."""
    out = Path(path)
    check_output_path(out, protected)
    if external_data is None:
        external_data = tensor_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    sidecars = [out.name + ".data"] if external_data else []

    def write(staged: Path) -> None:
        _save_proto_file(proto, staged, external_data)
        if check is not None:
            check(staged)

    try:
        _stage_and_move(out, sidecars, write)
    except OSError as error:
        raise ModelSaveError(f"{out}: could not write the model: {error}") from error
    return out


def _save_proto_file(proto: onnx.ModelProto, staged: Path, external_data: bool) -> None:
    if not external_data:
        onnx.save_model(proto, str(staged))
        return
    onnx.save_model(
        proto,
        str(staged),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=staged.name + ".data",
        size_threshold=1024,
    )


def _write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    with open(path, "wb") as out:
        write(out)


def _stage_and_move(out: Path, sidecars: list[str], write: Callable[[Path], None]) -> None:
    """`write(staged)` into a scratch folder beside `out`, then rename into place (atomic per file).

    `sidecars` are the names of files written beside the model (its external data); they are
    moved first, so a model file never points at data that is not there yet.
    """
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        write(staged)
        for name in sidecars:
            if (Path(tmp) / name).exists():  # onnx writes no data file when no tensor needs one
                os.replace(Path(tmp) / name, out.parent / name)
        os.replace(staged, out)


def check_output_path(out: Path, protected: Collection[Path] = ()) -> None:
    """ModelSaveError unless a model can be written to `out` without touching `protected`.

    `protected` is what the model was read from (`Model.input_files`: the model, then its
    external data). Neither `out` nor the data file a save may write beside it (`out` + ".data")
    may be one of them: the input is never modified.
    """
    if not out.parent.is_dir():
        raise ModelSaveError(f"{out}: the output directory {out.parent} does not exist")
    if out.is_dir():
        raise ModelSaveError(f"{out}: is a directory, expected a file name")
    inputs = [path.resolve() for path in protected]
    if out.resolve() in inputs[:1]:
        raise ModelSaveError(
            f"{out}: refusing to write over the input model; choose another output path with -o"
        )
    if out.resolve() in inputs:
        raise ModelSaveError(
            f"{out}: refusing to write over the input model's external data file; choose another "
            "output path with -o"
        )
    sidecar = out.parent / (out.name + ".data")
    if sidecar.resolve() in inputs:
        raise ModelSaveError(
            f"{out}: its external data would go to {sidecar}, the input model's own external data "
            "file; choose another output path with -o"
        )


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
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                shape = tensor.shape if tensor.shape is not None else ()
                count = int(np.prod(shape)) if len(shape) else 1
                params += count
                nbytes += count * np.dtype(tensor.dtype).itemsize if _is_numpy_dtype(tensor.dtype) else 0
    return GraphStats(nodes=nodes, parameters=params, parameter_bytes=nbytes)


def _is_numpy_dtype(dtype: object) -> bool:
    try:
        np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


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
