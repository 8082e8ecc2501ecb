"""A float32 model that rounds like its float16 version: for checking float16 on the CPU.

ONNX Runtime's CPU provider has float16 kernels for a few ops only; it runs the others in
float32 between Casts it inserts itself, and drops the Casts between two such nodes. A float16
model on the CPU therefore keeps float32 precision and range through whole chains of nodes: an
activation that overflows float16 on a GPU stays finite there, and the rounding of every
intermediate value is skipped. This rewrite makes that rounding explicit: every float16 weight
becomes the float32 of the same value, and every float16 value a node writes is written in
float32 and then rounded through float16 by a Cast pair that no runtime removes. Kernels still
compute in float32, as GPU kernels accumulate; storage, range and overflow are float16's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_HALF = TensorProto.FLOAT16
_FLOAT = TensorProto.FLOAT


def emulate_half(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (top-level graph) with float16 replaced by float32 rounded through float16."""
    emulated = onnx.ModelProto()
    emulated.CopyFrom(model)
    graph = emulated.graph
    types = _value_types(model)
    for initializer in graph.initializer:
        if initializer.data_type == _HALF:
            initializer.CopyFrom(_as_float(initializer))
    nodes = []
    for node in graph.node:
        nodes.extend(_emulated(node, types))
    del graph.node[:]
    graph.node.extend(nodes)
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == _HALF:
            value.type.tensor_type.elem_type = _FLOAT
    del graph.value_info[:]
    return emulated


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _as_float(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"), tensor.name)


def _emulated(node: onnx.NodeProto, types: dict[str, int]) -> list[onnx.NodeProto]:
    """`node` computing in float32, followed by a float16 round trip of each float16 output."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == _HALF:
            attribute.t.CopyFrom(_as_float(attribute.t))
    rounded = []
    for index, output in enumerate(node.output):
        if output and types.get(output) == _HALF:
            raw = f"{output}__float"
            node.output[index] = raw
            rounded.append((raw, output))
    if node.op_type == "Cast":
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == _HALF:
                attribute.i = _FLOAT
    result = [node]
    for raw, output in rounded:
        half = f"{output}__half"
        result.append(helper.make_node("Cast", [raw], [half], to=_HALF, name=f"{output}__round"))
        result.append(helper.make_node("Cast", [half], [output], to=_FLOAT, name=f"{output}__widen"))
    return result


def output_cosines(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Cosine similarity per float output present in both (NaN when the candidate is not finite)."""
    cosines = {}
    for name, expected in reference.items():
        got = candidate.get(name)
        if got is None or expected.dtype.kind != "f":
            continue
        x, y = expected.astype(np.float64).ravel(), np.asarray(got, dtype=np.float64).ravel()
        if not np.isfinite(y).all():
            cosines[name] = float("nan")
            continue
        denominator = float(np.linalg.norm(x) * np.linalg.norm(y))
        cosines[name] = float(np.dot(x, y) / denominator) if denominator else float(np.array_equal(x, y))
    return cosines
