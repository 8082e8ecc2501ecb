"""Schedule text -> AST: the lark LALR parser, the transformer, and readable syntax errors.

The grammar lives in `schedule.lark`. A small post-lexer drops new lines inside `(...)` and
`[...]` so that long option lists can span lines while new lines elsewhere separate statements.
Lark's exceptions are translated into `ScheduleError`s that name the file, line and column,
quote the line with a caret, and say in words what could have come there instead.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)
from lark.lark import PostLex
from lark.tree import Meta

from iropt.util.suggest import did_you_mean

from .ast import (
    DEFAULT_FIXPOINT_MAX,
    Fixpoint,
    Option,
    PassCall,
    Position,
    Repeat,
    Schedule,
    Size,
    Statement,
    Target,
    Value,
    Verify,
)
from .errors import ScheduleError, Source
from .printer import format_value

GRAMMAR = Path(__file__).with_name("schedule.lark")
# Limits that keep a hostile schedule from exhausting the machine (a schedule is written by hand,
# so real ones are far below them): the text's length, and how deep blocks and brackets nest
# (the AST is built recursively).
MAX_SCHEDULE_CHARS = 64 * 1024
MAX_NESTING = 32


def parse_schedule(text: str, filename: str = "<schedule>") -> Schedule:
    """Parse schedule `text` into a `Schedule` AST; ScheduleError on a syntax error.

    `filename` is only used in messages (and kept on the AST for the resolver's messages).
    """
    text = text.removeprefix("\ufeff")
    source = Source(text, filename)
    if len(text) > MAX_SCHEDULE_CHARS:
        raise source.error(
            None,
            f"the schedule is {len(text)} characters long; schedules are limited to "
            f"{MAX_SCHEDULE_CHARS} ({MAX_SCHEDULE_CHARS // 1024} KiB)",
        )
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(error, text, source) from None
    except _TooDeep as error:
        raise source.error(
            error.pos, f"blocks and brackets nest more than {MAX_NESTING} deep here; that is the limit"
        ) from None
    try:
        schedule: Schedule = _ToAst(source).transform(tree)
    except VisitError as error:
        if isinstance(error.orig_exc, ScheduleError):
            raise error.orig_exc from None
        raise
    return Schedule(schedule.statements, schedule.target, filename=filename, source=text)


class _TooDeep(Exception):
    """Raised by the post-lexer where nesting passes MAX_NESTING."""

    def __init__(self, pos: Position) -> None:
        super().__init__(pos)
        self.pos = pos


class _NewlinesInBrackets(PostLex):
    """Drop new-line tokens inside (...) and [...]; there they only wrap a long line. Also stops
    the parse where blocks and brackets nest past MAX_NESTING."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0  # local, so one parser can be used by several threads at once
        nesting = 0
        for token in stream:
            if token.type in ("LPAR", "LSQB", "LBRACE"):
                nesting += 1
                if nesting > MAX_NESTING:
                    raise _TooDeep(_token_pos(token))
            elif token.type in ("RPAR", "RSQB", "RBRACE"):
                nesting = max(0, nesting - 1)
            if token.type in ("LPAR", "LSQB"):
                depth += 1
            elif token.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif token.type == "_NL" and depth:
                continue
            yield token


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(
        GRAMMAR.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
        postlex=_NewlinesInBrackets(),
    )


# --- the transformer: parse tree -> AST ------------------------------------------------------


class _Located(NamedTuple):
    value: Value
    pos: Position


def _token_pos(token: Token) -> Position:
    return Position(token.line or 1, token.column or 1)


def _meta_pos(meta: Meta) -> Position:
    return Position(meta.line, meta.column)


class _ToAst(Transformer[Token, Any]):
    """Builds AST nodes bottom-up; raises ScheduleError for what the grammar cannot rule out."""

    def __init__(self, source: Source) -> None:
        super().__init__(visit_tokens=False)
        self.source = source

    def value(self, children: list[Any]) -> _Located:
        (child,) = children
        if isinstance(child, _Located):  # a list
            return child
        return _Located(self._token_value(child), _token_pos(child))

    def _token_value(self, token: Token) -> Value:
        kind, text = token.type, str(token)
        if kind == "INT":
            return int(text)
        if kind == "FLOAT":
            return float(text)
        if kind == "SIZE":
            try:
                return Size.parse(text)
            except ValueError as error:
                raise self.source.error(_token_pos(token), str(error)) from None
        if kind == "STRING":
            return self._string(token)
        return {"TRUE": True, "FALSE": False, "NONE": None, "NULL": None}[kind]

    def _string(self, token: Token) -> str:
        # The grammar's strings are JSON strings that may also hold raw tabs.
        try:
            decoded: str = json.loads(str(token), strict=False)
        except json.JSONDecodeError as error:
            pos = Position(token.line or 1, (token.column or 1) + error.pos)
            bad = str(token)[error.pos : error.pos + 2]
            raise self.source.error(
                pos,
                f"invalid escape '{bad}' in a string",
                [r"strings take the escapes \" \\ \n \t \r \b \f \/ and \uXXXX"],
            ) from None
        return decoded

    @v_args(meta=True)
    def list_value(self, meta: Meta, children: list[_Located]) -> _Located:
        return _Located(tuple(child.value for child in children), _meta_pos(meta))

    def option(self, children: list[Any]) -> Option:
        key, value = children
        return Option(str(key), value.value, _token_pos(key), value.pos)

    def arguments(self, children: list[Option]) -> tuple[Option, ...]:
        seen: set[str] = set()
        for option in children:
            if option.key in seen:
                raise self.source.error(option.pos, f"option '{option.key}' is given twice")
            seen.add(option.key)
        return tuple(children)

    def block(self, children: list[Statement]) -> tuple[Statement, ...]:
        return tuple(children)

    @v_args(meta=True)
    def pass_call(self, meta: Meta, children: list[Any]) -> PassCall:
        name = str(children[0])
        options = children[1] if len(children) > 1 else ()
        if name == "target":
            # Outside the top level the lexer reads `target` as a name.
            raise self.source.error(
                _meta_pos(meta), "'target' belongs at the top level of a schedule, not in a block"
            )
        return PassCall(name, options, _meta_pos(meta))

    @v_args(meta=True)
    def verify(self, meta: Meta, children: list[Any]) -> Verify:
        return Verify(children[0] if children else (), _meta_pos(meta))

    @v_args(meta=True)
    def target(self, meta: Meta, children: list[Any]) -> Target:
        name = children[0]
        options = children[1] if len(children) > 1 else ()
        return Target(str(name), options, _meta_pos(meta), _token_pos(name))

    @v_args(meta=True)
    def fixpoint(self, meta: Meta, children: list[Any]) -> Fixpoint:
        *arguments, body = children
        max_iterations, max_pos = DEFAULT_FIXPOINT_MAX, None
        for option in arguments[0] if arguments else ():
            if option.key != "max":
                raise self.source.error(
                    option.pos,
                    f"fixpoint has no option '{option.key}'{did_you_mean(option.key, ['max'])}; "
                    "its only option is max (the most iterations)",
                )
            max_iterations = self._whole_number(option.value, option.value_pos, "fixpoint(max=...)")
            max_pos = option.value_pos
        return Fixpoint(max_iterations, body, _meta_pos(meta), max_pos)

    @v_args(meta=True)
    def repeat(self, meta: Meta, children: list[Any]) -> Repeat:
        count, body = children
        number = self._whole_number(count.value, count.pos, "repeat(...)")
        return Repeat(number, body, _meta_pos(meta), count.pos)

    def _whole_number(self, value: Value, pos: Position | None, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.source.error(pos, f"{what} takes a whole number, got {_spell(value)}")
        return value

    def start(self, children: list[Any]) -> Schedule:
        target: Target | None = None
        statements = []
        for child in children:
            if isinstance(child, Target):
                if target is not None:
                    first = target.pos.line if target.pos else "?"
                    raise self.source.error(
                        child.pos, f"a schedule names one target; the first is at line {first}"
                    )
                target = child
            else:
                statements.append(child)
        return Schedule(tuple(statements), target)


def _spell(value: Value) -> str:
    """`value` as it would be written in a schedule, for messages."""
    try:
        return format_value(value)
    except ValueError:
        return repr(value)


# --- syntax errors -----------------------------------------------------------------------------

_VALUE_START = frozenset({"INT", "FLOAT", "SIZE", "STRING", "TRUE", "FALSE", "NONE", "NULL", "LSQB"})
_STATEMENT_START = frozenset({"NAME", "FIXPOINT", "REPEAT", "VERIFY"})

# How each terminal is named in "expected ..." lists, in the order they are listed.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "EQUAL": "'='",
    "COMMA": "','",
    "RPAR": "')'",
    "RSQB": "']'",
    "LPAR": "'('",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "_NL": "a new line",
    "SEMICOLON": "';'",
    "$END": "the end of the file",
    "INT": "an integer",
    "FLOAT": "a number",
    "SIZE": "a size (like 1MiB)",
    "STRING": "a string",
    "TRUE": "true",
    "FALSE": "false",
    "NONE": "none",
    "NULL": "null",
    "LSQB": "'['",
    "FIXPOINT": "'fixpoint'",
    "REPEAT": "'repeat'",
    "VERIFY": "'verify'",
    "TARGET": "'target'",
}

_CLOSERS = {"(": ")", "[": "]", "{": "}"}
_CLOSER_TERMINALS = {")": "RPAR", "]": "RSQB", "}": "RBRACE"}
_SIZE_HINT = (
    "sizes are written as a number and a unit, with no space between, like 512KiB, 1MiB, 4GiB, 10MB or 100B"
)


def _syntax_error(error: UnexpectedInput, text: str, source: Source) -> ScheduleError:
    """A lark exception as a ScheduleError: where, what came, what could have come, and hints."""
    if isinstance(error, UnexpectedCharacters) and text[error.pos_in_stream or 0 :][:1] == '"':
        return source.error(
            Position(error.line, error.column),
            "unterminated string: a string ends with '\"' on the same line",
        )
    offset, pos, what = _failure_point(error, text)
    expected = _accepted(error)
    open_brackets = _open_brackets(text, offset)
    hints: list[str] = []
    if isinstance(error, UnexpectedToken) and error.token.type != "$END":
        in_block = any(bracket == "{" for bracket, _ in open_brackets)
        hints.extend(_token_hints(error.token, text, in_block))
    if open_brackets and _CLOSER_TERMINALS[_CLOSERS[open_brackets[-1][0]]] in expected:
        bracket, opener = open_brackets[-1]
        kind = "block" if bracket == "{" else f"'{bracket}'"
        if what == "end of file":
            # The end of the file is rarely where the mistake is: point at what was left open.
            return source.error(
                opener,
                f"unexpected end of file — expected '{_CLOSERS[bracket]}' to close the {kind} "
                f"opened at line {opener.line}",
            )
        if bracket != "{" and pos.line > opener.line:
            # Blocks span lines by design; an option list or a list left open swallows the next.
            hints.append(f"the {kind} opened at line {opener.line}, column {opener.column} is not closed")
    message = f"unexpected {what}"
    if expected:
        message += " — " + _describe_expected(expected)
    return source.error(pos, message, hints)


def _failure_point(error: UnexpectedInput, text: str) -> tuple[int, Position, str]:
    """(offset, position, description) of what the parser could not take."""
    if isinstance(error, UnexpectedCharacters):
        offset = error.pos_in_stream or 0
        return offset, Position(error.line, error.column), f"character {text[offset : offset + 1]!r}"
    if isinstance(error, UnexpectedToken) and error.token.type != "$END":
        return error.token.start_pos or 0, _token_pos(error.token), _describe_token(error.token)
    # The end of the input: a '$END' token (or UnexpectedEOF from other lark parsers).
    return len(text), _offset_pos(text, len(text)), "end of file"


def _accepted(error: UnexpectedInput) -> set[str]:
    """The terminals the parser would have accepted where it failed."""
    interactive = getattr(error, "interactive_parser", None)
    if interactive is not None:
        try:
            return set(interactive.accepts())
        except Exception:  # fall back to lark's own, less exact, set
            pass
    names = getattr(error, "expected", None) or getattr(error, "allowed", None) or ()
    return {name for name in names if name in _TERMINAL_WORDS}


def _describe_expected(expected: set[str]) -> str:
    rest = {name for name in expected if name in _TERMINAL_WORDS}
    words = []
    if _VALUE_START <= rest:
        words.append("a value (number, string, size, list, true/false)")
        rest -= _VALUE_START
    if _STATEMENT_START <= rest:
        kinds = "a pass name, fixpoint, repeat, verify" + (", target" if "TARGET" in rest else "")
        words.append(f"a statement ({kinds})")
        rest -= _STATEMENT_START | {"TARGET"}
    if "_NL" in rest:
        rest.discard("$END")  # wherever the file may end, a new line may come too
    if "NAME" in rest and "RPAR" in rest:
        words.append("an option name")
        rest.discard("NAME")
    words.extend(_TERMINAL_WORDS[name] for name in _TERMINAL_WORDS if name in rest)
    if len(words) == 1:
        return f"expected {words[0]}"
    return "expected one of: " + ", ".join(words)


def _describe_token(token: Token) -> str:
    kind, text = token.type, str(token)
    if kind == "NAME":
        return f"name '{text}'"
    if kind == "_NL":
        return "end of line"
    if kind in ("INT", "FLOAT"):
        return f"number {text}"
    if kind == "SIZE":
        return f"size {text}"
    if kind == "STRING":
        return f"string {text if len(text) <= 30 else text[:27] + '...'}"
    return f"'{text}'"


def _token_hints(token: Token, text: str, in_block: bool) -> list[str]:
    """Guesses at what was meant, from the token and the text before it on its line."""
    start = token.start_pos or 0
    before = text[text.rfind("\n", 0, start) + 1 : start]
    if token.type == "NAME" and before[-1:].isdigit():
        return [_SIZE_HINT]
    if token.type == "TARGET":
        return ["'target' belongs at the top level of a schedule, not in a block"]
    if token.type == "RBRACE" and not in_block:
        return ["there is no open block for this '}' to close"]
    if token.type == "LBRACE":
        # `fixpont(max=2) {`: the word before the (optional) options looks like a keyword.
        word = re.search(r"([A-Za-z_]\w*)\s*(\([^()]*\))?\s*$", before)
        close = did_you_mean(word.group(1), ["fixpoint", "repeat"]) if word else ""
        if close:
            return [f"only fixpoint and repeat take a block{close}"]
    previous = re.search(r"([A-Za-z_]\w*)\s*$", before)
    if in_block and previous is not None and previous.group(1) == "target":
        return ["'target' belongs at the top level of a schedule, not in a block"]
    return []


def _offset_pos(text: str, offset: int) -> Position:
    line_start = text.rfind("\n", 0, offset) + 1
    return Position(text.count("\n", 0, offset) + 1, offset - line_start + 1)


def _open_brackets(text: str, end: int) -> list[tuple[str, Position]]:
    """The brackets opened and not closed before `end`, outermost first; strings and comments skipped."""
    stack: list[tuple[str, int]] = []
    i = 0
    while i < end:
        char = text[i]
        if char == "#":
            newline = text.find("\n", i)
            i = end if newline < 0 else newline
            continue
        if char == '"':
            i += 1
            while i < end and text[i] not in '"\n':
                i += 2 if text[i] == "\\" else 1
        elif char in _CLOSERS:
            stack.append((char, i))
        elif stack and char == _CLOSERS[stack[-1][0]]:
            stack.pop()
        i += 1
    return [(bracket, _offset_pos(text, offset)) for bracket, offset in stack]
