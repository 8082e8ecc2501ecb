"""iropt.util.threads: BLAS limited to one thread inside, results in order from the pool."""

from __future__ import annotations

import threading

import pytest
from threadpoolctl import threadpool_info

from iropt.util.threads import single_threaded_blas, thread_map, worker_count


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_single_threaded_blas_limits_inside_and_restores_after() -> None:
    before = _blas_threads()
    with single_threaded_blas():
        assert all(threads == 1 for threads in _blas_threads())
    assert _blas_threads() == before


def test_thread_map_keeps_the_order_and_limits_blas_while_it_runs() -> None:
    seen: set[int] = set()

    def square(value: int) -> tuple[int, list[int]]:
        seen.add(threading.get_ident())
        return value * value, _blas_threads()

    results = list(thread_map(square, list(range(20))))
    assert [value for value, _ in results] == [v * v for v in range(20)]
    assert all(threads == 1 for _, blas in results for threads in blas)
    assert len(seen) <= worker_count(20)


def test_worker_count_is_at_least_one_and_at_most_one_per_item() -> None:
    assert worker_count(0) == 1
    assert worker_count(1) == 1
    assert 1 <= worker_count(1000) <= 1000


def test_thread_map_passes_an_error_on() -> None:
    def fail_on_first(value: int) -> int:
        if value == 0:
            raise ValueError("first piece")
        return value

    before = _blas_threads()
    with pytest.raises(ValueError, match="first piece"):
        list(thread_map(fail_on_first, list(range(50))))
    assert _blas_threads() == before  # the limit is lifted after an error too
