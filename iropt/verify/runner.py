"""The interface every way of running a model offers (an ONNX Runtime session, a TensorRT engine).

Kept apart from `iropt.verify.runtime` so that code which only passes runners around (passes,
calibration) does not import ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from iropt.ir.model import Model


class Runner(Protocol):
    """Anything that runs a model: `run(feeds) -> {output_name: array}`."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


RunnerFactory = Callable[[Model], Runner]
