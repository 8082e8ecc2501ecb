"""`iropt run` as a function: load, schedule, transform, verify, bisect, save, emit.

Nothing is written until the transformed model has passed verification (unless `force`), the
input file is never modified, and every failure is an IroptError with a message for the user.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from iropt.errors import IroptError, UserError, VerificationError, first_line
from iropt.infra.instruments import CheckerInstrument, IRDumpInstrument, SizeInstrument, TimingInstrument
from iropt.infra.pass_base import PassContext
from iropt.infra.pass_manager import Instrument, PassManager, PassRecord, RunReport
from iropt.infra.pipeline import Pipeline, VerifyStep
from iropt.infra.registry import BACKENDS
from iropt.io.load import load_model
from iropt.io.save import ModelCheck, check_output_file, check_output_path, save_model
from iropt.ir.model import GraphStats, Model, graph_stats
from iropt.util.progress import ProgressFn, no_progress
from iropt.verify.criteria import EXACT_CRITERION, LOSSY_CRITERION, Criterion

if TYPE_CHECKING:
    from iropt.verify.feeds import FeedSource

# Verification runs on at most this many feeds of a file, folder or function source.
MAX_VERIFY_FEEDS = 64


@dataclass
class RunOptions:
    """Everything `iropt run` takes; paths are resolved by the caller."""

    schedule: str
    model: Path
    output: Path | None = None
    calibration: str | None = None
    inputs: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    verify: bool = True
    verify_each: bool = False
    force: bool = False
    dump_dir: Path | None = None
    # The ONNX checker always checks the result; after every pass only when asked, since each
    # check exports the whole model (seconds for models with hundreds of MB of weights).
    check_each: bool = False
    emit: bool = True
    # Called as build_progress(phase, done, total) by back ends with long builds (TensorRT).
    build_progress: Callable[[str, int, int], None] | None = None


@dataclass
class RunOutcome:
    """What happened: the pass records, the verification, what was written."""

    pipeline: Pipeline
    report: RunReport
    initial: GraphStats
    final: GraphStats
    criterion: Criterion | None = None
    comparisons: list[Any] = field(default_factory=list)
    culprit: PassRecord | None = None
    output: Path | None = None
    emitted: list[Path] = field(default_factory=list)
    feed_notes: list[str] = field(default_factory=list)
    verify_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return all(c.passed for c in self.comparisons)


def default_output_path(model_path: Path) -> Path:
    """`model.onnx` -> `model.opt.onnx`, beside the input (never the current directory)."""
    return model_path.with_name(model_path.stem + ".opt.onnx")


def load_pipeline(schedule: str) -> Pipeline:
    """A schedule file or built-in schedule name, parsed and resolved against the registry."""
    from iropt.dsl import load_schedule

    return load_schedule(schedule)


def optimize(options: RunOptions, progress: ProgressFn = no_progress) -> RunOutcome:
    """Run a schedule on a model; raises UserError for bad input, VerificationError on mismatch."""
    start = time.perf_counter()
    pipeline = load_pipeline(options.schedule)
    model = load_model(options.model)
    output = options.output or default_output_path(options.model)
    # Checked before any work so a long run never ends in "cannot write".
    check_outputs(options, output, model, pipeline)
    ctx = PassContext(
        target=pipeline.target,
        calibration=options.calibration,
        input_shapes=dict(options.shapes),
        progress=progress,
    )
    # The verifier keeps its own copy of the input model: the reference, and where bisection
    # starts from.
    verifier, notes = _make_verifier(options, model, pipeline, progress)
    outcome = _transform(options, model, pipeline, ctx, verifier)
    outcome.feed_notes = notes
    if verifier is not None:
        _verify_final(outcome, model, verifier)
        if not outcome.verified:
            outcome.culprit = _bisect(verifier.reference, pipeline, verifier, outcome.criterion, ctx)
    if outcome.verified or options.force:
        outcome.output = save_model(model, output, check=_checker(options.model, options.check_each))
        if options.emit:
            outcome.emitted = _emit(model, pipeline, output, options.build_progress)
    outcome.total_seconds = time.perf_counter() - start
    return outcome


def check_outputs(options: RunOptions, output: Path, model: Model, pipeline: Pipeline) -> None:
    """UserError unless everything the run would write can be written: the model, the IR dumps,
    the back end's artefacts (and the back end can run here)."""
    check_output_path(output, model.input_files())
    if options.dump_dir is not None and options.dump_dir.exists() and not options.dump_dir.is_dir():
        raise UserError(f"{options.dump_dir}: --dump-ir names a file; it takes a folder to write into")
    if options.emit and pipeline.target is not None:
        backend = BACKENDS.create(pipeline.target.name, dict(pipeline.target.options))
        backend.check_ready()
        for path in backend.planned_outputs(output):
            check_output_file(path, f"the {pipeline.target.name} artefact", [*model.input_files(), output])


def _checker(source: Path, checked_each: bool) -> ModelCheck:
    """The ONNX checker, as an error that says whose fault a failure is: the input model's when
    it fails the checker too (a UserError), else a pass's, and how to find which."""

    def check(model: onnx.ModelProto | Path) -> None:
        try:
            onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model))
        except onnx.checker.ValidationError as error:
            input_error = _checker_error(source)
            if input_error is not None and first_line(input_error) == first_line(error):
                raise UserError(
                    f"{source}: the input model fails the ONNX checker, so its optimized form does "
                    f"too; fix the input first: {first_line(input_error)}"
                ) from error
            hint = "" if checked_each else " (run with --check-each to find the pass that broke it)"
            also = f" (the input model fails it too, differently: {first_line(input_error)})" if input_error else ""
            raise IroptError(f"the optimized model fails the ONNX checker{hint}: {error}{also}") from error

    return check


def _checker_error(path: Path) -> onnx.checker.ValidationError | None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        return error
    return None


def _make_verifier(
    options: RunOptions, reference: Model, pipeline: Pipeline, progress: ProgressFn
) -> tuple[Any, list[str]]:
    if not (options.verify or options.verify_each):
        return None, []
    from iropt.verify.feeds import feed_source
    from iropt.verify.runtime import ModelRunError
    from iropt.verify.verifier import Verifier

    criterion = final_criterion(pipeline)
    # Real data beats generated data, above all for lossy passes: without --inputs, verify on
    # the first calibration samples when there are some.
    spec = options.inputs
    if spec is None and options.calibration is not None:
        spec = options.calibration
    source = feed_source(spec, reference, shapes=options.shapes, count=criterion.samples)
    feeds = list(itertools.islice(source, MAX_VERIFY_FEEDS))
    verifier = Verifier(reference, feeds, progress=progress, reference_file=options.model)
    # Run the reference now: a model ONNX Runtime cannot run is bad input, reported before the
    # schedule runs rather than after.
    try:
        verifier.reference_outputs()
    except ModelRunError as error:
        raise UserError(f"{error}{_generated_inputs_hint(source)}") from error
    return verifier, [source.description, *source.notes]


def _generated_inputs_hint(source: FeedSource) -> str:
    """What to try when the input model fails on generated inputs: often a dynamic dimension
    the model in fact fixes (an exporter that traced a sequence length), set to 1 here."""
    if not source.generated:
        return ""
    from iropt.verify.feeds import GENERATED_DATA_WARNING

    guesses = [note for note in source.notes if note != GENERATED_DATA_WARNING]
    sizes = f"; {'; '.join(guesses)}" if guesses else ""
    return (
        f" (it ran on generated inputs{sizes}: give the sizes the model expects with "
        "--shape NAME:DIMS, or real inputs with --inputs)"
    )


def final_criterion(pipeline: Pipeline) -> Criterion:
    """The schedule's last verify(...) statement, else the default for exact or lossy schedules."""
    explicit = pipeline.final_criterion()
    if explicit is not None:
        return explicit
    return LOSSY_CRITERION if pipeline.is_lossy else EXACT_CRITERION


def _transform(
    options: RunOptions, model: Model, pipeline: Pipeline, ctx: PassContext, verifier: Any
) -> RunOutcome:
    sizes = SizeInstrument()
    instruments: list[Instrument] = [TimingInstrument(), sizes]
    if options.check_each:
        instruments.append(CheckerInstrument())
    if options.dump_dir is not None:
        instruments.append(IRDumpInstrument(options.dump_dir))
    if options.verify_each and verifier is not None:
        from iropt.infra.verification import VerifyEachInstrument

        instruments.append(VerifyEachInstrument(verifier))
    checkpoint = None
    if verifier is not None:
        def checkpoint(step: VerifyStep, current: Model, report: RunReport) -> Any:
            return verifier.check(current, step.criterion)

    initial = graph_stats(model)
    report = PassManager(instruments, checkpoint=checkpoint).run(model, pipeline, ctx)
    return RunOutcome(
        pipeline=pipeline,
        report=report,
        initial=initial,
        final=sizes.final or graph_stats(model),
        comparisons=list(report.checkpoints),
    )


def _verify_final(outcome: RunOutcome, model: Model, verifier: Any) -> None:
    start = time.perf_counter()
    outcome.criterion = final_criterion(outcome.pipeline)
    last_is_verify = bool(outcome.pipeline.steps) and isinstance(outcome.pipeline.steps[-1], VerifyStep)
    if not last_is_verify:
        outcome.comparisons.append(verifier.check(model, outcome.criterion))
    outcome.verify_seconds = time.perf_counter() - start


def _bisect(
    reference: Model, pipeline: Pipeline, verifier: Any, criterion: Criterion | None, ctx: PassContext
) -> PassRecord | None:
    from iropt.infra.verification import bisect_failure

    failed = criterion or EXACT_CRITERION
    return bisect_failure(reference, pipeline, verifier, failed, ctx)


def _emit(
    model: Model, pipeline: Pipeline, output: Path, build_progress: Callable[[str, int, int], None] | None
) -> list[Path]:
    if pipeline.target is None:
        return []
    backend = BACKENDS.create(pipeline.target.name, dict(pipeline.target.options))
    if build_progress is not None and hasattr(backend, "progress"):
        backend.progress = build_progress
    written: list[Path] = backend.emit(model, output)
    return written


def raise_if_unverified(outcome: RunOutcome) -> None:
    """VerificationError describing the failed checks and the first pass that broke them."""
    if outcome.verified:
        return
    failed = [c for c in outcome.comparisons if not c.passed]
    lines = [f"verification failed ({failed[0].criterion.describe()}):", failed[0].summary()]
    if outcome.culprit is not None:
        lines.append(
            f"first pass that breaks equivalence: #{outcome.culprit.index} {outcome.culprit.name}"
        )
    if outcome.output is None:
        lines.append("no output written (use --force to write it anyway)")
    raise VerificationError("\n".join(lines))
