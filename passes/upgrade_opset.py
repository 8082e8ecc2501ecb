"""upgrade_opset: move a model to a newer default-domain opset with onnx's version converter.

Old exports (opset 7-12: the caffe2-converted zoo, early PyTorch) cannot take per-channel
QuantizeLinear/DequantizeLinear (opset 13), and some back ends want a recent opset. The
converter rewrites each op to its newer form (Upsample to Resize, attributes to inputs, ...), so
what the model computes stays the same; the run's verification checks that as for any pass.
A model already at or past `to` is left alone: this pass never downgrades.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from iropt.errors import OptionError
from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.model import Model
from iropt.ir.opset import OLDEST_CONVERTIBLE, upgrade_opset


@register_pass("upgrade_opset")
@dataclass(kw_only=True)
class UpgradeOpset(Pass):
    """Convert the model to default-domain opset `to` (onnx's version converter); never downgrades."""

    to: int = 13

    def __post_init__(self) -> None:
        newest = onnx.defs.onnx_opset_version()
        if not OLDEST_CONVERTIBLE < self.to <= newest:
            raise OptionError(f"upgrade_opset: to={self.to} is not an opset it can convert to ({OLDEST_CONVERTIBLE + 1}..{newest})")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        current = model.opset
        if not upgrade_opset(model, self.to):
            return PassResult.from_stats(upgraded=0)
        return PassResult.from_stats(upgraded=1, from_opset=current)
