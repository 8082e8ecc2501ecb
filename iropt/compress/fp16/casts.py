"""Cast hygiene after a precision change: no chains, no no-op Casts, one Cast per tensor and type.

A Cast that widens losslessly (float16 -> float32) and feeds another Cast is skipped by the
second (fp16 -> fp32 -> T equals fp16 -> T); a Cast to the type it reads goes; two Casts of one
tensor to one type become one. A narrowing Cast followed by a widening one (fp32 -> fp16 ->
fp32) is a rounding step and stays.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.ir.graph import detach, is_op, replace_uses

# (from, to) pairs that keep every value: skipping such a Cast before another Cast is exact.
_LOSSLESS = {
    (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT),
    (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE),
    (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE),
    (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT),
}


def element_type(tensor: gs.Tensor) -> int | None:
    """The ONNX element type of `tensor`, or None when unknown."""
    if tensor.dtype is None or isinstance(tensor.dtype, int):
        return tensor.dtype if isinstance(tensor.dtype, int) else None
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)))
    except (KeyError, TypeError):
        return None


def tidy_casts(graph: gs.Graph) -> int:
    """Remove Cast chains, no-op Casts and duplicates in the top-level graph; returns how many."""
    removed = 0
    changed = True
    while changed:
        changed = False
        seen: dict[tuple[int, int], gs.Variable] = {}
        outputs = {id(t) for t in graph.outputs}
        for node in list(graph.nodes):
            if not is_op(node, "Cast") or not node.outputs:
                continue
            source, target, to = node.inputs[0], node.outputs[0], int(node.attrs["to"])
            if _skip_widening(node, source, to):
                changed = True
                continue
            if id(target) in outputs:
                continue
            key = (id(source), to)
            if element_type(source) == to or key in seen:
                replace_uses(target, source if key not in seen else seen[key])
                detach(graph, node)
                removed += 1
                changed = True
                continue
            seen[key] = target
        removed += _drop_unused_casts(graph)
    return removed


def _skip_widening(node: gs.Node, source: gs.Tensor, to: int) -> bool:
    """Read the first Cast's input directly when the first Cast only widened it."""
    if not source.inputs or not is_op(source.inputs[0], "Cast"):
        return False
    first_input = source.inputs[0].inputs[0]
    step = (element_type(first_input), element_type(source))
    if step not in _LOSSLESS:
        return False
    node.inputs[0] = first_input
    return True


def _drop_unused_casts(graph: gs.Graph) -> int:
    dropped = 0
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if is_op(node, "Cast") and not node.outputs[0].outputs and id(node.outputs[0]) not in outputs:
            detach(graph, node)
            dropped += 1
    return dropped


def cast_problems(graph: gs.Graph) -> list[str]:
    """Casts that disagree with their value types, do nothing, or feed another Cast."""
    problems = []
    for node in graph.nodes:
        if not is_op(node, "Cast"):
            continue
        label = node.name or node.outputs[0].name
        to = int(node.attrs["to"])
        source, target = node.inputs[0], node.outputs[0]
        if element_type(target) not in (None, to):
            problems.append(f"Cast '{label}' converts to type {to} but '{target.name}' is typed {element_type(target)}")
        if element_type(source) == to:
            problems.append(f"Cast '{label}' converts '{source.name}' to the type it already has")
        if source.inputs and is_op(source.inputs[0], "Cast"):
            step = (element_type(source.inputs[0].inputs[0]), element_type(source))
            if step in _LOSSLESS:
                problems.append(f"Cast chain: '{source.inputs[0].name or source.name}' then '{label}'")
    return problems
