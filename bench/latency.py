"""Helpers shared by the peer, scaling and quantization benches: ORT sessions and latency, node
counts, and running one measurement in a child process.

Latency is always ONNX Runtime on the CPU with a fixed number of intra-op threads (1 unless
told), one inter-op thread, sequential execution and ORT's default ALL optimization level, so
results differ only by the model that goes in. Every figure is a median: the noise on a shared
2-core machine is one-sided (other work only ever makes a run slower).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

PYTHON = sys.executable
BENCH = Path(__file__).resolve().parent


def session(
    model: str | Path | bytes, *, threads: int = 1, level: str = "all"
) -> ort.InferenceSession:
    """A CPU session: `threads` intra-op threads, one inter-op thread, optimization `level`.

    Multi-threaded sessions do not spin-wait (see below); otherwise ORT's defaults.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if threads > 1:
        # Worker threads sleep instead of spin-waiting between ops: on a small machine shared
        # with other work a spinning pool stalls whenever one of its threads is descheduled,
        # which made 2-thread timings swing by 10x between runs. Same setting for every model.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_outputs(sess: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs by name; feeds for inputs the model no longer has are dropped."""
    names = {i.name for i in sess.get_inputs()}
    outputs = sess.run(None, {k: v for k, v in feed.items() if k in names})
    return {o.name: np.asarray(v) for o, v in zip(sess.get_outputs(), outputs, strict=True)}


def latency_ms(
    sess: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    budget_s: float = 0.5,
    min_runs: int = 3,
    max_runs: int = 5000,
) -> float:
    """Median latency in ms: a warm-up run, then runs until `budget_s` (at least `min_runs`).

    Tiny models get thousands of runs in the budget, which their sub-0.1 ms times need for a
    stable median; a 1 s model gets `min_runs`.
    """
    names = {i.name for i in sess.get_inputs()}
    inputs = {k: v for k, v in feed.items() if k in names}
    start = time.perf_counter()
    sess.run(None, inputs)
    if time.perf_counter() - start < 0.05:  # a second warm-up where it is cheap
        sess.run(None, inputs)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        start = time.perf_counter()
        sess.run(None, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of `graph` and of every subgraph in its nodes' attributes."""
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_nodes(g) for g in attr.graphs)
    return total


def op_histogram(graph: onnx.GraphProto) -> dict[str, int]:
    """Op type -> count over `graph` and its subgraphs."""
    counts: dict[str, int] = {}

    def walk(g: onnx.GraphProto) -> None:
        for node in g.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        walk(sub)

    walk(graph)
    return counts


def run_child(args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run `python <args>` and parse the last stdout line as JSON (the child's result).

    A child that fails, times out or prints no JSON gives {"error": reason}; peak memory and
    timing are then measured in a process of their own, unaffected by what ran before.
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(
            [PYTHON, *args], capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def peak_rss_mb() -> float:
    """Peak resident set size of this process (since the last `reset_peak_rss`), in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Start peak-RSS accounting afresh (Linux `clear_refs` 5), so imports done before do not
    set the peak; False where the kernel does not allow it (the peak then includes them)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def rss_now_mb() -> float:
    """Current resident set size of this process, in MiB (Linux)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A number for a table cell; None (not measured) prints as a dash."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}"


def interleaved_latency_ms(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    *,
    budget_s: float = 1.5,
    min_rounds: int = 7,
    max_rounds: int = 2000,
) -> dict[str, float]:
    """Median latency in ms of each session, measured round by round (one run of each per round).

    Interleaving puts the sessions under the same machine noise, so their ratios hold even when
    the absolute times drift (other work on a shared machine).
    """
    inputs = _warmed_up(sessions, feed)
    times: dict[str, list[float]] = {key: [] for key in sessions}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() < deadline):
        for key, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, inputs[key])
            times[key].append(time.perf_counter() - start)
        rounds += 1
    return {key: statistics.median(values) * 1000.0 for key, values in times.items()}


def _warmed_up(
    sessions: Mapping[str, ort.InferenceSession], feed: Mapping[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
    """Each session's own inputs out of `feed`, after two untimed runs of each."""
    inputs = {}
    for key, sess in sessions.items():
        names = {i.name for i in sess.get_inputs()}
        inputs[key] = {k: v for k, v in feed.items() if k in names}
        for _ in range(2):
            sess.run(None, inputs[key])
    return inputs


def paired_latency(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    budget_s: float = 3.0,
    min_rounds: int = 15,
    max_rounds: int = 5000,
) -> tuple[float, float, float]:
    """Median ms of `reference` and `candidate`, and the median of their per-round ratios
    (candidate / reference).

    Rounds alternate which session runs first (AB, BA, ...), so neither gains from running
    after the other; the ratio is taken within each round, so drift in the machine's speed
    between rounds cancels out.
    """
    pair = {"reference": reference, "candidate": candidate}
    inputs = _warmed_up(pair, feed)
    times: dict[str, list[float]] = {key: [] for key in pair}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() < deadline):
        order = ("reference", "candidate") if rounds % 2 == 0 else ("candidate", "reference")
        for key in order:
            start = time.perf_counter()
            pair[key].run(None, inputs[key])
            times[key].append(time.perf_counter() - start)
        rounds += 1
    ratios = [c / r for r, c in zip(times["reference"], times["candidate"], strict=True) if r > 0]
    return (
        statistics.median(times["reference"]) * 1000.0,
        statistics.median(times["candidate"]) * 1000.0,
        statistics.median(ratios),
    )


def ort_ops(model: str | Path, tmp: Path) -> dict[str, int]:
    """The op histogram of the graph ONNX Runtime runs for `model` (CPU, ORT_ENABLE_ALL), after
    its own fusions (SkipLayerNormalization, FusedConv, QLinearConv...)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    target = tmp / f"{Path(model).stem}.ort-optimized.onnx"
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    histogram = op_histogram(onnx.load(str(target), load_external_data=False).graph)
    for stale in tmp.glob(f"{target.name}*"):
        stale.unlink()
    return histogram


def op_profiles(
    models: Mapping[str, str | Path],
    feed: Mapping[str, np.ndarray],
    *,
    threads: int,
    tmp: Path,
    runs: int = 200,
) -> dict[str, list[tuple[str, float]]]:
    """Mean time per run (ms) of each op type for each model, from ORT's profiler, largest first.

    The models' runs are interleaved (one of each per round) like `interleaved_latency_ms`.
    Time in a run that no kernel accounts for (session overhead: input/output copies,
    scheduling) is reported as "(outside kernels)". The first fifth of the runs is skipped.
    """
    sessions = {}
    for key, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp / f"profile_{Path(model).stem}_{threads}")
        if threads > 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[key] = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    inputs = {
        key: {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}}
        for key, sess in sessions.items()
    }
    for _ in range(runs):
        for key, sess in sessions.items():
            sess.run(None, inputs[key])
    return {key: _profile_by_op(Path(sess.end_profiling()), skip=runs // 5) for key, sess in sessions.items()}


def _profile_by_op(path: Path, skip: int) -> list[tuple[str, float]]:
    events = json.loads(path.read_text())
    by_op: dict[str, float] = {}
    run_total = 0.0
    counted_runs = 0
    seen_runs = 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            seen_runs += 1
            if seen_runs > skip:
                run_total += float(event.get("dur", 0))
                counted_runs += 1
        elif event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            # A run's node events come before its model_run event (which closes the run).
            if seen_runs >= skip:
                op = event.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + float(event.get("dur", 0))
    kernels = sum(by_op.values())
    if run_total > kernels:
        by_op["(outside kernels)"] = run_total - kernels
    per_run = max(counted_runs, 1) * 1000.0  # profiler durations are in microseconds
    return sorted(((op, dur / per_run) for op, dur in by_op.items()), key=lambda kv: -kv[1])
