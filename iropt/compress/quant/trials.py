"""Sensitivity trials on the emulation model: a trial is a switch vector and one run over the feeds.

Every trial runs on the one session built for the emulation (`iropt.compress.quant.emulation`),
so a trial costs a model run, not a model copy, a rewrite and a new session. Independent
trials (the layers measured alone) run as Ray tasks when this process is connected to Ray;
each worker builds the emulation's session once and keeps it for the trials it gets.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.compress.calibration import rows_of, with_outputs
from iropt.compress.quant.emulation import SWITCHES, Emulation, NotEmulated
from iropt.compress.sensitivity import Metric, Outputs, score
from iropt.ir.model import Model
from iropt.util.parallel import parallel_map, ray_if_running
from iropt.verify.runner import Runner, RunnerFactory

Feeds = Mapping[str, np.ndarray]


# emulate(observed): a new emulation model whose `observed` tensors keep their names (None: all).
Emulate = Callable[[Collection[str] | None], Emulation]


class EmulatedTrials:
    """Runs the emulation with any set of layers quantized, on `feeds`.

    Two emulation models, each with its session: the one for trials returns the model's outputs
    only and materializes no tensor it does not need (fetching or copying every layer's tensor
    would slow each trial down); the one that also returns the `observed` tensors (for the
    added-noise run) is built when first needed. Both compute the same values. `runs` counts the
    whole-model runs over the feeds (in this process or as tasks). Raises NotEmulated when the
    model cannot be emulated.
    """

    def __init__(
        self, emulate: Emulate, runner_factory: RunnerFactory, feeds: Sequence[Feeds], metric: Metric,
        observed: Sequence[str] = (),
    ) -> None:
        self.emulate = emulate
        self.emulation = emulate(())
        self.runner_factory = runner_factory
        self.feeds = list(feeds)
        self.metric: Metric = metric
        self.observed = list(observed)
        self.runs = 0
        self.sessions = 0
        self._runners: dict[bool, Runner] = {}

    def _runner(self, observing: bool) -> Runner:
        if observing not in self._runners:
            model = _observing(self.emulate(self.observed).model, self.observed) if observing else self.emulation.model
            self._runners[observing] = self.runner_factory(model)
            self.sessions += 1
        return self._runners[observing]

    def outputs(self, quantized: Collection[str], *, observe: bool = False) -> list[dict[str, np.ndarray]]:
        """The emulation's outputs per feed (with the observed tensors when `observe`)."""
        self.runs += 1
        return run_switched(self._runner(observe), self.feeds, self.emulation.switches(quantized))

    def score(self, quantized: Collection[str], reference: Outputs) -> float:
        return _score(reference, self.outputs(quantized), self.metric)

    def scores(self, trials: Sequence[Collection[str]], reference: Outputs) -> list[float]:
        """`score` of each trial: as Ray tasks when Ray is running, else one after another here."""
        if ray_if_running() is None or len(trials) < 2:
            return [self.score(quantized, reference) for quantized in trials]
        job = functools.partial(
            _remote_score, self.emulation.model.to_onnx().SerializeToString(), self.runner_factory,
            self.feeds, reference, self.metric,
        )
        self.runs += len(trials)
        return parallel_map(job, [self.emulation.switches(quantized) for quantized in trials])


@dataclass(frozen=True)
class Emulator:
    """How the quantize pass offers emulation: `emulate(observed)` builds an emulation model (or
    raises NotEmulated); `quantized(only, floats)` names the layers a rewrite with `only` those layers
    (None: all) minus `floats` would quantize, which is the switch vector of that trial."""

    emulate: Emulate
    quantized: Callable[[frozenset[str] | None, frozenset[str]], frozenset[str]]


# build(model, only, floats): rewrite `model` in place, quantizing `only` (None: all) minus `floats`.
Build = Callable[[Model, frozenset[str] | None, frozenset[str]], object]


class SensitivityRuns:
    """Every model run one sensitivity analysis makes, and their count.

    Trials run on the emulation when there is one (`trials`), else on a rewritten copy of the
    model each (a new session each: `real_runs`). The float reference is the model's outputs
    from runs the caller already made, when it has them.
    """

    def __init__(
        self, runner_factory: RunnerFactory, feeds: Sequence[Feeds], outputs: Sequence[str], metric: Metric,
        emulator: Emulator | None, observed: Sequence[str], log: logging.Logger,
    ) -> None:
        self.runner_factory = runner_factory
        self.feeds = list(feeds)
        self.outputs = list(outputs)
        self.metric: Metric = metric
        self.observed = list(observed)
        self.real_runs = 0  # each on a session of its own
        self.reference: list[dict[str, np.ndarray]] = []
        # While the search runs on part of the rows (`narrow`): every row's feeds and reference.
        self._all: tuple[list[Feeds], list[dict[str, np.ndarray]]] | None = None
        self.trials = self._emulate(emulator, log)
        self.emulator = emulator if self.trials is not None else None

    def _emulate(self, emulator: Emulator | None, log: logging.Logger) -> EmulatedTrials | None:
        if emulator is None:
            return None
        try:
            return EmulatedTrials(emulator.emulate, self.runner_factory, self.feeds, self.metric, self.observed)
        except NotEmulated as why:
            log.info("quantize: sensitivity trials rewrite a copy of the model each (no emulation: %s)", why)
            return None

    @property
    def parallel(self) -> bool:
        """Whether independent trials run as parallel tasks (emulated, with Ray running)."""
        return self.trials is not None and ray_if_running() is not None

    @property
    def emulation_runs(self) -> int:
        return self.trials.runs if self.trials is not None else 0

    @property
    def sessions(self) -> int:
        return self.real_runs + (self.trials.sessions if self.trials is not None else 0)

    def float_runs(self, model: Model, known: Sequence[Feeds] | None) -> list[dict[str, np.ndarray]]:
        """The float model's outputs and observed tensors per feed: from `known` (runs made
        already) when they have them all, else from one run (of the emulation with every switch
        off, which is the float model, or of the model itself). Sets `reference`."""
        wanted = {*self.observed, *self.outputs}
        runs: list[dict[str, np.ndarray]] | None = None
        if known is not None and len(known) == len(self.feeds):
            runs = _with_feeds(self.feeds, known)
            runs = runs if all(wanted <= run.keys() for run in runs) else None
        if runs is None:
            runs = self._all_or_nothing(model, None, quantize=False)
        self.reference = [{name: run[name] for name in self.outputs} for run in runs]
        return runs

    def narrow(self, float_runs: Sequence[Mapping[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]] | None:
        """Run the emulated trials on the first `rows` rows from now on, until `widen`; returns
        those rows of `float_runs` (the float model's runs over every feed), or None (and changes
        nothing) when there is no emulation, `rows` is all of them, or the rows cannot be told
        apart in every tensor."""
        if self.trials is None or self._all is not None or rows >= self.rows:
            return None
        sliced = first_rows(self.feeds, float_runs, rows)
        if sliced is None:
            return None
        self._all = (self.feeds, self.reference)
        self.feeds = [dict(feed) for feed, _ in sliced]
        self.trials.feeds = self.feeds
        self.reference = [{name: run[name] for name in self.outputs} for _, run in sliced]
        return [run for _, run in sliced]

    def widen(self) -> None:
        """Back to every row (after `narrow`)."""
        if self._all is not None:
            self.feeds, self.reference = self._all
            self._all = None
            if self.trials is not None:
                self.trials.feeds = self.feeds

    @property
    def rows(self) -> int:
        return sum(rows_of(feed) for feed in self.feeds)

    def quantized_runs(self, model: Model, build: Build) -> list[dict[str, np.ndarray]]:
        """The fully quantized model's outputs and observed tensors per feed."""
        return self._all_or_nothing(model, build, quantize=True)

    def _all_or_nothing(self, model: Model, build: Build | None, *, quantize: bool) -> list[dict[str, np.ndarray]]:
        if self.trials is not None:
            keys = self.trials.emulation.keys if quantize else ()
            return _with_feeds(self.feeds, self.trials.outputs(keys, observe=True))
        candidate = model.copy()
        if build is not None and quantize:
            build(candidate, None, frozenset())
        return _with_feeds(self.feeds, self._run(with_outputs(candidate, self.observed)))

    def score(self, runs: Outputs) -> float:
        return _score(self.reference, runs, self.metric)

    def evaluate(self, model: Model, build: Build, only: frozenset[str] | None, floats: frozenset[str]) -> float:
        """The metric with `only` (None: all) minus `floats` quantized: emulated when possible."""
        if self.trials is not None and self.emulator is not None:
            return self.trials.score(self.emulator.quantized(only, floats), self.reference)
        return self.rewritten(model, build, only, floats)

    def evaluate_many(self, pairs: Sequence[tuple[frozenset[str] | None, frozenset[str]]]) -> list[float]:
        """`evaluate` of independent trials, in parallel where Ray is running (emulation only)."""
        assert self.trials is not None and self.emulator is not None
        return self.trials.scores([self.emulator.quantized(*pair) for pair in pairs], self.reference)

    def rewritten(self, model: Model, build: Build, only: frozenset[str] | None, floats: frozenset[str]) -> float:
        """The metric of a real rewrite of a copy of `model` (a new session and one run)."""
        candidate = model.copy()
        build(candidate, only, floats)
        return _score(self.reference, self._run(candidate), self.metric)

    def _run(self, model: Model) -> list[dict[str, np.ndarray]]:
        runner = self.runner_factory(model)
        self.real_runs += 1
        return [runner.run(feed) for feed in self.feeds]


def _with_feeds(feeds: Sequence[Feeds], runs: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each run's tensors together with the inputs of the feed it ran on."""
    return [{**feed, **run} for feed, run in zip(feeds, runs, strict=True)]


def _observing(model: Model, tensors: Sequence[str]) -> Model:
    """`model` (a fresh emulation, this caller's own) with `tensors` among its outputs, added in
    place: a copy through the proto (`with_outputs`) costs a third of a trial on a detector. Falls
    back to that copy for a tensor that is not a variable of the main graph."""
    graph = model.graph
    variables = graph.tensors()
    if not all(isinstance(variables.get(name), gs.Variable) for name in tensors):
        return with_outputs(model, tensors)
    present = {tensor.name for tensor in graph.outputs}
    for name in tensors:
        if name not in present:
            tensor = variables[name]
            if tensor.dtype is None:
                tensor.dtype = np.float32
            graph.outputs.append(tensor)
            present.add(name)
    return model


def first_rows(
    feeds: Sequence[Feeds], runs: Sequence[Mapping[str, np.ndarray]], rows: int,
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] | None:
    """The first `rows` rows of `feeds` with their `runs` (the feed's inputs and tensors of a run
    over it), slicing the last feed taken; None when some input or tensor of a feed taken does
    not have that feed's rows as its leading dimension (its rows could not be told apart)."""
    taken: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    left = rows
    for feed, run in zip(feeds, runs, strict=True):
        if left <= 0:
            break
        count = rows_of(feed)
        arrays = [*feed.values(), *run.values()]
        if count < 1 or any(np.ndim(a) == 0 or np.shape(a)[0] != count for a in arrays):
            return None
        keep = min(count, left)
        taken.append(({k: v[:keep] for k, v in feed.items()}, {k: v[:keep] for k, v in run.items()}))
        left -= keep
    return taken


def run_switched(runner: Runner, feeds: Sequence[Feeds], switches: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [runner.run({**feed, SWITCHES: switches}) for feed in feeds]


def _score(reference: Outputs, candidate: Outputs, metric: Metric) -> float:
    # The emulation may return observed tensors besides the model's outputs: compare those only.
    outputs = [{name: run[name] for name in ref} for ref, run in zip(reference, candidate, strict=True)]
    return score(reference, outputs, metric)


# A worker process keeps the session of the emulation it last ran (keyed by the model's bytes).
_WORKER_RUNNERS: dict[str, Runner] = {}


def _remote_score(
    serialized: bytes, runner_factory: Callable[[Model], Runner], feeds: Sequence[Feeds], reference: Outputs,
    metric: Metric, switches: np.ndarray,
) -> float:
    digest = hashlib.sha256(serialized).hexdigest()
    if digest not in _WORKER_RUNNERS:
        _WORKER_RUNNERS.clear()
        _WORKER_RUNNERS[digest] = runner_factory(Model.from_onnx(onnx.load_model_from_string(serialized)))
    return _score(reference, run_switched(_WORKER_RUNNERS[digest], feeds, switches), metric)
