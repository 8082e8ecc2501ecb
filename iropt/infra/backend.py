"""The back-end interface: turn a final model into something a serving system runs.

Back ends live in `iropt.lowering` and register with `@register_backend("ort")`. Every back end
offers the same `compile(model) -> Runner` with `run(feeds) -> outputs`, so verification can
check what a back end produced against the original model, and `emit` writes the artefacts a
serving system loads (an ORT-optimized model, a TensorRT engine) next to the optimized ONNX.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

from iropt.infra.pass_base import DEFAULT_CAPABILITIES, Capabilities
from iropt.ir.model import Model
from iropt.verify.runner import Runner


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

    def planned_outputs(self, onnx_path: Path) -> list[Path]:
        """The files `emit` would write for `onnx_path`: checked before any work is done."""
        del onnx_path
        return []

    def check_ready(self) -> None:
        """UserError when `emit` cannot work here (its runtime is not installed); checked before
        any work is done, so a run never writes the model and then fails to emit."""
        return None  # ready wherever iropt runs, unless a back end says otherwise
