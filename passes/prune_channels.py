"""prune_channels: remove whole channels (filters, hidden units) and re-fit what reads them.

1. Dependency analysis (`iropt.compress.prune.dependency`): channels tied by residual Adds,
   Concat, SE gates, depthwise convs, Flatten into a Gemm, ... form units removed together; units
   reaching a graph output or an op of unknown channel mapping are kept, with the reason.
2. Importance (`iropt.compress.prune.importance`): `l1`, `l2`, `bn_gamma` from the weights;
   `activation` and `output_error` from calibration data. `auto` is `output_error` with
   calibration data and `l1` without.
3. Selection (`iropt.compress.prune.select`): `ratio` of each group (`scope="local"`) or of all
   channels ranked together (`scope="global"`), each group within `max_ratio`, keeping at least
   `min_channels` and a multiple of `round_to` channels.
4. Rewrite (`iropt.compress.prune.rewrite`): weights, biases, BatchNormalization parameters,
   per-channel constants, consumers and shape constants (Split, Slice, Reshape, Resize).
5. Reconstruction (`iropt.compress.prune.reconstruct`, on by default with calibration data): each
   consumer of removed channels is re-fitted by ridge least squares so that, on calibration data,
   its output with inputs from the pruned network matches the original network's output.

The report carries, per group, the channels before and after and why any were kept; parameters
and MACs per layer; and the kept output channel indices per layer (to apply the same selection to
a training model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from iropt.compress.calibration import limit_rows
from iropt.compress.prune.driver import PruneSettings, prune_model
from iropt.compress.prune.importance import DATA_CRITERIA, Criterion
from iropt.compress.prune.select import Budget
from iropt.compress.prune.statistics import Feeds
from iropt.errors import OptionError
from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.model import Model
from iropt.verify.feeds import iter_feeds


@register_pass("prune_channels")
@dataclass(kw_only=True)
class PruneChannels(Pass):
    """Remove a fraction of channels per group and re-fit their consumers on calibration data.

    Options: `ratio` fraction of channels removed; `scope` local (each group) | global (all groups
    ranked together); `max_ratio` most any group loses; `round_to` kept counts a multiple of this
    (1 = exact ratio); `min_channels` per group; `importance` auto | l1 | l2 | bn_gamma |
    activation | output_error (auto: output_error with calibration data, else l1);
    `reconstruct` re-fit consumers by least squares (default: when calibration data is given);
    `ridge` strength of the pull toward the original weights in that fit (relative to the mean
    input energy); `calibration` (overrides --calibration), `batch_size`, `max_samples`;
    `exclude_nodes` (fnmatch patterns on node names) and `exclude_op_types`: their output channels
    are kept.
    """

    kind = PassKind.LOSSY

    ratio: float = 0.3
    scope: Literal["local", "global"] = "local"
    max_ratio: float = 0.9
    round_to: int = 8
    min_channels: int = 1
    importance: Literal["auto", "l1", "l2", "bn_gamma", "activation", "output_error"] = "auto"
    reconstruct: bool | None = None
    ridge: float = 1e-3
    calibration: str | None = None
    batch_size: int = 64
    max_samples: int | None = 1024
    exclude_nodes: list[str] = field(default_factory=list)
    exclude_op_types: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0 or not 0.0 <= self.max_ratio < 1.0:
            raise OptionError(f"prune_channels: ratio and max_ratio must be in [0, 1), got {self.ratio}, {self.max_ratio}")
        if self.round_to < 1 or self.min_channels < 1 or self.batch_size < 1:
            raise OptionError("prune_channels: round_to, min_channels and batch_size must be at least 1")
        if self.ridge < 0:
            raise OptionError(f"prune_channels: ridge must be >= 0, got {self.ridge}")
        if self.max_samples is not None and self.max_samples < 1:
            raise OptionError(f"prune_channels: max_samples must be at least 1, got {self.max_samples}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        spec = self.calibration if self.calibration is not None else ctx.calibration
        importance = self._criterion(spec is not None, ctx)
        reconstruct = self.reconstruct if self.reconstruct is not None else spec is not None
        if reconstruct and spec is None:
            ctx.log.warning("prune_channels: reconstruct needs calibration data (--calibration); not re-fitting")
            reconstruct = False

        def feeds() -> Iterable[Feeds]:
            return limit_rows(iter_feeds(spec, model, shapes=ctx.input_shapes), self.max_samples)

        settings = PruneSettings(
            budget=Budget(self.ratio, self.max_ratio, self.round_to, self.min_channels),
            scope=self.scope, importance=importance, reconstruct=reconstruct, batch_size=self.batch_size,
            ridge=self.ridge, exclude_nodes=tuple(self.exclude_nodes),
            exclude_op_types=tuple(self.exclude_op_types),
        )
        outcome = prune_model(
            model, settings, feeds=feeds if spec is not None else None,
            runner_factory=ctx.runner_factory, log=ctx.log,
        )
        stats = {
            "removed_channels": outcome.removed_channels, "pruned_groups": outcome.pruned_groups,
            "refused_groups": outcome.refused_groups, "refitted_layers": outcome.refitted,
        }
        info = {"prune_channels": {"importance": importance, **outcome.info}}
        return PassResult(changed=outcome.removed_channels > 0, stats=stats, info=info)

    def _criterion(self, have_data: bool, ctx: PassContext) -> Criterion:
        if self.importance == "auto":
            return "output_error" if have_data else "l1"
        if self.importance in DATA_CRITERIA and not have_data:
            ctx.log.warning(
                "prune_channels: importance '%s' needs calibration data (--calibration); using l1",
                self.importance,
            )
            return "l1"
        return self.importance
