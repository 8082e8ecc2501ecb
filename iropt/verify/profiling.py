"""Per-node kernel times from ONNX Runtime's profiler, and the profiler passes reach models through.

ONNX Runtime's profiler writes a Chrome trace: one `Node` event per kernel run, named
`<node>_kernel_time` (the node as ORT ran it, after its own fusions and renames), and one
`Session` event `model_run` at the end of each run. `node_times` cuts the events into runs,
drops the first ones (warm-up: allocation, caches) and takes, for each node, the median over the
remaining runs of its summed kernel time. The graph ORT ran is returned too: it is what maps
ORT's node names back to the model's layers (`iropt.compress.quant.attribution`).

Passes reach ONNX Runtime only through a `ModelProfiler` (`PassContext.model_profiler`), so
they never import it; `OrtProfiler` is the default, backed by `iropt.verify.runtime`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from iropt.ir.model import Model

KERNEL_SUFFIX = "_kernel_time"
# Runs profiled per model: the first WARMUP_RUNS are dropped, the median of the rest is kept.
WARMUP_RUNS = 2
PROFILED_RUNS = 7


@dataclass(frozen=True)
class NodeTime:
    """The median kernel time (ms per run) of one node of the graph ORT ran, and its op type."""

    op: str
    ms: float


@dataclass
class ModelProfile:
    """Per-node kernel times of one model, the total of its runs (ms, median) and the graph ORT ran."""

    nodes: dict[str, NodeTime]
    run_ms: float
    graph: onnx.GraphProto = field(repr=False)

    @property
    def kernel_ms(self) -> float:
        return sum(node.ms for node in self.nodes.values())


def node_times(events: Sequence[Mapping[str, Any]], warmup: int = WARMUP_RUNS) -> tuple[dict[str, NodeTime], float]:
    """Median kernel ms per node name over the runs after the first `warmup`, and the median run ms.

    Events after the last `model_run` (none in a complete trace) belong to no run and are dropped.
    """
    runs: list[dict[str, float]] = []
    run_ms: list[float] = []
    ops: dict[str, str] = {}
    current: dict[str, float] = {}
    for event in events:
        category, name = event.get("cat"), str(event.get("name", ""))
        if category == "Session" and name == "model_run":
            runs.append(current)
            run_ms.append(float(event.get("dur", 0)) / 1000.0)
            current = {}
        elif category == "Node" and name.endswith(KERNEL_SUFFIX):
            node = name[: -len(KERNEL_SUFFIX)]
            current[node] = current.get(node, 0.0) + float(event.get("dur", 0)) / 1000.0
            ops.setdefault(node, str(event.get("args", {}).get("op_name", "")))
    kept = runs[warmup:] if len(runs) > warmup else runs
    kept_ms = run_ms[warmup:] if len(run_ms) > warmup else run_ms
    names = {node for run in kept for node in run}
    times = {node: NodeTime(ops[node], statistics.median(run.get(node, 0.0) for run in kept)) for node in names}
    return times, statistics.median(kept_ms) if kept_ms else 0.0


class ModelProfiler(Protocol):
    """Runs models on the target runtime: per-node profiles, and end-to-end latencies."""

    def profile(
        self, models: Sequence[Model], feed: Mapping[str, np.ndarray], *, threads: int, optimization_level: str
    ) -> list[ModelProfile]:
        """One profile per model, the models' runs interleaved."""

    def latency(
        self, models: Sequence[Model], feed: Mapping[str, np.ndarray], *, threads: int, optimization_level: str
    ) -> list[float]:
        """The median latency (ms) of each model on `feed`, the models' runs interleaved."""


class OrtProfiler:
    """ONNX Runtime on the CPU, with its profiler for `profile` and plain sessions for `latency`."""

    def __init__(self, runs: int = PROFILED_RUNS, warmup: int = WARMUP_RUNS, budget_s: float = 0.5) -> None:
        self.runs = runs
        self.warmup = warmup
        self.budget_s = budget_s

    def profile(
        self, models: Sequence[Model], feed: Mapping[str, np.ndarray], *, threads: int, optimization_level: str
    ) -> list[ModelProfile]:
        from iropt.verify.runtime import profile_models

        traced = profile_models(
            models, feed, runs=self.runs + self.warmup, threads=threads,
            optimization_level=optimization_level,  # type: ignore[arg-type]
        )
        profiles = []
        for events, optimized in traced:
            nodes, run_ms = node_times(events, self.warmup)
            profiles.append(ModelProfile(nodes, run_ms, optimized.graph))
        return profiles

    def latency(
        self, models: Sequence[Model], feed: Mapping[str, np.ndarray], *, threads: int, optimization_level: str
    ) -> list[float]:
        from iropt.verify.runtime import interleaved_latency_ms

        return interleaved_latency_ms(
            models, feed, threads=threads, optimization_level=optimization_level,  # type: ignore[arg-type]
            budget_s=self.budget_s,
        )
