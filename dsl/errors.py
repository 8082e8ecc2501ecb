"""Schedule errors that point into the text: `file:line:col`, the line, and a caret under it.

    schedule.opt:3:28: error: unexpected ')' — expected a value (number, string, size, list, true/false)
      fold_constants(max_bytes=)
                               ^

A `ScheduleError` carries one or more `Diagnostic`s (the resolver reports every problem it
finds, not just the first) and is a `UserError`, so the command line exits with status 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from iropt.errors import UserError

from .ast import Position


@dataclass(frozen=True)
class Diagnostic:
    """One problem: where it is, what is wrong, and the source line to quote."""

    file: str
    message: str
    line: int | None = None
    column: int | None = None
    source_line: str | None = None
    hints: tuple[str, ...] = ()

    def format(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column or 1}"
        lines = [f"{where}: error: {self.message}"]
        if self.source_line is not None and self.column is not None:
            shown, column = _window(self.source_line, self.column)
            lines.append(f"  {shown}")
            lines.append(f"  {_caret_prefix(shown, column)}^")
        lines.extend(f"  hint: {hint}" for hint in self.hints)
        return "\n".join(lines)


# A quoted source line is cut to this many characters around the column.
_QUOTED_LINE = 120


def _window(line: str, column: int) -> tuple[str, int]:
    """The part of a long `line` around `column`, marked with '…' where cut, and the column in it."""
    if len(line) <= _QUOTED_LINE:
        return line, column
    start = max(0, min(column - 1 - _QUOTED_LINE // 2, len(line) - _QUOTED_LINE))
    head = "…" if start else ""
    tail = "…" if start + _QUOTED_LINE < len(line) else ""
    return head + line[start : start + _QUOTED_LINE] + tail, column - start + len(head)


def _caret_prefix(line: str, column: int) -> str:
    # Keep tabs as tabs so that the caret lines up however wide the terminal draws them.
    return "".join("\t" if ch == "\t" else " " for ch in line[: column - 1]).ljust(column - 1)


class ScheduleError(UserError):
    """A schedule that cannot be read, parsed or resolved; the message quotes the source."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        if not diagnostics:
            raise ValueError("a ScheduleError needs at least one diagnostic")
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.format() for d in self.diagnostics))

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]

    @property
    def file(self) -> str:
        return self.first.file

    @property
    def line(self) -> int | None:
        return self.first.line

    @property
    def column(self) -> int | None:
        return self.first.column


class Source:
    """A schedule's text and file name, for building diagnostics at positions in it."""

    def __init__(self, text: str | None, filename: str) -> None:
        self.filename = filename
        # Split on '\n' only: str.splitlines() would also split on characters the lexer treats
        # as ordinary (form feeds, U+2028 inside strings) and shift the line numbers.
        self.lines = text.split("\n") if text is not None else None

    def line_text(self, line: int) -> str | None:
        if self.lines is None or not 1 <= line <= len(self.lines):
            return None
        return self.lines[line - 1].rstrip("\r")

    def diagnostic(self, pos: Position | None, message: str, hints: Sequence[str] = ()) -> Diagnostic:
        if pos is None:
            return Diagnostic(self.filename, message, hints=tuple(hints))
        return Diagnostic(
            self.filename, message, pos.line, pos.column, self.line_text(pos.line), tuple(hints)
        )

    def error(self, pos: Position | None, message: str, hints: Sequence[str] = ()) -> ScheduleError:
        return ScheduleError([self.diagnostic(pos, message, hints)])
