"""The Pass base class, its result type and the context a pass runs in.

A pass rewrites a `Model` in place and returns a `PassResult`: whether anything changed and
named integer statistics. Its options are typed keyword-only constructor parameters (see
`iropt.options`). A pass is *exact* when its output must match its input within floating-point
tolerance, and *lossy* when it is held to a metric instead (quantization, pruning, low-rank).
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from iropt.model import Model

T = TypeVar("T")


class PassKind(enum.Enum):
    """How a pass's result is verified."""

    EXACT = "exact"
    LOSSY = "lossy"


@dataclass
class PassResult:
    """What a pass did: `changed`, counts such as `{"fused": 12}`, and report-only `info`.

    `info` holds structured data for the JSON report (per-layer tables, kept channel indices);
    it never decides anything in the pass manager.
    """

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, **stats: int) -> PassResult:
        """A result that is `changed` exactly when any statistic is non-zero."""
        return cls(changed=any(stats.values()), stats=dict(stats))


class Runner(Protocol):
    """Anything that runs a model: an ONNX Runtime session, a TensorRT engine."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class TargetSpec:
    """The back end a schedule is meant for, with its options (`target ort(...)`)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


def _no_progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    del description, total
    yield from items


ProgressFn = Callable[..., Iterator[Any]]
RunnerFactory = Callable[[Model], Runner]


def _default_runner_factory(model: Model) -> Runner:
    # Imported here: the reference runner lives with verification, and passes that never run a
    # model should not pay for importing ONNX Runtime.
    from iropt.verify import reference_runner

    return reference_runner(model)


@dataclass
class PassContext:
    """What a pass may consult besides the model.

    - `target`: the schedule's back end, so lossy passes can pick the right format.
    - `calibration`: where calibration data comes from (a path or `module:function`), if given.
    - `input_shapes`: concrete shapes for dynamic inputs (`--shape name:1x3x224x224`).
    - `runner_factory`: how to run a model (calibration, sensitivity analysis) without a pass
      importing a runtime itself.
    - `progress`: wraps an iterable in a progress bar: `progress(items, "calibrating", total=n)`.
    - `work_dir`: a folder a pass may write scratch files to, or None.
    """

    target: TargetSpec | None = None
    calibration: str | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    runner_factory: RunnerFactory = _default_runner_factory
    progress: ProgressFn = _no_progress
    work_dir: Path | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("iropt"))


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
        from iropt.options import option_specs

        return {spec.name: getattr(self, spec.name) for spec in option_specs(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name or type(self).__name__}({args})"
