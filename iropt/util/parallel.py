"""`parallel_map`: Ray tasks when this process is connected to Ray, a plain loop otherwise.

Code that has independent pieces of work (calibration shards, sensitivity trials) calls it and
stays correct without Ray; inside `iropt batch` or `iropt tune`, or any program that called
`ray.init()`, the pieces run as tasks across the cluster. Ray is never started here: starting it
costs seconds, more than most single runs would gain.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ray_if_running() -> Any:
    """The `ray` module when this process has imported it and initialized it, else None.

    Never imports Ray itself: a process that has not imported Ray cannot be connected to it,
    and importing it costs about a second.
    """
    ray = sys.modules.get("ray")
    if ray is None or not hasattr(ray, "is_initialized"):
        return None
    return ray if ray.is_initialized() else None


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, num_cpus: float = 1) -> list[R]:
    """`[fn(item) for item in items]`, as Ray tasks (one CPU each) when Ray is running."""
    ray = ray_if_running()
    if ray is None or len(items) < 2:
        return [fn(item) for item in items]
    # The function (it may carry a serialized model) goes to the object store once, not per task.
    shared = ray.put(fn)
    remote = ray.remote(num_cpus=num_cpus)(_call)
    results: list[R] = ray.get([remote.remote(shared, item) for item in items])
    return results


def _call(fn: Callable[[T], R], item: T) -> R:
    return fn(item)
