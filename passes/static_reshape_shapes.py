"""static_reshape_shapes: a Reshape target computed at run time becomes a constant when the
result's shape is known but for at most one dimension.

Exporters that trace a model with dynamic axes build every Reshape target at run time:
`Shape(x) -> Gather -> Unsqueeze -> Concat`, or `Mul` of the batch size by the number of heads.
When shape inference (`infer_shapes`, with data propagation) knows the Reshape's output shape
except for one dimension, the target is that shape with -1 in the unknown place: a Reshape keeps
the element count, so the one free dimension is determined, and the result is the same for every
input size. The chain that computed the target is then dead code for `eliminate_dead_code`.
(A fully static output shape becomes the constant itself.)

Left alone: a target that is already a constant, an output whose rank is unknown or with two or
more unknown dimensions, and an output with a zero-sized dimension (-1 is ambiguous there, and
a 0 in a target means "copy" unless `allowzero`).

This trusts the shapes recorded on the tensors, like `fold_constants`' folding of Shape: a pass
that changes a tensor's shape must update or drop its annotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import FreshNames, fresh_names, is_op, iter_graphs
from iropt.ir.model import Model

# Reshape takes its target as an input from opset 5; before, it was the `shape` attribute.
_MIN_OPSET = 5


@register_pass("static_reshape_shapes")
@dataclass(kw_only=True)
class StaticReshapeShapes(Pass):
    """Replace a run-time Reshape target by a constant (with one -1) when the output shape is known."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        replaced = 0
        if model.opset < _MIN_OPSET:
            return PassResult.from_stats(replaced=replaced)
        fresh: FreshNames | None = None  # made on first use: it reads every tensor name
        for graph in iter_graphs(model.graph):
            for node in graph.nodes:
                target = _static_target(node) if is_op(node, "Reshape") else None
                if target is not None:
                    fresh = fresh or fresh_names(iter_graphs(model.graph))
                    name = fresh(f"{node.outputs[0].name}_shape")
                    node.inputs[1] = gs.Constant(name, np.array(target, dtype=np.int64))
                    replaced += 1
        return PassResult.from_stats(replaced=replaced)


def _static_target(node: gs.Node) -> list[int] | None:
    """The constant target that reshapes like `node`, or None."""
    if len(node.inputs) != 2 or len(node.outputs) != 1 or _is_constant(node.inputs[1]):
        return None
    shape = node.outputs[0].shape
    if shape is None:
        return None
    dims = [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]
    unknown = [axis for axis, d in enumerate(dims) if d is None]
    if len(unknown) > 1 or 0 in dims:
        return None
    return [-1 if d is None else d for d in dims]


def _is_constant(tensor: gs.Tensor) -> bool:
    """An initializer or a Constant node's output (its value is not read: nothing is decoded)."""
    return isinstance(tensor, gs.Constant) or (len(tensor.inputs) == 1 and is_op(tensor.inputs[0], "Constant"))
