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
    `record.notes["verify"]`; a failure raises PassCheckFailed naming the pass, or with
    `keep_going` is appended to `failures` and the run goes on.
    """

    def __init__(
        self,
        verifier: Verifier,
        *,
        exact: Criterion = EXACT_CRITERION,
        lossy: Criterion = LOSSY_CRITERION,
        keep_going: bool = False,
        failures: list[PassCheckFailed] | None = None,
    ) -> None:
        self.verifier = verifier
        self.exact = exact
        self.lossy = lossy
        self.keep_going = keep_going
        self.failures = failures if failures is not None else []
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
            failure = PassCheckFailed(
                f"{label} changed the model's outputs ({record.kind.value} pass, "
                f"{criterion.describe()}):\n{comparison.summary()}",
                comparison,
                record,
            )
            if not self.keep_going:
                raise failure
            self.failures.append(failure)
        # Each pass is judged on its own change, so the next one is compared with this one.
        self._previous = outputs


class SnapshotInstrument(Instrument):
    """Keeps a copy of the model after every lossy pass that changed it, by record index.

    Lossy passes are the slow ones to run again (calibration, sensitivity analysis) and need
    not give the same model twice; bisection starts from these copies instead of rerunning them.
    """

    def __init__(self) -> None:
        self.models: dict[int, Model] = {}

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        if result.changed and record.kind is PassKind.LOSSY:
            self.models[record.index] = model.copy()


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


class _Replay:
    """The model after the first `count` pass executions of a run, rebuilt from the records.

    A run is replayed as the flat sequence of executions it recorded (fixpoint rounds included),
    starting from the latest snapshot at or before `count`, or from the latest model that
    bisection kept, whichever is later; only the exact passes after it run again.
    """

    def __init__(self, original: Model, records: list[PassRecord], snapshots: dict[int, Model], ctx: PassContext):
        self.records = records
        self.snapshots = snapshots
        self.ctx = ctx
        self._base, self._base_count = original, 0

    def model_after(self, count: int) -> Model:
        """Bisection only moves its passing model forward, so `count` is never behind it."""
        start, model = self._base_count, self._base
        if count < start:
            raise ValueError(f"replay to {count} executions, behind the kept model's {start}")
        taken = [index for index in self.snapshots if start < index <= count]
        if taken:
            start, model = max(taken), self.snapshots[max(taken)]
        model = model.copy()
        for record in self.records[start:count]:
            record.pass_.run(model, self.ctx)
        return model

    def keep(self, count: int, model: Model) -> None:
        """`model` (the model after `count` executions) passed: later replays start from it."""
        self._base, self._base_count = model, count


def bisect_records(
    verifier: Verifier,
    records: list[PassRecord],
    criterion: Criterion,
    ctx: PassContext,
    *,
    snapshots: dict[int, Model] | None = None,
    final_failed: bool = True,
    status: Callable[[str], None] | None = None,
) -> PassRecord | None:
    """The first of `records` (a run's pass executions) after which the model fails `criterion`
    against the verifier's reference, found by binary search; None when even the model after
    every pass passes.

    The models are rebuilt from the verifier's reference, replaying the recorded executions;
    `snapshots` (models kept after lossy passes, by record index) are used instead of running
    those passes again. Only executions that changed the model are candidates, and the search
    assumes that once broken the model stays broken (about log2(n) checks, not n).
    `final_failed` says that the model after all records is already known to fail.
    """
    changed = [position for position, record in enumerate(records, 1) if record.changed]
    if not changed:
        return None
    replay = _Replay(verifier.reference, records, snapshots or {}, ctx)
    if status is not None:
        checks = (len(changed) - 1).bit_length() + (0 if final_failed else 1)
        reused = f", reusing {len(snapshots)} model(s) kept after lossy passes" if snapshots else ""
        status(
            f"verification failed; bisecting to find the first of the {len(changed)} pass run(s) "
            f"that changed the model to break it (at most {checks} more check(s){reused})"
        )
    low, high = 0, len(changed) - 1  # the answer is changed[k] for the smallest failing k
    if not final_failed and _passes(verifier, replay, changed[high], criterion):
        return None
    while low < high:
        middle = (low + high) // 2
        if _passes(verifier, replay, changed[middle], criterion):
            low = middle + 1
        else:
            high = middle
    return records[changed[low] - 1]


def _passes(verifier: Verifier, replay: _Replay, count: int, criterion: Criterion) -> bool:
    model = replay.model_after(count)
    try:
        passed = verifier.check(model, criterion).passed
    except ComparisonFailed:
        return False
    if passed:
        replay.keep(count, model)
    return passed


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
