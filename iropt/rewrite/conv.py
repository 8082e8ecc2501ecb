"""Shared pieces of the fusion passes: Conv-like patterns and per-output-channel algebra.

Not a pass (the leading underscore keeps the registry from importing it as one).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from iropt.ir.channels import WeightLayout, weight_layout
from iropt.rewrite import Match, OpPattern, attribute, const, op, tensor

CONV_TYPES = ("Conv", "ConvTranspose")


def conv_producer(op_types: tuple[str, ...] = CONV_TYPES, name: str = "conv") -> OpPattern:
    """A Conv/ConvTranspose with a constant weight, optional constant bias, feeding only the parent."""
    return op(
        op_types,
        inputs=[tensor("x"), const("w"), const("b", optional=True)],
        name=name,
        one_consumer=True,
    )


def conv_layout(conv: gs.Node) -> WeightLayout:
    """The weight layout of a Conv/ConvTranspose (see `iropt.ir.channels`)."""
    layout = weight_layout(conv, weight_rank=3)  # a convolution's layout does not depend on rank
    if layout is None or conv.op not in CONV_TYPES:
        raise ValueError(f"{conv.op} is not a convolution")
    return layout


def conv_problem(match: Match) -> str | None:
    """Why the captured Conv's weight cannot be rescaled, or None."""
    conv, weight = match.nodes["conv"], match.value("w")
    if weight.dtype.kind != "f":
        return f"{conv.op} weight '{_name(match, 'w')}' is {weight.dtype}, not floating point"
    if weight.ndim < 3:
        return f"{conv.op} weight has rank {weight.ndim}; expected [C, C, k...]"
    if conv.op == "ConvTranspose":
        groups = int(attribute(conv, "group", match.opset) or 1)
        if weight.shape[0] % groups:
            return (
                f"ConvTranspose weight has {weight.shape[0]} input channels, not a multiple of group={groups}"
            )
    return None


def per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | str:
    """`value` as a [channels] vector when, broadcast against a [N, channels, ...] tensor of
    `rank`, it varies only along axis 1 and leaves the shape unchanged; else the reason not.

    Accepted: a scalar or single element, [C, 1, ..., 1] and [1, C, 1, ..., 1].
    """
    if value.ndim > rank:
        return f"constant of shape {list(value.shape)} has more axes than the rank-{rank} output"
    padded = (1,) * (rank - value.ndim) + tuple(value.shape)
    if padded[0] != 1 or padded[1] not in (1, channels) or any(d != 1 for d in padded[2:]):
        return f"constant of shape {list(value.shape)} is not per-channel for {channels} channels (axis 1 of rank {rank})"
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))


def set_input(node: gs.Node, index: int, value: gs.Tensor) -> None:
    """Set input `index`, appending when the node has fewer inputs (an absent optional input)."""
    if index < len(node.inputs):
        node.inputs[index] = value
    else:
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(value)


def _name(match: Match, capture: str) -> str:
    captured = match.tensors.get(capture)
    return captured.name if captured is not None else capture


def new_constant(match: Match, capture: str, suffix: str, values: np.ndarray, dtype: np.dtype) -> gs.Constant:
    """A new initializer named after the captured tensor it replaces (`conv.weight_bn`)."""
    return match.constant(f"{_name(match, capture)}_{suffix}", values.astype(dtype))
