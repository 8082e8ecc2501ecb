"""AST -> `iropt.infra.pipeline.Pipeline`: names and options checked against the registries.

Every pass name is looked up in `iropt.infra.registry.PASSES`, the target in `BACKENDS`, and every
option is checked against the typed constructor parameters (`iropt.infra.options`); `verify(...)`
options are those of `iropt.verify.criteria.Criterion`. Each problem becomes a diagnostic at the
offending name, key or value, and all of them are reported together in one ScheduleError, so
`iropt check` shows every mistake in a file at once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from iropt.errors import UnknownPassError, UserError
from iropt.infra.options import OptionSpec, coerce_option, option_specs
from iropt.infra.pass_base import TargetSpec
from iropt.infra.pipeline import (
    FixpointBlock,
    PassStep,
    Pipeline,
    RepeatBlock,
    SourceLocation,
    Step,
    VerifyStep,
)
from iropt.infra.registry import BACKENDS, PASSES, target_spec
from iropt.util.suggest import did_you_mean
from iropt.util.text import shorten
from iropt.verify.criteria import Criterion

from .ast import (
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
from .errors import Diagnostic, ScheduleError, Source

# Limits on what a schedule may ask for: a repeat count or fixpoint maximum, and the steps a
# block may run in all. Far above what a real schedule needs; they stop a typo (or a hostile
# file) from looping for hours.
MAX_BLOCK_COUNT = 1000
MAX_STEP_RUNS = 100_000


def resolve(schedule: Schedule, filename: str | None = None, *, name: str | None = None) -> Pipeline:
    """The Pipeline `schedule` describes; ScheduleError listing every problem found.

    `filename` (default: the one the schedule was parsed with) appears in messages and step
    locations; `name` (default: `filename`) becomes `Pipeline.name`.
    """
    resolver = _Resolver(Source(schedule.source, filename or schedule.filename))
    steps = resolver.steps(schedule.statements)
    target = resolver.target(schedule.target) if schedule.target is not None else None
    if resolver.diagnostics:
        # In file order, however the checks were ordered (the target is checked last).
        raise ScheduleError(sorted(resolver.diagnostics, key=lambda d: (d.line or 0, d.column or 0)))
    return Pipeline(steps=steps, target=target, name=name or resolver.source.filename)


def step_runs(step: Step) -> int:
    """The most times `step` and the steps inside it can run (a fixpoint at its maximum)."""
    if isinstance(step, FixpointBlock):
        return step.max_iterations * sum(step_runs(inner) for inner in step.body)
    if isinstance(step, RepeatBlock):
        return step.count * sum(step_runs(inner) for inner in step.body)
    return 1


def plain_value(value: Value) -> Any:
    """An option value as passes receive it: sizes become byte counts, lists become lists."""
    if isinstance(value, Size):
        return value.bytes
    if isinstance(value, tuple):
        return [plain_value(item) for item in value]
    return value


@functools.lru_cache(maxsize=1)
def _criterion_specs() -> tuple[OptionSpec, ...]:
    return tuple(option_specs(Criterion))


class _Resolver:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.diagnostics: list[Diagnostic] = []

    def error(self, pos: Position | None, message: str, hints: Sequence[str] = ()) -> None:
        self.diagnostics.append(self.source.diagnostic(pos, message, hints))

    def location(self, pos: Position | None) -> SourceLocation | None:
        return SourceLocation(self.source.filename, pos.line, pos.column) if pos else None

    def steps(self, statements: Sequence[Statement]) -> list[Step]:
        steps = [self.step(statement) for statement in statements]
        return [step for step in steps if step is not None]

    def step(self, statement: Statement) -> Step | None:
        if isinstance(statement, PassCall):
            return self.pass_step(statement)
        if isinstance(statement, Verify):
            return self.verify_step(statement)
        if isinstance(statement, Fixpoint):
            body = self.steps(statement.body)
            if not self.positive(statement.max, statement.max_pos or statement.pos, "fixpoint(max=...)"):
                return None
            return self.bounded(FixpointBlock(body, statement.max, self.location(statement.pos)), statement.pos)
        if isinstance(statement, Repeat):
            body = self.steps(statement.body)
            if not self.positive(statement.count, statement.count_pos or statement.pos, "repeat(...)"):
                return None
            return self.bounded(RepeatBlock(body, statement.count, self.location(statement.pos)), statement.pos)
        raise TypeError(f"not a schedule statement: {statement!r}")

    def positive(self, number: int, pos: Position | None, what: str) -> bool:
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            self.error(pos, f"{what} takes a positive whole number, got {shorten(repr(number))}")
            return False
        if number > MAX_BLOCK_COUNT:
            self.error(pos, f"{what} is at most {MAX_BLOCK_COUNT}, got {shorten(repr(number))}")
            return False
        return True

    def bounded(self, block: FixpointBlock | RepeatBlock, pos: Position | None) -> Step | None:
        """`block`, or None after an error when it would run more steps than MAX_STEP_RUNS."""
        runs = step_runs(block)
        if runs <= MAX_STEP_RUNS:
            return block
        self.error(
            pos,
            f"this block may run up to {runs} steps (its counts multiplied through the nested "
            f"blocks); the limit is {MAX_STEP_RUNS}",
        )
        return None

    def pass_step(self, call: PassCall) -> PassStep | None:
        try:
            entry = PASSES.get(call.name)
        except UnknownPassError as error:
            self.error(call.pos, str(error))
            return None
        values = self.bind(f"pass '{call.name}'", entry.options, call.options, call.pos)
        if values is None:
            return None
        try:
            instance = PASSES.create(call.name, values)
        except (UserError, ValueError, TypeError) as error:
            # The constructor's own checks (a ratio outside [0, 1], options that conflict).
            self.error(call.pos, f"pass '{call.name}': {error}")
            return None
        return PassStep(instance, self.location(call.pos))

    def verify_step(self, verify: Verify) -> VerifyStep | None:
        values = self.bind("verify", _criterion_specs(), verify.options, verify.pos)
        if values is None:
            return None
        try:
            criterion = Criterion(**values)
        except ValueError as error:
            self.error(verify.pos, str(error))
            return None
        return VerifyStep(criterion, self.location(verify.pos))

    def target(self, target: Target) -> TargetSpec | None:
        try:
            entry = BACKENDS.get(target.name)
        except UnknownPassError as error:
            self.error(target.name_pos or target.pos, str(error))
            return None
        values = self.bind(f"back end '{target.name}'", entry.options, target.options, target.pos)
        if values is None:
            return None
        try:
            # The back end's own checks (providers this runtime lacks, conflicting options), so
            # that `iropt check` and a run find them before any work.
            BACKENDS.create(target.name, values)
        except (UserError, ValueError, TypeError) as error:
            self.error(target.name_pos or target.pos, str(error))
            return None
        return target_spec(target.name, values)

    def bind(
        self, owner: str, specs: Sequence[OptionSpec], options: Sequence[Option], call_pos: Position | None
    ) -> dict[str, Any] | None:
        """The options checked and converted, or None after reporting what is wrong.

        The same checks as `iropt.infra.options.bind_options`, one option at a time, so that each
        message can point at the key or the value it is about.
        """
        by_name = {spec.name: spec for spec in specs}
        values: dict[str, Any] = {}
        ok = True
        for option in options:
            spec = by_name.get(option.key)
            if spec is None:
                valid = ", ".join(by_name) or "none"
                self.error(
                    option.pos,
                    f"{owner} has no option '{shorten(option.key)}'{did_you_mean(option.key, by_name)}; "
                    f"its options are: {valid}",
                )
                ok = False
                continue
            try:
                values[option.key] = coerce_option(owner, spec, plain_value(option.value))
            except UserError as error:
                self.error(option.value_pos or option.pos, str(error) + _choice_hint(spec, option.value))
                ok = False
        given = {option.key for option in options}
        missing = [spec for spec in specs if spec.required and spec.name not in given]
        if missing:
            needed = ", ".join(f"{spec.name} ({spec.type_name})" for spec in missing)
            self.error(call_pos, f"{owner} needs option(s) {needed}")
            ok = False
        return values if ok else None


def _choice_hint(spec: OptionSpec, value: Value) -> str:
    """' (did you mean ...)' when a string is close to one of a Literal option's choices."""
    if not isinstance(value, str):
        return ""
    return did_you_mean(value, [c for c in _literal_choices(spec.annotation) if isinstance(c, str)])


def _literal_choices(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    choices: list[Any] = []
    for member in get_args(annotation):  # unions such as Literal[...] | None
        choices.extend(_literal_choices(member))
    return choices
