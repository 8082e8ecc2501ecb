"""Evaluate one ONNX node on numpy inputs, for constant folding.

`evaluate_node` computes a node's outputs from the values of its inputs. The common
shape-arithmetic ops (Shape, Gather, Concat, Reshape, Slice, Cast, Add, ...) have a small numpy
fast path, because a big graph has thousands of them and building a model per node costs about a
tenth of a millisecond; everything else runs through `onnx.reference.ReferenceEvaluator`, the
pure-Python reference implementation that ships with onnx, on a one-node model built from the
node's op, attributes and the model's opset. Nothing is cached between calls.

Results are checked before they are returned: every output must be a numpy array of a dtype an
initializer can hold, and the reference results are held to the output types and static shapes
that ONNX type inference gives the one-node model (the reference implementation is written in
numpy and sometimes widens a dtype; a widened float64 is cast back, a wrong shape is refused).
Anything the evaluator cannot do raises `EvaluationError`; the caller leaves the node alone.

The fast path follows ONNX Runtime where the specification leaves room: integer Div truncates
toward zero (as C++ does), integer division by zero and float-to-integer casts of NaN or
infinity are refused rather than given an arbitrary value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from iropt.ir.graph import is_default_domain, peek_values

Attrs = dict[str, Any]
Values = list[np.ndarray | None]
FastFn = Callable[[Values, Attrs, int], list[np.ndarray]]

# Ops whose outputs are not a function of their inputs: folding would freeze one sample.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


# dtypes an initializer can carry through graphsurgeon's exporter (raw little-endian bytes):
# numpy's numeric kinds and bool. Strings (object arrays) cannot be written as raw data, and the
# 8-bit float and 4-bit int formats lose their type on the way through numpy.
_STORABLE_KINDS = frozenset("biufc")


class EvaluationError(Exception):
    """The node cannot be evaluated here (unsupported op, dtype or value); leave it alone."""


class _UseReference(Exception):
    """A fast-path function does not cover this case; the reference evaluator does."""


def is_storable_dtype(dtype: Any) -> bool:
    """True when an array of `dtype` can become an initializer without losing its type."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        return False
    if resolved.kind in _STORABLE_KINDS:
        return True
    return resolved.name == "bfloat16"


def has_subgraph(node: gs.Node) -> bool:
    """True when an attribute of `node` is a graph (If, Loop, Scan, SequenceMap bodies)."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            return True
        if isinstance(value, list) and any(isinstance(v, gs.Graph) for v in value):
            return True
    return False


def is_deterministic(node: gs.Node) -> bool:
    """True when `node` is a default-domain op whose outputs depend only on its inputs.

    Custom domains are excluded because nothing is known about them (they may be stateful or
    random), and Dropout counts only when its training_mode input is absent: in training mode
    it draws a random mask.
    """
    if not is_default_domain(node.domain) or node.op in NONDETERMINISTIC_OPS:
        return False
    if node.op == "Dropout" and len(node.inputs) >= 3 and node.inputs[2].name:
        return False
    return True


def evaluate_node(node: gs.Node, inputs: Sequence[np.ndarray | None], opset: int) -> list[np.ndarray | None]:
    """The values of `node`'s outputs given its input values (None for an omitted input).

    Returns one entry per node output, None for omitted optional outputs (empty names). Raises
    `EvaluationError` when the node cannot be evaluated or its result cannot be an initializer.
    """
    if not is_default_domain(node.domain):
        raise EvaluationError(f"{node.op}: custom domain '{node.domain}' is not evaluated")
    if has_subgraph(node):
        raise EvaluationError(f"{node.op}: ops with subgraphs are not evaluated")
    values: Values = [None if v is None else np.asarray(v) for v in inputs]
    wanted = [bool(t.name) for t in node.outputs]
    fast = _FAST_PATH.get(node.op)
    results: list[np.ndarray] | None = None
    if fast is not None:
        try:
            with np.errstate(all="ignore"):
                results = fast(values, dict(node.attrs), opset)
        except _UseReference:
            results = None
        except (ValueError, IndexError, TypeError) as exc:
            raise EvaluationError(f"{node.op}: {exc}") from exc
    if results is None:
        return _own_outputs(reference_evaluate(node, values, opset), values)
    if len(results) < len(wanted):
        raise EvaluationError(f"{node.op}: the fast path produced {len(results)} outputs")
    checked: list[np.ndarray | None] = []
    for want, value in zip(wanted, results[: len(wanted)], strict=True):
        checked.append(_check_storable(node, value) if want else None)
    return _own_outputs(checked, values)


def reference_evaluate(
    node: gs.Node, inputs: Sequence[np.ndarray | None], opset: int
) -> list[np.ndarray | None]:
    """Evaluate `node` with onnx's ReferenceEvaluator on a one-node model (no fast path)."""
    model = _one_node_model(node, inputs, opset)
    feeds = {f"in{i}": np.asarray(v) for i, v in enumerate(inputs) if v is not None and node.inputs[i].name}
    try:
        with np.errstate(all="ignore"):
            raw = ReferenceEvaluator(model).run(None, feeds)
    except Exception as exc:  # the reference raises anything from NotImplementedError to KeyError
        raise EvaluationError(f"{node.op}: the reference evaluator failed: {exc}") from exc
    if len(raw) != sum(1 for t in node.outputs if t.name):
        raise EvaluationError(f"{node.op}: the reference evaluator gave {len(raw)} outputs")
    expected = _inferred_outputs(model)
    results: list[np.ndarray | None] = []
    raw_iter = iter(raw)
    for index, tensor in enumerate(node.outputs):
        if not tensor.name:
            results.append(None)
            continue
        value = next(raw_iter)
        if not isinstance(value, (np.ndarray, np.generic)):
            raise EvaluationError(f"{node.op}: output {index} is a {type(value).__name__}, not a tensor")
        array = _conform(node, np.asarray(value), expected.get(f"out{index}"))
        results.append(_check_storable(node, array))
    return results


def _one_node_model(node: gs.Node, inputs: Sequence[np.ndarray | None], opset: int) -> onnx.ModelProto:
    in_names = [
        f"in{i}" if (v is not None and t.name) else ""
        for i, (t, v) in enumerate(zip(node.inputs, inputs, strict=True))
    ]
    out_names = [f"out{i}" if t.name else "" for i, t in enumerate(node.outputs)]
    proto = onnx.helper.make_node(node.op, in_names, out_names, domain="")
    proto.attribute.extend(OnnxExporter.export_attributes(node.attrs))
    graph_inputs = []
    for name, value in zip(in_names, inputs, strict=True):
        if name and value is not None:
            graph_inputs.append(_value_info(name, np.asarray(value)))
    graph_outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in out_names if n]
    graph = onnx.helper.make_graph([proto], "evaluate", graph_inputs, graph_outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    try:
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise EvaluationError(f"input dtype {value.dtype} has no ONNX type") from exc
    return onnx.helper.make_tensor_value_info(name, elem_type, list(value.shape))


def _inferred_outputs(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """Output name -> (elem type, static shape or None) from ONNX type inference, where known."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a cross-check only; an op it cannot handle is not an error
        return {}
    result: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    for info in list(inferred.graph.output) + list(inferred.graph.value_info):
        tensor_type = info.type.tensor_type
        if not tensor_type.elem_type:
            continue
        shape: tuple[int, ...] | None = None
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shape = tuple(int(d.dim_value) for d in tensor_type.shape.dim)
        result[info.name] = (int(tensor_type.elem_type), shape)
    return result


def _conform(
    node: gs.Node, value: np.ndarray, expected: tuple[int, tuple[int, ...] | None] | None
) -> np.ndarray:
    """Hold a reference result to the inferred type and static shape of that output."""
    if expected is None:
        return value
    elem_type, shape = expected
    if shape is not None and tuple(value.shape) != shape:
        raise EvaluationError(f"{node.op}: the reference gave shape {value.shape}, type inference {shape}")
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, TypeError, ValueError):
        return value
    if value.dtype == dtype:
        return value
    kinds = value.dtype.kind + np.dtype(dtype).kind
    if kinds == "ff":
        # A float64 computation of a float32 op: rounding once to the declared type.
        return value.astype(dtype)
    if kinds in ("ii", "iu", "ui", "uu"):
        converted = value.astype(dtype)
        if np.array_equal(converted.astype(value.dtype), value):
            return converted
    raise EvaluationError(f"{node.op}: the reference gave {value.dtype}, type inference says {dtype}")


def _check_storable(node: gs.Node, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if not is_storable_dtype(array.dtype):
        raise EvaluationError(f"{node.op}: result dtype {array.dtype} cannot be stored as an initializer")
    return array


def _own_outputs(results: list[np.ndarray | None], inputs: Values) -> list[np.ndarray | None]:
    """Copy results that are views of (or share memory with) an input.

    A folded constant must not alias another: a later pass that edits one initializer in place
    (pruning, quantization) would silently change the other.
    """
    owned: list[np.ndarray | None] = []
    for value in results:
        if value is not None and (
            not value.flags.owndata
            or not value.flags.c_contiguous
            or any(v is not None and np.may_share_memory(value, v) for v in inputs)
        ):
            value = np.array(value, copy=True, order="C")  # (ascontiguousarray would make 0-d 1-d)
        owned.append(value)
    return owned


# ---------------------------------------------------------------------------------------------
# Fast path: numpy versions of the ops that dominate shape computations. Each returns the list
# of outputs or raises _UseReference for a case it does not cover.


def _need(values: Values, index: int) -> np.ndarray:
    if index >= len(values) or values[index] is None:
        raise _UseReference
    value = values[index]
    assert value is not None
    return value


def _optional(values: Values, index: int) -> np.ndarray | None:
    return values[index] if index < len(values) else None


def _ints(value: np.ndarray) -> list[int]:
    if value.dtype.kind not in "iu":
        raise _UseReference
    return [int(v) for v in value.reshape(-1)]


def _same_numeric(*arrays: np.ndarray) -> np.dtype[Any]:
    dtype = arrays[0].dtype
    if dtype.kind not in "iuf" or any(a.dtype != dtype for a in arrays):
        raise _UseReference
    return dtype


def _typed(result: Any, dtype: np.dtype[Any]) -> np.ndarray:
    array = np.asarray(result)
    if array.dtype != dtype:
        raise _UseReference
    return array


def _shape(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    dims = _need(values, 0).shape
    start, end = (attrs.get("start", 0), attrs.get("end")) if opset >= 15 else (0, None)
    # Python slicing clamps like ONNX: negatives count from the back, then clip to [0, rank].
    return [np.array(dims[start:end], dtype=np.int64)]


def _size(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    return [np.array(_need(values, 0).size, dtype=np.int64)]


def _identity(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    return [_need(values, 0).copy()]


def _gather(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data, indices = _need(values, 0), _need(values, 1)
    axis = int(attrs.get("axis", 0))
    if indices.dtype.kind not in "iu" or not -data.ndim <= axis < data.ndim:
        raise _UseReference
    dim = data.shape[axis]
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        raise EvaluationError(f"Gather: index out of range for dimension {dim}")
    return [np.take(data, indices.astype(np.int64), axis=axis)]


def _concat(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    arrays = [v for v in values if v is not None]
    if not arrays or any(a.dtype != arrays[0].dtype for a in arrays) or "axis" not in attrs:
        raise _UseReference
    return [np.concatenate(arrays, axis=int(attrs["axis"]))]


def _axes(values: Values, attrs: Attrs, opset: int, since: int) -> list[int] | None:
    """Axes from the second input (opset >= `since`) or the `axes` attribute (before)."""
    if opset >= since:
        axes = _optional(values, 1)
        return None if axes is None else _ints(axes)
    return None if "axes" not in attrs else [int(a) for a in attrs["axes"]]


def _unsqueeze(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data = _need(values, 0)
    axes = _axes(values, attrs, opset, 13)
    if axes is None:
        raise _UseReference
    out_rank = data.ndim + len(axes)
    normalized = [a + out_rank if a < 0 else a for a in axes]
    if len(set(normalized)) != len(normalized) or any(not 0 <= a < out_rank for a in normalized):
        raise EvaluationError(f"Unsqueeze: invalid axes {axes} for output rank {out_rank}")
    return [np.expand_dims(data, tuple(normalized))]


def _squeeze(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data = _need(values, 0)
    axes = _axes(values, attrs, opset, 13)
    if axes is None:
        return [np.squeeze(data)]
    return [np.squeeze(data, axis=tuple(axes))]


def _reshape(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data = _need(values, 0)
    if opset < 5:
        raise _UseReference
    target = _ints(_need(values, 1))
    allow_zero = opset >= 14 and int(attrs.get("allowzero", 0)) == 1
    if not allow_zero:
        # 0 copies the input's dimension at that position.
        for index, dim in enumerate(target):
            if dim == 0:
                if index >= data.ndim:
                    raise EvaluationError("Reshape: 0 refers to a dimension the input does not have")
                target[index] = data.shape[index]
    if allow_zero and 0 in target and -1 in target:
        raise EvaluationError("Reshape: allowzero with both 0 and -1 is invalid")
    return [np.reshape(data, target)]


def _cast(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data = _need(values, 0)
    to = attrs.get("to")
    if not isinstance(to, int) or data.dtype.kind not in "biuf":
        raise _UseReference
    try:
        target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
    except (KeyError, TypeError, ValueError):
        raise _UseReference from None
    if target.kind not in "biuf":
        raise _UseReference
    if data.dtype.kind == "f" and target.kind in "iu":
        # Out of range (NaN and infinity included) the conversion is undefined behaviour in
        # C++; runtimes return whatever their CPU does. The bounds are powers of two, exact
        # in every float type.
        info = np.iinfo(target)
        whole = np.trunc(data.astype(np.float64))
        if not np.all((whole >= float(info.min)) & (whole < float(info.max) + 1.0)):
            raise EvaluationError(f"Cast: a value outside the range of {target} has no defined result")
    return [data.astype(target)]


def _binary(ufunc: Callable[..., Any]) -> FastFn:
    def run(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
        a, b = _need(values, 0), _need(values, 1)
        dtype = _same_numeric(a, b)
        return [_typed(ufunc(a, b), dtype)]

    return run


def _div(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    a, b = _need(values, 0), _need(values, 1)
    dtype = _same_numeric(a, b)
    if dtype.kind == "f":
        return [_typed(np.divide(a, b), dtype)]
    if np.any(b == 0):
        raise EvaluationError("Div: integer division by zero")
    # C++ (and ONNX Runtime) truncate toward zero; numpy's // floors. Correct the quotients of
    # inexact divisions whose operands have opposite signs.
    quotient = np.floor_divide(a, b)
    inexact = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
    return [_typed(quotient + inexact.astype(dtype), dtype)]


def _compare(ufunc: Callable[..., Any]) -> FastFn:
    def run(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
        a, b = _need(values, 0), _need(values, 1)
        if a.dtype != b.dtype or a.dtype.kind not in "biuf":
            raise _UseReference
        return [np.asarray(ufunc(a, b), dtype=np.bool_)]

    return run


def _logical(ufunc: Callable[..., Any]) -> FastFn:
    def run(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
        arrays = [_need(values, i) for i in range(len(values))]
        if any(a.dtype != np.bool_ for a in arrays):
            raise _UseReference
        return [np.asarray(ufunc(*arrays), dtype=np.bool_)]

    return run


def _neg(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data = _need(values, 0)
    if data.dtype.kind not in "if":
        raise _UseReference
    return [_typed(np.negative(data), data.dtype)]


def _where(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    cond, x, y = _need(values, 0), _need(values, 1), _need(values, 2)
    if cond.dtype != np.bool_ or x.dtype != y.dtype:
        raise _UseReference
    return [_typed(np.where(cond, x, y), x.dtype)]


def _range(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    start, limit, delta = _need(values, 0), _need(values, 1), _need(values, 2)
    dtype = _same_numeric(start, limit, delta)
    # Float ranges accumulate rounding differently per runtime; the reference handles them.
    if dtype.kind not in "iu" or start.size != 1 or limit.size != 1 or delta.size != 1:
        raise _UseReference
    first, last, step = int(start.reshape(())), int(limit.reshape(())), int(delta.reshape(()))
    if step == 0:
        raise EvaluationError("Range: delta is zero")
    count = max(0, -((first - last) // step))  # ceil((limit - start) / delta)
    return [(first + np.arange(count, dtype=np.int64) * step).astype(dtype)]


def _slice(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data = _need(values, 0)
    if opset < 10:
        starts, ends = [int(v) for v in attrs["starts"]], [int(v) for v in attrs["ends"]]
        axes_attr = attrs.get("axes")
        axes = list(range(len(starts))) if axes_attr is None else [int(a) for a in axes_attr]
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(_need(values, 1)), _ints(_need(values, 2))
        axes_in, steps_in = _optional(values, 3), _optional(values, 4)
        axes = list(range(len(starts))) if axes_in is None else _ints(axes_in)
        steps = [1] * len(starts) if steps_in is None else _ints(steps_in)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise EvaluationError("Slice: starts, ends, axes and steps differ in length")
    index: list[slice] = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step == 0 or not -data.ndim <= axis < data.ndim:
            raise EvaluationError(f"Slice: invalid step {step} or axis {axis}")
        if step < 0 and end in _INT_MAX:
            # The specification clamps this end to the last element (an empty slice); ONNX
            # Runtime reads the sentinel as "through the first element". Leave it to the runtime.
            raise EvaluationError("Slice: a negative step with an INT_MAX end differs between runtimes")
        index[axis % data.ndim] = _onnx_slice(start, end, step, data.shape[axis])
    return [data[tuple(index)]]


_INT_MAX = (2**31 - 1, 2**63 - 1)


def _onnx_slice(start: int, end: int, step: int, dim: int) -> slice:
    """A Python slice equal to ONNX Slice's clamping on one axis of size `dim`."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    # end == -1 means "through index 0", which Python spells None (its -1 is the last element).
    return slice(start, None if end < 0 else end, step)


def _transpose(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data = _need(values, 0)
    perm = attrs.get("perm")
    axes = list(reversed(range(data.ndim))) if perm is None else [int(p) for p in perm]
    if sorted(axes) != list(range(data.ndim)):
        raise EvaluationError(f"Transpose: perm {axes} is not a permutation of rank {data.ndim}")
    return [np.transpose(data, axes)]


def _constant_of_shape(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    dims = _ints(_need(values, 0))
    if any(d < 0 for d in dims):
        raise EvaluationError(f"ConstantOfShape: negative dimension in {dims}")
    fill = attrs.get("value")
    if fill is None:
        return [np.zeros(dims, dtype=np.float32)]
    if not isinstance(fill, gs.Constant):
        raise _UseReference
    element = peek_values(fill).reshape(-1)
    if element.size != 1 or element.dtype.kind not in "biuf":
        raise _UseReference
    return [np.full(dims, element[0], dtype=element.dtype)]


def _expand(values: Values, attrs: Attrs, opset: int) -> list[np.ndarray]:
    data, shape = _need(values, 0), _ints(_need(values, 1))
    target = np.broadcast_shapes(data.shape, tuple(shape))
    return [np.broadcast_to(data, target).copy()]


_FAST_PATH: dict[str, FastFn] = {
    "Shape": _shape,
    "Size": _size,
    "Identity": _identity,
    "Gather": _gather,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Cast": _cast,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _div,
    "Neg": _neg,
    "Equal": _compare(np.equal),
    "Less": _compare(np.less),
    "Greater": _compare(np.greater),
    "And": _logical(np.logical_and),
    "Or": _logical(np.logical_or),
    "Not": _logical(np.logical_not),
    "Where": _where,
    "Range": _range,
    "Slice": _slice,
    "Transpose": _transpose,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
}

FAST_PATH_OPS = frozenset(_FAST_PATH)
