"""Runs a Pipeline over a Model, with instruments watching every pass.

Instruments hook `before_pass`, `after_pass` and `after_pass_failed` (and the run's start and
end) and annotate the pass's `PassRecord`: timing, size deltas, checker results, verification.
A pass that raises is reported as a `PassError` naming it and the passes before it, with the
original exception chained; errors iropt raises on purpose (bad options, failed verification)
pass through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from iropt.errors import IroptError, PassError
from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult
from iropt.infra.pipeline import FixpointBlock, PassStep, Pipeline, RepeatBlock, Step, VerifyStep
from iropt.ir.model import Model


@dataclass
class PassRecord:
    """One execution of one pass; instruments fill in the optional figures."""

    index: int
    name: str
    kind: PassKind
    block: str
    pass_: Pass
    changed: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    nodes: tuple[int, int] | None = None
    parameters: tuple[int, int] | None = None
    parameter_bytes: tuple[int, int] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    """Every pass execution in order, and the wall time of the whole run."""

    records: list[PassRecord] = field(default_factory=list)
    seconds: float = 0.0
    checkpoints: list[Any] = field(default_factory=list)

    def pass_names(self) -> list[str]:
        return [r.name for r in self.records]


class Instrument:
    """Base class for instruments: override the hooks you need."""

    def before_run(self, model: Model) -> None:
        """Called once before the first pass."""

    def before_pass(self, record: PassRecord, model: Model) -> None:
        """Called before each pass execution."""

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        """Called after each pass that returned normally."""

    def after_pass_failed(self, record: PassRecord, model: Model, error: BaseException) -> None:
        """Called when a pass raised, before the error propagates."""

    def after_run(self, model: Model, report: RunReport) -> None:
        """Called once after the last pass, when the run succeeded."""


Checkpoint = Callable[[VerifyStep, Model, RunReport], Any]


class PassManager:
    """Runs pipelines; `checkpoint` handles `verify(...)` statements met along the way."""

    def __init__(
        self,
        instruments: Sequence[Instrument] = (),
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.instruments = list(instruments)
        self.checkpoint = checkpoint

    def run(
        self, model: Model, pipeline: Pipeline, ctx: PassContext | None = None, report: RunReport | None = None
    ) -> RunReport:
        """Rewrite `model` in place by running every step of `pipeline`.

        `report`, when given, receives the records as passes run, so a caller still has them
        when a pass or a check raises.
        """
        ctx = ctx or PassContext(target=pipeline.target)
        report = report if report is not None else RunReport()
        start = time.perf_counter()
        for instrument in self.instruments:
            instrument.before_run(model)
        self._run_steps(pipeline.steps, model, ctx, report, block="")
        report.seconds = time.perf_counter() - start
        for instrument in self.instruments:
            instrument.after_run(model, report)
        return report

    def _run_steps(
        self, steps: list[Step], model: Model, ctx: PassContext, report: RunReport, block: str
    ) -> bool:
        """Run `steps`; True when any pass changed the model."""
        changed = False
        for step in steps:
            if isinstance(step, PassStep):
                changed |= self._run_pass(step.pass_, model, ctx, report, block)
            elif isinstance(step, FixpointBlock):
                changed |= self._run_fixpoint(step, model, ctx, report, block)
            elif isinstance(step, RepeatBlock):
                for i in range(step.count):
                    changed |= self._run_steps(
                        step.body, model, ctx, report, f"{block}repeat[{i + 1}/{step.count}] "
                    )
            elif isinstance(step, VerifyStep) and self.checkpoint is not None:
                report.checkpoints.append(self.checkpoint(step, model, report))
        return changed

    def _run_fixpoint(
        self, block: FixpointBlock, model: Model, ctx: PassContext, report: RunReport, outer: str
    ) -> bool:
        changed = False
        for i in range(block.max_iterations):
            label = f"{outer}fixpoint[{i + 1}] "
            if not self._run_steps(block.body, model, ctx, report, label):
                break
            changed = True
        return changed

    def _run_pass(
        self, pass_: Pass, model: Model, ctx: PassContext, report: RunReport, block: str
    ) -> bool:
        record = PassRecord(
            index=len(report.records) + 1,
            name=pass_.name or type(pass_).__name__,
            kind=pass_.kind,
            block=block.strip(),
            pass_=pass_,
        )
        previous = report.pass_names()
        report.records.append(record)
        for instrument in self.instruments:
            instrument.before_pass(record, model)
        try:
            result = pass_.run(model, ctx)
        except IroptError as error:
            self._notify_failure(record, model, error)
            raise
        except Exception as error:
            self._notify_failure(record, model, error)
            raise PassError(record.name, previous, error) from error
        if not isinstance(result, PassResult):
            raise PassError(
                record.name, previous, TypeError(f"run() returned {type(result).__name__}, not PassResult")
            )
        record.changed = result.changed
        record.stats = dict(result.stats)
        record.info = dict(result.info)
        for instrument in self.instruments:
            instrument.after_pass(record, model, result)
        return result.changed

    def _notify_failure(self, record: PassRecord, model: Model, error: BaseException) -> None:
        for instrument in self.instruments:
            instrument.after_pass_failed(record, model, error)


def run_passes(model: Model, *passes: Pass, ctx: PassContext | None = None) -> RunReport:
    """Run `passes` in order on `model`, with no instruments: the shortest way from Python."""
    return PassManager().run(model, Pipeline.of(*passes), ctx)
