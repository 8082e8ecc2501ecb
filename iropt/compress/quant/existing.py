"""Parts of a model that are quantized already: quantize leaves them as they are.

Models arrive quantized in part or in full: quantization-aware training exports, QDQ models
from other tools, int8 operator models. Quantizing such a node again would put a second
QuantizeLinear/DequantizeLinear pair on values that are already on an int8 grid (with a scale
of its own, so the first grid is lost) or requantize a weight from its rounded values. A node
is taken as quantized when

- its weight (input 1 of Conv, ConvTranspose, Gemm, MatMul) is the output of a
  DequantizeLinear: a QDQ weight;
- every float input it has comes from a DequantizeLinear and every consumer of its output is a
  QuantizeLinear: an op inside a QDQ region (quantized Add, MaxPool...);
- it is an integer or quantized operator itself (QLinearConv, MatMulInteger, MatMulNBits...).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from iropt.compress.quant.placement import ANCHOR_OPS, node_key
from iropt.ir.graph import constant_value, is_op

QUANTIZED_OPS = (
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QGemm",
    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits",
    "MatMulBnb4", "GatherBlockQuantized", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
)


def _from_dequantize(tensor: gs.Tensor) -> bool:
    return bool(tensor.inputs) and is_op(tensor.inputs[0], "DequantizeLinear")


def is_quantized(node: gs.Node) -> bool:
    """Whether `node` is part of the model's existing quantization (see the module docstring)."""
    if node.op in QUANTIZED_OPS:
        return True
    if is_op(node, *ANCHOR_OPS) and len(node.inputs) > 1 and _from_dequantize(node.inputs[1]):
        return True
    activations = [t for t in node.inputs if t.name and constant_value(t) is None]
    consumers = [c for out in node.outputs for c in out.outputs]
    return (
        bool(activations) and bool(consumers)
        and all(_from_dequantize(t) for t in activations)
        and all(is_op(c, "QuantizeLinear") for c in consumers)
    )


def quantized_keys(graph: gs.Graph) -> frozenset[str]:
    """Keys (`node_key`) of the nodes of `graph` that are quantized already."""
    return frozenset(node_key(index) for index, node in enumerate(graph.nodes) if is_quantized(node))
