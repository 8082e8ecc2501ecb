"""low_rank: factorize Gemm, MatMul and Conv weights into products of two (or three) thin ones.

`iropt.compress.lowrank` does the work; this pass reads the options, gathers the calibration
statistics and reports. With calibration data the default `whitened` method truncates the SVD
of each weight whitened by its inputs' second moment, so the dropped singular values are the
layer's output error on that data, and the report predicts it before anyone runs the model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from iropt.compress.calibration import limit_rows
from iropt.compress.lowrank.engine import (
    Allocation,
    ConvMethod,
    RankRule,
    apply_rank,
    choose_ranks,
    plan_layer,
    refit,
    summary,
)
from iropt.compress.lowrank.factorize import whitening
from iropt.compress.lowrank.layers import OP_TYPES, Layer, RowSource, find_layer
from iropt.compress.lowrank.moments import Moments, collect_cross_moments, collect_moments
from iropt.errors import OptionError
from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import fresh_names
from iropt.ir.model import Model
from iropt.verify.feeds import iter_feeds

Feeds = dict[str, np.ndarray]
DEFAULT_ENERGY = 0.99


@register_pass("low_rank")
@dataclass(kw_only=True)
class LowRank(Pass):
    """Factorize Gemm/MatMul (K x N -> K x r, r x N) and Conv layers with constant weights.

    Options: `method` whitened (needs calibration data; without it, svd with a warning) | svd;
    `conv_method` channel (k x k Conv to r channels, then 1 x 1) | spatial (k x 1, then 1 x k) |
    tucker (1 x 1, k x k core, 1 x 1); rank rule, one of: `rank` (fixed), `rank_ratio` (of the
    full rank), `energy` (kept fraction of the squared spectrum; 0.99 when nothing is given),
    `params_ratio` (fraction of the considered layers' weights that remain, spread by
    `allocation`: error = least predicted error per parameter saved, uniform = that fraction in
    every layer); `rank_multiple` (ranks are multiples of it, 8); `min_saving` (a layer is
    factorized only when it saves this fraction of its weights); `min_params`; `exclude_nodes`
    (fnmatch patterns on node names), `exclude_op_types`; `calibration` (overrides
    --calibration), `batch_size`, `max_samples`; `damping` (of the input second moment, times
    its mean eigenvalue); `refit` re-solves each layer's last factor for the inputs of the
    factorized network (one more pass over the calibration data). Grouped Convs are left alone.
    """

    kind = PassKind.LOSSY

    method: Literal["whitened", "svd"] = "whitened"
    conv_method: ConvMethod = "channel"
    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    params_ratio: float | None = None
    allocation: Allocation = "error"
    rank_multiple: int = 8
    min_saving: float = 0.1
    min_params: int = 1024
    exclude_nodes: list[str] = field(default_factory=list)
    exclude_op_types: list[str] = field(default_factory=list)
    calibration: str | None = None
    batch_size: int = 32
    max_samples: int | None = None
    damping: float = 0.01
    refit: bool = False

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "rank_ratio", "energy", "params_ratio") if getattr(self, n) is not None]
        if len(given) > 1:
            raise OptionError(f"low_rank: give one of rank, rank_ratio, energy, params_ratio, not {given}")
        for name in ("rank_ratio", "energy", "params_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise OptionError(f"low_rank: {name} must be in (0, 1], got {value}")
        if self.rank is not None and self.rank < 1:
            raise OptionError(f"low_rank: rank must be at least 1, got {self.rank}")
        if self.rank_multiple < 1 or self.batch_size < 1 or self.min_params < 0:
            raise OptionError("low_rank: rank_multiple and batch_size must be >= 1, min_params >= 0")
        if not 0.0 <= self.min_saving < 1.0:
            raise OptionError(f"low_rank: min_saving must be in [0, 1), got {self.min_saving}")
        if self.damping < 0.0:
            raise OptionError(f"low_rank: damping must be >= 0, got {self.damping}")
        unknown = [op for op in self.exclude_op_types if op not in OP_TYPES]
        if unknown:
            raise OptionError(f"low_rank: exclude_op_types {unknown}: only {', '.join(OP_TYPES)} are factorized")

    def rule(self) -> RankRule:
        energy = self.energy
        if all(getattr(self, n) is None for n in ("rank", "rank_ratio", "energy", "params_ratio")):
            energy = DEFAULT_ENERGY
        return RankRule(self.rank, self.rank_ratio, energy, self.params_ratio, self.allocation,
                        self.rank_multiple, self.min_saving)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        layers, skipped = self._layers(model, ctx)
        if not layers:
            ctx.log.info("low_rank: no layer to factorize")
            return PassResult(changed=False, stats={"factorized": 0}, info={"layers": [], "skipped": skipped})
        spec = self.calibration if self.calibration is not None else ctx.calibration
        moments: dict[RowSource, Moments] = {}
        samples = 0
        if spec is not None:
            moments, samples = collect_moments(
                model, list({layer.source: None for layer in layers}), self._feeds(spec, model, ctx),
                ctx.runner_factory, {layer.source: layer.in_features for layer in layers},
                batch_size=self.batch_size, progress=ctx.progress,
            )
        elif self.method == "whitened":
            ctx.log.warning(
                "low_rank: no calibration data (give calibration=... or --calibration); using plain "
                "weight SVD, which minimizes the weight error rather than the output error"
            )
        whiten = self.method == "whitened" and spec is not None
        # One square root per input: a layer's Q, K and V projections read the same tensor.
        roots = {s: whitening(m.second, self.damping) for s, m in moments.items()} if whiten else {}
        plans = [plan_layer(layer, self.conv_method, roots.get(layer.source)) for layer in layers]
        ranks = choose_ranks(plans, self.rule())
        original = model.copy() if self.refit and spec is not None else None
        names = fresh_names([model.graph])
        reports, rewritten = [], []
        for plan, rank in zip(plans, ranks, strict=True):
            if rank is None:
                continue
            nodes, report = apply_rank(model.graph, plan, rank, names, moments.get(plan.layer.source))
            reports.append(report)
            rewritten.append((plan, nodes, report))
        refitted = 0
        if original is not None and rewritten and spec is not None:
            refitted = self._refit(original, model, rewritten, spec, ctx)
        totals = summary(reports, plans)
        _log_report(ctx, reports, totals)
        return PassResult(
            changed=bool(reports),
            stats={"factorized": len(reports), **totals, "refitted": refitted, "calibration_samples": samples},
            info={"layers": reports, "skipped": skipped, "method": "whitened" if whiten else "svd"},
        )

    def _layers(self, model: Model, ctx: PassContext) -> tuple[list[Layer], dict[str, str]]:
        layers: list[Layer] = []
        skipped: dict[str, str] = {}
        for node in model.graph.nodes:
            if node.op not in OP_TYPES or node.op in self.exclude_op_types:
                continue
            label = f"{node.name or node.outputs[0].name} ({node.op})"
            if any(fnmatch.fnmatchcase(node.name or "", p) for p in self.exclude_nodes):
                skipped[label] = "excluded by name"
                continue
            found = find_layer(node)
            if isinstance(found, str):
                skipped[label] = found
            elif found.params < self.min_params:
                skipped[label] = f"{found.params} weights, fewer than min_params={self.min_params}"
            else:
                layers.append(found)
        for label, reason in skipped.items():
            ctx.log.debug("low_rank: %s left whole: %s", label, reason)
        return layers, skipped

    def _feeds(self, spec: str, model: Model, ctx: PassContext) -> Iterator[Feeds]:
        return limit_rows(iter_feeds(spec, model, shapes=ctx.input_shapes), self.max_samples)

    def _refit(self, original: Model, model: Model, rewritten: list[Any], spec: str, ctx: PassContext) -> int:
        sources = list({plan.layer.source: None for plan, _, _ in rewritten})
        dims = {plan.layer.source: plan.layer.in_features for plan, _, _ in rewritten}
        cross = collect_cross_moments(
            original, model, sources, self._feeds(spec, original, ctx), ctx.runner_factory, dims,
            batch_size=self.batch_size, progress=ctx.progress,
        )
        count = 0
        for plan, nodes, report in rewritten:
            if refit(plan, nodes, cross[plan.layer.source], self.damping):
                report["refitted"] = True
                count += 1
        return count


def _log_report(ctx: PassContext, reports: list[dict[str, Any]], totals: dict[str, int]) -> None:
    for r in reports:
        ctx.log.info(
            "low_rank: %-40s rank %-9s energy %.4f  params %d -> %d  MACs %d -> %d  predicted %s error %.4f",
            r["layer"], "x".join(map(str, r["rank"])), r["energy"], r["params_before"], r["params_after"],
            r["macs_before"], r["macs_after"], r["error_kind"], r["predicted_error"],
        )
    ctx.log.info(
        "low_rank: %d layer(s) factorized; weights of the considered layers %d -> %d",
        len(reports), totals["params_before"], totals["params_after"],
    )
