"""The precision gate: which precision each ONNX node runs in inside a built engine.

A strongly typed build runs every layer in the types the graph gives it, so what a node *asks
for* is read from the graph: a Conv/ConvTranspose/MatMul/Gemm whose data input comes from a
DequantizeLinear asks for int8, a node computing in float16 asks for fp16. What it *got* is
read from the engine's layer information, built with `ProfilingVerbosity.DETAILED`:

- the engine inspector's JSON (`IEngineInspector.get_engine_information`, needs the engine
  deserialized, so a GPU). Its schema differs between versions: TensorRT 8.x/10.x give each
  tensor a `"Format/Datatype"` text ("Row major linear FP32 format", or from 10.x on "Float",
  "Half", "Int8"); TensorRT 11.x and TensorRT-RTX give `"DataType"`/`"Datatype"` and `"Format"`
  apart, list a layer's weights under `"Constants"`, and replace `"Bindings"` by
  `"I/O Tensors"`. Both are read.
- without a GPU (TensorRT-RTX builds ahead of time on any machine), the same information from
  the builder's verbose log, which prints one `Name: ..., LayerType: ..., Inputs: [...]` line
  per engine layer.

Every engine layer names the ONNX nodes it came from in its metadata (`[ONNX Layer: conv0]`,
several when layers fused). A layer's precision is the narrowest numeric type among its inputs
and weights (an int8 convolution reads int8 and may write float); a node's precision is the
narrowest among the layers that carry it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

# Narrowest first: a layer that reads int8 and float is an int8 layer.
PRECISION_ORDER = ("int4", "fp4", "int8", "fp8", "fp16", "bf16", "fp32")

# Words TensorRT uses for a tensor's type, in the inspector's JSON and its log, every version.
_TYPE_WORDS = (
    ("int4", ("int4",)),
    ("fp4", ("fp4", "e2m1")),
    ("int8", ("int8",)),
    ("fp8", ("fp8", "e4m3")),
    ("bf16", ("bf16", "bfloat16", "bfloat")),
    ("fp16", ("half", "fp16", "float16")),
    ("fp32", ("float", "fp32", "float32")),
)
# Non-float types (indices, shapes, masks) say nothing about compute precision.
_IGNORED_WORDS = ("int32", "int64", "bool", "uint8")

_ONNX_LAYER = re.compile(r"\[ONNX Layer: (.*?)\](?=\s*(?:\[ONNX Layer:|[\x1e\x1f]|$))", re.S)
_LOG_DATATYPE = re.compile(r"Datatype: ([A-Za-z0-9]+)")

# Ops whose int8 form is the point of quantizing: a DQ on their data input asks for int8.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# Ops that only move or cast data: their float16 outputs ask for nothing.
_DATA_MOVEMENT = frozenset({
    "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity",
    "Shape", "Gather", "Slice", "Concat", "Split", "Expand", "QuantizeLinear", "DequantizeLinear",
    "Constant", "ConstantOfShape",
})


@dataclass(frozen=True)
class EngineLayer:
    """One engine layer: its name, type, the ONNX nodes it runs and its tensors' types."""

    name: str
    layer_type: str
    onnx_nodes: tuple[str, ...]
    input_types: tuple[str, ...]  # normalized ("fp32", "int8", ...)
    output_types: tuple[str, ...]
    constant_types: tuple[str, ...] = ()  # weights, where the schema lists them (11.x, RTX)

    @property
    def precision(self) -> str | None:
        """The compute precision: the wider of the narrowest activation input and the narrowest
        weight (an int8 activation against float weights is dequantized and runs in float)."""
        operands = [p for p in (narrowest(self.input_types), narrowest(self.constant_types)) if p]
        if not operands:
            return narrowest(self.output_types)
        return max(operands, key=_rank)


@dataclass
class PrecisionReport:
    """Per ONNX node: the precision asked for and the precision the engine runs it in."""

    source: str  # "inspector" or "build log"
    layers: int = 0
    realized: dict[str, str] = field(default_factory=dict)  # node -> precision
    requested: dict[str, str] = field(default_factory=dict)  # node -> "int8" / "fp16"
    missed: list[tuple[str, str, str]] = field(default_factory=list)  # (node, asked, got)
    # Nodes that asked for a precision but no layer's metadata names (folded or renamed).
    unmapped: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for precision in self.realized.values():
            result[precision] = result.get(precision, 0) + 1
        return dict(sorted(result.items(), key=lambda item: _rank(item[0])))

    def summary(self) -> str:
        counts = ", ".join(f"{p} {n}" for p, n in self.counts().items()) or "no layer information"
        asked = len(self.requested)
        got = asked - len(self.missed)
        line = f"engine precision by ONNX node ({self.source}, {self.layers} layers): {counts}"
        if asked:
            line += f"; {got}/{asked} nodes that asked for int8/fp16 got it"
        return line

    def missed_lines(self) -> list[str]:
        return [f"node '{node}' asked for {asked}, runs in {got}" for node, asked, got in self.missed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "layers": self.layers,
            "counts": self.counts(),
            "nodes": dict(sorted(self.realized.items())),
            "requested": dict(sorted(self.requested.items())),
            "missed": [{"node": n, "asked": a, "got": g} for n, a, g in self.missed],
            "unmapped": list(self.unmapped),
        }


def narrowest(types: Iterable[str]) -> str | None:
    known = [t for t in types if t in PRECISION_ORDER]
    return min(known, key=_rank) if known else None


def _rank(precision: str) -> int:
    return PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)


def normalize_type(text: str) -> str | None:
    """'Half', 'Row major linear FP16 format', 'Int8' -> 'fp16' / 'int8'; None when unknown
    or not a float/quantized type ('Int32', 'N/A due to dynamic shapes')."""
    words = set(re.findall(r"[a-z0-9]+", text.lower()))
    if words & set(_IGNORED_WORDS):
        return None
    for precision, names in _TYPE_WORDS:
        if words & set(names):
            return precision
    return None


# --- reading the layer information --------------------------------------------------------------


def layers_from_json(text: str) -> list[EngineLayer]:
    """Layers of `get_engine_information(LayerInformationFormat.JSON)`, 10.x and 11.x schemas."""
    data = json.loads(text)
    raw = data.get("Layers", []) if isinstance(data, dict) else data
    return [_layer_from_dict(item) for item in raw if isinstance(item, dict)]


def _layer_from_dict(item: Mapping[str, Any]) -> EngineLayer:
    def types(tensors: Any) -> tuple[str, ...]:
        found = []
        for tensor in tensors if isinstance(tensors, list) else []:
            if not isinstance(tensor, dict):
                continue
            text = tensor.get("DataType") or tensor.get("Datatype") or tensor.get("Format/Datatype") or ""
            precision = normalize_type(str(text))
            if precision is not None:
                found.append(precision)
        return tuple(found)

    return EngineLayer(
        name=str(item.get("Name", "")),
        layer_type=str(item.get("LayerType", "")),
        onnx_nodes=parse_metadata(str(item.get("Metadata", ""))),
        input_types=types(item.get("Inputs")),
        output_types=types(item.get("Outputs")),
        constant_types=types(item.get("Constants")),
    )


def layers_from_log(messages: Iterable[str]) -> list[EngineLayer]:
    """Layers printed by the builder's verbose log (`Layers:` then one `Name: ...` line each)."""
    layers = []
    for message in messages:
        for line in message.splitlines():
            if line.startswith("Name: ") and ", LayerType: " in line:
                layers.append(_layer_from_log_line(line))
    return layers


def _layer_from_log_line(line: str) -> EngineLayer:
    name = line[len("Name: "):line.index(", LayerType: ")]
    rest = line[line.index(", LayerType: ") + len(", LayerType: "):]
    layer_type = rest.split(",", 1)[0]
    metadata = line.split(", Metadata: ", 1)[1] if ", Metadata: " in line else ""
    body = line.split(", Metadata: ", 1)[0]
    inputs_part, constants_part, outputs_part = _split_log_sections(body)

    def types(part: str) -> tuple[str, ...]:
        normalized = (normalize_type(word) for word in _LOG_DATATYPE.findall(part))
        return tuple(p for p in normalized if p is not None)

    return EngineLayer(
        name, layer_type, parse_metadata(metadata), types(inputs_part), types(outputs_part), types(constants_part)
    )


def _split_log_sections(body: str) -> tuple[str, str, str]:
    """(inputs, constants, outputs) text of one log line; a missing section is empty."""
    outputs_at = body.find("Outputs: [")
    head, outputs = (body[:outputs_at], body[outputs_at:]) if outputs_at >= 0 else (body, "")
    constants_at = head.find("Constants: [")
    if constants_at < 0:
        return head, "", outputs
    return head[:constants_at], head[constants_at:], outputs


def parse_metadata(metadata: str) -> tuple[str, ...]:
    """'[ONNX Layer: a][ONNX Layer: b]' (separators \\x1f / \\x1e in some versions) -> ('a', 'b')."""
    return tuple(dict.fromkeys(name.strip() for name in _ONNX_LAYER.findall(metadata.strip())))


# --- what the graph asks for, what the engine gives ---------------------------------------------


def requested_precisions(proto: onnx.ModelProto) -> dict[str, str]:
    """Node name -> "int8" for weighted ops fed by DequantizeLinear, "fp16" for nodes computing
    in float16 (their first output is float16 and they do more than move data)."""
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    types = _value_types(proto)
    requested = {}
    for node in graph.node:
        if not node.name:
            continue
        data = node.input[0] if node.input else ""
        producer = producers.get(data)
        if node.op_type in WEIGHTED_OPS and producer is not None and producer.op_type == "DequantizeLinear":
            requested[node.name] = "int8"
        elif node.op_type not in _DATA_MOVEMENT and node.output and types.get(node.output[0]) == onnx.TensorProto.FLOAT16:
            requested[node.name] = "fp16"
    return requested


def _value_types(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    values = list(graph.input) + list(graph.value_info) + list(graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def precision_report(layers: list[EngineLayer], requested: Mapping[str, str], source: str) -> PrecisionReport:
    """Each ONNX node's realized precision (narrowest over its layers) against its request."""
    report = PrecisionReport(source=source, layers=len(layers), requested=dict(requested))
    for layer in layers:
        precision = layer.precision
        if precision is None:
            continue
        for node in layer.onnx_nodes:
            current = report.realized.get(node)
            report.realized[node] = precision if current is None else min(current, precision, key=_rank)
    for node, asked in sorted(requested.items()):
        got = report.realized.get(node)
        if got is None:
            report.unmapped.append(node)
        elif _rank(got) > _rank(asked):
            report.missed.append((node, asked, got))
    return report
