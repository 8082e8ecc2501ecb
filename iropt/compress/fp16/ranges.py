"""What the float32 model computes on data: the largest magnitude of every float tensor.

The model runs with every float tensor as an extra output, one bounded batch at a time, so
memory follows the largest batch and not the number of samples. The first batch's shapes are
kept as well: they give the reduction depths of nodes whose shapes are not declared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from iropt.compress.calibration import split_batches, with_outputs
from iropt.ir.model import Model
from iropt.util.progress import ProgressFn
from iropt.verify.runner import Runner


@dataclass
class Observed:
    """Per tensor name: the largest finite |value| seen, and the shape of its first batch.

    Infinities are left out: a value that is infinite in float32 is infinite in float16 too.
    """

    amax: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    samples: int = 0
    # The first batch and the model's outputs on it: a reference for checking the conversion.
    first_feed: dict[str, np.ndarray] = field(default_factory=dict)
    first_outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, name: str, values: np.ndarray) -> None:
        if values.dtype.kind != "f":
            return
        self.shapes.setdefault(name, tuple(int(d) for d in values.shape))
        magnitude = np.abs(values)
        magnitude = magnitude[np.isfinite(magnitude)]
        if magnitude.size:
            self.amax[name] = max(self.amax.get(name, 0.0), float(magnitude.max()))

def observe(
    model: Model,
    tensors: Iterable[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    runner_factory: Callable[[Model], Runner],
    *,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> Observed:
    """Run `model` on `feeds` and record `tensors` (graph inputs are read from the feeds)."""
    wanted = list(dict.fromkeys(tensors))
    inputs = {tensor.name for tensor in model.graph.inputs}
    runner = runner_factory(with_outputs(model, [name for name in wanted if name not in inputs]))
    batches: Iterable[dict[str, np.ndarray]] = (
        batch for feed in feeds for batch in split_batches(feed, batch_size)
    )
    if progress is not None:
        batches = progress(batches, "fp16 ranges")
    observed = Observed()
    graph_outputs = [tensor.name for tensor in model.graph.outputs]
    for batch in batches:
        outputs = runner.run(batch)
        if not observed.samples:
            observed.first_feed = dict(batch)
            observed.first_outputs = {name: outputs[name] for name in graph_outputs if name in outputs}
        for name in wanted:
            value = batch.get(name) if name in inputs else outputs.get(name)
            if value is not None:
                observed.update(name, np.asarray(value))
        observed.samples += 1
    return observed
