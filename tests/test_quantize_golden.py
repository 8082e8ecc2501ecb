"""quantize on the golden models: accuracy of digits_cnn, output cosine of the conv models.

digits_cnn is calibrated on its calibration split and judged on its held-out test split: top-1
accuracy within 0.3 points of the float model's (both computed here). The other conv models
are calibrated on generated standard-normal inputs (their golden inputs are drawn the same way)
and compared with their stored golden outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers_quant import GOLDEN, checked, cosine, ort_optimized_ops, quantize, run, write_feeds

from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.io.load import load_model
from iropt.ir.model import Model

CONV_MODELS = ["resnet", "mobilenet", "unet", "conv_bn"]


def _accuracy(model: Model, test: dict[str, np.ndarray]) -> float:
    (logits,) = run(model, {"input": test["input"]}).values()
    return float(np.mean(logits.argmax(axis=-1) == test["label"]))


@pytest.mark.parametrize("fmt", ["ort", "tensorrt"])
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_digits_accuracy_within_a_third_of_a_point(fmt: str, method: str) -> None:
    test = dict(np.load(GOLDEN / "digits_cnn.test.npz"))
    model = load_model(GOLDEN / "digits_cnn.onnx")
    float_accuracy = _accuracy(model, test)
    result, _ = quantize(model, str(GOLDEN / "digits_cnn.calib.npz"), format=fmt, method=method)
    checked(model)
    assert result.stats["calibration_samples"] == len(np.load(GOLDEN / "digits_cnn.calib.npz")["input"])
    assert abs(_accuracy(model, test) - float_accuracy) <= 0.003


def _generated_calibration(tmp_path: Path, name: str, rows: int = 32) -> str:
    inputs = np.load(GOLDEN / f"{name}.inputs.npz")
    feeds = {
        key: np.random.default_rng(1).standard_normal((rows, *value.shape[1:])).astype(np.float32)
        for key, value in inputs.items()
    }
    return write_feeds(tmp_path, feeds)


@pytest.mark.parametrize("fmt", ["ort", "tensorrt"])
@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_models_keep_their_outputs(tmp_path: Path, name: str, fmt: str) -> None:
    model = load_model(GOLDEN / f"{name}.onnx")
    result, _ = quantize(model, _generated_calibration(tmp_path, name), format=fmt)
    checked(model)
    assert result.stats["quantized_nodes"] > 0
    outputs = run(model, dict(np.load(GOLDEN / f"{name}.inputs.npz")))
    for key, value in np.load(GOLDEN / f"{name}.outputs.npz").items():
        assert cosine(value, outputs[key]) >= 0.99, key


def test_resnet_runs_as_qlinear_ops_in_onnx_runtime(tmp_path: Path) -> None:
    """With BatchNormalization folded first, ORT fuses every quantized conv into QLinearConv."""
    model = load_model(GOLDEN / "resnet.onnx")
    ctx = PassContext()
    for name in ("fuse_bn_conv", "eliminate_dead_code"):
        create_pass(name, {}).run(model, ctx)
    result, _ = quantize(model, _generated_calibration(tmp_path, "resnet"))
    fused = ort_optimized_ops(model)
    convs = sum(1 for n in model.graph.nodes if n.op == "Conv")
    assert result.stats["skipped_slow"] == 1  # the 3-channel stem conv
    assert fused["QLinearConv"] == convs - 1 and fused["QLinearAdd"] == 3 and fused["QGemm"] == 1
    assert fused["QLinearGlobalAveragePool"] == 1 and fused["Relu"] == 0
    outputs = run(model, dict(np.load(GOLDEN / "resnet.inputs.npz")), optimized=True)
    for key, value in np.load(GOLDEN / "resnet.outputs.npz").items():
        assert cosine(value, outputs[key]) >= 0.99


@pytest.mark.parametrize("name", ["conv_bn", "digits_cnn", "transformer"])
def test_fused_int8_kernels_compute_what_the_qdq_model_says(name: str) -> None:
    """ORT's QLinearConv/QGemm (optimizations on) agree with the QDQ model as written.

    Full-range int8 weights broke this on x86 CPUs without VNNI (cosine 0.996 for conv_bn and
    digits_cnn, 0.998 for the transformer): their u8s8 kernels add pairs of products in int16,
    which saturates. 7-bit weights cannot saturate there, so the fused model matches everywhere.
    """
    model = load_model(GOLDEN / f"{name}.onnx")
    inputs = dict(np.load(GOLDEN / f"{name}.inputs.npz"))
    calibration = GOLDEN / f"{name}.calib.npz"
    quantize(model, str(calibration if calibration.exists() else GOLDEN / f"{name}.inputs.npz"),
             skip_slow_layers=False)
    assert _largest_int8_weight(model) == 63
    as_written, fused = run(model, inputs), run(model, inputs, optimized=True)
    for key, value in as_written.items():
        assert cosine(value, fused[key]) >= 0.9999, key


def test_full_range_weights_on_request_and_for_tensorrt() -> None:
    for options in ({"weight_range": "full"}, {"format": "tensorrt"}):
        model = load_model(GOLDEN / "conv_bn.onnx")
        quantize(model, str(GOLDEN / "conv_bn.inputs.npz"), skip_slow_layers=False, **options)
        assert _largest_int8_weight(model) == 127, options


def _largest_int8_weight(model: Model) -> int:
    weights = [
        n.inputs[0].values for n in model.graph.nodes
        if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant) and n.inputs[0].values.dtype == np.int8
    ]
    assert weights
    return max(int(np.abs(w.astype(int)).max()) for w in weights)
