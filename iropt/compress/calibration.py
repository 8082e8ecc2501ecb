"""Calibration: streaming statistics of activation tensors, and the ranges quantization uses.

Statistics are gathered without storing activations, so memory does not grow with the number
of samples: per tensor a running min/max, an element count and a fixed-size histogram.

The histogram covers a symmetric range `[-R, R]` with `R` a power of two and `bins` equal bins
(`bins` a multiple of 4). When a value beyond `R` arrives, `R` doubles and every pair of
adjacent bins merges into one bin of the new, twice-as-wide grid: the old edges are edges of
the new grid, so the merge is exact. Because `R` is always the smallest power of two that
covers every value seen, the histogram of a stream fed one sample at a time is the histogram
of the whole stream fed at once (up to floating-point rounding of values that sit on an edge).

Range methods, each returning the `(low, high)` range one tensor's quantizer should cover:

- `minmax`: the observed minimum and maximum.
- `percentile`: clip the `100 - p` and `p` percentiles of the distribution (of `|x|` for a
  symmetric quantizer), so a few outliers do not stretch the scale for everything else.
- `entropy`: the threshold whose quantized distribution is closest, in KL divergence, to the
  observed one (TensorRT's calibrator: fold the outliers into the last bin of the reference
  distribution, merge the bins below the threshold into as many levels as the quantizer has,
  spread each level back over the bins that were not empty, and compare).
- `mse`: the clipping range that minimizes the expected squared quantization error over the
  histogram: rounding noise `step**2 / 12` for values inside the range, `(x - clip)**2` for
  values outside.

`collect_statistics` runs a model with the tensors to calibrate added as graph outputs, through
a runner from the pass context (passes never import a runtime), in batches of bounded size.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx

from iropt.errors import UserError
from iropt.ir.model import Model
from iropt.util.parallel import ray_if_running
from iropt.util.progress import ProgressFn
from iropt.verify.runner import Runner

CalibrationMethod = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")

DEFAULT_BINS = 2048
# TensorRT's entropy calibrator compares against 128 levels: one side of a symmetric int8 grid.
SYMMETRIC_LEVELS = 128
# Candidate thresholds tried by the entropy and mse searches; more adds time, not accuracy.
MAX_CANDIDATES = 256


class StreamingHistogram:
    """A histogram over `[-R, R]` (R a power of two) that doubles its range instead of growing.

    Memory is `bins` counters whatever the number of values added.
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 8 or bins % 4:
            raise ValueError(f"histogram bins must be a multiple of 4 and at least 8, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        # None until a non-zero value arrives; zeros seen before that wait in `_pending`.
        self.radius: float | None = None
        self._pending = 0
        # Exact zeros (padding, ReLU): every quantizer represents them exactly, so the error
        # searches leave them out; they are counted in `counts` too.
        self.zeros = 0

    @property
    def width(self) -> float:
        """The width of one bin (0 before any non-zero value)."""
        return 0.0 if self.radius is None else 2.0 * self.radius / self.bins

    def edges(self) -> np.ndarray:
        """The `bins + 1` bin edges."""
        radius = self.radius or 0.0
        return np.linspace(-radius, radius, self.bins + 1)

    def centers(self) -> np.ndarray:
        edges = self.edges()
        return (edges[:-1] + edges[1:]) / 2

    def add(self, values: np.ndarray) -> None:
        """Count finite `values` (NaN and infinities are ignored)."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        amax = float(np.max(np.abs(flat)))
        self.zeros += int(flat.size - np.count_nonzero(flat))
        if amax == 0.0:
            self._add_zeros(flat.size)
            return
        self._cover(amax)
        assert self.radius is not None
        # (x + R) * bins / (2R): R and bins are powers of two, so the scaling is exact.
        index = np.floor((flat + self.radius) * (self.bins / (2.0 * self.radius))).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _cover(self, amax: float) -> None:
        """Grow the range (doubling, merging bin pairs) until it covers `amax`."""
        if self.radius is None:
            self.radius = 2.0 ** math.ceil(math.log2(amax))
            self.counts[self.bins // 2] += self._pending
            self._pending = 0
        while amax > self.radius:
            # Old bins 2k and 2k+1 become new bin bins/4 + k: the old range is the middle half.
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(self.bins, dtype=np.int64)
            quarter = self.bins // 4
            self.counts[quarter : quarter + merged.size] = merged
            self.radius *= 2.0

    def total(self) -> int:
        return int(self.counts.sum()) + self._pending

    def merge(self, other: StreamingHistogram) -> None:
        """Add `other`'s counts, as if its values had been added here.

        Both ranges are powers of two, so the narrower histogram reaches the wider one's range by
        the same exact pair merges that `add` does: the result is the histogram of both streams.
        """
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {other.bins} and {self.bins} bins")
        self.zeros += other.zeros
        if other.radius is None:
            self._add_zeros(other._pending)
            return
        self._cover(other.radius)
        assert self.radius is not None
        counts = other.all_counts()
        radius = other.radius
        quarter = self.bins // 4
        while radius < self.radius:
            merged = counts.reshape(-1, 2).sum(axis=1)
            counts = np.zeros(self.bins, dtype=np.int64)
            counts[quarter : quarter + merged.size] = merged
            radius *= 2.0
        self.counts += counts

    def _add_zeros(self, count: int) -> None:
        if self.radius is None:
            self._pending += count
        else:
            self.counts[self.bins // 2] += count

    def all_counts(self, *, drop_zeros: bool = False) -> np.ndarray:
        """The counts with pending zeros in place (the bin of 0), or without any exact zero."""
        counts = self.counts.copy()
        counts[self.bins // 2] += self._pending - (self.zeros if drop_zeros else 0)
        return counts

    def folded(self, *, drop_zeros: bool = False) -> tuple[np.ndarray, float]:
        """The histogram of `|x|`: `bins / 2` counts over `[0, R]` and their bin width."""
        half = self.bins // 2
        counts = self.all_counts(drop_zeros=drop_zeros)
        return counts[half:] + counts[:half][::-1], self.width


@dataclass
class TensorStats:
    """Running statistics of one tensor: count, min, max and a streaming histogram.

    `keep_histogram=False` keeps min and max only: all `minmax` calibration needs, at about half
    the cost per batch.
    """

    bins: int = DEFAULT_BINS
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    keep_histogram: bool = True
    histogram: StreamingHistogram = field(init=False)

    def __post_init__(self) -> None:
        self.histogram = StreamingHistogram(self.bins)

    def update(self, values: np.ndarray) -> None:
        array = np.asarray(values)
        finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
        if finite.size == 0:
            return
        self.count += int(finite.size)
        self.min = min(self.min, float(np.min(finite)))
        self.max = max(self.max, float(np.max(finite)))
        if self.keep_histogram:
            self.histogram.add(finite)

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    def merge(self, other: TensorStats) -> None:
        """Add another shard's statistics of the same tensor (same bins, same histogram choice)."""
        if other.bins != self.bins or other.keep_histogram != self.keep_histogram:
            raise ValueError("cannot merge statistics gathered with different bins or histogram settings")
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if self.keep_histogram:
            self.histogram.merge(other.histogram)


def merge_statistics(shards: Iterable[Mapping[str, TensorStats]]) -> dict[str, TensorStats]:
    """Statistics of every shard's tensors merged into one per tensor (the shards are not changed)."""
    merged: dict[str, TensorStats] = {}
    for shard in shards:
        for name, stats in shard.items():
            if name not in merged:
                merged[name] = TensorStats(stats.bins, keep_histogram=stats.keep_histogram)
            merged[name].merge(stats)
    return merged


def compute_range(
    stats: TensorStats,
    method: CalibrationMethod,
    *,
    symmetric: bool,
    percentile: float = 99.99,
) -> tuple[float, float]:
    """The `(low, high)` range to quantize a tensor with these statistics over.

    `symmetric` says the quantizer is symmetric around zero (int8, zero point 0): thresholds are
    then searched on `|x|`. The result never exceeds the observed `[min, max]`.
    """
    if stats.count == 0:
        return 0.0, 0.0
    if method == "minmax":
        return stats.min, stats.max
    if not stats.keep_histogram:
        raise ValueError(f"calibration method '{method}' needs statistics collected with a histogram")
    if method == "percentile":
        return _percentile_range(stats, percentile, symmetric)
    if method == "entropy":
        threshold = entropy_threshold(stats.histogram, levels=_levels(stats, symmetric))
        return _within_observed(stats, -threshold, threshold)
    if method == "mse":
        return mse_range(stats, symmetric=symmetric)
    raise UserError(f"unknown calibration method '{method}'; choose one of: {', '.join(METHODS)}")


def _levels(stats: TensorStats, symmetric: bool) -> int:
    """Quantization levels covering `[0, threshold]`: all 256 of uint8 for one-signed data."""
    return 2 * SYMMETRIC_LEVELS if not symmetric and stats.min >= 0 else SYMMETRIC_LEVELS


def _within_observed(stats: TensorStats, low: float, high: float) -> tuple[float, float]:
    return max(stats.min, low), min(stats.max, high)


def _percentile_range(stats: TensorStats, percentile: float, symmetric: bool) -> tuple[float, float]:
    if not 0.0 < percentile <= 100.0:
        raise UserError(f"percentile must be in (0, 100], got {percentile}")
    fraction = percentile / 100.0
    if symmetric:
        counts, width = stats.histogram.folded()
        threshold = _quantile_edge(counts, fraction) * width
        return _within_observed(stats, -threshold, threshold)
    hist = stats.histogram
    edges = hist.edges()
    counts = hist.all_counts()
    high = min(edges[_quantile_edge(counts, fraction)], stats.max)
    # The low side: the same quantile of the mirrored histogram (of -x), mirrored back.
    low = max(edges[::-1][_quantile_edge(counts[::-1], fraction)], stats.min)
    return float(low), float(high)


def _quantile_edge(counts: np.ndarray, fraction: float) -> int:
    """The index of the upper edge of the bin where the cumulative count reaches `fraction`."""
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    if total == 0:
        return 0
    return int(np.searchsorted(cumulative, fraction * total, side="left")) + 1


def entropy_threshold(histogram: StreamingHistogram, *, levels: int = SYMMETRIC_LEVELS) -> float:
    """The `|x|` threshold minimizing KL(reference || quantized), TensorRT's entropy calibration."""
    # Exact zeros are left out: they cost nothing, and a spike of them (after a ReLU) would
    # otherwise make every threshold that merges the first bins look bad.
    counts, width = histogram.folded(drop_zeros=True)
    nonzero = np.nonzero(counts)[0]
    if nonzero.size == 0 or width == 0.0:
        return 0.0
    used = int(nonzero[-1]) + 1
    if used <= levels:
        # Fewer occupied bins than levels: every bin gets its own level, nothing to clip.
        return used * width
    counts = counts[:used].astype(np.float64)
    step = max(1, (used - levels) // MAX_CANDIDATES)
    candidates = list(range(levels, used + 1, step))
    if candidates[-1] != used:
        candidates.append(used)
    divergences = [_kl_after_quantizing(counts, stop, levels) for stop in candidates]
    best = candidates[int(np.argmin(divergences))]
    return best * width


def _kl_after_quantizing(counts: np.ndarray, stop: int, levels: int) -> float:
    """KL divergence between `counts` clipped at bin `stop` and its `levels`-level quantization."""
    reference = counts[:stop].copy()
    reference[-1] += counts[stop:].sum()  # the clipped outliers saturate into the last bin
    kept = counts[:stop]
    occupied = kept > 0
    level = (np.arange(stop) * levels) // stop  # which quantization level each bin falls in
    level_sum = np.bincount(level, weights=kept, minlength=levels)
    level_bins = np.bincount(level, weights=occupied.astype(np.float64), minlength=levels)
    spread = np.divide(level_sum, level_bins, out=np.zeros(levels), where=level_bins > 0)
    quantized = np.where(occupied, spread[level], 0.0)
    p = reference / reference.sum()
    q_total = quantized.sum()
    if q_total == 0:
        return math.inf
    q = quantized / q_total
    mask = p > 0
    # A reference bin that quantizes to nothing (the saturated last bin can) costs a smoothed amount.
    q_safe = np.where(q[mask] > 0, q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q_safe)))


def mse_range(stats: TensorStats, *, symmetric: bool) -> tuple[float, float]:
    """The range `s * [low, high]` (s in (0, 1]) with the least expected quantization error."""
    hist = stats.histogram
    counts = hist.all_counts(drop_zeros=True).astype(np.float64)  # zeros quantize exactly
    occupied = counts > 0
    centers, weights = hist.centers()[occupied], counts[occupied]
    if symmetric:
        low, high, steps = -stats.amax, stats.amax, 2 * (SYMMETRIC_LEVELS - 1)
    else:
        low, high, steps = min(stats.min, 0.0), max(stats.max, 0.0), 2 * SYMMETRIC_LEVELS - 1
    if high - low == 0.0:
        return stats.min, stats.max
    best_scale, best_error = 1.0, math.inf
    for scale in np.linspace(1.0 / MAX_CANDIDATES, 1.0, MAX_CANDIDATES):
        error = _expected_mse(centers, weights, low * scale, high * scale, steps)
        if error < best_error:
            best_scale, best_error = float(scale), error
    return _within_observed(stats, low * best_scale, high * best_scale)


def _expected_mse(centers: np.ndarray, weights: np.ndarray, low: float, high: float, steps: int) -> float:
    step = (high - low) / steps
    clipped = np.clip(centers, low, high)
    inside = centers == clipped
    error = np.where(inside, step * step / 12.0, (centers - clipped) ** 2)
    return float(np.dot(weights, error))


# --- gathering statistics by running the model -------------------------------------------


def with_outputs(model: Model, tensors: Sequence[str]) -> Model:
    """A copy of `model` whose graph outputs also include `tensors` (as float32)."""
    proto = model.to_onnx()
    existing = {output.name for output in proto.graph.output}
    for name in tensors:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return model.rebuilt(proto)


def split_batches(feed: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """`feed` in slices of at most `batch_size` rows along axis 0.

    Split only when every input has the same leading dimension (a batch); otherwise the feed is
    returned whole, since slicing inputs of different leading sizes would pair the wrong rows.
    """
    arrays = dict(feed)
    leading = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if batch_size <= 0 or len(leading) != 1 or None in leading:
        yield arrays
        return
    (rows,) = leading
    assert rows is not None
    if rows <= batch_size:
        yield arrays
        return
    for start in range(0, rows, batch_size):
        yield {name: a[start : start + batch_size] for name, a in arrays.items()}


def collect_statistics(
    model: Model,
    tensors: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    runner_factory: Callable[[Model], Runner],
    *,
    batch_size: int = 32,
    bins: int = DEFAULT_BINS,
    histograms: bool = True,
    progress: ProgressFn | None = None,
    total: int | None = None,
    on_batch: Callable[[dict[str, np.ndarray]], None] | None = None,
    on_outputs: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None,
) -> dict[str, TensorStats]:
    """Statistics of `tensors` over `feeds`, running `model` one bounded batch at a time.

    Graph inputs among `tensors` are read from the feeds; the others are added as graph outputs
    of a copy of the model. `on_batch` sees every batch that was run (the pass keeps a few for
    sensitivity analysis); `on_outputs` sees each batch with everything the run returned (the
    model's outputs and `tensors`).
    """
    stats = {name: TensorStats(bins, keep_histogram=histograms) for name in tensors}
    inputs = {tensor.name for tensor in model.graph.inputs}
    runner = runner_factory(with_outputs(model, [name for name in tensors if name not in inputs]))
    batches: Iterator[dict[str, np.ndarray]] = (
        batch for feed in feeds for batch in split_batches(feed, batch_size)
    )
    if progress is not None:
        batches = progress(batches, "calibrating", total=total)
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        outputs = runner.run(batch)
        if on_outputs is not None:
            on_outputs(batch, outputs)
        for name in tensors:
            stats[name].update(batch[name] if name in inputs else outputs[name])
    return stats


def collect_statistics_sharded(
    model: Model,
    tensors: Sequence[str],
    shards: Sequence[Sequence[Mapping[str, np.ndarray]]],
    runner_factory: Callable[[Model], Runner],
    *,
    batch_size: int = 32,
    bins: int = DEFAULT_BINS,
    histograms: bool = True,
) -> dict[str, TensorStats]:
    """`collect_statistics` over each shard of feeds, in parallel where Ray is running, merged.

    The result equals `collect_statistics` over all the shards' feeds in order (min/max exactly,
    histograms exactly up to values on bin edges). Each shard's task rebuilds the model from its
    serialized form and runs it with `runner_factory` (a module-level function, so it pickles).
    """
    from iropt.util.parallel import parallel_map

    serialized = model.to_onnx().SerializeToString()
    job = functools.partial(_shard_statistics, serialized, tuple(tensors), runner_factory, batch_size, bins,
                            histograms)
    return merge_statistics(parallel_map(job, [list(shard) for shard in shards]))


# Batches in one shard when calibration runs as Ray tasks: enough work per task to be worth
# sending the model and the feeds to a worker.
SHARD_BATCHES = 8


def collect_statistics_parallel(
    model: Model,
    tensors: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    runner_factory: Callable[[Model], Runner],
    *,
    batch_size: int = 32,
    bins: int = DEFAULT_BINS,
    histograms: bool = True,
    progress: ProgressFn | None = None,
    on_batch: Callable[[dict[str, np.ndarray]], None] | None = None,
    shard_batches: int = SHARD_BATCHES,
) -> dict[str, TensorStats]:
    """`collect_statistics`, over shards of `shard_batches` batches computed as parallel Ray
    tasks and merged, when this process is connected to Ray and the feeds make more than one
    shard; the same statistics (see `collect_statistics_sharded`).

    The feeds are read a wave of shards at a time (one shard per CPU of the cluster), so memory
    holds a wave of feeds, never the whole data set. `on_batch` sees every batch, in order.
    `runner_factory` must pickle (a module-level function) when the shards go to Ray.
    """
    ray = ray_if_running()
    if ray is None:
        return collect_statistics(model, tensors, feeds, runner_factory, batch_size=batch_size, bins=bins,
                                  histograms=histograms, progress=progress, on_batch=on_batch)
    batches: Iterator[dict[str, np.ndarray]] = (
        batch for feed in feeds for batch in split_batches(feed, batch_size)
    )
    if progress is not None:
        batches = progress(batches, "calibrating", total=None)
    shards = _shards(batches, shard_batches, on_batch)
    wave = max(2, int(ray.cluster_resources().get("CPU", 2)))
    current = list(itertools.islice(shards, wave))
    if len(current) < 2:  # one shard: a task would only add the cost of sending it
        return collect_statistics(model, tensors, current[0] if current else [], runner_factory,
                                  batch_size=batch_size, bins=bins, histograms=histograms)
    waves: list[dict[str, TensorStats]] = []
    while current:
        waves.append(collect_statistics_sharded(model, tensors, current, runner_factory, batch_size=batch_size,
                                                bins=bins, histograms=histograms))
        current = list(itertools.islice(shards, wave))
    return merge_statistics(waves)


def _shards(
    batches: Iterator[dict[str, np.ndarray]], size: int, on_batch: Callable[[dict[str, np.ndarray]], None] | None
) -> Iterator[list[dict[str, np.ndarray]]]:
    """The batches in lists of `size`, each batch shown to `on_batch` as it is read."""
    while True:
        shard = list(itertools.islice(batches, size))
        if not shard:
            return
        if on_batch is not None:
            for batch in shard:
                on_batch(batch)
        yield shard


def _shard_statistics(
    serialized: bytes, tensors: tuple[str, ...], runner_factory: Callable[[Model], Runner], batch_size: int,
    bins: int, histograms: bool, feeds: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, TensorStats]:
    model = Model.from_onnx(onnx.load_model_from_string(serialized))
    return collect_statistics(model, tensors, feeds, runner_factory, batch_size=batch_size, bins=bins,
                              histograms=histograms)


def rows_of(batch: Mapping[str, np.ndarray]) -> int:
    """Rows (leading dimension) of a feed's first input; 1 for a scalar."""
    first = next(iter(batch.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def limit_rows(feeds: Iterable[dict[str, np.ndarray]], limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    """The feeds up to `limit` rows in all (the last one sliced), or all of them."""
    seen = 0
    for feed in feeds:
        if limit is not None and seen >= limit:
            return
        rows = rows_of(feed)
        if limit is not None and seen + rows > limit:
            # Slice the batch when every input has that many rows; otherwise it goes whole.
            sliced = next(split_batches(feed, limit - seen))
            rows = rows_of(sliced)
            feed = sliced
        seen += rows
        yield feed


def collect_gram(
    model: Model,
    tensors: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    runner_factory: Callable[[Model], Runner],
    *,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> dict[str, np.ndarray]:
    """`X^T X` (float64 `[K, K]`) of each tensor over `feeds`, X being its values as rows of its
    last axis: what a layer reading the tensor sees (GPTQ's Hessian up to a factor)."""
    grams: dict[str, np.ndarray] = {}
    inputs = {tensor.name for tensor in model.graph.inputs}

    def accumulate(batch: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        for name in tensors:
            # One batch's product in float32 (half the time of float64; a batch's sum loses no
            # precision that matters next to GPTQ's damping), the running sum in float64.
            values = np.asarray(batch[name] if name in inputs else outputs[name], dtype=np.float32)
            rows = values.reshape(-1, values.shape[-1])
            gram = (rows.T @ rows).astype(np.float64)
            grams[name] = grams[name] + gram if name in grams else gram

    collect_statistics(model, tensors, feeds, runner_factory, batch_size=batch_size, histograms=False,
                       progress=progress, on_outputs=accumulate)
    return grams
