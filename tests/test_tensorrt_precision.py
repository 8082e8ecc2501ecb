"""The precision gate: engine layer information (inspector JSON of TensorRT 8.x/10.x and 11.x,
and the build log of TensorRT-RTX) mapped back to ONNX nodes, against what the graph asks for.

The schema tests read layer descriptions written the way each TensorRT version writes them;
the build tests build real engines (tensorrt_rtx builds without a GPU) and run `iropt run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_trt import GPU, QdqGraph, conv_model, float16_conv_model, qdq_conv, requires_tensorrt

from iropt.app.cli import main
from iropt.io.save import save_model
from iropt.ir.model import Model
from iropt.lowering.tensorrt import PrecisionGateError, TensorRTBackend
from iropt.lowering.tensorrt_precision import (
    layers_from_json,
    layers_from_log,
    normalize_type,
    parse_metadata,
    precision_report,
    requested_precisions,
)


def half_quantized_conv() -> Model:
    """An int8 activation into a Conv whose weight is float: TensorRT can only run it in float."""
    g = QdqGraph()
    x = g.input("x", [1, 3, 8, 8])
    g.node("Conv", [g.qdq(x, "x"), g.const("w", g.weights((4, 3, 3, 3)))], "conv", outputs=["y"],
           pads=[1, 1, 1, 1])
    g.output("y", [1, 4, 8, 8])
    return g.model()


# --- reading the schemas -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Row major linear FP32 format", "fp32"),  # TensorRT 8.x
        ("Thirty-two wide channel vectorized row major Int8 format.", "int8"),
        ("Channel major FP16 format where channel % 2 == 0", "fp16"),
        ("Float", "fp32"),  # TensorRT 10.x
        ("Half", "fp16"),
        ("Int8", "int8"),
        ("BFloat16", "bf16"),
        ("FP8", "fp8"),
        ("Int32", None),  # indices and shapes say nothing about compute precision
        ("Bool", None),
        ("N/A due to dynamic shapes", None),
    ],
)
def test_tensor_types_of_every_version_are_normalized(text: str, expected: str | None) -> None:
    assert normalize_type(text) == expected


def test_metadata_names_every_fused_onnx_node() -> None:
    assert parse_metadata("[ONNX Layer: conv0][ONNX Layer: relu0]") == ("conv0", "relu0")
    assert parse_metadata("[ONNX Layer: /a/Conv]\x1f[ONNX Layer: /a/Relu]") == ("/a/Conv", "/a/Relu")
    assert parse_metadata("") == ()


def test_tensorrt_10_inspector_json() -> None:
    text = json.dumps({
        "Layers": [
            {"Name": "conv0 + relu0", "LayerType": "CaskConvolution",
             "Inputs": [{"Name": "x", "Location": "Device", "Dimensions": [1, 3, 8, 8],
                         "Format/Datatype": "Int8"}],
             "Outputs": [{"Name": "y", "Location": "Device", "Dimensions": [1, 4, 8, 8],
                          "Format/Datatype": "Half"}],
             "Metadata": "[ONNX Layer: conv0][ONNX Layer: relu0]"},
            {"Name": "gemm", "LayerType": "CaskGemm",
             "Inputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32 format"}],
             "Outputs": [{"Name": "z", "Format/Datatype": "Row major linear FP32 format"}],
             "Metadata": "[ONNX Layer: gemm]"},
        ],
        "Bindings": ["x", "z"],
    })
    layers = layers_from_json(text)
    assert [(layer.onnx_nodes, layer.precision) for layer in layers] == [
        (("conv0", "relu0"), "int8"), (("gemm",), "fp32"),
    ]


def test_tensorrt_11_inspector_json() -> None:
    # 11.x: DataType and Format apart, weights under Constants, I/O Tensors instead of Bindings.
    text = json.dumps({
        "Layers": [
            {"Name": "conv_myl0_1", "LayerType": "correlation",
             "Inputs": [{"Name": "a", "Dimensions": [1, 4, 8, 8], "DataType": "Int8",
                         "Format": "(NHWC) Channel major format"}],
             "Constants": [{"Name": "w", "DataType": "Int8"}, {"Name": "s", "DataType": "Float"}],
             "Outputs": [{"Name": "b", "DataType": "Float"}],
             "Metadata": "[ONNX Layer: conv][ONNX Layer: w_dq]"},
            {"Name": "matmul", "LayerType": "gemm",
             "Inputs": [{"Name": "b", "DataType": "Int8"}],
             "Constants": [{"Name": "w2", "DataType": "Float"}],
             "Outputs": [{"Name": "c", "DataType": "Float"}],
             "Metadata": "[ONNX Layer: matmul]"},
        ],
        "I/O Tensors": [{"Name": "x", "IOMode": "Input", "DataType": "Float"}],
    })
    layers = layers_from_json(text)
    # An int8 activation against float weights is dequantized: that layer computes in fp32.
    assert [(layer.onnx_nodes, layer.precision) for layer in layers] == [
        (("conv", "w_dq"), "int8"), (("matmul",), "fp32"),
    ]


def test_layer_names_only_json_has_no_precision() -> None:
    assert layers_from_json(json.dumps({"Layers": ["conv0 + relu0"], "Bindings": ["x", "y"]})) == []


def test_build_log_lines() -> None:
    log = (
        "Layers:\n"
        "Name: conv_myl0_1, LayerType: correlation, Inputs: [ { Name: a, Dimensions: [1,4,8,8], "
        "Datatype: Half, Format: (NHWC) Channel major format }], Constants: [ { Name: w, Datatype: Half, "
        "Format: (NHWC) Channel major format }], Outputs: [ { Name: y, Datatype: Half, Format: (Linear) "
        "Row major linear format }], TacticName: stub, StreamId: 0, Metadata: [ONNX Layer: conv16]\n"
        "Name: __myl_Move, LayerType: kgen, Inputs: [ { Name: x, Datatype: Float, Format: f }], Constants: [], "
        "Outputs: [ { Name: a, Datatype: Half, Format: f }], TacticName: t, StreamId: 0, Metadata: \n"
    )
    layers = layers_from_log(["unrelated message", log])
    assert [(layer.name, layer.onnx_nodes, layer.precision) for layer in layers] == [
        ("conv_myl0_1", ("conv16",), "fp16"), ("__myl_Move", (), "fp32"),
    ]


# --- what the graph asks for -------------------------------------------------------------------


def test_requests_come_from_the_graph() -> None:
    assert requested_precisions(qdq_conv().to_onnx()) == {"conv": "int8"}
    assert requested_precisions(float16_conv_model().to_onnx()) == {"conv16": "fp16"}
    assert requested_precisions(conv_model().to_onnx()) == {}


def test_a_node_that_runs_wider_than_it_asks_is_missed() -> None:
    layers = layers_from_json(json.dumps({"Layers": [
        {"Name": "l", "Inputs": [{"Format/Datatype": "Float"}], "Metadata": "[ONNX Layer: conv]"},
    ]}))
    report = precision_report(layers, {"conv": "int8", "gone": "fp16"}, "inspector")
    assert report.missed == [("conv", "int8", "fp32")]
    assert report.unmapped == ["gone"]
    assert report.missed_lines() == ["node 'conv' asked for int8, runs in fp32"]
    assert report.to_dict()["missed"] == [{"node": "conv", "asked": "int8", "got": "fp32"}]


# --- real builds ---------------------------------------------------------------------------------


@requires_tensorrt
def test_the_gate_lists_a_half_quantized_conv() -> None:
    backend = TensorRTBackend()
    backend.build_engine(half_quantized_conv())
    report = backend.last_build
    assert report is not None and report.precisions is not None
    assert report.precisions.missed == [("conv", "int8", "fp32")]
    assert "  node 'conv' asked for int8, runs in fp32" in report.lines()


@requires_tensorrt
def test_require_precision_fails_the_build() -> None:
    with pytest.raises(PrecisionGateError, match="node 'conv' asked for int8, runs in fp32"):
        TensorRTBackend(require_precision=True).build_engine(half_quantized_conv())


@requires_tensorrt
def test_require_precision_exits_1_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = save_model(half_quantized_conv(), tmp_path / "half.onnx")
    schedule = tmp_path / "trt.opt"
    schedule.write_text("target tensorrt(require_precision=true)\neliminate_identity\n")
    report = tmp_path / "report.json"
    code = main(["run", str(schedule), str(source), "-o", str(tmp_path / "out.onnx"), "--report", str(report)])
    assert code == 1
    err = capsys.readouterr().err
    assert "asked for int8, runs in fp32" in err and "out.onnx was not written" in err
    # No model or engine; the report is written on every exit, with the failure in it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.onnx", "report.json", "trt.opt"]
    assert "error" in json.loads(report.read_text())


@requires_tensorrt
def test_the_report_holds_the_precisions(tmp_path: Path) -> None:
    source = save_model(qdq_conv(), tmp_path / "q.onnx")
    schedule = tmp_path / "trt.opt"
    schedule.write_text('target tensorrt(precision="int8", require_precision=true)\neliminate_identity\n')
    report = tmp_path / "report.json"
    assert main(["-q", "run", str(schedule), str(source), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    build = data["target_build"]
    assert build["precision_report"]["nodes"]["conv"] == "int8"
    assert build["precision_report"]["missed"] == []
    assert build["engine_bytes"] == (tmp_path / "q.opt.engine").stat().st_size
    assert build["build_seconds"] > 0 and data["seconds"]["target_build"] == build["build_seconds"]


@requires_tensorrt
@pytest.mark.skipif(not GPU, reason="the engine inspector needs the engine loaded, which needs an NVIDIA GPU")
def test_with_a_gpu_the_inspector_gives_the_precisions() -> None:
    backend = TensorRTBackend()
    backend.build_engine(qdq_conv(batch="batch"))
    report = backend.last_build
    assert report is not None and report.precisions is not None
    assert report.precisions.source == "inspector"
    assert report.precisions.realized["conv"] == "int8" and report.precisions.missed == []
