"""What the float32 model computes on data: the largest magnitude of every float tensor.

The model runs with every float tensor as an extra output, one bounded batch at a time, so
memory follows the largest batch and not the number of samples. The first batch's shapes are
kept as well: they give the reduction depths of nodes whose shapes are not declared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from iropt.compress.calibration import collect_statistics
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
    # The first batch and the model's outputs on it: a reference for checking the conversion.
    first_feed: dict[str, np.ndarray] = field(default_factory=dict)
    first_outputs: dict[str, np.ndarray] = field(default_factory=dict)


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
    graph_outputs = [tensor.name for tensor in model.graph.outputs]
    observed = Observed()

    def first_run(batch: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        if observed.first_feed:
            return
        observed.first_feed = dict(batch)
        observed.first_outputs = {name: outputs[name] for name in graph_outputs if name in outputs}
        for name in wanted:
            value = batch.get(name, outputs.get(name))
            if value is not None:
                observed.shapes[name] = tuple(int(d) for d in np.shape(value))

    stats = collect_statistics(
        model, wanted, feeds, runner_factory, batch_size=batch_size, histograms=False,
        progress=progress, on_outputs=first_run,
    )
    observed.amax = {name: s.amax for name, s in stats.items() if s.count}
    return observed
