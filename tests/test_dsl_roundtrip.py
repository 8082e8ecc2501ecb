"""Property: printing a schedule AST and parsing the text gives the same AST back.

ASTs are generated with every value type (ints, floats, strings with any characters, bools,
none, sizes, nested lists), keyword-like names, nested blocks and an optional target.
Equality alone would accept `1` for `1.0` or `True`, so the `repr`s are compared too.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from iropt.dsl import (
    Fixpoint,
    Option,
    PassCall,
    Repeat,
    Schedule,
    Size,
    Statement,
    Target,
    Value,
    Verify,
    format_value,
    parse_schedule,
    print_schedule,
)
from iropt.dsl.ast import SIZE_UNITS

KEYWORDS = {"fixpoint", "repeat", "verify", "target"}

# Names that look like keywords, values or sizes stress the lexer more than random ones.
TRICKY_NAMES = ["none", "true", "null", "repeated", "targets", "verify_all", "fixpoint_", "_", "MiB", "e5"]

names = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(lambda n: n not in KEYWORDS),
    st.sampled_from(TRICKY_NAMES),
)
# Keywords are allowed as option names: after '(' or ',' only a name can come.
keys = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), st.sampled_from([*KEYWORDS, *TRICKY_NAMES])
)


@st.composite
def sizes(draw: st.DrawFn) -> Size:
    unit = draw(st.sampled_from(sorted(SIZE_UNITS)))
    whole = draw(st.integers(min_value=0, max_value=10**6))
    # A fraction is allowed when the byte count comes out whole: halves of any unit but B.
    fraction = draw(st.sampled_from(["", ".5", ".25", ".0"])) if unit != "B" else ""
    return Size.parse(f"{whole}{fraction}{unit}")


scalars: st.SearchStrategy[Value] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    sizes(),
)
values: st.SearchStrategy[Value] = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6
)
option_lists = st.lists(st.builds(Option, keys, values), max_size=3, unique_by=lambda o: o.key).map(tuple)

pass_calls = st.builds(PassCall, names, option_lists)
verifies = st.builds(Verify, option_lists)


def blocks(inner: st.SearchStrategy[Statement]) -> st.SearchStrategy[Statement]:
    body = st.lists(inner, max_size=3).map(tuple)
    # The parser takes any whole number here; only the resolver insists on positive ones.
    return st.one_of(
        st.builds(Fixpoint, st.integers(min_value=-5, max_value=1000), body),
        st.builds(Repeat, st.integers(min_value=-5, max_value=1000), body),
    )


statements = st.recursive(st.one_of(pass_calls, verifies), blocks, max_leaves=8)
schedules = st.builds(
    Schedule,
    st.lists(statements, max_size=4).map(tuple),
    st.one_of(st.none(), st.builds(Target, names, option_lists)),
)


@settings(max_examples=200, deadline=None)
@given(schedules)
def test_parse_of_print_is_identity(schedule: Schedule) -> None:
    text = print_schedule(schedule)
    parsed = parse_schedule(text)
    assert parsed == schedule
    assert repr(parsed) == repr(schedule)
    # Canonical text is a fixed point of print(parse(...)).
    assert print_schedule(parsed) == text
    assert_positions_point_at_what_they_describe(parsed, text)


@settings(max_examples=200, deadline=None)
@given(values)
def test_values_round_trip_with_their_types(value: Value) -> None:
    (call,) = parse_schedule(f"p(v={format_value(value)})").statements
    assert isinstance(call, PassCall)
    assert repr(call.options[0].value) == repr(value)


def assert_positions_point_at_what_they_describe(parsed: Schedule, text: str) -> None:
    """Every recorded position is where the node's name, key or value starts in `text`."""
    lines = text.split("\n")

    def at(pos: Any) -> str:
        assert pos is not None
        return lines[pos.line - 1][pos.column - 1 :]

    def check_options(options: tuple[Option, ...]) -> None:
        for option in options:
            assert at(option.pos).startswith(f"{option.key}=")
            assert at(option.value_pos).startswith(format_value(option.value))

    def check(statement: Statement) -> None:
        if isinstance(statement, PassCall):
            assert at(statement.pos).startswith(statement.name)
            check_options(statement.options)
        elif isinstance(statement, Verify):
            assert at(statement.pos).startswith("verify")
            check_options(statement.options)
        elif isinstance(statement, Fixpoint):
            assert at(statement.pos).startswith("fixpoint")
            assert at(statement.max_pos).startswith(str(statement.max))
        else:
            assert at(statement.pos).startswith("repeat")
            assert at(statement.count_pos).startswith(str(statement.count))
        for inner in getattr(statement, "body", ()):
            check(inner)

    for statement in parsed.statements:
        check(statement)
    if parsed.target is not None:
        assert at(parsed.target.name_pos).startswith(parsed.target.name)
        check_options(parsed.target.options)
