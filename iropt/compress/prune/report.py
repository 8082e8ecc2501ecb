"""Report rows: channels per group before and after (and why kept), parameters and MACs per layer.

MACs are per sample (a batch dimension counts as 1; other unknown dimensions too): a Conv does
`weight.size * output spatial size`, a ConvTranspose `weight.size * input spatial size`, a Gemm
`weight.size`, a MatMul `weight.size` per row of its input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iropt.compress.prune.dependency import Analysis, Group, Shape
from iropt.compress.prune.layout import weighted_node
from iropt.ir.graph import is_op
from iropt.ir.model import Model


def group_rows(analysis: Analysis, groups: list[Group], removed: set[int]) -> list[dict[str, Any]]:
    rows = []
    for group in groups:
        lost = sum(1 for unit in group.units if unit.root in removed)
        rows.append({
            "group": group.name,
            "producers": [node.name for node in group.producers],
            "channels_before": len(group.units),
            "channels_after": len(group.units) - lost,
            "refused": group.reasons,
        })
    return rows


def layer_rows(model: Model, shapes: dict[str, Shape]) -> dict[str, dict[str, Any]]:
    """Parameters and MACs of every weighted layer, by node name."""
    rows: dict[str, dict[str, Any]] = {}
    for index, node in enumerate(model.graph.nodes):
        layout = weighted_node(node)
        if layout is None:
            continue
        weight = layout.weight
        bias = layout.bias
        params = int(weight.size + (bias.size if bias is not None else 0))
        rows[node.name or f"{node.op}_{index}"] = {
            "op": node.op, "params": params, "macs": int(weight.size * _positions(node, shapes)),
        }
    return rows


def _positions(node: Any, shapes: dict[str, Shape]) -> int:
    """How many times the weight is applied per sample."""
    if is_op(node, "Gemm"):
        return 1
    if is_op(node, "Conv"):
        shape = shapes.get(node.outputs[0].name)
        return _product(shape[2:]) if shape else 1
    shape = shapes.get(node.inputs[0].name)
    if is_op(node, "ConvTranspose"):
        return _product(shape[2:]) if shape else 1
    return _product(shape[1:-1]) if shape else 1


def _product(dims: Shape) -> int:
    return int(np.prod([d if d else 1 for d in dims], dtype=np.int64))
