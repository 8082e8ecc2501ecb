"""Shared helpers for the tests of the structural cleanup passes.

(eliminate_dead_code, eliminate_identity, infer_shapes, toposort): parse a model from ONNX text,
run a pass, run models through ONNX Runtime with its own optimizations off, and snapshot a
model's structure to prove that a pass left it alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx.parser
from helpers_ort import run_ort

from iropt.infra.pass_base import PassContext, PassResult
from iropt.infra.registry import create_pass
from iropt.ir.graph import iter_graphs
from iropt.ir.model import Model

RTOL, ATOL = 1e-5, 1e-6


def parse(text: str) -> onnx.ModelProto:
    """A model from ONNX text, checked so that a broken fixture fails loudly."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_pass(name: str, model: Model, **options: Any) -> PassResult:
    """Run the registered pass `name` on `model` in place."""
    return create_pass(name, options).run(model, PassContext())



def assert_same_outputs(before: onnx.ModelProto, after: Model, feeds: Mapping[str, np.ndarray]) -> None:
    """`after` is a valid model that computes what `before` computed, output by output."""
    proto = after.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    expected = run_ort(before, feeds)
    actual = run_ort(proto, feeds)
    assert list(actual) == list(expected), "output names or order changed"
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert actual[name].shape == value.shape, name
        np.testing.assert_allclose(actual[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def structure(model: Model) -> list[tuple[str, ...]]:
    """Every node of every graph, in order, as (graph, op, input names..., '->', output names...)."""
    rows = []
    for graph in iter_graphs(model.graph):
        for node in graph.nodes:
            rows.append(
                (
                    graph.name,
                    node.op,
                    *(t.name for t in node.inputs),
                    "->",
                    *(t.name for t in node.outputs),
                )
            )
    return rows


def ops(model: Model) -> list[str]:
    """Op types of the main graph's nodes, in order."""
    return [node.op for node in model.graph.nodes]


def random_feeds(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 inputs of the given shapes, drawn from a fixed seed."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
