"""Channel units that provably contribute nothing: removing them changes no output.

A unit contributes nothing when every consumer's weight columns for it are zero, or when its
value is zero wherever a consumer reads it: every producer filter and bias of the unit is zero,
and every op on the way maps 0 to 0 at those channels (Relu, pools, a BatchNormalization whose
shift `beta - gamma * mean / sqrt(var + eps)` is 0 there, an added constant that is 0 there...).
Models trained with channel masks have such units, which no runtime skips by itself.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.prune.dependency import Analysis
from iropt.ir.graph import constant_value, is_op

# Ops f with f(0) = 0, elementwise or over space (a zero channel stays zero).
ZERO_PRESERVING = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Tanh", "Erf", "Gelu", "Identity", "Dropout", "Neg", "Abs", "Sqrt",
    "Sin", "HardSwish", "Elu", "Selu", "Celu", "Softsign", "Mish", "Sign", "Floor", "Ceil", "Round",
    "Cast", "ThresholdedRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "GlobalLpPool", "Resize", "Upsample", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    "Concat", "Split", "Slice", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Conv",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1",
    "BatchNormalization", "InstanceNormalization",
})


def zero_units(analysis: Analysis) -> set[int]:
    """Roots of the prunable units that contribute nothing to any output."""
    roots = {unit.root for group in analysis.groups for unit in group.prunable}
    return {root for root in roots if _unread(analysis, root) or _always_zero(analysis, root)}


def _positions(analysis: Analysis, atoms: np.ndarray, root: int) -> np.ndarray:
    return np.array([analysis.uf.find(int(a)) == root for a in atoms], dtype=bool)


def _unread(analysis: Analysis, root: int) -> bool:
    """Every consumer's weight columns for the unit are zero."""
    for consumer in analysis.consumers:
        hits = _positions(analysis, consumer.atoms, root)
        if hits.any() and np.any(np.compress(hits, consumer.layout.weight, axis=consumer.layout.in_axis)):
            return False
    return True


def _always_zero(analysis: Analysis, root: int) -> bool:
    """The unit's producers output zero and every op on its path keeps zero at zero."""
    for producer in analysis.producers:
        hits = _positions(analysis, producer.atoms, root)
        if not hits.any():
            continue
        layout = producer.layout
        if np.any(np.compress(hits, layout.weight, axis=layout.out_axis)):
            return False
        bias = layout.bias
        if bias is not None and bias.ndim and np.any(np.compress(hits, bias, axis=bias.ndim - 1)):
            return False
    for node, atoms in analysis.passes:
        if _positions(analysis, atoms, root).any() and not _keeps_zero(node):
            return False
    for holder in analysis.holders:
        hits = _positions(analysis, holder.atoms, root)
        if hits.any() and not _holder_keeps_zero(holder.node, holder.input_index, holder.axis, hits):
            return False
    return True


def _keeps_zero(node: gs.Node) -> bool:
    if is_op(node, "Clip"):
        low, high = (_bound(node, index, default) for index, default in ((1, -np.inf), (2, np.inf)))
        return low is not None and high is not None and low <= 0.0 <= high
    if is_op(node, "Pad"):
        value = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        return value is None or not np.any(value)
    return node.op in ZERO_PRESERVING


def _bound(node: gs.Node, index: int, default: float) -> float | None:
    if len(node.inputs) <= index or not node.inputs[index].name:
        return default
    value = constant_value(node.inputs[index])
    return None if value is None else float(value)


def _holder_keeps_zero(node: gs.Node, index: int, axis: int, hits: np.ndarray) -> bool:
    value = constant_value(node.inputs[index])
    if value is None:
        return False
    picked = np.compress(hits, value, axis=axis)
    if is_op(node, "BatchNormalization"):
        if index != 2:
            return True
        params = [constant_value(node.inputs[i]) for i in (1, 2, 3, 4)]
        if any(p is None for p in params):
            return False
        scale, bias, mean, var = (np.compress(hits, p, axis=0) for p in params)  # type: ignore[arg-type]
        epsilon = float(node.attrs.get("epsilon", 1e-5))
        return not np.any(bias - scale * mean / np.sqrt(var + epsilon))
    if is_op(node, "InstanceNormalization"):
        return index != 2 or not np.any(picked)
    if is_op(node, "Add", "Sub", "Max", "Min", "Sum", "Mean") or (is_op(node, "Conv") and index == 2):
        return not np.any(picked)
    if is_op(node, "Div"):
        return index == 0 or bool(np.all(picked != 0))
    return is_op(node, "Mul", "PRelu", "Conv")
