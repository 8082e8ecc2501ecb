"""fold_constants: compute at optimization time what does not depend on the model's inputs.

- A node whose inputs are all constants is evaluated (`iropt.ir.evaluate`: a numpy fast path for
  shape arithmetic, onnx's reference implementation otherwise) and its outputs become
  initializers. Its output tensors are converted in place, so they keep their names, their
  consumers (in subgraphs too) and their place among the graph outputs; ONNX Runtime and
  TensorRT both accept an initializer as a graph output.
- `Constant` nodes become initializers (`value`, `value_float(s)`, `value_int(s)`); string and
  sparse values stay nodes, because an initializer written by graphsurgeon holds raw numeric
  bytes only.
- `Shape` and `Size` of a tensor whose shape is static (every dimension a known integer, as
  declared on the graph input or in value_info) become constants even though the tensor is not
  one (`fold_shapes`); so does a `Slice` or `Gather` of a `Shape` that picks only known
  dimensions of a tensor whose other dimensions are not known. This trusts the declared
  shapes: a pass that changes a tensor's shape must update or drop its value_info.
- Nodes inside If/Loop/Scan bodies are folded too; they may read constants of the outer graph.
- An `If` whose condition is a constant is replaced by the nodes of the branch it takes
  (`inline_if`). The branch's results are written straight into the If's output tensors, so
  the names the rest of the graph (and the graph outputs) use do not change; an Identity is
  added only where the branch result is a value of the outer graph and the If output is a
  graph output. Branch tensor and node names that clash with names elsewhere are renamed.

Never folded: ops with random results (RandomNormal*, RandomUniform*, Multinomial, Bernoulli,
Dropout in training mode), ops with subgraphs, ops outside the default domain, and
`DequantizeLinear`: a constant int8 (or int4, float8) tensor through DequantizeLinear is how a
quantized model stores its weights. Folding it would store them in float, at 4x the bytes, and
take away the Q/DQ pattern ONNX Runtime's int8 fusions and TensorRT's explicit quantization
look for, turning the quantized layers back into float ones. (A QuantizeLinear of a constant
is folded: its result is such an int8 weight.)

Size guard: folding `ConstantOfShape`, `Expand`, `Tile` and the like can turn a few bytes of
shape into megabytes of initializer. A fold that would grow the model by more than `max_bytes`
(the bytes of its used outputs minus the bytes of constant inputs that only it reads) is
skipped, logged with the node's name, and counted as `skipped_size`; outputs whose size is
known beforehand are checked before anything is computed. Weights are exempt (`fold_weights`):
a value read only as the weight or bias of Conv/ConvTranspose/Gemm/MatMul or as normalization
parameters is materialized by every runtime anyway, and fusions need it constant, so it is
folded whatever its size (the ONNX model zoo's "light" models store all weights as
`ConstantOfShape` fills).

Nodes are visited once, in list order, which ONNX requires to be topological: a folded node's
consumers come later and see its outputs as constants, so chains fold in one sweep and the pass
is linear in the number of nodes. (On a list that is not sorted the pass is still correct; it
folds less.)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from iropt.infra.options import Range
from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.evaluate import EvaluationError, evaluate_node, has_subgraph, is_deterministic
from iropt.ir.graph import is_op, iter_graphs, node_subgraphs, peek_values, replace_in, replace_uses
from iropt.ir.model import Model

# Decoded constants up to this size are kept for the rest of the run (bounded extra memory).
_CACHED_BYTES = 64 * 1024

# Statistics that mean the model changed (skipped_size only reports).
_CHANGE_STATS = ("folded", "shapes_folded", "ifs_inlined", "constants_converted")


@register_pass("fold_constants")
@dataclass(kw_only=True)
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are constants, static Shape/Size, Constant nodes and constant-condition Ifs.

    Options: `max_bytes` skips a fold that would grow the model by more than that many bytes;
    `fold_weights` exempts values read only as weights (see the module docstring);
    `fold_shapes` folds Shape/Size of statically shaped tensors; `inline_if` replaces an If
    with a constant condition by its taken branch.
    """

    max_bytes: Annotated[int, Range(min=0)] = 1 << 20
    fold_weights: bool = True
    fold_shapes: bool = True
    inline_if: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        folder = _Folder(self, model, ctx.log)
        folder.fold_graph(model.graph)
        stats = dict(folder.stats)
        return PassResult(changed=any(stats[k] for k in _CHANGE_STATS), stats=stats)


@dataclass
class _Folder:
    """One run of the pass over one model."""

    options: FoldConstants
    model: Model
    log: logging.Logger
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*_CHANGE_STATS, "skipped_size"), 0))
    # Built on the first If inlining: name -> ids of the distinct tensors (nodes) carrying it.
    _tensor_names: dict[str, set[int]] | None = None
    _node_names: dict[str, set[int]] | None = None
    # Outputs of every graph: graphsurgeon keeps no link for them, so "read by nobody" does
    # not mean "dead" for these.
    _outputs: dict[int, int] = field(default_factory=dict)  # tensor id -> graphs listing it
    _decoded: dict[int, tuple[object, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for graph in iter_graphs(self.model.graph):
            for tensor in {id(t) for t in graph.outputs}:
                self._outputs[tensor] = self._outputs.get(tensor, 0) + 1

    def fold_graph(self, graph: gs.Graph) -> None:
        """Fold `graph` (and, as they come, the subgraphs of its nodes) in one sweep."""
        kept: list[gs.Node] = []
        for node in list(graph.nodes):
            if is_op(node, "Constant"):
                # Strings and sparse values stay Constant nodes (evaluating a sparse one would
                # store it densely).
                if not self._convert_constant(node):
                    kept.append(node)
                continue
            if has_subgraph(node):
                if self.options.inline_if and is_op(node, "If"):
                    inlined = self._try_inline_if(graph, node)
                    if inlined is not None:
                        kept.extend(inlined)
                        continue
                for subgraph in node_subgraphs(node):
                    self.fold_graph(subgraph)
                kept.append(node)
                continue
            if not self._try_fold(node):
                kept.append(node)
        graph.nodes = kept

    # -- Constant nodes ----------------------------------------------------------------------

    def _convert_constant(self, node: gs.Node) -> bool:
        """Turn a Constant node into an initializer of the same name; False when it cannot."""
        if len(node.outputs) != 1 or len(node.attrs) != 1:
            return False
        ((key, value),) = node.attrs.items()
        values: np.ndarray | LazyValues
        if key == "value" and isinstance(value, gs.Constant) and not _is_string_or_sparse(value):
            # Keep LazyValues as they are: the exporter writes their original TensorProto, so
            # element types numpy lacks (bfloat16, float8) survive untouched.
            values = value._values
        elif key == "value_float":
            values = np.array(value, dtype=np.float32)
        elif key == "value_floats":
            values = np.array(list(value), dtype=np.float32)
        elif key == "value_int":
            values = np.array(value, dtype=np.int64)
        elif key == "value_ints":
            values = np.array(list(value), dtype=np.int64)
        else:
            return False  # sparse_value, value_string(s)
        output = node.outputs[0]
        node.outputs.clear()
        output.to_constant(values)
        self.stats["constants_converted"] += 1
        return True

    # -- Ordinary nodes --------------------------------------------------------------------

    def _try_fold(self, node: gs.Node) -> bool:
        """Replace `node` by the constants it computes; False when it stays."""
        if not is_deterministic(node) or is_op(node, *_QUANTIZED_STORAGE_OPS):
            return False
        if self.options.fold_shapes and is_op(node, "Shape", "Size") and self._fold_static_shape(node):
            return True
        if self.options.fold_shapes and is_op(node, "Slice", "Gather") and self._fold_shape_selection(node):
            return True
        present = [t for t in node.inputs if t.name]
        if not all(_is_dense_constant(t) for t in present):
            return False
        inputs = [self._value(t) if t.name else None for t in node.inputs]
        dead = _dead_input_bytes(node, self._outputs)
        limit = self.options.max_bytes
        if self.options.fold_weights and _read_only_as_weights(node, self._outputs):
            limit = sys.maxsize
        estimate = _estimated_output_bytes(node, inputs)
        if estimate is not None and estimate - dead > limit:
            self._skip_for_size(node, estimate - dead)
            return False
        try:
            outputs = evaluate_node(node, inputs, self.model.opset)
        except EvaluationError as exc:
            self.log.debug("fold_constants: %s left alone: %s", _describe(node), exc)
            return False
        growth = sum(v.nbytes for v in outputs if v is not None) - dead
        if growth > limit:
            self._skip_for_size(node, growth)
            return False
        _replace_by_constants(node, outputs)
        self.stats["folded"] += 1
        return True

    def _fold_static_shape(self, node: gs.Node) -> bool:
        """Shape/Size of a non-constant tensor whose (requested) dimensions are all known."""
        if not node.inputs or _is_dense_constant(node.inputs[0]) or len(node.outputs) != 1:
            return False
        shape = node.inputs[0].shape
        if shape is None:
            return False
        dims = list(shape)
        if node.op == "Shape" and self.model.opset >= 15:
            # Python slicing clamps start/end exactly like Shape does; only the requested
            # dimensions need to be known.
            dims = dims[node.attrs.get("start", 0) : node.attrs.get("end")]
        if not all(_is_static_dim(d) for d in dims):
            return False
        if node.op == "Size":
            value = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        else:
            value = np.array(dims, dtype=np.int64)
        _replace_by_constants(node, [value])
        self.stats["shapes_folded"] += 1
        return True

    def _fold_shape_selection(self, node: gs.Node) -> bool:
        """Slice or Gather of a Shape output that selects only known dimensions, while others
        are not known (Shape [batch, seq, 64] -> Gather 2 is 64).

        The node is evaluated on the positions 0..rank-1 instead of the dimensions, which says
        which dimensions it selects, whatever its starts, ends, steps or indices.
        """
        source = node.inputs[0]
        if len(node.outputs) != 1 or len(source.inputs) != 1 or not is_op(source.inputs[0], "Shape"):
            return False
        shape = source.inputs[0].inputs[0].shape if source.inputs[0].inputs else None
        if shape is None or not all(_is_dense_constant(t) for t in node.inputs[1:] if t.name):
            return False
        dims = list(shape)
        if self.model.opset >= 15:
            dims = dims[source.inputs[0].attrs.get("start", 0) : source.inputs[0].attrs.get("end")]
        inputs = [np.arange(len(dims), dtype=np.int64)]
        inputs += [self._value(t) if t.name else None for t in node.inputs[1:]]
        try:
            (selected,) = evaluate_node(node, inputs, self.model.opset)
        except EvaluationError:
            return False
        chosen = [dims[int(i)] for i in np.asarray(selected).reshape(-1)]
        if not all(_is_static_dim(d) for d in chosen):
            return False
        _replace_by_constants(node, [np.array(chosen, dtype=np.int64).reshape(np.shape(selected))])
        self.stats["shapes_folded"] += 1
        return True

    def _skip_for_size(self, node: gs.Node, growth: int) -> None:
        self.stats["skipped_size"] += 1
        self.log.info(
            "fold_constants: not folding %s: it would add %d bytes of constants (max_bytes=%d)",
            _describe(node),
            growth,
            self.options.max_bytes,
        )

    def _value(self, tensor: gs.Constant) -> np.ndarray:
        """A constant's value; small ones are decoded once per run (shared scalars, shapes)."""
        cached = self._decoded.get(id(tensor))
        if cached is not None and cached[0] is tensor._values:
            return cached[1]
        value = peek_values(tensor)
        if value.nbytes <= _CACHED_BYTES:
            self._decoded[id(tensor)] = (tensor._values, value)
        return value

    # -- If with a constant condition ------------------------------------------------------

    def _try_inline_if(self, graph: gs.Graph, node: gs.Node) -> list[gs.Node] | None:
        """Replace `node` by the nodes of its taken branch; returns them, or None when it stays."""
        if not node.inputs or not _is_dense_constant(node.inputs[0]):
            return None
        condition = peek_values(node.inputs[0])
        branches = node.attrs.get("then_branch"), node.attrs.get("else_branch")
        if condition.size != 1 or not all(isinstance(b, gs.Graph) for b in branches):
            return None
        taken, dropped = branches if bool(condition.reshape(-1)[0]) else branches[::-1]
        if len(taken.outputs) != len(node.outputs) or taken.inputs:
            return None
        self.fold_graph(taken)
        _unlink(dropped)
        results = list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        extra = self._wire_branch_outputs(graph, node, taken, results)
        self._rename_clashes(taken)
        self.stats["ifs_inlined"] += 1
        return [*taken.nodes, *extra]

    def _wire_branch_outputs(
        self, graph: gs.Graph, node: gs.Node, taken: gs.Graph, results: list[gs.Tensor]
    ) -> list[gs.Node]:
        """Make the branch compute the If's output tensors; returns the Identity nodes needed."""
        local = {id(t) for n in taken.nodes for t in n.outputs}
        branch_nodes = {id(n) for g in iter_graphs(taken) for n in g.nodes}
        graph_outputs = {id(t) for t in graph.outputs}
        written: dict[int, gs.Tensor] = {}  # branch tensor -> the If output it now is
        extra: list[gs.Node] = []
        for index, (source, result) in enumerate(zip(taken.outputs, results, strict=True)):
            is_output = id(result) in graph_outputs
            if id(source) in written:
                # The branch returns the same tensor twice.
                extra += self._alias(written[id(source)], result, is_output, node, index)
            elif id(source) in local:
                # The branch node that computes it writes the If's output tensor instead.
                producer = source.inputs[0]
                replace_uses(source, result)
                replace_in(producer.outputs, source, result)
                written[id(source)] = result
            elif (
                isinstance(source, gs.Constant)
                # Also an output of another graph: it must keep its identity there.
                and self._outputs.get(id(source), 0) == 1
                and _only_read_by(source, branch_nodes)
            ):
                # A constant of the branch (often a folded result): it becomes the output tensor.
                replace_uses(source, result)
                result.to_constant(source._values, export_dtype=source._export_dtype)
                written[id(source)] = result
            else:
                # A value of the outer graph (or a constant it shares).
                extra += self._alias(source, result, is_output, node, index)
        return extra

    def _alias(
        self, source: gs.Tensor, result: gs.Tensor, is_output: bool, node: gs.Node, index: int
    ) -> list[gs.Node]:
        """`result` is `source`: rewire its readers, or copy with an Identity for a graph output."""
        if not is_output:
            replace_uses(result, source)
            return []
        identity = gs.Node("Identity", inputs=[source], outputs=[result])
        identity.name = self._claim_node_name(f"{node.name or 'If'}_inlined_output{index}", identity)
        return [identity]

    def _rename_clashes(self, taken: gs.Graph) -> None:
        """Rename branch tensors and nodes whose names something else in the model carries."""
        tensor_names, node_names = self._names()
        branch_nodes = {id(n) for g in iter_graphs(taken) for n in g.nodes}
        for node in taken.nodes:
            if node.name and node_names.get(node.name, set()) - {id(node)}:
                node_names[node.name].discard(id(node))
                node.name = self._claim_node_name(node.name, node)
            candidates = list(node.outputs) + [
                t for t in node.inputs if isinstance(t, gs.Constant) and _only_read_by(t, branch_nodes)
            ]
            for tensor in candidates:
                if tensor.name and tensor_names.get(tensor.name, set()) - {id(tensor)}:
                    tensor_names[tensor.name].discard(id(tensor))
                    tensor.name = _fresh(f"{tensor.name}_inlined", tensor_names)
                    tensor_names[tensor.name] = {id(tensor)}

    def _names(self) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
        if self._tensor_names is None or self._node_names is None:
            tensors: dict[str, set[int]] = {}
            nodes: dict[str, set[int]] = {}
            for graph in iter_graphs(self.model.graph):
                for tensor in [*graph.inputs, *graph.outputs]:
                    tensors.setdefault(tensor.name, set()).add(id(tensor))
                for node in graph.nodes:
                    nodes.setdefault(node.name, set()).add(id(node))
                    for tensor in [*node.inputs, *node.outputs]:
                        tensors.setdefault(tensor.name, set()).add(id(tensor))
            self._tensor_names, self._node_names = tensors, nodes
        return self._tensor_names, self._node_names

    def _claim_node_name(self, base: str, node: gs.Node) -> str:
        """A node name no other node carries, recorded as `node`'s."""
        _, node_names = self._names()
        name = _fresh(base, node_names)
        node_names[name] = {id(node)}
        return name


def _fresh(base: str, taken: dict[str, set[int]]) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first one no distinct object carries."""
    name, index = base, 0
    while taken.get(name):
        index += 1
        name = f"{base}_{index}"
    return name


def _is_dense_constant(tensor: gs.Tensor) -> bool:
    # A constant with an export_dtype is written as another type (float32 values saved as
    # bfloat16): its numpy values are not what the model computes with.
    return (
        isinstance(tensor, gs.Constant)
        and not isinstance(tensor._values, SparseValues)
        and tensor._export_dtype is None
    )


# Ops that hold quantized weights as the quantized model stores them (see the module docstring).
_QUANTIZED_STORAGE_OPS = ("DequantizeLinear",)


# Input positions that hold parameters (weights, biases, normalization statistics), by op.
_WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}),
    "ConvTranspose": frozenset({1, 2}),
    "Gemm": frozenset({1, 2}),
    "MatMul": frozenset({1}),
    "BatchNormalization": frozenset({1, 2, 3, 4}),
    "InstanceNormalization": frozenset({1, 2}),
    "LayerNormalization": frozenset({1, 2}),
}


# Ops that only rearrange a value: a weight reshaped or transposed on its way is still a weight.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast"})
# How many layout ops a weight may pass through before it counts as something else.
_MAX_LAYOUT_HOPS = 4


def _read_only_as_weights(node: gs.Node, graph_outputs: dict[int, int]) -> bool:
    """True when every output of `node` is read, and read only as a parameter input."""
    return any(t.outputs for t in node.outputs) and all(
        _is_weight(t, graph_outputs, _MAX_LAYOUT_HOPS) for t in node.outputs
    )


def _is_weight(tensor: gs.Tensor, graph_outputs: dict[int, int], hops: int) -> bool:
    if id(tensor) in graph_outputs:
        return False
    for consumer in tensor.outputs:
        if not is_op(consumer, consumer.op):
            return False
        if consumer.op in _LAYOUT_OPS and hops > 0 and consumer.inputs[0] is tensor:
            if all(_is_weight(t, graph_outputs, hops - 1) for t in consumer.outputs):
                continue
            return False
        positions = _WEIGHT_INPUTS.get(consumer.op)
        if positions is None or any(t is tensor and i not in positions for i, t in enumerate(consumer.inputs)):
            return False
    return True


def _is_string_or_sparse(tensor: gs.Constant) -> bool:
    """Constants that must stay Constant nodes.

    graphsurgeon writes an initializer whose values were decoded (any pass reading `.values`)
    as raw bytes, which a string tensor cannot be; sparse ones would be stored densely.
    """
    values = tensor._values
    if isinstance(values, SparseValues):
        return True
    if isinstance(values, LazyValues):
        return bool(values.tensor.data_type == onnx.TensorProto.STRING)
    return np.asarray(values).dtype.kind in "OSU"


def _constant_nbytes(tensor: gs.Constant) -> int:
    # LazyValues know their size without loading the data.
    return int(getattr(tensor._values, "nbytes", 0))


def _dead_input_bytes(node: gs.Node, graph_outputs: dict[int, int]) -> int:
    """Bytes of the constant inputs that only `node` reads (they disappear with it)."""
    total = 0
    seen: set[int] = set()
    for tensor in node.inputs:
        if id(tensor) in seen or id(tensor) in graph_outputs or not _is_dense_constant(tensor):
            continue
        seen.add(id(tensor))
        if all(consumer is node for consumer in tensor.outputs):
            total += _constant_nbytes(tensor)
    return total


def _estimated_output_bytes(node: gs.Node, inputs: list[np.ndarray | None]) -> int | None:
    """The bytes of the outputs, when known without computing them (the ops that blow up)."""
    try:
        if is_op(node, "ConstantOfShape") and inputs and inputs[0] is not None:
            fill = node.attrs.get("value")
            itemsize = np.dtype(fill.dtype).itemsize if isinstance(fill, gs.Constant) else 4
            return _volume(inputs[0]) * itemsize
        if is_op(node, "Expand") and len(inputs) == 2 and inputs[0] is not None and inputs[1] is not None:
            dims = np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1].reshape(-1)))
            return int(np.prod(dims, dtype=np.int64)) * inputs[0].itemsize
        if is_op(node, "Tile") and len(inputs) == 2 and inputs[0] is not None and inputs[1] is not None:
            return inputs[0].nbytes * _volume(inputs[1])
    except (ValueError, TypeError):
        return None  # invalid shapes: let the evaluator report it
    return None


def _volume(dims: np.ndarray) -> int:
    return int(np.prod([max(int(d), 0) for d in dims.reshape(-1)], dtype=np.int64))


def _is_static_dim(dim: object) -> bool:
    # Unknown dimensions import as None, symbolic ones as strings; -1 is never a real size.
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and bool(dim >= 0)


def _replace_by_constants(node: gs.Node, values: list[np.ndarray | None]) -> None:
    """Disconnect `node` and turn each of its named outputs into a constant in place."""
    outputs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    for tensor, value in zip(outputs, values, strict=True):
        if tensor.name and value is not None:
            tensor.to_constant(value)


def _only_read_by(tensor: gs.Tensor, nodes: set[int]) -> bool:
    return all(id(consumer) in nodes for consumer in tensor.outputs)


def _unlink(graph: gs.Graph) -> None:
    """Disconnect every node of a discarded branch, so outer tensors forget those readers."""
    for subgraph in iter_graphs(graph):
        for node in subgraph.nodes:
            node.inputs.clear()
            node.outputs.clear()


def _describe(node: gs.Node) -> str:
    first = node.outputs[0].name if node.outputs else "?"
    return f"{node.op} '{node.name}'" if node.name else f"{node.op} (writes '{first}')"
