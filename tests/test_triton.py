"""Triton model repositories: config.pbtxt parsed with Triton's own ModelConfig protobuf and
checked against the model, for every golden model, with ONNX Runtime and TensorRT targets."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from helpers_trt import requires_tensorrt
from tritonclient.grpc import model_config_pb2

from iropt.app.cli import main
from iropt.errors import UserError
from iropt.lowering.triton import DEFAULT_MAX_BATCH, TRITON_TYPES, triton_config, write_repository
from iropt.verify.feeds import parse_shape_ranges

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
GOLDEN_MODELS = sorted(p.stem for p in GOLDEN.glob("*.onnx"))


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def declared(proto: onnx.ModelProto) -> dict[str, tuple[str, list[int]]]:
    """name -> (Triton type, dims with -1 for dynamic) of every graph input and output."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    initializers = {t.name for t in proto.graph.initializer}
    values = [v for v in inferred.graph.input if v.name not in initializers] + list(inferred.graph.output)
    return {
        v.name: (TRITON_TYPES[v.type.tensor_type.elem_type],
                 [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
        for v in values
    }


def check_against_model(config: model_config_pb2.ModelConfig, proto: onnx.ModelProto) -> None:
    """Every tensor of the config matches the model: name, data type, dims (batch left out
    exactly when max_batch_size > 0, which needs a dynamic first dimension everywhere)."""
    expected = declared(proto)
    tensors = list(config.input) + list(config.output)
    assert sorted(t.name for t in tensors) == sorted(expected)
    batching = config.max_batch_size > 0
    assert batching == all(dims and dims[0] == -1 for _, dims in expected.values())
    assert config.HasField("dynamic_batching") == batching
    for tensor in tensors:
        data_type, dims = expected[tensor.name]
        assert model_config_pb2.DataType.Name(tensor.data_type) == data_type
        assert list(tensor.dims) == (dims[1:] if batching else dims)


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_onnx_runtime_config_of_every_golden_model(name: str) -> None:
    proto = onnx.load(str(GOLDEN / f"{name}.onnx"))
    config = parse(triton_config(proto, name=name, backend="ort").to_pbtxt())
    assert config.name == name and config.platform == "onnxruntime_onnx"
    check_against_model(config, proto)
    assert config.max_batch_size in (0, DEFAULT_MAX_BATCH)
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (1, "KIND_CPU")
    ]


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_tensorrt_config_of_every_golden_model(name: str) -> None:
    proto = onnx.load(str(GOLDEN / f"{name}.onnx"))
    profile = {"input": (1, 16), "ids": (1, 16)}
    config = parse(triton_config(proto, name=name, backend="tensorrt", profile_max_batch=profile).to_pbtxt())
    assert config.platform == "tensorrt_plan"
    check_against_model(config, proto)
    # The engine's profile covers every batch Triton forms.
    assert config.max_batch_size in (0, 16)
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"


def test_an_output_whose_batch_is_not_first_turns_batching_off() -> None:
    # control_flow's `trace` output is [4, batch]: Triton could not split it by request.
    config = parse(triton_config(onnx.load(str(GOLDEN / "control_flow.onnx")), name="cf", backend="ort").to_pbtxt())
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [-1, 8]


def test_the_batch_limit_comes_from_a_range_and_a_profile_must_start_at_one() -> None:
    proto = onnx.load(str(GOLDEN / "resnet.onnx"))
    ranged = triton_config(proto, name="r", backend="ort",
                           shape_ranges=parse_shape_ranges(["input:1x3x32x32,4x3x32x32,32x3x32x32"]))
    assert ranged.max_batch_size == 32
    late = triton_config(proto, name="r", backend="tensorrt", profile_max_batch={"input": (2, 8)})
    assert late.max_batch_size == 0 and "profile starts at batch 2" in late.notes[0]
    assert list(parse(late.to_pbtxt()).input[0].dims) == [-1, 3, 32, 32]


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_bad_model_names_are_user_errors(bad: str) -> None:
    with pytest.raises(UserError, match="model name"):
        triton_config(onnx.load(str(GOLDEN / "mlp.onnx")), name=bad, backend="ort")


def test_the_repository_layout(tmp_path: Path) -> None:
    source = GOLDEN / "mlp.onnx"
    config = triton_config(onnx.load(str(source)), name="mlp", backend="ort")
    written = write_repository(tmp_path / "repo", config, onnx_path=source, serving_bytes=None)
    assert written == [tmp_path / "repo/mlp/1/model.onnx", tmp_path / "repo/mlp/config.pbtxt"]
    assert written[0].read_bytes() == source.read_bytes()
    assert parse(written[1].read_text()).name == "mlp"
    with pytest.raises(UserError, match="needs the engine"):
        write_repository(tmp_path / "repo", triton_config(onnx.load(str(source)), name="m", backend="tensorrt"),
                         onnx_path=source, serving_bytes=None)


def test_iropt_run_writes_an_onnx_runtime_repository(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    code = main(["-q", "run", "cleanup", str(GOLDEN / "digits_cnn.onnx"), "-o", str(tmp_path / "d.onnx"),
                 "--triton", str(tmp_path / "models"), "--report", str(report)])
    assert code == 0
    config = parse((tmp_path / "models/digits_cnn/config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx"
    model_file = tmp_path / "models/digits_cnn/1/model.onnx"
    assert model_file.read_bytes() == (tmp_path / "d.onnx").read_bytes()
    check_against_model(config, onnx.load(str(model_file)))
    assert json.loads(report.read_text())["triton"] == [str(model_file), str(tmp_path / "models/digits_cnn/config.pbtxt")]


@requires_tensorrt
def test_iropt_run_writes_a_tensorrt_repository(tmp_path: Path) -> None:
    schedule = tmp_path / "trt.opt"
    schedule.write_text("target tensorrt(builder_optimization_level=0)\neliminate_identity\n")
    code = main(["-q", "run", str(schedule), str(GOLDEN / "mlp.onnx"), "-o", str(tmp_path / "m.onnx"),
                 "--shape", "input:1x64,4x64,16x64", "--triton", str(tmp_path / "models"), "--triton-name", "digits"])
    assert code == 0
    config = parse((tmp_path / "models/digits/config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    plan = tmp_path / "models/digits/1/model.plan"
    assert plan.read_bytes() == (tmp_path / "m.engine").read_bytes()
    check_against_model(config, onnx.load(str(tmp_path / "m.onnx")))


def test_a_bad_triton_name_stops_the_run_before_it_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "cleanup", str(GOLDEN / "mlp.onnx"), "-o", str(tmp_path / "m.onnx"),
                 "--triton", str(tmp_path / "models"), "--triton-name", "a/b"])
    assert code == 2 and "model name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
