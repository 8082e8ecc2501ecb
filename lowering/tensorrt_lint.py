"""Static checks of a Q/DQ (QuantizeLinear/DequantizeLinear) model against TensorRT's rules.

TensorRT builds an int8 engine from an *explicitly quantized* ONNX model: the Q/DQ nodes say
where values are quantized, and TensorRT fuses them into int8 kernels. Its rules are stricter
than ONNX's, and the ONNX Runtime quantizer's default output breaks several of them, so a model
that runs fine in ONNX Runtime can fail to parse in TensorRT with an assertion about one node.
This lint finds those problems without TensorRT installed (pure ONNX / graphsurgeon) and says
how to fix each one.

Errors are what TensorRT refuses:

- `qdq-scale`: scales must be constants with strictly positive, finite values (and a per-channel
  scale must have one value per channel of the quantized axis).
- `qdq-zero-point`: zero points must be constants and all 0 (TensorRT quantizes symmetrically).
- `qdq-dtype`: quantized types are signed int8 (or fp8 e4m3, int4, fp4); uint8 is DLA-only.
- `qdq-int32-bias`: DequantizeLinear of int32 (the ORT quantizer's bias form) is rejected; the
  bias stays float and TensorRT quantizes it itself.
- `qdq-dangling-q`: every QuantizeLinear must reach a DequantizeLinear (through data-movement
  ops at most); a quantized graph output or a quantized value fed to arithmetic is not explicit
  quantization.
- `qdq-qoperator`: QOperator-format ops (QLinearConv, ConvInteger, ...) and DynamicQuantizeLinear
  have no TensorRT importer; TensorRT takes the QDQ format only.

Warnings are what TensorRT accepts but runs slower (in float, or without a fusion):

- `qdq-weight-axis`: per-channel weight scales not on the output-channel axis (Conv 0,
  ConvTranspose 1, Gemm 0 with transB else 1, MatMul the last axis).
- `qdq-activation-per-channel`: TensorRT's int8 kernels take one scale per activation tensor.
- `qdq-activation-pair`: a DequantizeLinear on an activation that no QuantizeLinear produced.
- `qdq-pair-mismatch`: a Q followed by a DQ with a different scale (a requantization).
- `qdq-half-quantized`: Conv/ConvTranspose/Gemm/MatMul with only one of input and weight
  quantized runs in float.
- `qdq-residual-add`: an Add joining a quantized value with an unquantized one; TensorRT fuses a
  residual Add into the int8 convolution only when the other input is quantized too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.ir.channels import weight_layout
from iropt.ir.graph import constant_value, is_graph_output, is_op, iter_graphs
from iropt.ir.model import Model

Severity = Literal["error", "warning"]

RULES: dict[str, str] = {
    "qdq-scale": "Q/DQ scales are constants with strictly positive values, one per channel",
    "qdq-zero-point": "Q/DQ zero points are constants equal to 0 (symmetric quantization)",
    "qdq-dtype": "quantized tensors are int8 (or fp8 e4m3 / int4 / fp4), never uint8",
    "qdq-int32-bias": "no DequantizeLinear of int32 (bias stays float)",
    "qdq-dangling-q": "every QuantizeLinear reaches a DequantizeLinear",
    "qdq-qoperator": "QDQ format only: no QLinear*/*Integer ops, no DynamicQuantizeLinear",
    "qdq-weight-axis": "per-channel weight scales on the output-channel axis",
    "qdq-activation-per-channel": "activations quantized per tensor",
    "qdq-activation-pair": "a DequantizeLinear on an activation follows a QuantizeLinear",
    "qdq-pair-mismatch": "a Q -> DQ pair shares one scale",
    "qdq-half-quantized": "weighted ops quantize both the input and the weight",
    "qdq-residual-add": "an Add after an int8 layer has both inputs quantized",
}

_FIX_FORMAT = 'quantize with format="tensorrt"'

# Signed types TensorRT's IQuantizeLayer/IDequantizeLayer accept (uint8 only on DLA).
_TRT_QUANT_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT4,
    onnx.TensorProto.FLOAT8E4M3FN,
    getattr(onnx.TensorProto, "FLOAT4E2M1", -1),
}
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that only move or select values: a quantized tensor may pass through them to its DQ.
_DATA_MOVEMENT_OPS = (
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
    "Concat", "Gather", "Expand", "MaxPool",
)
_QOPERATOR_OPS = (
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
    "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QGemm",
    "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
)


@dataclass(frozen=True)
class LintIssue:
    """One finding: the node it is about, the rule, how bad it is, and what to do."""

    node: str
    rule: str
    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.node}: {self.message} [{self.rule}]"


def lint_qdq_for_tensorrt(model: Model) -> list[LintIssue]:
    """Check every Q/DQ node of `model` (subgraphs included) against TensorRT's rules.

    Returns the issues, errors first, each in graph order. A model without Q/DQ nodes has none.
    """
    issues: list[LintIssue] = []
    for graph in iter_graphs(model.graph):
        for node in graph.nodes:
            issues.extend(_check_node(graph, node))
    return sorted(issues, key=lambda issue: issue.severity != "error")


def has_errors(issues: Iterable[LintIssue]) -> bool:
    return any(issue.severity == "error" for issue in issues)


def format_lint(issues: list[LintIssue]) -> str:
    """A readable report: a summary line, then one line per issue (errors first)."""
    if not issues:
        return "TensorRT Q/DQ lint: no issues"
    errors = sum(issue.severity == "error" for issue in issues)
    warnings = len(issues) - errors
    lines = [f"TensorRT Q/DQ lint: {errors} error(s), {warnings} warning(s)"]
    lines.extend(f"  {issue}" for issue in issues)
    return "\n".join(lines)


def _check_node(graph: gs.Graph, node: gs.Node) -> Iterator[LintIssue]:
    if node.op in _QOPERATOR_OPS:
        yield _issue(
            node, "qdq-qoperator", "error",
            f"{node.op} is a QOperator-format op that TensorRT cannot import; use the QDQ format "
            f"(QuantizeLinear/DequantizeLinear around float ops): {_FIX_FORMAT}",
        )
    elif is_op(node, "QuantizeLinear"):
        yield from _check_scale_and_zero_point(node)
        yield from _check_dtype(node, _quantize_dtype(node))
        yield from _check_dangling_q(graph, node)
        yield from _check_activation_per_channel(node)
    elif is_op(node, "DequantizeLinear"):
        yield from _check_scale_and_zero_point(node)
        yield from _check_dequantize_input(node)
        yield from _check_pair(node)
    elif is_op(node, *_WEIGHTED_OPS):
        yield from _check_weight_axis(node)
        yield from _check_half_quantized(node)
    elif is_op(node, "Add"):
        yield from _check_residual_add(node)


def _issue(node: gs.Node, rule: str, severity: Severity, message: str) -> LintIssue:
    return LintIssue(node.name or f"<unnamed {node.op}>", rule, severity, message)


# --- scales, zero points, types -----------------------------------------------------------------


def _check_scale_and_zero_point(node: gs.Node) -> Iterator[LintIssue]:
    scale_tensor = node.inputs[1] if len(node.inputs) > 1 else None
    scale = constant_value(scale_tensor) if scale_tensor is not None else None
    if scale is None:
        yield _issue(
            node, "qdq-scale", "error",
            f"scale '{_name(scale_tensor)}' is not a constant; TensorRT needs scales at build time "
            "(store the calibrated scale as an initializer)",
        )
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        bad = scale[~(np.isfinite(scale) & (scale > 0))].ravel()[:3]
        yield _issue(
            node, "qdq-scale", "error",
            f"scale '{_name(scale_tensor)}' has values that are not strictly positive ({bad.tolist()}); "
            "TensorRT requires scale > 0 (a constant-zero tensor needs a tiny positive scale, not 0)",
        )
    elif scale.ndim == 1 and scale.size > 1 and "block_size" not in node.attrs:
        yield from _check_scale_length(node, scale)
    yield from _check_zero_point(node)


def _check_scale_length(node: gs.Node, scale: np.ndarray) -> Iterator[LintIssue]:
    data = node.inputs[0]
    producer = _producer(data)
    if not data.shape and producer is not None and is_op(producer, "QuantizeLinear"):
        data = producer.inputs[0]  # a Q output keeps its input's shape
    shape = data.shape
    if not shape:
        return
    axis = _axis(node, len(shape))
    size = shape[axis] if 0 <= axis < len(shape) else None
    if isinstance(size, int) and size != scale.size:
        yield _issue(
            node, "qdq-scale", "error",
            f"per-channel scale has {scale.size} values but axis {axis} of "
            f"'{data.name}' has {size}; TensorRT needs one scale per channel",
        )


def _check_zero_point(node: gs.Node) -> Iterator[LintIssue]:
    if len(node.inputs) < 3 or _is_omitted(node.inputs[2]):
        return
    zero_point_tensor = node.inputs[2]
    zero_point = constant_value(zero_point_tensor)
    if zero_point is None:
        yield _issue(
            node, "qdq-zero-point", "error",
            f"zero point '{zero_point_tensor.name}' is not a constant; TensorRT needs a constant 0",
        )
    elif np.any(zero_point.astype(np.float64) != 0):
        values = np.unique(zero_point).ravel()[:3].tolist()
        yield _issue(
            node, "qdq-zero-point", "error",
            f"zero point '{zero_point_tensor.name}' is {values}, not 0: TensorRT supports symmetric "
            f"quantization only (asymmetric is DLA-only); use signed int8 with zero point 0: {_FIX_FORMAT}",
        )


def _check_dtype(node: gs.Node, dtype: int | None) -> Iterator[LintIssue]:
    if dtype is None or dtype in _TRT_QUANT_TYPES or dtype == onnx.TensorProto.INT32:
        return
    label = _dtype_name(dtype)
    hint = (
        "uint8 is DLA-only in TensorRT; use int8 with zero point 0"
        if dtype == onnx.TensorProto.UINT8
        else "TensorRT quantizes to int8, fp8 (e4m3), int4 or fp4"
    )
    implicit = " (a QuantizeLinear without a zero point produces uint8)" if (
        is_op(node, "QuantizeLinear") and (len(node.inputs) < 3 or _is_omitted(node.inputs[2]))
        and not node.attrs.get("output_dtype")
    ) else ""
    yield _issue(node, "qdq-dtype", "error", f"quantized type is {label}{implicit}; {hint}: {_FIX_FORMAT}")


def _check_dequantize_input(node: gs.Node) -> Iterator[LintIssue]:
    source = node.inputs[0]
    dtype = _tensor_dtype(source)
    if dtype == onnx.TensorProto.INT32:
        yield _issue(
            node, "qdq-int32-bias", "error",
            f"DequantizeLinear of int32 '{source.name}' (the ONNX Runtime quantizer's bias form): "
            "TensorRT dequantizes only int8/fp8/int4/fp4 and rejects this node; keep the bias as a float "
            f"initializer ({_FIX_FORMAT}, or ORT's extra_options={{'QuantizeBias': False}})",
        )
        return
    producer = _producer(source)
    if producer is None or not is_op(producer, "QuantizeLinear"):
        # A Q feeding this DQ is checked at the Q; here only DQs of stored or incoming data.
        yield from _check_dtype(node, dtype)
    if not _is_constant(source) and _quantize_behind(source) is None:
        origin = f"node '{producer.name}' ({producer.op})" if producer is not None else "a graph input"
        yield _issue(
            node, "qdq-activation-pair", "warning",
            f"'{source.name}' comes from {origin}, not from a QuantizeLinear; TensorRT expects "
            "activations quantized as QuantizeLinear -> DequantizeLinear pairs",
        )


def _check_pair(node: gs.Node) -> Iterator[LintIssue]:
    quantize = _producer(node.inputs[0])
    if quantize is None or not is_op(quantize, "QuantizeLinear"):
        return
    q_scale, dq_scale = _scale_of(quantize), _scale_of(node)
    if q_scale is None or dq_scale is None:
        return
    if q_scale.shape != dq_scale.shape or not np.array_equal(q_scale, dq_scale):
        yield _issue(
            node, "qdq-pair-mismatch", "warning",
            f"scale differs from its QuantizeLinear '{quantize.name}': the pair requantizes, which "
            "TensorRT cannot fold away; give both nodes the same scale tensor",
        )


# --- placement ----------------------------------------------------------------------------------


def _check_dangling_q(graph: gs.Graph, node: gs.Node) -> Iterator[LintIssue]:
    blocker = _first_non_dq_use(graph, node.outputs[0], set())
    if blocker is not None:
        yield _issue(
            node, "qdq-dangling-q", "error",
            f"quantized '{node.outputs[0].name}' reaches {blocker} without a DequantizeLinear; "
            "TensorRT's explicit quantization pairs every QuantizeLinear with a DequantizeLinear "
            "(add the DQ, or drop the Q)",
        )


def _first_non_dq_use(graph: gs.Graph, tensor: gs.Tensor, seen: set[int]) -> str | None:
    """Where a quantized value escapes (a graph output or a non-DQ compute op), else None."""
    if id(tensor) in seen:
        return None
    seen.add(id(tensor))
    if is_graph_output(graph, tensor):
        return f"graph output '{tensor.name}'"
    for consumer in tensor.outputs:
        if is_op(consumer, "DequantizeLinear"):
            continue
        if is_op(consumer, *_DATA_MOVEMENT_OPS):
            for output in consumer.outputs:
                found = _first_non_dq_use(graph, output, seen)
                if found is not None:
                    return found
            continue
        return f"node '{consumer.name}' ({consumer.op})"
    return None


def _check_activation_per_channel(node: gs.Node) -> Iterator[LintIssue]:
    scale = _scale_of(node)
    if _is_constant(node.inputs[0]) or scale is None or scale.size <= 1 or "block_size" in node.attrs:
        return
    yield _issue(
        node, "qdq-activation-per-channel", "warning",
        f"activation '{node.inputs[0].name}' is quantized per channel ({scale.size} scales); "
        "TensorRT's int8 kernels take one scale per activation tensor, so use a per-tensor scale",
    )


def _check_weight_axis(node: gs.Node) -> Iterator[LintIssue]:
    if len(node.inputs) < 2:
        return
    dequantize = _producer(node.inputs[1])
    if dequantize is None or not is_op(dequantize, "DequantizeLinear") or "block_size" in dequantize.attrs:
        return
    scale = _scale_of(dequantize)
    rank = _weight_rank(dequantize)
    if scale is None or scale.size <= 1 or rank is None:
        return
    layout = weight_layout(node, rank)
    expected = layout.out_axis if layout is not None else None
    actual = _axis(dequantize, rank)
    if expected is not None and actual != expected:
        yield _issue(
            dequantize, "qdq-weight-axis", "warning",
            f"per-channel weight scales of {node.op} '{node.name}' are on axis {actual}, but its "
            f"output channels are axis {expected}; TensorRT folds only output-channel scales into "
            f"the int8 kernel (set axis={expected})",
        )


def _check_half_quantized(node: gs.Node) -> Iterator[LintIssue]:
    if len(node.inputs) < 2:
        return
    data, weight = node.inputs[0], node.inputs[1]
    data_q, weight_q = _from_dq(data), _from_dq(weight)
    if data_q == weight_q:
        return
    quantized, plain = ("weight", "input") if weight_q else ("input", "weight")
    plain_tensor = data if weight_q else weight
    yield _issue(
        node, "qdq-half-quantized", "warning",
        f"{node.op} has a quantized {quantized} but its {plain} '{plain_tensor.name}' is not quantized; "
        f"TensorRT runs it in float. Put a QuantizeLinear -> DequantizeLinear on the {plain}",
    )


def _check_residual_add(node: gs.Node) -> Iterator[LintIssue]:
    inputs = [t for t in node.inputs if not _is_constant(t)]
    if len(inputs) != 2:
        return
    dq = [_from_dq(t) for t in inputs]
    int8_layer = [_from_quantized_layer(t) for t in inputs]
    if all(dq) or not (any(dq) or any(int8_layer)):
        return
    # The fusable form: one input from an int8 Conv/Gemm, the other (the residual) quantized.
    if (dq[0] and int8_layer[1]) or (dq[1] and int8_layer[0]):
        return
    if any(dq):
        plain = inputs[dq.index(False)]
    else:  # neither is quantized, one comes from an int8 layer: the other is the residual
        plain = inputs[1] if int8_layer[0] else inputs[0]
    yield _issue(
        node, "qdq-residual-add", "warning",
        f"input '{plain.name}' is not quantized while the other input is; TensorRT can fuse this Add "
        "into the int8 layer only when the residual input is quantized: put a QuantizeLinear -> "
        f"DequantizeLinear on '{plain.name}'",
    )


# --- graph helpers ------------------------------------------------------------------------------


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _from_dq(tensor: gs.Tensor) -> bool:
    producer = _producer(tensor)
    return producer is not None and is_op(producer, "DequantizeLinear")


def _from_quantized_layer(tensor: gs.Tensor) -> bool:
    """True when `tensor` is the output of a Conv/Gemm/MatMul whose input and weight are both quantized."""
    producer = _producer(tensor)
    return (
        producer is not None and is_op(producer, *_WEIGHTED_OPS) and len(producer.inputs) >= 2
        and _from_dq(producer.inputs[0]) and _from_dq(producer.inputs[1])
    )


def _quantize_behind(tensor: gs.Tensor) -> gs.Node | None:
    """The QuantizeLinear that produced `tensor`, looking back through data-movement ops."""
    producer = _producer(tensor)
    while producer is not None and is_op(producer, *_DATA_MOVEMENT_OPS) and producer.inputs:
        producer = _producer(producer.inputs[0])
    return producer if producer is not None and is_op(producer, "QuantizeLinear") else None


def _is_constant(tensor: gs.Tensor) -> bool:
    # Without reading the values: reading an fp8 constant through graphsurgeon converts it.
    if isinstance(tensor, gs.Constant):
        return True
    producer = _producer(tensor)
    return producer is not None and is_op(producer, "Constant")


def _is_omitted(tensor: gs.Tensor) -> bool:
    return not tensor.name and not tensor.inputs and not isinstance(tensor, gs.Constant)


def _scale_of(node: gs.Node) -> np.ndarray | None:
    return constant_value(node.inputs[1]) if len(node.inputs) > 1 else None


def _axis(node: gs.Node, rank: int) -> int:
    axis = int(node.attrs.get("axis", 1))
    return axis + rank if axis < 0 else axis


def _weight_rank(dequantize: gs.Node) -> int | None:
    source = dequantize.inputs[0]
    quantize = _producer(source)
    if quantize is not None and is_op(quantize, "QuantizeLinear"):
        source = quantize.inputs[0]  # float weight -> Q -> DQ
    return len(source.shape) if source.shape is not None else None


def _quantize_dtype(node: gs.Node) -> int | None:
    """The element type a QuantizeLinear produces (its zero point's, else output_dtype, else uint8)."""
    if len(node.inputs) >= 3 and not _is_omitted(node.inputs[2]):
        return _tensor_dtype(node.inputs[2])
    output_dtype = int(node.attrs.get("output_dtype", 0) or 0)
    return output_dtype or onnx.TensorProto.UINT8


def _tensor_dtype(tensor: gs.Tensor) -> int | None:
    """The ONNX element type of `tensor`, following a QuantizeLinear producer when unannotated."""
    dtype = _onnx_dtype(tensor.dtype)
    if dtype is None:
        producer = _producer(tensor)
        if producer is not None and is_op(producer, "QuantizeLinear"):
            return _quantize_dtype(producer)
        if producer is not None and is_op(producer, "Constant"):
            value = producer.attrs.get("value")
            return _onnx_dtype(value.dtype) if isinstance(value, gs.Constant) else None
    return dtype


def _onnx_dtype(dtype: object) -> int | None:
    # graphsurgeon keeps an ONNX enum where numpy has no type (fp8), numpy dtypes elsewhere.
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))  # type: ignore[call-overload]
    except (TypeError, KeyError, ValueError):
        return None


def _dtype_name(dtype: int) -> str:
    try:
        return str(onnx.TensorProto.DataType.Name(dtype)).lower()  # type: ignore[arg-type]
    except ValueError:
        return f"type {dtype}"


def _name(tensor: gs.Tensor | None) -> str:
    return tensor.name if tensor is not None else "<missing>"
