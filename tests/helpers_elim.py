"""Shared helpers for the tests of the elimination passes (merge_consecutive_*, eliminate_noop_ops).

A test writes a small model in ONNX text, runs one pass, and checks with `rewritten`: the result
passes the full ONNX checker, computes what the original computed in ONNX Runtime (graph
optimizations off, rtol=1e-5, atol=1e-6) on random inputs drawn from the declared shapes, keeps
its output names, and is at the pass's fixpoint (a second run reports no change). `unchanged`
checks a negative case: the pass reports no change and the exported model is identical.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx.parser
import onnx.printer
from helpers_ort import run_ort

from iropt.infra.pass_base import PassContext, PassResult
from iropt.infra.registry import create_pass
from iropt.ir.graph import constant_value, iter_graphs
from iropt.ir.model import Model

RTOL, ATOL = 1e-5, 1e-6


def model_text(signature: str, body: str, opset: int = 17) -> str:
    """ONNX text of a one-graph model: `signature` is `(inputs) => (outputs) <value infos>`."""
    return f'<ir_version: 8, opset_import: ["": {opset}]>\ng {signature}\n{{\n{body}\n}}\n'


def parse(text: str) -> onnx.ModelProto:
    """A model from ONNX text, fully checked so that a broken fixture fails loudly."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_pass(name: str, model: Model) -> PassResult:
    """Run the registered pass `name` (default options) on `model` in place."""
    return create_pass(name, {}).run(model, PassContext())



def random_feeds(proto: onnx.ModelProto, sizes: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input, symbolic dimensions taken from `sizes` (default 3)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in proto.graph.input:
        tensor_type = value.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else (sizes or {}).get(d.dim_param, 3)
            for d in tensor_type.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(-50, 50, size=shape).astype(dtype)
    return feeds


def rewritten(
    text: str, pass_name: str, sizes: Mapping[str, int] | None = None
) -> tuple[Model, PassResult]:
    """Run `pass_name` on the model `text`; check validity, equal outputs, names and fixpoint."""
    proto = parse(text)
    model = Model.from_onnx(proto)
    result = run_pass(pass_name, model)
    after = model.to_onnx()
    onnx.checker.check_model(after, full_check=True)
    assert [o.name for o in after.graph.output] == [o.name for o in proto.graph.output]
    for seed in (0, 1):
        feeds = random_feeds(proto, sizes, seed)
        expected, actual = run_ort(proto, feeds), run_ort(after, feeds)
        assert list(actual) == list(expected), "output names or order changed"
        for name, value in expected.items():
            assert actual[name].dtype == value.dtype, name
            assert actual[name].shape == value.shape, name
            np.testing.assert_allclose(actual[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    again = run_pass(pass_name, model)
    assert not again.changed, f"{pass_name} is not at its fixpoint after one run: {again.stats}"
    return model, result


def unchanged(text: str, pass_name: str) -> PassResult:
    """Run `pass_name` on `text` and check that it reports no change and changes nothing."""
    proto = parse(text)
    before = onnx.printer.to_text(Model.from_onnx(proto).to_onnx())
    model = Model.from_onnx(proto)
    result = run_pass(pass_name, model)
    assert not result.changed, result.stats
    assert not any(result.stats.values()), result.stats
    assert onnx.printer.to_text(model.to_onnx()) == before
    return result


def ops(model: Model) -> list[str]:
    """Op types of the main graph's nodes, in order."""
    return [node.op for node in model.graph.nodes]


def all_ops(model: Model) -> list[str]:
    """Op types of every node in every graph (subgraphs included)."""
    return [node.op for graph in iter_graphs(model.graph) for node in graph.nodes]


def producer_of(model: Model, tensor: str) -> tuple[str, list[str]]:
    """(op, input names) of the main-graph node that writes `tensor`."""
    for node in model.graph.nodes:
        if any(t.name == tensor for t in node.outputs):
            return node.op, [t.name for t in node.inputs]
    raise AssertionError(f"no node writes {tensor}")


def constant_input(model: Model, tensor: str, index: int) -> list[int]:
    """The integer values of input `index` of the node writing `tensor` (a constant)."""
    for node in model.graph.nodes:
        if any(t.name == tensor for t in node.outputs):
            value = constant_value(node.inputs[index])
            assert value is not None, f"input {index} of the producer of {tensor} is not constant"
            return [int(v) for v in np.asarray(value).reshape(-1)]
    raise AssertionError(f"no node writes {tensor}")


def attr_of(model: Model, tensor: str, name: str) -> object:
    """Attribute `name` of the main-graph node that writes `tensor`."""
    for node in model.graph.nodes:
        if any(t.name == tensor for t in node.outputs):
            return node.attrs.get(name)
    raise AssertionError(f"no node writes {tensor}")
