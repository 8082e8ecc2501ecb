"""A schedule as data: pass steps, `fixpoint`/`repeat` blocks, verify checkpoints, a target."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

from iropt.infra.pass_base import Pass, PassKind, TargetSpec
from iropt.verify.criteria import Criterion


@dataclass(frozen=True)
class SourceLocation:
    """Where a step came from in a schedule file, for messages."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass
class PassStep:
    """Run one pass."""

    pass_: Pass
    location: SourceLocation | None = None


@dataclass
class FixpointBlock:
    """Run the body until no pass in it reports a change, at most `max_iterations` times."""

    body: list[Step]
    max_iterations: int = 8
    location: SourceLocation | None = None


@dataclass
class RepeatBlock:
    """Run the body `count` times."""

    body: list[Step]
    count: int
    location: SourceLocation | None = None


@dataclass
class VerifyStep:
    """Check the model at this point against the input model."""

    criterion: Criterion
    location: SourceLocation | None = None


Step = Union[PassStep, FixpointBlock, RepeatBlock, VerifyStep]


@dataclass
class Pipeline:
    """What the PassManager runs: the steps and the schedule's target, if any."""

    steps: list[Step] = field(default_factory=list)
    target: TargetSpec | None = None
    name: str = "<pipeline>"

    @classmethod
    def of(cls, *passes: Pass, name: str = "<pipeline>") -> Pipeline:
        """A flat pipeline of passes, for use from Python."""
        return cls(steps=[PassStep(p) for p in passes], name=name)

    def passes(self) -> Iterator[Pass]:
        """Every pass instance in the pipeline, blocks included, in order."""
        yield from _passes_in(self.steps)

    @property
    def is_lossy(self) -> bool:
        return any(p.kind is PassKind.LOSSY for p in self.passes())

    def final_criterion(self) -> Criterion | None:
        """The criterion of the last top-level verify statement, if the schedule has one."""
        for step in reversed(self.steps):
            if isinstance(step, VerifyStep):
                return step.criterion
        return None


def _passes_in(steps: list[Step]) -> Iterator[Pass]:
    for step in steps:
        if isinstance(step, PassStep):
            yield step.pass_
        elif isinstance(step, (FixpointBlock, RepeatBlock)):
            yield from _passes_in(step.body)
