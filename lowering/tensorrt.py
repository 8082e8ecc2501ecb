"""The TensorRT back end: build a serialized engine from the optimized model, check it, write it.

`target tensorrt(...)` in a schedule makes `iropt run` build `model.opt.engine` beside
`model.opt.onnx`. The engine is built by TensorRT's ONNX parser and builder:

- *Precision from the graph.* Networks are built strongly typed, with every TensorRT that has
  the flag (10.x, 11.x, TensorRT-RTX): each layer runs in the type the model gives it. fp16
  needs a model converted to float16 (`convert_fp16`), int8 an explicitly quantized model
  (`quantize(format="tensorrt")`: Q/DQ nodes; `tensorrt_lint` checks TensorRT's Q/DQ rules and
  its findings are added to a failed build's message). The FP16/INT8 builder flags, removed in
  TensorRT 11, are never used: the same graph builds the same way on 10.x. `precision` states
  what the model must contain ("auto": whatever it has).
- *The precision gate.* The build uses detailed profiling verbosity; the engine's layer
  information (inspector JSON, or the build log where the engine cannot be loaded here) is
  mapped back to ONNX nodes (`tensorrt_precision`). Nodes that asked for int8/fp16 and run
  wider are listed; `require_precision=true` makes that a failure (nothing is written).
- *Shapes.* Inputs with dynamic dimensions get one optimization profile, from `--shape
  NAME:MIN,OPT,MAX` or the `min_shapes`/`opt_shapes`/`max_shapes` options (see
  `tensorrt_profile`). The profile is printed and reported; a failed build names its dynamic
  dimensions and how to give their range.
- *Timing cache.* `timing_cache="path"` is loaded when the file exists and written back after
  the build, so rebuilds skip kernel timing; an unreadable or mismatched file is replaced. With
  TensorRT-RTX the option is ignored (with a note): RTX keeps the API for source compatibility,
  but the cache has no effect there, and reading one needs a GPU even for an ahead-of-time build.
- *Running.* With an NVIDIA GPU (and torch built with CUDA) the engine is loaded and run on
  the profile's min, opt and max shapes against ONNX Runtime on the input model; without one
  the run says "engine not run: no GPU" and verification covers the ONNX model only.
- *Progress.* A build can take minutes. Set `backend.progress = fn(phase, done, total)` to hear
  about the builder's phases (a callback that raises cancels the build).

The module imports without TensorRT; `tensorrt` (10.x/11.x) is imported on first use, falling
back to `tensorrt_rtx`, and API differences are found by feature tests, not version numbers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import onnx

from iropt.errors import IroptError, OptionError, UserError
from iropt.infra.backend import Backend, EmitContext, StagedArtefacts
from iropt.infra.options import Range
from iropt.infra.pass_base import Capabilities
from iropt.infra.registry import register_backend
from iropt.io.save import spilled_model_file, write_bytes_atomically
from iropt.ir.model import EXTERNAL_DATA_THRESHOLD, Model, tensor_bytes
from iropt.lowering.tensorrt_lint import LintIssue, format_lint, lint_qdq_for_tensorrt
from iropt.lowering.tensorrt_precision import (
    PrecisionReport,
    layers_from_json,
    layers_from_log,
    precision_report,
    requested_precisions,
)
from iropt.lowering.tensorrt_profile import (
    DYNAMIC_MAX,
    DYNAMIC_MIN,
    DYNAMIC_OPT,
    ProfileInput,
    failure_hint,
    resolve_profile,
    target_ranges,
)
from iropt.verify.criteria import Criterion
from iropt.verify.feeds import ShapeRange

__all__ = [
    "DYNAMIC_MAX",
    "DYNAMIC_MIN",
    "DYNAMIC_OPT",
    "ENGINE_NOT_RUN",
    "INSTALL_HINT",
    "NO_GPU_MESSAGE",
    "BuildReport",
    "PrecisionGateError",
    "TensorRTBackend",
    "TensorRTRunner",
    "load_tensorrt",
    "tensorrt_flavor",
]

INSTALL_HINT = "TensorRT is not installed: pip install iropt[tensorrt] (or tensorrt-rtx)"
NO_GPU_MESSAGE = "running a TensorRT engine needs an NVIDIA GPU; the engine was built"
ENGINE_NOT_RUN = "engine not run: no GPU"

# Called as progress(phase, steps_done, steps_total) while the builder works.
ProgressCallback = Callable[[str, int, int], None]

_FLAVORS = ("tensorrt", "tensorrt_rtx")


class PrecisionGateError(IroptError):
    """`require_precision=true` and nodes run wider than the graph asks (exit 1)."""

    exit_code = 1


# --- the TensorRT module and its differences ---------------------------------------------------


@dataclass(frozen=True)
class TensorRTApi:
    """The imported TensorRT module and what it offers, found by feature tests."""

    module: Any
    flavor: str  # "tensorrt" or "tensorrt_rtx"

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "unknown"))

    @property
    def label(self) -> str:
        return f"{self.flavor} {self.version}"

    @property
    def strongly_typed_flag(self) -> Any | None:
        return getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)

    @property
    def timing_cache_effective(self) -> bool:
        # TensorRT-RTX keeps ITimingCache for source compatibility only: the cache has no effect,
        # and reading one makes the ahead-of-time build query for a GPU (it fails without one).
        return self.flavor == "tensorrt"


_api: TensorRTApi | None = None


def load_tensorrt() -> TensorRTApi:
    """Import `tensorrt`, else `tensorrt_rtx`; a UserError naming the extra when neither imports."""
    global _api
    if _api is not None:
        return _api
    failures = []
    for flavor in _FLAVORS:
        try:
            module = importlib.import_module(flavor)
        except ImportError as exc:  # also a wheel present whose native libraries are missing
            failures.append(f"{flavor}: {exc}")
            continue
        _api = TensorRTApi(module, flavor)
        return _api
    raise UserError(f"{INSTALL_HINT} ({'; '.join(failures)})")


def tensorrt_flavor() -> str | None:
    """Which TensorRT would be used ('tensorrt' or 'tensorrt_rtx'), or None; never raises."""
    try:
        return load_tensorrt().flavor
    except UserError:
        return None


class _LogCapture:
    """What TensorRT logged during one build: warnings, errors and the engine's layer lines."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def errors(self) -> list[str]:
        return [m for s, m in self.records if s in ("ERROR", "INTERNAL_ERROR")]

    def warnings(self) -> list[str]:
        return [m for s, m in self.records if s == "WARNING"]

    def verbose(self) -> list[str]:
        return [m for s, m in self.records if s == "VERBOSE"]


@functools.cache
def _shared_logger(trt: Any) -> Any:
    """The one logger of the process: TensorRT keeps the first logger a builder or runtime is
    given and ignores later ones, so every build reports to this one, which forwards to the
    capture of the build in progress."""

    class CapturingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.capture: _LogCapture | None = None

        def log(self, severity: Any, msg: str) -> None:
            if self.capture is None:
                return
            if severity <= trt.ILogger.Severity.WARNING:
                self.capture.records.append((severity.name, msg))
            elif msg.startswith("Layers:") or msg.startswith("Engine Layer Information"):
                # The per-layer listing a detailed build prints: the precision gate's source
                # when the engine cannot be loaded here.
                self.capture.records.append(("VERBOSE", msg))

    return CapturingLogger()


@contextlib.contextmanager
def _capturing(trt: Any) -> Iterator[tuple[Any, _LogCapture]]:
    logger = _shared_logger(trt)
    capture, previous = _LogCapture(), logger.capture
    logger.capture = capture
    try:
        yield logger, capture
    finally:
        logger.capture = previous


@functools.cache
def _progress_class(trt: Any) -> type:
    class ProgressMonitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        """Forwards builder phases to a callback; a callback that raises cancels the build."""

        def __init__(self, callback: ProgressCallback) -> None:
            trt.IProgressMonitor.__init__(self)
            self.callback = callback
            self.totals: dict[str, int] = {}
            self.failure: BaseException | None = None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.totals[phase_name] = num_steps
            self._call(phase_name, 0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return self._call(phase_name, step + 1)

        def phase_finish(self, phase_name: str) -> None:
            self._call(phase_name, self.totals.get(phase_name, 0))

        def _call(self, phase: str, done: int) -> bool:
            if self.failure is not None:
                return False
            try:
                self.callback(phase, done, self.totals.get(phase, 0))
            except Exception as exc:  # surfaced after the builder returns
                self.failure = exc
                return False
            return True

    return ProgressMonitor


# --- build results --------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What the last engine build did, for the command line's summary, the report and tests."""

    tensorrt: str
    precision: str
    strongly_typed: bool = True
    seconds: float = 0.0
    engine_bytes: int = 0
    profile: list[ProfileInput] = field(default_factory=list)
    timing_cache: Path | None = None
    timing_cache_loaded: bool = False
    precisions: PrecisionReport | None = None
    engine_run: str = ENGINE_NOT_RUN
    engine_checks: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def profiles(self) -> dict[str, tuple[list[int], list[int], list[int]]]:
        return {p.name: (list(p.min), list(p.opt), list(p.max)) for p in self.profile}

    def lines(self) -> list[str]:
        """The build as the command line prints it."""
        lines = [f"engine: {self.engine_bytes:,} bytes, built in {self.seconds:.2f} s by {self.tensorrt}"]
        lines += [f"engine profile: {p.describe()}" for p in self.profile]
        if self.precisions is not None:
            lines.append(self.precisions.summary())
            lines += [f"  {line}" for line in self.precisions.missed_lines()]
        if self.engine_run == ENGINE_NOT_RUN:
            lines.append(f"{ENGINE_NOT_RUN}: verification ran the ONNX model in ONNX Runtime, not the engine")
        else:
            lines.append(self.engine_run)
        lines += [f"note: {note}" for note in self.notes]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensorrt": self.tensorrt,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "build_seconds": self.seconds,
            "engine_bytes": self.engine_bytes,
            "profile": {p.name: p.to_dict() for p in self.profile},
            "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
            "timing_cache_loaded": self.timing_cache_loaded,
            "precision_report": None if self.precisions is None else self.precisions.to_dict(),
            "engine_run": self.engine_run,
            "engine_checks": self.engine_checks,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


# --- the back end --------------------------------------------------------------------------------


@register_backend("tensorrt")
@dataclass(kw_only=True)
class TensorRTBackend(Backend):
    """Build a TensorRT engine (`<model>.engine`), strongly typed, with a profile and a precision gate.

    precision: auto (what the graph has), fp32, fp16 (the model must hold float16: convert_fp16)
    or int8 (the model must be quantized: quantize(format="tensorrt")).
    require_precision: fail (exit 1, nothing written) when a node that asks for int8/fp16 in the
    graph runs wider in the engine.
    workspace: bytes of scratch memory the builder may give a layer.
    min_shapes / opt_shapes / max_shapes: full shapes per input for the optimization profile
    ({"x": [8, 3, 224, 224]}, or ["x:8x3x224x224"] in a schedule); `--shape x:MIN,OPT,MAX`
    on the command line takes precedence.
    timing_cache: a file to load kernel timings from and save them to (reused across builds).
    builder_optimization_level: 0 (fast build) to 5 (slow build, fastest engine).
    engine_path: where `emit` writes the engine (default: beside the ONNX, `.engine`).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        quant_format="tensorrt", fp16=True, strongly_typed=True, saturating_int8_dot=False
    )

    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    require_precision: bool = False
    workspace: Annotated[int, Range(min=1)] = 1 << 30
    min_shapes: dict[str, list[int]] | list[str] = field(default_factory=dict)
    opt_shapes: dict[str, list[int]] | list[str] = field(default_factory=dict)
    max_shapes: dict[str, list[int]] | list[str] = field(default_factory=dict)
    timing_cache: str | None = None
    builder_optimization_level: Annotated[int, Range(min=0, max=5)] = 3
    engine_path: str | None = None
    # Not options: set by the caller (the command line draws a progress bar with it).
    progress: ProgressCallback | None = field(default=None, init=False, repr=False, compare=False)
    last_build: BuildReport | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.min_shapes = _shape_table("min_shapes", self.min_shapes)
        self.opt_shapes = _shape_table("opt_shapes", self.opt_shapes)
        self.max_shapes = _shape_table("max_shapes", self.max_shapes)
        if self.workspace <= 0:
            raise OptionError(f"back end 'tensorrt' option 'workspace' must be > 0 bytes, got {self.workspace}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise OptionError(
                "back end 'tensorrt' option 'builder_optimization_level' must be 0..5, "
                f"got {self.builder_optimization_level}"
            )

    # -- Backend interface --

    def compile(self, model: Model) -> TensorRTRunner:
        """Build the engine and load it for running; needs an NVIDIA GPU to load."""
        engine = self.build_engine(model)
        return TensorRTRunner.load(engine, load_tensorrt())

    def planned_outputs(self, onnx_path: Path) -> list[Path]:
        return [self.engine_target(onnx_path)]

    def check_ready(self) -> None:
        load_tensorrt()

    def emit(self, model: Model, onnx_path: Path) -> list[Path]:
        """Build and write the engine: `engine_path`, else `<onnx stem>.engine` beside it."""
        return self.stage(model, onnx_path, EmitContext(progress=self.progress)).write()

    def check_inputs(self, model: Model, context: EmitContext) -> None:
        """The profile must resolve (shapes that fit, ranges for every dynamic dimension)."""
        self.profile_for(_declared_inputs(model.to_onnx()), context.shape_ranges)

    def stage(self, model: Model, onnx_path: Path, context: EmitContext) -> StagedArtefacts:
        """Build the engine in memory, run the precision gate and, with a GPU, the numerical gate."""
        target = self.engine_target(onnx_path)
        if context.progress is not None:
            self.progress = context.progress
        engine = self.build_engine(model, context.shape_ranges)
        report = self.last_build
        assert report is not None
        if context.reference is not None:
            check_engine(engine, context.reference, report, context.criterion)
        elif _gpu_visible():
            report.engine_run = "engine not run: verification is off"

        def write() -> list[Path]:
            write_bytes_atomically(target, engine)
            return [target]

        return StagedArtefacts(write=write, report=report.to_dict(), lines=report.lines(), serving_bytes=engine)

    def engine_target(self, onnx_path: Path) -> Path:
        target = Path(self.engine_path) if self.engine_path else onnx_path.with_suffix(".engine")
        if not target.parent.is_dir():
            raise UserError(f"{target}: the engine's directory {target.parent} does not exist")
        return target

    # -- building --

    def profile_for(
        self, inputs: Sequence[tuple[str, Sequence[int]]], command_line: Mapping[str, ShapeRange]
    ) -> list[ProfileInput]:
        tables = {"min_shapes": self.min_shapes, "opt_shapes": self.opt_shapes, "max_shapes": self.max_shapes}
        return resolve_profile(inputs, command_line, target_ranges(tables))  # type: ignore[arg-type]

    def build_engine(self, model: Model, shape_ranges: Mapping[str, ShapeRange] | None = None) -> bytes:
        """Parse `model` with TensorRT's ONNX parser and build a serialized engine.

        Raises UserError listing every parser error (node name, op, description) or the
        builder's logged errors (with the profile's dynamic dimensions); on a Q/DQ model the
        TensorRT Q/DQ lint's findings are added. PrecisionGateError when `require_precision`
        and a node runs wider than the graph asks.
        """
        api = load_tensorrt()
        proto = model.to_onnx()
        quantized = _has_qdq(proto)
        self._check_precision_option(api, proto, quantized)
        report = BuildReport(api.label, self.precision)
        self.last_build = report
        report.profile = self.profile_for(_declared_inputs(proto), shape_ranges or {})
        lint = lint_qdq_for_tensorrt(model) if quantized else []
        if lint:
            report.notes.append(format_lint(lint))
        with _capturing(api.module) as (logger, capture):
            engine = self._build(api, proto, report, logger, capture, lint)
        report.warnings = capture.warnings()
        report.engine_bytes = len(engine)
        report.precisions = _precision_gate(api, engine, proto, capture, report.profile)
        if report.precisions.missed and self.require_precision:
            raise PrecisionGateError(
                "require_precision: these nodes asked for a precision the engine does not run them in "
                "(nothing written):\n" + "\n".join(f"  - {line}" for line in report.precisions.missed_lines())
            )
        return engine

    def _build(
        self, api: TensorRTApi, proto: onnx.ModelProto, report: BuildReport, logger: Any,
        capture: _LogCapture, lint: list[LintIssue],
    ) -> bytes:
        trt = api.module
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(api.strongly_typed_flag))
        parser = trt.OnnxParser(network, logger)
        if not _parse(parser, proto):
            raise UserError(_with_lint(_parse_failure(api, parser, proto), lint))
        config = builder.create_builder_config()
        self._configure(api, builder, config, report)
        self._load_timing_cache(api, config, report, capture)
        monitor = self._attach_progress(trt, config)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        report.seconds = time.perf_counter() - start
        if monitor is not None and monitor.failure is not None:
            raise monitor.failure
        if serialized is None:
            message = _build_failure(api, capture.errors(), self.workspace)
            hint = failure_hint(report.profile)
            raise UserError(_with_lint(f"{message}\n{hint}" if hint else message, lint))
        self._save_timing_cache(config, report)
        return memoryview(serialized).tobytes()

    def _check_precision_option(self, api: TensorRTApi, proto: onnx.ModelProto, quantized: bool) -> None:
        """Refuse what the graph cannot give: precision comes from the graph, not builder flags."""
        if api.strongly_typed_flag is None:
            raise UserError(
                f"{api.label} cannot build strongly typed networks (TensorRT 10 or later is needed): "
                "iropt takes precision from the graph, never from builder flags"
            )
        if self.precision == "int8" and not quantized:
            raise UserError(
                "precision='int8' needs an explicitly quantized model (QuantizeLinear/DequantizeLinear "
                'nodes): TensorRT takes precision from the graph; run quantize(format="tensorrt") '
                "before the target, or use precision='auto'"
            )
        if self.precision == "fp16" and not _has_float16(proto):
            raise UserError(
                "precision='fp16': TensorRT builds strongly typed (every layer runs in the model's own "
                "types) and this model has no float16 tensors; run convert_fp16 before the target, or "
                "use precision='auto'"
            )
        if self.precision == "fp32" and (quantized or _has_float16(proto)):
            raise UserError(
                "precision='fp32', but the model has Q/DQ or float16 tensors, which TensorRT runs as "
                "the graph says; use precision='auto' (or the model before quantize/convert_fp16)"
            )

    def _configure(self, api: TensorRTApi, builder: Any, config: Any, report: BuildReport) -> None:
        trt = api.module
        if hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if hasattr(config, "builder_optimization_level"):
            config.builder_optimization_level = self.builder_optimization_level
        # Detailed layer information is what the precision gate reads back.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if report.profile:
            profile = builder.create_optimization_profile()
            for entry in report.profile:
                profile.set_shape(entry.name, entry.min, entry.opt, entry.max)
            config.add_optimization_profile(profile)
        defaulted = [entry.name for entry in report.profile if entry.source == "default"]
        if defaulted:
            report.notes.append(
                f"the batch dimension of {', '.join(defaulted)} defaults to min {DYNAMIC_MIN}, opt "
                f"{DYNAMIC_OPT}, max {DYNAMIC_MAX}: give --shape NAME:MIN,OPT,MAX for serving shapes"
            )

    # -- timing cache --

    def _load_timing_cache(self, api: TensorRTApi, config: Any, report: BuildReport, capture: _LogCapture) -> None:
        if self.timing_cache is None or not hasattr(config, "create_timing_cache"):
            return
        path = Path(self.timing_cache)
        if not api.timing_cache_effective:
            report.notes.append(
                f"timing_cache ignored: {api.label} has no build-time timing cache (it compiles kernels "
                f"just in time on the GPU that runs the engine); {path} was not read or written"
            )
            return
        report.timing_cache = path
        data = path.read_bytes() if path.is_file() else b""
        logged = len(capture.records)
        cache = config.create_timing_cache(data)
        accepted = cache is not None and config.set_timing_cache(cache, False)
        # An unreadable file is not an exception: TensorRT logs it and returns an empty cache.
        complaints = [m for _, m in capture.records[logged:] if "timing cache" in m.lower()]
        if not accepted or complaints:
            reason = "; ".join(complaints) or "it does not match this TensorRT"
            report.notes.append(f"timing cache {path} was not used ({reason}); it is rewritten after the build")
            config.set_timing_cache(config.create_timing_cache(b""), False)
        else:
            report.timing_cache_loaded = bool(data)

    def _save_timing_cache(self, config: Any, report: BuildReport) -> None:
        if report.timing_cache is None:
            return
        cache = config.get_timing_cache()
        data = memoryview(cache.serialize()).tobytes() if cache is not None else b""
        if data:
            write_bytes_atomically(report.timing_cache, data)

    def _attach_progress(self, trt: Any, config: Any) -> Any:
        if self.progress is None or not hasattr(config, "progress_monitor"):
            return None
        monitor = _progress_class(trt)(self.progress)
        config.progress_monitor = monitor
        return monitor


def _declared_inputs(proto: onnx.ModelProto) -> list[tuple[str, list[int]]]:
    """(name, shape with -1 for a dynamic dimension) of every input that is not an initializer."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs.append((value.name, [d.dim_value if d.HasField("dim_value") else -1 for d in dims]))
    return inputs


# --- the precision gate and the numerical gate ---------------------------------------------------


def _precision_gate(
    api: TensorRTApi, engine: bytes, proto: onnx.ModelProto, capture: _LogCapture, profile: Sequence[ProfileInput]
) -> PrecisionReport:
    """Layer information from the engine inspector where the engine loads here (a GPU), else
    from the build log; the log also when the inspector's JSON names no precision."""
    requested = requested_precisions(proto)
    text = _inspector_json(api, engine, profile)
    if text is not None:
        report = precision_report(layers_from_json(text), requested, "inspector")
        if report.realized:
            return report
    return precision_report(layers_from_log(capture.verbose()), requested, "build log")


def _inspector_json(api: TensorRTApi, engine: bytes, profile: Sequence[ProfileInput]) -> str | None:
    """The inspector's JSON, or None when the engine cannot be deserialized (no GPU).

    With dynamic inputs the inspector is given an execution context at the profile's opt
    shapes: without one, TensorRT writes "N/A due to dynamic shapes" for every tensor's type.
    """
    if not _gpu_visible():
        return None
    trt = api.module
    with _capturing(trt) as (logger, _):
        runtime = trt.Runtime(logger)
        loaded = runtime.deserialize_cuda_engine(engine)
        if loaded is None:
            return None
        inspector = loaded.create_engine_inspector()
        context = loaded.create_execution_context() if profile else None
        if context is not None:
            for entry in profile:
                context.set_input_shape(entry.name, entry.opt)
            inspector.execution_context = context
        return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _gpu_visible() -> bool:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def check_engine(engine: bytes, reference: Model, report: BuildReport, criterion: Criterion | None) -> None:
    """Run the engine at the profile's min, opt and max shapes against ONNX Runtime on
    `reference`; without a GPU, record that the engine was not run."""
    if not _gpu_visible():
        report.engine_run = ENGINE_NOT_RUN
        return
    from iropt.verify.compare import compare
    from iropt.verify.feeds import feed_source
    from iropt.verify.runtime import reference_runner

    try:
        runner = TensorRTRunner.load(engine, load_tensorrt())
    except UserError as error:
        # A GPU this TensorRT cannot use (a driver older than its CUDA runtime, say): the
        # engine was built for the machine that serves it, not necessarily for this one.
        report.engine_run = f"engine not run: {' '.join(str(error).split())}"
        return
    reference_run = reference_runner(reference)
    gate = _engine_criterion(criterion)
    failures = []
    for label, shapes in _profile_points(report.profile):
        feeds = list(feed_source(None, reference, shapes=shapes, count=1, seed=7))
        comparison = compare([reference_run.run(f) for f in feeds], [runner.run(f) for f in feeds], gate)
        report.engine_checks.append({"shape": label, **comparison.to_dict()})
        if not comparison.passed:
            failures.append(f"at {label}: {comparison.summary()}")
    report.engine_run = f"engine run on the GPU at {len(report.engine_checks)} shape(s) ({gate.describe()})"
    if failures:
        from iropt.errors import VerificationError

        raise VerificationError(
            "the TensorRT engine does not match ONNX Runtime on the input model (nothing written):\n"
            + "\n".join(failures)
        )


def _engine_criterion(criterion: Criterion | None) -> Criterion:
    """The run's criterion; a tolerance check loosened to 1e-3, since TensorRT may pick TF32
    kernels for fp32 convolutions and matrix products."""
    if criterion is None or criterion.metric == "tolerance":
        return Criterion(rtol=1e-3, atol=1e-3)
    return criterion


def _profile_points(profile: Sequence[ProfileInput]) -> list[tuple[str, dict[str, list[int]]]]:
    if not profile:
        return [("the model's static shape", {})]
    points = []
    for label in ("min", "opt", "max"):
        shapes = {entry.name: list(getattr(entry, label)) for entry in profile}
        points.append((label, shapes))
    return points


# --- running ------------------------------------------------------------------------------------


class TensorRTRunner:
    """Runs a deserialized engine on the GPU; feeds and outputs are numpy arrays.

    Device buffers are torch CUDA tensors; one optimization profile (the one the back end builds).
    """

    def __init__(self, api: TensorRTApi, runtime: Any, engine: Any, torch: Any) -> None:
        trt = api.module
        self._api = api
        self._runtime = runtime  # the engine must not outlive its runtime
        self._engine = engine
        self._torch = torch
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    @classmethod
    def load(cls, engine_bytes: bytes, api: TensorRTApi) -> TensorRTRunner:
        """Deserialize `engine_bytes`; a UserError when no GPU (or no CUDA torch) is available."""
        torch = _cuda_torch(len(engine_bytes), api)
        with _capturing(api.module) as (logger, capture):
            runtime = api.module.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise UserError(
                f"{api.label} could not load the engine it built: " + "; ".join(capture.errors()[-5:])
            )
        return cls(api, runtime, engine, torch)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        self._check_feed_names(feeds)
        keep = []
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name])
            expected = self._numpy_dtype(name)
            if array.dtype != expected:
                raise UserError(f"input '{name}' is {array.dtype}, the engine expects {expected}")
            if not self._context.set_input_shape(name, tuple(array.shape)):
                raise UserError(
                    f"input '{name}' has shape {list(array.shape)}, outside the engine's optimization "
                    "profile; rebuild with min_shapes/max_shapes that cover it"
                )
            device = torch.from_numpy(array).cuda()
            keep.append(device)
            self._context.set_tensor_address(name, device.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"output '{name}' has a data-dependent shape {shape}, not supported yet")
            dtype = torch.from_numpy(np.empty(0, self._numpy_dtype(name))).dtype
            results[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self._context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        with _capturing(self._api.module) as (_, capture):
            launched = self._context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
        if not launched:
            raise UserError("TensorRT failed to run the engine: " + "; ".join(capture.errors()[-5:]))
        return {name: tensor.cpu().numpy() for name, tensor in results.items()}

    def _numpy_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._api.module.nptype(self._engine.get_tensor_dtype(name)))

    def _check_feed_names(self, feeds: Mapping[str, np.ndarray]) -> None:
        missing = [n for n in self.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.inputs]
        if missing or extra:
            raise UserError(
                f"feeds do not match the engine's inputs {self.inputs}: missing {missing}, unknown {extra}"
            )


def _cuda_torch(engine_size: int, api: TensorRTApi) -> Any:
    built = f"{NO_GPU_MESSAGE} ({engine_size:,} bytes, {api.label}): write it with emit() / `iropt run -o` and run it on a machine with an NVIDIA GPU"
    try:
        torch = importlib.import_module("torch")
    except ImportError as exc:
        raise UserError(f"{built}; this runner also needs torch with CUDA for its buffers (pip install iropt[torch])") from exc
    if not torch.cuda.is_available():
        raise UserError(f"{built} (no CUDA device is visible here)")
    return torch


# --- helpers -----------------------------------------------------------------------------------


def _shape_table(option: str, value: dict[str, list[int]] | list[str]) -> dict[str, list[int]]:
    """Shapes by input name, from a dict or from `NAME:DIMS` strings (`x:8x3x224x224`)."""
    if isinstance(value, dict):
        return value
    table: dict[str, list[int]] = {}
    for item in value:
        # The name is everything before the last colon, so names such as `input:0` work.
        name, _, dims = item.rpartition(":")
        parts = dims.split("x")
        if not name or not all(part.isdigit() for part in parts):
            raise OptionError(
                f"back end 'tensorrt' option {option}: '{item}' is not NAME:DIMS (such as x:8x3x224x224)"
            )
        if name in table:
            raise OptionError(f"back end 'tensorrt' option {option} gives input '{name}' twice")
        table[name] = [int(part) for part in parts]
    return table


def _has_qdq(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in _all_nodes(proto.graph))


def _has_float16(proto: onnx.ModelProto) -> bool:
    float16 = onnx.TensorProto.FLOAT16
    values = list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output)
    return any(v.type.tensor_type.elem_type == float16 for v in values) or any(
        t.data_type == float16 for t in proto.graph.initializer
    )


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _all_nodes(sub)


def _parse(parser: Any, proto: onnx.ModelProto) -> bool:
    """Parse from memory, or through a temporary file with external data past the 2 GB limit."""
    if tensor_bytes(proto) <= EXTERNAL_DATA_THRESHOLD:
        return bool(parser.parse(proto.SerializeToString()))
    with spilled_model_file(proto) as path:
        return bool(parser.parse_from_file(str(path)))


def _parse_failure(api: TensorRTApi, parser: Any, proto: onnx.ModelProto) -> str:
    lines = [f"{api.label} cannot parse the model ({parser.num_errors} error(s)):"]
    for index in range(parser.num_errors):
        lines.append("  - " + _describe_parser_error(parser.get_error(index), proto))
    return "\n".join(lines)


def _describe_parser_error(error: Any, proto: onnx.ModelProto) -> str:
    node_index = int(error.node()) if hasattr(error, "node") else -1
    nodes = proto.graph.node
    node = nodes[node_index] if 0 <= node_index < len(nodes) else None
    name = error.node_name() if hasattr(error, "node_name") else (node.name if node else "")
    op = error.node_operator() if hasattr(error, "node_operator") else (node.op_type if node else "")
    description = " ".join(str(error.desc()).split())
    if "Plugin not found" in description:
        description += f" (TensorRT has no importer for {op}: replace the op, or register a TensorRT plugin for it)"
    where = f"node '{name}' ({op})" if name or op else "model"
    return f"{where}: {description}"


def _build_failure(api: TensorRTApi, errors: list[str], workspace: int) -> str:
    detail = "\n".join(f"  - {' '.join(e.split())}" for e in errors[-10:]) or "  (the builder logged no error)"
    message = f"{api.label} failed to build the engine:\n{detail}"
    if any("workspace" in e.lower() for e in errors):
        message += f"\nFix: raise the back end's workspace option (now {workspace:,} bytes)"
    return message


def _with_lint(message: str, issues: list[LintIssue]) -> str:
    """A failure message with the Q/DQ lint's findings, which usually name the cause and the fix."""
    return f"{message}\n{format_lint(issues)}" if issues else message
