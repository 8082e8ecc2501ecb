"""Sensitivity analysis on one emulation model: Q/DQ behind run-time switches, trials as runs.

The emulation is checked against the real thing in ONNX Runtime: every switch off gives the
float model's outputs, every switch on gives the QDQ rewrite's, and the switches of any
sub-plan give that sub-plan's rewrite. The fast search is checked on a model where one layer
is made harmful on purpose, and with the emulation unavailable (the rebuild fallback).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers_quant import GOLDEN, cosine, mlp_model, quantize, run, write_feeds

from iropt.compress.calibration import collect_statistics
from iropt.compress.quant.emulation import SWITCHES, Emulation, NotEmulated, build_emulation
from iropt.compress.quant.params import SCHEMES
from iropt.compress.quant.placement import DEFAULT_OP_TYPES, Plan, plan_quantization, tensor_types
from iropt.compress.quant.rewrite import insert_qdq
from iropt.compress.quant.trials import first_rows
from iropt.compress.sensitivity import (
    LayerScore,
    SensitivityResult,
    accepted_width,
    analyze,
    continue_search,
    fewest_below,
    grow_until_met,
    search_rows,
    tightened,
)
from iropt.io.load import load_model
from iropt.ir.model import Model
from iropt.ir.toposort import sorted_nodes
from iropt.passes.quantize import group_params
from iropt.verify.runtime import reference_runner


class _Setup:
    """A model's full plan and calibrated parameters, and the real rewrite of any sub-plan."""

    def __init__(self, model: Model, feeds: dict[str, np.ndarray], fmt: str) -> None:
        self.model = model
        self.feeds = feeds
        self.scheme = SCHEMES[fmt]
        self.dtypes = tensor_types(model)
        plan = self.plan_of(model)
        stats = collect_statistics(model, list(plan.tensors), [feeds], reference_runner, histograms=False)
        self.params = group_params(plan, stats, self.scheme, "minmax", 99.99)
        self.keys = [c.key for c in plan.nodes]

    def plan_of(self, model: Model, only: frozenset[str] | None = None) -> Plan:
        return plan_quantization(model.graph, self.scheme, op_types=DEFAULT_OP_TYPES,
                                 excluded=lambda node, key: False, dtypes=self.dtypes, only=only)

    def emulation(self, observed: Collection[str] | None = None) -> Emulation:
        target = self.model.copy()
        return build_emulation(target, self.plan_of(target), self.params, self.scheme, observed)

    def rewritten(self, only: frozenset[str] | None = None) -> dict[str, np.ndarray]:
        target = self.model.copy()
        insert_qdq(target.graph, self.plan_of(target, only), self.params, self.scheme)
        target.graph.nodes = sorted_nodes(target.graph)
        return run(target, self.feeds)


def _golden(name: str) -> tuple[Model, dict[str, np.ndarray]]:
    feeds = dict(np.load(GOLDEN / f"{name}.inputs.npz"))
    rows = np.random.default_rng(0).standard_normal((8, *feeds["input"].shape[1:])).astype(np.float32)
    return load_model(GOLDEN / f"{name}.onnx"), {"input": rows}


def _emulated(emulation: Emulation, feeds: dict[str, np.ndarray], quantized: set[str]) -> dict[str, np.ndarray]:
    return run(emulation.model, {**feeds, SWITCHES: emulation.switches(quantized)})


# observed None: every quantized tensor keeps its name; (): only what the outputs need.
@pytest.mark.parametrize("observed", [None, ()])
@pytest.mark.parametrize(("name", "fmt"), [("resnet", "ort"), ("unet", "ort"), ("resnet", "tensorrt")])
def test_switches_off_is_the_float_model_and_on_is_the_rewrite(name: str, fmt: str, observed: tuple | None) -> None:
    model, feeds = _golden(name)
    setup = _Setup(model, feeds, fmt)
    emulation = setup.emulation(observed)
    assert emulation.keys == tuple(setup.keys) and len(emulation.keys) > 3
    want = run(model, feeds)
    off = _emulated(emulation, feeds, set())
    real = setup.rewritten()
    on = _emulated(emulation, feeds, set(emulation.keys))
    for output in want:
        np.testing.assert_allclose(off[output], want[output], rtol=0, atol=1e-6)
        np.testing.assert_allclose(on[output], real[output], rtol=1e-5, atol=1e-5)
        assert cosine(want[output], on[output]) < 1 - 1e-7  # quantization does change the outputs


@pytest.mark.parametrize("observed", [None, ()])
def test_one_switch_is_that_layer_alone(observed: tuple | None) -> None:
    model, feeds = _golden("resnet")
    setup = _Setup(model, feeds, "ort")
    emulation = setup.emulation(observed)
    want = run(model, feeds)
    for key in setup.keys[:: max(1, len(setup.keys) // 4)]:
        alone = setup.plan_of(model, frozenset({key}))
        switched = {c.key for c in alone.nodes}
        assert switched == {key}
        got, real = _emulated(emulation, feeds, switched), setup.rewritten(frozenset({key}))
        for output in want:
            np.testing.assert_allclose(got[output], real[output], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("observed", [None, ()])
def test_a_sub_plan_with_layers_in_float_matches_its_rewrite(observed: tuple | None) -> None:
    model, feeds = _golden("unet")
    setup = _Setup(model, feeds, "ort")
    emulation = setup.emulation(observed)
    floats = set(setup.keys[1::3])
    target = model.copy()
    plan = plan_quantization(target.graph, setup.scheme, op_types=DEFAULT_OP_TYPES,
                             excluded=lambda node, key: key in floats, dtypes=setup.dtypes)
    insert_qdq(target.graph, plan, setup.params, setup.scheme)
    target.graph.nodes = sorted_nodes(target.graph)
    real = run(target, feeds)
    got = _emulated(emulation, feeds, {c.key for c in plan.nodes})
    for output in real:
        np.testing.assert_allclose(got[output], real[output], rtol=1e-5, atol=1e-5)


def test_tensors_nobody_observes_are_not_materialized() -> None:
    """A quantized node's output read only by quantized nodes needs no switched copy of its own
    when it is not observed: each reader switches on its layer or the producer's."""
    model, feeds = _golden("unet")
    setup = _Setup(model, feeds, "ort")

    def switched(observed: Collection[str] | None) -> int:
        return sum(node.op == "If" for node in setup.emulation(observed).model.graph.nodes)

    assert switched(()) < switched(None)
    assert switched(()) < switched(list(setup.plan_of(model).tensors)) == switched(None)


def test_a_model_with_a_tensor_named_like_the_switches_is_not_emulated() -> None:
    model, feeds = _golden("resnet")
    setup = _Setup(model, feeds, "ort")
    target = model.copy()
    target.graph.inputs.append(gs.Variable(SWITCHES, dtype=np.float32, shape=[1]))
    with pytest.raises(NotEmulated):
        build_emulation(target, setup.plan_of(target), setup.params, setup.scheme)


# --- the search, through the pass ---------------------------------------------------------------


def _fragile_mlp(sizes: tuple[int, ...] = (16, 32, 32, 32, 8)) -> Model:
    """fc2 leans on a unit of fc1 that is never active (a huge weight on it): per-channel int8
    scales that weight sets round fc2's other weights to zero, so fc2 must stay float."""
    model, _ = mlp_model(np.random.default_rng(0), sizes=sizes)
    tensors = model.graph.tensors()
    tensors["b1"].values[0] = -100.0
    tensors["w2"].values[:, 0] = 1000.0
    return model


def _fc_is_float(model: Model, name: str) -> bool:
    node = next(n for n in model.graph.nodes if n.name == name)
    return isinstance(node.inputs[1], gs.Constant) and node.inputs[1].values.dtype == np.float32


def _calibration(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    feeds = {"x": np.random.default_rng(1).standard_normal((48, 16)).astype(np.float32)}
    return write_feeds(tmp_path, feeds), feeds


@pytest.mark.parametrize("ranking", ["fast", "exhaustive"])
def test_emulated_search_keeps_only_the_harmful_layer_and_runs_one_real_model(tmp_path: Path, ranking: str) -> None:
    spec, feeds = _calibration(tmp_path)
    want = run(_fragile_mlp(), feeds)["y"]
    model = _fragile_mlp()
    result, _ = quantize(model, spec, sensitivity=True, sensitivity_ranking=ranking, target_min=0.995)
    info = result.info
    assert info["emulated"] is True and info["kept_float"] == ["fc2 (Gemm)"]
    assert _fc_is_float(model, "fc2") and not _fc_is_float(model, "fc1") and not _fc_is_float(model, "fc3")
    # At most two sessions of the emulation (observing every layer's tensors for the added
    # noise, and not for trials), then one for the real run of the model chosen.
    assert info["real_runs"] == 1 and 2 <= info["sessions"] <= 3 and info["emulation_runs"] >= 2
    real = cosine(want, run(model, feeds)["y"])
    assert real >= 0.995 and info["score"] == pytest.approx(real, abs=1e-6)
    assert info["emulated_score"] == pytest.approx(info["score"], abs=1e-4)
    assert info["sensitivity_seconds"] >= 0
    # The fast search's trials run on a quarter of the 48 rows; the real run on all of them.
    assert info["search_rows"] == (12 if ranking == "fast" else 0)


def test_emulated_and_rebuilt_searches_agree(tmp_path: Path) -> None:
    """The same choice whether trials run on the emulation or on a rewritten copy each (a model
    with an input named like the switches cannot be emulated)."""
    spec, feeds = _calibration(tmp_path)
    emulated = _fragile_mlp()
    result, _ = quantize(emulated, spec, sensitivity=True, target_min=0.995)
    rebuilt = _fragile_mlp()
    rebuilt.graph.inputs.append(gs.Variable(SWITCHES, dtype=np.float32, shape=[1]))
    np.savez(Path(spec), x=feeds["x"], **{SWITCHES: np.zeros(1, np.float32)})
    fallback, _ = quantize(rebuilt, spec, sensitivity=True, target_min=0.995)
    assert fallback.info["emulated"] is False and fallback.info["emulation_runs"] == 0
    assert fallback.info["real_runs"] == fallback.info["sessions"] >= 3
    assert fallback.info["kept_float"] == result.info["kept_float"] == ["fc2 (Gemm)"]
    assert fallback.info["score"] == pytest.approx(result.info["score"], abs=1e-6)


def test_layer_tensors_calibration_did_not_see_come_from_the_emulation_with_every_switch_off(tmp_path: Path) -> None:
    """TensorRT's plan quantizes inputs only: a residual Add's output is no calibrated tensor,
    so the float values of the layers' tensors come from one run of the emulation, all off."""
    model, feeds = _golden("resnet")
    spec = write_feeds(tmp_path, feeds)
    want = run(model, feeds)
    result, _ = quantize(model, spec, format="tensorrt", sensitivity=True, target_min=0.99999)
    info = result.info
    assert info["emulated"] is True and info["real_runs"] == 1
    assert info["score"] >= 0.99999 and len(info["kept_float"]) >= 1
    got = run(model, feeds)
    assert min(cosine(want[name], got[name]) for name in want) == pytest.approx(info["score"], abs=1e-6)


def test_a_target_met_when_quantized_keeps_nothing_float(tmp_path: Path) -> None:
    spec, _ = _calibration(tmp_path)
    model, _ = mlp_model(np.random.default_rng(2))
    result, _ = quantize(model, spec, sensitivity=True, target_metric="snr", target_min=20.0)
    assert result.info["kept_float"] == [] and result.info["emulation_runs"] == 1
    assert result.info["score"] >= 20.0


# --- the search's arithmetic ----------------------------------------------------------------


def _metric_over_count(curve: str, needed: int, calls: list[int]) -> Callable[[int], float]:
    """A metric over the count of 20 layers kept float, never worse with more, shaped by `curve`,
    that meets 1.0 from `needed` on; every count asked for is appended to `calls`."""

    def value(count: int) -> float:
        calls.append(count)
        shape = {"linear": count / 20, "steep": 1 - (1 - count / 20) ** 4, "step": float(count >= needed)}[curve]
        return 1.0 + shape if count >= needed else shape * 0.5

    return value


@pytest.mark.parametrize("needed", [1, 2, 3, 5, 8, 13, 20])
@pytest.mark.parametrize("start", [0, 1, 4, 7, 20])
@pytest.mark.parametrize("curve", ["linear", "steep", "step"])
def test_grow_until_met_finds_the_fewest(needed: int, start: int, curve: str) -> None:
    """Whatever the shape of the metric over the count (as long as more is never worse)."""
    calls: list[int] = []
    value = _metric_over_count(curve, needed, calls)
    assert grow_until_met(value, 1.0, 20, start) == needed
    assert len(calls) == len(set(calls))  # no count is measured twice
    assert len(calls) <= 2 * (2 * 5) + 1  # doubling, then at most two steps per halving


def test_grow_until_met_when_nothing_meets() -> None:
    assert grow_until_met(lambda count: 0.0, 1.0, 6, 1) == 6


def test_fewest_below_shares_the_error_by_noise() -> None:
    noise = [0.5, 0.25, 0.125, 0.125]  # ratios in ranking order, summing to 1
    assert fewest_below(noise, quantized_error=0.01, target_error=0.01) == 0
    assert fewest_below(noise, quantized_error=0.01, target_error=0.005) == 1
    assert fewest_below(noise, quantized_error=0.01, target_error=0.002) == 3
    assert fewest_below(noise, quantized_error=0.01, target_error=0.0) == 4
    assert fewest_below(noise, quantized_error=0.01, target_error=0.005, scale=2.0) == 2


def test_exhaustive_ranking_measures_the_layers_alone_at_once_when_it_can() -> None:
    harm = {"a": 0.01, "b": 0.2, "c": 0.05}

    def evaluate(only: frozenset[str] | None, floats: frozenset[str]) -> float:
        quantized = set(harm) if only is None else set(only)
        return 1.0 - sum(harm[key] for key in quantized - floats)

    batches: list[int] = []

    def evaluate_many(pairs: Sequence[tuple[frozenset[str] | None, frozenset[str]]]) -> list[float]:
        batches.append(len(pairs))
        return [evaluate(*pair) for pair in pairs]

    layers = [(key, key.upper()) for key in harm]
    at_once = analyze(layers, evaluate, 0.93, evaluate_many=evaluate_many)
    one_by_one = analyze(layers, evaluate, 0.93)
    assert batches == [3]
    assert at_once == one_by_one
    assert [item.key for item in at_once.kept_float] == ["b"] and at_once.met


def test_ray_is_not_imported_to_ask_whether_it_runs() -> None:
    code = (
        "import sys\nfrom iropt.util.parallel import parallel_map, ray_if_running\n"
        "assert ray_if_running() is None and parallel_map(abs, [-1, -2]) == [1, 2]\n"
        "assert 'ray' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("needed", [1, 2, 3, 5, 8, 13, 20])
@pytest.mark.parametrize("start", [0, 1, 4, 7, 20])
@pytest.mark.parametrize("curve", ["linear", "steep", "step"])
def test_grow_until_met_with_a_tolerance_stops_within_it(needed: int, start: int, curve: str) -> None:
    """The count returned meets, and is at most the accepted width minus one above the fewest."""
    calls: list[int] = []
    value = _metric_over_count(curve, needed, calls)
    found = grow_until_met(value, 1.0, 20, start, tolerance=0.2)
    assert accepted_width(20, 0.2) == 4
    assert needed <= found <= needed + 3
    assert len(calls) == len(set(calls))
    exact = len(calls)
    calls.clear()
    grow_until_met(value, 1.0, 20, start)
    assert exact <= len(calls)  # a tolerance never costs more trials


def test_accepted_width_is_at_least_one_layer() -> None:
    assert accepted_width(52, 0.08) == 4 and accepted_width(12, 0.08) == 1 and accepted_width(52, 0.0) == 1


def test_tightened_scales_the_error_of_the_target() -> None:
    assert tightened(0.999, "cosine", 0.8) == pytest.approx(0.9992)
    assert tightened(0.9, "top1", 0.5) == pytest.approx(0.95)
    assert tightened(20.0, "snr", 0.1) == pytest.approx(30.0)  # a tenth of the noise: 10 dB more


def test_search_rows_is_a_quarter_and_at_least_a_few() -> None:
    assert [search_rows(rows) for rows in (1, 3, 4, 10, 16, 48, 64, 1000)] == [1, 3, 4, 4, 4, 12, 16, 250]


def test_continue_search_grows_from_the_count_that_fell_short() -> None:
    """A count chosen on part of the rows misses the target on all of them: the search goes on
    above it, in the same order, to the fewest that meets."""
    ranking = [LayerScore(f"k{i}", f"layer {i}", float(i)) for i in range(10)]
    short = SensitivityResult(ranking, ranking[:2], 0.9, True, {}, 5)
    asked: list[int] = []

    def evaluate(only: frozenset[str] | None, floats: frozenset[str]) -> float:
        assert only is None and floats == frozenset(item.key for item in ranking[: len(floats)])
        asked.append(len(floats))
        return 1.0 if len(floats) >= 6 else 0.5

    result = continue_search(short, evaluate, 0.99)
    assert [item.key for item in result.kept_float] == [f"k{i}" for i in range(6)]
    assert result.met and result.score == 1.0 and result.ranking == ranking
    assert min(asked) == 3 and result.evaluations == 5 + len(asked)


def test_first_rows_slices_the_feeds_and_their_runs_together() -> None:
    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(3, 2)}, {"x": np.arange(4, dtype=np.float32).reshape(2, 2)}]
    runs = [{"x": feed["x"], "y": feed["x"].sum(axis=1)} for feed in feeds]
    taken = first_rows(feeds, runs, 4)
    assert taken is not None and [feed["x"].shape[0] for feed, _ in taken] == [3, 1]
    np.testing.assert_array_equal(taken[1][1]["y"], runs[1]["y"][:1])
    assert len(first_rows(feeds, runs, 2) or []) == 1
    # A tensor whose leading dimension is not the feed's rows: they cannot be told apart.
    runs[0]["total"] = np.zeros(5, np.float32)
    assert first_rows(feeds, runs, 2) is None


def test_a_count_that_misses_the_target_on_every_row_is_grown_there(tmp_path: Path) -> None:
    """The search's rows (the first quarter) are all zeros: fc1 is silent on them (negative
    biases) and TensorRT's format keeps biases float, so fc2's rounded weights cost nothing there
    and the search keeps fc2 quantized. The real run on every row misses the target, and the
    search goes on over every row, in its order, until fc2 is float too."""
    model = _fragile_mlp()
    model.graph.tensors()["b1"].values[1:] = -0.5
    want_model = model.copy()
    rng = np.random.default_rng(1)
    x = np.concatenate([np.zeros((12, 16), np.float32), 3 * rng.standard_normal((36, 16)).astype(np.float32)])
    spec = write_feeds(tmp_path, {"x": x})
    result, _ = quantize(model, spec, format="tensorrt", sensitivity=True, target_min=0.995)
    info = result.info
    assert info["search_rows"] == 12 and info["real_runs"] == 2
    assert "fc2 (Gemm)" in info["kept_float"] and _fc_is_float(model, "fc2")
    real = cosine(run(want_model, {"x": x})["y"], run(model, {"x": x})["y"])
    assert real >= 0.995 and info["score"] == pytest.approx(real, abs=1e-6)


def test_few_rows_are_searched_on_whole_against_the_target_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """With no more rows than the search's least, it runs on all of them, aiming at the target."""
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    spec = write_feeds(tmp_path, {"x": x})
    model = _fragile_mlp()
    with caplog.at_level(logging.INFO, logger="iropt.test_quantize"):
        result, _ = quantize(model, spec, sensitivity=True, target_min=0.995)
    assert "on 4 rows" in caplog.text and "(aim 0.995000)" in caplog.text
    assert result.info["search_rows"] == 4 and result.info["real_runs"] == 1
    assert result.info["score"] >= 0.995 and _fc_is_float(model, "fc2")
