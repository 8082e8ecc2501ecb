"""eliminate_noop_ops: remove ops whose output provably equals their data input.

Each kind below computes `y = x` under the stated condition; its consumers then read `x` and
the node goes. Shapes and dtypes are used only where the model states them (value_info or shape
inference); when one is unknown the node stays.

- Transpose whose perm is the identity (no perm: reversed axes, the identity for rank <= 1).
- Reshape to the input's own shape: a constant target whose every entry is 0 ("copy", without
  `allowzero`) or equals that static axis size, with one -1 allowed when the input shape is fully
  static with a non-zero element count and all other entries match.
- Cast to the dtype the input already has.
- Pad whose pads are all zero (whatever the mode), as an attribute (< opset 11) or a constant input.
- Slice that keeps every index: per sliced axis step 1, start clamping to 0 and end to the axis
  size; a statically unknown size only counts when the end is INT64_MAX.
- Expand to a constant shape that broadcasts to the input's shape: no longer than the input's
  rank, each entry 1 or equal to the static axis size it aligns with.
- Concat of a single input.
- Flatten of a rank-2 input with `axis` 1 (or 0 / 2 when the first / second static size is 1).
- Squeeze without axes of a statically shaped input that has no size-1 axis.
- Unsqueeze with an empty constant axes list.
- Add or Sub of a constant 0, Mul or Div by a constant 1 (the constant on either side of Add
  and Mul, on the right of Sub and Div), when the constant broadcasts into the other input's
  shape without growing it (each of its dimensions 1 or equal to the static size it aligns
  with). Exporters leave these behind as zero biases and unit scales. As in ONNX Runtime's
  own no-op elimination, a -0.0 + 0.0 that gives +0.0 is taken to be the same value.

(Squeeze with an empty axes input is not treated: ONNX shape inference and ONNX Runtime read it
differently.) Graph output names never change: if `y` is a graph output the producer of `x` is
re-pointed to write `y`, and when that is impossible (x is a graph input, an initializer, another
graph output, or made in an enclosing graph) the node stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.edit import ModelEdit, const_ints, dims_of, ints_param, rank_of, static_shape
from iropt.ir.graph import constant_value, is_op
from iropt.ir.layout_ops import INT64_MAX, clamp_range, perm_of, read_slice
from iropt.ir.model import Model

NoopTest = Callable[[ModelEdit, gs.Node], bool]


@register_pass("eliminate_noop_ops")
@dataclass(kw_only=True)
class EliminateNoopOps(Pass):
    """Remove Transpose/Reshape/Cast/Pad/Slice/Expand/Concat/Flatten/Squeeze/Unsqueeze nodes that
    do nothing, and Add/Sub of 0 and Mul/Div by 1.

    Stats: one count per op kind removed: `transpose`, `reshape`, `cast`, `pad`, `slice`,
    `expand`, `concat`, `flatten`, `squeeze`, `unsqueeze`, `add`, `sub`, `mul`, `div`.
    """

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        edit = ModelEdit(model)
        counts = dict.fromkeys(_STAT_KEYS, 0)
        for graph in edit.graphs:
            sweep = edit.sweep(graph)
            for node in sweep.nodes():
                source = _passed_through(edit, node) if node.inputs and node.outputs else None
                if source is not None and sweep.forward(node, source, node.outputs[0]):
                    counts[node_kind(node)] += 1
            sweep.finish()
        return PassResult.from_stats(**counts)


def node_kind(node: gs.Node) -> str:
    """The stats key of a no-op node (its op, lower case)."""
    return str(node.op).lower()


def _passed_through(edit: ModelEdit, node: gs.Node) -> gs.Tensor | None:
    """The input that `node`'s output provably equals, or None."""
    if is_op(node, *_TESTS):
        return node.inputs[0] if _TESTS[node.op](edit, node) else None
    if is_op(node, *_IDENTITY_ELEMENTS):
        return _arithmetic_operand(node)
    return None


def _transpose(edit: ModelEdit, node: gs.Node) -> bool:
    perm = perm_of(node)
    return perm is not None and perm == list(range(len(perm)))


def _reshape(edit: ModelEdit, node: gs.Node) -> bool:
    dims, target = dims_of(node.inputs[0]), const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if dims is None or target is None or len(dims) != len(target):
        return False
    copy_zero = int(node.attrs.get("allowzero", 0)) == 0
    unmatched = [
        i for i, (d, t) in enumerate(zip(dims, target, strict=True)) if not ((t == 0 and copy_zero) or (d is not None and t == d))
    ]
    if not unmatched:
        return True
    # A single -1 takes the remaining element count, which is that axis's size when the
    # shape is static and no other axis is 0 (with a zero-sized axis -1 is ambiguous).
    shape = static_shape(node.inputs[0])
    return unmatched == [target.index(-1)] if -1 in target and shape is not None and 0 not in shape else False


def _cast(edit: ModelEdit, node: gs.Node) -> bool:
    source = _onnx_dtype(node.inputs[0].dtype)
    return source is not None and "to" in node.attrs and int(node.attrs["to"]) == source


def _onnx_dtype(dtype: object) -> int | None:
    """The TensorProto data type of a graphsurgeon dtype (a numpy dtype, or an ONNX enum for types numpy lacks)."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))  # type: ignore[call-overload]
    except (TypeError, KeyError, ValueError):
        return None


def _pad(edit: ModelEdit, node: gs.Node) -> bool:
    if edit.opset >= 11:
        param = ints_param(node, attr="pads", index=1, as_input=True)
    else:
        param = ints_param(node, attr="pads" if "pads" in node.attrs else "paddings", index=1, as_input=False)
    return param.present and param.values is not None and not any(param.values)


def _slice(edit: ModelEdit, node: gs.Node) -> bool:
    data = node.inputs[0]
    spec = read_slice(edit, node, rank_of(data))
    if spec is None:
        return False
    dims = dims_of(data) or []
    for axis, (start, end, step) in spec.items():
        size = dims[axis] if axis < len(dims) else None
        if step != 1:
            return False
        if size is None:
            if start != 0 or end < INT64_MAX:
                return False
        elif clamp_range(start, end, step, size) != range(size):
            return False
    return True


def _expand(edit: ModelEdit, node: gs.Node) -> bool:
    target = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    return target is not None and _broadcasts_into(target, node.inputs[0])


def _broadcasts_into(shape: list[int], tensor: gs.Tensor) -> bool:
    """True when broadcasting `shape` against `tensor` leaves `tensor`'s shape as it is."""
    dims = dims_of(tensor)
    if dims is None or len(shape) > len(dims):
        return False
    aligned = dims[len(dims) - len(shape):]
    return all(t == 1 or (d is not None and t == d) for d, t in zip(aligned, shape, strict=True))


def _arithmetic_operand(node: gs.Node) -> gs.Tensor | None:
    """For x + 0, 0 + x, x - 0, x * 1, 1 * x and x / 1: x, else None."""
    if len(node.inputs) != 2:
        return None
    element, positions = _IDENTITY_ELEMENTS[node.op]
    for position in positions:
        value = constant_value(node.inputs[position], _MAX_IDENTITY_ELEMENTS)
        data = node.inputs[1 - position]
        if value is not None and value.size and np.all(value == element) and _broadcasts_into(list(value.shape), data):
            return data
    return None


def _concat(edit: ModelEdit, node: gs.Node) -> bool:
    return len(node.inputs) == 1


def _flatten(edit: ModelEdit, node: gs.Node) -> bool:
    dims = dims_of(node.inputs[0])
    if dims is None or len(dims) != 2:
        return False
    axis = int(node.attrs.get("axis", 1))
    axis = axis + 2 if axis < 0 else axis
    # Output is [prod(dims[:axis]), prod(dims[axis:])].
    return axis == 1 or (axis == 0 and dims[0] == 1) or (axis == 2 and dims[1] == 1)


def _squeeze(edit: ModelEdit, node: gs.Node) -> bool:
    if ints_param(node, attr="axes", index=1, as_input=edit.opset >= 13).present:
        return False
    shape = static_shape(node.inputs[0])
    return shape is not None and 1 not in shape


def _unsqueeze(edit: ModelEdit, node: gs.Node) -> bool:
    param = ints_param(node, attr="axes", index=1, as_input=edit.opset >= 13)
    return param.present and param.values == []


_TESTS: dict[str, NoopTest] = {
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Cast": _cast,
    "Pad": _pad,
    "Slice": _slice,
    "Expand": _expand,
    "Concat": _concat,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
}
# Op -> (its identity element, the input positions a constant identity may take).
_IDENTITY_ELEMENTS: dict[str, tuple[int, tuple[int, ...]]] = {
    "Add": (0, (0, 1)),
    "Sub": (0, (1,)),
    "Mul": (1, (0, 1)),
    "Div": (1, (1,)),
}
# Zero biases and unit scales are per-channel vectors at most; a larger constant is not read.
_MAX_IDENTITY_ELEMENTS = 1 << 16
_STAT_KEYS = tuple(op.lower() for op in (*_TESTS, *_IDENTITY_ELEMENTS))
