"""Latency of a model on ONNX Runtime's CPU provider, as `batch` and `tune` report it.

One intra-op thread per session: batch and tune run several models side by side, one Ray CPU
each, and a session that took every core would measure its neighbours as much as itself. ORT's
own graph optimizations are on, as when the model is served.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import numpy as np

from iropt.ir.model import Model
from iropt.verify.runtime import OrtRunner, make_session

WARMUP_RUNS = 2
# Runs stop at whichever comes first: enough samples for a median, or the time budget.
MAX_RUNS = 50
BUDGET_SECONDS = 0.5


def median_latency_ms(model: Model, feed: Mapping[str, np.ndarray]) -> float:
    """Median wall time of one run of `model` on `feed`, in milliseconds."""
    runner = OrtRunner(make_session(model, intra_op_threads=1, inter_op_threads=1))
    for _ in range(WARMUP_RUNS):
        runner.run(feed)
    times: list[float] = []
    deadline = time.perf_counter() + BUDGET_SECONDS
    while len(times) < MAX_RUNS and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        runner.run(feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0
