"""The schedule AST: frozen dataclasses that mirror the source text.

The parser builds it, the printer turns it back into canonical text and the resolver checks it
against the registries. Every node records where it came from (`Position`, 1-based line and
column), but positions are left out of equality (they matter for messages, not for what the
schedule means) and `repr`, so that a schedule parsed from
printed text compares equal to the one that was printed: `parse(print(ast)) == ast`.

Option values are plain Python values (int, float, str, bool, None, tuples for lists) except
sizes, which keep their spelling in a `Size` so that `1MiB` prints as `1MiB`, not `1048576`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Union

DEFAULT_FIXPOINT_MAX = 8

# Bytes per unit: the binary units are powers of 1024, the decimal ones powers of 1000.
SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([A-Za-z]+)$")


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in the schedule text."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


@dataclass(frozen=True)
class Size:
    """A byte count written with a unit (`1MiB`); `text` is kept so printing gives it back."""

    bytes: int
    text: str

    @classmethod
    def parse(cls, text: str) -> Size:
        """`Size` from `512KiB`, `1.5MiB`, `10MB`, `100B`; ValueError for anything else.

        A fraction is allowed when it comes to a whole number of bytes (`1.5KiB` is 1536).
        """
        match = _SIZE.match(text)
        if match is None:
            raise ValueError(f"'{text}' is not a size (write it like 512KiB, 1MiB, 4GiB, 10MB or 100B)")
        number, unit = match.groups()
        if unit not in SIZE_UNITS:
            units = ", ".join(SIZE_UNITS)
            raise ValueError(f"unknown size unit '{unit}' in '{text}'; units are: {units}")
        try:
            count = Decimal(number) * SIZE_UNITS[unit]
        except InvalidOperation as error:  # pragma: no cover - the pattern admits only decimals
            raise ValueError(f"'{text}' is not a size") from error
        if count != count.to_integral_value():
            raise ValueError(f"size {text} is not a whole number of bytes ({count})")
        return cls(int(count), text)

    def __str__(self) -> str:
        return self.text


# A list value is a tuple, so that nodes stay hashable and immutable.
Value = Union[None, bool, int, float, str, Size, tuple["Value", ...]]


@dataclass(frozen=True)
class Option:
    """`key=value` inside `(...)`; `pos` is the key's position, `value_pos` the value's."""

    key: str
    value: Value
    pos: Position | None = field(default=None, compare=False, repr=False)
    value_pos: Position | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class PassCall:
    """`name` or `name(key=value, ...)`: run the registered pass `name` with these options."""

    name: str
    options: tuple[Option, ...] = ()
    pos: Position | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Fixpoint:
    """`fixpoint(max=N) { ... }`: run the body until nothing changes, at most `max` times."""

    max: int = DEFAULT_FIXPOINT_MAX
    body: tuple[Statement, ...] = ()
    pos: Position | None = field(default=None, compare=False, repr=False)
    max_pos: Position | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Repeat:
    """`repeat(N) { ... }`: run the body `count` times."""

    count: int
    body: tuple[Statement, ...] = ()
    pos: Position | None = field(default=None, compare=False, repr=False)
    count_pos: Position | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Verify:
    """`verify(...)`: check the model here; the options are those of `iropt.verify.criteria.Criterion`."""

    options: tuple[Option, ...] = ()
    pos: Position | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Target:
    """`target NAME(...)`: the back end the schedule is written for, with its options."""

    name: str
    options: tuple[Option, ...] = ()
    pos: Position | None = field(default=None, compare=False, repr=False)
    name_pos: Position | None = field(default=None, compare=False, repr=False)


Statement = Union[PassCall, Fixpoint, Repeat, Verify]


@dataclass(frozen=True)
class Schedule:
    """A whole schedule: its statements in order and its target, if it names one.

    `filename` and `source` (the text it was parsed from) let later stages quote the offending
    line in their messages; like positions, they take no part in equality.
    """

    statements: tuple[Statement, ...] = ()
    target: Target | None = None
    filename: str = field(default="<schedule>", compare=False, repr=False)
    source: str | None = field(default=None, compare=False, repr=False)
