"""Sensitivity analysis: rank quantized layers by the harm each does alone, keep the worst in float.

Each layer is quantized alone and the model's outputs are compared with the float model's on
the same inputs (cosine similarity, top-1 agreement or SNR). Layers are ranked worst first. Then,
starting from everything quantized, the worst-ranked layers go back to float one at a time until
the whole model meets the target. Errors of several layers do not simply add up, so the whole
model is measured after each step rather than predicted from the ranking.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from iropt.errors import UserError
from iropt.util.progress import ProgressFn
from iropt.verify.compare import compare
from iropt.verify.criteria import Criterion

Metric = Literal["cosine", "top1", "snr"]
METRICS: tuple[str, ...] = ("cosine", "top1", "snr")

Outputs = Sequence[dict[str, np.ndarray]]
# evaluate(only, floats): the metric of the model quantized with only the layers in `only`
# (None: every layer) minus the layers in `floats`.
Evaluate = Callable[[frozenset[str] | None, frozenset[str]], float]


_LOWEST_BOUND = {"cosine": -1.0, "top1": 0.0, "snr": -sys.float_info.max}


def score(reference: Outputs, candidate: Outputs, metric: Metric) -> float:
    """`metric` between two runs over the same feeds: the worst over the model's outputs.

    Computed by `iropt.verify.compare`, over all feeds at once, so the number is the one a
    `verify(metric=...)` statement after the pass would report.
    """
    # The lowest bound each metric takes: only the statistic is wanted here, not a verdict.
    comparison = compare(reference, candidate, Criterion(metric=metric, min=_LOWEST_BOUND[metric]))
    field_name = "snr_db" if metric == "snr" else metric
    values = [getattr(o, field_name) for o in comparison.outputs]
    known = [float(v) for v in values if v is not None]
    if not known:
        raise UserError(
            f"quantize: target_metric '{metric}' does not apply to any output of this model "
            "(top1 needs an output shaped like class scores: [batch, classes]); choose cosine or snr"
        )
    # Outputs without the statistic (top-1 of a scalar output) do not count.
    return min(known)


@dataclass(frozen=True)
class LayerScore:
    key: str
    label: str
    score: float  # the metric with this layer quantized alone


@dataclass
class SensitivityResult:
    ranking: list[LayerScore]  # most harmful first
    kept_float: list[LayerScore] = field(default_factory=list)
    score: float = math.nan  # the metric of the model finally chosen
    met: bool = False


def analyze(
    layers: Sequence[tuple[str, str]],
    evaluate: Evaluate,
    target_min: float,
    progress: ProgressFn | None = None,
) -> SensitivityResult:
    """Rank `layers` (key, label) and choose the fewest worst-ranked to keep in float.

    Stops as soon as the model meets `target_min`; with every layer in float it is the float
    model, which always does.
    """
    items: Iterable[tuple[str, str]] = layers
    if progress is not None:
        items = progress(iter(layers), "sensitivity", total=len(layers))
    scores = [LayerScore(key, label, evaluate(frozenset({key}), frozenset())) for key, label in items]
    # Worst first; ties keep graph order, so the result is deterministic.
    ranking = sorted(scores, key=lambda item: item.score)
    kept: list[LayerScore] = []
    current = evaluate(None, frozenset())
    for item in ranking:
        if current >= target_min:
            break
        kept.append(item)
        current = evaluate(None, frozenset(k.key for k in kept))
    return SensitivityResult(ranking, kept, current, current >= target_min)
