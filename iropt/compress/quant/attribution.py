"""Which layer each node of the graph ONNX Runtime ran belongs to, so profiled times add up per layer.

ORT rewrites the graph before running it: it fuses `DequantizeLinear -> Conv -> QuantizeLinear`
into a QLinearConv named after the Conv with a suffix (`conv_token_12`), moves int8 regions to
NHWC with Transpose nodes it names `Transpose_token_N`, and wraps float convs in NCHWc
`ReorderInput`/`ReorderOutput` nodes; a float Conv it turns into NCHWc, fused with what follows
it, is named after the last fused node's output tensor (`relu_out_nchwc`). To read its names
back, the models are profiled with every node renamed `tag_name(index)` (`iropt_node_12`): a
profiled node whose name, without ORT's suffixes, is a tag is that node of the model or a fusion
led by it; one whose name is a tensor of the model is the node that produced that tensor (or a
fusion ending there).

Every other node is a conversion that some layer caused (the Q/DQ iropt inserts are named after
their tensors, ORT's layout nodes after nothing) and is charged to it by walking the graph ORT
ran: a DequantizeLinear or ReorderOutput to the node that produced its input (the layer whose
output it converts back), a QuantizeLinear or ReorderInput to the node that reads its output (the
layer whose input it converts); other nodes (Transpose) to their int8 neighbour, consumer first,
else to the consumer, else the producer. The walk passes through chains of conversions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx

from iropt.ir.model import Model

TAG_PREFIX = "iropt_node_"
_TAG = re.compile(rf"^{TAG_PREFIX}(\d+)(?:_|$)")
# What ORT appends to the names of nodes it creates from others.
_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc)+$")
# Conversions charged to the layer whose output they read / whose input they write.
PRODUCER_FIRST = ("DequantizeLinear", "ReorderOutput")
CONSUMER_FIRST = ("QuantizeLinear", "ReorderInput", "DynamicQuantizeLinear")
# Kernels that compute in int8 (ORT's fused forms of QDQ groups).
INT8_KERNELS = ("QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                "QAttention", "QEmbedLayerNormalization")


def tag_name(index: int) -> str:
    return f"{TAG_PREFIX}{index}"


def tagged_copy(model: Model) -> Model:
    """A copy of `model` whose node names carry their positions, for ORT to pass on to its fusions."""
    copy = model.copy()
    for index, node in enumerate(copy.graph.nodes):
        node.name = tag_name(index)
    return copy


def tagged_index(name: str) -> int | None:
    """The position a tagged node name (or ORT's name for a fusion led by it) carries, or None."""
    match = _TAG.match(name)
    return int(match.group(1)) if match else None


def tensor_producers(model: Model) -> dict[str, int]:
    """Tensor name -> position of the tagged node that writes it (inserted, untagged nodes left out)."""
    producers = {}
    for node in model.graph.nodes:
        index = tagged_index(node.name or "")
        if index is None:
            continue
        for tensor in node.outputs:
            producers[tensor.name] = index
    return producers


def resolve(name: str, producers: Mapping[str, int]) -> int | None:
    """The model position an ORT node name stands for (see the module docstring), or None."""
    index = tagged_index(name)
    if index is not None:
        return index
    return producers.get(_ORT_SUFFIX.sub("", name))


def is_int8_kernel(op: str) -> bool:
    return op.startswith("QLinear") or op in INT8_KERNELS


@dataclass
class Attribution:
    """Milliseconds per node position of the model (the layer's own kernel plus the conversions
    charged to it), and what no layer could be found for."""

    by_index: dict[int, float]
    unattributed_ms: float

    def layer_ms(self, indices: Iterable[int]) -> float:
        return sum(self.by_index.get(index, 0.0) for index in indices)


class _Graph:
    """The graph ORT ran, as lookups by node name."""

    def __init__(self, graph: onnx.GraphProto, producers: Mapping[str, int]) -> None:
        self.resolved = {node.name: resolve(node.name, producers) for node in graph.node}
        self.nodes = {node.name: node for node in graph.node if node.name}
        self.producer: dict[str, str] = {}
        self.consumers: dict[str, list[str]] = {}
        for node in graph.node:
            for output in node.output:
                self.producer[output] = node.name
            for tensor in node.input:
                self.consumers.setdefault(tensor, []).append(node.name)

    def upstream(self, name: str) -> list[str]:
        node = self.nodes.get(name)
        return [self.producer[t] for t in (node.input if node else []) if t in self.producer]

    def downstream(self, name: str) -> list[str]:
        node = self.nodes.get(name)
        return [c for t in (node.output if node else []) for c in self.consumers.get(t, [])]


def attribute(
    times: Mapping[str, tuple[str, float]], graph: onnx.GraphProto, producers: Mapping[str, int]
) -> Attribution:
    """Charge each profiled node's ms (`times`: node name -> (op, ms)) to a node position of the
    model; `graph` is the graph ORT ran, `producers` the model's `tensor_producers`."""
    _name_unnamed(times, graph)
    lookup = _Graph(graph, producers)
    by_index: dict[int, float] = {}
    unattributed = 0.0
    for name, (op, ms) in times.items():
        index = lookup.resolved.get(name, resolve(name, producers))
        if index is None:
            index = _charged_to(name, op, lookup)
        if index is None:
            unattributed += ms
        else:
            by_index[index] = by_index.get(index, 0.0) + ms
    return Attribution(by_index, unattributed)


_GENERATED_NAME = re.compile(r"^(\w+?)_(\d+)$")


def _name_unnamed(times: Mapping[str, tuple[str, float]], graph: onnx.GraphProto) -> None:
    """Give the graph's unnamed nodes the names the profiler used for them.

    ORT names a node without a name `<op>_<its index>` in the profile (the nodes a function such
    as HardSwish is inlined into have none), but the graph it saves keeps them unnamed. Its
    indices grow in the order it created the nodes, which follows the graph's order, so the
    profiled names of one op, sorted by index, are matched in order to that op's unnamed nodes
    (only when both counts agree)."""
    unnamed: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if not node.name:
            unnamed.setdefault(node.op_type, []).append(node)
    generated: dict[str, list[tuple[int, str]]] = {}
    for name, (op, _) in times.items():
        match = _GENERATED_NAME.match(name)
        if match and match.group(1) == op and op in unnamed:
            generated.setdefault(op, []).append((int(match.group(2)), name))
    for op, names in generated.items():
        if len(names) == len(unnamed[op]):
            for node, (_, name) in zip(unnamed[op], sorted(names), strict=True):
                node.name = name


def _nearest_tagged(start: str, step: str, lookup: _Graph) -> list[tuple[int, str]]:
    """Tagged nodes reached from `start` going `step` ("upstream"/"downstream") through untagged ones."""
    found: list[tuple[int, str]] = []
    seen = {start}
    frontier = [start]
    while frontier:
        following = []
        for name in frontier:
            for neighbour in getattr(lookup, step)(name):
                if neighbour in seen:
                    continue
                seen.add(neighbour)
                index = lookup.resolved.get(neighbour)
                if index is None:
                    following.append(neighbour)
                else:
                    found.append((index, lookup.nodes[neighbour].op_type))
        if found:
            return found
        frontier = following
    return found


def _charged_to(name: str, op: str, lookup: _Graph) -> int | None:
    consumers = _nearest_tagged(name, "downstream", lookup)
    producers = _nearest_tagged(name, "upstream", lookup)
    if op in PRODUCER_FIRST:
        order = [producers, consumers]
    elif op in CONSUMER_FIRST:
        order = [consumers, producers]
    else:
        int8 = [[item for item in consumers if is_int8_kernel(item[1])],
                [item for item in producers if is_int8_kernel(item[1])]]
        order = [*int8, consumers, producers]
    for candidates in order:
        if candidates:
            return candidates[0][0]
    return None
