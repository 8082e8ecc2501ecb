"""iropt's `default` schedule against the graph simplifiers people use today, side by side.

Tools: iropt (`default` schedule, in-process `optimize(...)`, verification off), onnxsim
(`simplify`), onnxslim (`slim`), onnxoptimizer (its fuse-and-eliminate passes) and
onnx-graphsurgeon (`fold_constants().cleanup().toposort()`). Models: the golden models and the
`light_*` models that ship inside the onnx package (opset 9 CNNs whose weights are built by
ConstantOfShape nodes, so constant folding decides most of the result).

Per model and tool:
- wall time (and CPU time): median over a few runs, each from a fresh load of the file; load
  and save are included for every tool (iropt's `optimize` loads and saves, so the peers do
  too). The first run is a warm-up and is not counted, except for runs of a second or more,
  which run once. iropt runs as `iropt run` does by default; the breakdown section also
  times it with the per-pass ONNX checker (`--check-each`) switched the other way.
- nodes after (all graphs, subgraphs included) and model bytes after (the saved file).
- equivalence: outputs of the result against the original, both through ORT with graph
  optimizations off, on two generated feeds (seed 0), rtol=1e-3, atol=1e-4.
- ORT latency of the result: CPU, 1 intra-op thread, ORT's default ALL optimization level,
  the original and every result timed round by round.
- iropt / best peer: the ratio to the lowest value among the peers whose result is equivalent.

Each tool lives in a child process of its own for the whole bench (onnxsim alone takes
seconds to import), and the parent drives them in lockstep: per model, one run of each tool
per round, so load on the machine hits every tool alike. A tool that raises, crashes or hangs
on a model is recorded as "failed: <reason>" and its child is restarted for the next model.
Run: `.venv/bin/python bench/peers.py [--models resnet,light_vgg19] [--add more.onnx]`.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import golden_models, markdown_table
from encoders import encoder_models
from latency import (
    PYTHON,
    count_nodes,
    fmt,
    interleaved_latency_ms,
    op_histogram,
    ort_ops,
    paired_latency,
    run_outputs,
    session,
)

TOOLS = ["iropt", "onnxsim", "onnxslim", "onnxoptimizer", "graphsurgeon"]
PEERS = TOOLS[1:]
RTOL, ATOL = 1e-3, 1e-4
# A tool gets this long per model (all its timed runs) before it counts as hung.
MODEL_TIMEOUT_S = 300.0


def light_models() -> list[Path]:
    """The `light_*` conformance models shipped in the onnx package."""
    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return sorted(folder.glob("light_*.onnx"))


def all_models(scratch: Path) -> list[Path]:
    """Golden models, the onnx package's light models, and BERT-style encoders built in `scratch`."""
    return golden_models() + light_models() + encoder_models(scratch / "encoders")


# --- the tools (each: load the file, transform, save; in the worker process) -----------------


def _run_iropt(src: Path, dst: Path, check_each: bool | None = None) -> dict[str, Any]:
    """`iropt run default --no-verify`; `check_each` None keeps `iropt run`'s own default."""
    from iropt.app.optimize import RunOptions, optimize

    options = RunOptions(schedule="default", model=src, output=dst, verify=False)
    if check_each is not None:
        options.check_each = check_each
    outcome = optimize(options)
    passes: dict[str, float] = {}
    for record in outcome.report.records:
        passes[record.name] = passes.get(record.name, 0.0) + (record.seconds or 0.0)
    return {"passes": passes, "pass_runs": len(outcome.report.records)}


def _run_onnxsim(src: Path, dst: Path) -> dict[str, Any]:
    from onnxsim import simplify

    model, ok = simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim reported that its result failed its own check")
    onnx.save(model, str(dst))
    return {}


def _run_onnxslim(src: Path, dst: Path) -> dict[str, Any]:
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))
    return {}


def _run_onnxoptimizer(src: Path, dst: Path) -> dict[str, Any]:
    import onnxoptimizer

    model = onnxoptimizer.optimize(onnx.load(str(src)), onnxoptimizer.get_fuse_and_elimination_passes())
    onnx.save(model, str(dst))
    return {}


def _run_graphsurgeon(src: Path, dst: Path) -> dict[str, Any]:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(str(src)))
    graph.fold_constants().cleanup().toposort()
    onnx.save(gs.export_onnx(graph), str(dst))
    return {}


RUNNERS: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
    "iropt": _run_iropt,
    "onnxsim": _run_onnxsim,
    "onnxslim": _run_onnxslim,
    "onnxoptimizer": _run_onnxoptimizer,
    "graphsurgeon": _run_graphsurgeon,
}


# --- worker processes: one per tool, driven in lockstep ------------------------------------


def serve(tool: str) -> None:
    """Child process: for each request line on stdin, run `tool` once, reply with one JSON line.

    A request is {"src", "dst", "check_each" (iropt only; null: the default)}; the reply has wall `seconds`, `cpu` seconds and
    the tool's extra figures, or `error`. Whatever the tool itself prints goes to stderr, so
    stdout carries replies only.
    """
    import logging
    import os

    logging.disable(logging.WARNING)  # the peers' and iropt's warnings are not results
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        src, dst = Path(request["src"]), Path(request["dst"])
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            if tool == "iropt":
                extra = _run_iropt(src, dst, check_each=request.get("check_each"))
            else:
                extra = RUNNERS[tool](src, dst)
            reply = {**extra, "seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        except Exception as error:
            reply = {"error": f"{type(error).__name__}: {_first_line(error)}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:160]


class ToolWorker:
    """The parent's handle on one tool's child process; restarted after a crash or a hang."""

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_tail: list[str] = []

    def _start(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [PYTHON, __file__, "--serve", self.tool],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines = queue.Queue()
        self.stderr_tail = []
        threading.Thread(target=_pump, args=(proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=_tail, args=(proc.stderr, self.stderr_tail), daemon=True).start()
        self.proc = proc
        return proc

    def request(self, src: Path, dst: Path, *, check_each: bool | None = None) -> dict[str, Any]:
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"src": str(src), "dst": str(dst), "check_each": check_each}) + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + MODEL_TIMEOUT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close(kill=True)
                return {"error": f"timed out after {MODEL_TIMEOUT_S:.0f} s"}
            if line is None:
                proc.wait()
                reason = self.stderr_tail[-1] if self.stderr_tail else "no message"
                self.proc = None
                return {"error": f"crashed (exit {proc.returncode}): {reason[:160]}"}
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                return result

    def close(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.strip())
    lines.put(None)


def _tail(stream: Any, tail: list[str]) -> None:
    for line in stream:
        if line.strip():
            tail.append(line.strip())
            del tail[:-5]


def _short(result: dict[str, Any]) -> str:
    return "failed" if "error" in result else f"{result['seconds'] * 1000:.0f} ms"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# A "job" is a tool, or iropt without its per-pass checker (to show what the checker costs).
def _checks_each_pass_by_default() -> bool:
    from iropt.app.optimize import RunOptions

    return bool(RunOptions(schedule="default", model=Path("m.onnx")).check_each)


# The extra job: iropt with the per-pass ONNX checker switched the other way from `iropt run`'s
# default, to show what the checker costs.
CHECKER_DEFAULT = _checks_each_pass_by_default()
OTHER_CHECK = f"iropt ({'without' if CHECKER_DEFAULT else 'with'} the per-pass checker)"


def _repeats(first_seconds: float) -> int:
    """Timed runs after the warm-up: none for runs of a second or more (the warm-up run is then
    the measurement: the peers fold the light models to hundreds of MB, and repeating that
    would blow the time budget), more for quick runs, whose noise is relatively larger."""
    if first_seconds >= 1.0:
        return 0
    return 11 if first_seconds < 0.1 else 3


def time_model(
    src: Path, out_dir: Path, workers: dict[str, ToolWorker]
) -> dict[str, dict[str, Any]]:
    """Every tool's median wall and CPU time on `src`, runs interleaved across tools.

    Round by round (one run of each tool per round), so that load on the machine hits every
    tool alike. The first run of each is a warm-up (see `_repeats`). Extra figures (iropt's
    per-pass times) are from the last run.
    """
    jobs = [*workers, *([OTHER_CHECK] if "iropt" in workers else [])]

    def run(job: str) -> dict[str, Any]:
        tool = "iropt" if job == OTHER_CHECK else job
        dst = out_dir / f"{src.stem}.{'iropt-other-check' if job == OTHER_CHECK else job}.onnx"
        result = workers[tool].request(src, dst, check_each=(not CHECKER_DEFAULT) if job == OTHER_CHECK else None)
        result["output"] = str(dst)
        return result

    first = {job: run(job) for job in jobs}
    runs: dict[str, list[dict[str, Any]]] = {}
    needed: dict[str, int] = {}
    for job, result in first.items():
        if "error" not in result:
            needed[job] = _repeats(result["seconds"])
            runs[job] = [] if needed[job] else [result]
    failed = {job: result for job, result in first.items() if "error" in result}
    for round_ in range(max(needed.values(), default=0)):
        for job in jobs:
            if job in failed or round_ >= needed.get(job, 0):
                continue
            result = run(job)
            if "error" in result:
                failed[job] = result
            else:
                runs[job].append(result)
    timed: dict[str, dict[str, Any]] = dict(failed)
    for job, results in runs.items():
        if job in failed:
            continue
        timed[job] = {
            **results[-1],
            "seconds": statistics.median(r["seconds"] for r in results),
            "cpu": statistics.median(r["cpu"] for r in results),
            "runs": len(results),
        }
    return timed


@dataclass
class Measured:
    """What the parent measured on one tool's result for one model."""

    nodes: int | None = None
    bytes: int | None = None
    equivalent: bool | None = None
    max_abs: float | None = None
    latency_ms: float | None = None
    ops: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    # iropt's result against the original, timed as a pair (see `paired_latency`).
    ratio_to_original: float | None = None
    # The ops ONNX Runtime runs after its own fusions (empty: not looked at).
    ort_ops: dict[str, int] = field(default_factory=dict)


def measure_model(path: Path, results: dict[str, dict[str, Any]]) -> tuple[Measured, dict[str, Measured]]:
    """The original's figures, and each tool's result checked and timed the same way.

    Latencies of the original and of every result are measured round by round (one run of
    each per round), so machine noise hits them alike.
    """
    import logging

    from iropt.io.load import load_model
    from iropt.verify.compare import compare
    from iropt.verify.criteria import Criterion
    from iropt.verify.feeds import open_feeds

    logging.disable(logging.WARNING)  # "inputs are generated" is expected here
    stored = path.with_suffix(".inputs.npz")
    feeds = open_feeds(str(stored) if stored.is_file() else None, load_model(path), count=2, seed=0).feeds[:2]
    reference = session(path, level="disable")
    expected = [run_outputs(reference, feed) for feed in feeds]
    del reference
    criterion = Criterion(metric="tolerance", rtol=RTOL, atol=ATOL)
    original = _static(path)
    measured: dict[str, Measured] = {}
    timed = {"(original)": session(path)}
    for tool, result in results.items():
        if tool == OTHER_CHECK:
            continue
        if "error" in result:
            measured[tool] = Measured(error=result["error"])
            continue
        out = Path(result["output"])
        figures = _static(out)
        try:
            candidate = session(out, level="disable")
            comparison = compare(expected, [run_outputs(candidate, f) for f in feeds], criterion)
            del candidate
            figures.equivalent = comparison.passed
            errors = [o.max_abs for o in comparison.outputs if o.max_abs is not None]
            figures.max_abs = max(errors) if errors else None
            timed[tool] = session(out)
        except Exception as error:  # ORT refusing a peer's output is a result, not a crash
            figures.equivalent = False
            figures.error = f"ORT: {type(error).__name__}: {_first_line(error)}"
        measured[tool] = figures
    latencies = interleaved_latency_ms(timed, feeds[0], budget_s=2.0, min_rounds=3)
    original.latency_ms = latencies.pop("(original)")
    for tool, ms in latencies.items():
        measured[tool].latency_ms = ms
    if "iropt" in timed:
        # The pair alone: the peers' sessions (hundreds of MB each for the light models) go first.
        pair = {key: timed[key] for key in ("(original)", "iropt")}
        timed.clear()
        _against_original(path, Path(results["iropt"]["output"]), pair, feeds[0], measured["iropt"], original)
    return original, measured


# The pair is timed for this long, and at least this many rounds: a 1.02 limit needs the noise
# of a loaded 2-core machine well under 2% (each round's ratio, then their median).
PAIR_BUDGET_S = 6.0
PAIR_MIN_ROUNDS = 15

# Past this size the ORT-optimized copy (written to list its ops) costs more than it tells.
ORT_OPS_MAX_BYTES = 64 * 2**20


def _against_original(
    path: Path, output: Path, timed: dict[str, Any], feed: dict[str, Any], ours: Measured, original: Measured
) -> None:
    """iropt's result against the input on ONNX Runtime: the latency ratio of the pair, timed
    alone, and the ops ORT runs for each after its own fusions."""
    _, _, ours.ratio_to_original = paired_latency(
        timed["(original)"], timed["iropt"], feed, budget_s=PAIR_BUDGET_S, min_rounds=PAIR_MIN_ROUNDS
    )
    if max(path.stat().st_size, output.stat().st_size) <= ORT_OPS_MAX_BYTES:
        with tempfile.TemporaryDirectory(prefix="iropt-bench-ort-ops-") as tmp:
            original.ort_ops, ours.ort_ops = ort_ops(path, Path(tmp)), ort_ops(output, Path(tmp))


def _static(path: Path) -> Measured:
    proto = onnx.load(str(path))
    return Measured(nodes=count_nodes(proto.graph), bytes=path.stat().st_size, ops=op_histogram(proto.graph))


# --- report --------------------------------------------------------------------------------


@dataclass
class ModelRow:
    name: str
    original: Measured
    measured: dict[str, Measured]
    runs: dict[str, dict[str, Any]]

    def value(self, tool: str, metric: str) -> float | None:
        if metric in ("seconds", "cpu"):
            run = self.runs.get(tool, {})
            return None if "error" in run else run.get(metric)
        figures = self.measured.get(tool)
        return None if figures is None else getattr(figures, metric)

    def best_peer(self, metric: str) -> tuple[str, float] | None:
        """The peer with the lowest value; a peer whose result is not equivalent does not count."""
        known = []
        for tool in PEERS:
            value, figures = self.value(tool, metric), self.measured.get(tool)
            if value is not None and figures is not None and figures.equivalent:
                known.append((tool, value))
        return min(known, key=lambda tv: tv[1]) if known else None


METRICS = [
    ("seconds", "Optimizer wall time, ms (load + optimize + save; median)", 1000.0, 1),
    ("cpu", "Optimizer CPU time of the tool's process, ms (median; less sensitive to other load, but "
     "misses work in other threads)", 1000.0, 1),
    ("nodes", "Nodes after (all graphs)", 1.0, 0),
    ("bytes", "Model size after, KiB (saved file)", 1 / 1024, 1),
    ("latency_ms", "ORT CPU latency of the result, ms (1 thread, ORT_ENABLE_ALL; median)", 1.0, 2),
]


def _cell(row: ModelRow, tool: str, metric: str, scale: float, digits: int) -> str:
    run = row.runs.get(tool, {})
    if "error" in run:
        return "failed"
    figures = row.measured.get(tool)
    if metric not in ("seconds", "cpu") and figures is not None and figures.error and getattr(figures, metric) is None:
        return "failed (ORT)"
    value = row.value(tool, metric)
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _ratio(row: ModelRow, metric: str) -> float | None:
    ours = row.value("iropt", metric)
    best = row.best_peer(metric)
    if ours is None or best is None or best[1] == 0:
        return None
    return ours / best[1]


def metric_table(rows: Sequence[ModelRow], metric: str, scale: float, digits: int) -> str:
    headers = ["model"]
    if metric in ("nodes", "bytes", "latency_ms"):
        headers.append("original")
    headers += [*TOOLS, "iropt / best peer"]
    body = []
    for row in rows:
        cells = [row.name]
        if metric in ("nodes", "bytes", "latency_ms"):
            value = getattr(row.original, metric)
            cells.append("-" if value is None else f"{value * scale:.{digits}f}")
        cells += [_cell(row, tool, metric, scale, digits) for tool in TOOLS]
        ratio = _ratio(row, metric)
        best = row.best_peer(metric)
        cells.append("-" if ratio is None or best is None else f"{ratio:.2f} (best: {best[0]})")
        body.append(cells)
    return markdown_table(headers, body)


def equivalence_table(rows: Sequence[ModelRow]) -> str:
    body = []
    for row in rows:
        cells = [row.name]
        for tool in TOOLS:
            run, figures = row.runs.get(tool, {}), row.measured.get(tool)
            if "error" in run or figures is None:
                cells.append("- (tool failed)")
            elif figures.equivalent is None or figures.error:
                cells.append(f"FAIL ({figures.error})")
            else:
                status = "ok" if figures.equivalent else "FAIL"
                cells.append(f"{status} (max abs {fmt(figures.max_abs, 1) if figures.max_abs is None else f'{figures.max_abs:.1e}'})")
        body.append(cells)
    return markdown_table(["model", *TOOLS], body)


def breakdown_table(rows: Sequence[ModelRow]) -> str:
    """Where iropt's wall time goes: passes, the per-pass checker, and everything else."""
    body = []
    for row in rows:
        run = row.runs.get("iropt", {})
        if "error" in run:
            body.append([row.name, "failed", "-", "-", "-", "-"])
            continue
        passes: dict[str, float] = run.get("passes", {})
        in_passes = sum(passes.values())
        top = sorted(passes.items(), key=lambda kv: -kv[1])[:3]
        other = row.runs.get(OTHER_CHECK, {}).get("seconds")
        body.append([
            row.name,
            f"{run['seconds'] * 1000:.1f}",
            fmt(None if other is None else other * 1000),
            f"{in_passes * 1000:.1f} ({run.get('pass_runs', 0)} pass runs)",
            f"{(run['seconds'] - in_passes) * 1000:.1f}",
            ", ".join(f"{name} {sec * 1000:.1f}" for name, sec in top),
        ])
    headers = ["model", f"iropt wall ms ({'with' if CHECKER_DEFAULT else 'without'} the per-pass checker, "
               "as `iropt run`)", f"{OTHER_CHECK.removeprefix('iropt (').rstrip(')')} ms", "in passes ms",
               "outside passes ms (load, instruments, checks, save)", "top passes ms (last run)"]
    return markdown_table(headers, body)


def node_gap_notes(rows: Sequence[ModelRow]) -> list[str]:
    """For each model where a peer ends with fewer nodes: the op types that make the difference."""
    notes = []
    for row in rows:
        ours = row.measured.get("iropt")
        best = row.best_peer("nodes")
        if ours is None or ours.nodes is None or best is None or ours.nodes <= best[1]:
            continue
        peer_ops = row.measured[best[0]].ops
        delta = {op: ours.ops.get(op, 0) - peer_ops.get(op, 0) for op in set(ours.ops) | set(peer_ops)}
        shown = ", ".join(f"{op} {d:+d}" for op, d in sorted(delta.items(), key=lambda kv: -kv[1]) if d)
        notes.append(f"- {row.name}: iropt {ours.nodes} nodes vs {best[0]} {int(best[1])}; "
                     f"iropt minus {best[0]} by op type: {shown}")
    return notes


def failure_notes(rows: Sequence[ModelRow]) -> list[str]:
    """Every tool failure with its reason (the tables only say "failed")."""
    notes = []
    for row in rows:
        for tool in TOOLS:
            run, figures = row.runs.get(tool, {}), row.measured.get(tool)
            reason = run.get("error") or (figures.error if figures is not None else None)
            if reason:
                notes.append(f"- {tool} on {row.name}: {reason}")
    return notes


def goals(rows: Sequence[ModelRow]) -> list[str]:
    lines = []
    failed_runs = [r.name for r in rows if "error" in r.runs.get("iropt", {})]
    more_nodes = []
    for row in rows:
        ours, best = row.value("iropt", "nodes"), row.best_peer("nodes")
        if ours is None or (best is not None and ours > best[1]):
            more_nodes.append(f"{row.name} ({'failed' if ours is None else f'{int(ours)} vs {best[0]} {int(best[1])}'})" if best else row.name)
    lines.append(_goal("node count after `default` <= best peer's on every model", not more_nodes, more_nodes))
    mismatched = [r.name for r in rows if r.measured.get("iropt") is not None and r.measured["iropt"].equivalent is False]
    unchecked = failed_runs
    detail = [f"{n} (outputs differ)" for n in mismatched] + [f"{n} (not checked: iropt failed)" for n in unchecked]
    lines.append(_goal("0 equivalence failures for iropt (every model produced and matched)", not detail, detail))
    slower = []
    for row in rows:
        ours, slim = row.value("iropt", "seconds"), row.value("onnxslim", "seconds")
        if ours is None:
            slower.append(f"{row.name} (iropt failed)")
        elif slim is not None and ours > slim:
            slower.append(f"{row.name} ({ours * 1000:.0f} vs {slim * 1000:.0f} ms)")
    lines.append(_goal("iropt wall time <= onnxslim's on every model", not slower, slower))
    regressed = [f"{row.name} ({ratio:.3f})" for row in rows
                 if (ratio := _ratio_to_original(row)) is not None and ratio > MAX_LATENCY_RATIO]
    unmeasured = [row.name for row in rows if _ratio_to_original(row) is None]
    lines.append(_goal(
        f"ORT latency of iropt's result / the input's <= {MAX_LATENCY_RATIO} on every model (timed as a pair)",
        not regressed and not unmeasured, regressed + [f"{n} (not measured)" for n in unmeasured],
    ))
    return lines


# iropt's result may not be slower than its input on ONNX Runtime by more than this.
MAX_LATENCY_RATIO = 1.02


def _ratio_to_original(row: ModelRow) -> float | None:
    ours = row.measured.get("iropt")
    return None if ours is None else ours.ratio_to_original


def latency_table(rows: Sequence[ModelRow]) -> str:
    """Input against iropt's result on ONNX Runtime, and what ORT fuses differently in them."""
    body = []
    for row in rows:
        ours = row.measured.get("iropt")
        ratio = _ratio_to_original(row)
        diff = "-" if ours is None or not ours.ort_ops else _ops_difference(row.original.ort_ops, ours.ort_ops)
        body.append([
            row.name,
            "-" if row.original.latency_ms is None else f"{row.original.latency_ms:.2f}",
            "-" if ours is None or ours.latency_ms is None else f"{ours.latency_ms:.2f}",
            "-" if ratio is None else f"{ratio:.3f}" + (" **over**" if ratio > MAX_LATENCY_RATIO else ""),
            diff,
        ])
    return markdown_table(
        ["model", "input ms", "iropt ms", "iropt / input (paired)", "ops ORT runs: input -> iropt's result (only those that differ)"],
        body,
    )


def _ops_difference(before: dict[str, int], after: dict[str, int]) -> str:
    changed = sorted(op for op in set(before) | set(after) if before.get(op, 0) != after.get(op, 0))
    return ", ".join(f"{op} {before.get(op, 0)} -> {after.get(op, 0)}" for op in changed) or "same ops"


def _goal(text: str, passed: bool, detail: list[str]) -> str:
    return f"- {'PASS' if passed else 'FAIL'}: {text}" + ("" if passed else ": " + "; ".join(detail))


def summary(rows: Sequence[ModelRow]) -> list[str]:
    """Geometric mean of iropt / best peer per metric, over the models where both ran."""
    lines = []
    for metric, title, _, _ in METRICS:
        ratios = [r for r in (_ratio(row, metric) for row in rows) if r is not None and r > 0]
        if ratios:
            geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            lines.append(f"- {title.split(',')[0]}: iropt / best peer, geometric mean {geo:.2f} "
                         f"over {len(ratios)} models (min {min(ratios):.2f}, max {max(ratios):.2f})")
    failures = {t: sum("error" in row.runs.get(t, {}) for row in rows) for t in TOOLS}
    lines.append("- tool failures: " + ", ".join(f"{t} {n}" for t, n in failures.items()))
    return lines


def render(rows: Sequence[ModelRow]) -> str:
    parts = ["Goals:", "", *goals(rows), "", "Summary (ratios below 1 mean iropt is better):", "", *summary(rows), ""]
    for metric, title, scale, digits in METRICS:
        parts += [f"#### {title}", "", metric_table(rows, metric, scale, digits), ""]
    parts += [f"#### Equivalence vs the original (ORT, optimizations off; rtol={RTOL}, atol={ATOL})", "",
              equivalence_table(rows), ""]
    parts += ["#### ONNX Runtime latency: the input against iropt's result (CPU, 1 thread, ORT_ENABLE_ALL)", "",
              "Each pair is timed alone, rounds alternating which model runs first; the ratio is the "
              "median of the per-round ratios. The last column lists the ops ORT runs after its own "
              "fusions where the two differ (not listed for files over 64 MiB).", "",
              latency_table(rows), ""]
    parts += ["#### Where iropt's time goes", "", breakdown_table(rows), ""]
    failures = failure_notes(rows)
    if failures:
        parts += ["#### Failures", "", *failures, ""]
    notes = node_gap_notes(rows)
    if notes:
        parts += ["#### Models where a peer ends with fewer nodes", "", *notes, ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--add", action="append", default=[], metavar="PATH",
                        help="also bench this .onnx file, or every .onnx file in this folder")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tools")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return
    workers = {tool: ToolWorker(tool) for tool in args.tools.split(",")}
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="iropt-bench-peers-") as tmp:
            models = all_models(Path(tmp))
            if args.models:
                wanted = set(args.models.split(","))
                models = [m for m in models if m.stem in wanted]
            for extra in map(Path, args.add):
                models += sorted(extra.glob("*.onnx")) if extra.is_dir() else [extra]
            for model in models:
                runs = time_model(model, Path(tmp), workers)
                _progress(f"{model.stem:20s} " + ", ".join(f"{job} {_short(r)}" for job, r in runs.items()))
                original, measured = measure_model(model, runs)
                rows.append(ModelRow(model.stem, original, measured, runs))
                for stale in Path(tmp).glob(f"{model.stem}.*.onnx*"):  # folded outputs run to hundreds of MB
                    stale.unlink()
    finally:
        for worker in workers.values():
            worker.close()
    print(render(rows))


if __name__ == "__main__":
    main()
