"""quantize(mode="dynamic"): int8 weights for MatMul/Gemm, activations quantized at run time.

The rewrite is DynamicQuantizeLinear + MatMulInteger + Cast + Mul (+ Add for a bias), which ONNX
Runtime fuses into DynamicQuantizeMatMul; no calibration data is needed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers_quant import (
    GOLDEN,
    build,
    checked,
    cosine,
    mlp_model,
    op_counts,
    ort_optimized_ops,
    quantize,
    rand,
    run,
)

from iropt.io.load import load_model


def test_mlp_becomes_integer_matmuls_within_cosine(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    model, weights = mlp_model(rng)
    original = model.copy()
    with caplog.at_level(logging.WARNING):
        result, _ = quantize(model, None, mode="dynamic")
    assert "calibration" not in caplog.text  # nothing to calibrate
    assert result.stats == {"quantized_nodes": 3, "quantized_weights": 3, "kept_float": 0, "quantized_embeddings": 0}
    counts = op_counts(model)
    assert counts["DynamicQuantizeLinear"] == 3 and counts["MatMulInteger"] == 3 and counts["Gemm"] == 0
    checked(model)
    for node in model.graph.nodes:
        if node.op == "MatMulInteger":
            weight = node.inputs[1]
            assert isinstance(weight, gs.Constant) and weight.values.dtype == np.int8
            k, n = weight.values.shape
            # Gemm transB=1 stores W as [N, K]; MatMulInteger wants [K, N].
            assert (n, k) in {w.shape for name, w in weights.items() if name.startswith("w")}
    x = rng.standard_normal((32, 16)).astype(np.float32)
    want, got = run(original, {"x": x})["y"], run(model, {"x": x})["y"]
    assert got.shape == want.shape and cosine(want, got) >= 0.99
    fused = ort_optimized_ops(model)
    assert fused["DynamicQuantizeMatMul"] == 3 and fused["MatMulInteger"] == 0


def test_golden_mlp_stays_within_cosine() -> None:
    model = load_model(GOLDEN / "mlp.onnx")
    inputs = dict(np.load(GOLDEN / "mlp.inputs.npz"))
    outputs = dict(np.load(GOLDEN / "mlp.outputs.npz"))
    quantize(model, None, mode="dynamic")
    checked(model)
    assert op_counts(model)["MatMul"] == 0
    got = run(model, inputs)
    for name, value in outputs.items():
        assert cosine(value, got[name]) >= 0.99
    assert ort_optimized_ops(model)["DynamicQuantizeMatMul"] == 3


def test_one_dynamic_quantization_per_activation() -> None:
    rng = np.random.default_rng(1)
    text = """
g (float[N, 8] x) => (float[N, 6] a, float[N, 5] b) {
  a = MatMul (x, w1)
  b = MatMul (x, w2)
}"""
    model = build(text, {"w1": rand(rng, 8, 6), "w2": rand(rng, 8, 5)})
    original = model.copy()
    quantize(model, None, mode="dynamic")
    assert op_counts(model)["DynamicQuantizeLinear"] == 1 and op_counts(model)["MatMulInteger"] == 2
    x = rng.standard_normal((4, 8)).astype(np.float32)
    want, got = run(original, {"x": x}), run(model, {"x": x})
    assert list(got) == ["a", "b"]
    for name in want:
        assert cosine(want[name], got[name]) >= 0.999


def test_gemm_alpha_beta_and_error_bound() -> None:
    """The result is within the error the two 8-bit quantizations allow."""
    rng = np.random.default_rng(2)
    text = "g (float[N, 8] x) => (float[N, 6] y) { y = Gemm <alpha = 0.5, beta = 2.0> (x, w, b) }"
    w, b = rand(rng, 8, 6), rand(rng, 6)
    model = build(text, {"w": w, "b": b})
    quantize(model, None, mode="dynamic")
    (stored,) = [n.inputs[1].values for n in model.graph.nodes if n.op == "MatMulInteger"]
    assert np.abs(stored.astype(int)).max() == 63  # 7-bit: no int16 saturation on any x86 CPU
    x = rng.standard_normal((5, 8)).astype(np.float32)
    got = run(model, {"x": x})["y"]
    want = 0.5 * (x.astype(np.float64) @ w) + 2.0 * b
    # DynamicQuantizeLinear: uint8 over [min(x, 0), max(x, 0)]; weights: int8, max|w_col| / 63.
    sx = (max(x.max(), 0) - min(x.min(), 0)) / 255
    sw = np.abs(w).max(axis=0) / 63
    bound = 0.5 * (np.abs(x) @ np.broadcast_to(sw / 2, w.shape) + (np.abs(w) * sx / 2).sum(axis=0) + 8 * sx * sw / 4)
    assert np.all(np.abs(got - want) <= bound + 1e-5)


def test_transposed_activation_and_excluded_nodes_stay_float() -> None:
    rng = np.random.default_rng(3)
    text = """
g (float[8, N] x, float[M, 8] z) => (float[N, 6] y, float[M, 6] u) {
  y = Gemm <transA = 1> (x, w)
  u = MatMul (z, w2)
}"""
    model = build(text, {"w": rand(rng, 8, 6), "w2": rand(rng, 8, 6)})
    model.graph.nodes[1].name = "keep_me"
    result, _ = quantize(model, None, mode="dynamic", exclude_nodes=["keep*"])
    assert not result.changed and op_counts(model)["MatMulInteger"] == 0
