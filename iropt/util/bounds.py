"""Bounds on numeric options, attached to the annotation: `Annotated[int, Range(min=0)]`.

An option's type says what kind of value it takes; its `Range` says which values make sense.
`iropt.infra.options` checks both wherever options arrive (schedules, the Python API, the command
line), so `fold_constants(max_bytes=-1)` is refused at its position in the schedule, before any
work, with the same message everywhere. Every float option must also be finite (`1e999` reads as
infinity, which no tolerance, threshold or ratio means), and every whole number fit in 64 bits.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Range:
    """Inclusive bounds (`min <= value <= max`); None leaves a side open."""

    min: float | None = None
    max: float | None = None

    def violation(self, value: object) -> str | None:
        """Why `value` is out of range, or None when it is in range (or not a number)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if self.min is not None and value < self.min:
            return f"must be {self.describe()}"
        if self.max is not None and value > self.max:
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"between {_number(self.min)} and {_number(self.max)}"
        if self.min is not None:
            return f">= {_number(self.min)}"
        if self.max is not None:
            return f"<= {_number(self.max)}"
        return "any number"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def ranges_of(annotation: Any) -> list[Range]:
    """The Range bounds in an annotation, also inside unions (`Annotated[float, Range(...)] | None`)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extras = get_args(annotation)
        return [extra for extra in extras if isinstance(extra, Range)] + ranges_of(base)
    if origin in (Union, types.UnionType):
        return [r for member in get_args(annotation) for r in ranges_of(member)]
    return []


def bound_violation(annotation: Any, value: object) -> str | None:
    """Why `value` breaks the annotation's bounds (or is a non-finite float), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
        return "is too large (whole numbers must fit in 64 bits)"
    for bounds in ranges_of(annotation):
        reason = bounds.violation(value)
        if reason is not None:
            return reason
    return None


def check_bounds(instance: object) -> None:
    """ValueError for the first field of a dataclass `instance` outside its annotated bounds.

    For classes constructed directly (not through an option parser), from `__post_init__`.
    """
    hints = typing.get_type_hints(type(instance), include_extras=True)
    for field in dataclasses.fields(instance):  # type: ignore[arg-type]
        value = getattr(instance, field.name)
        reason = bound_violation(hints.get(field.name, Any), value)
        if reason is not None:
            raise ValueError(f"{field.name}={value!r} {reason}")
