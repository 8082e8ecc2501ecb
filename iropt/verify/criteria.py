"""What "still equivalent" means for a check: a tolerance, or a metric and its threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Metric = Literal["tolerance", "cosine", "snr", "top1", "max_abs", "max_rel"]

# Metrics where larger is better, and so take `min`; the others take `max`.
HIGHER_IS_BETTER = {"cosine", "snr", "top1"}

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# Lossy schedules with no verify(...) statement are held to this output cosine similarity.
DEFAULT_LOSSY_COSINE = 0.99


@dataclass(frozen=True, kw_only=True)
class Criterion:
    """Options of `verify(...)`: `np.allclose`-style rtol/atol, or a metric with a bound.

    - `metric="tolerance"` (default): every output element within `atol + rtol * |reference|`.
    - `metric="cosine" | "snr" | "top1"` with `min`: cosine similarity, signal-to-noise ratio in
      dB, or the fraction of samples whose argmax agrees, at least `min` for every output.
    - `metric="max_abs" | "max_rel"` with `max`: the largest absolute or relative error.
    - `samples`: how many input samples to compare on when inputs are generated.
    """

    metric: Metric = "tolerance"
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    min: float | None = None
    max: float | None = None
    samples: int = 2

    def __post_init__(self) -> None:
        if self.metric in HIGHER_IS_BETTER and self.min is None:
            raise ValueError(f"verify(metric={self.metric!r}) needs a lower bound: min=...")
        if self.metric in ("max_abs", "max_rel") and self.max is None:
            raise ValueError(f"verify(metric={self.metric!r}) needs an upper bound: max=...")
        if self.samples < 1:
            raise ValueError(f"verify(samples={self.samples}) must be at least 1")

    def describe(self) -> str:
        if self.metric == "tolerance":
            return f"rtol={self.rtol:g}, atol={self.atol:g}"
        if self.metric in HIGHER_IS_BETTER:
            return f"{self.metric} >= {self.min:g}"
        return f"{self.metric} <= {self.max:g}"


EXACT_CRITERION = Criterion()
LOSSY_CRITERION = Criterion(metric="cosine", min=DEFAULT_LOSSY_COSINE)
