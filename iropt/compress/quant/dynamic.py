"""Dynamic quantization of MatMul and Gemm: int8 weights, activations quantized at run time.

For `y = x @ W (+ b)` with a constant `W [K, N]`:

```
x_q, x_scale, x_zero = DynamicQuantizeLinear(x)              # uint8, range of this x
acc   = MatMulInteger(x_q, W_q, x_zero)                      # int32, W_q int8 symmetric
y     = Cast(acc, float) * (x_scale * w_scale)  (+ b)        # w_scale per output column
```

`x ~ (x_q - x_zero) * x_scale` and `W ~ W_q * w_scale[n]` per column, so
`(x @ W)[m, n] ~ x_scale * w_scale[n] * sum_k (x_q - x_zero)[m, k] * W_q[k, n]`, which is
what MatMulInteger accumulates. No calibration is needed: the activation range is measured per
run. ONNX Runtime fuses the chain (with the bias Add) into DynamicQuantizeMatMul. Gemm becomes
the same chain with `W = B` (transposed when `transB`), `alpha` folded into the scale and
`beta * C` added; Gemm with `transA` stays float. New nodes are appended to the graph; the
caller puts it back in topological order.

`weight_qmax` bounds the int8 weights: 63 where the target's uint8 x int8 kernels may add pairs
of products in int16 (x86 without VNNI; see `iropt.compress.quant.params`). The uint8 input
spans all 256 levels with a zero point near 128, so nearly every pair of products is large and
full-range weights make such kernels saturate on most outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.compress.quant.params import WEIGHT_QMAX, weight_params
from iropt.compress.quant.placement import node_key, node_label
from iropt.compress.quant.rewrite import names_for
from iropt.ir.graph import FreshNames, constant_value, is_op

DYNAMIC_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm")


@dataclass(frozen=True)
class DynamicCandidate:
    node: gs.Node
    key: str
    label: str


def dynamic_candidates(
    graph: gs.Graph, op_types: tuple[str, ...] | list[str], excluded: Callable[[gs.Node, str], bool]
) -> list[DynamicCandidate]:
    """MatMul/Gemm nodes with a constant 2-D float weight that dynamic quantization can rewrite."""
    found = []
    for index, node in enumerate(graph.nodes):
        key = node_key(index)
        if node.op not in op_types or not is_op(node, *DYNAMIC_OP_TYPES) or excluded(node, key):
            continue
        if _rewritable(node):
            found.append(DynamicCandidate(node, key, node_label(node, index)))
    return found


def _rewritable(node: gs.Node) -> bool:
    if len(node.inputs) < 2 or constant_value(node.inputs[0]) is not None:
        return False
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return False
    if is_op(node, "Gemm"):
        if int(node.attrs.get("transA", 0)):
            return False
        if len(node.inputs) > 2 and node.inputs[2].name and constant_value(node.inputs[2]) is None:
            return False
    return True


def quantize_dynamic(graph: gs.Graph, candidates: list[DynamicCandidate], weight_qmax: int = WEIGHT_QMAX) -> int:
    """Rewrite `candidates` in place with weights in `[-weight_qmax, weight_qmax]`; returns the
    number of weights quantized."""
    name = names_for(graph)
    quantized_inputs: dict[int, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
    for candidate in candidates:
        node = candidate.node
        x = node.inputs[0]
        if id(x) not in quantized_inputs:
            quantized_inputs[id(x)] = _dynamic_quantize(graph, name, x)
        _rewrite(graph, name, node, weight_qmax, *quantized_inputs[id(x)])
    return len(candidates)


def _dynamic_quantize(graph: gs.Graph, name: FreshNames, x: gs.Tensor) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
    """One DynamicQuantizeLinear per activation, shared by every MatMul that reads it."""
    x_q = gs.Variable(name(f"{x.name}_quantized"), dtype=np.uint8, shape=x.shape)
    x_scale = gs.Variable(name(f"{x.name}_scale"), dtype=np.float32, shape=[])
    x_zero = gs.Variable(name(f"{x.name}_zero_point"), dtype=np.uint8, shape=[])
    graph.nodes.append(
        gs.Node("DynamicQuantizeLinear", name(f"{x.name}_DynamicQuantizeLinear"),
                inputs=[x], outputs=[x_q, x_scale, x_zero])
    )
    return x_q, x_scale, x_zero


def _rewrite(
    graph: gs.Graph,
    name: FreshNames,
    node: gs.Node,
    weight_qmax: int,
    x_q: gs.Variable,
    x_scale: gs.Variable,
    x_zero: gs.Variable,
) -> None:
    weight = constant_value(node.inputs[1])
    assert weight is not None
    alpha, bias = 1.0, None
    if is_op(node, "Gemm"):
        if int(node.attrs.get("transB", 0)):
            weight = weight.T
        alpha = float(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            beta = np.float32(node.attrs.get("beta", 1.0))
            # asarray again: a 0-d bias times a scalar is a numpy scalar, not an array.
            bias = np.asarray(np.asarray(constant_value(node.inputs[2]), dtype=np.float32) * beta)
    base = node.name or node.outputs[0].name
    w_q, params = weight_params(weight, 1, weight_qmax)
    output = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.remove(node)

    w_const = gs.Constant(name(f"{base}_weight_quantized"), values=w_q)
    w_scale = gs.Constant(name(f"{base}_weight_scale"), values=(params.scale * np.float32(alpha)).astype(np.float32))
    scale = gs.Variable(name(f"{base}_scale"), dtype=np.float32, shape=[weight.shape[1]])
    acc = gs.Variable(name(f"{base}_accumulator"), dtype=np.int32, shape=output.shape)
    acc_float = gs.Variable(name(f"{base}_accumulator_float"), dtype=np.float32, shape=output.shape)
    scaled = output if bias is None else gs.Variable(name(f"{base}_scaled"), dtype=np.float32, shape=output.shape)
    graph.nodes.extend([
        gs.Node("Mul", name(f"{base}_scale_Mul"), inputs=[x_scale, w_scale], outputs=[scale]),
        gs.Node("MatMulInteger", name(f"{base}_MatMulInteger"), inputs=[x_q, w_const, x_zero], outputs=[acc]),
        gs.Node("Cast", name(f"{base}_Cast"), {"to": onnx.TensorProto.FLOAT}, inputs=[acc], outputs=[acc_float]),
        gs.Node("Mul", name(f"{base}_Mul"), inputs=[acc_float, scale], outputs=[scaled]),
    ])
    if bias is not None:
        bias_const = gs.Constant(name(f"{base}_bias"), values=bias)
        graph.nodes.append(gs.Node("Add", name(f"{base}_Add"), inputs=[scaled, bias_const], outputs=[output]))
