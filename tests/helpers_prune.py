"""Small CNN / FFN graphs for the pruning tests, built with onnx.helper and seeded weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from iropt.ir.model import Model

OPSET = 17


class Net:
    """Appends nodes with fresh names; weights come from one seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs: Sequence[str], outputs: int = 1, domain: str = "", **attrs: object) -> str:
        names = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=self.name(f"n_{op}"),
                                           domain=domain, **attrs))
        return names[0] if outputs == 1 else ",".join(names)

    def weight(self, shape: Sequence[int]) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return self.const((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), "w")

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        inputs = [x, self.weight([c_out, c_in // group, k, k])]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(c_out).astype(np.float32) * 0.1, "b"))
        return self.op("Conv", inputs, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.1, r.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization", [x, *(self.const(p.astype(np.float32)) for p in params)])

    def cbr(self, x: str, c_in: int, c_out: int) -> str:
        return self.op("Relu", [self.bn(self.conv(x, c_in, c_out, bias=False), c_out)])

    def matmul(self, x: str, k: int, n: int) -> str:
        return self.op("MatMul", [x, self.weight([k, n])])

    def gemm(self, x: str, k: int, n: int) -> str:
        bias = self.const(self.rng.standard_normal(n).astype(np.float32) * 0.1, "b")
        return self.op("Gemm", [x, self.weight([n, k]), bias], transB=1)

    def head(self, x: str, c: int, classes: int = 5) -> str:
        return self.gemm(self.op("Flatten", [self.op("GlobalAveragePool", [x])]), c, classes)

    def model(self, inputs: dict[str, Sequence[int | str]], outputs: Sequence[str]) -> Model:
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
            self.inits,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("custom", 1)])
        proto.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(proto)
        del proto.graph.output[:]
        proto.graph.output.extend(v for v in inferred.graph.output)
        return Model.from_onnx(proto)


IMAGE = {"x": ("N", 4, 6, 6)}


def chain(seed: int = 0) -> Model:
    """Conv-BN-Relu, Conv-BN-Relu, GlobalAveragePool, Flatten, Gemm."""
    net = Net(seed)
    y = net.cbr(net.cbr("x", 4, 8), 8, 8)
    return net.model(IMAGE, [net.head(y, 8)])


def residual(seed: int = 0) -> Model:
    """Two Conv-BN branches added (a residual stream), then a Conv and a head."""
    net = Net(seed)
    stem = net.cbr("x", 4, 8)
    branch = net.bn(net.conv(net.cbr(stem, 8, 8), 8, 8, bias=False), 8)
    joined = net.op("Relu", [net.op("Add", [branch, stem])])
    return net.model(IMAGE, [net.head(net.cbr(joined, 8, 8), 8)])


def concat(seed: int = 0) -> Model:
    """Two Conv branches concatenated along channels, read by a Conv."""
    net = Net(seed)
    a, b = net.cbr("x", 4, 8), net.cbr("x", 4, 6)
    joined = net.op("Concat", [a, b], axis=1)
    return net.model(IMAGE, [net.head(net.cbr(joined, 14, 8), 8)])


def depthwise_se(seed: int = 0) -> Model:
    """Conv, depthwise Conv, an SE gate (GlobalAveragePool, 1x1 Convs, Sigmoid, Mul), Conv."""
    net = Net(seed)
    y = net.cbr("x", 4, 8)
    y = net.op("Relu", [net.conv(y, 8, 8, group=8)])
    gate = net.op("GlobalAveragePool", [y])
    gate = net.op("Sigmoid", [net.conv(net.op("Relu", [net.conv(gate, 8, 4, k=1)]), 4, 8, k=1)])
    y = net.op("Mul", [y, gate])
    return net.model(IMAGE, [net.head(net.cbr(y, 8, 8), 8)])


def ffn(seed: int = 0, d: int = 8, hidden: int = 16) -> Model:
    """MatMul + bias, exact GELU as Erf ops, MatMul + bias, residual Add: a transformer FFN."""
    net = Net(seed)
    h = net.op("Add", [net.matmul("x", d, hidden), net.const(net.rng.standard_normal(hidden).astype(np.float32) * 0.1)])
    erf = net.op("Erf", [net.op("Div", [h, net.const(np.float32(np.sqrt(2.0)))])])
    gelu = net.op("Mul", [net.op("Mul", [h, net.op("Add", [erf, net.const(np.float32(1.0))])]),
                          net.const(np.float32(0.5))])
    out = net.op("Add", [net.matmul(gelu, hidden, d), net.const(net.rng.standard_normal(d).astype(np.float32) * 0.1)])
    return net.model({"x": ("N", 3, d)}, [net.op("Add", ["x", out])])


def feeds_for(model: Model, seed: int = 1, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in model.graph.inputs:
        shape = [batch, *tensor.shape[1:]]
        feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


BLOCKS = ("cbr", "residual", "concat", "depthwise", "se", "split")


def random_cnn(blocks: Sequence[str], widths: Sequence[int], seed: int) -> Model:
    """A CNN made of the given blocks (each with its own width), a head, and an extra tap output."""
    net = Net(seed)
    x, c = "x", 4
    for kind, width in zip(blocks, widths, strict=True):
        if kind == "cbr":
            x, c = net.cbr(x, c, width), width
        elif kind == "residual":
            x = net.op("Relu", [net.op("Add", [net.bn(net.conv(net.cbr(x, c, width), width, c, bias=False), c), x])])
        elif kind == "concat":
            half = max(width // 2, 1)
            x = net.op("Concat", [net.cbr(x, c, width), net.cbr(x, c, half)], axis=1)
            c = width + half
        elif kind == "depthwise":
            x = net.op("Relu", [net.conv(x, c, c, group=c)])
        elif kind == "se":
            gate = net.conv(net.op("Relu", [net.conv(net.op("GlobalAveragePool", [x]), c, 2, k=1)]), 2, c, k=1)
            x = net.op("Mul", [x, net.op("Sigmoid", [gate])])
        elif kind == "split":
            first, second = net.op("Split", [x, net.const(np.array([c // 2, c - c // 2], dtype=np.int64))],
                                   outputs=2, axis=1).split(",")
            x = net.op("Concat", [net.cbr(first, c // 2, width), net.cbr(second, c - c // 2, width)], axis=1)
            c = 2 * width
    return net.model(IMAGE, [net.head(x, c)])


def assert_pruned_like(reference: Model, pruned: Model, feeds: dict[str, np.ndarray]) -> None:
    """`pruned` gives `reference`'s outputs (same shapes) and passes the checker and shape inference."""
    from iropt.verify.runtime import reference_runner

    want, got = reference_runner(reference).run(feeds), reference_runner(pruned).run(feeds)
    for name, value in want.items():
        assert got[name].shape == value.shape
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)
    proto = pruned.to_onnx()
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
