"""quantize(sensitivity=true): rank layers by the harm each does alone, keep the worst in float.

The test model has one layer that quantization ruins: `fc2` has a huge weight on an input unit
that is always 0 (fc1's bias switches that unit off). The weight does nothing in float, but
per-channel int8 scales it sets make every other weight of fc2 round to zero.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers_quant import checked, cosine, mlp_model, quantize, run, write_feeds

from iropt.compress.sensitivity import analyze_fast, score
from iropt.ir.model import Model


def _fragile_mlp() -> Model:
    model, _ = mlp_model(np.random.default_rng(0), sizes=(16, 32, 32, 8))
    tensors = model.graph.tensors()
    tensors["b1"].values[0] = -100.0  # unit 0 of fc1 is never active
    tensors["w2"].values[:, 0] = 1000.0  # fc2 (transB: [out, in]) leans on that dead unit
    return model


def _calibration(tmp_path: Path, rows: int = 48) -> tuple[str, dict[str, np.ndarray]]:
    feeds = {"x": np.random.default_rng(1).standard_normal((rows, 16)).astype(np.float32)}
    return write_feeds(tmp_path, feeds), feeds


def _fc2_is_float(model: Model) -> bool:
    fc2 = next(n for n in model.graph.nodes if n.name == "fc2")
    return isinstance(fc2.inputs[1], gs.Constant) and fc2.inputs[1].values.dtype == np.float32


@pytest.mark.parametrize("fmt", ["ort", "tensorrt"])
def test_the_harmful_layer_is_kept_in_float(tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    spec, feeds = _calibration(tmp_path)
    original = _fragile_mlp()
    want = run(original, feeds)["y"]

    plain = _fragile_mlp()
    quantize(plain, spec, format=fmt)
    assert cosine(want, run(plain, feeds)["y"]) < 0.9  # the layer really is harmful

    model = _fragile_mlp()
    with caplog.at_level(logging.INFO, logger="iropt.test_quantize"):
        result, _pass = quantize(model, spec, format=fmt, sensitivity=True, target_metric="cosine", target_min=0.995)
    checked(model)
    assert result.stats["kept_float"] == 1 and result.stats["quantized_nodes"] == 2
    assert result.info["kept_float"] == ["fc2 (Gemm)"]
    assert result.info["ranking"][0]["layer"] == "fc2 (Gemm)"
    # Worst first: the few measured alone by that measure, ahead of the rest by added noise.
    ranking = result.info["ranking"]
    alone = [item["alone"] for item in ranking if "alone" in item]
    assert alone == sorted(alone) and all("alone" in item for item in ranking[: len(alone)])
    rest = [item["score"] for item in ranking[len(alone):]]
    assert rest == sorted(rest)
    assert _fc2_is_float(model)
    assert cosine(want, run(model, feeds)["y"]) >= 0.995
    assert "sensitivity ranking" in caplog.text and "kept in float: fc2 (Gemm)" in caplog.text


def test_top1_target(tmp_path: Path) -> None:
    spec, feeds = _calibration(tmp_path)
    original = _fragile_mlp()
    model = _fragile_mlp()
    result, _pass = quantize(model, spec, sensitivity=True, target_metric="top1", target_min=0.95)
    assert result.info["kept_float"] == ["fc2 (Gemm)"] and result.stats["kept_float"] == 1
    want, got = run(original, feeds)["y"], run(model, feeds)["y"]
    assert np.mean(want.argmax(-1) == got.argmax(-1)) >= 0.95


def test_a_harmless_model_keeps_nothing_in_float(tmp_path: Path) -> None:
    spec, _ = _calibration(tmp_path)
    model, _ = mlp_model(np.random.default_rng(2))
    result, _pass = quantize(model, spec, sensitivity=True, target_metric="snr", target_min=20.0)
    assert result.stats["kept_float"] == 0 and result.info["kept_float"] == []
    assert len(result.info["ranking"]) == 3


def test_dynamic_mode_sensitivity(tmp_path: Path) -> None:
    spec, feeds = _calibration(tmp_path)
    original = _fragile_mlp()
    model = _fragile_mlp()
    result, _pass = quantize(model, spec, mode="dynamic", sensitivity=True, target_min=0.995)
    assert result.info["kept_float"] == ["fc2 (Gemm)"] and result.stats["quantized_nodes"] == 2
    assert _fc2_is_float(model)
    assert cosine(run(original, feeds)["y"], run(model, feeds)["y"]) >= 0.995


def test_score_is_the_worst_output() -> None:
    reference = [{"a": np.array([[1.0, 2.0]]), "b": np.array([[1.0, 0.0]])}]
    candidate = [{"a": np.array([[1.0, 2.0]]), "b": np.array([[0.0, 1.0]])}]
    assert score(reference, candidate, "cosine") == 0.0
    assert score(reference, candidate, "top1") == 0.0
    assert score(reference, reference, "snr") == float("inf")


def test_fast_and_exhaustive_rankings_keep_the_same_layer_and_fast_runs_fewer_models(tmp_path: Path) -> None:
    spec, _ = _calibration(tmp_path)
    runs = {}
    for ranking in ("fast", "exhaustive"):
        model = _fragile_mlp()
        result, _pass = quantize(model, spec, sensitivity=True, sensitivity_ranking=ranking,
                                 sensitivity_refine=1, target_min=0.995)
        assert result.info["kept_float"] == ["fc2 (Gemm)"] and _fc2_is_float(model)
        runs[ranking] = result.info["model_runs"]
    assert runs["fast"] < runs["exhaustive"]


def test_fast_search_stops_at_the_fewest_float_layers_in_logarithmic_runs() -> None:
    """20 layers, the 5 noisiest must stay float: found with the refined few plus O(log n) runs."""
    layers = [(f"k{i}", f"layer{i}") for i in range(20)]
    noise_db = {f"k{i}": float(i) for i in range(20)}  # k0 is the noisiest
    harmful = {f"k{i}" for i in range(5)}
    calls = []

    def evaluate(only: frozenset[str] | None, floats: frozenset[str]) -> float:
        calls.append((only, floats))
        quantized = set(noise_db) if only is None else set(only)
        return 1.0 - 0.01 * len((quantized - floats) & harmful)

    result = analyze_fast(layers, noise_db, evaluate, target_min=0.999, refine=2)
    assert result.met and {item.key for item in result.kept_float} == harmful
    assert [item.key for item in result.ranking[:5]] == ["k0", "k1", "k2", "k3", "k4"]
    assert len(calls) <= 2 + 1 + 2 * 5  # refined + all quantized + doubling and bisection over 20
