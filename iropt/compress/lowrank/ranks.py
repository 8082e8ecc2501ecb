"""What each layer could become, and which rank each one gets.

A `Plan` holds one layer's decomposition and, for every candidate rank, the parameters it would
keep and its predicted relative squared error (the discarded share of its spectrum: of output
energy for whitened spectra, of weight energy otherwise). Candidate ranks are multiples of
`multiple` below the full rank; a layer is factorized only when it saves at least `min_saving`
of its parameters.

Global budgets (`params_ratio` with allocation "error") are met greedily: starting from every
layer whole, repeatedly take the move, over all layers and all lower ranks, with the least added
error per parameter saved, until the kept parameters fit the budget. Looking past the next rank
lets a layer whose error curve has a knee jump over it instead of stalling. The last move can
overshoot the budget by a whole rank step of a large layer; what it overshoots is then spent
again on raising ranks where that buys the most error back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from iropt.compress.lowrank.factorize import Spectrum, Tucker, spatial_to_conv, tucker_to_conv
from iropt.compress.lowrank.layers import Layer

Form = Literal["matrix", "spatial", "tucker"]
Rank = tuple[int, ...]  # (r,) for matrix and spatial forms, (r_out, r_in) for Tucker-2


def round_up(value: float, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


@dataclass
class Plan:
    """One layer, the form it would take, and its spectrum (matrix, spatial) or Tucker modes."""

    layer: Layer
    form: Form
    spectrum: Spectrum | None = None
    modes: Tucker | None = None

    # --- sizes -------------------------------------------------------------------------------

    def params(self, rank: Rank) -> int:
        if self.form == "tucker":
            r_out, r_in = rank
            cout, cin = self.layer.weight.shape[:2]
            kernel = int(np.prod(self.layer.weight.shape[2:]))
            return int(cin * r_in + r_in * r_out * kernel + r_out * cout)
        assert self.spectrum is not None
        rows, columns = self.spectrum.left.shape[0], self.spectrum.right.shape[1]
        return int(rank[0] * (rows + columns))

    def saves(self, rank: Rank, min_saving: float) -> bool:
        return self.params(rank) <= (1.0 - min_saving) * self.layer.params

    def full(self) -> Rank:
        if self.form == "tucker":
            cout, cin = self.layer.weight.shape[:2]
            return (int(cout), int(cin))
        assert self.spectrum is not None
        return (self.spectrum.full_rank,)

    # --- quality -----------------------------------------------------------------------------

    def error(self, rank: Rank) -> float:
        """Predicted relative squared error at `rank` (share of the spectrum's energy dropped)."""
        return 1.0 - self.energy(rank)

    def energy(self, rank: Rank) -> float:
        if self.form == "tucker":
            assert self.modes is not None
            return self.modes.energy((rank[0], rank[1]))
        assert self.spectrum is not None
        return self.spectrum.energy(rank[0])

    def approx_matrix(self, rank: Rank) -> np.ndarray:
        """The truncated weight as the layer's K x N matrix (what its output error is computed from)."""
        if self.form == "tucker":
            assert self.modes is not None
            weight = tucker_to_conv(*self.modes.factors((rank[0], rank[1])))
        else:
            assert self.spectrum is not None
            a, b = self.spectrum.factors(rank[0])
            if self.form == "matrix":
                return a @ b
            weight = spatial_to_conv(a @ b, tuple(self.layer.weight.shape))
        return weight.reshape(weight.shape[0], -1).T

    # --- candidates --------------------------------------------------------------------------

    def candidates(self, multiple: int, min_saving: float) -> list[Rank]:
        """Ranks that save at least `min_saving`, most parameters first."""
        full = self.full()
        if self.form == "tucker":
            widest = max(full)
            ranks = {
                tuple(min(f, round_up(step * f / widest, multiple)) for f in full)
                for step in range(multiple, widest + multiple, multiple)
            }
        else:
            ranks = {(r,) for r in range(multiple, full[0], multiple)}
        usable = [r for r in ranks if r != full and self.saves(r, min_saving)]
        return sorted(usable, key=self.params, reverse=True)

    def rounded(self, wanted: Sequence[float], multiple: int) -> Rank:
        """`wanted` per mode rounded up to `multiple`, at most full."""
        return tuple(min(f, round_up(w, multiple)) for w, f in zip(wanted, self.full(), strict=True))

    def rank_for_ratio(self, ratio: float, multiple: int) -> Rank:
        return self.rounded([ratio * f for f in self.full()], multiple)

    def rank_for_energy(self, energy: float, multiple: int) -> Rank:
        """The least rank (every multiple of 1) keeping `energy` of the spectrum, rounded up."""
        full = self.full()
        if self.form == "tucker":
            for step in range(1, max(full) + 1):
                rank = tuple(min(f, math.ceil(step * f / max(full))) for f in full)
                if self.energy(rank) >= energy:
                    return self.rounded(rank, multiple)
            return full
        for r in range(1, full[0] + 1):
            if self.energy((r,)) >= energy:
                return self.rounded([r], multiple)
        return full


def allocate(plans: Sequence[Plan], ratio: float, multiple: int, min_saving: float) -> list[Rank | None]:
    """Ranks (None: left whole) keeping about `ratio` of the plans' parameters at least added error."""
    options = [plan.candidates(multiple, min_saving) for plan in plans]
    params = [[plan.params(r) for r in opts] for plan, opts in zip(plans, options, strict=True)]
    errors = [[plan.error(r) for r in opts] for plan, opts in zip(plans, options, strict=True)]
    state = [-1] * len(plans)  # index into options; -1 = whole
    current = [plan.layer.params for plan in plans]
    current_error = [0.0] * len(plans)
    budget = ratio * sum(current)
    total = sum(current)
    while total > budget:
        best: tuple[float, int, int] | None = None
        for index in range(len(plans)):
            for choice in range(state[index] + 1, len(options[index])):
                saved = current[index] - params[index][choice]
                if saved <= 0:
                    continue
                slope = (errors[index][choice] - current_error[index]) / saved
                if best is None or slope < best[0]:
                    best = (slope, index, choice)
        if best is None:
            break
        _, index, choice = best
        total -= current[index] - params[index][choice]
        state[index], current[index] = choice, params[index][choice]
        current_error[index] = errors[index][choice]
    _give_back(plans, params, errors, state, current, current_error, budget - total)
    return [options[i][s] if s >= 0 else None for i, s in enumerate(state)]


def _give_back(
    plans: Sequence[Plan],
    params: list[list[int]],
    errors: list[list[float]],
    state: list[int],
    current: list[int],
    current_error: list[float],
    slack: float,
) -> None:
    """Spend what the last (coarse) move saved beyond the budget on higher ranks, most error back first.

    Only raises ranks and only while the budget holds, so it ends and never breaks the budget.
    """
    while True:
        best: tuple[float, int, int] | None = None
        for index, plan in enumerate(plans):
            for choice in range(-1, state[index]):  # every state with more parameters; -1 = whole
                more = (plan.layer.params if choice < 0 else params[index][choice]) - current[index]
                if more <= 0 or more > slack:
                    continue
                gain = (current_error[index] - (0.0 if choice < 0 else errors[index][choice])) / more
                if best is None or gain > best[0]:
                    best = (gain, index, choice)
        if best is None:
            return
        _, index, choice = best
        after = plans[index].layer.params if choice < 0 else params[index][choice]
        slack -= after - current[index]
        state[index], current[index] = choice, after
        current_error[index] = 0.0 if choice < 0 else errors[index][choice]
