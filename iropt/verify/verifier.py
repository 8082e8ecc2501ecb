"""The Verifier: reference outputs computed once, candidates compared against them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from iropt.errors import UserError, VerificationError
from iropt.ir.model import Model
from iropt.util.progress import ProgressFn
from iropt.verify.compare import Comparison, compare, nothing_to_compare
from iropt.verify.criteria import Criterion
from iropt.verify.feeds import Feeds
from iropt.verify.runner import Runner, RunnerFactory
from iropt.verify.runtime import file_runner, reference_runner

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
    With `reference_file` (the file the reference was loaded from), the reference outputs come
    from running that file as it is, not the model as iropt re-encoded it: whatever iropt's
    reading of the file gets wrong then shows as a difference, never as a match.
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
        if not feeds:
            raise UserError("verification needs at least one input sample")
        self._reference = reference.copy()
        self.feeds = list(feeds)
        self.runner_factory = runner_factory
        self.progress = progress
        self.reference_file = reference_file
        self._reference_outputs: list[Outputs] | None = None

    @property
    def reference(self) -> Model:
        """The verifier's own copy of the reference model (never modified)."""
        return self._reference

    def reference_outputs(self) -> list[Outputs]:
        """The reference model's outputs on every feed (computed on the first call)."""
        if self._reference_outputs is None:
            if self.reference_file is not None:
                runner = file_runner(self.reference_file)
            else:
                runner = self.runner_factory(self._reference)
            outputs = self.run(runner, "running the reference")
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
        return self.run(self.runner_factory(model), description)

    def run(self, runner: Runner, description: str = "verifying") -> list[Outputs]:
        """Outputs of `runner` on every feed."""
        feeds: Iterable[Feeds] = self.feeds
        if self.progress is not None:
            feeds = self.progress(self.feeds, description, total=len(self.feeds))
        return [runner.run(feed) for feed in feeds]

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

    def check_outputs(self, outputs: Sequence[Outputs], criterion: Criterion) -> Comparison:
        """Compare outputs already computed (by another back end, say) with the reference."""
        return compare(self.reference_outputs(), outputs, criterion)


