"""Where QuantizeLinear/DequantizeLinear go: which nodes run quantized, which tensors are quantized.

The plan is structural (it never looks at values), so it is made once before calibration to
know which tensors to observe, and again on each copy the sensitivity analysis builds.

Which nodes run quantized:

- *Anchors* carry the compute: Conv, ConvTranspose, Gemm and MatMul with a constant weight. They
  are quantized whenever their op type is selected and they are not excluded.
- *Cheap* ops (Add, Mul, Concat, the pools, Resize, and optional ones such as Softmax) cost
  little in float; quantizing them pays only when a neighbour is quantized, since then the data
  stays in int8 instead of going through DequantizeLinear -> op -> QuantizeLinear. They join
  when one of their inputs comes from a quantized node or their output feeds one.
- *Layout* ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze) join only between two
  quantized nodes, where they move int8 data without requantizing.
  Cheap and layout ops join by growing from the anchors until nothing changes.

Which tensors are quantized: every activation input of a quantized node and, for ONNX Runtime,
every quantized node's output too (its QDQ fusion turns `DQ -> Conv -> Q` into QLinearConv only
when the output is quantized; a Gemm or MatMul whose consumers are all float may stay
`DQ -> op` with a float output: QGemm and MatMulIntegerToFloat take that form).

A Relu or Clip that is the only consumer of a quantized node's output is *absorbed*: the
quantized tensor is the activation's output, so the range the node's output is calibrated to
is the post-activation range. With uint8 that range starts at 0, the zero point is 0, and ORT
removes the Relu/Clip (a QuantizeLinear with zero point 0 already clamps at 0) and fuses the
rest into QLinearConv.

Ops whose output lies inside their input's range (MaxPool, Resize, layout ops; Concat for
TensorRT) share one scale between input and output, so the back end moves int8 values through
them without requantizing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.compress.quant.params import Scheme
from iropt.ir.channels import weight_layout
from iropt.ir.graph import constant_value, is_graph_output, is_op
from iropt.ir.model import Model

ANCHOR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ELEMENTWISE_OPS = ("Add", "Mul")
POOL_OPS = ("AveragePool", "GlobalAveragePool")
SHARED_SCALE_OPS = ("MaxPool", "Resize")
LAYOUT_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
# Quantized only when asked for in `op_types`: numerically sensitive, or rarely worth it.
OPTIONAL_OPS = ("Softmax", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "LayerNormalization")
ABSORBED_ACTIVATIONS = ("Relu", "Clip")
# Activations ONNX Runtime fuses into a float Conv but not into QLinearConv.
FLOAT_FUSED_ACTIVATIONS = ("HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu")
# Below this many input channels a (non-depthwise) int8 Conv has too little work per output to
# win over ORT's float kernels (the first layer on RGB or gray images)...
MIN_INT8_CONV_CHANNELS = 8
# ... unless its output is large: then QLinearConv wins, and keeping the input layer in int8
# also spares the float -> NHWC uint8 change of layout after it. ORT 1.32, one thread, batch 8,
# stem + 1x1 Conv, stem int8 against stem float: 3->16 on 32x32 (16k outputs per image) 0.65x;
# 3->32 on 64x64 (131k) 1.26x; 3->32 stride 2 on 112x112 (100k) 1.07x; ResNet-50's 7x7 3->64
# stride 2 on 224x224 (802k) 1.44x, and 1.2x on the whole network with its MaxPool in uint8.
MIN_INT8_STEM_OUTPUTS = 32 * 1024

DEFAULT_OP_TYPES: tuple[str, ...] = (
    ANCHOR_OPS + ELEMENTWISE_OPS + ("Concat",) + POOL_OPS + SHARED_SCALE_OPS + LAYOUT_OPS
)
SUPPORTED_OP_TYPES: tuple[str, ...] = DEFAULT_OP_TYPES + OPTIONAL_OPS

FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class WeightSpec:
    """A constant weight input and its per-channel axis (None: per tensor)."""

    index: int
    axis: int | None


@dataclass
class QuantizedNode:
    """A node that runs quantized, with what the rewrite needs to know about it."""

    node: gs.Node
    key: str  # stable across copies of the model: the node's position in the graph
    label: str  # for people: the node's name, or op#position
    activation_inputs: list[int]
    weight: WeightSpec | None = None
    bias_index: int | None = None
    absorbed: gs.Node | None = None  # a Relu/Clip folded into this node's output range

    @property
    def output(self) -> gs.Tensor:
        """The tensor whose range is this node's output range (after an absorbed activation)."""
        source = self.absorbed if self.absorbed is not None else self.node
        return source.outputs[0]

    @property
    def is_anchor(self) -> bool:
        return is_op(self.node, *ANCHOR_OPS)


@dataclass
class QuantizedTensor:
    """An activation tensor that gets QuantizeLinear -> DequantizeLinear.

    `all_consumers`: every consumer reads the dequantized value (needed when it is the output of
    a quantized node, for ORT's fusion); otherwise only the quantized `consumers` do and float
    consumers keep the exact float tensor.
    """

    tensor: gs.Tensor
    consumers: list[gs.Node] = field(default_factory=list)
    all_consumers: bool = False


@dataclass
class Plan:
    """Quantized nodes (graph order), quantized tensors by name, and scale-sharing groups."""

    nodes: list[QuantizedNode]
    tensors: dict[str, QuantizedTensor]
    # tensor name -> representative name; tensors with one representative share a scale.
    groups: dict[str, str]

    def group_members(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for name in self.tensors:
            members.setdefault(self.groups.get(name, name), []).append(name)
        return members


def node_key(index: int) -> str:
    return str(index)


def node_label(node: gs.Node, index: int) -> str:
    return node.name or f"{node.op}#{index}"


def plan_quantization(
    graph: gs.Graph,
    scheme: Scheme,
    *,
    op_types: Collection[str],
    excluded: Callable[[gs.Node, str], bool],
    dtypes: Mapping[str, int],
    only: Collection[str] | None = None,
) -> Plan:
    """The plan for `graph`: nodes of `op_types` not `excluded(node, key)`.

    `dtypes` maps tensor names to ONNX element types (from shape inference); only float32
    activations are quantized. `only` restricts the quantized nodes to these keys, without
    growing from them (to measure one layer alone).
    """
    candidates = _candidates(graph, op_types, excluded, dtypes)
    if only is not None:
        chosen = {key for key in candidates if key in only}
    else:
        chosen = _grow({key for key, c in candidates.items() if c.is_anchor}, candidates)
    nodes = [c for key, c in candidates.items() if key in chosen]
    tensors = _quantized_tensors(graph, nodes, scheme)
    groups = _share_groups(nodes, tensors, scheme)
    return Plan(nodes, tensors, groups)


def _candidates(
    graph: gs.Graph,
    op_types: Collection[str],
    excluded: Callable[[gs.Node, str], bool],
    dtypes: Mapping[str, int],
) -> dict[str, QuantizedNode]:
    found: dict[str, QuantizedNode] = {}
    for index, node in enumerate(graph.nodes):
        key = node_key(index)
        if node.op not in op_types or not is_op(node, node.op) or excluded(node, key):
            continue
        candidate = _describe(graph, node, key, node_label(node, index), dtypes)
        if candidate is not None:
            candidate.absorbed = _absorbable_activation(graph, candidate, dtypes)
            found[key] = candidate
    return found


def _is_float_activation(tensor: gs.Tensor, dtypes: Mapping[str, int]) -> bool:
    if constant_value(tensor) is not None or not tensor.name:
        return False
    return dtypes.get(tensor.name) == FLOAT


def _describe(
    graph: gs.Graph, node: gs.Node, key: str, label: str, dtypes: Mapping[str, int]
) -> QuantizedNode | None:
    """What quantizing `node` means, or None when it cannot be quantized (types, constants)."""
    if len(node.outputs) < 1 or not _is_float_activation(node.outputs[0], dtypes):
        return None
    if any(out.outputs or is_graph_output(graph, out) for out in node.outputs[1:]):
        return None  # a second output in use (MaxPool indices): not a plain op
    if is_op(node, *ANCHOR_OPS):
        return _describe_anchor(node, key, label, dtypes)
    if is_op(node, *ELEMENTWISE_OPS, "Concat"):
        inputs = list(range(len(node.inputs)))
        if len(inputs) < 2 or not all(_is_float_activation(node.inputs[i], dtypes) for i in inputs):
            return None  # a constant operand (a bias add): not worth quantizing
        return QuantizedNode(node, key, label, inputs)
    if not node.inputs or not _is_float_activation(node.inputs[0], dtypes):
        return None
    return QuantizedNode(node, key, label, [0])


def _describe_anchor(node: gs.Node, key: str, label: str, dtypes: Mapping[str, int]) -> QuantizedNode | None:
    if len(node.inputs) < 2 or not _is_float_activation(node.inputs[0], dtypes):
        return None
    weight = constant_value(node.inputs[1])
    if weight is None or weight.dtype.kind != "f" or weight.ndim < 1:
        return None
    bias_index = 2 if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias_index is not None and constant_value(node.inputs[bias_index]) is None:
        return None  # a computed bias: leave the node in float
    layout = weight_layout(node, weight.ndim)
    axis = layout.per_channel_axis if layout is not None else None
    if is_op(node, "MatMul"):
        bias_index = None
        if weight.ndim != 2:
            return None  # batched constant weights: rare, and MatMulInteger needs 2-D here
    return QuantizedNode(node, key, label, [0], WeightSpec(1, axis), bias_index)


def _absorbable_activation(graph: gs.Graph, candidate: QuantizedNode, dtypes: Mapping[str, int]) -> gs.Node | None:
    """The Relu/Clip that is the sole consumer of `candidate`'s output, when it can be absorbed."""
    node = candidate.node
    if is_op(node, *SHARED_SCALE_OPS, *LAYOUT_OPS):
        return None  # these share their input's scale; an activation after them stays separate
    output = node.outputs[0]
    if is_graph_output(graph, output) or len(output.outputs) != 1:
        return None
    consumer = output.outputs[0]
    if not is_op(consumer, *ABSORBED_ACTIVATIONS) or consumer.inputs[0] is not output:
        return None
    if is_op(consumer, "Clip") and any(
        t.name and constant_value(t) is None for t in consumer.inputs[1:]
    ):
        return None  # computed clip bounds
    if not _is_float_activation(consumer.outputs[0], dtypes):
        return None
    return consumer


def ort_slow_reason(node: gs.Node, op_types: Collection[str]) -> str | None:
    """Why ORT's CPU kernels would run `node` slower quantized than in float, or None.

    Measured on ORT 1.32 (x86-64, one thread): ConvTranspose has no int8 kernel, so quantizing
    it only adds Q/DQ; a Conv with fewer than 8 input channels (group 1) and a small output is
    slower as QLinearConv than ORT's float kernel for that shape (see MIN_INT8_STEM_OUTPUTS); a
    Conv whose only consumer is HardSwish or a similar activation loses the activation fusion
    that the float Conv gets, and pays for a DequantizeLinear, the float activation and a
    QuantizeLinear (unless that activation is quantized too, by listing it in `op_types`).
    """
    if is_op(node, "ConvTranspose"):
        return "ConvTranspose has no int8 kernel in ONNX Runtime's CPU provider"
    if not is_op(node, "Conv"):
        return None
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    group = int(node.attrs.get("group", 1))
    if weight is not None and weight.ndim >= 2 and group == 1 and weight.shape[1] < MIN_INT8_CONV_CHANNELS:
        outputs = _outputs_per_sample(node.outputs[0])
        if outputs is None or outputs < MIN_INT8_STEM_OUTPUTS:
            return f"{weight.shape[1]} input channel(s) and a small output: too little work for int8 to pay off"
    output = node.outputs[0]
    if len(output.outputs) == 1:
        consumer = output.outputs[0]
        if is_op(consumer, *FLOAT_FUSED_ACTIVATIONS) and consumer.op not in op_types:
            return f"followed by {consumer.op}, which ONNX Runtime fuses into float Conv only"
    return None


def _outputs_per_sample(tensor: gs.Tensor) -> int | None:
    """Elements of one batch item of `tensor` (all axes but the first), when they are known."""
    shape = getattr(tensor, "shape", None)
    if not shape or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return int(np.prod(shape[1:]))


def _grow(chosen: set[str], candidates: Mapping[str, QuantizedNode]) -> set[str]:
    """Add cheap and layout candidates next to quantized nodes until nothing changes."""
    by_node = {id(c.node): key for key, c in candidates.items()}
    absorbed_by = {id(c.absorbed): key for key, c in candidates.items() if c.absorbed is not None}

    def from_quantized(tensor: gs.Tensor) -> bool:
        if not tensor.inputs:
            return False
        producer = tensor.inputs[0]
        key = by_node.get(id(producer), absorbed_by.get(id(producer)))
        return key is not None and key in chosen

    def feeds_quantized(tensor: gs.Tensor) -> bool:
        for consumer in tensor.outputs:
            key = by_node.get(id(consumer))
            if key is None:
                continue
            if key in chosen:
                return True
            # Look through layout ops not chosen yet: they join once their far side is quantized.
            if is_op(consumer, *LAYOUT_OPS) and feeds_quantized(consumer.outputs[0]):
                return True
        return False

    changed = True
    while changed:
        changed = False
        for key, candidate in candidates.items():
            if key in chosen or candidate.is_anchor:
                continue
            inputs = [candidate.node.inputs[i] for i in candidate.activation_inputs]
            if is_op(candidate.node, *LAYOUT_OPS):
                joins = from_quantized(inputs[0]) and feeds_quantized(candidate.output)
            elif is_op(candidate.node, *POOL_OPS, "MaxPool"):
                # A pool after a float layer stays float: quantizing its input instead of its
                # output moves more data, and ORT's uint8 pools are fast only inside an int8
                # (NHWC) region (ResNet-50's MaxPool after a float stem: 33 ms against 0.9).
                joins = from_quantized(inputs[0])
            else:
                joins = any(from_quantized(t) for t in inputs) or feeds_quantized(candidate.output)
            if joins:
                chosen.add(key)
                changed = True
    return chosen


def _quantized_tensors(graph: gs.Graph, nodes: list[QuantizedNode], scheme: Scheme) -> dict[str, QuantizedTensor]:
    tensors: dict[str, QuantizedTensor] = {}
    quantized_ids = {id(c.node) for c in nodes}

    def entry(tensor: gs.Tensor) -> QuantizedTensor:
        if tensor.name not in tensors:
            tensors[tensor.name] = QuantizedTensor(tensor)
        return tensors[tensor.name]

    for candidate in nodes:
        for index in candidate.activation_inputs:
            item = entry(candidate.node.inputs[index])
            if not any(n is candidate.node for n in item.consumers):
                item.consumers.append(candidate.node)
    if scheme.quantize_outputs:
        for candidate in nodes:
            output = candidate.output
            float_output_ok = is_op(candidate.node, "Gemm", "MatMul")
            if float_output_ok and not any(id(c) in quantized_ids for c in output.outputs):
                continue  # QGemm / MatMulIntegerToFloat produce float directly
            entry(output).all_consumers = True
    return tensors


def _share_groups(nodes: list[QuantizedNode], tensors: Mapping[str, QuantizedTensor], scheme: Scheme) -> dict[str, str]:
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for candidate in nodes:
        node = candidate.node
        shares = is_op(node, *SHARED_SCALE_OPS, *LAYOUT_OPS) or (
            scheme.share_concat_scale and is_op(node, "Concat")
        )
        if not shares or candidate.output.name not in tensors:
            continue
        for index in candidate.activation_inputs:
            union(node.inputs[index].name, candidate.output.name)
    return {name: find(name) for name in tensors}


def tensor_types(model: Model) -> dict[str, int]:
    """ONNX element type of every tensor whose type is known or can be inferred."""
    types: dict[str, int] = {}
    for name, tensor in model.graph.tensors().items():
        if tensor.dtype is not None and not isinstance(tensor.dtype, int):
            try:
                types[name] = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
            except (KeyError, TypeError):
                continue
    try:
        inferred = onnx.shape_inference.infer_shapes(model.to_onnx())
    except Exception:  # inference is best effort; the types known above still count
        return types
    graph = inferred.graph
    for info in [*graph.value_info, *graph.input, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types.setdefault(info.name, info.type.tensor_type.elem_type)
    return types
