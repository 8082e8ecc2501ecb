"""Thread counts for numeric work: BLAS limited to one thread where the work is parallel already.

numpy's BLAS (OpenBLAS, MKL) starts one thread per core for every large product. When several
products run at once from a thread pool, or the machine is busy, those threads compete for the
same cores and spin waiting for each other, which can make a loop of many mid-sized products
ten times slower than on one thread. Code that spreads work over its own threads runs each
piece with BLAS on one thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from threadpoolctl import threadpool_limits

from iropt.util.machine import usable_cores

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Within the block, BLAS and OpenMP pools of this process use one thread."""
    with threadpool_limits(limits=1):
        yield


def worker_count(items: int) -> int:
    """Threads for `items` independent pieces of work: one per available core, at most one per item."""
    return max(1, min(items, usable_cores()))


def thread_map(fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    """`fn(item)` for each item, in order, computed on a thread pool with BLAS single-threaded
    inside (numpy releases the interpreter lock in its products and factorizations, so those run
    in parallel). Consume the results fully: the BLAS limit holds until the last one."""
    workers = worker_count(len(items))
    with single_threaded_blas():
        if workers == 1:
            yield from (fn(item) for item in items)
            return
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            yield from pool.map(fn, items)
        finally:
            # Stopped early (an error, an interrupt): the pieces not started yet are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
