"""Calibration statistics gathered over shards and merged equal those gathered serially.

Min/max, counts and histograms merge exactly (the histogram's ranges are powers of two, so the
narrower one reaches the wider one by the same pair merges streaming does); Gram matrices (the
low-rank pass's `Moments`) are sums and merge exactly on data whose products are exact in
float64. The parallel path runs on the real Ray cluster in test_distributed.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_calibration import _two_layer_model

from iropt.compress.calibration import (
    StreamingHistogram,
    TensorStats,
    collect_statistics,
    collect_statistics_sharded,
    merge_statistics,
)
from iropt.compress.lowrank.moments import Moments
from iropt.verify.runtime import reference_runner

# Values on a 1e-3 grid: sums of counts are exact, and no value sits on a bin edge by rounding.
values = st.integers(-1_000_000, 1_000_000).map(lambda i: i / 1000.0)
chunks = st.lists(st.lists(values, min_size=0, max_size=20), min_size=1, max_size=6)


def _stats(chunk_list: list[list[float]], bins: int = 64) -> TensorStats:
    stats = TensorStats(bins)
    for chunk in chunk_list:
        stats.update(np.asarray(chunk, dtype=np.float32))
    return stats


def _assert_same(a: TensorStats, b: TensorStats) -> None:
    assert (a.count, a.min, a.max) == (b.count, b.min, b.max)
    assert a.histogram.radius == b.histogram.radius
    assert a.histogram.zeros == b.histogram.zeros
    np.testing.assert_array_equal(a.histogram.all_counts(), b.histogram.all_counts())


@given(chunks, chunks)
def test_merged_shards_equal_serial_statistics(left: list[list[float]], right: list[list[float]]) -> None:
    serial = _stats(left + right)
    merged = _stats(left)
    merged.merge(_stats(right))
    _assert_same(merged, serial)


def test_merge_of_zero_only_and_empty_histograms() -> None:
    zeros, empty, values_ = StreamingHistogram(8), StreamingHistogram(8), StreamingHistogram(8)
    zeros.add(np.zeros(5))
    values_.add(np.array([3.0, -1.0]))
    values_.merge(zeros)
    values_.merge(empty)
    serial = StreamingHistogram(8)
    serial.add(np.array([3.0, -1.0, 0, 0, 0, 0, 0]))
    np.testing.assert_array_equal(values_.all_counts(), serial.all_counts())
    assert values_.zeros == serial.zeros == 5
    with pytest.raises(ValueError, match="bins"):
        values_.merge(StreamingHistogram(16))


def test_merge_statistics_leaves_the_shards_alone() -> None:
    a, b = _stats([[1.0, 2.0]]), _stats([[-4.0]])
    merged = merge_statistics([{"t": a}, {"t": b}])
    assert (merged["t"].count, merged["t"].min, merged["t"].max) == (3, -4.0, 2.0)
    assert (a.count, b.count) == (2, 1)


def test_gram_matrices_merge_to_the_serial_sum() -> None:
    rng = np.random.default_rng(0)
    # Small integers: every product and sum is exact in float64, so the orders cannot differ.
    rows = rng.integers(-8, 8, size=(37, 5)).astype(np.float32)
    serial = Moments(5)
    serial.add(rows)
    merged = Moments(5)
    for shard in np.array_split(rows, 4):
        part = Moments(5)
        part.add(shard)
        merged.merge(part)
    assert merged.count == serial.count == 37
    np.testing.assert_array_equal(merged.gram, serial.gram)
    np.testing.assert_array_equal(merged.total, serial.total)
    np.testing.assert_array_equal(serial.gram, rows.astype(np.float64).T @ rows.astype(np.float64))
    with pytest.raises(ValueError, match="features"):
        merged.merge(Moments(4))


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    # On a 1/64 grid: the model's sums are exact enough that shards see the very same values.
    return [{"x": (rng.integers(-64, 64, size=(3, 4)) / 64).astype(np.float32)} for _ in range(count)]


def assert_sharded_equals_serial(feeds: list[dict[str, np.ndarray]], cuts: tuple[int, ...]) -> None:
    """Statistics over `feeds` cut into shards at `cuts` equal those over all of them in order."""
    model = _two_layer_model()
    serial = collect_statistics(model, ["x", "h", "r"], feeds, reference_runner)
    shards = [feeds[a:b] for a, b in zip((0, *cuts), (*cuts, len(feeds)), strict=True)]
    sharded = collect_statistics_sharded(model, ["x", "h", "r"], shards, reference_runner)
    for name in ("x", "h", "r"):
        _assert_same(sharded[name], serial[name])


def test_sharded_collection_without_ray_equals_serial() -> None:
    assert_sharded_equals_serial(_feeds(6), (2, 5))
