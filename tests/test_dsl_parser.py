"""The schedule parser: every value type, blocks, separators, positions, and syntax errors.

Error tests check the `file:line:col` prefix, that the caret sits under that column of the
quoted line, the words for what was expected, and the hints. Expected columns are derived from
the text (`text.index(...)`), not typed in.
"""

from __future__ import annotations

import pytest

from iropt.dsl import (
    Fixpoint,
    Option,
    PassCall,
    Position,
    Repeat,
    Schedule,
    ScheduleError,
    Size,
    Target,
    Verify,
    parse_schedule,
)
from iropt.errors import UserError

VALUE_WORDS = "a value (number, string, size, list, true/false)"


def only_option(text: str) -> Option:
    """The single option of the single pass call in `text`."""
    schedule = parse_schedule(text)
    (call,) = schedule.statements
    assert isinstance(call, PassCall)
    (option,) = call.options
    return option


def position_of(text: str, needle: str, occurrence: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the `occurrence`-th `needle` in `text`."""
    offset = -1
    for _ in range(occurrence + 1):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def syntax_error(text: str, filename: str = "s.opt") -> ScheduleError:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, filename)
    return caught.value


def assert_points_at(
    error: ScheduleError, text: str, line: int, column: int, filename: str = "s.opt"
) -> None:
    """The message starts with file:line:col and its caret is under that column of that line."""
    message = str(error)
    assert message.startswith(f"{filename}:{line}:{column}: error: ")
    assert (error.file, error.line, error.column) == (filename, line, column)
    rendered = message.split("\n")
    source_line = text.split("\n")[line - 1]
    assert rendered[1] == "  " + source_line
    assert rendered[2].index("^") - 2 == column - 1
    assert rendered[2].strip() == "^"


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("1", 1),
        ("0", 0),
        ("-3", -3),
        ("123456789012345678901234567890", 123456789012345678901234567890),
        ("0.5", 0.5),
        ("-2.0", -2.0),
        ("1e-4", 1e-4),
        ("1E4", 1e4),
        ("-1.5e+3", -1.5e3),
        (".25", 0.25),
        ('"percentile"', "percentile"),
        ('""', ""),
        ('"calib/"', "calib/"),
        ('"a \\"quoted\\" \\\\ back\\nline\\ttab"', 'a "quoted" \\ back\nline\ttab'),
        ('"caf\\u00e9 ☕"', "café ☕"),
        ("true", True),
        ("false", False),
        ("none", None),
        ("null", None),
        ('[1, 2, "a"]', (1, 2, "a")),
        ("[]", ()),
        ("[1, 2,]", (1, 2)),
        ("[[1], [2.5, [true, none]], []]", ((1,), (2.5, (True, None)), ())),
    ],
)
def test_values(spelling: str, expected: object) -> None:
    option = only_option(f"p(v={spelling})")
    assert option.key == "v"
    assert option.value == expected
    # Equality alone would let 1 == 1.0 == True through.
    assert repr(option.value) == repr(expected)


@pytest.mark.parametrize(
    ("spelling", "number", "unit_bytes"),
    [
        ("100B", 100, 1),
        ("512KiB", 512, 1024),
        ("1MiB", 1, 1024**2),
        ("4GiB", 4, 1024**3),
        ("2TiB", 2, 1024**4),
        ("10KB", 10, 1000),
        ("10MB", 10, 1000**2),
        ("3GB", 3, 1000**3),
        ("1.5KiB", 1.5, 1024),
        ("0.5MB", 0.5, 1000**2),
    ],
)
def test_sizes_keep_their_spelling(spelling: str, number: float, unit_bytes: int) -> None:
    value = only_option(f"fold_constants(max_bytes={spelling})").value
    assert value == Size(int(number * unit_bytes), spelling)
    assert isinstance(value, Size) and isinstance(value.bytes, int)


def test_sizes_inside_lists() -> None:
    value = only_option("p(v=[1KiB, 2, 3MB])").value
    assert value == (Size(1024, "1KiB"), 2, Size(3 * 1000**2, "3MB"))


# --- statements ------------------------------------------------------------------------------


def test_pass_calls_with_and_without_options() -> None:
    schedule = parse_schedule('a\nb()\nc(x=1, y="s",)\nd(\n  x=1,\n  y=[1,\n     2],\n)\n')
    assert schedule.statements == (
        PassCall("a"),
        PassCall("b"),
        PassCall("c", (Option("x", 1), Option("y", "s"))),
        PassCall("d", (Option("x", 1), Option("y", (1, 2)))),
    )
    assert schedule.target is None


def test_the_example_from_the_design() -> None:
    text = (
        "# int8 for ONNX Runtime on CPU\n"
        'target ort(providers=["CPUExecutionProvider"], intra_op_threads=1)\n'
        "\n"
        "fixpoint(max=8) {\n"
        "  fold_constants(max_bytes=1MiB)\n"
        "  eliminate_identity\n"
        "}\n"
        "repeat(2) { eliminate_dead_code }\n"
        'quantize(calibration="calib/", method="percentile", percentile=99.99)\n'
        'verify(metric="cosine", min=0.995)\n'
    )
    schedule = parse_schedule(text)
    assert schedule == Schedule(
        statements=(
            Fixpoint(
                8,
                (
                    PassCall("fold_constants", (Option("max_bytes", Size(1024**2, "1MiB")),)),
                    PassCall("eliminate_identity"),
                ),
            ),
            Repeat(2, (PassCall("eliminate_dead_code"),)),
            PassCall(
                "quantize",
                (
                    Option("calibration", "calib/"),
                    Option("method", "percentile"),
                    Option("percentile", 99.99),
                ),
            ),
            Verify((Option("metric", "cosine"), Option("min", 0.995))),
        ),
        target=Target("ort", (Option("providers", ("CPUExecutionProvider",)), Option("intra_op_threads", 1))),
    )


@pytest.mark.parametrize("head", ["fixpoint", "fixpoint()", "fixpoint(max=8)"])
def test_fixpoint_max_defaults_to_eight(head: str) -> None:
    (block,) = parse_schedule(f"{head} {{ a }}").statements
    assert block == Fixpoint(8, (PassCall("a"),))


def test_blocks_nest() -> None:
    text = "fixpoint(max=3) {\n  repeat(2) {\n    fixpoint {\n      a\n    }\n    b\n  }\n  c\n}\n"
    (outer,) = parse_schedule(text).statements
    assert outer == Fixpoint(3, (Repeat(2, (Fixpoint(8, (PassCall("a"),)), PassCall("b"))), PassCall("c")))


def test_empty_blocks_and_empty_schedules() -> None:
    assert parse_schedule("fixpoint {}\nrepeat(1) {\n}\n").statements == (Fixpoint(8, ()), Repeat(1, ()))
    assert parse_schedule("") == Schedule()
    assert parse_schedule("\n\n# only a comment\n   \n") == Schedule()


def test_semicolons_and_blank_lines_separate_statements() -> None:
    expected = (PassCall("a"), PassCall("b"), PassCall("c"))
    assert parse_schedule("a; b; c").statements == expected
    assert parse_schedule(";a;;b;\n\n;c;").statements == expected
    assert parse_schedule("\n\na\r\nb\r\n\r\nc\r\n").statements == expected
    assert parse_schedule("fixpoint { a; b }; c").statements == (Fixpoint(8, expected[:2]), expected[2])


def test_comments() -> None:
    text = (
        "# leading comment\n"
        "a  # after a statement\n"
        "fixpoint {  # after a brace\n"
        '  # a comment with "quotes" and { braces\n'
        "  b(x=1)  # after options\n"
        "}\n"
        "# trailing comment without a new line"
    )
    schedule = parse_schedule(text)
    assert schedule.statements == (PassCall("a"), Fixpoint(8, (PassCall("b", (Option("x", 1),)),)))


def test_hash_inside_a_string_is_not_a_comment() -> None:
    assert only_option('p(v="a # b")').value == "a # b"


def test_keywords_can_be_option_names_and_prefixes_of_pass_names() -> None:
    schedule = parse_schedule("repeated(target=1, repeat=2, none=3)\nverify_all\ntargets\nfixpoints")
    assert schedule.statements == (
        PassCall("repeated", (Option("target", 1), Option("repeat", 2), Option("none", 3))),
        PassCall("verify_all"),
        PassCall("targets"),
        PassCall("fixpoints"),
    )


def test_target_is_taken_out_of_the_statements() -> None:
    schedule = parse_schedule("a\ntarget ort\nb\n")
    assert schedule.target == Target("ort")
    assert schedule.statements == (PassCall("a"), PassCall("b"))


def test_verify_with_and_without_options() -> None:
    schedule = parse_schedule('verify\nverify(metric="snr", min=30)')
    assert schedule.statements == (Verify(), Verify((Option("metric", "snr"), Option("min", 30))))


def test_byte_order_mark_is_ignored() -> None:
    assert parse_schedule("\ufeffa").statements == (PassCall("a"),)


# --- positions --------------------------------------------------------------------------------


def test_every_node_records_where_it_starts() -> None:
    text = "target ort(threads=2)\nfixpoint(max=4) {\n  a(x=1MiB, y=[1, 2])\n  repeat(3) { verify(min=0.5) }\n}\n"
    schedule = parse_schedule(text)
    assert schedule.target is not None
    assert schedule.target.pos == Position(*position_of(text, "target"))
    assert schedule.target.name_pos == Position(*position_of(text, "ort"))
    (fixpoint,) = schedule.statements
    assert isinstance(fixpoint, Fixpoint)
    assert fixpoint.pos == Position(*position_of(text, "fixpoint"))
    assert fixpoint.max_pos == Position(*position_of(text, "4"))
    call, repeat = fixpoint.body
    assert isinstance(call, PassCall) and isinstance(repeat, Repeat)
    assert call.pos == Position(*position_of(text, "a("))
    x, y = call.options
    assert x.pos == Position(*position_of(text, "x=1MiB"))
    assert x.value_pos == Position(*position_of(text, "1MiB"))
    assert y.value_pos == Position(*position_of(text, "[1"))
    assert repeat.pos == Position(*position_of(text, "repeat"))
    assert repeat.count_pos == Position(*position_of(text, "3"))
    (verify,) = repeat.body
    assert isinstance(verify, Verify)
    assert verify.pos == Position(*position_of(text, "verify"))


def test_positions_do_not_take_part_in_equality() -> None:
    assert parse_schedule("a(x=1)") == parse_schedule("\n\n   a(\n x = 1 )")
    assert PassCall("a", pos=Position(1, 1)) == PassCall("a", pos=Position(9, 9))


def test_schedule_keeps_its_filename_and_source() -> None:
    schedule = parse_schedule("a\n", "my.opt")
    assert (schedule.filename, schedule.source) == ("my.opt", "a\n")


# --- syntax errors ------------------------------------------------------------------------------


def test_missing_value() -> None:
    text = "fixpoint {\n  fold_constants(max_bytes=)\n}\n"
    error = syntax_error(text)
    assert isinstance(error, UserError) and error.exit_code == 2
    assert_points_at(error, text, *position_of(text, ")"))
    assert f"unexpected ')' — expected {VALUE_WORDS}" in str(error)


def test_missing_closing_brace_points_at_the_opening_brace() -> None:
    text = "a\nfixpoint(max=2) {\n  b\n  c\n"
    error = syntax_error(text)
    line, column = position_of(text, "{")
    assert_points_at(error, text, line, column)
    assert f"unexpected end of file — expected '}}' to close the block opened at line {line}" in str(error)


@pytest.mark.parametrize(
    ("text", "unclosed"),
    [
        # The last '}' closes the inner block, so the outer one is left open.
        ("fixpoint {\n  repeat(2) {\n    a\n}\n", 0),
        ("fixpoint {\n  repeat(2) {\n    a\n", 1),
    ],
)
def test_missing_closing_brace_with_nested_blocks(text: str, unclosed: int) -> None:
    error = syntax_error(text)
    line, column = position_of(text, "{", occurrence=unclosed)
    assert_points_at(error, text, line, column)
    assert f"to close the block opened at line {line}" in str(error)


def test_missing_closing_parenthesis_at_end_of_file() -> None:
    text = "a(x=1,\n  y=2\n"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "("))
    assert "expected ')' to close the '(' opened at line 1" in str(error)


def test_missing_closing_parenthesis_before_the_next_statement() -> None:
    text = "a(x=1\nb(y=2)\n"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "b("))
    assert "unexpected name 'b' — expected one of: ',', ')'" in str(error)
    assert "hint: the '(' opened at line 1, column 2 is not closed" in str(error)


def test_closing_brace_inside_an_open_parenthesis() -> None:
    text = "fixpoint(max=2) {\n  a(\n}\n"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "}"))
    assert "unexpected '}' — expected one of: an option name, ')'" in str(error)
    assert "hint: the '(' opened at line 2, column 4 is not closed" in str(error)
    assert "no open block" not in str(error)


def test_two_statements_on_one_line() -> None:
    text = "a b\n"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "b"))
    assert "unexpected name 'b' — expected one of: '(', a new line, ';'" in str(error)


def test_unexpected_character() -> None:
    text = "a(x=@)"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "@"))
    assert f"unexpected character '@' — expected {VALUE_WORDS}" in str(error)


def test_missing_option_name() -> None:
    text = "a(=1)"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "="))
    assert "unexpected '=' — expected one of: an option name, ')'" in str(error)


def test_unterminated_string() -> None:
    text = 'a(x="calib/)\nb\n'
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, '"'))
    assert "unterminated string" in str(error)


def test_invalid_escape_points_at_the_backslash() -> None:
    text = 'a(x="ok\\q")'
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "\\"))
    assert "invalid escape '\\q' in a string" in str(error)


def test_unclosed_list() -> None:
    text = "a(x=[1, 2)"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, ")"))
    assert "expected one of: ',', ']'" in str(error)


def test_size_with_a_wrong_unit_gets_a_hint() -> None:
    text = "fold_constants(max_bytes=1Mi)"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "Mi"))
    assert "unexpected name 'Mi'" in str(error)
    assert "hint: sizes are written as a number and a unit" in str(error)


def test_size_that_is_not_a_whole_number_of_bytes() -> None:
    text = "a(x=1.1KiB)"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "1.1KiB"))
    assert "size 1.1KiB is not a whole number of bytes" in str(error)


def test_misspelt_block_keyword_gets_did_you_mean() -> None:
    text = "fixpont(max=2) {\n  a\n}\n"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "{"))
    assert "unexpected '{'" in str(error)
    assert "did you mean 'fixpoint'?" in str(error)


def test_unknown_fixpoint_option_gets_did_you_mean() -> None:
    text = "fixpoint(maxx=3) { a }"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "maxx"))
    assert "fixpoint has no option 'maxx' (did you mean 'max'?)" in str(error)


@pytest.mark.parametrize(
    ("text", "bad", "what"),
    [
        ("fixpoint(max=1.5) { a }", "1.5", "fixpoint(max=...)"),
        ("fixpoint(max=true) { a }", "true", "fixpoint(max=...)"),
        ('repeat("2") { a }', '"2"', "repeat(...)"),
        ("repeat(2.0) { a }", "2.0", "repeat(...)"),
    ],
)
def test_block_counts_must_be_whole_numbers(text: str, bad: str, what: str) -> None:
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, bad))
    assert f"{what} takes a whole number, got {bad}" in str(error)


def test_block_brace_must_be_on_the_same_line() -> None:
    text = "repeat(2)\n{ a }\n"
    error = syntax_error(text)
    assert_points_at(error, text, 1, len("repeat(2)") + 1)
    assert "unexpected end of line — expected '{'" in str(error)


def test_second_target() -> None:
    text = "target ort\na\ntarget tensorrt\n"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "target", occurrence=1))
    assert "a schedule names one target; the first is at line 1" in str(error)


@pytest.mark.parametrize(
    "text",
    # Right after '{' the lexer reads `target` as a name, after a new line as the keyword.
    ["fixpoint { target }", "fixpoint {\n  target\n}", "fixpoint {\n  target ort(x=1)\n}"],
)
def test_target_inside_a_block(text: str) -> None:
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "target"))
    assert "'target' belongs at the top level of a schedule, not in a block" in str(error)


def test_target_with_a_name_inside_a_block() -> None:
    text = "fixpoint { target ort }"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "ort"))
    assert "hint: 'target' belongs at the top level" in str(error)


def test_target_without_a_name() -> None:
    text = "target\na\n"
    error = syntax_error(text)
    assert_points_at(error, text, 1, len("target") + 1)
    assert "unexpected end of line — expected a name" in str(error)


def test_stray_closing_brace() -> None:
    text = "a\n}\n"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "}"))
    assert "expected one of: a statement (a pass name, fixpoint, repeat, verify, target)" in str(error)
    assert "hint: there is no open block for this '}' to close" in str(error)


def test_inside_a_block_the_closing_brace_is_expected() -> None:
    text = "fixpoint { a b }"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "b"))
    assert "expected one of: '(', '}', a new line, ';'" in str(error)


def test_option_given_twice() -> None:
    text = "a(x=1, y=2, x=3)"
    error = syntax_error(text)
    assert_points_at(error, text, *position_of(text, "x", occurrence=1))
    assert "option 'x' is given twice" in str(error)


def test_caret_under_tab_indented_text() -> None:
    text = "fixpoint {\n\ta(x=,)\n}"
    error = syntax_error(text)
    line, column = position_of(text, ",")
    assert_points_at(error, text, line, column)
    # The tab is kept in the caret line so that the caret lines up in any terminal.
    assert str(error).split("\n")[2] == "  \t    ^"


def test_filename_appears_in_the_message() -> None:
    error = syntax_error("a(", filename="schedules/int8.opt")
    assert str(error).startswith("schedules/int8.opt:1:2: error: ")
