"""Put a layer's factors in the graph: the layer's node becomes two (or three) nodes in its place.

The new nodes read the layer's input tensor and the last one writes the layer's output tensor,
so consumers and graph outputs are untouched. They take the original node's position in
`graph.nodes`, which keeps the node list in topological order.

- MatMul: MatMul(x, A) -> MatMul(h, B).
- Gemm: alpha is folded into A; Gemm(x, A, transA) (MatMul without transA) -> Gemm(h, B, C, beta)
  (MatMul without C).
- Conv "matrix": the k x k Conv to r channels (stride, pads, dilation, auto_pad kept) -> 1 x 1
  Conv with the bias. "spatial": kh x 1 Conv (the vertical half of each attribute) -> 1 x kw Conv
  (the horizontal half). "tucker": 1 x 1 Conv -> k x k core Conv -> 1 x 1 Conv with the bias.
  Zero padding commutes with the bias-free inner Convs, so each form computes the Conv of the
  composed weight exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.lowrank.layers import Layer

Names = Callable[[str], str]
CONV_GEOMETRY = ("strides", "pads", "dilations", "auto_pad")


class Builder:
    """Creates the replacement nodes of one layer with fresh names and the layer's weight dtype."""

    def __init__(self, layer: Layer, names: Names) -> None:
        self.layer = layer
        self.names = names
        self.base = layer.node.name or layer.node.outputs[0].name
        self.dtype = layer.weight.dtype
        self.nodes: list[gs.Node] = []

    def constant(self, suffix: str, value: np.ndarray) -> gs.Constant:
        name = self.names(f"{self.layer.node.inputs[1].name}_{suffix}")
        return gs.Constant(name, np.ascontiguousarray(value.astype(self.dtype)))

    def node(self, op: str, inputs: Sequence[gs.Tensor], attrs: dict[str, Any] | None = None) -> gs.Tensor:
        """Append a node writing a fresh intermediate tensor, and return that tensor."""
        name = self.names(f"{self.base}_lowrank{len(self.nodes) + 1}")
        output = gs.Variable(self.names(f"{name}_out"), dtype=self.dtype)
        self.nodes.append(gs.Node(op, name=name, attrs=attrs or {}, inputs=list(inputs), outputs=[output]))
        return output

    def finish(self, graph: gs.Graph) -> list[gs.Node]:
        """Make the last node write the layer's output and splice the nodes in place of the layer."""
        old = self.layer.node
        last = self.nodes[-1]
        last.outputs.clear()
        last.outputs.extend(old.outputs)
        old.outputs.clear()
        old.inputs.clear()
        position = next(i for i, node in enumerate(graph.nodes) if node is old)
        graph.nodes[position : position + 1] = self.nodes
        return self.nodes


def replace_matrix(graph: gs.Graph, layer: Layer, a: np.ndarray, b: np.ndarray, names: Names) -> list[gs.Node]:
    """A MatMul or Gemm as two products: K x r (`a`) then r x N (`b`), plus the bias."""
    build = Builder(layer, names)
    x = layer.node.inputs[0]
    first = build.constant("lowrank_a", a)
    second = build.constant("lowrank_b", b)
    transposed = layer.kind == "gemm" and bool(layer.node.attrs.get("transA", 0))
    hidden = build.node("Gemm", [x, first], {"transA": 1}) if transposed else build.node("MatMul", [x, first])
    inputs = layer.node.inputs
    if layer.kind == "gemm" and len(inputs) > 2 and inputs[2].name:
        build.node("Gemm", [hidden, second, inputs[2]], {"beta": float(layer.node.attrs.get("beta", 1.0))})
    else:
        build.node("MatMul", [hidden, second])
    return build.finish(graph)


def _conv_attrs(node: gs.Node, kernel: Sequence[int], **override: Sequence[int]) -> dict[str, Any]:
    attrs: dict[str, Any] = {key: node.attrs[key] for key in CONV_GEOMETRY if key in node.attrs}
    attrs.update({key: list(value) for key, value in override.items()})
    attrs["kernel_shape"] = list(kernel)
    return attrs


def _pointwise(rank: int) -> dict[str, Any]:
    return {"kernel_shape": [1] * rank}


def _bias(layer: Layer) -> list[gs.Tensor]:
    inputs = layer.node.inputs
    return [inputs[2]] if len(inputs) > 2 and inputs[2].name else []


def replace_conv_matrix(
    graph: gs.Graph, layer: Layer, a: np.ndarray, b: np.ndarray, names: Names
) -> list[gs.Node]:
    """A Conv as the same Conv to r channels (`a`: K x r) then a 1 x 1 Conv (`b`: r x Cout)."""
    build = Builder(layer, names)
    weight = layer.weight
    kernel = weight.shape[2:]
    rank = a.shape[1]
    first = build.constant("lowrank_a", a.T.reshape(rank, weight.shape[1], *kernel))
    second = build.constant("lowrank_b", b.T.reshape(weight.shape[0], rank, *([1] * len(kernel))))
    hidden = build.node("Conv", [layer.node.inputs[0], first], _conv_attrs(layer.node, kernel))
    build.node("Conv", [hidden, second, *_bias(layer)], _pointwise(len(kernel)))
    return build.finish(graph)


def replace_conv_spatial(
    graph: gs.Graph, layer: Layer, first: np.ndarray, second: np.ndarray, names: Names
) -> list[gs.Node]:
    """A 2-D Conv as a kh x 1 Conv to r channels then a 1 x kw Conv, each with its half of the geometry."""
    build = Builder(layer, names)
    node = layer.node
    strides = list(node.attrs.get("strides", [1, 1]))
    dilations = list(node.attrs.get("dilations", [1, 1]))
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    vertical = build.constant("lowrank_v", first)
    horizontal = build.constant("lowrank_h", second)
    hidden = build.node("Conv", [node.inputs[0], vertical], _conv_attrs(
        node, [first.shape[2], 1], strides=[strides[0], 1], dilations=[dilations[0], 1],
        **({"pads": [pads[0], 0, pads[2], 0]} if "pads" in node.attrs else {}),
    ))
    build.node("Conv", [hidden, horizontal, *_bias(layer)], _conv_attrs(
        node, [1, second.shape[3]], strides=[1, strides[1]], dilations=[1, dilations[1]],
        **({"pads": [0, pads[1], 0, pads[3]]} if "pads" in node.attrs else {}),
    ))
    return build.finish(graph)


def replace_conv_tucker(
    graph: gs.Graph, layer: Layer, first: np.ndarray, core: np.ndarray, last: np.ndarray, names: Names
) -> list[gs.Node]:
    """A Conv as 1 x 1 (Cin -> r_in), the k x k core (r_in -> r_out, geometry kept), 1 x 1 (r_out -> Cout)."""
    build = Builder(layer, names)
    spatial = core.ndim - 2
    ones = [1] * spatial
    into = build.constant("lowrank_in", first.reshape(*first.shape, *ones))
    middle = build.constant("lowrank_core", core)
    out = build.constant("lowrank_out", last.reshape(*last.shape, *ones))
    hidden = build.node("Conv", [layer.node.inputs[0], into], _pointwise(spatial))
    hidden = build.node("Conv", [hidden, middle], _conv_attrs(layer.node, core.shape[2:]))
    build.node("Conv", [hidden, out, *_bias(layer)], _pointwise(spatial))
    return build.finish(graph)
