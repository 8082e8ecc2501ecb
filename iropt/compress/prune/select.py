"""How many units each group loses, and which.

`local` scope removes `ratio` of every group's channels; `global` ranks the units of all groups
together (scores are comparable across groups, see `importance`) and removes `ratio` of all
channels, each group within `max_ratio`. Either way a group keeps at least `min_channels`, and
its kept count is rounded up to a multiple of `round_to` (vectorized kernels such as ONNX
Runtime's NCHWc convolutions and TensorRT's tensor-core tactics want channel counts that are
multiples of 8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from iropt.compress.prune.dependency import Group
from iropt.compress.prune.importance import Ranked


@dataclass(frozen=True)
class Budget:
    ratio: float
    max_ratio: float
    round_to: int
    min_channels: int


def removal_limit(group: Group, budget: Budget, ratio: float) -> int:
    """Units `group` may lose at `ratio`, after min_channels, max_ratio and round_to."""
    total = len(group.units)
    keep = total - round(min(ratio, budget.max_ratio) * total)
    keep = max(keep, min(budget.min_channels, total))
    keep = _rounded_keep(keep, total, budget.round_to)
    return max(0, min(total - keep, len(group.prunable)))


def _rounded_keep(keep: int, total: int, round_to: int) -> int:
    if round_to > 1 and total >= round_to:
        keep = min(total, math.ceil(keep / round_to) * round_to)
    return keep


def choose_local(groups: list[Group], budget: Budget, rank: Callable[[Group, int], Ranked]) -> set[int]:
    removed: set[int] = set()
    for group in groups:
        count = removal_limit(group, budget, budget.ratio)
        if count:
            removed.update(root for root, _ in rank(group, count)[:count])
    return removed


def choose_global(groups: list[Group], budget: Budget, rank: Callable[[Group, int], Ranked]) -> set[int]:
    candidates: list[tuple[float, int, int]] = []
    limits = []
    for index, group in enumerate(groups):
        limit = removal_limit(group, budget, budget.max_ratio)
        limits.append(limit)
        candidates.extend((score, index, root) for root, score in rank(group, limit)[:limit])
    total = sum(len(group.units) for group in groups if group.prunable)
    target = round(budget.ratio * total)
    taken: list[list[tuple[float, int]]] = [[] for _ in groups]
    count = 0
    for score, index, root in sorted(candidates, key=lambda item: (item[0], item[1], item[2])):
        if count >= target:
            break
        if len(taken[index]) < limits[index]:
            taken[index].append((score, root))
            count += 1
    removed: set[int] = set()
    for group, chosen in zip(groups, taken, strict=False):
        size = len(group.units)
        keep = _rounded_keep(size - len(chosen), size, budget.round_to)
        # Rounding up the kept count gives back the most important of the chosen units.
        removed.update(root for _, root in chosen[: size - keep])
    return removed
