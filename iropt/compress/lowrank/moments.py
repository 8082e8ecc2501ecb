"""Second moments of the layers' input rows, streamed over calibration batches.

Per row source a K x K sum of `x x^T`, a sum of `x` and a count: memory grows with the layers'
widths, never with the number of samples. For the least-squares re-fit, the sums of `x~ x~^T` and
`x~ x^T` pair each input of the factorized network (`x~`) with the original network's (`x`) on
the same batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from iropt.compress.calibration import rows_of, split_batches, with_outputs
from iropt.compress.lowrank.layers import RowSource
from iropt.ir.model import Model
from iropt.util.progress import ProgressFn
from iropt.verify.runner import Runner

Feeds = Mapping[str, np.ndarray]
# Rows multiplied at once: bounds the patch matrix of a Conv with many output positions.
CHUNK_ROWS = 8192


class Moments:
    """Running sums of `x x^T` and `x` over rows x of length `dim` (float64)."""

    def __init__(self, dim: int) -> None:
        self.gram = np.zeros((dim, dim))
        self.total = np.zeros(dim)
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            chunk = np.asarray(rows[start : start + CHUNK_ROWS], dtype=np.float64)
            self.gram += chunk.T @ chunk
            self.total += chunk.sum(axis=0)
            self.count += chunk.shape[0]

    def merge(self, other: Moments) -> None:
        """Add another shard's sums: shards gathered apart (in parallel) merge into the whole."""
        if other.gram.shape != self.gram.shape:
            raise ValueError(f"cannot merge moments of {other.gram.shape[0]} and {self.gram.shape[0]} features")
        self.gram += other.gram
        self.total += other.total
        self.count += other.count

    @property
    def second(self) -> np.ndarray:
        """E[x x^T]."""
        return self.gram / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


class CrossMoments:
    """Running sums of `x~ x~^T` and `x~ x^T` for rows of the factorized (`x~`) and original (`x`) network."""

    def __init__(self, dim: int) -> None:
        self.gram = np.zeros((dim, dim))
        self.cross = np.zeros((dim, dim))
        self.count = 0

    def add(self, approx: np.ndarray, exact: np.ndarray) -> None:
        for start in range(0, approx.shape[0], CHUNK_ROWS):
            a = np.asarray(approx[start : start + CHUNK_ROWS], dtype=np.float64)
            x = np.asarray(exact[start : start + CHUNK_ROWS], dtype=np.float64)
            self.gram += a.T @ a
            self.cross += a.T @ x
            self.count += a.shape[0]


def _batches(
    feeds: Iterable[Feeds], batch_size: int, progress: ProgressFn | None, what: str
) -> Iterator[dict[str, np.ndarray]]:
    batches: Iterator[dict[str, np.ndarray]] = (
        batch for feed in feeds for batch in split_batches(feed, batch_size)
    )
    return progress(batches, what) if progress is not None else batches


def _tensor_runner(model: Model, tensors: Sequence[str], factory: Callable[[Model], Runner]) -> Runner:
    inputs = {tensor.name for tensor in model.graph.inputs}
    return factory(with_outputs(model, [name for name in tensors if name not in inputs]))


def _values(batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return batch[name] if name in batch else outputs[name]


def collect_moments(
    model: Model,
    sources: Sequence[RowSource],
    feeds: Iterable[Feeds],
    runner_factory: Callable[[Model], Runner],
    dims: Mapping[RowSource, int],
    *,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> tuple[dict[RowSource, Moments], int]:
    """Moments of every source's rows over `feeds`, and the number of samples (batch rows) seen."""
    moments = {source: Moments(dims[source]) for source in sources}
    runner = _tensor_runner(model, sorted({s.tensor for s in sources}), runner_factory)
    samples = 0
    for batch in _batches(feeds, batch_size, progress, "low_rank: input statistics"):
        outputs = runner.run(batch)
        samples += rows_of(batch)
        for source in sources:
            moments[source].add(source.rows(_values(batch, outputs, source.tensor)))
    return moments, samples


def collect_cross_moments(
    original: Model,
    factorized: Model,
    sources: Sequence[RowSource],
    feeds: Iterable[Feeds],
    runner_factory: Callable[[Model], Runner],
    dims: Mapping[RowSource, int],
    *,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> dict[RowSource, CrossMoments]:
    """Cross moments of each source's rows in `factorized` against `original`, batch by batch."""
    moments = {source: CrossMoments(dims[source]) for source in sources}
    names = sorted({s.tensor for s in sources})
    exact_runner = _tensor_runner(original, names, runner_factory)
    approx_runner = _tensor_runner(factorized, names, runner_factory)
    for batch in _batches(feeds, batch_size, progress, "low_rank: re-fit statistics"):
        exact, approx = exact_runner.run(batch), approx_runner.run(batch)
        for source in sources:
            moments[source].add(
                source.rows(_values(batch, approx, source.tensor)),
                source.rows(_values(batch, exact, source.tensor)),
            )
    return moments

