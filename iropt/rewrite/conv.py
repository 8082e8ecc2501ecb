"""Shared pieces of the fusion passes: Conv-like patterns and per-output-channel algebra.

Not a pass (the leading underscore keeps the registry from importing it as one).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

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


def output_channels(conv: gs.Node, weight: np.ndarray, opset: int) -> int:
    """Output channels of a Conv ([C_out, C_in/g, k...]) or ConvTranspose ([C_in, C_out/g, k...])."""
    if conv.op == "ConvTranspose":
        return int(weight.shape[1]) * int(attribute(conv, "group", opset) or 1)
    return int(weight.shape[0])


def scale_output_channels(conv: gs.Node, weight: np.ndarray, scale: np.ndarray, opset: int) -> np.ndarray:
    """The weight with output channel o multiplied by `scale[o]` (float64).

    Conv: output channel o is weight row o, whatever the group count. ConvTranspose with g
    groups: the weight is [C_in, C_out/g, k...] and output channel o = i*(C_out/g) + j is column
    j of input-channel block i, so the weight is viewed as [g, C_in/g, C_out/g, k...] and scaled
    by scale viewed as [g, 1, C_out/g, 1...].
    """
    w = weight.astype(np.float64)
    kernel_ones = (1,) * (w.ndim - 2)
    if conv.op != "ConvTranspose":
        return w * scale.reshape((-1, 1, *kernel_ones))
    groups = int(attribute(conv, "group", opset) or 1)
    c_in, per_group = w.shape[:2]
    blocks = w.reshape(groups, c_in // groups, per_group, *w.shape[2:])
    scaled = blocks * scale.reshape(groups, 1, per_group, *kernel_ones)
    return scaled.reshape(w.shape)


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
