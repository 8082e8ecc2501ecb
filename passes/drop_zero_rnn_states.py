"""drop_zero_rnn_states: an RNN/GRU/LSTM initial state that is all zeros is left out.

ONNX's recurrent ops start from zeros when `initial_h` (and for LSTM `initial_c`) is not given.
Exporters that trace a model called without a state build the zeros anyway, at run time, since
their shape has the batch size in it: `Shape -> Gather -> Unsqueeze -> Concat ->
ConstantOfShape`, often sliced per layer. Leaving the input out computes the same thing, and
the chain that built it becomes dead code for `eliminate_dead_code`.

A state counts as all zeros when it is a constant whose every element is 0, a ConstantOfShape
of 0 (its default value), or such a tensor passed through ops that move or copy elements
without computing new ones (Slice, Reshape, Expand, Transpose, ...; see `_ZERO_PRESERVING`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import constant_value, is_op, iter_graphs, peek_values
from iropt.ir.model import Model

# Input positions of the initial states, by op.
_STATE_INPUTS: dict[str, tuple[int, ...]] = {"RNN": (5,), "GRU": (5,), "LSTM": (5, 6)}
# Ops whose output holds only elements of their (first) input: zeros in, zeros out.
_ZERO_PRESERVING = (
    "Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Expand",
    "Tile", "Gather",
)
# How many such ops a zero state may pass through on its way.
_MAX_HOPS = 8


@register_pass("drop_zero_rnn_states")
@dataclass(kw_only=True)
class DropZeroRnnStates(Pass):
    """Leave out an RNN/GRU/LSTM initial_h or initial_c that is all zeros (the default)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        dropped = 0
        for graph in iter_graphs(model.graph):
            for node in graph.nodes:
                if is_op(node, *_STATE_INPUTS):
                    dropped += _drop_zero_states(node)
        return PassResult.from_stats(dropped=dropped)


def _drop_zero_states(node: gs.Node) -> int:
    """Replace `node`'s all-zero initial states by omitted inputs; how many were."""
    dropped = 0
    for index in _STATE_INPUTS[node.op]:
        if index < len(node.inputs) and node.inputs[index].name and _all_zeros(node.inputs[index], _MAX_HOPS):
            node.inputs[index] = gs.Variable.empty()
            dropped += 1
    while dropped and not node.inputs[-1].name:  # trailing omitted inputs need not be written
        node.inputs.pop()
    return dropped


def _all_zeros(tensor: gs.Tensor, hops: int) -> bool:
    """True when every element of `tensor` is provably 0."""
    value = constant_value(tensor)
    if value is not None:
        return value.size > 0 and not np.any(value)
    if len(tensor.inputs) != 1:
        return False
    producer = tensor.inputs[0]
    if is_op(producer, "ConstantOfShape"):
        fill = producer.attrs.get("value")
        return fill is None or not np.any(peek_values(fill))
    if is_op(producer, *_ZERO_PRESERVING) and producer.inputs and hops > 0:
        return _all_zeros(producer.inputs[0], hops - 1)
    return False
