"""Moving a model to a newer default-domain opset with onnx's version converter.

The converter rewrites each op to its newer form (Upsample to Resize, attributes to inputs, ...),
so what the model computes stays the same. Used by the `upgrade_opset` pass and by lossy passes
that need a newer opset than the model has (per-channel QuantizeLinear needs 13).
"""

from __future__ import annotations

import onnx
import onnx.version_converter

from iropt.errors import UserError, first_line
from iropt.ir.model import Model

# The oldest opset the version converter has adapters from.
OLDEST_CONVERTIBLE = 7


def upgrade_opset(model: Model, to: int, who: str = "upgrade_opset") -> bool:
    """Convert `model` in place to default-domain opset `to`; never downgrades.

    True when it converted. UserError (prefixed with `who`) when the converter cannot.
    """
    current = model.opset
    if current >= to:
        return False
    if current < OLDEST_CONVERTIBLE:
        raise UserError(f"{who}: the model uses opset {current}; onnx's version converter starts at {OLDEST_CONVERTIBLE}")
    try:
        converted = onnx.version_converter.convert_version(model.to_onnx(), to)
    except Exception as error:  # the converter raises RuntimeError, ValueError, its own types
        raise UserError(
            f"{who}: onnx's version converter cannot take this model from opset {current} "
            f"to {to}: {first_line(error)}"
        ) from error
    model.graph = Model.from_onnx(converted).graph
    return True
