"""What iropt prints: the per-pass table, comparisons, model summaries and progress bars."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import onnx_graphsurgeon as gs
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iropt.infra.pass_manager import PassRecord
from iropt.ir.graph import is_default_domain, iter_graphs
from iropt.ir.model import GraphStats, Model, graph_stats

T = TypeVar("T")

# Piped output (files, CI logs) gets a wide fixed width so tables are not squeezed to 80 columns.
_PIPED_WIDTH = 160
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else _PIPED_WIDTH)
stderr = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else _PIPED_WIDTH)


# Without a terminal (a log file, CI, a pipe) a phase gets one line on stderr, when it is
# expected to take at least this long: calibration, sensitivity analysis, long verifications.
LONG_PHASE_SECONDS = 2.0


def make_progress(enabled: bool) -> Any:
    """A `progress(items, description, total=None)` function: bars on a terminal's stderr,
    one line per long phase on any other stderr."""

    def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if not enabled:
            yield from items
            return
        if not sys.stderr.isatty():
            yield from _phase_line(items, description, total)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=stderr, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)

    return progress


def _phase_line(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    """Yields `items`, and prints one line once the phase looks long: after the first item, from
    the time it took and `total`; without a total, once it has run LONG_PHASE_SECONDS."""
    start = time.perf_counter()
    announced = False
    for done, item in enumerate(items, 1):
        yield item
        if announced:
            continue
        elapsed = time.perf_counter() - start
        expected = elapsed / done * total if total else elapsed
        if expected >= LONG_PHASE_SECONDS:
            size = f" {total} steps, about {expected:.0f} s" if total else ""
            stderr.print(f"iropt: {description}...{size}", markup=False)
            announced = True


class PhaseProgress:
    """A `progress(phase, done, total)` callback (engine builds) drawing one bar per phase, or
    without a terminal one line per phase on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars = sys.stderr.isatty()
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if not self.bars:
            if phase not in self._tasks:
                self._tasks[phase] = None
                stderr.print(f"iropt: {phase} ({total} steps)", markup=False)
            return
        if self._bar is None:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=stderr, transient=True)
            self._bar.start()
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(phase, total=total)
        self._bar.update(self._tasks[phase], completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _delta(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return ""
    before, after = pair
    if before == after:
        return f"{after:,}"
    return f"{after:,} ({after - before:+,})"


def pass_table(records: list[PassRecord], initial: GraphStats | None, final: GraphStats | None) -> Table:
    """One row per pass execution: time, nodes, parameters, bytes, changed, statistics."""
    table = Table(title="passes", title_justify="left", show_edge=False)
    for header, justify in (
        ("#", "right"), ("pass", "left"), ("block", "left"), ("ms", "right"), ("nodes", "right"),
        ("params", "right"), ("bytes", "right"), ("changed", "center"), ("stats", "left"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for r in records:
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v)
        table.add_row(
            str(r.index), r.name, r.block, f"{(r.seconds or 0) * 1000:.1f}", _delta(r.nodes),
            _delta(r.parameters), _delta(r.parameter_bytes), "yes" if r.changed else "", stats,
        )
    if initial is None or final is None:
        return table
    table.add_section()
    table.add_row(
        "", "total", "", f"{sum(r.seconds or 0 for r in records) * 1000:.1f}",
        _delta((initial.nodes, final.nodes)), _delta((initial.parameters, final.parameters)),
        _delta((initial.parameter_bytes, final.parameter_bytes)), "", "",
    )
    return table


def table_of(title: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]]) -> Table:
    """A plain table: `columns` as (header, justify) pairs, then the rows' cells."""
    table = Table(title=title, title_justify="left", show_edge=False)
    for header, justify in columns:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    return table


def model_summary(model: Model) -> dict[str, Any]:
    """The facts `iropt inspect` shows, as plain data (also its --json output)."""
    stats = graph_stats(model)
    ops: Counter[str] = Counter()
    for graph in iter_graphs(model.graph):
        ops.update(n.op if is_default_domain(n.domain) else f"{n.domain}::{n.op}" for n in graph.nodes)
    return {
        "path": str(model.source_path) if model.source_path else None,
        "opset": {"": model.opset, **{d.domain: d.version for d in model.graph.import_domains or [] if d.domain}},
        "ir_version": model.graph.ir_version,
        "producer": f"{model.graph.producer_name} {model.graph.producer_version}".strip(),
        "nodes": stats.nodes,
        "parameters": stats.parameters,
        "parameter_bytes": stats.parameter_bytes,
        "inputs": [_tensor_info(t) for t in model.graph.inputs],
        "outputs": [_tensor_info(t) for t in model.graph.outputs],
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _tensor_info(tensor: gs.Tensor) -> dict[str, Any]:
    shape = None if tensor.shape is None else [d if isinstance(d, int) else str(d) for d in tensor.shape]
    dtype = getattr(tensor.dtype, "__name__", None) or (str(tensor.dtype) if tensor.dtype is not None else None)
    return {"name": tensor.name, "shape": shape, "dtype": dtype}


def print_model_summary(summary: dict[str, Any]) -> None:
    stdout.print(f"[bold]{summary['path'] or 'model'}[/bold]")
    opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in summary["opset"].items())
    stdout.print(f"opset {opsets}; IR version {summary['ir_version']}; producer {summary['producer'] or '-'}")
    stdout.print(
        f"{summary['nodes']:,} nodes, {summary['parameters']:,} parameters, "
        f"{summary['parameter_bytes']:,} bytes of parameters"
    )
    io = Table(show_edge=False)
    for column in ("", "name", "dtype", "shape"):
        io.add_column(column)
    for kind in ("inputs", "outputs"):
        for t in summary[kind]:
            shape = "?" if t["shape"] is None else "x".join(str(d) for d in t["shape"]) or "scalar"
            io.add_row(kind[:-1], t["name"], t["dtype"] or "?", shape)
    stdout.print(io)
    ops = Table(title="ops", title_justify="left", show_edge=False)
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in summary["ops"].items():
        ops.add_row(op, str(count))
    stdout.print(ops)
