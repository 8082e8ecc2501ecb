"""low_rank: exactness at full rank, error bounds that hold as equalities, the graph forms, the rules.

Models are small ONNX graphs run in ONNX Runtime (helpers_quant). Inputs are correlated on
purpose (a random mixing of a few strong directions), which is where whitening matters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers_quant import build, checked, rand, run, write_feeds

from iropt.compress.lowrank.engine import apply_rank, plan_layer
from iropt.compress.lowrank.factorize import plain_spectrum, whitening
from iropt.compress.lowrank.layers import Layer, find_layer
from iropt.compress.lowrank.moments import Moments
from iropt.dsl import load_schedule
from iropt.errors import OptionError
from iropt.infra.pass_base import PassContext, PassResult
from iropt.infra.pass_manager import PassManager
from iropt.infra.registry import create_pass
from iropt.ir.graph import fresh_names
from iropt.ir.model import Model

LOG = logging.getLogger("iropt.test_low_rank")


def correlated(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Inputs whose last axis mixes 4 strong and many weak directions."""
    width = shape[-1]
    mixing = rng.standard_normal((width, width)) * np.r_[np.full(4, 3.0), np.full(width - 4, 0.2)][:, None]
    return (rng.standard_normal(shape) @ mixing).astype(np.float32)


def low_rank(model: Model, calibration: str | None = None, **options: Any) -> PassResult:
    pass_ = create_pass("low_rank", {"min_params": 0, **options})
    return pass_.run(model, PassContext(calibration=calibration, log=LOG))


def relative_error(model: Model, reference: Model, feeds: dict[str, np.ndarray]) -> float:
    out = next(iter(run(model, feeds).values()))
    ref = next(iter(run(reference, feeds).values()))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def matmul_model(rng: np.random.Generator, k: int = 32, n: int = 48) -> Model:
    return build(
        f"agraph (float[B, {k}] x) => (float[B, {n}] y) {{ y = MatMul(x, w) }}", {"w": rand(rng, k, n)}
    )


def full_rank_matches(model: Model, feeds: dict[str, np.ndarray], conv_method: str = "channel") -> None:
    """Factorize every layer at full rank with the library and compare with the original."""
    reference = model.copy()
    names = fresh_names([model.graph])
    for node in list(model.graph.nodes):
        layer = find_layer(node)
        if isinstance(layer, Layer):
            plan = plan_layer(layer, conv_method, None)  # type: ignore[arg-type]
            apply_rank(model.graph, plan, plan.full(), names, None)
    checked(model)
    for name, value in run(reference, feeds).items():
        np.testing.assert_allclose(run(model, feeds)[name], value, rtol=1e-4, atol=1e-4)


# --- exactness and bounds ----------------------------------------------------------------


def test_full_rank_is_exact_for_matmul_gemm_and_conv() -> None:
    rng = np.random.default_rng(0)
    model = build(
        """
        agraph (float[2, 3, 9, 9] x) => (float[2, 5] y) {
            c1 = Conv <strides = [2, 1], pads = [1, 0, 2, 1], dilations = [1, 2]> (x, w1, b1)
            f = Flatten(c1)
            g = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (f, w2, b2)
            y = MatMul(g, w3)
        }
        """,
        {"w1": rand(rng, 6, 3, 3, 3), "b1": rand(rng, 6), "w2": rand(rng, 7, 6 * 5 * 6),
         "b2": rand(rng, 7), "w3": rand(rng, 7, 5)},
    )
    feeds = {"x": rand(rng, 2, 3, 9, 9)}
    for method in ("channel", "spatial", "tucker"):
        full_rank_matches(model.copy(), feeds, method)


def test_svd_weight_error_equals_the_discarded_singular_values() -> None:
    rng = np.random.default_rng(1)
    model = matmul_model(rng)
    weight = np.asarray(model.graph.nodes[0].inputs[1].values, dtype=np.float64)
    result = low_rank(model, method="svd", rank=8, min_saving=0.0)
    (report,) = result.info["layers"]
    a, b = (np.asarray(n.inputs[1].values, dtype=np.float64) for n in model.graph.nodes)
    s = np.linalg.svd(weight, compute_uv=False)
    bound = np.sqrt(np.sum(s[8:] ** 2) / np.sum(s**2))
    measured = np.linalg.norm(weight - a @ b) / np.linalg.norm(weight)
    assert report["rank"] == [8] and report["error_kind"] == "weight"
    assert measured == pytest.approx(bound, rel=1e-5)
    assert report["predicted_error"] == pytest.approx(bound, rel=1e-9)
    assert report["energy"] == pytest.approx(1 - bound**2, rel=1e-9)


def test_whitened_output_error_on_calibration_data_equals_the_bound(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    model = matmul_model(rng)
    x = correlated(rng, 512, 32)
    calibration = write_feeds(tmp_path, {"x": x})
    reference = model.copy()
    result = low_rank(model, calibration, rank=8, damping=0.0, min_saving=0.0)
    (report,) = result.info["layers"]
    measured = relative_error(model, reference, {"x": x})
    # With no damping the dropped whitened singular values are the output error itself.
    plan = plan_layer(find_layer(reference.graph.nodes[0]), "channel", whitening(_moments(x).second, 0.0))  # type: ignore[arg-type]
    bound = np.sqrt(1.0 - plan.energy((8,)))
    assert report["error_kind"] == "output"
    assert measured == pytest.approx(report["predicted_error"], rel=1e-3)
    assert measured == pytest.approx(bound, rel=1e-3)
    # Plain SVD at the same rank does worse on the same data.
    svd = reference.copy()
    low_rank(svd, method="svd", rank=8, min_saving=0.0)
    assert relative_error(svd, reference, {"x": x}) > 1.5 * measured


def _moments(x: np.ndarray) -> Moments:
    moments = Moments(x.shape[-1])
    moments.add(x.reshape(-1, x.shape[-1]))
    return moments


def test_whitened_conv_prediction_matches_the_measured_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = build(
        """
        agraph (float[N, 8, 10, 10] x) => (float[N, 24, 5, 5] y) {
            y = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (x, w, b)
        }
        """,
        {"w": rand(rng, 24, 8, 3, 3), "b": rand(rng, 24)},
    )
    x = np.moveaxis(correlated(rng, 16, 10, 10, 8), -1, 1).copy()
    reference = model.copy()
    result = low_rank(model, write_feeds(tmp_path, {"x": x}), rank=8, damping=0.0, min_saving=0.0)
    (report,) = result.info["layers"]
    assert [n.op for n in model.graph.nodes] == ["Conv", "Conv"]
    assert report["predicted_error"] == pytest.approx(relative_error(model, reference, {"x": x}), rel=1e-3)


def test_batched_matmul_and_gemm_attributes(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = build(
        """
        agraph (float[2, 6, 32] x, float[40, 12] a) => (float[2, 6, 24] y, float[12, 16] z) {
            y = MatMul(x, w)
            z = Gemm <transA = 1, transB = 1, alpha = 0.5, beta = 2.0> (a, v, c)
        }
        """,
        {"w": rand(rng, 32, 24), "v": rand(rng, 16, 40), "c": rand(rng, 1, 16)},
    )
    feeds = {"x": correlated(rng, 2, 6, 32), "a": correlated(rng, 12, 40).T.copy()}
    reference = model.copy()
    result = low_rank(model, write_feeds(tmp_path, feeds), rank=8, damping=0.0, min_saving=0.0)
    assert [n.op for n in model.graph.nodes] == ["MatMul", "MatMul", "Gemm", "Gemm"]
    assert model.graph.nodes[2].attrs["transA"] == 1 and model.graph.nodes[3].attrs["beta"] == 2.0
    proto = checked(model)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    outputs, expected = run(model, feeds), run(reference, feeds)
    for report, name in zip(result.info["layers"], ("y", "z"), strict=True):
        # The Gemm's error is relative to its output with the bias (beta * C) included.
        measured = np.linalg.norm(outputs[name] - expected[name]) / np.linalg.norm(expected[name])
        assert report["predicted_error"] == pytest.approx(measured, rel=1e-3)


def test_spatial_and_tucker_forms_keep_the_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    model = build(
        """
        agraph (float[N, 16, 11, 11] x) => (float[N, 32, 6, 4] y) {
            y = Conv <strides = [2, 2], pads = [1, 0, 2, 1], dilations = [1, 2]> (x, w, b)
        }
        """,
        {"w": rand(rng, 32, 16, 3, 3), "b": rand(rng, 32)},
    )
    x = rand(rng, 4, 16, 11, 11)
    calibration = write_feeds(tmp_path, {"x": x})
    for method, ops, kernels in (
        ("spatial", ["Conv", "Conv"], [[3, 1], [1, 3]]),
        ("tucker", ["Conv", "Conv", "Conv"], [[1, 1], [3, 3], [1, 1]]),
    ):
        candidate = model.copy()
        result = low_rank(candidate, calibration, conv_method=method, rank=8)
        assert [n.op for n in candidate.graph.nodes] == ops
        assert [n.attrs["kernel_shape"] for n in candidate.graph.nodes] == kernels
        (report,) = result.info["layers"]
        assert report["form"] == method and report["params_after"] < report["params_before"]
        proto = checked(candidate)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        assert report["predicted_error"] == pytest.approx(relative_error(candidate, model, {"x": x}), rel=1e-3)


# --- what is left alone ------------------------------------------------------------------


def test_grouped_conv_and_layers_that_save_nothing_are_left_alone() -> None:
    rng = np.random.default_rng(6)
    model = build(
        """
        agraph (float[1, 8, 6, 6] x, float[1, 4] a) => (float[1, 8, 6, 6] y, float[1, 4] z) {
            y = Conv <group = 2, pads = [1, 1, 1, 1]> (x, w)
            z = MatMul(a, v)
        }
        """,
        {"w": rand(rng, 8, 4, 3, 3), "v": rand(rng, 4, 4)},
    )
    before = model.to_onnx().SerializeToString()
    result = low_rank(model, rank=8)
    assert not result.changed and result.info["layers"] == []
    reasons = list(result.info["skipped"].values())
    assert any("grouped Conv (group=2)" in reason for reason in reasons), reasons
    assert model.to_onnx().SerializeToString() == before


def test_min_params_exclusions_and_min_saving() -> None:
    rng = np.random.default_rng(7)
    model = build(
        """
        agraph (float[B, 64] x) => (float[B, 64] y) {
            h = MatMul(x, w1)
            y = MatMul(h, w2)
        }
        """,
        {"w1": rand(rng, 64, 64), "w2": rand(rng, 64, 64)},
    )
    model.graph.nodes[0].name, model.graph.nodes[1].name = "first", "second"
    result = low_rank(model.copy(), rank=8, exclude_nodes=["fir*"])
    assert [r["layer"] for r in result.info["layers"]] == ["second (MatMul)"]
    assert not low_rank(model.copy(), rank=8, min_params=5000).changed
    # Rank 24 keeps 24 * 128 = 3072 of 4096 weights: saves 25%, not the 30% asked.
    assert not low_rank(model.copy(), rank=24, min_saving=0.3).changed
    assert low_rank(model.copy(), rank=24, min_saving=0.2).changed


# --- rank rules --------------------------------------------------------------------------


def test_params_ratio_spends_the_budget_where_the_error_is_least(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    low = rand(rng, 64, 8) @ rand(rng, 8, 64) + rand(rng, 64, 64, scale=0.01)  # nearly rank 8
    model = build(
        """
        agraph (float[B, 64] x) => (float[B, 64] y, float[B, 64] z) {
            y = MatMul(x, easy)
            z = MatMul(x, hard)
        }
        """,
        {"easy": low, "hard": rand(rng, 64, 64)},
    )
    calibration = write_feeds(tmp_path, {"x": correlated(rng, 256, 64)})
    result = low_rank(model.copy(), calibration, params_ratio=0.6)
    reports = {r["layer"].split()[0]: r for r in result.info["layers"]}
    assert result.stats["params_after"] <= 0.6 * result.stats["params_before"]
    assert reports["y"]["rank"] == [8]  # the nearly low-rank weight gives first
    uniform = low_rank(model.copy(), calibration, params_ratio=0.6, allocation="uniform")
    assert {tuple(r["rank"]) for r in uniform.info["layers"]} == {(16,)}


def test_energy_and_rank_ratio_rules_round_to_multiples_of_eight(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    model = matmul_model(rng, 64, 64)
    result = low_rank(model.copy(), energy=0.5, min_saving=0.0)
    (report,) = result.info["layers"]
    assert report["rank"][0] % 8 == 0 and report["energy"] >= 0.5
    spectrum = plain_spectrum(np.asarray(model.graph.nodes[0].inputs[1].values, dtype=np.float64))
    assert spectrum.energy(report["rank"][0] - 8) < 0.5
    (by_ratio,) = low_rank(model.copy(), rank_ratio=0.2, min_saving=0.0).info["layers"]
    assert by_ratio["rank"] == [16]  # 0.2 * 64 = 12.8, rounded up to 16


def test_options_are_checked() -> None:
    with pytest.raises(OptionError, match="one of"):
        create_pass("low_rank", {"rank": 8, "energy": 0.9})
    with pytest.raises(OptionError, match="params_ratio"):
        create_pass("low_rank", {"params_ratio": 1.5})
    with pytest.raises(OptionError, match="exclude_op_types"):
        create_pass("low_rank", {"exclude_op_types": ["Relu"]})


def two_layer_mlp(rng: np.random.Generator, k: int, hidden: int, n: int) -> Model:
    return build(
        f"""
        agraph (float[B, {k}] x) => (float[B, {n}] y) {{
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2)
        }}
        """,
        {"w1": rand(rng, k, hidden), "w2": rand(rng, hidden, n)},
    )


def test_refit_does_not_worsen_the_network_output(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    model = two_layer_mlp(rng, 48, 96, 48)
    x = correlated(rng, 512, 48)
    calibration = write_feeds(tmp_path, {"x": x})
    plain, refitted = model.copy(), model.copy()
    low_rank(plain, calibration, rank=16)
    result = low_rank(refitted, calibration, rank=16, refit=True)
    assert result.stats["refitted"] == 2
    assert relative_error(refitted, model, {"x": x}) <= relative_error(plain, model, {"x": x}) + 1e-6


def test_low_rank_then_quantize_in_one_schedule(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    model = two_layer_mlp(rng, 64, 64, 32)
    x = correlated(rng, 64, 64)
    calibration = write_feeds(tmp_path, {"x": x})
    schedule = tmp_path / "lr_int8.opt"
    schedule.write_text('low_rank(rank=16, min_params=0)\nquantize(placement="rules")\n')
    reference = model.copy()
    report = PassManager().run(model, load_schedule(str(schedule)), PassContext(calibration=calibration, log=LOG))
    assert [r.name for r in report.records] == ["low_rank", "quantize"]
    assert report.records[0].stats["factorized"] == 2
    ops = [n.op for n in model.graph.nodes]
    assert ops.count("MatMul") == 4 and "QuantizeLinear" in ops
    checked(model)
    out, ref = run(model, {"x": x})["y"], run(reference, {"x": x})["y"]
    cosine = float(np.sum(out * ref) / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cosine > 0.9
