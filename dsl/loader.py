"""Schedules by file path or built-in name -> Pipeline: what `iropt run/check` call."""

from __future__ import annotations

import os
from pathlib import Path

from iropt.infra.pipeline import Pipeline
from iropt.schedules import builtin_schedule_names, builtin_schedule_text
from iropt.util.text import shorten_path

from .ast import Schedule
from .errors import Diagnostic, ScheduleError
from .parser import MAX_SCHEDULE_CHARS, parse_schedule
from .resolver import resolve

# A file past this is refused unread (the parser refuses longer text too).
MAX_SCHEDULE_BYTES = MAX_SCHEDULE_CHARS


def load_schedule(path_or_name: str | os.PathLike[str]) -> Pipeline:
    """The checked Pipeline of a schedule file, or of a built-in schedule by name.

    An existing file wins over a built-in of the same name. ScheduleError when the file is
    missing (listing the built-in names), unreadable, or has any syntax or semantic error.
    """
    text, filename, name = read_schedule(path_or_name)
    return resolve(parse_schedule(text, filename), filename, name=name)


def check_schedule(path_or_name: str | os.PathLike[str]) -> Pipeline:
    """Alias of `load_schedule`, for `iropt check`: parse and resolve, raising on any error."""
    return load_schedule(path_or_name)


def parse_schedule_file(path_or_name: str | os.PathLike[str]) -> Schedule:
    """The AST of a schedule file or built-in schedule, unresolved (syntax checked only)."""
    text, filename, _ = read_schedule(path_or_name)
    return parse_schedule(text, filename)


def read_schedule(path_or_name: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(text, filename for messages, pipeline name) of a schedule file or built-in schedule."""
    path = Path(path_or_name)
    label = str(path_or_name)
    if _is_file(path):
        try:
            if path.stat().st_size > MAX_SCHEDULE_BYTES:
                raise _error(
                    label,
                    f"the file is {path.stat().st_size} bytes; schedules are limited to "
                    f"{MAX_SCHEDULE_BYTES} bytes ({MAX_SCHEDULE_BYTES // 1024} KiB)",
                )
            return path.read_text(encoding="utf-8"), label, label
        except PermissionError:
            raise _error(label, "permission denied: the schedule file cannot be read") from None
        except (OSError, UnicodeDecodeError) as error:
            raise _error(label, f"cannot read schedule: {error.__class__.__name__}: {_reason(error)}") from None
    if _exists(path):
        raise _error(label, "is not a file; a schedule is a text file (usually *.opt)")
    builtin = label.removesuffix(".opt")
    text = builtin_schedule_text(builtin) if "/" not in label and os.sep not in label else None
    if text is not None:
        return text, f"<builtin>/{builtin}.opt", builtin
    names = ", ".join(builtin_schedule_names()) or "none"
    raise _error(
        label, f"no such schedule file, and no built-in schedule by that name; built-in schedules: {names}"
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system: no such file
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _reason(error: OSError | UnicodeDecodeError) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return f"not UTF-8 text ({error.reason} at byte {error.start})"


def _error(filename: str, message: str) -> ScheduleError:
    return ScheduleError([Diagnostic(shorten_path(filename), message)])
