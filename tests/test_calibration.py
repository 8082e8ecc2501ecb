"""Calibration statistics and range methods, and the quantization arithmetic they feed.

Streaming: a histogram fed one sample at a time equals the one fed everything at once, with a
fixed number of bins. Methods on known distributions: minmax is the true range, percentile clips
outliers at the data's own percentile, entropy and mse choose thresholds inside the range.
Quantize-dequantize of a calibrated tensor stays within half a step inside its range.
"""

from __future__ import annotations

import math
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from helpers_quant import build, rand, write_feeds
from hypothesis import given
from hypothesis import strategies as st

from iropt.compress.calibration import (
    METHODS,
    StreamingHistogram,
    TensorStats,
    collect_statistics,
    compute_range,
    entropy_threshold,
    split_batches,
)
from iropt.compress.quant.params import (
    SCHEMES,
    WEIGHT_QMAX,
    activation_params,
    bias_params,
    dequantize,
    quantize,
    representable_range,
    weight_params,
)
from iropt.errors import UserError
from iropt.ir.model import Model
from iropt.verify.feeds import iter_feeds
from iropt.verify.runner import Runner
from iropt.verify.runtime import reference_runner

# Values on a 1e-3 grid up to 1000: exactly representable sums with any power-of-two radius,
# so streaming and one-shot histograms must agree bin for bin.
values = st.integers(-1_000_000, 1_000_000).map(lambda i: i / 1000.0)
samples = st.lists(st.lists(values, min_size=1, max_size=20), min_size=1, max_size=8)


def _stats(*chunks: np.ndarray, bins: int = 256) -> TensorStats:
    stats = TensorStats(bins)
    for chunk in chunks:
        stats.update(np.asarray(chunk, dtype=np.float32))
    return stats


# --- the streaming histogram -----------------------------------------------------------


@given(samples)
def test_streaming_equals_one_batch(chunks: list[list[float]]) -> None:
    one_at_a_time = _stats(*[np.array(c) for c in chunks])
    everything = _stats(np.concatenate([np.array(c) for c in chunks]))
    assert one_at_a_time.count == everything.count
    assert one_at_a_time.min == everything.min and one_at_a_time.max == everything.max
    assert one_at_a_time.histogram.radius == everything.histogram.radius
    np.testing.assert_array_equal(one_at_a_time.histogram.all_counts(), everything.histogram.all_counts())
    for method in METHODS:
        for symmetric in (False, True):
            assert compute_range(one_at_a_time, method, symmetric=symmetric) == compute_range(
                everything, method, symmetric=symmetric
            )


@given(samples)
def test_histogram_memory_is_bounded_and_covers_every_value(chunks: list[list[float]]) -> None:
    stats = _stats(*[np.array(c) for c in chunks], bins=64)
    data = np.concatenate([np.array(c, dtype=np.float32) for c in chunks])
    assert stats.histogram.counts.shape == (64,)
    assert stats.histogram.total() == data.size
    amax = float(np.max(np.abs(data)))
    if amax == 0.0:
        assert stats.histogram.radius is None
    else:
        radius = stats.histogram.radius
        assert radius is not None and amax <= radius < 2 * amax
        assert math.log2(radius) == int(math.log2(radius))  # a power of two
        # Every value lies in the bin the counts say.
        edges = stats.histogram.edges()
        index = np.clip(np.searchsorted(edges, data, side="right") - 1, 0, 63)
        np.testing.assert_array_equal(np.bincount(index, minlength=64), stats.histogram.counts)


def test_doubling_merges_pairs_of_bins_exactly() -> None:
    hist = StreamingHistogram(8)
    hist.add(np.array([-0.9, -0.1, 0.3, 0.8]))  # radius 1: bins of width 0.25
    assert hist.radius == 1.0
    np.testing.assert_array_equal(hist.counts, [1, 0, 0, 1, 0, 1, 0, 1])
    hist.add(np.array([1.5]))  # radius 2: old bins (2k, 2k+1) -> new bin 2 + k, then 1.5
    assert hist.radius == 2.0
    np.testing.assert_array_equal(hist.counts, [0, 0, 1, 1, 1, 1, 0, 1])


def test_zeros_before_any_other_value_are_kept() -> None:
    hist = StreamingHistogram(8)
    hist.add(np.zeros(5))
    assert hist.radius is None and hist.total() == 5
    hist.add(np.array([0.5]))
    assert hist.counts[4] == 5 and hist.total() == 6 and hist.zeros == 5


def test_bins_must_be_a_multiple_of_four() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        StreamingHistogram(10)


def test_non_finite_values_are_ignored() -> None:
    stats = _stats(np.array([1.0, np.nan, -np.inf, -2.0]))
    assert (stats.count, stats.min, stats.max) == (2, -2.0, 1.0)


# --- range methods on known distributions ------------------------------------------------


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=values.map(np.float32)))
def test_minmax_is_the_true_range(data: np.ndarray) -> None:
    stats = _stats(data)
    assert compute_range(stats, "minmax", symmetric=False) == (float(data.min()), float(data.max()))


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=values.map(np.float32)), st.sampled_from(METHODS))
def test_every_method_stays_inside_the_observed_range(data: np.ndarray, method: str) -> None:
    stats = _stats(data)
    for symmetric in (False, True):
        low, high = compute_range(stats, method, symmetric=symmetric)  # type: ignore[arg-type]
        assert data.min() <= low <= high <= data.max()


def _normal_with_outliers(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(20_000).astype(np.float32)
    data[:3] = [60.0, 75.0, -70.0]  # three far outliers
    return data


def test_percentile_clips_outliers_at_the_datas_percentile() -> None:
    data = _normal_with_outliers()
    stats = _stats(data, bins=2048)
    width = stats.histogram.width
    low, high = compute_range(stats, "percentile", symmetric=False, percentile=99.9)
    # Within two bins of numpy's percentiles (the histogram resolves to a bin edge).
    assert abs(high - np.percentile(data, 99.9)) <= 2 * width
    assert abs(low - np.percentile(data, 0.1)) <= 2 * width
    assert high < 10.0 < 60.0  # the outliers are clipped
    low, high = compute_range(stats, "percentile", symmetric=True, percentile=99.9)
    assert abs(high - np.percentile(np.abs(data), 99.9)) <= 2 * width and low == -high


def test_percentile_100_keeps_everything() -> None:
    data = _normal_with_outliers()
    stats = _stats(data)
    low, high = compute_range(stats, "percentile", symmetric=False, percentile=100.0)
    assert (low, high) == (float(data.min()), float(data.max()))


def test_entropy_clips_far_outliers() -> None:
    data = _normal_with_outliers()
    stats = _stats(data, bins=2048)
    for symmetric in (False, True):
        low, high = compute_range(stats, "entropy", symmetric=symmetric)
        # Inside the range, below the outliers, above the bulk of the distribution.
        assert np.percentile(data, 99.0) < high < 60.0
        assert -70.0 < low < np.percentile(data, 1.0)


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_a_heavy_tail(method: str) -> None:
    # A Laplace tail: a few large values cost less clipped than the resolution they would take.
    # (MSE keeps a handful of extreme outliers: their squared error outweighs rounding noise.)
    data = np.random.default_rng(5).laplace(size=200_000).astype(np.float32)
    stats = _stats(data, bins=2048)
    for symmetric in (False, True):
        low, high = compute_range(stats, method, symmetric=symmetric)  # type: ignore[arg-type]
        assert np.percentile(data, 99.0) < high < data.max()
        assert data.min() < low < np.percentile(data, 1.0)


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_keep_most_of_a_uniform_range(method: str) -> None:
    # With no tail to trade away, clipping only adds error: the threshold stays near the end.
    data = np.random.default_rng(1).uniform(-1.0, 1.0, 50_000).astype(np.float32)
    stats = _stats(data, bins=2048)
    low, high = compute_range(stats, method, symmetric=True)  # type: ignore[arg-type]
    assert high >= 0.95 * data.max() and low <= 0.95 * data.min()


def test_entropy_ignores_the_spike_of_zeros_after_a_relu() -> None:
    # Half the values are exact zeros: they quantize exactly and must not drag the threshold down.
    data = np.maximum(np.random.default_rng(2).standard_normal(100_000), 0).astype(np.float32)
    threshold = entropy_threshold(_stats(data, bins=2048).histogram, levels=256)
    assert np.percentile(data[data > 0], 99.0) < threshold <= data.max() + 1e-6


def test_unknown_method_and_bad_percentile() -> None:
    stats = _stats(np.array([1.0, 2.0]))
    with pytest.raises(UserError, match="unknown calibration method 'kl'"):
        compute_range(stats, "kl", symmetric=False)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="percentile"):
        compute_range(stats, "percentile", symmetric=False, percentile=0.0)


def test_empty_statistics_give_an_empty_range() -> None:
    assert compute_range(TensorStats(), "entropy", symmetric=True) == (0.0, 0.0)


# --- quantization parameters --------------------------------------------------------------

ranges = st.tuples(values, values).map(lambda pair: sorted(float(np.float32(v)) for v in pair))


@given(ranges, st.sampled_from(sorted(SCHEMES)), st.data())
def test_qdq_inside_the_range_is_within_half_a_step(bounds: list[float], fmt: str, data: st.DataObject) -> None:
    low, high = bounds
    params = activation_params(low, high, SCHEMES[fmt])
    inside = data.draw(hnp.arrays(np.float32, 16, elements=st.floats(low, high, width=32)))
    error = np.abs(dequantize(quantize(inside, params), params) - inside)
    scale = float(params.scale)
    assert np.all(error <= scale / 2 * (1 + 1e-5) + 1e-6 * max(abs(low), abs(high)))
    # The quantizer covers the range, and zero is exact (padding and ReLU zeros stay zero).
    rep_low, rep_high = representable_range(params)
    assert rep_low <= min(low, 0.0) + scale and rep_high >= max(high, 0.0) - scale
    assert dequantize(quantize(np.zeros(1), params), params)[0] == 0.0


def test_formats_use_the_types_their_back_ends_run() -> None:
    ort_params = activation_params(-1.0, 3.0, SCHEMES["ort"])
    assert ort_params.zero_point.dtype == np.uint8 and int(ort_params.zero_point) == round(1.0 / (4.0 / 255))
    trt = activation_params(-1.0, 3.0, SCHEMES["tensorrt"])
    assert trt.zero_point.dtype == np.int8 and int(trt.zero_point) == 0
    assert float(trt.scale) == pytest.approx(3.0 / 127)


def test_a_relu_range_has_zero_point_zero() -> None:
    params = activation_params(0.0, 6.0, SCHEMES["ort"])
    assert int(params.zero_point) == 0
    assert float(params.scale) == np.float32(6.0 / 255)


@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, max_side=5), elements=values.map(np.float32)),
    st.data(),
)
def test_per_channel_weights_are_within_half_a_step(weight: np.ndarray, data: st.DataObject) -> None:
    axis = data.draw(st.integers(0, weight.ndim - 1))
    quantized, params = weight_params(weight, axis)
    assert quantized.dtype == np.int8 and np.all(np.abs(quantized.astype(int)) <= WEIGHT_QMAX)
    assert params.scale.shape == (weight.shape[axis],) and params.axis == axis
    assert not params.zero_point.any()
    restored = dequantize(quantized, params)
    shaped = params.scale.reshape([-1 if i == axis else 1 for i in range(weight.ndim)])
    assert np.all(np.abs(restored - weight) <= shaped / 2 * (1 + 1e-5))
    # Each channel's largest weight is exactly representable at the edge of the grid.
    amax = np.max(np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)), axis=1)
    np.testing.assert_allclose(params.scale[amax > 0], amax[amax > 0] / WEIGHT_QMAX, rtol=1e-6)
    assert np.all(params.scale[amax == 0] == 1.0)


def test_bias_scale_is_input_scale_times_weight_scale() -> None:
    bias = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    input_scale = np.float32(0.02)
    weight_scale = np.array([0.01, 0.03, 0.002], dtype=np.float32)
    quantized, params = bias_params(bias, input_scale, weight_scale)
    assert quantized.dtype == np.int32 and params.axis == 0 and not params.zero_point.any()
    np.testing.assert_array_equal(params.scale, (np.float64(input_scale) * weight_scale).astype(np.float32))
    assert np.all(np.abs(dequantize(quantized, params) - bias) <= params.scale / 2 * (1 + 1e-5))


# --- gathering statistics by running a model -------------------------------------------------


class _Recording:
    """A real ONNX Runtime runner that also records the batch sizes it was given."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.rows: list[int] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.rows.append(next(iter(feeds.values())).shape[0])
        return self.runner.run(feeds)


def _two_layer_model() -> Model:
    rng = np.random.default_rng(3)
    return build(
        """
g (float[N, 4] x) => (float[N, 3] y) {
  h = Gemm <transB = 1> (x, w1, b1)
  r = Relu (h)
  y = Gemm <transB = 1> (r, w2, b2)
}""",
        {"w1": rand(rng, 5, 4), "b1": rand(rng, 5), "w2": rand(rng, 3, 5), "b2": rand(rng, 3)},
    )


def test_large_feeds_are_split_into_bounded_batches(tmp_path: Path) -> None:
    model = _two_layer_model()
    data = np.random.default_rng(4).standard_normal((10, 4)).astype(np.float32)
    spec = write_feeds(tmp_path, {"x": data})
    runners: list[_Recording] = []

    def factory(m: Model) -> Runner:
        runners.append(_Recording(reference_runner(m)))
        return runners[-1]

    split = collect_statistics(model, ["x", "h", "r"], iter_feeds(spec, model), factory, batch_size=4)
    whole = collect_statistics(model, ["x", "h", "r"], iter_feeds(spec, model), factory, batch_size=100)
    assert runners[0].rows == [4, 4, 2] and runners[1].rows == [10]
    for name in ("x", "h", "r"):
        assert split[name].count == whole[name].count
        assert (split[name].min, split[name].max) == (whole[name].min, whole[name].max)
        np.testing.assert_array_equal(split[name].histogram.all_counts(), whole[name].histogram.all_counts())
    # The graph input is read from the feeds; an intermediate tensor from the model.
    assert (split["x"].min, split["x"].max) == (float(data.min()), float(data.max()))
    reference = reference_runner(model)
    outputs = reference.run({"x": data})
    assert split["r"].min >= 0.0 and split["r"].count == 10 * 5
    assert split["r"].max == pytest.approx(float(np.maximum(data @ _w(model, "w1").T + _w(model, "b1"), 0).max()))
    assert outputs["y"].shape == (10, 3)


def _w(model: Model, name: str) -> np.ndarray:
    return np.asarray(model.graph.tensors()[name].values)


def test_split_keeps_feeds_whose_inputs_disagree_on_rows() -> None:
    feed = {"a": np.zeros((6, 2)), "b": np.zeros((3, 2))}
    assert [list(b) for b in split_batches(feed, 2)] == [["a", "b"]]
    assert len(list(split_batches({"a": np.zeros((6, 2))}, 2))) == 3


def test_minmax_only_statistics_skip_the_histogram() -> None:
    values = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    stats = TensorStats(keep_histogram=False)
    stats.update(values)
    assert (stats.min, stats.max) == (float(values.min()), float(values.max()))
    assert int(stats.histogram.counts.sum()) == 0
    assert compute_range(stats, "minmax", symmetric=False) == (stats.min, stats.max)
    with pytest.raises(ValueError, match="needs statistics collected with a histogram"):
        compute_range(stats, "percentile", symmetric=False)
