"""The back-end interface: turn a final model into something a serving system runs.

Back ends live in `iropt.lowering` and register with `@register_backend("ort")`. Every back end
offers the same `compile(model) -> Runner` with `run(feeds) -> outputs`, so verification can
check what a back end produced against the original model, and `emit` writes the artefacts a
serving system loads (an ORT-optimized model, a TensorRT engine) next to the optimized ONNX.

`iropt run` calls `stage` before it writes the optimized model: a back end whose artefact can
fail to build (a TensorRT engine) builds it there, in memory, so a failed build leaves nothing
written; `StagedArtefacts.write` then writes it after the model.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from iropt.infra.pass_base import DEFAULT_CAPABILITIES, Capabilities
from iropt.ir.model import Model
from iropt.verify.criteria import Criterion
from iropt.verify.feeds import ShapeRange
from iropt.verify.runner import Runner

# Called as progress(phase, steps_done, steps_total) during long builds.
BuildProgress = Callable[[str, int, int], None]


@dataclass
class EmitContext:
    """What the run knows that a back end's build may use."""

    # `--shape` ranges by input name (TensorRT optimization profiles).
    shape_ranges: Mapping[str, ShapeRange] = field(default_factory=dict)
    # The input model, for checking the built artefact against it where it can run here.
    reference: Model | None = None
    criterion: Criterion | None = None
    progress: BuildProgress | None = None


@dataclass
class StagedArtefacts:
    """Artefacts built (in memory) and not yet written, with what the build found out."""

    write: Callable[[], list[Path]]
    # For the JSON report, under "target".
    report: dict[str, Any] = field(default_factory=dict)
    # Lines for the command line's output.
    lines: list[str] = field(default_factory=list)
    # The file a serving system loads instead of the ONNX model (a TensorRT plan), if any.
    serving_bytes: bytes | None = None


class Backend(abc.ABC):
    """A target: options are typed keyword-only constructor parameters, like a pass's."""

    name: ClassVar[str] = ""
    # What lossy passes read to pick formats (the schedule's `target` carries it to them).
    capabilities: ClassVar[Capabilities] = DEFAULT_CAPABILITIES

    @abc.abstractmethod
    def compile(self, model: Model) -> Runner:
        """Build a runnable object (session, engine) for `model`."""

    def emit(self, model: Model, onnx_path: Path) -> list[Path]:
        """Write the back end's own artefacts beside `onnx_path`; returns the files written."""
        del model, onnx_path
        return []

    def check_inputs(self, model: Model, context: EmitContext) -> None:
        """Refuse, before any work, what `stage` would refuse about the model's inputs."""
        del model, context

    def stage(self, model: Model, onnx_path: Path, context: EmitContext) -> StagedArtefacts:
        """Build what `emit` writes without writing it; by default everything is done by `emit`."""
        del context
        return StagedArtefacts(write=lambda: self.emit(model, onnx_path))

    def planned_outputs(self, onnx_path: Path) -> list[Path]:
        """The files `emit` would write for `onnx_path`: checked before any work is done."""
        del onnx_path
        return []

    def check_ready(self) -> None:
        """UserError when `emit` cannot work here (its runtime is not installed); checked before
        any work is done, so a run never writes the model and then fails to emit."""
        return None  # ready wherever iropt runs, unless a back end says otherwise
