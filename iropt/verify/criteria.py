"""What "still equivalent" means for a check: a tolerance, or a metric and its threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np

from iropt.util.bounds import Range, check_bounds

Metric = Literal["tolerance", "cosine", "snr", "top1", "max_abs", "max_rel"]

# Metrics where larger is better, and so take `min`; the others take `max`.
HIGHER_IS_BETTER = {"cosine", "snr", "top1"}

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# Default tolerances of a floating-point output: never below the fp32 defaults above, and at least
# this many units in the last place of the output's type (relative) and one (absolute). For types
# coarser than fp32 (fp16, bfloat16), where a sum rounds to the precision of its largest terms,
# the absolute tolerance is also _DEFAULT_ULPS_OF_SCALE units at the output's largest magnitude:
# a rewrite that rounds differently (a fused BatchNorm) passes where a real change does not.
_DEFAULT_ULPS_RELATIVE = 4
_DEFAULT_ULPS_OF_SCALE = 2
_FP32_EPS = float(np.finfo(np.float32).eps)
# More samples than this is a typo: each one is a run of the reference and the candidate.
MAX_SAMPLES = 10_000
# Lossy schedules with no verify(...) statement are held to this output cosine similarity.
DEFAULT_LOSSY_COSINE = 0.99


@dataclass(frozen=True, kw_only=True)
class Criterion:
    """Options of `verify(...)`: `np.allclose`-style rtol/atol, or a metric with a bound.

    - `metric="tolerance"` (default): every output element within `atol + rtol * |reference|`;
      without `rtol` / `atol`, from the output's type (`tolerance_for`): 1e-4 / 1e-5 for fp32,
      wider for fp16 and bfloat16.
    - `metric="cosine" | "snr" | "top1"` with `min`: cosine similarity, signal-to-noise ratio in
      dB, or the fraction of samples whose argmax agrees, at least `min` for every output.
    - `metric="max_abs" | "max_rel"` with `max`: the largest absolute or relative error.
    - `samples`: how many input samples to compare on when inputs are generated.
    """

    metric: Metric = "tolerance"
    rtol: Annotated[float, Range(min=0, max=1)] | None = None
    atol: Annotated[float, Range(min=0)] | None = None
    min: float | None = None
    max: float | None = None
    samples: Annotated[int, Range(min=1, max=MAX_SAMPLES)] = 2

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.metric in HIGHER_IS_BETTER and self.min is None:
            raise ValueError(f"verify(metric={self.metric!r}) needs a lower bound: min=...")
        if self.metric in ("max_abs", "max_rel") and self.max is None:
            raise ValueError(f"verify(metric={self.metric!r}) needs an upper bound: max=...")
        bounds = _METRIC_BOUNDS.get(self.metric)
        value = self.max if self.metric in ("max_abs", "max_rel") else self.min
        if bounds is not None and value is not None and bounds.violation(value) is not None:
            key = "max" if self.metric in ("max_abs", "max_rel") else "min"
            raise ValueError(f"verify(metric={self.metric!r}) {key}={value:g} must be {bounds.describe()}")

    def tolerance_for(self, dtype: Any, scale: float = 0.0) -> tuple[float, float]:
        """(rtol, atol) for an output of `dtype` whose largest magnitude is `scale`: the given
        ones, else the type's defaults."""
        default_rtol, default_atol = default_tolerance(dtype, scale)
        return (
            default_rtol if self.rtol is None else self.rtol,
            default_atol if self.atol is None else self.atol,
        )

    def describe(self) -> str:
        if self.metric == "tolerance":
            # The fp32 figures; each output's line shows the tolerance its own type got.
            rtol, atol = self.tolerance_for(np.float32)
            return f"rtol={rtol:g}, atol={atol:g}"
        if self.metric in HIGHER_IS_BETTER:
            return f"{self.metric} >= {self.min:g}"
        return f"{self.metric} <= {self.max:g}"


# Bounds of `min` / `max` per metric: a cosine above 1 or a negative error bound passes nothing
# or everything, whatever the model does.
_METRIC_BOUNDS = {
    "cosine": Range(min=-1),
    "top1": Range(min=0, max=1),
    "max_abs": Range(min=0),
    "max_rel": Range(min=0),
}


def default_tolerance(dtype: Any, scale: float = 0.0) -> tuple[float, float]:
    """(rtol, atol) for outputs of `dtype`, largest magnitude `scale`, when a check gives none
    (see `_DEFAULT_ULPS_RELATIVE`)."""
    try:
        eps = float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        return DEFAULT_RTOL, DEFAULT_ATOL  # integers, booleans: compared as fp32 would be
    atol = max(DEFAULT_ATOL, eps)
    if eps > _FP32_EPS:
        atol = max(atol, _DEFAULT_ULPS_OF_SCALE * eps * scale)
    return max(DEFAULT_RTOL, _DEFAULT_ULPS_RELATIVE * eps), atol


EXACT_CRITERION = Criterion()
LOSSY_CRITERION = Criterion(metric="cosine", min=DEFAULT_LOSSY_COSINE)
