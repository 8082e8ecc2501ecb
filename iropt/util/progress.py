"""The progress-reporting hook that long steps take: `progress(items, "calibrating", total=n)`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

ProgressFn = Callable[..., Iterator[Any]]


def no_progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A ProgressFn that shows nothing."""
    del description, total
    yield from items
