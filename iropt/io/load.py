"""Reading models: validate the file, refuse external data outside the model's folder."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from iropt.errors import ModelLoadError
from iropt.ir.model import Model


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

