"""Low-rank factorization of a model: plan each layer, choose ranks, rewrite, re-fit, report.

`plan_layer` decomposes one layer (whitened when input moments are given), `choose_ranks` applies
one of the rank rules, `apply_rank` rewrites the graph and returns the layer's report, and
`refit` re-solves the last factor of each rewritten layer for the inputs the factorized network
actually feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.lowrank.factorize import (
    Whitening,
    output_error,
    plain_spectrum,
    spatial_matrix,
    spatial_weights,
    tucker,
    whitened_spectrum,
)
from iropt.compress.lowrank.layers import Layer
from iropt.compress.lowrank.moments import CrossMoments, Moments
from iropt.compress.lowrank.ranks import Plan, Rank, allocate
from iropt.compress.lowrank.rewrite import (
    replace_conv_matrix,
    replace_conv_spatial,
    replace_conv_tucker,
    replace_matrix,
)

ConvMethod = Literal["channel", "spatial", "tucker"]
Allocation = Literal["error", "uniform"]


def plan_layer(layer: Layer, conv_method: ConvMethod, white: Whitening | None) -> Plan:
    """The layer's decomposition: whitened by `white` when given (matrix forms), plain otherwise.

    A Conv whose kernel is 1 x 1 (or 1-D for `spatial`) takes the matrix form whatever
    `conv_method` says: the other forms would not be smaller.
    """
    weight = layer.weight
    if layer.kind == "conv" and int(np.prod(weight.shape[2:])) > 1:
        if conv_method == "tucker":
            return Plan(layer, "tucker", modes=tucker(weight))
        if conv_method == "spatial" and weight.ndim == 4 and min(weight.shape[2:]) > 1:
            return Plan(layer, "spatial", spectrum=plain_spectrum(spatial_matrix(weight)))
    if white is not None:
        return Plan(layer, "matrix", spectrum=whitened_spectrum(layer.matrix, white))
    return Plan(layer, "matrix", spectrum=plain_spectrum(layer.matrix))


@dataclass(frozen=True)
class RankRule:
    """How ranks are chosen: exactly one of rank, rank_ratio, energy, params_ratio is set."""

    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    params_ratio: float | None = None
    allocation: Allocation = "error"
    multiple: int = 8
    min_saving: float = 0.1


def choose_ranks(plans: Sequence[Plan], rule: RankRule) -> list[Rank | None]:
    """A rank per plan, or None where the layer stays whole (it would not save `min_saving`)."""
    if rule.params_ratio is not None:
        if rule.allocation == "error":
            return allocate(plans, rule.params_ratio, rule.multiple, rule.min_saving)
        return [_uniform(plan, rule) for plan in plans]
    chosen: list[Rank | None] = []
    for plan in plans:
        if rule.rank is not None:
            rank = plan.rounded([rule.rank] * len(plan.full()), rule.multiple)
        elif rule.rank_ratio is not None:
            rank = plan.rank_for_ratio(rule.rank_ratio, rule.multiple)
        else:
            assert rule.energy is not None
            rank = plan.rank_for_energy(rule.energy, rule.multiple)
        chosen.append(rank if rank != plan.full() and plan.saves(rank, rule.min_saving) else None)
    return chosen


def _uniform(plan: Plan, rule: RankRule) -> Rank | None:
    """The largest candidate rank keeping at most `params_ratio` of this layer's parameters."""
    assert rule.params_ratio is not None
    limit = rule.params_ratio * plan.layer.params
    fitting = [r for r in plan.candidates(rule.multiple, rule.min_saving) if plan.params(r) <= limit]
    return fitting[0] if fitting else None


def apply_rank(
    graph: gs.Graph,
    plan: Plan,
    rank: Rank,
    names: Callable[[str], str],
    moments: Moments | None,
) -> tuple[list[gs.Node], dict[str, Any]]:
    """Rewrite the layer at `rank`; the new nodes and the layer's report."""
    layer = plan.layer
    if plan.form == "tucker":
        assert plan.modes is not None
        nodes = replace_conv_tucker(graph, layer, *plan.modes.factors((rank[0], rank[1])), names)
    else:
        assert plan.spectrum is not None
        a, b = plan.spectrum.factors(rank[0])
        if plan.form == "spatial":
            nodes = replace_conv_spatial(graph, layer, *spatial_weights(a, b, tuple(layer.weight.shape)), names)
        elif layer.kind == "conv":
            nodes = replace_conv_matrix(graph, layer, a, b, names)
        else:
            nodes = replace_matrix(graph, layer, a, b, names)
    return nodes, layer_report(plan, rank, moments)


def layer_report(plan: Plan, rank: Rank, moments: Moments | None) -> dict[str, Any]:
    """Rank, energy, parameters and MACs before and after, predicted relative error.

    With input moments the error is the relative RMS change of the layer's output on the
    calibration inputs, computed exactly from the truncated weight; without them it is the
    relative weight error (the Frobenius norm of the change over the weight's).
    """
    layer = plan.layer
    after = plan.params(rank)
    report: dict[str, Any] = {
        "layer": layer.label,
        "form": plan.form,
        "rank": list(rank),
        "full_rank": list(plan.full()),
        "energy": plan.energy(rank),
        "params_before": layer.params,
        "params_after": after,
        "macs_before": layer.params * layer.positions,
        "macs_after": after * layer.positions,
    }
    if moments is not None:
        error, signal = output_error(
            layer.matrix, plan.approx_matrix(rank), moments.second, moments.mean, layer.bias
        )
        report["predicted_error"] = math.sqrt(error / signal) if signal > 0 else 0.0
        report["error_kind"] = "output"
    else:
        report["predicted_error"] = math.sqrt(max(plan.error(rank), 0.0))
        report["error_kind"] = "weight"
    return report


def refit(plan: Plan, nodes: Sequence[gs.Node], cross: CrossMoments, damping: float) -> bool:
    """Re-solve the last factor B for the inputs `x~` the factorized network gives this layer.

    With the first factor A fixed, B = argmin E||x~ A B - x W||^2 =
    (A^T E[x~ x~^T] A)^-1 A^T E[x~ x^T] W, damped like the whitening. Matrix forms only; False
    when the layer has another form or saw no rows.
    """
    if plan.form != "matrix" or cross.count == 0:
        return False
    first, last = nodes[0].inputs[1], nodes[-1].inputs[1]
    assert isinstance(first, gs.Constant) and isinstance(last, gs.Constant)
    a = np.asarray(first.values, dtype=np.float64)
    a = a.reshape(a.shape[0], -1).T if plan.layer.kind == "conv" else a
    gram = a.T @ (cross.gram / cross.count) @ a
    gram += np.eye(gram.shape[0]) * damping * float(np.trace(gram)) / gram.shape[0]
    target = a.T @ (cross.cross / cross.count) @ plan.layer.matrix
    b = np.linalg.solve(gram, target)
    if plan.layer.kind == "conv":
        b = b.T.reshape(last.values.shape)
    last.values = np.ascontiguousarray(b.astype(plan.layer.weight.dtype))
    return True


def summary(reports: Sequence[Mapping[str, Any]], plans: Sequence[Plan]) -> dict[str, int]:
    """Parameter totals over the considered layers: before, and after the chosen ranks."""
    before = sum(plan.layer.params for plan in plans)
    saved = sum(int(r["params_before"]) - int(r["params_after"]) for r in reports)
    return {"params_before": before, "params_after": before - saved}
