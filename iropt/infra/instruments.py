"""Built-in instruments: timing, size deltas, IR dumps and the ONNX checker.

Verification after each pass, checkpoints and bisection are in `iropt.infra.verification`.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx

from iropt.errors import PassError
from iropt.infra.pass_base import PassResult
from iropt.infra.pass_manager import Instrument, PassRecord
from iropt.io.save import save_model
from iropt.io.stream import export_streamed
from iropt.ir.model import GraphStats, Model, graph_stats


class TimingInstrument(Instrument):
    """Wall time of each pass, in `record.seconds`."""

    def __init__(self) -> None:
        self._start = 0.0

    def before_pass(self, record: PassRecord, model: Model) -> None:
        self._start = time.perf_counter()

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        record.seconds = time.perf_counter() - self._start


class SizeInstrument(Instrument):
    """Nodes, parameters and parameter bytes before and after each pass."""

    def __init__(self) -> None:
        self._before: GraphStats | None = None
        self.initial: GraphStats | None = None
        self.final: GraphStats | None = None

    def before_run(self, model: Model) -> None:
        self.initial = graph_stats(model)
        self._before = self.initial

    def before_pass(self, record: PassRecord, model: Model) -> None:
        if self._before is None:
            self._before = graph_stats(model)

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        before = self._before or graph_stats(model)
        # An unchanged model has unchanged sizes; skip the walk over the graph.
        after = graph_stats(model) if result.changed else before
        record.nodes = (before.nodes, after.nodes)
        record.parameters = (before.parameters, after.parameters)
        record.parameter_bytes = (before.parameter_bytes, after.parameter_bytes)
        self._before = after
        self.final = after


class IRDumpInstrument(Instrument):
    """Saves the model after every pass as `NNN_<pass>.onnx` in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def before_run(self, model: Model) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_model(_detached(model), self.folder / "000_input.onnx")

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        save_model(_detached(model), self.folder / f"{record.index:03d}_{record.name}.onnx")


def _detached(model: Model) -> Model:
    # Dumps must never trip the "do not overwrite the input" guard.
    return Model(model.graph, model.metadata, model.doc_string, model.domain, model.model_version)


class CheckerInstrument(Instrument):
    """Runs `onnx.checker` after every pass that changed the model; a failure names the pass."""

    def __init__(self, full_check: bool = False) -> None:
        self.full_check = full_check
        self._previous: list[str] = []

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        if result.changed:
            # Without shape inference the checker needs no tensor data: the skeleton export
            # (large tensors as empty placeholders) spares copying every weight after each pass.
            proto = model.to_onnx() if self.full_check else export_streamed(model).skeleton
            try:
                onnx.checker.check_model(proto, full_check=self.full_check)
            except onnx.checker.ValidationError as error:
                raise PassError(record.name, self._previous, error) from error
        self._previous.append(record.name)

