"""Measured placement: ONNX Runtime's profiler per node, attribution of ORT's fused nodes to layers,
the keep-float decision and its end-to-end fallback, the per-machine timing cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_quant import build, quantize, rand, write_feeds

from iropt.compress.quant.attribution import attribute, tagged_copy, tagged_index, tensor_producers
from iropt.compress.quant.measured import (
    NOISE_MARGIN,
    Check,
    LayerTiming,
    layer_signature,
    settle,
    slow_layers,
)
from iropt.compress.quant.placement import DEFAULT_OP_TYPES, plan_quantization, tensor_types
from iropt.compress.quant.timing_cache import TimingCache, cache_dir, signature_key
from iropt.errors import OptionError, UserError
from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.ir.model import Model
from iropt.passes.quantize import Quantize
from iropt.util.machine import machine_id, machine_signature
from iropt.verify.profiling import OrtProfiler

CONV_CHAIN = """
agraph (float[2, 16, 12, 12] x) => (float[2, 16, 12, 12] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (a)
    c = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
    y = Relu (c)
}
"""


def _conv_chain() -> tuple[Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    weights = {"w1": rand(rng, 16, 16, 3, 3, scale=0.2), "b1": rand(rng, 16), "w2": rand(rng, 16, 16, 3, 3, scale=0.2),
               "b2": rand(rng, 16)}
    return build(CONV_CHAIN, weights), {"x": rand(rng, 2, 16, 12, 12, scale=1.0)}


def _fully_quantized(model: Model, tmp_path: Path, feeds: dict[str, np.ndarray]) -> Model:
    quantized = model.copy()
    quantize(quantized, write_feeds(tmp_path, feeds), placement="all")
    return quantized


# --- profiler ----------------------------------------------------------------------------------


def test_profiler_times_every_compute_node() -> None:
    model, feeds = _conv_chain()
    tagged = tagged_copy(model)
    [profile] = OrtProfiler(runs=3, warmup=1).profile([tagged], feeds, threads=1, optimization_level="disable")
    assert {tagged_index(name) for name in profile.nodes} == set(range(len(model.graph.nodes)))
    assert all(node.ms > 0 for node in profile.nodes.values())
    assert profile.run_ms >= profile.kernel_ms * 0.5


# --- attribution -------------------------------------------------------------------------------


def test_attribution_maps_ort_fused_nodes_back_to_layers(tmp_path: Path) -> None:
    model, feeds = _conv_chain()
    tagged = tagged_copy(model)  # as measured placement does: tags first, then the quantized candidate
    quantized = _fully_quantized(tagged, tmp_path, feeds)
    layers = [(0, 1), (2, 3)]  # each Conv with the Relu ORT fuses into it (float) or iropt absorbs (int8)
    float_profile, int8_profile = OrtProfiler(runs=3, warmup=1).profile(
        [tagged, quantized], feeds, threads=1, optimization_level="all"
    )
    # ORT renames what it fuses: NCHWc convs after a tensor, QLinearConv after the Conv plus a suffix.
    assert not set(float_profile.nodes) <= {n.name for n in tagged.graph.nodes}
    assert any(p.op == "QLinearConv" for p in int8_profile.nodes.values())
    for profile, source in ((float_profile, tagged), (int8_profile, quantized)):
        charged = attribute({k: (v.op, v.ms) for k, v in profile.nodes.items()}, profile.graph, tensor_producers(source))
        total = sum(charged.by_index.values()) + charged.unattributed_ms
        assert total == pytest.approx(profile.kernel_ms)
        assert charged.unattributed_ms == 0.0
        assert set(charged.by_index) <= {i for layer in layers for i in layer}
        for layer in layers:
            assert charged.layer_ms(layer) > 0.0, (layer, profile.nodes)


def test_conversions_are_charged_to_the_int8_layer_that_causes_them() -> None:
    # The graph as ORT hands it back: its int8 region in NHWC between Transposes.
    nodes = [
        onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_QuantizeLinear"),
        onnx.helper.make_node("Transpose", ["xq"], ["xt"], name="Transpose"),
        onnx.helper.make_node("QLinearConv", ["xt"], ["c"], name="iropt_node_0_token_3"),
        onnx.helper.make_node("Transpose", ["c"], ["ct"], name="Transpose_token_4"),
        onnx.helper.make_node("DequantizeLinear", ["ct", "s", "z"], ["y"], name="y_DequantizeLinear"),
        onnx.helper.make_node("Sigmoid", ["y"], ["out"], name="iropt_node_1"),
    ]
    ran = onnx.helper.make_graph(nodes, "ran", [], [])
    times = {node.name: (node.op_type, 1.0) for node in nodes}
    charged = attribute(times, ran, {})
    assert charged.by_index == {0: 5.0, 1: 1.0}


# --- decisions from given timings --------------------------------------------------------------


def _timings(*pairs: tuple[float, float]) -> list[LayerTiming]:
    return [LayerTiming(str(i), f"conv{i}", int8, fp32) for i, (int8, fp32) in enumerate(pairs)]


def test_layers_slower_in_int8_stay_float_and_a_faster_mix_is_kept() -> None:
    timings = _timings((0.41, 0.30), (0.10, 0.30), (0.20, 0.25))
    assert list(slow_layers(timings)) == ["0"]
    assert "int8 0.410 ms vs float 0.300 ms" in slow_layers(timings)["0"]
    asked = []

    def check(floats: frozenset[str]) -> Check:
        asked.append(floats)
        return Check(len(floats), int8_ms=1.0, float_ms=1.5)

    kept, checks, all_float = settle(timings, check)
    assert list(kept) == ["0"] and not all_float
    assert asked == [frozenset({"0"})] and checks[0].passes


def test_a_mix_slower_end_to_end_loses_its_least_paying_layers_then_falls_back_to_float() -> None:
    timings = _timings((0.41, 0.30), (0.15, 0.30), (0.20, 0.26), (0.15, 0.18))
    asked: list[frozenset[str]] = []

    def slower(floats: frozenset[str]) -> Check:
        asked.append(floats)
        return Check(len(floats), int8_ms=1.0, float_ms=1.0)  # equal is not faster by the margin

    kept, checks, all_float = settle(timings, slower)
    # Least gain first: layer 3 (0.03 ms), then 2 (0.06) and 1 (0.15) together, leaving none int8.
    # The whole model in int8 is tried once after the first mix fails.
    assert asked == [frozenset({"0"}), frozenset(), frozenset({"0", "3"})]
    assert all_float and set(kept) == {"0", "1", "2", "3"} and len(checks) == 3

    def faster_once_two_are_float(floats: frozenset[str]) -> Check:
        return Check(len(floats), int8_ms=0.9 if len(floats) >= 2 else 1.1, float_ms=1.0)

    kept, _, all_float = settle(timings, faster_once_two_are_float)
    assert set(kept) == {"0", "3"} and not all_float
    assert "moved back to float" in kept["3"]


def test_the_whole_model_in_int8_is_kept_when_it_pays_and_the_mix_does_not() -> None:
    # Layer 0 is slower alone, but the mix with it in float pays its borders' Q/DQ and loses.
    timings = _timings((0.32, 0.30), (0.10, 0.30), (0.10, 0.26))

    def whole_pays(floats: frozenset[str]) -> Check:
        return Check(len(floats), int8_ms=0.8 if not floats else 1.05, float_ms=1.0)

    kept, checks, all_float = settle(timings, whole_pays)
    assert kept == {} and not all_float
    assert [c.float_layers for c in checks] == [1, 0]


def test_the_end_to_end_check_needs_a_margin_over_noise() -> None:
    assert not Check(1, int8_ms=1.0 * (1 - NOISE_MARGIN / 2), float_ms=1.0).passes
    assert Check(1, int8_ms=1.0 * (1 - NOISE_MARGIN * 2), float_ms=1.0).passes


def test_no_check_runs_when_every_layer_is_slower() -> None:
    def never(floats: frozenset[str]) -> Check:
        raise AssertionError("nothing to check")

    kept, checks, all_float = settle(_timings((0.5, 0.3), (0.4, 0.2)), never)
    assert all_float and checks == [] and set(kept) == {"0", "1"}


# --- the pass ----------------------------------------------------------------------------------


CONV_TRANSPOSE = """
agraph (float[2, 8, 8, 8] x) => (float[2, 4, 16, 16] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (a)
    y = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2]> (r, w2, b2)
}
"""


def _conv_transpose_model(rng: np.random.Generator) -> Model:
    """CONV_TRANSPOSE with random weights: a Conv ORT may run faster in int8, and a ConvTranspose it cannot."""
    return build(CONV_TRANSPOSE, {"w1": rand(rng, 8, 8, 3, 3), "b1": rand(rng, 8), "w2": rand(rng, 8, 4, 2, 2),
                                  "b2": rand(rng, 4)})


def test_measured_placement_keeps_conv_transpose_float(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    model = _conv_transpose_model(rng)
    calibration = write_feeds(tmp_path, {"x": rand(rng, 2, 8, 8, 8, scale=1.0)})
    with caplog.at_level(logging.INFO):
        result, _ = quantize(model, calibration, target="ort", placement="measured", log=logging.getLogger("iropt.t"))
    kept = {item["layer"]: item["reason"] for item in result.info["kept_float_measured"]}
    assert any("ConvTranspose" in layer for layer in kept)
    assert all(reason.startswith("measured: int8 ") or "no layer paid" in reason for reason in kept.values())
    assert result.stats["kept_float_measured"] == len(kept)
    assert not any(node.op == "ConvTranspose" and node.inputs[1].inputs for node in model.graph.nodes)
    measured = result.info["measured"]
    assert measured["layers_float_ms"] > 0 and measured["measuring_seconds"] > 0
    assert "measured placement took" in caplog.text
    # The same model again: the verdict comes from the timing cache.
    again = _conv_transpose_model(rng)
    repeat, _ = quantize(again, calibration, target="ort", placement="measured")
    assert repeat.info["measured"]["from_cache"]
    assert repeat.stats["kept_float_measured"] == result.stats["kept_float_measured"]


def test_a_model_left_all_float_is_reported_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    model = _conv_transpose_model(rng)
    calibration = write_feeds(tmp_path, {"x": rand(rng, 2, 8, 8, 8, scale=1.0)})
    # Only float reaches cosine 1: sensitivity keeps every layer float.
    result, _ = quantize(model, calibration, target="ort", placement="rules", sensitivity=True, target_min=1.0)
    assert result.stats["quantized_nodes"] == 0 and result.stats["calibration_samples"] > 0
    assert not result.changed
    assert not any(node.op in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.nodes)


def test_placement_option_is_validated() -> None:
    with pytest.raises(OptionError):
        create_pass("quantize", {"placement": "fastest"})
    with pytest.raises(OptionError, match="not both"):
        create_pass("quantize", {"placement": "rules", "skip_slow_layers": False})
    pass_ = create_pass("quantize", {"skip_slow_layers": False})
    assert isinstance(pass_, Quantize)


# --- timing cache ------------------------------------------------------------------------------


def test_timing_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    cache = TimingCache(path)
    cache.put_layer("k", 0.41, 0.30)
    cache.put_model("m", {"kept_float": {"0": "why"}})
    cache.save()
    again = TimingCache(path)
    assert again.layer("k") == (0.41, 0.30) and again.model("m") == {"kept_float": {"0": "why"}}
    assert json.loads(path.read_text())["machine"] == json.loads(json.dumps(machine_signature()))
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_timing_cache_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache.json"
    path.write_text('{"version": 1, "layers": {"k": {"int8_ms": "x"')
    with caplog.at_level(logging.WARNING):
        cache = TimingCache(path)
    assert cache.layer("k") is None and "unreadable timing cache" in caplog.text
    cache.put_layer("k", 1.0, 2.0)
    cache.save()
    assert TimingCache(path).layer("k") == (1.0, 2.0)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IROPT_CACHE_DIR", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("IROPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "iropt"
    assert TimingCache().path.name == f"quant_timings_{machine_id()}.json"


def test_layer_cache_key_changes_with_shape() -> None:
    rng = np.random.default_rng(2)
    weights = {"w1": rand(rng, 16, 16, 3, 3), "b1": rand(rng, 16), "w2": rand(rng, 16, 16, 3, 3), "b2": rand(rng, 16)}
    small = build(CONV_CHAIN, weights)
    large = build(CONV_CHAIN.replace("12, 12", "24, 24"), weights)
    context = {"threads": 1}

    def key(model: Model) -> str:
        node = model.graph.nodes[0]
        return signature_key(layer_signature(node, None, context))

    assert key(small) != key(large)
    assert key(small) == key(build(CONV_CHAIN, weights))
    assert signature_key(layer_signature(small.graph.nodes[0], None, {"threads": 2})) != key(small)


def test_plan_layers_cover_each_anchor_with_its_fused_followers() -> None:
    from iropt.compress.quant.measured import plan_layers
    from iropt.compress.quant.params import SCHEMES

    model, _ = _conv_chain()
    plan = plan_quantization(model.graph, SCHEMES["ort"], op_types=DEFAULT_OP_TYPES,
                             excluded=lambda node, key: False, dtypes=tensor_types(model))
    layers = plan_layers(model, plan, {})
    assert [layer.indices for layer in layers] == [(0, 1), (2, 3)]


def test_a_cached_verdict_that_is_not_ours_is_ignored() -> None:
    from iropt.compress.quant.measured import MeasuredLayer, _cached_verdict

    layers = [MeasuredLayer("0", "conv (Conv)", (0,), {})]
    good = {"kept_float": {"0": "why"}, "checks": [{"float_layers": 1, "int8_ms": 1.0, "float_ms": 2.0}],
            "no_layer_paid": False}
    assert _cached_verdict(good, layers) == ({"0": "why"}, [Check(1, 1.0, 2.0)], False)
    assert _cached_verdict({**good, "kept_float": {"7": "why"}}, layers) is None  # another model's layer
    assert _cached_verdict({"kept_float": ["0"]}, layers) is None
    assert _cached_verdict(None, layers) is None


def test_sensitivity_ranks_only_the_layers_measured_placement_left_int8(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = _conv_transpose_model(rng)
    calibration = write_feeds(tmp_path, {"x": rand(rng, 2, 8, 8, 8, scale=1.0)})
    result, _ = quantize(model, calibration, target="ort", placement="measured", sensitivity=True, target_min=0.0)
    float_layers = {item["layer"] for item in result.info["kept_float_measured"]}
    ranked = {item["layer"] for item in result.info.get("ranking", [])}
    assert any("ConvTranspose" in layer for layer in float_layers)
    assert not ranked & float_layers


def test_a_mix_gaining_less_than_the_noise_margin_is_not_checked() -> None:
    def never(floats: frozenset[str]) -> Check:
        raise AssertionError("a gain this small cannot be confirmed end to end")

    tiny = NOISE_MARGIN / 4
    kept, checks, all_float = settle(_timings((1.0 - tiny, 1.0), (1.2, 1.0)), never)
    assert all_float and checks == [] and set(kept) == {"0", "1"}


class _UnavailableProfiler:
    """A target that cannot run models for timing (a profiler that is refused)."""

    def profile(self, *args: object, **kwargs: object) -> list[object]:
        raise UserError("the profiler is not available on this target")

    def latency(self, *args: object, **kwargs: object) -> list[float]:
        raise UserError("the profiler is not available on this target")


def test_placement_falls_back_to_rules_when_layers_cannot_be_timed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IROPT_CACHE_DIR", str(tmp_path / "cache"))  # nothing known: it must measure
    rng = np.random.default_rng(4)
    model = _conv_transpose_model(rng)
    pass_ = create_pass("quantize", {"calibration": write_feeds(tmp_path, {"x": rand(rng, 2, 8, 8, 8)})})
    ctx = PassContext(model_profiler=_UnavailableProfiler(), log=logging.getLogger("iropt.t"))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        result = pass_.run(model, ctx)
    assert "placing them by rules instead" in caplog.text
    assert "kept_float_measured" not in result.stats
    assert [item["layer"].endswith("(ConvTranspose)") for item in result.info["skipped_slow"]] == [True]


def test_profiler_and_timing_read_a_model_written_out_with_external_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from iropt.verify import runtime

    monkeypatch.setattr(runtime, "IN_MEMORY_LIMIT", 0)  # as for a model past the protobuf limit
    model, feeds = _conv_chain()
    tagged = tagged_copy(model)
    [profile] = OrtProfiler(runs=2, warmup=1).profile([tagged], feeds, threads=1, optimization_level="all")
    assert profile.kernel_ms > 0 and len(profile.graph.node) > 0
    [latency] = OrtProfiler(budget_s=0.01).latency([tagged], feeds, threads=1, optimization_level="all")
    assert latency > 0


def test_unnamed_nodes_are_matched_to_the_names_the_profiler_gave_them() -> None:
    # HardSwish inlined after two int8 convs: ORT saves its nodes unnamed, profiles them as <op>_<index>.
    nodes = [
        onnx.helper.make_node("QLinearConv", ["x"], ["a"], name="iropt_node_0_token_1"),
        onnx.helper.make_node("HardSigmoid", ["a"], ["ha"]),
        onnx.helper.make_node("QLinearConv", ["ha"], ["b"], name="iropt_node_2_token_5"),
        onnx.helper.make_node("HardSigmoid", ["b"], ["hb"]),
        onnx.helper.make_node("Sigmoid", ["hb"], ["out"], name="iropt_node_4"),
    ]
    ran = onnx.helper.make_graph(nodes, "ran", [], [])
    times = {"iropt_node_0_token_1": ("QLinearConv", 1.0), "HardSigmoid_31": ("HardSigmoid", 0.5),
             "iropt_node_2_token_5": ("QLinearConv", 2.0), "HardSigmoid_107": ("HardSigmoid", 0.25),
             "iropt_node_4": ("Sigmoid", 0.1)}
    charged = attribute(times, ran, {})
    assert charged.unattributed_ms == 0.0
    # Not int8 themselves: each goes to its int8 neighbour, the consumer first (the first one
    # feeds conv 2), else the producer (the second follows conv 2 and feeds a float Sigmoid).
    assert charged.by_index == {0: 1.0, 2: pytest.approx(2.75), 4: 0.1}
