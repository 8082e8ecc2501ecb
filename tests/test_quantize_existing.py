"""Models that arrive quantized: `default` keeps their Q/DQ, `quantize` leaves quantized parts alone.

The quantized inputs are made by ONNX Runtime's own `quantize_static` (QDQ, per-channel, what
other tools export) and by iropt's `quantize` with one layer excluded (a partly quantized model).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_quant import GOLDEN, cosine, mlp_model, op_counts, quantize, run, write_feeds
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from iropt.dsl import load_schedule
from iropt.infra.pass_base import PassContext
from iropt.infra.pass_manager import PassManager
from iropt.io.load import load_model


class _Rows(CalibrationDataReader):
    def __init__(self, rows: np.ndarray) -> None:
        self.batches = iter([{"input": rows[i : i + 8]} for i in range(0, len(rows), 8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _ort_qdq_digits(tmp_path: Path) -> Path:
    calibration = np.load(GOLDEN / "digits_cnn.calib.npz")["input"][:32]
    out = tmp_path / "digits_qdq.onnx"
    quantize_static(str(GOLDEN / "digits_cnn.onnx"), str(out), _Rows(calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def test_default_keeps_a_qdq_model_as_it_was(tmp_path: Path) -> None:
    path = _ort_qdq_digits(tmp_path)
    model = load_model(path)
    before = op_counts(model)
    inputs = dict(np.load(GOLDEN / "digits_cnn.inputs.npz"))
    want = run(model.copy(), inputs)
    PassManager().run(model, load_schedule("default"), PassContext())
    assert op_counts(model) == before  # no DequantizeLinear folded into a float weight
    got = run(model, inputs)
    np.testing.assert_array_equal(got["logits"], want["logits"])


def test_quantize_leaves_a_qdq_model_alone_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = load_model(_ort_qdq_digits(tmp_path))
    before = op_counts(model)
    with caplog.at_level(logging.INFO):
        result, _ = quantize(model, str(GOLDEN / "digits_cnn.calib.npz"))
    assert op_counts(model) == before and result.stats.get("quantized_nodes", 0) == 0
    # Every Conv and the Gemm read DequantizeLinear weights; ORT's QDQ also wraps BN and pools.
    anchors = {n.name for n in model.graph.nodes if n.op in ("Conv", "Gemm")}
    assert len(anchors) == 4 and anchors <= set(result.info["already_quantized"])
    assert "quantized already" in caplog.text


def test_a_partly_quantized_model_gets_only_its_float_layers_quantized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model, _ = mlp_model(rng)
    original = model.copy()
    calibration = write_feeds(tmp_path, {"x": rng.standard_normal((64, 16)).astype(np.float32)})
    quantize(model, calibration, exclude_nodes=["fc2"])
    first = {n.name: n for n in model.graph.nodes if n.op == "DequantizeLinear"}
    result, _ = quantize(model, calibration)
    assert result.stats["quantized_nodes"] >= 1
    assert {"fc1", "fc3"} <= set(result.info["already_quantized"])
    # The first pass's DequantizeLinear nodes are all still there, none quantized twice.
    after = {n.name: n for n in model.graph.nodes if n.op == "DequantizeLinear"}
    assert set(first) <= set(after)
    weights = [n for n in model.graph.nodes if n.op == "DequantizeLinear" and n.outputs[0].outputs
               and n.outputs[0].outputs[0].op == "Gemm" and n.outputs[0].outputs[0].inputs[1] is n.outputs[0]]
    assert sorted(n.outputs[0].outputs[0].name for n in weights) == ["fc1", "fc2", "fc3"]
    x = rng.standard_normal((8, 16)).astype(np.float32)
    assert cosine(run(original, {"x": x})["y"], run(model, {"x": x})["y"]) >= 0.99
