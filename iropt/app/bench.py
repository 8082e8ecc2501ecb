"""`iropt bench`: latency, throughput, session start time and peak memory of models on ONNX Runtime.

Each model runs in a process of its own, which makes its peak memory its own. The processes
come from a fresh server process that has imported the runtime once (multiprocessing's
forkserver; spawned where there is none), so no session or thread of the caller is inherited
and starting one costs no second import. The processes are started one at a time, so each session's start time
is measured on a quiet machine, and then take turns: every round, each model runs a share of the
iterations, in an order that rotates from round to round. Drift on a noisy machine (other jobs,
frequency changes) then falls on every model alike instead of on whichever ran last, and the
ratios against the first model are what to read.

Latency is the wall time of one `session.run` on one batch; throughput is batch rows per second
of median latency; the start time is building the session from the file (load, graph
optimizations, kernel setup); peak memory is the worker's peak resident memory above what it used
before building the session (interpreter, libraries and inputs excluded).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from iropt.errors import UserError, first_line
from iropt.io.load import load_model
from iropt.util.progress import ProgressFn, no_progress
from iropt.verify.feeds import InputSpec, model_inputs, open_feeds

Feeds = dict[str, np.ndarray]
PERCENTILES = (50, 95, 99)
_MIB = 2**20


@dataclass(frozen=True)
class BenchOptions:
    """What `iropt bench` takes; `runs` iterations per model, split over `rounds` turns."""

    models: tuple[Path, ...]
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0
    batch: int | None = None
    shapes: Mapping[str, list[int]] = field(default_factory=dict)
    inputs: str | None = None
    warmup: int = 10
    runs: int = 100
    rounds: int = 10
    optimization_level: str = "all"

    def check(self) -> None:
        """UserError for values that cannot work, before any model is loaded."""
        if not self.models:
            raise UserError("bench: give at least one model")
        for name, value, least in (("--runs", self.runs, 1), ("--rounds", self.rounds, 1),
                                   ("--warmup", self.warmup, 0), ("--threads", self.threads, 0)):
            if value < least:
                raise UserError(f"bench: {name} must be at least {least}, got {value}")
        if self.batch is not None and self.batch < 1:
            raise UserError(f"bench: --batch must be at least 1, got {self.batch}")
        if self.batch is not None and self.inputs is not None:
            raise UserError("bench: give --batch or --inputs, not both (the inputs' rows are the batch)")
        for path in self.models:
            if not path.is_file():
                raise UserError(f"bench: {path}: no such model file")
        from iropt.verify.runtime import check_providers

        check_providers(self.providers)


@dataclass
class ModelResult:
    """One model's measurements; latencies in seconds."""

    path: Path
    providers: list[str]
    batch: int
    start_seconds: float
    latencies: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    @property
    def throughput(self) -> float:
        """Batch rows per second at the median latency."""
        median = self.percentile(50)
        return self.batch / median if median > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        latency = {f"p{q}": self.percentile(q) * 1e3 for q in PERCENTILES}
        latency.update(mean=float(np.mean(self.latencies)) * 1e3, min=min(self.latencies) * 1e3,
                       max=max(self.latencies) * 1e3)
        return {
            "model": str(self.path),
            "providers": self.providers,
            "batch": self.batch,
            "runs": len(self.latencies),
            "session_start_ms": self.start_seconds * 1e3,
            "latency_ms": latency,
            "throughput_per_s": self.throughput,
            "peak_memory_mib": None if self.peak_memory_bytes is None else self.peak_memory_bytes / _MIB,
            "latencies_ms": [value * 1e3 for value in self.latencies],
        }


@dataclass
class BenchResult:
    options: BenchOptions
    models: list[ModelResult]

    def ratios(self) -> list[dict[str, float | None]]:
        """Per model, each figure divided by the first model's (latency, start, memory, throughput)."""
        first = self.models[0]
        return [_ratios(first, other) for other in self.models]

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": {
                "providers": list(self.options.providers), "threads": self.options.threads,
                "batch": self.options.batch, "shapes": dict(self.options.shapes),
                "inputs": self.options.inputs, "warmup": self.options.warmup, "runs": self.options.runs,
                "rounds": self.options.rounds, "optimization_level": self.options.optimization_level,
            },
            "models": [model.to_dict() for model in self.models],
            "ratios_to_first": self.ratios(),
        }


def _ratios(first: ModelResult, other: ModelResult) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    figures = {f"p{q}": ratio(other.percentile(q), first.percentile(q)) for q in PERCENTILES}
    figures["session_start"] = ratio(other.start_seconds, first.start_seconds)
    figures["throughput"] = ratio(other.throughput, first.throughput)
    memory = ratio(
        None if other.peak_memory_bytes is None else float(other.peak_memory_bytes),
        None if first.peak_memory_bytes is None else float(first.peak_memory_bytes),
    )
    figures["peak_memory"] = memory
    return figures


# --- inputs ---------------------------------------------------------------------------------


def prepare_feeds(path: Path, options: BenchOptions) -> Feeds:
    """One feed for `path`: read from --inputs, or generated at --batch / --shape."""
    model = load_model(path)
    shapes = batch_shapes(model_inputs(model), options.batch, options.shapes)
    with _quiet_feeds():
        feeds = open_feeds(options.inputs, model, shapes=shapes, count=1)
    return dict(feeds.feeds[0])


def batch_shapes(
    inputs: Sequence[InputSpec], batch: int | None, shapes: Mapping[str, list[int]]
) -> dict[str, list[int]]:
    """`--shape` overrides, plus `batch` as the leading dimension of inputs whose first dim is dynamic."""
    result = {name: list(dims) for name, dims in shapes.items()}
    if batch is None:
        return result
    for spec in inputs:
        if spec.name in result or not spec.shape:
            continue
        leading = spec.shape[0]
        if isinstance(leading, int):
            if leading != batch:
                raise UserError(
                    f"bench: input '{spec.name}' has a fixed batch of {leading}, so --batch {batch} "
                    "cannot apply (export the model with a dynamic batch dimension)"
                )
            continue
        result[spec.name] = [batch] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    return result


@contextmanager
def _quiet_feeds() -> Iterator[None]:
    """Generated inputs are what a benchmark wants: their warning about real data is noise here."""
    logger = logging.getLogger("iropt.verify.feeds")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rows(feeds: Feeds) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


# --- the worker processes -------------------------------------------------------------------


def _resident_bytes() -> int | None:
    """The current resident memory of this process (Linux), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_bytes() -> int | None:
    """The peak resident memory of this process, where the platform reports it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


def _worker(conn: Connection, path: str, feeds: Feeds, session_options: dict[str, Any], warmup: int) -> None:
    """Build a session, warm it up, then run batches on request until told to stop."""
    try:
        from iropt.verify.runtime import make_session

        baseline = _resident_bytes()
        started = time.perf_counter()
        session = make_session(path, **session_options)
        start_seconds = time.perf_counter() - started
        names = [output.name for output in session.get_outputs()]
        wanted = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
        for _ in range(warmup):
            session.run(names, wanted)
        conn.send(("ready", start_seconds, list(session.get_providers())))
        while True:
            command, count = conn.recv()
            if command != "run":
                break
            latencies = []
            for _ in range(count):
                before = time.perf_counter()
                session.run(names, wanted)
                latencies.append(time.perf_counter() - before)
            conn.send(("ran", latencies))
        peak = _peak_bytes()
        added = None if peak is None or baseline is None else max(peak - baseline, 0)
        conn.send(("done", added))
    except Exception as error:  # reported to the parent, which names the model
        conn.send(("error", first_line(error)))
    finally:
        conn.close()


@dataclass
class _Worker:
    path: Path
    process: Any
    conn: Connection
    result: ModelResult | None = None

    def ask(self, message: tuple[str, int]) -> tuple[Any, ...]:
        self.conn.send(message)
        return self.receive()

    def receive(self) -> tuple[Any, ...]:
        try:
            reply: tuple[Any, ...] = self.conn.recv()
        except EOFError as error:
            raise UserError(f"bench: {self.path}: the benchmark process died (out of memory?)") from error
        if reply[0] == "error":
            raise UserError(f"bench: {self.path}: {reply[1]}")
        return reply


def run_bench(options: BenchOptions, progress: ProgressFn = no_progress) -> BenchResult:
    """Measure every model of `options`; UserError for a model that cannot be loaded or run."""
    options.check()
    feeds = [prepare_feeds(path, options) for path in options.models]
    session_options = {
        "providers": list(options.providers),
        "intra_op_threads": options.threads,
        "optimization_level": options.optimization_level,
    }
    context = _process_context()
    workers: list[_Worker] = []
    try:
        for path, feed in zip(options.models, feeds, strict=True):
            workers.append(_start(context, path, feed, session_options, options.warmup))
        _interleave(workers, options, progress)
        for worker in workers:
            (_, added) = worker.ask(("stop", 0))
            assert worker.result is not None
            worker.result.peak_memory_bytes = added
    finally:
        for worker in workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.terminate()
    return BenchResult(options, [w.result for w in workers if w.result is not None])


def _process_context() -> Any:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["iropt.verify.runtime"])
        return context
    return multiprocessing.get_context("spawn")


def _start(context: Any, path: Path, feeds: Feeds, session_options: dict[str, Any], warmup: int) -> _Worker:
    parent, child = context.Pipe()
    process = context.Process(
        target=_worker, args=(child, str(path), feeds, session_options, warmup), daemon=True
    )
    process.start()
    child.close()
    worker = _Worker(path, process, parent)
    _, start_seconds, providers = worker.receive()
    worker.result = ModelResult(path, providers, _rows(feeds), start_seconds)
    return worker


def _interleave(workers: list[_Worker], options: BenchOptions, progress: ProgressFn) -> None:
    """`runs` iterations per model in `rounds` turns; the order rotates every round."""
    rounds = min(options.rounds, options.runs)
    shares = [options.runs // rounds + (1 if r < options.runs % rounds else 0) for r in range(rounds)]
    for round_index in progress(range(rounds), "benchmarking", total=rounds):
        shift = round_index % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            (_, latencies) = worker.ask(("run", shares[round_index]))
            assert worker.result is not None
            worker.result.latencies.extend(latencies)


# --- output ---------------------------------------------------------------------------------


def check_plot_available() -> None:
    """UserError naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise UserError(
            "bench: --plot needs matplotlib, which is not installed; install it with "
            "pip install 'iropt[plot]' (or leave out --plot)"
        ) from error


def plot_latencies(result: BenchResult, path: Path) -> None:
    """Latency distributions, one violin per model, with the p50/p95/p99 marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(4.0, 1.8 * len(result.models) + 2), 4.5))
    data = [np.asarray(model.latencies) * 1e3 for model in result.models]
    positions = list(range(1, len(data) + 1))
    axes.violinplot(data, positions=positions, showmedians=True)
    for position, model in zip(positions, result.models, strict=True):
        for q, marker in zip(PERCENTILES, ("o", "^", "v"), strict=True):
            axes.plot(position, model.percentile(q) * 1e3, marker, color="black", markersize=4)
    axes.set_xticks(positions)
    axes.set_xticklabels([model.path.name for model in result.models], rotation=15, ha="right")
    axes.set_ylabel("latency per batch (ms)")
    axes.set_title("latency distribution (markers: p50, p95, p99)")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def check_output_file(path: Path, suffix: str | None, models: Sequence[Path]) -> None:
    """UserError unless `path` can be written: its folder exists, it is no model, right suffix."""
    if not path.resolve().parent.is_dir():
        raise UserError(f"bench: {path}: the folder does not exist")
    if suffix is not None and path.suffix.lower() != suffix:
        raise UserError(f"bench: {path}: the plot is written as PNG; give a file name ending in {suffix}")
    if any(path.resolve() == model.resolve() for model in models):
        raise UserError(f"bench: {path} is one of the models; choose another output file")


def bench_table(result: BenchResult) -> Any:
    """Models side by side; after the first, each figure with its ratio to the first model's."""
    from rich.table import Table

    table = Table(title="bench (ratios against the first model)", title_justify="left", show_edge=False)
    table.add_column("model")
    table.add_column("providers")
    for header in ("start ms", "p50 ms", "p95 ms", "p99 ms", "rows/s", "peak MiB"):
        table.add_column(header, justify="right")
    for model, ratios in zip(result.models, result.ratios(), strict=True):
        first = model is result.models[0]
        memory = model.peak_memory_bytes
        cells = [
            _cell(model.start_seconds * 1e3, ratios["session_start"], first),
            *(_cell(model.percentile(q) * 1e3, ratios[f"p{q}"], first) for q in PERCENTILES),
            _cell(model.throughput, ratios["throughput"], first, digits=1),
            "n/a" if memory is None else _cell(memory / _MIB, ratios["peak_memory"], first, digits=1),
        ]
        table.add_row(model.path.name, ", ".join(p.removesuffix("ExecutionProvider") for p in model.providers),
                      *cells)
    return table


def _cell(value: float, ratio: float | None, first: bool, digits: int = 3) -> str:
    text = f"{value:.{digits}f}"
    if first or ratio is None:
        return text
    return f"{text} ({ratio:.2f}x)"
