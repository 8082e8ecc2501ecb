"""fuse_pad: fold a constant-mode Pad into the `pads` of the Conv, AveragePool or MaxPool after it.

Pattern: `y = Op(Pad(x, pads, value), ...)` with Op in {Conv, AveragePool, MaxPool},
`auto_pad=NOTSET`, the Pad in mode "constant" with constant, non-negative pads on the spatial
axes only (not batch or channel), and the Pad's output read only by Op. Both Pad forms are
read: opset >= 11 (pads, constant_value and, from opset 18, axes as inputs) and opset < 11
(`pads` and `value` attributes).

Algebra: a Conv pads its input with zeros, so Conv(Pad(x, p, 0), pads=q) = Conv(x, pads=p+q)
(begin and end amounts add per spatial axis). AveragePool with count_include_pad=1 averages
over the padded window including the zeros, so the same holds for it; with
count_include_pad=0 the implicit padding is left out of the divisor and the explicit zeros are
not, so it is refused. Pools with ceil_mode=1 are refused: a last window that starts inside
the end padding is kept when the padding is explicit and dropped when it is implicit (ONNX
Runtime), so the output shapes differ. MaxPool ignores its implicit padding, which equals
padding with -inf: only a Pad whose value is -inf folds into a MaxPool, and only when its
Indices output is unused (indices count positions in the unpadded input). ONNX Runtime's pools
require every pad to be smaller than the kernel, so a fusion that would break that is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.infra.registry import register_pass
from iropt.rewrite import (
    Match,
    OpPattern,
    RewritePass,
    RewriteRule,
    attribute,
    const,
    op,
    tensor,
    tensor_rank,
)


def _not_set(value: object) -> bool:
    """must be NOTSET (explicit pads)"""
    return value in (None, "NOTSET")


def _off(value: object) -> bool:
    """must be 0"""
    return not value


def _on(value: object) -> bool:
    """must be 1 (padding counted in the average)"""
    return value == 1


_PAD = op(
    "Pad",
    inputs=[
        tensor("x"),
        const("pads", optional=True),
        const("value", optional=True),
        const("axes", optional=True),
    ],
    attrs={"mode": "constant"},
    name="pad",
    one_consumer=True,
)


@dataclass(frozen=True)
class _Amounts:
    begins: list[int]
    ends: list[int]
    value: float


class PadInto(RewriteRule):
    """Pad -> Conv/AveragePool/MaxPool: add the Pad's spatial amounts to the op's pads."""

    def __init__(self, name: str, pattern: OpPattern, pad_value: float) -> None:
        self.name = name
        self.pattern = pattern
        self.pad_value = pad_value

    def check(self, match: Match) -> str | None:
        target = match.nodes["target"]
        if len([t for t in target.outputs if t.name]) > 1:
            return f"{target.op} has a second output (Indices would index the unpadded input)"
        amounts = _amounts(match)
        if isinstance(amounts, str):
            return amounts
        if amounts.begins[:2] != [0, 0] or amounts.ends[:2] != [0, 0]:
            return "Pad pads the batch or channel axis"
        if min(amounts.begins + amounts.ends) < 0:
            return "Pad has negative pads (it crops)"
        if not _same_value(amounts.value, self.pad_value):
            return f"Pad value is {amounts.value}; {target.op} pads with {self.pad_value}"
        spatial = len(amounts.begins) - 2
        current = attribute(target, "pads", match.opset)
        if current is not None and len(current) != 2 * spatial:
            return f"{target.op}.pads has {len(current)} values for {spatial} spatial axes"
        kernel = attribute(target, "kernel_shape", match.opset)
        if target.op != "Conv" and kernel and max(_fused_pads(amounts, current)) >= min(kernel):
            # ONNX Runtime's pools require every pad to be smaller than the kernel.
            return f"{target.op} pads would reach the kernel size {list(kernel)}"
        return None

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        target, pad = match.nodes["target"], match.nodes["pad"]
        amounts = _amounts(match)
        assert not isinstance(amounts, str)
        target.attrs["pads"] = _fused_pads(amounts, attribute(target, "pads", match.opset))
        # Read the Pad's input directly; the Pad then has no reader and is removed.
        target.inputs[0] = pad.inputs[0]


def _fused_pads(amounts: _Amounts, current: list[int] | None) -> list[int]:
    """The op's pads [b1..bk, e1..ek] plus the Pad's spatial begin and end amounts."""
    spatial = len(amounts.begins) - 2
    pads = list(current or [0] * (2 * spatial))
    begins = [pads[i] + amounts.begins[2 + i] for i in range(spatial)]
    ends = [pads[spatial + i] + amounts.ends[2 + i] for i in range(spatial)]
    return begins + ends


def _same_value(value: float, expected: float) -> bool:
    if math.isinf(expected):
        return value == expected
    return value == expected and not math.isnan(value)


def _amounts(match: Match) -> _Amounts | str:
    """The Pad's full-rank begin/end amounts and value, or why they cannot be read."""
    pad = match.nodes["pad"]
    pads = match.values.get("pads")
    if pads is None:
        if match.tensors.get("pads") is not None or match.opset >= 11:
            return "Pad.pads is missing"
        # Opset < 11: pads and value are attributes.
        attr_pads = attribute(pad, "pads", match.opset)
        if attr_pads is None:
            return "Pad has no pads attribute"
        flat = [int(p) for p in attr_pads]
        value = float(attribute(pad, "value", match.opset) or 0.0)
    else:
        flat = [int(p) for p in np.asarray(pads).reshape(-1)]
        constant = match.values.get("value")
        value = float(np.asarray(constant).reshape(-1)[0]) if constant is not None and constant.size else 0.0
    if len(flat) % 2:
        return f"Pad has an odd number of pads ({len(flat)})"
    half = len(flat) // 2
    axes = match.values.get("axes")
    if axes is None:
        return _Amounts(flat[:half], flat[half:], value)
    rank = _rank(match)
    if rank is None:
        return "Pad has axes and the rank of its input is unknown"
    begins, ends = [0] * rank, [0] * rank
    for index, axis in enumerate(int(a) for a in np.asarray(axes).reshape(-1)):
        begins[axis % rank] = flat[index]
        ends[axis % rank] = flat[half + index]
    return _Amounts(begins, ends, value)


def _rank(match: Match) -> int | None:
    x = match.tensors.get("x")
    rank = tensor_rank(x) if x is not None else None
    if rank is None:
        kernel = attribute(match.nodes["target"], "kernel_shape", match.opset)
        rank = len(kernel) + 2 if kernel else None
    if rank is None and match.nodes["target"].op == "Conv" and len(match.nodes["target"].inputs) > 1:
        rank = tensor_rank(match.nodes["target"].inputs[1])
    return rank


_CONV = op(
    "Conv",
    inputs=[_PAD, tensor("w"), tensor("b", optional=True)],
    attrs={"auto_pad": _not_set},
    name="target",
)
_AVERAGE_POOL = op(
    "AveragePool",
    inputs=[_PAD],
    attrs={"auto_pad": _not_set, "count_include_pad": _on, "ceil_mode": _off},
    name="target",
)
_MAX_POOL = op("MaxPool", inputs=[_PAD], attrs={"auto_pad": _not_set, "ceil_mode": _off}, name="target")


@register_pass("fuse_pad")
@dataclass(kw_only=True)
class FusePad(RewritePass):
    """Fold a zero (or, for MaxPool, -inf) constant Pad into the pads of the Conv or pool after it."""

    def rules(self) -> list[RewriteRule]:
        return [
            PadInto("pad_conv", _CONV, 0.0),
            PadInto("pad_average_pool", _AVERAGE_POOL, 0.0),
            PadInto("pad_max_pool", _MAX_POOL, -math.inf),
        ]
