"""The resolver: schedule AST -> Pipeline, with names and options checked against the registries.

Real passes are used where they exist (`eliminate_identity` and its bool option `dropout`);
for option types no built-in pass has, this module registers test-only passes and a test-only
back end under names starting with `dsltest_`, for the duration of this module only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from iropt.dsl import (
    Option,
    PassCall,
    Schedule,
    ScheduleError,
    Size,
    check_schedule,
    load_schedule,
    parse_schedule,
    resolve,
)
from iropt.infra.backend import Backend
from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult, TargetSpec
from iropt.infra.pipeline import FixpointBlock, PassStep, Pipeline, RepeatBlock, SourceLocation, VerifyStep
from iropt.infra.registry import BACKENDS, PASSES
from iropt.ir.model import Model
from iropt.schedules import builtin_schedule_names, builtin_schedule_text
from iropt.verify.criteria import Criterion
from iropt.verify.runner import Runner


@dataclass(kw_only=True)
class SizedTestPass(Pass):
    """Test-only pass with one option of every kind the DSL can spell."""

    max_bytes: int = 0
    ratio: float = 0.5
    label: str = "x"
    flag: bool = False
    widths: list[int] = field(default_factory=list)
    mode: Literal["fast", "exact"] = "fast"
    limit: float | None = None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(changed=False)


@dataclass(kw_only=True)
class RequiredTestPass(Pass):
    """Test-only lossy pass with a required option that its constructor also range-checks."""

    kind = PassKind.LOSSY
    factor: float
    name_hint: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {self.factor}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(changed=False)


@dataclass(kw_only=True)
class OptionsOnlyBackend(Backend):
    """Test-only back end: options only, never compiles anything."""

    threads: int = 0
    workspace: int = 0
    providers: list[str] = field(default_factory=list)

    def compile(self, model: Model) -> Runner:
        raise NotImplementedError("the DSL tests never compile")


TEST_PASSES: dict[str, type[Pass]] = {"dsltest_sized": SizedTestPass, "dsltest_required": RequiredTestPass}
TEST_BACKENDS: dict[str, type[Backend]] = {"dsltest_backend": OptionsOnlyBackend}


@pytest.fixture(autouse=True, scope="module")
def _test_only_registrations() -> Iterator[None]:
    """Register the test-only passes and back end for this module's tests only.

    Tests elsewhere that go through every registered pass (listings, "every pass runs") must
    never meet them, so they are taken out again afterwards (the registry has no public
    removal, hence `_entries`).
    """
    for name, cls in TEST_PASSES.items():
        PASSES.add(name, cls)
    for name, backend in TEST_BACKENDS.items():
        BACKENDS.add(name, backend)
    yield
    for name in TEST_PASSES:
        PASSES._entries.pop(name, None)
    for name in TEST_BACKENDS:
        BACKENDS._entries.pop(name, None)


def resolved(text: str, filename: str = "s.opt") -> Pipeline:
    return resolve(parse_schedule(text, filename))


def failure(text: str, filename: str = "s.opt") -> ScheduleError:
    with pytest.raises(ScheduleError) as caught:
        resolved(text, filename)
    return caught.value


def position_of(text: str, needle: str, occurrence: int = 0) -> tuple[int, int]:
    offset = -1
    for _ in range(occurrence + 1):
        offset = text.index(needle, offset + 1)
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def assert_points_at(error: ScheduleError, text: str, line: int, column: int, index: int = 0) -> None:
    """Diagnostic `index` is at line:column, and its caret sits under that column."""
    diagnostic = error.diagnostics[index]
    assert (diagnostic.line, diagnostic.column) == (line, column)
    rendered = diagnostic.format().split("\n")
    assert rendered[0].startswith(f"{diagnostic.file}:{line}:{column}: error: ")
    assert rendered[1] == "  " + text.split("\n")[line - 1]
    assert rendered[2] == "  " + " " * (column - 1) + "^"


def only_pass(pipeline: Pipeline) -> Pass:
    (step,) = pipeline.steps
    assert isinstance(step, PassStep)
    return step.pass_


# --- passes and their options ----------------------------------------------------------------


def test_real_pass_with_its_option_and_location() -> None:
    text = "\n  eliminate_identity(dropout=false)\n"
    pipeline = resolved(text, "cleanup.opt")
    (step,) = pipeline.steps
    assert isinstance(step, PassStep)
    assert type(step.pass_) is PASSES.get("eliminate_identity").cls
    assert step.pass_.options() == {"dropout": False}
    assert step.location == SourceLocation("cleanup.opt", *position_of(text, "eliminate_identity"))
    assert pipeline.name == "cleanup.opt"
    assert pipeline.target is None


def test_defaults_are_left_to_the_pass() -> None:
    assert only_pass(resolved("eliminate_identity")).options() == {"dropout": True}


def test_every_option_type() -> None:
    text = 'dsltest_sized(max_bytes=1MiB, ratio=1, label="l", flag=true, widths=[1KiB, 8], mode="exact", limit=none)'
    values = only_pass(resolved(text)).options()
    assert values == {
        "max_bytes": 1024**2,
        "ratio": 1.0,
        "label": "l",
        "flag": True,
        "widths": [1024, 8],
        "mode": "exact",
        "limit": None,
    }
    # Sizes reach the pass as ints, and an int given for a float option as a float.
    assert type(values["max_bytes"]) is int and type(values["ratio"]) is float
    assert all(type(w) is int for w in values["widths"])


def test_unknown_pass_suggests_the_nearest_name() -> None:
    text = "fixpoint {\n  eliminate_identiy\n}\n"
    error = failure(text)
    assert_points_at(error, text, *position_of(text, "eliminate_identiy"))
    assert "unknown pass 'eliminate_identiy' (did you mean 'eliminate_identity'" in str(error)
    assert "iropt passes" in str(error)


def test_unknown_option_suggests_the_nearest_option() -> None:
    text = "eliminate_identity(dropot=false)"
    error = failure(text)
    assert_points_at(error, text, *position_of(text, "dropot"))
    assert "pass 'eliminate_identity' has no option 'dropot' (did you mean 'dropout'?)" in str(error)
    assert "its options are: dropout" in str(error)


@pytest.mark.parametrize(
    ("text", "bad", "expects"),
    [
        ("eliminate_identity(dropout=1)", "1", "expects bool, got 1 (int)"),
        ('dsltest_sized(max_bytes="1MiB")', '"1MiB"', "expects int, got '1MiB' (str)"),
        ("dsltest_sized(ratio=true)", "true", "expects float, got True (bool)"),
        ("dsltest_sized(widths=[1, 2.5])", "[1, 2.5]", "expects list[int]"),
        ('dsltest_sized(label=["a"])', '["a"]', "expects str"),
        ('dsltest_sized(limit="no")', '"no"', "expects float | None"),
    ],
)
def test_wrong_option_type_points_at_the_value(text: str, bad: str, expects: str) -> None:
    error = failure(text)
    assert_points_at(error, text, *position_of(text, bad))
    assert expects in str(error)


def test_wrong_choice_suggests_the_nearest_choice() -> None:
    text = 'dsltest_sized(mode="fsat")'
    error = failure(text)
    assert_points_at(error, text, *position_of(text, '"fsat"'))
    assert "expects 'fast' | 'exact', got 'fsat'" in str(error)
    assert "(did you mean 'fast'?)" in str(error)


def test_missing_required_option() -> None:
    text = 'eliminate_identity\ndsltest_required(name_hint="x")\n'
    error = failure(text)
    assert_points_at(error, text, *position_of(text, "dsltest_required"))
    assert "pass 'dsltest_required' needs option(s) factor (float)" in str(error)


def test_constructor_checks_become_positioned_errors() -> None:
    text = "dsltest_required(factor=2)"
    error = failure(text)
    assert_points_at(error, text, 1, 1)
    assert "pass 'dsltest_required': factor must be in (0, 1], got 2.0" in str(error)


def test_lossy_pass_makes_a_lossy_pipeline() -> None:
    assert resolved("dsltest_required(factor=0.5)").is_lossy
    assert not resolved("eliminate_identity").is_lossy


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    text = (
        "target dsltest_backnd\n"
        "eliminate_identiy\n"
        "fixpoint(max=0) {\n"
        "  eliminate_identity(dropout=2)\n"
        "}\n"
        "verify(mn=0.9)\n"
    )
    error = failure(text)
    assert len(error.diagnostics) == 5
    # The target is checked last and block counts after their bodies, but come out in file order.
    for index, needle in enumerate(["dsltest_backnd", "eliminate_identiy", "0", "2", "mn"]):
        assert_points_at(error, text, *position_of(text, needle), index=index)
    assert str(error).count(": error: ") == 5


# --- blocks -----------------------------------------------------------------------------------


def test_blocks_become_pipeline_blocks() -> None:
    text = "fixpoint(max=3) {\n  eliminate_identity\n  repeat(2) { dsltest_sized; eliminate_identity }\n}\nfixpoint { eliminate_identity }\n"
    pipeline = resolved(text)
    outer, default = pipeline.steps
    assert isinstance(outer, FixpointBlock) and isinstance(default, FixpointBlock)
    assert outer.max_iterations == 3 and default.max_iterations == 8
    assert outer.location == SourceLocation("s.opt", 1, 1)
    first, inner = outer.body
    assert isinstance(first, PassStep) and isinstance(inner, RepeatBlock)
    assert inner.count == 2
    assert inner.location == SourceLocation("s.opt", *position_of(text, "repeat"))
    assert [type(s.pass_).__name__ for s in inner.body if isinstance(s, PassStep)] == [
        "SizedTestPass",
        PASSES.get("eliminate_identity").cls.__name__,
    ]
    assert len(list(pipeline.passes())) == 4


@pytest.mark.parametrize(
    ("text", "bad", "what"),
    [
        ("fixpoint(max=0) { eliminate_identity }", "0", "fixpoint(max=...)"),
        ("repeat(0) { eliminate_identity }", "0", "repeat(...)"),
        ("repeat(-2) { eliminate_identity }", "-2", "repeat(...)"),
    ],
)
def test_block_counts_must_be_positive(text: str, bad: str, what: str) -> None:
    error = failure(text)
    assert_points_at(error, text, *position_of(text, bad))
    assert f"{what} takes a positive whole number, got {bad}" in str(error)


# --- verify -------------------------------------------------------------------------------------


def test_verify_builds_a_criterion() -> None:
    text = 'eliminate_identity\nverify(metric="cosine", min=0.995)\nverify\nverify(rtol=1e-3, atol=0, samples=4)\n'
    pipeline = resolved(text)
    _, cosine, default, tolerance = pipeline.steps
    assert isinstance(cosine, VerifyStep) and isinstance(default, VerifyStep)
    assert isinstance(tolerance, VerifyStep)
    assert cosine.criterion == Criterion(metric="cosine", min=0.995)
    assert cosine.location == SourceLocation("s.opt", 2, 1)
    assert default.criterion == Criterion()
    assert tolerance.criterion == Criterion(rtol=1e-3, atol=0.0, samples=4)
    assert pipeline.final_criterion() == tolerance.criterion


def test_verify_unknown_option() -> None:
    text = 'verify(metric="cosine", mn=0.9)'
    error = failure(text)
    assert_points_at(error, text, *position_of(text, "mn"))
    assert "verify has no option 'mn' (did you mean 'min'" in str(error)


def test_verify_unknown_metric() -> None:
    text = 'verify(metric="cosin", min=0.9)'
    error = failure(text)
    assert_points_at(error, text, *position_of(text, '"cosin"'))
    assert "got 'cosin' (str) (did you mean 'cosine'" in str(error)


def test_verify_criterion_checks_are_positioned() -> None:
    text = 'eliminate_identity\nverify(metric="cosine")\n'
    error = failure(text)
    assert_points_at(error, text, 2, 1)
    assert "needs a lower bound: min=..." in str(error)


def test_verify_wrong_type() -> None:
    text = 'verify(samples="2")'
    error = failure(text)
    assert_points_at(error, text, *position_of(text, '"2"'))
    assert "verify option 'samples' expects int" in str(error)


# --- target -------------------------------------------------------------------------------------


def test_target_with_options() -> None:
    text = 'target dsltest_backend(threads=2, workspace=1GiB, providers=["A", "B"])\neliminate_identity\n'
    pipeline = resolved(text)
    assert pipeline.target == TargetSpec(
        "dsltest_backend", {"threads": 2, "workspace": 1024**3, "providers": ["A", "B"]}
    )


def test_target_without_options() -> None:
    assert resolved("target dsltest_backend").target == TargetSpec("dsltest_backend", {})


def test_unknown_target_suggests_the_nearest_back_end() -> None:
    text = "target dsltest_backnd\n"
    error = failure(text)
    assert_points_at(error, text, *position_of(text, "dsltest_backnd"))
    assert "unknown back end 'dsltest_backnd' (did you mean 'dsltest_backend'" in str(error)


def test_unknown_target_option() -> None:
    text = "target dsltest_backend(thread=2)"
    error = failure(text)
    assert_points_at(error, text, *position_of(text, "thread"))
    assert "back end 'dsltest_backend' has no option 'thread' (did you mean 'threads'?)" in str(error)


def test_ort_target_from_the_design() -> None:
    if "ort" not in BACKENDS.names():
        pytest.skip("the ort back end (lowering/ort.py) is not registered")
    pipeline = resolved('target ort(providers=["CPUExecutionProvider"], intra_op_threads=1)\n')
    assert pipeline.target == TargetSpec(
        "ort", {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1}
    )


# --- ASTs built in code, and loading files ------------------------------------------------------


def test_ast_built_in_code_resolves_without_positions() -> None:
    schedule = Schedule((PassCall("dsltest_sized", (Option("max_bytes", Size(2048, "2KiB")),)),))
    pipeline = resolve(schedule, "built.opt")
    (step,) = pipeline.steps
    assert isinstance(step, PassStep) and step.location is None
    assert step.pass_.options()["max_bytes"] == 2048
    with pytest.raises(ScheduleError) as caught:
        resolve(Schedule((PassCall("no_such_pass_xyz"),)), "built.opt")
    assert str(caught.value).startswith("built.opt: error: unknown pass 'no_such_pass_xyz'")


def test_load_schedule_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.opt"
    path.write_text("fixpoint(max=2) {\n  eliminate_identity\n}\n", encoding="utf-8")
    pipeline = load_schedule(str(path))
    (block,) = pipeline.steps
    assert isinstance(block, FixpointBlock) and block.max_iterations == 2
    assert block.location == SourceLocation(str(path), 1, 1)
    assert pipeline.name == str(path)
    assert check_schedule(path).name == str(path)


def test_load_schedule_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.opt"
    path.write_text("eliminate_identity(dropout=)\n", encoding="utf-8")
    with pytest.raises(ScheduleError) as caught:
        load_schedule(str(path))
    assert str(caught.value).startswith(f"{path}:1:28: error: unexpected ')'")


@pytest.mark.parametrize("name", builtin_schedule_names())
def test_builtin_schedules_load_by_name(name: str) -> None:
    text = builtin_schedule_text(name)
    assert text is not None
    schedule = parse_schedule(text)
    missing = sorted(_pass_names(schedule.statements) - set(PASSES.names()))
    if missing:
        pytest.skip(f"built-in schedule '{name}' uses passes not written yet: {missing}")
    pipeline = load_schedule(name)
    assert pipeline.name == name
    assert [p.name for p in pipeline.passes()] == list(_pass_name_list(schedule.statements))
    assert all(
        step.location is not None and step.location.file == f"<builtin>/{name}.opt" for step in pipeline.steps
    )


def test_an_existing_file_wins_over_a_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (name,) = builtin_schedule_names()[:1]
    monkeypatch.chdir(tmp_path)
    Path(name).write_text("eliminate_identity\n", encoding="utf-8")
    assert [p.name for p in load_schedule(name).passes()] == ["eliminate_identity"]


def test_missing_schedule_lists_the_builtins(tmp_path: Path) -> None:
    missing = tmp_path / "nope.opt"
    with pytest.raises(ScheduleError) as caught:
        load_schedule(str(missing))
    message = str(caught.value)
    assert message.startswith(f"{missing}: error: no such schedule file")
    assert all(name in message for name in builtin_schedule_names())


def test_a_directory_is_not_a_schedule(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="is not a file"):
        load_schedule(str(tmp_path))


def _pass_name_list(statements: tuple[object, ...]) -> list[str]:
    names: list[str] = []
    for statement in statements:
        if isinstance(statement, PassCall):
            names.append(statement.name)
        names.extend(_pass_name_list(getattr(statement, "body", ())))
    return names


def _pass_names(statements: tuple[object, ...]) -> set[str]:
    return set(_pass_name_list(statements))
