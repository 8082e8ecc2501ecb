"""The Verifier: reference outputs computed once, candidates compared against them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from iropt.errors import UserError, VerificationError
from iropt.io.load import load_model
from iropt.ir.model import Model
from iropt.util.progress import ProgressFn
from iropt.verify.compare import Comparison, compare, nothing_to_compare
from iropt.verify.criteria import Criterion
from iropt.verify.feeds import Feeds
from iropt.verify.runner import Runner, RunnerFactory
from iropt.verify.runtime import reference_runner

Outputs = dict[str, np.ndarray]

# --- verifier ---------------------------------------------------------------------------


class ComparisonFailed(VerificationError):
    """A failed check, with its comparison (None when the candidate could not be run)."""

    def __init__(self, message: str, comparison: Comparison | None) -> None:
        super().__init__(message)
        self.comparison = comparison


class Verifier:
    """Runs models on fixed feeds and compares them with the reference model's outputs.

    The reference is copied when the Verifier is made, so rewriting the same Model object in
    place afterwards does not change the reference; its outputs are computed once, on first use.
    """

    def __init__(
        self,
        reference: Model,
        feeds: Sequence[Feeds],
        *,
        runner_factory: RunnerFactory = reference_runner,
        progress: ProgressFn | None = None,
        reference_file: Path | None = None,
    ) -> None:
        """`reference_file`: the file `reference` was read from, unchanged. Then no copy is kept:
        the reference runs from the file (ONNX Runtime reads its weights, iropt encodes nothing),
        and is read again only if bisection needs it. A large model is held once, not twice."""
        if not feeds:
            raise UserError("verification needs at least one input sample")
        self._reference_file = reference_file
        self._reference: Model | None = None if reference_file is not None else reference.copy()
        self.feeds = list(feeds)
        self.runner_factory = runner_factory
        self.progress = progress
        self._reference_outputs: list[Outputs] | None = None
        # Wall time spent running models and comparing, over the verifier's life.
        self.seconds = 0.0

    @property
    def reference(self) -> Model:
        """The verifier's own copy of the reference model (never modified)."""
        if self._reference is None:
            assert self._reference_file is not None
            self._reference = load_model(self._reference_file)
        return self._reference

    def reference_outputs(self) -> list[Outputs]:
        """The reference model's outputs on every feed (computed on the first call)."""
        if self._reference_outputs is None:
            reference_file = self._reference_file
            make_runner: Callable[[], Runner]
            if reference_file is not None and self.runner_factory is reference_runner:
                make_runner = lambda: reference_runner(reference_file)  # noqa: E731
            else:
                make_runner = lambda: self.runner_factory(self.reference)  # noqa: E731
            outputs = self._run(make_runner, "running the reference")
            vacuous = nothing_to_compare(outputs)
            if vacuous:
                raise VerificationError(
                    f"verification would compare nothing: {'; '.join(vacuous)}; give inputs the "
                    "model computes something on (check --shape or --inputs)"
                )
            self._reference_outputs = outputs
        return self._reference_outputs

    def outputs_of(self, model: Model, description: str = "verifying") -> list[Outputs]:
        """Outputs of `model` on every feed (UserError when the runtime cannot run it)."""
        return self._run(lambda: self.runner_factory(model), description)

    def run(self, runner: Runner, description: str = "verifying") -> list[Outputs]:
        """Outputs of `runner` (another model file, a back end's build) on every feed."""
        return self._run(lambda: runner, description)

    def _run(self, make_runner: Callable[[], Runner], description: str) -> list[Outputs]:
        """Run every feed through the runner `make_runner` builds; the time goes to `seconds`."""
        start = time.perf_counter()
        try:
            runner = make_runner()
            feeds: Iterable[Feeds] = self.feeds
            if self.progress is not None:
                feeds = self.progress(self.feeds, description, total=len(self.feeds))
            return [runner.run(feed) for feed in feeds]
        finally:
            self.seconds += time.perf_counter() - start

    def candidate_outputs(self, model: Model, what: str = "the transformed model") -> list[Outputs]:
        """Like `outputs_of`, but a model the runtime refuses is a VerificationError about `what`."""
        # The reference ran, so a candidate the runtime rejects was broken by a rewrite.
        self.reference_outputs()  # run the reference first: its errors are the user's
        try:
            return self.outputs_of(model)
        except UserError as error:
            raise ComparisonFailed(f"{what} cannot be run: {error}", None) from error

    def check(self, model: Model, criterion: Criterion) -> Comparison:
        """Compare `model` with the reference on the feeds."""
        return self.check_outputs(self.candidate_outputs(model), criterion)

    def check_file(self, path: Path, criterion: Criterion, what: str = "the written model") -> Comparison:
        """Compare the model file at `path` with the reference on the feeds.

        ONNX Runtime reads the file itself, external data included, so no graph of the model
        need be in memory beside the runtime's copy of it."""
        self.reference_outputs()
        make_runner: Callable[[], Runner]
        if self.runner_factory is reference_runner:
            make_runner = lambda: reference_runner(path)  # noqa: E731
        else:
            make_runner = lambda: self.runner_factory(load_model(path))  # noqa: E731
        try:
            outputs = self._run(make_runner, f"verifying {what}")
        except UserError as error:
            raise ComparisonFailed(f"{what} cannot be run: {error}", None) from error
        return self.check_outputs(outputs, criterion)

    def check_outputs(self, outputs: Sequence[Outputs], criterion: Criterion) -> Comparison:
        """Compare outputs already computed (by another back end, say) with the reference."""
        reference = self.reference_outputs()
        start = time.perf_counter()
        try:
            return compare(reference, outputs, criterion)
        finally:
            self.seconds += time.perf_counter() - start


