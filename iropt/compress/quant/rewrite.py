"""Static quantization rewrite: insert QuantizeLinear/DequantizeLinear as a `Plan` says.

- Activations: `x -> QuantizeLinear -> DequantizeLinear -> x'` with per-tensor parameters. When
  every consumer must read `x'` (the output of a quantized node) the producer is re-pointed to
  a new tensor and the DequantizeLinear writes the original one, so tensor names, graph output
  names included, do not change. Otherwise only the quantized consumers read `x'`, and float
  consumers keep the exact value.
- Weights: the int8 weight is stored as an initializer followed by a DequantizeLinear
  (per-channel on the output-channel axis, zero point 0) instead of a float weight with a
  QuantizeLinear in front: the model is 4x smaller and nothing is quantized at run time.
- Bias (ORT format): `int32 bias -> DequantizeLinear` with `scale = input_scale * weight_scale`,
  the form ORT's QDQ transformer folds into QLinearConv/QGemm. TensorRT keeps the float bias.

New nodes are appended to the graph; the caller puts the graph back in topological order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.quant.params import QParams, Scheme, bias_params, weight_params
from iropt.compress.quant.placement import Plan, QuantizedNode, QuantizedTensor
from iropt.ir.channels import weight_layout
from iropt.ir.graph import FreshNames, constant_value, fresh_names, is_op, replace_in


@dataclass
class RewriteStats:
    quantized_nodes: int = 0
    quantized_activations: int = 0
    quantized_weights: int = 0
    quantized_biases: int = 0


def names_for(graph: gs.Graph) -> FreshNames:
    """New tensor and node names for `graph` (`base`, `base_1`, ...)."""
    return fresh_names([graph])


def insert_qdq(graph: gs.Graph, plan: Plan, params: Mapping[str, QParams], scheme: Scheme) -> RewriteStats:
    """Rewrite `graph` in place: quantize the plan's weights, biases and activations."""
    rewriter = _Rewriter(graph, scheme)
    stats = RewriteStats(quantized_nodes=len(plan.nodes))
    for candidate in plan.nodes:
        if candidate.weight is not None:
            weight_scale = rewriter.weight(candidate)
            if scheme.int32_bias and candidate.bias_index is not None:
                input_params = params[candidate.node.inputs[candidate.activation_inputs[0]].name]
                stats.quantized_biases += rewriter.bias(candidate, input_params.scale, weight_scale)
    stats.quantized_weights = rewriter.weights_done
    for name, item in plan.tensors.items():
        rewriter.activation(item, params[name])
        stats.quantized_activations += 1
    return stats


class _Rewriter:
    def __init__(self, graph: gs.Graph, scheme: Scheme) -> None:
        self.graph = graph
        self.scheme = scheme
        self.name = names_for(graph)
        # A weight shared by several nodes is quantized once per axis.
        self._weights: dict[tuple[int, int | None], tuple[gs.Variable, QParams]] = {}
        self.weights_done = 0

    def _dequantize(self, base: str, values: np.ndarray, params: QParams, shape: list[int]) -> gs.Variable:
        """An initializer of quantized `values` and the DequantizeLinear that reads it back."""
        stored = gs.Constant(self.name(f"{base}_quantized"), values=values)
        scale = gs.Constant(self.name(f"{base}_scale"), values=params.scale)
        zero = gs.Constant(self.name(f"{base}_zero_point"), values=params.zero_point)
        out = gs.Variable(self.name(f"{base}_dequantized"), dtype=np.float32, shape=shape)
        attrs = {"axis": params.axis} if params.axis is not None else {}
        self.graph.nodes.append(
            gs.Node(
                "DequantizeLinear", self.name(f"{base}_DequantizeLinear"), attrs,
                inputs=[stored, scale, zero], outputs=[out],
            )
        )
        return out

    def weight(self, candidate: QuantizedNode) -> np.ndarray:
        """Replace the node's float weight by int8 + DequantizeLinear; returns the weight scale."""
        assert candidate.weight is not None
        node, spec = candidate.node, candidate.weight
        tensor = node.inputs[spec.index]
        cache_key = (id(tensor), spec.axis)
        if cache_key not in self._weights:
            value = constant_value(tensor)
            assert value is not None
            quantized, params = weight_params(value, spec.axis, self.scheme.weight_qmax)
            out = self._dequantize(tensor.name, quantized, params, list(value.shape))
            self._weights[cache_key] = (out, params)
            self.weights_done += 1
        out, params = self._weights[cache_key]
        node.inputs[spec.index] = out
        return params.scale

    def bias(self, candidate: QuantizedNode, input_scale: np.ndarray, weight_scale: np.ndarray) -> int:
        """Replace the float bias by int32 + DequantizeLinear; 1 when done, 0 when left float."""
        assert candidate.bias_index is not None
        node = candidate.node
        tensor = node.inputs[candidate.bias_index]
        value = constant_value(tensor)
        assert value is not None
        channels = int(weight_scale.size) if weight_scale.ndim else _output_channels(node)
        if value.size != channels or channels == 0:
            return 0  # a bias broadcast over rows (Gemm C of shape [M, N]): keep it float
        value = value.astype(np.float64).reshape(-1)
        if is_op(node, "Gemm"):
            # beta * C is the bias the accumulator needs; with it folded in, beta becomes 1.
            value = value * float(node.attrs.get("beta", 1.0))
            node.attrs["beta"] = 1.0
        quantized, params = bias_params(value, input_scale, weight_scale)
        node.inputs[candidate.bias_index] = self._dequantize(tensor.name, quantized, params, [channels])
        return 1

    def activation(self, item: QuantizedTensor, params: QParams) -> None:
        """Insert QuantizeLinear -> DequantizeLinear on an activation tensor."""
        tensor = item.tensor
        base = tensor.name
        scale = gs.Constant(self.name(f"{base}_scale"), values=params.scale)
        zero = gs.Constant(self.name(f"{base}_zero_point"), values=params.zero_point)
        shape = tensor.shape
        quantized = gs.Variable(self.name(f"{base}_quantized"), dtype=params.zero_point.dtype, shape=shape)
        if item.all_consumers and tensor.inputs:
            # Re-point the producer so the DequantizeLinear writes the original tensor: every
            # consumer (and a graph output of that name) reads the dequantized value.
            source = gs.Variable(self.name(f"{base}_float"), dtype=np.float32, shape=shape)
            replace_in(tensor.inputs[0].outputs, tensor, source)
            dequantized = tensor
        else:
            source = tensor
            dequantized = gs.Variable(self.name(f"{base}_dequantized"), dtype=np.float32, shape=shape)
            for consumer in item.consumers:
                replace_in(consumer.inputs, tensor, dequantized)
        self.graph.nodes.append(
            gs.Node("QuantizeLinear", self.name(f"{base}_QuantizeLinear"),
                    inputs=[source, scale, zero], outputs=[quantized])
        )
        self.graph.nodes.append(
            gs.Node("DequantizeLinear", self.name(f"{base}_DequantizeLinear"),
                    inputs=[quantized, scale, zero], outputs=[dequantized])
        )


def _output_channels(node: gs.Node) -> int:
    """Output channels of an anchor from its float weight's shape (per-tensor weight scale case)."""
    weight = node.inputs[1]
    if isinstance(weight, gs.Variable) and weight.inputs:
        weight = weight.inputs[0].inputs[0]  # read through the DequantizeLinear just inserted
    shape = np.asarray(constant_value(weight)).shape
    layout = weight_layout(node, len(shape))
    assert layout is not None, f"{node.op} is not a weighted op"
    return layout.output_channels(shape)
