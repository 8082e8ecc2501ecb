"""Structured channel pruning of a model, end to end: analyze, rank, remove, re-fit, report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from iropt.compress.prune.dependency import Analysis, Group, analyze, static_shapes
from iropt.compress.prune.importance import DATA_CRITERIA, Criterion, Ranked, rank_group
from iropt.compress.prune.reconstruct import reconstruct
from iropt.compress.prune.report import group_rows, layer_rows
from iropt.compress.prune.rewrite import prune_units
from iropt.compress.prune.select import Budget, choose_global, choose_local
from iropt.compress.prune.statistics import Feeds, GramStats, consumer_grams
from iropt.ir.model import Model
from iropt.verify.runner import Runner

FeedFactory = Callable[[], Iterable[Feeds]]


@dataclass(frozen=True)
class PruneSettings:
    budget: Budget
    scope: str = "local"
    importance: Criterion = "l1"
    reconstruct: bool = False
    batch_size: int = 64
    ridge: float = 1e-3
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()


@dataclass
class PruneOutcome:
    removed_channels: int
    pruned_groups: int
    refused_groups: int
    refitted: int
    info: dict[str, Any] = field(default_factory=dict)


def prune_model(
    model: Model,
    settings: PruneSettings,
    *,
    feeds: FeedFactory | None,
    runner_factory: Callable[[Model], Runner],
    log: logging.Logger,
) -> PruneOutcome:
    """Prune `model` in place. `feeds` (calibration data) is needed for data criteria and re-fitting."""
    before_shapes = static_shapes(model)
    before_layers = layer_rows(model, before_shapes)
    analysis = analyze(
        model, shapes=before_shapes, exclude_nodes=settings.exclude_nodes,
        exclude_op_types=settings.exclude_op_types,
    )
    groups = [group for group in analysis.groups if group.units]
    grams: dict[int, GramStats] = {}
    if settings.importance in DATA_CRITERIA and feeds is not None and settings.budget.ratio > 0:
        prunable = {unit.root for group in groups for unit in group.prunable}
        readers = [c.layout for c in analysis.consumers
                   if any(analysis.uf.find(int(a)) in prunable for a in c.atoms)]
        grams = consumer_grams(model, readers, feeds(), runner_factory, settings.batch_size)

    def rank(group: Group, limit: int) -> Ranked:
        return rank_group(analysis, group, settings.importance, grams, limit)

    choose = choose_global if settings.scope == "global" else choose_local
    removed = choose(groups, settings.budget, rank)
    original = model.copy() if settings.reconstruct and removed else None
    kept = prune_units(model.graph, analysis, removed)
    refitted = 0
    if original is not None and feeds is not None:
        refitted = reconstruct(
            original, model, analysis, removed, feeds, runner_factory,
            batch_size=settings.batch_size, ridge=settings.ridge, log=log,
        )
    rows = group_rows(analysis, groups, removed)
    _log_groups(log, rows)
    after_layers = layer_rows(model, static_shapes(model)) if removed else before_layers
    info = {
        "groups": rows,
        "layers": _merge_layers(before_layers, after_layers),
        "kept_channels": {name: indices for name, indices in kept.items() if name},
    }
    return PruneOutcome(
        removed_channels=len(removed),
        pruned_groups=sum(1 for row in rows if row["channels_after"] < row["channels_before"]),
        refused_groups=sum(1 for row in rows if row["refused"] and row["channels_after"] == row["channels_before"]),
        refitted=refitted,
        info=info,
    )


def _merge_layers(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    return [
        {
            "node": name,
            "op": row["op"],
            "params_before": row["params"],
            "params_after": after.get(name, row)["params"],
            "macs_before": row["macs"],
            "macs_after": after.get(name, row)["macs"],
        }
        for name, row in before.items()
    ]


def _log_groups(log: logging.Logger, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        note = f" (kept: {'; '.join(row['refused'])})" if row["refused"] else ""
        log.info(
            "prune_channels: group %s: %d -> %d channels%s",
            row["group"], row["channels_before"], row["channels_after"], note,
        )


def analysis_of(model: Model) -> Analysis:
    """The dependency analysis alone (for inspection and tests)."""
    return analyze(model)
