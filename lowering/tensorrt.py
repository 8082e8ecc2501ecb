"""The TensorRT back end: build a serialized engine from the optimized model, write it, run it.

`target tensorrt(precision="int8", max_shapes={"input": [32, 3, 224, 224]})` in a schedule makes
`iropt run` write `model.opt.engine` beside `model.opt.onnx`. The engine is built by TensorRT's
ONNX parser and builder:

- *Precision.* `fp32`; `fp16`; `int8` for explicitly quantized models (Q/DQ nodes: run
  `quantize(format="tensorrt")` first; `iropt.trt_lint` checks the Q/DQ rules and its findings
  are added to a failed build's message); `best` lets the builder choose among fp32, fp16 and
  the model's int8. TensorRT 10 has weakly typed networks with FP16/INT8 builder flags;
  TensorRT 11 and TensorRT-RTX build strongly typed networks only, where every layer runs in
  the type the model gives it, so `fp16` there needs a model already converted to float16.
  Explicitly quantized models are built strongly typed wherever the builder offers it, which
  is what NVIDIA recommends for Q/DQ networks.
- *Shapes.* Inputs with dynamic dimensions get one optimization profile. `min_shapes`,
  `opt_shapes` and `max_shapes` give full shapes per input name, as a dict from Python
  (`{"input": [32, 3, 224, 224]}`) or, in a schedule, which has no dict values, as a list of
  `NAME:DIMS` strings like `--shape` (`["input:32x3x224x224"]`). A dynamic dimension that is
  not given defaults to min 1, opt 1, max 8 (`DYNAMIC_MIN`, `DYNAMIC_OPT`, `DYNAMIC_MAX`), a
  guess that fits tests and small batches: pass the serving shapes for a real deployment.
- *Timing cache.* `timing_cache="path"` is loaded when the file exists and written back after
  the build, so rebuilds skip kernel timing; an unreadable or mismatched file is replaced. With
  TensorRT-RTX the option is ignored (with a note): RTX keeps the API for source compatibility,
  but the cache has no effect there, and reading one needs a GPU even for an ahead-of-time build.
- *Progress.* A build can take minutes. Set `backend.progress = fn(phase, done, total)` to hear
  about the builder's phases (the command line draws a progress bar with it; a callback that
  raises cancels the build). The library itself prints nothing.

The module imports without TensorRT; `tensorrt` (10.x/11.x) is imported on first use, falling
back to `tensorrt_rtx`, and API differences are found by feature tests, not version numbers.
TensorRT-RTX builds engines without a GPU; running one (`compile(...).run`) needs an NVIDIA GPU,
and device buffers come from torch (CUDA build).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import onnx

from iropt.errors import OptionError, UserError
from iropt.infra.backend import Backend
from iropt.infra.options import Range
from iropt.infra.pass_base import Capabilities
from iropt.infra.registry import register_backend
from iropt.io.save import save_proto
from iropt.ir.model import EXTERNAL_DATA_THRESHOLD, Model, tensor_bytes
from iropt.lowering.tensorrt_lint import LintIssue, format_lint, lint_qdq_for_tensorrt
from iropt.util.suggest import did_you_mean

INSTALL_HINT = "TensorRT is not installed: pip install iropt[tensorrt] (or tensorrt-rtx)"
NO_GPU_MESSAGE = "running a TensorRT engine needs an NVIDIA GPU; the engine was built"

# Profile defaults for a dynamic dimension that the options do not give.
DYNAMIC_MIN = 1
DYNAMIC_OPT = 1
DYNAMIC_MAX = 8

# Called as progress(phase, steps_done, steps_total) while the builder works.
ProgressCallback = Callable[[str, int, int], None]

_FLAVORS = ("tensorrt", "tensorrt_rtx")


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
    def weak_typing(self) -> bool:
        """TensorRT 10 builds weakly typed networks with precision flags; 11 and RTX do not."""
        return hasattr(self.module.BuilderFlag, "FP16")

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


@functools.cache
def _logger_class(trt: Any) -> type:
    class CapturingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        """Keeps TensorRT's warnings and errors, so failures can quote them."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.records: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.records.append((severity.name, msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.records if s in ("ERROR", "INTERNAL_ERROR")]

        def warnings(self) -> list[str]:
            return [m for s, m in self.records if s == "WARNING"]

    return CapturingLogger


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
    """What the last engine build did, for the command line's summary and for tests."""

    tensorrt: str
    precision: str
    strongly_typed: bool
    seconds: float = 0.0
    engine_bytes: int = 0
    profiles: dict[str, tuple[list[int], list[int], list[int]]] = field(default_factory=dict)
    timing_cache: Path | None = None
    timing_cache_loaded: bool = False
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _InputInfo:
    name: str
    shape: list[int]  # -1 for a dynamic dimension


# --- the back end --------------------------------------------------------------------------------


@register_backend("tensorrt")
@dataclass(kw_only=True)
class TensorRTBackend(Backend):
    """Build a TensorRT engine (`<model>.engine`) with optimization profiles and a timing cache.

    precision: fp32, fp16, int8 (explicit Q/DQ models) or best (the builder chooses).
    workspace: bytes of scratch memory the builder may give a layer.
    min_shapes / opt_shapes / max_shapes: full shapes per input for the optimization profile
    ({"x": [8, 3, 224, 224]}, or ["x:8x3x224x224"] in a schedule).
    timing_cache: a file to load kernel timings from and save them to.
    builder_optimization_level: 0 (fast build) to 5 (slow build, fastest engine).
    engine_path: where `emit` writes the engine (default: beside the ONNX, `.engine`).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(quant_format="tensorrt", fp16=True, strongly_typed=True)

    precision: Literal["fp32", "fp16", "int8", "best"] = "fp32"
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
        return [self._engine_target(onnx_path)]

    def check_ready(self) -> None:
        load_tensorrt()

    def _engine_target(self, onnx_path: Path) -> Path:
        return Path(self.engine_path) if self.engine_path else onnx_path.with_suffix(".engine")

    def emit(self, model: Model, onnx_path: Path) -> list[Path]:
        """Build and write the engine atomically: `engine_path`, else `<onnx stem>.engine` beside it."""
        target = self._engine_target(onnx_path)
        if not target.parent.is_dir():
            raise UserError(f"{target}: the engine's directory {target.parent} does not exist")
        _write_atomic(target, self.build_engine(model))
        return [target]

    # -- building --

    def build_engine(self, model: Model) -> bytes:
        """Parse `model` with TensorRT's ONNX parser and build a serialized engine.

        Raises UserError listing every parser error (node name, op, description) or the
        builder's logged errors; on a Q/DQ model the TensorRT Q/DQ lint's findings are added.
        """
        api = load_tensorrt()
        trt = api.module
        proto = model.to_onnx()
        quantized = _has_qdq(proto)
        strongly_typed = self._strongly_typed(api, proto, quantized)
        report = BuildReport(api.label, self.precision, strongly_typed)
        self.last_build = report
        lint = lint_qdq_for_tensorrt(model) if quantized else []
        if lint:
            report.notes.append(format_lint(lint))
        logger = _logger_class(trt)()
        builder = trt.Builder(logger)
        flags = 1 << int(api.strongly_typed_flag) if strongly_typed and api.strongly_typed_flag is not None else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not _parse(parser, proto):
            raise UserError(_with_lint(_parse_failure(api, parser, proto), lint))
        config = builder.create_builder_config()
        self._configure(api, builder, network, config, report, quantized)
        self._load_timing_cache(api, config, report, logger)
        monitor = self._attach_progress(trt, config)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        report.seconds = time.perf_counter() - start
        if monitor is not None and monitor.failure is not None:
            raise monitor.failure
        report.warnings = logger.warnings()
        if serialized is None:
            raise UserError(_with_lint(_build_failure(api, logger.errors(), self.workspace), lint))
        engine = memoryview(serialized).tobytes()
        report.engine_bytes = len(engine)
        self._save_timing_cache(api, config, report)
        return engine

    def _strongly_typed(self, api: TensorRTApi, proto: onnx.ModelProto, quantized: bool) -> bool:
        """Whether to build strongly typed, refusing precisions this TensorRT cannot honour."""
        if self.precision == "int8" and not quantized:
            raise UserError(
                "precision='int8' needs an explicitly quantized model (QuantizeLinear/DequantizeLinear "
                'nodes); TensorRT has no implicit calibration here: run quantize(format="tensorrt") '
                "before the target, or use precision='fp16'"
            )
        if not api.weak_typing:
            if self.precision == "fp16" and not _has_float16(proto):
                raise UserError(
                    f"precision='fp16': {api.label} builds strongly typed networks only (every layer "
                    "runs in the model's own types) and this model has no float16 tensors; convert the "
                    "model to float16 first (e.g. ModelOpt AutoCast), or use precision='fp32'"
                )
            return True
        # TensorRT 10: Q/DQ models strongly typed (NVIDIA's recommendation) unless the builder is
        # asked to mix in fp16, which only weak typing can do.
        return quantized and self.precision in ("fp32", "int8") and api.strongly_typed_flag is not None

    def _configure(
        self, api: TensorRTApi, builder: Any, network: Any, config: Any, report: BuildReport, quantized: bool
    ) -> None:
        trt = api.module
        if hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if hasattr(config, "builder_optimization_level"):
            config.builder_optimization_level = self.builder_optimization_level
        self._set_precision_flags(api, config, report, quantized)
        self._add_profile(builder, network, config, report)

    def _set_precision_flags(self, api: TensorRTApi, config: Any, report: BuildReport, quantized: bool) -> None:
        flags = api.module.BuilderFlag
        if report.strongly_typed:
            if self.precision == "best":
                report.notes.append(
                    f"{api.label} builds strongly typed: layers run in the model's own types "
                    "(precision='best' adds nothing)"
                )
            return
        if self.precision in ("fp16", "best"):
            config.set_flag(flags.FP16)
        if quantized and hasattr(flags, "INT8"):
            # A weakly typed network runs its Q/DQ layers in int8 only with the INT8 flag set.
            config.set_flag(flags.INT8)
        if self.precision == "best" and not quantized:
            report.notes.append("precision='best' without Q/DQ nodes: fp32 and fp16 kernels only")

    def _add_profile(self, builder: Any, network: Any, config: Any, report: BuildReport) -> None:
        inputs = [
            _InputInfo(network.get_input(i).name, [int(d) for d in network.get_input(i).shape])
            for i in range(network.num_inputs)
        ]
        names = [info.name for info in inputs]
        for option, given in self._shape_options():
            for name in given:
                if name not in names:
                    raise UserError(
                        f"back end 'tensorrt' option {option} names input '{name}'"
                        f"{did_you_mean(name, names)}, but the model's inputs are: {', '.join(names)}"
                    )
        dynamic = [info for info in inputs if any(d < 0 for d in info.shape)]
        for info in inputs:
            shapes = self._profile_shapes(info)  # checks given shapes of fixed inputs too
            if info in dynamic:
                report.profiles[info.name] = shapes
        if not dynamic:
            return
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in report.profiles.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        defaulted = [i.name for i in dynamic if i.name not in self.max_shapes]
        if defaulted:
            report.notes.append(
                f"dynamic dimensions of {', '.join(defaulted)} default to min {DYNAMIC_MIN}, opt "
                f"{DYNAMIC_OPT}, max {DYNAMIC_MAX}; give min_shapes/opt_shapes/max_shapes for serving shapes"
            )

    def _shape_options(self) -> list[tuple[str, dict[str, list[int]]]]:
        return [
            (option, _shape_table(option, getattr(self, option)))
            for option in ("min_shapes", "opt_shapes", "max_shapes")
        ]

    def _profile_shapes(self, info: _InputInfo) -> tuple[list[int], list[int], list[int]]:
        """(min, opt, max) for one input: given shapes checked, dynamic dimensions defaulted."""
        rank = len(info.shape)
        given = {}
        for option, shapes in self._shape_options():
            if info.name in shapes:
                shape = shapes[info.name]
                if len(shape) != rank:
                    raise UserError(
                        f"back end 'tensorrt' option {option}['{info.name}'] = {shape} has rank "
                        f"{len(shape)}, but the input has rank {rank} (shape {info.shape}, -1 = dynamic)"
                    )
                given[option] = shape
        low = given.get("min_shapes") or [DYNAMIC_MIN if d < 0 else d for d in info.shape]
        opt = given.get("opt_shapes") or [
            max(lo, DYNAMIC_OPT) if d < 0 else d for d, lo in zip(info.shape, low, strict=True)
        ]
        high = given.get("max_shapes") or [
            max(o, DYNAMIC_MAX) if d < 0 else d for d, o in zip(info.shape, opt, strict=True)
        ]
        for axis, (d, a, b, c) in enumerate(zip(info.shape, low, opt, high, strict=True)):
            if d >= 0 and not a == b == c == d:
                raise UserError(
                    f"input '{info.name}' dimension {axis} is fixed at {d}, but the profile gives "
                    f"min {a}, opt {b}, max {c}"
                )
            if not 1 <= a <= b <= c:
                raise UserError(
                    f"input '{info.name}' dimension {axis}: the profile needs 1 <= min <= opt <= max, "
                    f"got min {a}, opt {b}, max {c}"
                )
        return low, opt, high

    # -- timing cache --

    def _load_timing_cache(self, api: TensorRTApi, config: Any, report: BuildReport, logger: Any) -> None:
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
        logged = len(logger.records)
        cache = config.create_timing_cache(data)
        accepted = cache is not None and config.set_timing_cache(cache, False)
        # An unreadable file is not an exception: TensorRT logs it and returns an empty cache.
        complaints = [m for _, m in logger.records[logged:] if "timing cache" in m.lower()]
        if not accepted or complaints:
            reason = "; ".join(complaints) or "it does not match this TensorRT"
            report.notes.append(f"timing cache {path} was not used ({reason}); it is rewritten after the build")
            config.set_timing_cache(config.create_timing_cache(b""), False)
        else:
            report.timing_cache_loaded = bool(data)

    def _save_timing_cache(self, api: TensorRTApi, config: Any, report: BuildReport) -> None:
        if report.timing_cache is None:
            return
        cache = config.get_timing_cache()
        data = memoryview(cache.serialize()).tobytes() if cache is not None else b""
        if data:
            _write_atomic(report.timing_cache, data)

    def _attach_progress(self, trt: Any, config: Any) -> Any:
        if self.progress is None or not hasattr(config, "progress_monitor"):
            return None
        monitor = _progress_class(trt)(self.progress)
        config.progress_monitor = monitor
        return monitor


# --- running ------------------------------------------------------------------------------------


class TensorRTRunner:
    """Runs a deserialized engine on the GPU; feeds and outputs are numpy arrays.

    Device buffers are torch CUDA tensors; one optimization profile (the one the back end builds).
    """

    def __init__(self, api: TensorRTApi, runtime: Any, engine: Any, logger: Any, torch: Any) -> None:
        trt = api.module
        self._api = api
        self._runtime = runtime  # the engine must not outlive its runtime
        self._engine = engine
        self._logger = logger
        self._torch = torch
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    @classmethod
    def load(cls, engine_bytes: bytes, api: TensorRTApi) -> TensorRTRunner:
        """Deserialize `engine_bytes`; a UserError when no GPU (or no CUDA torch) is available."""
        torch = _cuda_torch(len(engine_bytes), api)
        logger = _logger_class(api.module)()
        runtime = api.module.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise UserError(
                f"{api.label} could not load the engine it built: " + "; ".join(logger.errors()[-5:])
            )
        return cls(api, runtime, engine, logger, torch)

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
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise UserError("TensorRT failed to run the engine: " + "; ".join(self._logger.errors()[-5:]))
        stream.synchronize()
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
    with tempfile.TemporaryDirectory(prefix="iropt-trt-") as tmp:
        path = save_proto(proto, Path(tmp) / "model.onnx", external_data=True)
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


def _write_atomic(target: Path, data: bytes) -> None:
    """Write to a temporary file beside `target`, then rename: readers never see half a file."""
    fd, staged = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(staged, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        raise
