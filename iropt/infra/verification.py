"""Verification during a run: after each pass (`--verify-each`), at `verify(...)` checkpoints,
and bisection to the first pass after which a failing schedule's model no longer verifies.
"""

from __future__ import annotations

from collections.abc import Callable

from iropt.infra.pass_base import PassContext, PassKind, PassResult
from iropt.infra.pass_manager import Instrument, PassManager, PassRecord, RunReport
from iropt.infra.pipeline import Pipeline, VerifyStep
from iropt.ir.model import Model
from iropt.verify.compare import Comparison, compare
from iropt.verify.criteria import EXACT_CRITERION, LOSSY_CRITERION, Criterion
from iropt.verify.verifier import ComparisonFailed, Outputs, Verifier


class PassCheckFailed(ComparisonFailed):
    """A failed check with the record of the pass to blame."""

    def __init__(self, message: str, comparison: Comparison | None, record: PassRecord) -> None:
        super().__init__(message, comparison)
        self.record = record


def _pass_label(record: PassRecord) -> str:
    where = f" in {record.block}" if record.block else ""
    return f"pass {record.index} '{record.name}'{where}"


class VerifyEachInstrument(Instrument):
    """After every pass that changed the model, compare its outputs with those before the pass.

    Exact passes are held to `exact`, lossy ones to `lossy`. The comparison goes into
    `record.notes["verify"]`; a failure raises ComparisonFailed naming the pass.
    """

    def __init__(
        self,
        verifier: Verifier,
        *,
        exact: Criterion = EXACT_CRITERION,
        lossy: Criterion = LOSSY_CRITERION,
    ) -> None:
        self.verifier = verifier
        self.exact = exact
        self.lossy = lossy
        self._previous: list[Outputs] | None = None

    def before_run(self, model: Model) -> None:
        self._previous = self.verifier.outputs_of(model, "running the input model")

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        if not result.changed:
            return
        if self._previous is None:
            raise RuntimeError("VerifyEachInstrument.after_pass before before_run")
        criterion = self.exact if record.kind is PassKind.EXACT else self.lossy
        label = _pass_label(record)
        outputs = self.verifier.candidate_outputs(model, f"the model after {label}")
        comparison = compare(self._previous, outputs, criterion)
        record.notes["verify"] = comparison.to_dict()
        if not comparison.passed:
            raise PassCheckFailed(
                f"{label} changed the model's outputs ({record.kind.value} pass, "
                f"{criterion.describe()}):\n{comparison.summary()}",
                comparison,
                record,
            )
        self._previous = outputs


class _FirstFailure(Exception):
    def __init__(self, record: PassRecord) -> None:
        super().__init__(record.name)
        self.record = record


class _CumulativeCheck(Instrument):
    """Checks the model against the reference after every change; stops at the first failure."""

    def __init__(self, verifier: Verifier, criterion: Criterion) -> None:
        self.verifier = verifier
        self.criterion = criterion

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        if not result.changed:
            return
        try:
            comparison = self.verifier.check(model, self.criterion)
        except ComparisonFailed as error:
            record.notes["verify"] = {"passed": False, "problems": [str(error)]}
            raise _FirstFailure(record) from error
        record.notes["verify"] = comparison.to_dict()
        if not comparison.passed:
            raise _FirstFailure(record)


def bisect_failure(
    original: Model,
    pipeline: Pipeline,
    verifier: Verifier,
    criterion: Criterion,
    ctx: PassContext,
) -> PassRecord | None:
    """The first pass after which the cumulative result fails `criterion`, or None.

    Reruns `pipeline` on a copy of `original`, checking against the verifier's reference after
    every pass that changed the model. None means the rerun never failed (the failure did not
    reproduce: a nondeterministic pass, or a check the pipeline's verify statements made on
    different terms). `verify(...)` statements are not evaluated during the rerun.
    """
    manager = PassManager(instruments=[_CumulativeCheck(verifier, criterion)])
    try:
        manager.run(original.copy(), pipeline, ctx)
    except _FirstFailure as found:
        return found.record
    return None


def make_checkpoint(verifier: Verifier) -> Callable[[VerifyStep, Model, RunReport], Comparison]:
    """A PassManager checkpoint: checks each `verify(...)` statement against the reference."""

    def checkpoint(step: VerifyStep, model: Model, report: RunReport) -> Comparison:
        comparison = verifier.check(model, step.criterion)
        if not comparison.passed:
            where = f" at {step.location}" if step.location else ""
            last = report.records[-1] if report.records else None
            after = f" after {_pass_label(last)}" if last else ""
            raise ComparisonFailed(
                f"verify({step.criterion.describe()}){where} failed{after}:\n{comparison.summary()}",
                comparison,
            )
        return comparison

    return checkpoint
