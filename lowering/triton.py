"""A Triton Inference Server model repository for the optimized model.

`iropt run ... --triton DIR [--triton-name NAME]` writes

    DIR/NAME/config.pbtxt
    DIR/NAME/1/model.onnx      (platform onnxruntime_onnx; external data beside it)
    DIR/NAME/1/model.plan      (platform tensorrt_plan, with `target tensorrt`)

The configuration is derived from the model: inputs and outputs with Triton's data types and
dimensions; `max_batch_size` > 0 (with `dynamic_batching`) when the first dimension of every
input and output is dynamic, which Triton then leaves out of `dims`; -1 for other dynamic
dimensions. With TensorRT the batch limit is the optimization profile's max batch (so the
engine accepts every batch Triton forms), and the profile's min batch must be 1; with ONNX
Runtime it is the max of a `--shape` range, else `DEFAULT_MAX_BATCH`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from iropt.errors import UserError
from iropt.io.save import publish_atomically, write_bytes_atomically
from iropt.verify.feeds import ShapeRange

DEFAULT_MAX_BATCH = 8
VERSION = "1"

PLATFORMS = {"ort": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}

# ONNX element type -> Triton data type (model_config.proto's DataType names).
TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.STRING: "TYPE_STRING",
}


@dataclass(frozen=True)
class TritonTensor:
    name: str
    data_type: str
    dims: tuple[int, ...]  # -1 for a dynamic dimension; without the batch dimension when batching


@dataclass
class TritonConfig:
    """The parts of Triton's ModelConfig that iropt writes."""

    name: str
    platform: str
    max_batch_size: int
    inputs: list[TritonTensor]
    outputs: list[TritonTensor]
    instance_kind: str  # KIND_GPU or KIND_CPU
    notes: list[str] = field(default_factory=list)

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.platform]

    def to_pbtxt(self) -> str:
        """The configuration in protobuf text format, as Triton reads config.pbtxt."""
        lines = [
            f'name: "{_escape(self.name)}"',
            f'platform: "{self.platform}"',
            f"max_batch_size: {self.max_batch_size}",
        ]
        lines += _tensor_blocks("input", self.inputs)
        lines += _tensor_blocks("output", self.outputs)
        if self.max_batch_size > 0:
            lines.append("dynamic_batching { }")
        lines.append(f"instance_group [ {{ count: 1 kind: {self.instance_kind} }} ]")
        return "\n".join(lines) + "\n"


def _tensor_blocks(kind: str, tensors: Sequence[TritonTensor]) -> list[str]:
    lines = [f"{kind} ["]
    for index, tensor in enumerate(tensors):
        dims = tensor.dims or (1,)  # a scalar travels as [1], reshaped to []
        block = [
            "  {",
            f'    name: "{_escape(tensor.name)}"',
            f"    data_type: {tensor.data_type}",
            f"    dims: [ {', '.join(str(d) for d in dims)} ]",
        ]
        if not tensor.dims:
            block.append("    reshape: { shape: [ ] }")
        block.append("  }" + ("," if index < len(tensors) - 1 else ""))
        lines += block
    lines.append("]")
    return lines


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


# --- from the model ---------------------------------------------------------------------------


def triton_config(
    proto: onnx.ModelProto,
    *,
    name: str,
    backend: str | None,
    providers: Sequence[str] = (),
    profile_max_batch: Mapping[str, tuple[int, int]] | None = None,
    shape_ranges: Mapping[str, ShapeRange] | None = None,
) -> TritonConfig:
    """The Triton configuration of `proto` served by `backend` ("tensorrt", else ONNX Runtime).

    profile_max_batch: TensorRT's (min, max) of the first dimension per dynamic input.
    """
    check_model_name(name)
    platform = PLATFORMS["tensorrt" if backend == "tensorrt" else "ort"]
    inputs, outputs = _io(proto)
    notes: list[str] = []
    max_batch = _max_batch(inputs + outputs, platform, profile_max_batch or {}, shape_ranges or {}, notes)
    drop = 1 if max_batch > 0 else 0
    kind = "KIND_GPU" if platform == "tensorrt_plan" or _gpu_providers(providers) else "KIND_CPU"
    return TritonConfig(
        name=name,
        platform=platform,
        max_batch_size=max_batch,
        inputs=[TritonTensor(n, t, tuple(dims[drop:])) for n, t, dims in inputs],
        outputs=[TritonTensor(n, t, tuple(dims[drop:])) for n, t, dims in outputs],
        instance_kind=kind,
        notes=notes,
    )


def check_model_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"--triton-name '{name}': a Triton model name is one folder name (no '/')")


_Io = tuple[str, str, list[int]]


def _io(proto: onnx.ModelProto) -> tuple[list[_Io], list[_Io]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [_tensor(v) for v in inferred.graph.input if v.name not in initializers]
    return inputs, [_tensor(v) for v in inferred.graph.output]


def _tensor(value: onnx.ValueInfoProto) -> _Io:
    tensor_type = value.type.tensor_type
    data_type = TRITON_TYPES.get(tensor_type.elem_type)
    if data_type is None:
        name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise UserError(f"tensor '{value.name}' has type {name}, which Triton has no data type for")
    if not tensor_type.HasField("shape"):
        raise UserError(f"tensor '{value.name}' has no declared rank; Triton's config needs one")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return value.name, data_type, dims


def _max_batch(
    tensors: Sequence[_Io], platform: str, profile: Mapping[str, tuple[int, int]],
    shape_ranges: Mapping[str, ShapeRange], notes: list[str],
) -> int:
    """0 unless every input and output has a dynamic first dimension; then the batch limit."""
    if not tensors or not all(dims and dims[0] == -1 for _, _, dims in tensors):
        return 0
    if platform == "tensorrt_plan":
        low = max(lo for lo, _ in profile.values()) if profile else 1
        if low > 1:
            notes.append(
                f"max_batch_size 0: the engine's profile starts at batch {low} and Triton forms batches "
                "from 1; the batch dimension is kept in dims"
            )
            return 0
        return min((hi for _, hi in profile.values()), default=DEFAULT_MAX_BATCH)
    ranged = [r.max[0] for r in shape_ranges.values() if r.ranged and r.max]
    return min(ranged) if ranged else DEFAULT_MAX_BATCH


def _gpu_providers(providers: Sequence[str]) -> bool:
    return any(p not in ("CPUExecutionProvider",) for p in providers)


# --- writing ---------------------------------------------------------------------------------


def write_repository(
    directory: Path, config: TritonConfig, *, onnx_path: Path, serving_bytes: bytes | None
) -> list[Path]:
    """Write DIR/NAME/config.pbtxt and DIR/NAME/1/<model file>; returns the files written.

    The ONNX model is copied from `onnx_path` (with its external data file, under the name the
    model refers to); a TensorRT plan is `serving_bytes`.
    """
    version_dir = directory / config.name / VERSION
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--triton {directory}: cannot create {version_dir}: {error}") from error
    written = []
    model_file = version_dir / config.model_file
    if config.platform == "tensorrt_plan":
        if serving_bytes is None:
            raise UserError("--triton with target tensorrt needs the engine; it was not built (--no-emit?)")
        write_bytes_atomically(model_file, serving_bytes)
        written.append(model_file)
    else:
        _copy(onnx_path, model_file)
        written.append(model_file)
        data = onnx_path.with_name(onnx_path.name + ".data")
        if data.is_file():
            _copy(data, version_dir / data.name)
            written.append(version_dir / data.name)
    config_file = directory / config.name / "config.pbtxt"
    write_bytes_atomically(config_file, config.to_pbtxt().encode())
    written.append(config_file)
    return written


def _copy(source: Path, target: Path) -> None:
    publish_atomically(target, [], lambda staged: shutil.copyfile(source, staged))
