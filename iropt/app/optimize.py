"""`iropt run` as a function: load, schedule, transform, verify, bisect, save, emit.

Nothing is written until the transformed model has passed verification (unless `force`), the
input file is never modified, and every failure is an IroptError with a message for the user.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from iropt.errors import IroptError, UserError, VerificationError, first_line
from iropt.infra.backend import Backend, EmitContext, StagedArtefacts
from iropt.infra.instruments import CheckerInstrument, IRDumpInstrument, SizeInstrument, TimingInstrument
from iropt.infra.pass_base import PassContext
from iropt.infra.pass_manager import Instrument, PassManager, PassRecord, RunReport
from iropt.infra.pipeline import Pipeline, VerifyStep
from iropt.infra.registry import BACKENDS
from iropt.io.load import load_model
from iropt.io.save import (
    ModelCheck,
    check_output_file,
    check_output_path,
    publish_staged,
    save_model,
    stage_model,
)
from iropt.ir.model import GraphStats, Model, graph_stats
from iropt.util.progress import ProgressFn, no_progress
from iropt.verify.criteria import EXACT_CRITERION, LOSSY_CRITERION, Criterion
from iropt.verify.feeds import ShapeRange

if TYPE_CHECKING:
    from iropt.infra.verification import PassCheckFailed
    from iropt.verify.feeds import FeedSource

# Verification runs on at most this many feeds of a file, folder or function source.
MAX_VERIFY_FEEDS = 64
# A model with more weight bytes than this is written before its final check, which ONNX
# Runtime then runs from the written file (see `_optimize`). Below it the check runs from
# memory and a failed one writes nothing at all. A module constant so tests can lower it.
VERIFY_WRITTEN_FILE_MIN_BYTES = 256 * 2**20


@dataclass
class RunOptions:
    """Everything `iropt run` takes; paths are resolved by the caller."""

    schedule: str
    model: Path
    output: Path | None = None
    calibration: str | None = None
    inputs: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    # `--shape NAME:MIN,OPT,MAX` ranges (TensorRT profiles, Triton's batch limit); `shapes`
    # holds their OPT shapes.
    shape_ranges: dict[str, ShapeRange] = field(default_factory=dict)
    verify: bool = True
    verify_each: bool = False
    force: bool = False
    dump_dir: Path | None = None
    # The ONNX checker always checks the result; after every pass only when asked, since each
    # check exports the whole model (seconds for models with hundreds of MB of weights).
    check_each: bool = False
    emit: bool = True
    # On a failed verification, find the first pass that broke it (reruns prefixes of the
    # schedule); a search that only wants the metric turns it off.
    bisect: bool = True
    # Called as build_progress(phase, done, total) by back ends with long builds (TensorRT).
    build_progress: Callable[[str, int, int], None] | None = None
    # Called with a line about what the run does next when it is not what the user asked for
    # (bisecting a failure); the command line prints it on stderr.
    status: Callable[[str], None] | None = None
    # A Triton model repository to write the result into (`--triton DIR --triton-name NAME`).
    triton: Path | None = None
    triton_name: str | None = None


@dataclass
class RunOutcome:
    """What happened: the pass records, the verification, what was written.

    Filled in as the run goes, so a run that stops early still says how far it got (the
    command line's report and table are made from it whatever the exit).
    """

    pipeline: Pipeline | None = None
    report: RunReport = field(default_factory=RunReport)
    initial: GraphStats | None = None
    final: GraphStats | None = None
    criterion: Criterion | None = None
    comparisons: list[Any] = field(default_factory=list)
    # Passes whose own change failed the --verify-each check (kept going with --force).
    pass_failures: list[PassCheckFailed] = field(default_factory=list)
    culprit: PassRecord | None = None
    output: Path | None = None
    emitted: list[Path] = field(default_factory=list)
    feed_notes: list[str] = field(default_factory=list)
    verify_seconds: float = 0.0
    bisect_seconds: float = 0.0
    total_seconds: float = 0.0
    # What the target's build found out (engine size, build time, profile, precisions) and
    # the lines it prints.
    target_report: dict[str, Any] = field(default_factory=dict)
    target_lines: list[str] = field(default_factory=list)
    triton_files: list[Path] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return not self.pass_failures and all(c.passed for c in self.comparisons)


def default_output_path(model_path: Path) -> Path:
    """`model.onnx` -> `model.opt.onnx`, beside the input (never the current directory)."""
    return model_path.with_name(model_path.stem + ".opt.onnx")


def load_pipeline(schedule: str) -> Pipeline:
    """A schedule file or built-in schedule name, parsed and resolved against the registry."""
    from iropt.dsl import load_schedule

    return load_schedule(schedule)


def optimize(
    options: RunOptions, progress: ProgressFn = no_progress, outcome: RunOutcome | None = None
) -> RunOutcome:
    """Run a schedule on a model; raises UserError for bad input, VerificationError on mismatch.

    `outcome`, when given, is filled in as the run goes: after an error it holds the passes
    that ran (the command line writes its report from it on every exit).
    """
    outcome = outcome if outcome is not None else RunOutcome()
    start = time.perf_counter()
    try:
        _optimize(options, progress, outcome)
    finally:
        outcome.total_seconds = time.perf_counter() - start
    return outcome


def _optimize(options: RunOptions, progress: ProgressFn, outcome: RunOutcome) -> None:
    pipeline = outcome.pipeline = load_pipeline(options.schedule)
    verifying = options.verify or options.verify_each
    # With verification, the weights in external data are read only after ONNX Runtime has run
    # the reference from the input file and let go of its copy: never both in memory at once.
    model = load_model(options.model, external_data=not verifying)
    output = options.output or default_output_path(options.model)
    backend = _target_backend(pipeline, options)
    # Checked before any work so a long run never ends in "cannot write".
    check_outputs(options, output, model, backend)
    ctx = PassContext(
        target=pipeline.target,
        calibration=options.calibration,
        input_shapes=dict(options.shapes),
        progress=progress,
    )
    if backend is not None:
        # A profile the inputs cannot have is bad input: said before the schedule runs.
        backend.check_inputs(model, EmitContext(shape_ranges=options.shape_ranges))
    if options.triton is not None and options.triton_name is not None:
        from iropt.lowering.triton import check_model_name

        check_model_name(options.triton_name)
    # The verifier runs the reference from the input file (read again only if bisection needs
    # the model it starts from).
    verifier, outcome.feed_notes = _make_verifier(options, model, pipeline, progress)
    if model.source_data_files and verifying:
        model = load_model(options.model)
    snapshots = _transform(options, model, pipeline, ctx, verifier, outcome)
    if verifier is not None and _verifies_written_file(options, outcome, backend):
        # Written first, then checked from the file by ONNX Runtime, and published only if it
        # passed: the graph is let go before the runtime loads its own copy of the weights, so
        # a large model is in memory once at a time, not twice.
        staged = stage_model(model, output, check=_checker(options.model, options.check_each))
        del model
        gc.collect()  # graphsurgeon's nodes and tensors refer to each other: freed by the collector
        with staged:
            _verify_final(outcome, staged.path, verifier)
            outcome.verify_seconds = verifier.seconds
            if outcome.verified or options.force:
                outcome.output = publish_staged(staged)
        _bisect_if_failed(outcome, options, verifier, snapshots, ctx)
        return
    if verifier is not None:
        _verify_final(outcome, model, verifier)
        outcome.verify_seconds = verifier.seconds
        _bisect_if_failed(outcome, options, verifier, snapshots, ctx)
    if outcome.verified or options.force:
        _write_outputs(outcome, options, model, output, backend, verifier)


def _verifies_written_file(options: RunOptions, outcome: RunOutcome, backend: Backend | None) -> bool:
    """Whether the final check runs on the written output file rather than the graph in memory:
    for models with many weights, when the model is the only thing the run writes (a back end's
    build and a Triton repository are made from the graph, which must then stay)."""
    assert outcome.final is not None
    return (
        backend is None
        and options.triton is None
        and outcome.final.parameter_bytes > VERIFY_WRITTEN_FILE_MIN_BYTES
    )


def _bisect_if_failed(
    outcome: RunOutcome, options: RunOptions, verifier: Any, snapshots: dict[int, Model], ctx: PassContext
) -> None:
    if not outcome.verified and options.bisect:
        outcome.culprit = _find_culprit(outcome, verifier, snapshots, ctx, options.status)
        outcome.bisect_seconds = verifier.seconds - outcome.verify_seconds


def check_outputs(options: RunOptions, output: Path, model: Model, backend: Backend | None) -> None:
    """UserError unless everything the run would write can be written: the model, the IR dumps,
    the back end's artefacts (and the back end can run here)."""
    check_output_path(output, model.input_files())
    if options.dump_dir is not None and options.dump_dir.exists() and not options.dump_dir.is_dir():
        raise UserError(f"{options.dump_dir}: --dump-ir names a file; it takes a folder to write into")
    if options.emit and backend is not None:
        backend.check_ready()
        for path in backend.planned_outputs(output):
            check_output_file(path, f"the {backend.name or 'target'} artefact", [*model.input_files(), output])


def _target_backend(pipeline: Pipeline, options: RunOptions) -> Backend | None:
    if pipeline.target is None or not (options.emit or options.triton is not None):
        return None
    backend: Backend = BACKENDS.create(pipeline.target.name, dict(pipeline.target.options))
    return backend


def _write_outputs(
    outcome: RunOutcome, options: RunOptions, model: Model, output: Path, backend: Backend | None, verifier: Any
) -> None:
    """Build the target's artefacts in memory, then write the model, then them: a failed
    build (a TensorRT engine) leaves nothing written."""
    staged = None
    if backend is not None:
        context = EmitContext(
            shape_ranges=options.shape_ranges,
            reference=None if verifier is None else verifier.reference,
            criterion=outcome.criterion,
            progress=options.build_progress,
        )
        staged = _stage(backend, model, output, context)
        outcome.target_report, outcome.target_lines = staged.report, staged.lines
    outcome.output = save_model(model, output, check=_checker(options.model, options.check_each))
    if staged is not None and options.emit:
        outcome.emitted = staged.write()
    if options.triton is not None:
        outcome.triton_files = _write_triton(outcome, options, model, output, staged)


def _stage(backend: Backend, model: Model, output: Path, context: EmitContext) -> StagedArtefacts:
    try:
        return backend.stage(model, output, context)
    except IroptError as error:
        # The message says what failed; this says what became of the output.
        error.args = (f"{error}\n{output} was not written: the model is written only with its "
                      f"{backend.name or 'target'} artefacts",)
        raise


def _write_triton(
    outcome: RunOutcome, options: RunOptions, model: Model, output: Path, staged: StagedArtefacts | None
) -> list[Path]:
    from iropt.lowering.triton import triton_config, write_repository

    assert options.triton is not None and outcome.pipeline is not None
    target = outcome.pipeline.target
    profile = outcome.target_report.get("profile", {})
    config = triton_config(
        model.to_onnx(),
        name=options.triton_name or _model_name(options.model),
        backend=None if target is None else target.name,
        providers=list(target.options.get("providers", [])) if target is not None else [],
        profile_max_batch={name: (p["min"][0], p["max"][0]) for name, p in profile.items()},
        shape_ranges=options.shape_ranges,
    )
    outcome.target_lines += [f"triton: {note}" for note in config.notes]
    return write_repository(
        options.triton, config, onnx_path=output, serving_bytes=None if staged is None else staged.serving_bytes
    )


def _model_name(model_path: Path) -> str:
    """`models/resnet.onnx` -> `resnet`: the Triton model name when none is given."""
    return model_path.name.split(".")[0] or "model"


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
    # The reference is the input file itself: run from it, not from a copy held in memory.
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
    options: RunOptions, model: Model, pipeline: Pipeline, ctx: PassContext, verifier: Any, outcome: RunOutcome
) -> dict[int, Model]:
    """Run the schedule into `outcome`; returns the snapshots that bisection may reuse."""
    from iropt.infra.verification import SnapshotInstrument, VerifyEachInstrument

    sizes = SizeInstrument()
    instruments: list[Instrument] = [TimingInstrument(), sizes]
    if options.check_each:
        instruments.append(CheckerInstrument())
    if options.dump_dir is not None:
        instruments.append(IRDumpInstrument(options.dump_dir))
    if options.verify_each and verifier is not None:
        # With --force a failing pass is recorded and the run goes on, so the output is the
        # whole schedule's, as without --verify-each.
        instruments.append(VerifyEachInstrument(verifier, keep_going=options.force, failures=outcome.pass_failures))
    snapshots = SnapshotInstrument()
    if verifier is not None and not options.verify_each:
        instruments.append(snapshots)
    checkpoint = None
    if verifier is not None:
        def checkpoint(step: VerifyStep, current: Model, report: RunReport) -> Any:
            return verifier.check(current, step.criterion)

    outcome.initial = graph_stats(model)
    PassManager(instruments, checkpoint=checkpoint).run(model, pipeline, ctx, report=outcome.report)
    outcome.final = sizes.final or graph_stats(model)
    outcome.comparisons = list(outcome.report.checkpoints)
    return snapshots.models


def _verify_final(outcome: RunOutcome, model: Model | Path, verifier: Any) -> None:
    """The final check, on the model in memory or on the file it was written to."""
    assert outcome.pipeline is not None
    outcome.criterion = final_criterion(outcome.pipeline)
    last_is_verify = bool(outcome.pipeline.steps) and isinstance(outcome.pipeline.steps[-1], VerifyStep)
    if last_is_verify:
        return
    if isinstance(model, Path):
        outcome.comparisons.append(verifier.check_file(model, outcome.criterion))
    else:
        outcome.comparisons.append(verifier.check(model, outcome.criterion))


def _find_culprit(
    outcome: RunOutcome,
    verifier: Any,
    snapshots: dict[int, Model],
    ctx: PassContext,
    status: Callable[[str], None] | None,
) -> PassRecord | None:
    """The first pass that broke equivalence: known at once with --verify-each, else bisected
    over the passes that ran, reusing the models kept after lossy passes (no recalibration)."""
    if outcome.pass_failures:
        return outcome.pass_failures[0].record
    from iropt.infra.verification import bisect_records

    failed = next(c for c in outcome.comparisons if not c.passed)
    final_failed = outcome.comparisons[-1] is failed and failed.criterion == outcome.criterion
    return bisect_records(
        verifier, outcome.report.records, failed.criterion, ctx,
        snapshots=snapshots, final_failed=final_failed, status=status,
    )


def raise_if_unverified(outcome: RunOutcome, details: bool = True) -> None:
    """VerificationError describing the failed checks and the first pass that broke them.

    `details=False` leaves out the per-output figures (the caller has printed them already)."""
    if outcome.verified:
        return
    if outcome.pass_failures:
        lines = [str(failure) for failure in outcome.pass_failures] if details else [
            f"{len(outcome.pass_failures)} pass(es) changed the model's outputs"
        ]
    else:
        failed = [c for c in outcome.comparisons if not c.passed]
        lines = [f"verification failed ({failed[0].criterion.describe()})" + (":" if details else "")]
        if details:
            lines.append(failed[0].summary())
    if outcome.culprit is not None:
        lines.append(
            f"first pass that breaks equivalence: #{outcome.culprit.index} {outcome.culprit.name}"
        )
    if outcome.output is None:
        lines.append("no output written (use --force to write it anyway)")
    else:
        lines.append(f"{outcome.output} written anyway (--force)")
    raise VerificationError("\n".join(lines))
