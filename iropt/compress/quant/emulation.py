"""One model that runs any subset of a plan's layers fake-quantized, chosen per run.

Sensitivity analysis asks "what does the model give with these layers quantized and those in
float?" many times. Building a quantized copy, rewriting it and opening a session per question
costs about a plain quantization each. The emulation model answers every question from one
session: it is the fully quantized QDQ model with each Q/DQ pair behind a run-time switch. A
bool graph input `quantization_switches` has one entry per layer of the plan (in plan order),
and every place the rewrite would read a dequantized value reads

    If(switch) then DequantizeLinear(QuantizeLinear(x)) else x

instead, so a layer runs float or fake-quantized depending on the vector fed with the inputs
(an If rather than a Where over both values: the branch not taken is not computed). Weights
and biases get `If(switch) then DequantizeLinear(int8 w) else w`.

The switches reproduce what `insert_qdq` writes for any sub-plan of the full plan (the nodes
of `plan_quantization` with more layers excluded, or with `only` some): a tensor the rewrite
quantizes for all its consumers (a quantized node's output) is switched by its producer; a
quantized consumer also reads the dequantized value when its own switch is on. A Gemm/MatMul
output is quantized for all consumers only when a quantized consumer reads it, as in the plan.
Scales are those of the full calibration, which the rewrite of a sub-plan uses as well.

Run with ONNX Runtime's graph optimizations off (the reference runner, which the analysis uses
for the rewritten model too), the emulation computes what the rewritten model computes as
written: float arithmetic on dequantized values. (With them on, ORT would fuse the rewritten
model's Q/DQ into int8 kernels, which round differently, and could not fuse them behind a switch.)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.quant.params import QParams, Scheme, bias_params, weight_params
from iropt.compress.quant.placement import Plan, QuantizedNode, QuantizedTensor
from iropt.compress.quant.rewrite import names_for
from iropt.ir.channels import weight_layout
from iropt.ir.graph import FreshNames, constant_value, is_op, replace_in
from iropt.ir.model import Model
from iropt.ir.toposort import sorted_nodes

SWITCHES = "quantization_switches"


class NotEmulated(Exception):
    """The model cannot be emulated with switches; the caller rebuilds a model per trial instead."""


@dataclass(frozen=True)
class Emulation:
    """The emulation model and the layer key behind each entry of its switch vector."""

    model: Model
    keys: tuple[str, ...]

    def switches(self, quantized: Collection[str]) -> np.ndarray:
        """The switch vector that runs the layers with keys in `quantized` fake-quantized."""
        unknown = set(quantized) - set(self.keys)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} are not in the emulated plan")
        return np.array([key in quantized for key in self.keys], dtype=np.bool_)


def build_emulation(
    model: Model, plan: Plan, params: Mapping[str, QParams], scheme: Scheme, observed: Collection[str] | None = None,
) -> Emulation:
    """Rewrite `model` in place into the emulation of `plan` (made on this model's graph).

    `observed`: the tensors that must keep their names with the value the rewrite gives them
    (to be added as outputs); None: all of them. A quantized node's output that no one else
    needs is then not materialized: its quantized readers each switch on their own or its
    producer's layer, which saves a copy per tensor and run.

    Raises NotEmulated when the graph already has an input named like the switches.
    """
    graph = model.graph
    if any(tensor.name == SWITCHES for tensor in graph.inputs) or SWITCHES in graph.tensors():
        raise NotEmulated(f"the model already has a tensor named {SWITCHES}")
    switches = gs.Variable(SWITCHES, dtype=np.bool_, shape=[len(plan.nodes)])
    builder = _Builder(graph, scheme, plan, _Switches(graph, switches, [c.key for c in plan.nodes]), observed)
    # Weights first: a bias's scale reads its node's input tensor, which activations re-point.
    for candidate in plan.nodes:
        builder.weight_and_bias(candidate, params)
    for name, item in plan.tensors.items():
        builder.activation(item, params[name])
    graph.inputs.append(switches)
    graph.nodes = sorted_nodes(graph)
    return Emulation(model, tuple(c.key for c in plan.nodes))


class _Switches:
    """Bool scalars read from the switch vector, one Gather per layer (made once, shared)."""

    def __init__(self, graph: gs.Graph, vector: gs.Variable, keys: Sequence[str]) -> None:
        self.graph = graph
        self.vector = vector
        self.index = {key: position for position, key in enumerate(keys)}
        self.name: FreshNames = names_for(graph)
        self._made: dict[str, gs.Variable] = {}

    def of(self, key: str) -> gs.Variable:
        """Layer `key`'s switch."""
        if key not in self._made:
            index = gs.Constant(self.name(f"{SWITCHES}_index"), values=np.array(self.index[key], dtype=np.int64))
            self._made[key] = self._node("Gather", [self.vector, index])
        return self._made[key]

    def any_of(self, keys: Sequence[str]) -> gs.Variable:
        """On when any of the layers `keys` is on."""
        result = self.of(keys[0])
        for key in keys[1:]:
            result = self._node("Or", [result, self.of(key)])
        return result

    def both(self, first: gs.Variable, second: gs.Variable) -> gs.Variable:
        return self._node("And", [first, second])

    def either(self, first: gs.Variable, second: gs.Variable) -> gs.Variable:
        return self._node("Or", [first, second])

    def _node(self, op: str, inputs: list[gs.Tensor]) -> gs.Variable:
        out = gs.Variable(self.name(f"{SWITCHES}_{op.lower()}"), dtype=np.bool_, shape=[])
        self.graph.nodes.append(gs.Node(op, self.name(f"{SWITCHES}_{op}"), inputs=inputs, outputs=[out]))
        return out


@dataclass(frozen=True)
class _FakeQuantized:
    """What a switched Q/DQ of one activation reads."""

    source: gs.Tensor
    scale: gs.Constant
    zero: gs.Constant


class _Builder:
    def __init__(
        self, graph: gs.Graph, scheme: Scheme, plan: Plan, switches: _Switches, observed: Collection[str] | None,
    ) -> None:
        self.graph = graph
        self.observed = observed
        self.scheme = scheme
        # Looked up before the rewiring starts: re-pointing a producer changes `output`.
        self._key = {id(c.node): c.key for c in plan.nodes}
        self._producer = {id(c.output): c for c in plan.nodes}
        self.switches = switches
        self.name = switches.name
        # A weight shared by several nodes is quantized once per axis, as the rewrite does.
        self._weights: dict[tuple[int, int | None], tuple[list[gs.Constant], QParams]] = {}

    def _stored(self, base: str, values: np.ndarray, params: QParams) -> list[gs.Constant]:
        """The inputs of a DequantizeLinear of stored quantized `values`."""
        return [
            gs.Constant(self.name(f"{base}_quantized"), values=values),
            gs.Constant(self.name(f"{base}_scale"), values=params.scale),
            gs.Constant(self.name(f"{base}_zero_point"), values=params.zero_point),
        ]

    def _dequantized(self, switch: gs.Variable, stored: list[gs.Constant], params: QParams, off: gs.Tensor,
                     base: str, shape: list[int]) -> gs.Variable:
        """`If(switch)`: DequantizeLinear of the stored values, else the float `off`."""
        out = gs.Variable(self.name(f"{base}_dequantized"), dtype=np.float32, shape=shape)
        attrs = {"axis": params.axis} if params.axis is not None else {}
        dequantize = gs.Node("DequantizeLinear", self.name(f"{base}_DequantizeLinear"), attrs, inputs=stored, outputs=[out])
        return self._if(switch, [dequantize], out, off, base)
    def weight_and_bias(self, candidate: QuantizedNode, params: Mapping[str, QParams]) -> None:
        """Switch the node's weight (and int32 bias, for formats that have one) per layer."""
        if candidate.weight is None:
            return
        node, spec = candidate.node, candidate.weight
        tensor = node.inputs[spec.index]
        value = constant_value(tensor)
        assert value is not None
        cache_key = (id(tensor), spec.axis)
        if cache_key not in self._weights:
            quantized, weight_qparams = weight_params(value, spec.axis, self.scheme.weight_qmax)
            self._weights[cache_key] = (self._stored(tensor.name, quantized, weight_qparams), weight_qparams)
        stored, weight_qparams = self._weights[cache_key]
        switch = self.switches.of(candidate.key)
        node.inputs[spec.index] = self._dequantized(switch, stored, weight_qparams, tensor, tensor.name, list(value.shape))
        if self.scheme.int32_bias and candidate.bias_index is not None:
            input_params = params[node.inputs[candidate.activation_inputs[0]].name]
            self._bias(candidate, switch, input_params.scale, weight_qparams.scale, value)

    def _bias(
        self, candidate: QuantizedNode, switch: gs.Variable, input_scale: np.ndarray, weight_scale: np.ndarray,
        weight: np.ndarray,
    ) -> None:
        assert candidate.bias_index is not None
        node = candidate.node
        tensor = node.inputs[candidate.bias_index]
        value = constant_value(tensor)
        assert value is not None
        channels = int(weight_scale.size) if weight_scale.ndim else _output_channels(node, weight)
        if value.size != channels or channels == 0:
            return  # the rewrite keeps a bias broadcast over rows float
        value = value.astype(np.float64).reshape(-1)
        if is_op(node, "Gemm"):
            # The rewrite folds beta into the bias and sets beta to 1; the float branch gets
            # the same folded bias, so both read `C` with beta 1.
            value = value * float(node.attrs.get("beta", 1.0))
            node.attrs["beta"] = 1.0
        quantized, bias_qparams = bias_params(value, input_scale, weight_scale)
        folded = gs.Constant(self.name(f"{tensor.name}_folded"), values=value.astype(np.float32))
        stored = self._stored(tensor.name, quantized, bias_qparams)
        node.inputs[candidate.bias_index] = self._dequantized(switch, stored, bias_qparams, folded, tensor.name, [channels])

    def activation(self, item: QuantizedTensor, params: QParams) -> None:
        """Quantize-dequantize an activation and switch each reader between the two values."""
        tensor = item.tensor
        base = tensor.name
        shape = tensor.shape
        source: gs.Tensor = tensor
        producer_switch = self._producer_switch(item)
        if producer_switch is not None and tensor.inputs:
            # As the rewrite does: the producer writes a new tensor and the tensor of the
            # original name (graph outputs included) is the switched value, so every reader
            # sees the dequantized value when the producing layer is quantized.
            source = gs.Variable(self.name(f"{base}_float"), dtype=np.float32, shape=shape)
            replace_in(tensor.inputs[0].outputs, tensor, source)
        scale = gs.Constant(self.name(f"{base}_scale"), values=params.scale)
        zero = gs.Constant(self.name(f"{base}_zero_point"), values=params.zero_point)
        fake_quantized = _FakeQuantized(source, scale, zero)
        if source is not tensor and not self._needed(item):
            assert producer_switch is not None
            for consumer in item.consumers:
                switch = self.switches.either(producer_switch, self.switches.of(self._key[id(consumer)]))
                replace_in(consumer.inputs, tensor, self._switched(switch, fake_quantized, source, base))
            return
        if source is not tensor:
            assert producer_switch is not None
            self._switched(producer_switch, fake_quantized, source, base, out=tensor)
        for consumer in item.consumers:
            # A quantized consumer reads the dequantized value when its own layer is on, and
            # otherwise what every other reader sees.
            switch = self.switches.of(self._key[id(consumer)])
            replace_in(consumer.inputs, tensor, self._switched(switch, fake_quantized, tensor, base))

    def _needed(self, item: QuantizedTensor) -> bool:
        """Whether the tensor must exist under its name: observed, a graph output, or read by
        a node that is not one of its quantized consumers."""
        tensor = item.tensor
        if self.observed is None or tensor.name in self.observed or any(t is tensor for t in self.graph.outputs):
            return True
        quantized = {id(consumer) for consumer in item.consumers}
        return any(id(reader) not in quantized for reader in tensor.outputs)

    def _switched(
        self, switch: gs.Variable, on: _FakeQuantized, off: gs.Tensor, base: str, out: gs.Variable | None = None,
    ) -> gs.Variable:
        """`If(switch)`: QuantizeLinear -> DequantizeLinear of the float value, else `off`."""
        shape = on.source.shape
        quantized = gs.Variable(self.name(f"{base}_quantized"), dtype=on.zero.values.dtype, shape=shape)
        dequantized = gs.Variable(self.name(f"{base}_dequantized"), dtype=np.float32, shape=shape)
        nodes = [
            gs.Node("QuantizeLinear", self.name(f"{base}_QuantizeLinear"),
                    inputs=[on.source, on.scale, on.zero], outputs=[quantized]),
            gs.Node("DequantizeLinear", self.name(f"{base}_DequantizeLinear"),
                    inputs=[quantized, on.scale, on.zero], outputs=[dequantized]),
        ]
        return self._if(switch, nodes, dequantized, off, base, out)

    def _if(
        self, switch: gs.Variable, nodes: list[gs.Node], value: gs.Variable, off: gs.Tensor, base: str,
        out: gs.Variable | None = None,
    ) -> gs.Variable:
        """`If(switch)` computes `value` with `nodes`, else passes `off` on.

        An If, not a Where over both values: the branch not taken is not computed, and ONNX
        Runtime's Where with a scalar condition is slower than the Q/DQ it would select (on a
        ResNet-50, Where over the weights alone cost more than all its int8 Q/DQ)."""
        kept = gs.Variable(self.name(f"{base}_kept"), dtype=np.float32, shape=value.shape)
        then_branch = gs.Graph(nodes=nodes, outputs=[value], name=self.name(f"{base}_quantized_branch"))
        else_branch = gs.Graph(
            nodes=[gs.Node("Identity", self.name(f"{base}_Identity"), inputs=[off], outputs=[kept])],
            outputs=[kept], name=self.name(f"{base}_float_branch"),
        )
        out = out if out is not None else gs.Variable(self.name(f"{base}_switched"), dtype=np.float32, shape=value.shape)
        attrs = {"then_branch": then_branch, "else_branch": else_branch}
        self.graph.nodes.append(gs.Node("If", self.name(f"{base}_If"), attrs, inputs=[switch], outputs=[out]))
        return out

    def _producer_switch(self, item: QuantizedTensor) -> gs.Variable | None:
        """The switch under which every reader of `item` reads it quantized, or None when only
        its quantized consumers do (the tensor is no quantized node's output)."""
        if not item.all_consumers:
            return None
        producer = self._producer.get(id(item.tensor))
        if producer is None:
            raise NotEmulated(f"{item.tensor.name} is quantized for all readers but no layer of the plan writes it")
        switch = self.switches.of(producer.key)
        if is_op(producer.node, "Gemm", "MatMul"):
            # Quantized only when a quantized node reads it (QGemm can write float otherwise).
            readers = [self._key[id(consumer)] for consumer in item.consumers]
            if not readers:
                raise NotEmulated(f"{item.tensor.name}: a float Gemm/MatMul output quantized for no reader")
            switch = self.switches.both(switch, self.switches.any_of(readers))
        return switch


def _output_channels(node: gs.Node, weight: np.ndarray) -> int:
    layout = weight_layout(node, weight.ndim)
    assert layout is not None, f"{node.op} is not a weighted op"
    return layout.output_channels(weight.shape)
