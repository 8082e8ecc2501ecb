"""How much each channel unit matters: the order in which a group's units are removed.

Weight criteria (no data):
- `l1` / `l2`: the norm of the unit's producer filters (all producers of the unit, summed).
- `bn_gamma`: |gamma| of the BatchNormalization nodes on the unit's channels (l1 where a group has
  none).

Data criteria, from each consumer's input second moment `M = E[x x^T]` on calibration data:
- `activation`: the energy the unit sends into its consumers, `sum_j M_jj ||W[:, j]||^2` over its
  weight columns j, each consumer normalized by its output energy `tr(W M W^T)`.
- `output_error`: the consumers' output error when the unit is removed and the remaining columns
  compensate optimally (Optimal Brain Surgeon on a block of columns B):
  `dE = tr(W_B [H^-1]_BB^-1 W_B^T)` with `H = M + lambda I`, summed over the consumers (each
  normalized by its output energy). Units are removed greedily, one at a time, updating `W` and
  `H^-1` after each removal (`W -= W_B S H^-1_B:`, `H^-1 -= H^-1_:B S H^-1_B:`, `S = [H^-1]_BB^-1`),
  so the error of a unit accounts for the ones already removed.

Every function returns the units of one group in removal order (least important first) with a
score; scores of different groups are comparable for global ranking (weight criteria are divided
by their group's mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from iropt.compress.prune.dependency import Analysis, Group
from iropt.compress.prune.statistics import GramStats, kernel_size
from iropt.ir.graph import is_op

Criterion = Literal["l1", "l2", "bn_gamma", "activation", "output_error"]
CRITERIA: tuple[str, ...] = ("l1", "l2", "bn_gamma", "activation", "output_error")
DATA_CRITERIA = frozenset({"activation", "output_error"})
# Damping of H for output_error, relative to the mean diagonal of M.
OBS_DAMPING = 1e-2
TINY = 1e-12

Ranked = list[tuple[int, float]]


def rank_group(
    analysis: Analysis, group: Group, criterion: Criterion, grams: dict[int, GramStats], limit: int
) -> Ranked:
    """The group's prunable units, least important first, with scores (at most `limit` for greedy)."""
    units = [unit.root for unit in group.prunable]
    if not units:
        return []
    if criterion == "output_error":
        return _greedy_output_error(analysis, group, grams, limit)
    if criterion == "activation":
        scores = _activation(analysis, group, grams)
    elif criterion == "bn_gamma":
        scores = _bn_gamma(analysis, group) or _normalized(_weight_norm(analysis, group, 1))
    else:
        scores = _normalized(_weight_norm(analysis, group, 1 if criterion == "l1" else 2))
    return sorted(((root, scores.get(root, 0.0)) for root in units), key=lambda item: (item[1], item[0]))


def _normalized(scores: dict[int, float]) -> dict[int, float]:
    mean = float(np.mean(list(scores.values()))) if scores else 0.0
    return {root: value / mean for root, value in scores.items()} if mean > 0 else scores


def _weight_norm(analysis: Analysis, group: Group, order: int) -> dict[int, float]:
    sums: dict[int, float] = {}
    members = {id(node) for node in group.producers}
    for producer in analysis.producers:
        if id(producer.layout.node) not in members:
            continue
        layout = producer.layout
        weight = np.moveaxis(layout.weight, layout.out_axis, 0).reshape(len(producer.atoms), -1)
        norms = np.abs(weight).sum(axis=1) if order == 1 else (weight.astype(np.float64) ** 2).sum(axis=1)
        for atom, value in zip(producer.atoms, norms, strict=False):
            root = analysis.uf.find(int(atom))
            sums[root] = sums.get(root, 0.0) + float(value)
    return sums if order == 1 else {root: float(np.sqrt(v)) for root, v in sums.items()}


def _bn_gamma(analysis: Analysis, group: Group) -> dict[int, float]:
    roots = {unit.root for unit in group.units}
    sums: dict[int, float] = {}
    for holder in analysis.holders:
        if not is_op(holder.node, "BatchNormalization") or holder.input_index != 1:
            continue
        gamma = np.abs(np.asarray(holder.node.inputs[1].values, dtype=np.float64)).ravel()
        for atom, value in zip(holder.atoms, gamma, strict=False):
            root = analysis.uf.find(int(atom))
            if root in roots:
                sums[root] = sums.get(root, 0.0) + float(value)
    return _normalized(sums)


@dataclass
class _ConsumerState:
    """One consumer of the group: its weight matrix, damped inverse Hessian and column blocks."""

    weight: np.ndarray  # [out, K]
    moment: np.ndarray  # M = E[x x^T], [K, K]
    energy: float
    blocks: dict[int, np.ndarray]  # unit root -> weight columns


def _consumer_states(analysis: Analysis, group: Group, grams: dict[int, GramStats]) -> list[_ConsumerState]:
    roots = {unit.root for unit in group.prunable}
    states = []
    for consumer in analysis.consumers:
        gram = grams.get(id(consumer.layout.node))
        if gram is None:
            continue
        per_channel = kernel_size(consumer.layout) if is_op(consumer.layout.node, "Conv") else 1
        blocks: dict[int, list[int]] = {}
        for position, atom in enumerate(consumer.atoms):
            root = analysis.uf.find(int(atom))
            if root in roots:
                blocks.setdefault(root, []).extend(range(position * per_channel, (position + 1) * per_channel))
        if not blocks:
            continue
        weight = consumer.layout.as_matrix(consumer.layout.weight).astype(np.float64)
        moment = gram.second_moment
        energy = float(np.einsum("ij,jk,ik->", weight, moment, weight)) + TINY
        states.append(_ConsumerState(weight, moment, energy, {r: np.array(c) for r, c in blocks.items()}))
    return states


def _activation(analysis: Analysis, group: Group, grams: dict[int, GramStats]) -> dict[int, float]:
    scores: dict[int, float] = {}
    for state in _consumer_states(analysis, group, grams):
        column_energy = np.diag(state.moment) * (state.weight**2).sum(axis=0) / state.energy
        for root, columns in state.blocks.items():
            scores[root] = scores.get(root, 0.0) + float(column_energy[columns].sum())
    return {root: float(np.sqrt(value)) for root, value in scores.items()}


def _greedy_output_error(analysis: Analysis, group: Group, grams: dict[int, GramStats], limit: int) -> Ranked:
    states = _consumer_states(analysis, group, grams)
    units = [unit.root for unit in group.prunable]
    if not states:
        # No consumer saw data (a group read only by ops we cannot model): fall back to l1.
        scores = _normalized(_weight_norm(analysis, group, 1))
        return sorted(((r, scores.get(r, 0.0)) for r in units), key=lambda item: (item[1], item[0]))
    inverses = []
    for state in states:
        damping = OBS_DAMPING * float(np.mean(np.diag(state.moment))) + TINY
        inverses.append(np.linalg.inv(state.moment + damping * np.eye(len(state.moment))))
    layouts = [_BlockLayout.of(state, units) for state in states]
    alive = np.ones(len(units), dtype=bool)
    order: Ranked = []
    while alive.any() and len(order) < limit:
        errors = np.zeros(len(units))
        for state, inverse, blocks in zip(states, inverses, layouts, strict=True):
            blocks.add_errors(errors, state, inverse)
        errors[~alive] = np.inf
        chosen = int(np.argmin(errors))
        for state, inverse in zip(states, inverses, strict=True):
            columns = state.blocks.get(units[chosen])
            if columns is not None:
                _remove_block(state, inverse, columns)
        order.append((units[chosen], float(errors[chosen])))
        alive[chosen] = False
    return order


@dataclass
class _BlockLayout:
    """A consumer's unit blocks split into single columns (vectorized) and wider blocks."""

    single_units: np.ndarray
    single_columns: np.ndarray
    wide: list[tuple[int, np.ndarray]]

    @classmethod
    def of(cls, state: _ConsumerState, units: list[int]) -> _BlockLayout:
        singles: list[tuple[int, int]] = []
        wide: list[tuple[int, np.ndarray]] = []
        for index, root in enumerate(units):
            columns = state.blocks.get(root)
            if columns is None:
                continue
            if len(columns) == 1:
                singles.append((index, int(columns[0])))
            else:
                wide.append((index, columns))
        pairs = np.array(singles, dtype=np.int64).reshape(-1, 2)
        return cls(pairs[:, 0], pairs[:, 1], wide)

    def add_errors(self, errors: np.ndarray, state: _ConsumerState, inverse: np.ndarray) -> None:
        if len(self.single_columns):
            columns = self.single_columns
            diagonal = np.maximum(np.diag(inverse)[columns], TINY)
            np.add.at(errors, self.single_units, (state.weight[:, columns] ** 2).sum(axis=0) / diagonal / state.energy)
        for index, columns in self.wide:
            errors[index] += _block_error(state.weight, inverse, columns) / state.energy


def _block_error(weight: np.ndarray, inverse: np.ndarray, columns: np.ndarray) -> float:
    block = inverse[np.ix_(columns, columns)]
    w = weight[:, columns]
    if len(columns) == 1:
        return float((w**2).sum() / max(block[0, 0], TINY))
    solved = np.linalg.solve(block + TINY * np.eye(len(columns)), w.T)
    return float(np.einsum("oj,jo->", w, solved))


def _remove_block(state: _ConsumerState, inverse: np.ndarray, columns: np.ndarray) -> None:
    """Compensate the removal of `columns` in the remaining weights and downdate H^-1 (in place)."""
    block = inverse[np.ix_(columns, columns)] + TINY * np.eye(len(columns))
    rows = inverse[columns, :]
    solved = np.linalg.solve(block, rows)  # S H^-1_B:
    state.weight -= state.weight[:, columns] @ solved
    inverse -= inverse[:, columns] @ solved
    state.weight[:, columns] = 0.0
