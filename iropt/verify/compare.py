"""Verification: run a reference and a candidate on the same inputs and compare their outputs.

The reference runs in ONNX Runtime on the CPU with ORT's own graph optimizations off, so it is
the model as written, not ORT's rewrite of it. `compare` reports, per output and over all
samples, like Polygraphy's comparator: the largest absolute and relative error, cosine
similarity, signal-to-noise ratio, top-1 agreement, and the tolerance that would have passed
(the smallest atol at the criterion's rtol). A `Criterion` decides pass or fail.

Relative error is |candidate - reference| / max(|reference|, floor), where the floor is
REL_ERROR_FLOOR times the largest |reference| of that output in that sample: an element that is
exactly (or nearly) zero in an output whose values are around 1 is judged on the output's scale,
so 1e-7 against 0 reads 1e-4, not 1e+300. Top-1 agreement is reported only for outputs shaped
like class scores: floating point, `[classes]` or `[batch, classes]` with at least two classes;
detection maps, feature maps and sequence outputs have a last axis that is not a class axis.

Non-finite values: NaN against NaN and an infinity against the same infinity are equal; any
other disagreement involving NaN or infinity fails whatever the metric, and is counted apart
from the finite statistics. A check must compare something: an output that is empty on every
sample, or has no finite value where both models agree (all NaN), fails, whatever the metric.

The pass-manager instruments that use it (verify-each, checkpoints, bisection) live in
`iropt.infra.instruments`.
"""


import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iropt.ir.model import Model
from iropt.verify.criteria import Criterion
from iropt.verify.runner import Runner

Outputs = dict[str, np.ndarray]
RunnerFactory = Callable[[Model], Runner]

# Relative errors divide by at least this fraction of the output's largest |reference| (see
# the module docstring), and by at least _TINY, so an all-zero reference does not divide by zero.
REL_ERROR_FLOOR = 1e-3
_TINY = float(np.finfo(np.float64).tiny)


# --- comparison -------------------------------------------------------------------------


@dataclass
class OutputComparison:
    """Error statistics of one output over all samples, and whether it meets the criterion.

    Statistics are None when they do not apply (a shape mismatch, a non-numeric output, top-1
    of an output without a class axis). `message` says why a failing output failed.
    """

    name: str
    shape: tuple[int, ...] | None
    dtype: str
    passed: bool
    message: str = ""
    max_abs: float | None = None
    mean_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    snr_db: float | None = None
    top1: float | None = None
    atol_to_pass: float | None = None
    nonfinite_mismatches: int = 0
    elements: int = 0

    def summary(self, criterion: Criterion) -> str:
        status = "PASS" if self.passed else "FAIL"
        parts = [f"{status} {self.name}"]
        if self.shape is not None:
            parts.append(f"{list(self.shape)} {self.dtype}:")
        stats = [
            ("max_abs", self.max_abs, "{:.3g}"),
            ("max_rel", self.max_rel, "{:.3g}"),
            ("cosine", self.cosine, "{:.6f}"),
            ("snr", self.snr_db, "{:.1f} dB"),
            ("top1", None if self.top1 is None else 100 * self.top1, "{:.1f}%"),
        ]
        parts.extend(f"{label}={fmt.format(value)}" for label, value, fmt in stats if value is not None)
        if self.atol_to_pass is not None:
            rtol = criterion.tolerance_for(_dtype_or_none(self.dtype))[0]
            parts.append(f"(passes at atol>={self.atol_to_pass:.3g} with rtol={rtol:g})")
        if self.nonfinite_mismatches:
            parts.append(f"non-finite mismatches={self.nonfinite_mismatches}")
        if self.message:
            parts.append(f"-- {self.message}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": None if self.shape is None else list(self.shape),
            "dtype": self.dtype,
            "passed": self.passed,
            "message": self.message,
            "max_abs": _json_float(self.max_abs),
            "mean_abs": _json_float(self.mean_abs),
            "max_rel": _json_float(self.max_rel),
            "cosine": _json_float(self.cosine),
            "snr_db": _json_float(self.snr_db),
            "top1": _json_float(self.top1),
            "atol_to_pass": _json_float(self.atol_to_pass),
            "nonfinite_mismatches": self.nonfinite_mismatches,
            "elements": self.elements,
        }


@dataclass
class Comparison:
    """Per-output comparisons and the overall verdict against `criterion`."""

    outputs: list[OutputComparison]
    criterion: Criterion
    samples: int
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and all(o.passed for o in self.outputs)

    def failures(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        """One line per output, then any problem not tied to one output."""
        lines = [o.summary(self.criterion) for o in self.outputs]
        lines.extend(f"FAIL {p}" for p in self.problems)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers become the strings "inf"/"-inf", NaN becomes None."""
        return {
            "passed": self.passed,
            "criterion": {
                "metric": self.criterion.metric,
                "rtol": self.criterion.rtol,
                "atol": self.criterion.atol,
                "min": self.criterion.min,
                "max": self.criterion.max,
                "description": self.criterion.describe(),
            },
            "samples": self.samples,
            "outputs": [o.to_dict() for o in self.outputs],
            "problems": list(self.problems),
        }


def _dtype_or_none(name: str) -> Any:
    """The numpy dtype named `name`, or None for names numpy does not know."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


def nothing_to_compare(outputs: Sequence[Outputs]) -> list[str]:
    """Why some outputs of a reference cannot be compared: empty, or no finite value, on every
    sample. A check on them would compare nothing, so it cannot pass."""
    problems = []
    for name in outputs[0] if outputs else []:
        arrays = [sample[name] for sample in outputs]
        if all(a.size == 0 for a in arrays):
            problems.append(f"output '{name}' is empty ({list(arrays[0].shape)}) on every input sample")
        elif arrays[0].dtype.kind in "fc" and not any(np.isfinite(a).any() for a in arrays):
            problems.append(f"output '{name}' has no finite value (all NaN or infinite) on any input sample")
    return problems


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def compare(
    reference: Sequence[Outputs], candidate: Sequence[Outputs], criterion: Criterion
) -> Comparison:
    """Compare candidate outputs with reference outputs, sample by sample, output by output.

    Outputs are matched by name; the reference's outputs decide which are compared. Statistics
    are aggregated over all samples.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference samples but {len(candidate)} candidate samples")
    problems: list[str] = []
    names = list(reference[0]) if reference else []
    outputs = [_compare_output(name, reference, candidate, criterion) for name in names]
    if criterion.metric == "top1" and outputs and all(o.top1 is None for o in outputs):
        problems.append("top-1: no output is shaped like class scores ([batch, classes], float)")
    if not reference:
        problems.append("no samples to compare")
    return Comparison(outputs, criterion, len(reference), problems)


def _compare_output(
    name: str, reference: Sequence[Outputs], candidate: Sequence[Outputs], criterion: Criterion
) -> OutputComparison:
    refs = [sample[name] for sample in reference]
    shape, dtype = tuple(refs[0].shape), str(refs[0].dtype)
    cands = []
    for index, sample in enumerate(candidate):
        if name not in sample:
            return OutputComparison(name, shape, dtype, False, "missing from the candidate's outputs")
        got, want = sample[name], refs[index]
        if got.shape != want.shape:
            return OutputComparison(
                name, shape, dtype, False,
                f"shape {list(got.shape)} differs from the reference's {list(want.shape)} (sample {index})",
            )
        if got.dtype != want.dtype:
            return OutputComparison(
                name, shape, dtype, False, f"dtype {got.dtype} differs from the reference's {want.dtype}"
            )
        cands.append(got)
    if refs[0].dtype.kind not in ("b", "i", "u", "f"):
        return _exact(name, shape, dtype, refs, cands)
    return _numeric(name, shape, dtype, refs, cands, criterion)


def _exact(
    name: str, shape: tuple[int, ...], dtype: str, refs: list[np.ndarray], cands: list[np.ndarray]
) -> OutputComparison:
    """Outputs that are not numbers (strings, sequences) must be equal, and not empty."""
    elements = sum(r.size for r in refs)
    if elements == 0:
        return OutputComparison(name, shape, dtype, False, "empty on every sample: nothing was compared")
    equal = all(np.array_equal(r, c) for r, c in zip(refs, cands, strict=True))
    message = "" if equal else "values differ (compared exactly: not numeric)"
    return OutputComparison(name, shape, dtype, equal, message, elements=elements)


@dataclass
class _Totals:
    """Running sums over samples, so statistics cover all of them without concatenating."""

    elements: int = 0
    nonfinite: int = 0
    finite_pairs: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    max_rel: float = 0.0
    atol_needed: float = 0.0
    within_tolerance: bool = True
    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    err_sq: float = 0.0
    rows: int = 0
    rows_agree: int = 0


def _numeric(
    name: str,
    shape: tuple[int, ...],
    dtype: str,
    refs: list[np.ndarray],
    cands: list[np.ndarray],
    criterion: Criterion,
) -> OutputComparison:
    totals = _Totals()
    rtol, atol = criterion.tolerance_for(refs[0].dtype, _largest_magnitude(refs))
    for ref, cand in zip(refs, cands, strict=True):
        _accumulate(totals, ref.astype(np.float64), cand.astype(np.float64), rtol, atol)
        _accumulate_top1(totals, ref, cand)
    finite = totals.elements - totals.nonfinite
    result = OutputComparison(name, shape, dtype, passed=True, elements=totals.elements)
    result.nonfinite_mismatches = totals.nonfinite
    result.max_abs = totals.max_abs
    result.mean_abs = totals.sum_abs / finite if finite else 0.0
    result.max_rel = totals.max_rel
    result.cosine = _cosine(totals)
    result.snr_db = _snr_db(totals.ref_sq, totals.err_sq)
    result.top1 = totals.rows_agree / totals.rows if totals.rows else None
    result.atol_to_pass = math.inf if totals.nonfinite else totals.atol_needed
    result.passed, result.message = _judge(result, totals, criterion, (rtol, atol))
    if not totals.finite_pairs:
        # Statistics of nothing (max_abs=0, cosine=1, snr=inf) would read as a perfect match.
        result.max_abs = result.mean_abs = result.max_rel = result.cosine = result.snr_db = None
        result.atol_to_pass = None
    return result


def _largest_magnitude(arrays: list[np.ndarray]) -> float:
    """The largest finite |value| over all samples (0 when there is none)."""
    largest = 0.0
    for array in arrays:
        finite = np.abs(array[np.isfinite(array)])
        if finite.size:
            largest = max(largest, float(finite.max()))
    return largest


def _accumulate(totals: _Totals, ref: np.ndarray, cand: np.ndarray, rtol: float, atol: float) -> None:
    ref, cand = ref.ravel(), cand.ravel()
    totals.elements += ref.size
    finite = np.isfinite(ref) & np.isfinite(cand)
    # Non-finite pairs: equal when both NaN or the same infinity; anything else is a mismatch.
    same_nonfinite = (np.isnan(ref) & np.isnan(cand)) | (~finite & (ref == cand))
    totals.nonfinite += int(np.count_nonzero(~finite & ~same_nonfinite))
    ref, cand = ref[finite], cand[finite]
    totals.finite_pairs += int(ref.size)
    if ref.size == 0:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        err = cand - ref
        abs_err = np.abs(err)
        abs_ref = np.abs(ref)
        totals.max_abs = max(totals.max_abs, float(abs_err.max()))
        totals.sum_abs += float(abs_err.sum())
        floor = max(REL_ERROR_FLOOR * float(abs_ref.max()), _TINY)
        totals.max_rel = max(totals.max_rel, float((abs_err / np.maximum(abs_ref, floor)).max()))
        totals.atol_needed = max(totals.atol_needed, float((abs_err - rtol * abs_ref).max()))
        totals.within_tolerance &= bool(np.all(abs_err <= atol + rtol * abs_ref))
        totals.dot += float(np.dot(ref, cand))
        totals.ref_sq += float(np.dot(ref, ref))
        totals.cand_sq += float(np.dot(cand, cand))
        totals.err_sq += float(np.dot(err, err))


def is_class_scores(array: np.ndarray) -> bool:
    """Shaped like class scores: float, `[classes]` or `[batch, classes]`, two classes or more."""
    return array.dtype.kind == "f" and array.ndim in (1, 2) and array.shape[-1] > 1 and array.size > 0


def _accumulate_top1(totals: _Totals, ref: np.ndarray, cand: np.ndarray) -> None:
    """Argmax over the class axis, row by row; only for outputs shaped like class scores."""
    if not is_class_scores(ref):
        return
    classes = ref.shape[-1]
    ref_top = np.argmax(ref.reshape(-1, classes), axis=-1)
    cand_top = np.argmax(cand.reshape(-1, classes), axis=-1)
    totals.rows += int(ref_top.size)
    totals.rows_agree += int(np.count_nonzero(ref_top == cand_top))


def _cosine(totals: _Totals) -> float:
    if totals.ref_sq == 0.0 and totals.cand_sq == 0.0:
        return 1.0  # both all zeros: identical
    if totals.ref_sq == 0.0 or totals.cand_sq == 0.0:
        return 0.0  # one all zeros: no shared direction
    # sqrt(a*b) rather than sqrt(a)*sqrt(b): for identical vectors dot == a == b and
    # sqrt(a*a) == a exactly, so identical outputs read 1.0, not 0.9999999999999999.
    product = totals.ref_sq * totals.cand_sq
    norms = math.sqrt(product) if math.isfinite(product) and product > 0 else (
        math.sqrt(totals.ref_sq) * math.sqrt(totals.cand_sq)
    )
    return max(-1.0, min(1.0, totals.dot / norms))


def _snr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _judge(
    result: OutputComparison, totals: _Totals, criterion: Criterion, tolerance: tuple[float, float]
) -> tuple[bool, str]:
    if totals.nonfinite:
        return False, f"{totals.nonfinite} NaN/inf value(s) where the reference differs"
    if totals.elements == 0:
        return False, "empty on every sample: nothing was compared"
    if totals.finite_pairs == 0:
        return False, "no finite value to compare (NaN or infinite in both models): nothing was compared"
    metric = criterion.metric
    if metric == "tolerance":
        if totals.within_tolerance:
            return True, ""
        rtol, atol = tolerance
        return False, f"outside atol={atol:g} + rtol={rtol:g}*|reference|"
    if metric == "top1" and result.top1 is None:
        return True, "top-1 not applicable (not shaped like class scores); not judged"
    value = {
        "cosine": result.cosine,
        "snr": result.snr_db,
        "top1": result.top1,
        "max_abs": result.max_abs,
        "max_rel": result.max_rel,
    }[metric]
    assert value is not None
    if criterion.min is not None and value < criterion.min:
        return False, f"{metric} {value:.6g} < min {criterion.min:g}"
    if criterion.max is not None and value > criterion.max:
        return False, f"{metric} {value:.6g} > max {criterion.max:g}"
    return True, ""

