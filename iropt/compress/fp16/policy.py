"""Which nodes run in float16, and for each node kept in float32, why.

A node is a candidate when it reads or writes a float32 tensor. It stays float32 when:

- its op type is blocked (`DEFAULT_BLOCK_OP_TYPES`: index and box arithmetic where float16's 11
  bits of mantissa change results, ops whose output type is set by an attribute) or its name
  matches a `block_nodes` pattern;
- it has no ONNX schema at the model's opset (custom domains), or its schema gives an output no
  float16 form (Range, NonMaxSuppression, DequantizeLinear before opset 19);
- it holds a subgraph (If/Loop/Scan bodies are left as they are), or writes a tensor that a
  subgraph reads (the body expects float32);
- on the data, a tensor it reads or writes reaches more than `max_abs` (float16 ends at 65504;
  the default leaves 4x headroom for inputs the data did not show);
- one of its weights is beyond float16's range, or loses more than 1% of its non-zero values
  to zero;
- it reduces more than `max_reduction` elements into one value (sums, means, norms, softmax,
  layer norm): a long float16 accumulation loses the small terms.

A schema input without a float16 form (Resize's scales) stays float32 on a float16 node. A
Constant node follows its consumers: float16 only when every one of them reads it in float16.

Why the schema and not a list of ONNX Runtime's CPU kernels: asked op by op (bench/fp16.py),
the CPU provider (1.32, x86) has float16 kernels for a few ops (LayerNormalization, Clip, data
movement) and runs every other float16 node through a float32 kernel between Casts it inserts
itself; it refuses a float16 node only where the ONNX schema has no float16 form (Range,
NonMaxSuppression, Resize's scales), which the schema check above already keeps in float32.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.compress.fp16.ranges import Observed
from iropt.ir.graph import constant_value, node_subgraphs, peek_values

FLOAT: int = onnx.TensorProto.FLOAT
FLOAT16: int = onnx.TensorProto.FLOAT16
FP16_MAX = 65504.0
# The smallest positive float16 (a subnormal): smaller magnitudes round to zero.
FP16_TINY = 2.0**-24
# A weight losing more than this fraction of its non-zero values to zero stays float32.
MAX_FLUSHED_FRACTION = 0.01

DEFAULT_BLOCK_OP_TYPES: tuple[str, ...] = (
    # Index and geometry arithmetic: positions and boxes need more than 11 mantissa bits.
    "Range", "CumSum", "TopK", "NonMaxSuppression", "RoiAlign", "MaxRoiPool",
    # The output type comes from an attribute, not from the inputs.
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
    "Multinomial", "EyeLike",
)

# Ops that add up many terms into one value, with how their depth is counted.
_AXES_REDUCTIONS = (
    "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd",
)
_SPATIAL_REDUCTIONS = ("GlobalAveragePool", "GlobalLpPool")
_AXIS_REDUCTIONS = ("Softmax", "LogSoftmax", "LayerNormalization")


@dataclass(frozen=True)
class Policy:
    """The options that decide precision (see the module docstring)."""

    block_op_types: frozenset[str] = frozenset(DEFAULT_BLOCK_OP_TYPES)
    block_nodes: tuple[str, ...] = ()
    max_abs: float = FP16_MAX / 4
    max_reduction: int = 4096


@dataclass(frozen=True)
class KeptNode:
    """A node left in float32: its label, op type and the reason."""

    label: str
    op: str
    reason: str


@dataclass
class Decision:
    """The node-level plan the rewrite follows."""

    half: set[int] = field(default_factory=set)  # id() of nodes that run in float16
    kept: list[KeptNode] = field(default_factory=list)
    # (id(node), input index): inputs of float16 nodes whose schema wants float32.
    float_inputs: set[tuple[int, int]] = field(default_factory=set)

    def is_half(self, node: gs.Node) -> bool:
        return id(node) in self.half


def node_label(node: gs.Node, index: int) -> str:
    return node.name or f"{node.op}#{index}"


def decide(
    graph: gs.Graph,
    dtypes: Mapping[str, int],
    opsets: Mapping[str, int],
    policy: Policy,
    observed: Observed | None,
) -> Decision:
    """Decide every candidate node of the top-level graph (subgraph bodies are not touched)."""
    decision = Decision()
    pinned = _read_by_subgraphs(graph)
    candidates = []
    for index, node in enumerate(graph.nodes):
        if not _touches_float(node, dtypes) or _widens_half(node, dtypes):
            continue
        label = node_label(node, index)
        if node.op == "Constant":
            candidates.append((node, label))
            continue
        reason = _float32_reason(node, dtypes, opsets, policy, observed, pinned, decision)
        if reason is None:
            decision.half.add(id(node))
        else:
            decision.kept.append(KeptNode(label, node.op, reason))
    for node, label in candidates:
        _settle_constant(node, label, decision, dtypes, pinned)
    return decision


def _widens_half(node: gs.Node, dtypes: Mapping[str, int]) -> bool:
    """A Cast from float16 to float32: a precision boundary already, left as it is."""
    return node.op == "Cast" and node.attrs.get("to") == FLOAT and dtypes.get(node.inputs[0].name) == FLOAT16


def _touches_float(node: gs.Node, dtypes: Mapping[str, int]) -> bool:
    return any(dtypes.get(t.name) == FLOAT for t in [*node.inputs, *node.outputs] if t.name)


def _float32_reason(
    node: gs.Node,
    dtypes: Mapping[str, int],
    opsets: Mapping[str, int],
    policy: Policy,
    observed: Observed | None,
    pinned: set[str],
    decision: Decision,
) -> str | None:
    """Why `node` stays float32, or None when it runs in float16."""
    if node_subgraphs(node):
        return f"{node.op} holds a subgraph (bodies stay float32)"
    if node.op in policy.block_op_types:
        return f"op type {node.op} is blocked (block_op_types)"
    for pattern in policy.block_nodes:
        if fnmatch.fnmatchcase(node.name or "", pattern):
            return f"name matches block_nodes pattern '{pattern}'"
    reason = _schema_reason(node, dtypes, opsets, decision)
    if reason is not None:
        return reason
    for tensor in node.outputs:
        if tensor.name in pinned:
            return f"writes '{tensor.name}', which an If/Loop/Scan body reads in float32"
    return (
        _constant_attribute_reason(node)
        or _weight_reason(node, dtypes)
        or _range_reason(node, dtypes, policy, observed)
        or _reduction_reason(node, policy, observed)
    )


def _schema_reason(
    node: gs.Node, dtypes: Mapping[str, int], opsets: Mapping[str, int], decision: Decision
) -> str | None:
    domain = "" if node.domain in (None, "", "ai.onnx") else node.domain
    version = opsets.get(domain)
    try:
        schema = onnx.defs.get_schema(node.op, version if version is not None else 1000, domain)
    except onnx.defs.SchemaError:
        where = f"{domain}::" if domain else ""
        return f"no ONNX schema for {where}{node.op} at this opset (custom ops stay float32)"
    for index, tensor in enumerate(node.outputs):
        if dtypes.get(tensor.name) == FLOAT and not _allows_half(schema, schema.outputs, index):
            return f"{node.op}'s schema has no float16 form for output '{tensor.name}'"
    for index, tensor in enumerate(node.inputs):
        if tensor.name and dtypes.get(tensor.name) == FLOAT and not _allows_half(schema, schema.inputs, index):
            decision.float_inputs.add((id(node), index))
    return None


def _allows_half(schema: onnx.defs.OpSchema, formals: Sequence[onnx.defs.OpSchema.FormalParameter], index: int) -> bool:
    if not formals:
        return False
    formal = formals[min(index, len(formals) - 1)]
    constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    allowed = constraints.get(formal.type_str, [formal.type_str])
    return "tensor(float16)" in allowed


def _constant_attribute_reason(node: gs.Node) -> str | None:
    for key in ("value_float", "value_floats"):
        if key in node.attrs:
            return f"its value is a float32 attribute ({key})"
    return None


def _weight_reason(node: gs.Node, dtypes: Mapping[str, int]) -> str | None:
    for tensor in node.inputs:
        if not isinstance(tensor, gs.Constant) or dtypes.get(tensor.name) != FLOAT:
            continue
        reason = weight_problem(tensor.name, peek_values(tensor))
        if reason is not None:
            return reason
    value = node.attrs.get("value")
    if node.op in ("Constant", "ConstantOfShape") and isinstance(value, gs.Constant):
        return weight_problem(f"{node.op} value", peek_values(value))
    return None


def weight_problem(name: str, values: np.ndarray) -> str | None:
    """Why a float32 weight cannot be stored in float16, or None."""
    if values.dtype != np.float32 or values.size == 0:
        return None
    magnitude = np.abs(values[np.isfinite(values)])
    if magnitude.size and float(magnitude.max()) > FP16_MAX:
        return f"weight '{name}' holds |w| = {float(magnitude.max()):.3g}, beyond float16's {FP16_MAX:g}"
    nonzero = magnitude[magnitude > 0]
    flushed = int(np.count_nonzero(nonzero < FP16_TINY / 2))
    if nonzero.size and flushed > MAX_FLUSHED_FRACTION * nonzero.size:
        return f"weight '{name}' would lose {flushed} of {nonzero.size} non-zero values to zero in float16"
    return None


def _range_reason(
    node: gs.Node, dtypes: Mapping[str, int], policy: Policy, observed: Observed | None
) -> str | None:
    if observed is None:
        return None
    for verb, tensors in (("writes", node.outputs), ("reads", node.inputs)):
        for tensor in tensors:
            if isinstance(tensor, gs.Constant) or dtypes.get(tensor.name) != FLOAT:
                continue
            amax = observed.amax.get(tensor.name)
            if amax is not None and amax > policy.max_abs:
                return (
                    f"{verb} '{tensor.name}', which reaches |x| = {amax:.3g} on the data "
                    f"(beyond max_abs {policy.max_abs:g})"
                )
    return None


def _reduction_reason(node: gs.Node, policy: Policy, observed: Observed | None) -> str | None:
    depth = reduction_depth(node, _shape_of(node.inputs[0], observed) if node.inputs else None)
    if depth is not None and depth > policy.max_reduction:
        return f"reduces {depth} elements into one value (beyond max_reduction {policy.max_reduction})"
    return None


def _shape_of(tensor: gs.Tensor, observed: Observed | None) -> tuple[int, ...] | None:
    if observed is not None and tensor.name in observed.shapes:
        return observed.shapes[tensor.name]
    shape = tensor.shape
    if shape is not None and all(isinstance(d, int) and d >= 0 for d in shape):
        return tuple(shape)
    return None


def reduction_depth(node: gs.Node, shape: tuple[int, ...] | None) -> int | None:
    """How many elements one output value of a summing `node` adds up; None if unknown or none."""
    if shape is None or node.op not in (*_AXES_REDUCTIONS, *_SPATIAL_REDUCTIONS, *_AXIS_REDUCTIONS):
        return None
    rank = len(shape)
    if node.op in _SPATIAL_REDUCTIONS:
        return math.prod(shape[2:])
    if node.op in _AXIS_REDUCTIONS:
        default = -1
        axis = int(node.attrs.get("axis", default)) % max(rank, 1)
        if node.op == "LayerNormalization":
            return math.prod(shape[axis:])
        return shape[axis] if rank else None
    axes = _reduction_axes(node)
    if axes is None:
        return math.prod(shape)
    if not axes:
        return None if node.attrs.get("noop_with_empty_axes", 0) else math.prod(shape)
    return math.prod(shape[a % rank] for a in axes) if rank else None


def _reduction_axes(node: gs.Node) -> list[int] | None:
    """The reduced axes: the attribute (older opsets) or the constant second input; None = all."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_value(node.inputs[1])
        if value is None:
            return None  # axes computed at run time: count every element, the worst case
        return [int(a) for a in np.asarray(value).reshape(-1)]
    return None


def _read_by_subgraphs(graph: gs.Graph) -> set[str]:
    """Names of top-level tensors that some subgraph (at any depth) reads from the outer scope."""
    top = {name for name in graph.tensors()}
    read: set[str] = set()
    pending = [sub for node in graph.nodes for sub in node_subgraphs(node)]
    while pending:
        sub = pending.pop()
        for node in sub.nodes:
            read.update(t.name for t in node.inputs if t.name in top)
            pending.extend(node_subgraphs(node))
        read.update(t.name for t in sub.outputs if t.name in top)
    return read


def _settle_constant(
    node: gs.Node, label: str, decision: Decision, dtypes: Mapping[str, int], pinned: set[str]
) -> None:
    """A Constant node is float16 when every consumer reads it in float16 and its value fits."""
    output = node.outputs[0]
    reason = _constant_attribute_reason(node) or _weight_reason(node, dtypes)
    consumers = list(_consumer_inputs(output))
    all_half = bool(consumers) and all(
        decision.is_half(consumer) and (id(consumer), index) not in decision.float_inputs
        for consumer, index in consumers
    )
    if reason is None and all_half and output.name not in pinned:
        decision.half.add(id(node))
    elif reason is not None:
        decision.kept.append(KeptNode(label, node.op, reason))


def _consumer_inputs(tensor: gs.Tensor) -> Iterable[tuple[gs.Node, int]]:
    for consumer in tensor.outputs:
        for index, value in enumerate(consumer.inputs):
            if value is tensor:
                yield consumer, index
