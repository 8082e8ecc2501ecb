"""Sensitivity analysis: rank quantized layers by the harm they do, keep the worst in float.

Two rankings:

- `exhaustive`: each layer is quantized alone and the model's outputs are compared with the
  float model's on the same inputs (cosine similarity, top-1 agreement or SNR): one model run
  per layer. Then, starting from everything quantized, the worst-ranked layers go back to float
  one at a time until the whole model meets the target.
- `fast`: one run of the float model and one of the fully quantized model, each with every
  layer's input and output exposed, give each layer the noise it *adds*: the noise-to-signal
  ratio of its output minus the largest of its inputs' (its inputs' own quantization counts as
  its own). The layers ranked by it, a search finds the fewest worst to keep in float
  (`grow_until_met`): it starts at the count the noise predicts (`fewest_below`: the quantized
  model's error shared among the layers by their noise), grows by doubling or further where the
  prediction, corrected by each measurement, says fewer cannot meet, and narrows the bracket by
  interpolation and bisection: O(log n) model runs, stopping once the bracket is within a
  tolerance (`narrow_enough`) and keeping its met end. When few layers end up in float (fewer
  than `refine`), the `refine` worst by noise are measured alone, reordered, and the search
  repeated. A caller that searches on part of its rows aims at a `tightened` target and, where
  all the rows then miss the real one, goes on from that count over all of them
  (`continue_search`).

The model runs themselves are the caller's (`Evaluate`): the quantize pass runs them on one
emulation model with run-time switches (`iropt.compress.quant.emulation`), or on a rewritten
copy per trial where it cannot emulate.

Errors of several layers do not simply add up, so the whole model is measured at every step
rather than predicted from the ranking.
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
    # Fast ranking: the metric with the layer quantized alone, for the few measured so.
    alone: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0  # whole-model runs over the feeds, besides the reference


def analyze(
    layers: Sequence[tuple[str, str]],
    evaluate: Evaluate,
    target_min: float,
    progress: ProgressFn | None = None,
    evaluate_many: EvaluateMany | None = None,
) -> SensitivityResult:
    """Rank `layers` (key, label) and choose the fewest worst-ranked to keep in float.

    The layers alone are measured at once with `evaluate_many` when given (in parallel), else
    one by one with `progress`. Stops as soon as the model meets `target_min`; with every
    layer in float it is the float model, which always does.
    """
    alone = _measure_alone([key for key, _ in layers], evaluate, evaluate_many, progress)
    scores = [LayerScore(key, label, value) for (key, label), value in zip(layers, alone, strict=True)]
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


def added_noise_db(
    reference: Outputs,
    quantized: Outputs,
    layers: Sequence[tuple[str, Sequence[str], str]],
) -> dict[str, float]:
    """Per layer `(key, input names, output name)`: the noise it adds, as an SNR in dB (lower is
    worse), from two runs over the same feeds with every named tensor among the outputs."""

    ratios: dict[str, float] = {}

    def nsr(name: str) -> float:
        # Each tensor once (a layer's input is its producer's output); sums of squares as dot
        # products of the flat float32 arrays, accumulated over feeds in float64.
        if name not in ratios:
            noise = signal = 0.0
            for r, q in zip(reference, quantized, strict=True):
                want = np.ascontiguousarray(r[name], dtype=np.float32).ravel()
                diff = np.ascontiguousarray(q[name], dtype=np.float32).ravel() - want
                noise += float(np.dot(diff, diff))
                signal += float(np.dot(want, want))
            ratios[name] = noise / signal if signal > 0 else 0.0
        return ratios[name]

    scores = {}
    for key, inputs, output in layers:
        added = nsr(output) - max((nsr(name) for name in inputs), default=0.0)
        scores[key] = -10.0 * math.log10(max(added, 1e-12))
    return scores


def error_of(value: float, metric: Metric) -> float:
    """A metric value as an error that adds up roughly over independent noise sources: 1 - cosine
    (about half the noise-to-signal ratio), the noise-to-signal ratio for snr, 1 - top1."""
    if metric == "snr":
        return 10.0 ** (-value / 10.0)
    return max(1.0 - value, 0.0)


def tightened(target: float, metric: Metric, factor: float) -> float:
    """`target` with its error (`error_of`) scaled by `factor` < 1: the stricter target a search
    on part of the rows aims at, so that the whole set of rows usually meets `target` too."""
    if metric == "snr":
        return target - 10.0 * math.log10(factor)
    return 1.0 - factor * (1.0 - target)


def search_rows(rows: int, share: float = 0.25, least: int = 4) -> int:
    """How many of `rows` the fast search's trials run on: `share` of them, at least `least`
    (or all, when there are no more)."""
    return min(rows, max(math.ceil(share * rows), least))


def accepted_width(total: int, tolerance: float) -> int:
    """The widest bracket of counts the search accepts: `tolerance` of the `total` layers, at
    least one layer (exact)."""
    return max(1, math.floor(tolerance * total))


def narrow_enough(failing: int, passing: int, total: int, tolerance: float) -> bool:
    """Whether a bracket (`failing` does not meet, `passing` does) is narrow enough to accept its
    met end (`accepted_width`)."""
    return passing - failing <= accepted_width(total, tolerance)


def fewest_below(noise: Sequence[float], quantized_error: float, target_error: float, scale: float = 1.0) -> int:
    """Predicted fewest leading layers of `noise` (added noise-to-signal ratios, in ranking order)
    to keep in float so that the model's error falls to `target_error`.

    The prediction: the model's error is its fully quantized error shared among the layers in
    proportion to their added noise, times `scale` (a correction measured on an earlier trial).
    """
    total = sum(noise)
    if total <= 0 or quantized_error <= 0:
        return 0
    remaining = total
    for count, item in enumerate(noise):
        if scale * quantized_error * remaining / total <= target_error:
            return count
        remaining -= item
    return len(noise)


def grow_until_met(
    value: Callable[[int], float], target: float, total: int, start: int, failing: int = 0,
    suggest: Callable[[int], int] | None = None, tolerance: float = 0.0,
) -> int:
    """The fewest `count` in (failing, total] with `value(count) >= target`, assuming more is
    never worse. Tries `start`; while it fails, doubles the count (or jumps to `suggest(count)`
    when that is more: a prediction lets the search skip counts that cannot meet). When `start`
    itself meets, looks one accepted width (`accepted_width`: one layer when `tolerance` is 0)
    below first (a good prediction is usually right). Then narrows the bracket by steps
    interpolated from the values at its ends, while they at least halve it, and by a bisection
    step after one that did not (so at most twice a bisection's steps), until it is
    `narrow_enough`. An interpolated step stays at least an accepted width below the met end:
    closer, it could gain less than the search gives away anyway. Returns `total` when nothing
    meets.
    """
    step = accepted_width(total, tolerance)
    values: dict[int, float] = {}

    def measured(count: int) -> float:
        if count not in values:
            values[count] = value(count)
        return values[count]

    count = min(max(start, failing + 1), total)
    while measured(count) < target:
        failing = count
        if count >= total:
            return total
        grown = 2 * count if suggest is None else max(2 * count, suggest(count))
        count = min(grown, total)
    passing = count
    if passing == start and not narrow_enough(failing, passing, total, tolerance):
        if measured(passing - step) < target:
            return passing
        passing -= step
    width = passing - failing
    interpolate = failing in values
    while not narrow_enough(failing, passing, total, tolerance):
        middle = (failing + passing) // 2
        if interpolate:
            low, high = measured(failing), values[passing]
            share = (target - low) / (high - low) if high > low else 0.5
            middle = min(max(failing + math.ceil(share * (passing - failing)), failing + 1), passing - step)
        if measured(middle) >= target:
            passing = middle
        else:
            failing = middle
        # Interpolation while it at least halves the bracket, else one bisection step.
        interpolate = failing in values and (not interpolate or 2 * (passing - failing) <= width)
        width = passing - failing
    return passing


EvaluateMany = Callable[[Sequence[tuple[frozenset[str] | None, frozenset[str]]]], list[float]]


def _measure_alone(
    keys: Sequence[str], evaluate: Evaluate, evaluate_many: EvaluateMany | None, progress: ProgressFn | None = None,
) -> list[float]:
    """The metric with each layer of `keys` alone quantized: at once with `evaluate_many` when
    given (in parallel where it can), else one by one (reported to `progress`)."""
    trials = [(frozenset({key}), frozenset[str]()) for key in keys]
    if evaluate_many is not None:
        return evaluate_many(trials)
    items: Iterable[tuple[frozenset[str], frozenset[str]]] = trials
    if progress is not None:
        items = progress(iter(trials), "sensitivity", total=len(trials))
    return [evaluate(*trial) for trial in items]


def analyze_fast(
    layers: Sequence[tuple[str, str]],
    noise_db: dict[str, float],
    evaluate: Evaluate,
    target_min: float,
    refine: int = 4,
    quantized_score: float | None = None,
    metric: Metric = "cosine",
    evaluate_many: EvaluateMany | None = None,
    tolerance: float = 0.0,
) -> SensitivityResult:
    """Rank `layers` by `noise_db` (from `added_noise_db`) and keep the fewest worst-ranked in
    float that let the model meet `target_min`.

    The search (`grow_until_met`) starts at the count the noise predicts (`fewest_below`) and
    corrects the prediction by each count it measures. When it ends with fewer layers in float
    than `refine`, the `refine` worst by noise are measured alone (at once with
    `evaluate_many`, in parallel where it can), reordered by that, and the search is repeated
    on the new order from the count found; with more, their order among themselves changes
    nothing and they are not measured. `quantized_score`: the metric of the fully quantized
    model when the caller has it already (from the run that measured the noise). `tolerance`:
    the search accepts the met end of a bracket within that share of the layers (`narrow_enough`).
    """
    by_noise = sorted((LayerScore(key, label, noise_db[key]) for key, label in layers), key=lambda item: item.score)
    tried: dict[frozenset[str], float] = {} if quantized_score is None else {frozenset(): quantized_score}
    alone: dict[str, float] = {}

    def measured(ranking: list[LayerScore], count: int) -> float:
        floats = frozenset(item.key for item in ranking[:count])
        if floats not in tried:
            tried[floats] = evaluate(None, floats)
        return tried[floats]

    def result(ranking: list[LayerScore], count: int) -> SensitivityResult:
        value = measured(ranking, count)
        return SensitivityResult(ranking, ranking[:count], value, value >= target_min, alone, len(alone) + len(tried))

    def search(ranking: list[LayerScore], start: int) -> int:
        nsr = [10.0 ** (-item.score / 10.0) for item in ranking]
        quantized_error, target_error = error_of(measured(ranking, 0), metric), error_of(target_min, metric)

        def suggest(count: int) -> int:
            # The noise's prediction scaled by how far it was off at the count just measured,
            # or the straight line through the quantized model's error and that count's,
            # whichever goes further (each undershoots on its own kind of model).
            error = error_of(measured(ranking, count), metric)
            guess = quantized_error * sum(nsr[count:]) / max(sum(nsr), 1e-300)
            scaled = fewest_below(nsr, quantized_error, target_error, error / max(guess, 1e-300))
            drop = quantized_error - error
            linear = math.ceil(count * (quantized_error - target_error) / drop) if drop > 0 else len(nsr)
            return max(scaled, min(linear, len(nsr)))

        if start < 0:
            start = fewest_below(nsr, quantized_error, target_error)
        return grow_until_met(lambda n: measured(ranking, n), target_min, len(ranking), start, suggest=suggest,
                              tolerance=tolerance)

    if measured(by_noise, 0) >= target_min:
        return result(by_noise, 0)
    count = search(by_noise, -1)
    if count >= min(refine, len(by_noise)):
        return result(by_noise, count)
    top = by_noise[:refine]
    scores = _measure_alone([item.key for item in top], evaluate, evaluate_many)
    alone.update((item.key, value) for item, value in zip(top, scores, strict=True))
    ranking = sorted(top, key=lambda item: alone[item.key]) + by_noise[refine:]
    return result(ranking, search(ranking, count))


def continue_search(result: SensitivityResult, evaluate: Evaluate, target_min: float) -> SensitivityResult:
    """The fewest of `result.ranking` to keep in float beyond `result.kept_float`, which does not
    meet `target_min` on the rows `evaluate` runs on (it met a search on part of them): grows the
    count from there (`grow_until_met`, exact), in the same order."""
    ranking = result.ranking
    failing = len(result.kept_float)
    values: dict[int, float] = {}

    def measured(count: int) -> float:
        if count not in values:
            values[count] = evaluate(None, frozenset(item.key for item in ranking[:count]))
        return values[count]

    count = grow_until_met(measured, target_min, len(ranking), failing + 1, failing)
    value = measured(count)
    return SensitivityResult(ranking, ranking[:count], value, value >= target_min, result.alone,
                             result.evaluations + len(values))
