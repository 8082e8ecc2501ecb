"""AST -> canonical schedule text, which parses back to an equal AST.

Canonical form: the target first, one statement per line, blocks indented by two spaces,
options as `key=value` separated by ", ", a pass without options written without parentheses,
`fixpoint` always with its `max`, strings in JSON style, sizes as they were written.
"""

from __future__ import annotations

import json
import math
import re

from .ast import Fixpoint, Option, PassCall, Repeat, Schedule, Size, Statement, Target, Value, Verify

INDENT = "  "
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Words the lexer reads as keywords where a statement starts. (`true`, `none` and the other value
# words are keywords only where a value may stand, so they can still name a pass.)
_KEYWORDS = frozenset({"fixpoint", "repeat", "verify", "target"})


def print_schedule(schedule: Schedule) -> str:
    """The canonical text of `schedule`; ValueError for an AST no text could produce."""
    lines: list[str] = []
    if schedule.target is not None:
        lines.append(format_target(schedule.target))
    for statement in schedule.statements:
        _emit(statement, 0, lines)
    return "".join(line + "\n" for line in lines)


def format_target(target: Target) -> str:
    return f"target {_name(target.name)}{_arguments(target.options)}"


def _emit(statement: Statement, depth: int, lines: list[str]) -> None:
    indent = INDENT * depth
    if isinstance(statement, PassCall):
        lines.append(f"{indent}{_name(statement.name)}{_arguments(statement.options)}")
    elif isinstance(statement, Verify):
        lines.append(f"{indent}verify{_arguments(statement.options)}")
    elif isinstance(statement, (Fixpoint, Repeat)):
        if isinstance(statement, Fixpoint):
            head = f"fixpoint(max={format_value(statement.max)})"
        else:
            head = f"repeat({format_value(statement.count)})"
        if not statement.body:
            lines.append(f"{indent}{head} {{}}")
            return
        lines.append(f"{indent}{head} {{")
        for inner in statement.body:
            _emit(inner, depth + 1, lines)
        lines.append(f"{indent}}}")
    else:
        raise TypeError(f"not a schedule statement: {statement!r}")


def _arguments(options: tuple[Option, ...]) -> str:
    if not options:
        return ""
    return "(" + ", ".join(f"{_key(o.key)}={format_value(o.value)}" for o in options) + ")"


def _name(name: str) -> str:
    """A pass or back-end name, checked: statement keywords cannot stand there."""
    if not _NAME.match(name) or name in _KEYWORDS:
        raise ValueError(f"{name!r} cannot be written as a name in a schedule")
    return name


def _key(key: str) -> str:
    # Keywords are fine as option names: after '(' or ',' the lexer expects only a name.
    if not _NAME.match(key):
        raise ValueError(f"{key!r} cannot be written as an option name in a schedule")
    return key


def format_value(value: Value | list[Value]) -> str:
    """`value` as schedule text: `true`, `none`, `-3`, `0.5`, `1e-05`, `"a\\"b"`, `1MiB`, `[1, 2]`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no spelling in a schedule")
        # repr is the shortest text that reads back as the same float, and always has a '.'
        # or an exponent, so it reads back as a float rather than an int.
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Size):
        return value.text
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    raise ValueError(f"{value!r} ({type(value).__name__}) has no spelling in a schedule")
