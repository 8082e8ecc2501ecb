"""Remove the chosen channel units from the graph: weights, biases, per-channel constants, shapes.

Every place that indexes a channel is sliced with the same keep mask: producers along their
weight's output axis (and their bias), consumers along their weight's input axis, holders along
their constant's channel axis, and shape constants (Split sizes, Slice bounds, Reshape and Resize
targets) get the kept counts. Intermediate tensor shapes are cleared, since they change; graph
inputs and outputs never carry a pruned channel, so their shapes stay.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.prune.dependency import Analysis, Edit
from iropt.ir.graph import FreshNames, constant_value


def prune_units(graph: gs.Graph, analysis: Analysis, removed: Collection[int]) -> dict[str, list[int]]:
    """Remove the units whose roots are in `removed`; returns the kept output channels per producer."""
    removed = set(removed)
    fresh = FreshNames(graph.tensors().keys())
    kept: dict[str, list[int]] = {}
    for producer in analysis.producers:
        layout = producer.layout
        mask = analysis.keep_mask(producer.atoms, removed)
        kept[layout.node.name] = [int(i) for i in np.flatnonzero(mask)]
        if mask.all():
            continue
        _set(layout.node, layout.weight_input, np.compress(mask, layout.weight, axis=layout.out_axis), fresh)
        bias = layout.bias
        if bias is not None and bias.ndim and bias.shape[-1] == len(mask):
            assert layout.bias_input is not None
            _set(layout.node, layout.bias_input, np.compress(mask, bias, axis=bias.ndim - 1), fresh)
    for consumer in analysis.consumers:
        layout = consumer.layout
        mask = analysis.keep_mask(consumer.atoms, removed)
        if not mask.all():
            _set(layout.node, layout.weight_input, np.compress(mask, layout.weight, axis=layout.in_axis), fresh)
    for holder in analysis.holders:
        mask = analysis.keep_mask(holder.atoms, removed)
        value = constant_value(holder.node.inputs[holder.input_index])
        if not mask.all() and value is not None:
            _set(holder.node, holder.input_index, np.compress(mask, value, axis=holder.axis), fresh)
    for edit in analysis.edits:
        _apply_edit(edit, analysis, removed, fresh)
    if removed:
        _clear_inner_shapes(graph)
    return kept


def zero_consumer_inputs(analysis: Analysis, removed: Collection[int]) -> None:
    """Zero the consumer weight columns of the `removed` units: the model computes what pruning gives."""
    removed = set(removed)
    fresh = FreshNames(())
    for consumer in analysis.consumers:
        layout = consumer.layout
        mask = analysis.keep_mask(consumer.atoms, removed)
        shape = [1] * layout.weight.ndim
        shape[layout.in_axis] = len(mask)
        _set(layout.node, layout.weight_input, layout.weight * mask.reshape(shape), fresh, in_place=True)


def _apply_edit(edit: Edit, analysis: Analysis, removed: set[int], fresh: FreshNames) -> None:
    counts = [int(analysis.keep_mask(piece, removed).sum()) for piece in edit.pieces]
    if edit.kind == "group":
        edit.node.attrs["group"] = counts[0]
        return
    value = constant_value(edit.node.inputs[edit.input_index])
    assert value is not None
    value = np.array(value, copy=True)
    if edit.kind == "dim":
        value.reshape(-1)[edit.entry] = counts[0]
        _set(edit.node, edit.input_index, value, fresh)
    elif edit.kind == "split":
        _set(edit.node, edit.input_index, np.array(counts, dtype=value.dtype), fresh)
    elif edit.kind == "slice":
        source, bounds = edit.pieces
        keep = analysis.keep_mask(source, removed)
        start = int(keep[: bounds[0]].sum())
        stop = start + int(keep[bounds[0]: bounds[1]].sum())
        for index, bound in ((1, start), (2, stop)):
            bounds_value = np.array(constant_value(edit.node.inputs[index]), copy=True)
            bounds_value.reshape(-1)[edit.entry] = bound
            _set(edit.node, index, bounds_value, fresh)


def _set(node: gs.Node, index: int, value: np.ndarray, fresh: FreshNames, *, in_place: bool = False) -> None:
    """Give `node.inputs[index]` a new value; a constant other nodes share is copied, not changed."""
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Constant) and (in_place or len(tensor.outputs) == 1):
        tensor.values = np.ascontiguousarray(value)
        return
    node.inputs[index] = gs.Constant(fresh(f"{tensor.name}_pruned"), np.ascontiguousarray(value))


def _clear_inner_shapes(graph: gs.Graph) -> None:
    ends = {id(t) for t in [*graph.inputs, *graph.outputs]}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in ends:
            tensor.shape = None
