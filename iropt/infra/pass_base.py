"""The Pass base class, its result type and the context a pass runs in.

A pass rewrites a `Model` in place and returns a `PassResult`: whether anything changed and
named integer statistics. Its options are typed keyword-only constructor parameters (see
`iropt.infra.options`). A pass is *exact* when its output must match its input within floating-point
tolerance, and *lossy* when it is held to a metric instead (quantization, pruning, low-rank).
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from iropt.ir.model import Model
from iropt.util.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from iropt.verify.profiling import ModelProfiler
    from iropt.verify.runner import Runner, RunnerFactory

T = TypeVar("T")


class PassKind(enum.Enum):
    """How a pass's result is verified."""

    EXACT = "exact"
    LOSSY = "lossy"


@dataclass
class PassResult:
    """What a pass did: `changed`, and counts such as `{"fused": 12}`."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    # Report-only data (JSON-ready): rankings, layers kept in float, kept channel indices.
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, **stats: int) -> PassResult:
        """A result that is `changed` exactly when any statistic is non-zero."""
        return cls(changed=any(stats.values()), stats=dict(stats))


QuantFormat = Literal["ort", "tensorrt"]


@dataclass(frozen=True)
class Capabilities:
    """What a back end runs well, declared by the back end and read by lossy passes.

    - `quant_format`: the Q/DQ layout it runs fastest: `ort` (uint8 activations, int8
      per-channel weights, int32 bias) or `tensorrt` (symmetric int8, zero points 0, float bias,
      Q/DQ on both inputs of weighted ops).
    - `fp16`: it has float16 kernels worth converting to.
    - `strongly_typed`: precision comes from the graph's types only (no builder precision flags).
    - `saturating_int8_dot`: its uint8 x int8 dot products may add pairs of products in int16,
      which full-range int8 weights overflow: ONNX Runtime's x86 kernels on CPUs without VNNI
      (AVX2, AVX-512BW) use VPMADDUBSW, and 255 * 127 * 2 > 32767. A quantized model may run on
      any such CPU, so weights then keep to 7 bits ([-63, 63], where 255 * 63 * 2 fits).
    """

    quant_format: QuantFormat = "ort"
    fp16: bool = False
    strongly_typed: bool = False
    saturating_int8_dot: bool = True


# No target: what ONNX Runtime on the CPU, the verification runtime, runs well.
DEFAULT_CAPABILITIES = Capabilities()


@dataclass(frozen=True)
class TargetSpec:
    """The back end a schedule is meant for, with its options (`target ort(...)`) and what it
    declares it runs well."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    capabilities: Capabilities = DEFAULT_CAPABILITIES


def _default_runner_factory(model: Model) -> Runner:
    # Imported here (a lower layer, so no cycle) to keep ONNX Runtime out of the import of
    # passes that never run a model.
    from iropt.verify.runtime import reference_runner

    return reference_runner(model)


def _default_model_profiler() -> ModelProfiler:
    from iropt.verify.profiling import OrtProfiler

    return OrtProfiler()


@dataclass
class PassContext:
    """What a pass may consult besides the model.

    - `target`: the schedule's back end, so lossy passes can pick the right format.
    - `calibration`: where calibration data comes from (a path or `module:function`), if given.
    - `input_shapes`: concrete shapes for dynamic inputs (`--shape name:1x3x224x224`).
    - `runner_factory`: how to run a model (calibration, sensitivity analysis) without a pass
      importing a runtime itself.
    - `model_profiler`: times models on the target runtime (per-node profiles, latencies) for
      passes that choose by measured speed, again without importing a runtime.
    - `progress`: wraps an iterable in a progress bar: `progress(items, "calibrating", total=n)`.
    - `work_dir`: a folder a pass may write scratch files to, or None.
    """

    target: TargetSpec | None = None
    calibration: str | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    runner_factory: RunnerFactory = _default_runner_factory
    model_profiler: ModelProfiler = field(default_factory=_default_model_profiler)
    progress: ProgressFn = no_progress
    work_dir: Path | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("iropt"))

    @property
    def capabilities(self) -> Capabilities:
        """The target's declared capabilities (ONNX Runtime's on the CPU without a target)."""
        return self.target.capabilities if self.target is not None else DEFAULT_CAPABILITIES


class Pass(abc.ABC):
    """A graph rewrite. Subclasses set `kind` and implement `run`.

    Register with `@register_pass("snake_case_name")`; the registry sets `name`. Options are
    keyword-only constructor parameters stored on the instance under their own names.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[PassKind] = PassKind.EXACT

    @abc.abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Rewrite `model` in place and say what changed."""

    def options(self) -> dict[str, Any]:
        """The option values of this instance, by name."""
        from iropt.infra.options import option_specs

        return {spec.name: getattr(self, spec.name) for spec in option_specs(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name or type(self).__name__}({args})"
