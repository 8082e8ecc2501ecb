"""remove_zero_channels: remove channels that contribute nothing (exact).

Models trained with channel masks (structured sparsity) keep their pruned channels as zero
weights, and no runtime skips them. A channel unit (see `iropt.compress.prune.dependency`) is
removed when every consumer's weight columns for it are zero, or when its producers' filters and
biases are zero and every op on its way maps zero to zero (`iropt.compress.prune.zeros`). The
graph shrinks exactly as `prune_channels` shrinks it, and the outputs do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from iropt.compress.prune.dependency import analyze
from iropt.compress.prune.report import group_rows
from iropt.compress.prune.rewrite import prune_units
from iropt.compress.prune.zeros import zero_units
from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.model import Model


@register_pass("remove_zero_channels")
@dataclass(kw_only=True)
class RemoveZeroChannels(Pass):
    """Remove channels whose weights make them contribute nothing to the outputs (exact).

    Options: `min_channels` every group keeps at least this many channels.
    """

    min_channels: int = 1

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        analysis = analyze(model)
        zeros = zero_units(analysis)
        removed: set[int] = set()
        for group in analysis.groups:
            found = [unit.root for unit in group.prunable if unit.root in zeros]
            room = max(0, len(group.units) - max(self.min_channels, 1))
            removed.update(found[:room])
        if not removed:
            return PassResult.from_stats(removed_channels=0)
        kept = prune_units(model.graph, analysis, removed)
        rows = [row for row in group_rows(analysis, analysis.groups, removed)
                if row["channels_after"] < row["channels_before"]]
        for row in rows:
            ctx.log.info("remove_zero_channels: group %s: %d -> %d channels",
                         row["group"], row["channels_before"], row["channels_after"])
        result = PassResult.from_stats(removed_channels=len(removed))
        result.info = {"remove_zero_channels": {"groups": rows, "kept_channels": kept}}
        return result
