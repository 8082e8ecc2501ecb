"""Shared helpers for the tests of the rewrite API and the fusion passes.

A test writes a small model in ONNX text, passes its weights as numpy arrays (`build`), runs
one pass with `fused`, and checks: the result passes the full ONNX checker, keeps its output
names, and computes what the original computed in ONNX Runtime (CPU, graph optimizations off)
at rtol=1e-4 / atol=1e-5 on random inputs from the declared shapes. `unchanged` checks a
negative case: no change reported and the exported model is identical.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx
import onnx.parser
from helpers_ort import run_ort

from iropt.infra.pass_base import PassContext, PassResult
from iropt.infra.registry import create_pass
from iropt.ir.model import Model

RTOL, ATOL = 1e-4, 1e-5


def build(
    graph_text: str, weights: Mapping[str, np.ndarray] | None = None, opset: int = 17
) -> onnx.ModelProto:
    """A model from the text of one graph (`g (inputs) => (outputs) { ... }`) plus initializers."""
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{graph_text}')
    for name, value in (weights or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def rand(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    """Normal float32 values, small enough that fp32 sums stay well within the tolerance."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def bn_params(rng: np.random.Generator, channels: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    """BatchNormalization parameters named `<prefix>_scale/_bias/_mean/_var` (var > 0)."""
    return {
        f"{prefix}_scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}_bias": rand(rng, channels),
        f"{prefix}_mean": rand(rng, channels),
        f"{prefix}_var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }



def random_feeds(proto: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Random float inputs for every graph input; symbolic dimensions become `dim`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in proto.graph.input:
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def histogram(proto: onnx.ModelProto) -> Counter[str]:
    """Op types and their counts in the graph and every subgraph."""
    counts: Counter[str] = Counter()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return counts


def run_pass(
    proto: onnx.ModelProto, pass_name: str, options: Mapping[str, object] | None = None
) -> tuple[onnx.ModelProto, PassResult]:
    """Run the registered pass on a copy of `proto`; the exported result and the PassResult."""
    model = Model.from_onnx(proto)
    result = create_pass(pass_name, dict(options or {})).run(model, PassContext())
    return model.to_onnx(), result


def assert_same_outputs(
    before: onnx.ModelProto, after: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None
) -> None:
    """Same output names and the same values at RTOL/ATOL on `feeds` (default: random)."""
    feeds = feeds if feeds is not None else random_feeds(before)
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    expected, actual = run_ort(before, feeds), run_ort(after, feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def fused(
    proto: onnx.ModelProto,
    pass_name: str,
    options: Mapping[str, object] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, PassResult]:
    """Run the pass; assert it changed the model into a valid, equivalent one at its fixpoint."""
    after, result = run_pass(proto, pass_name, options)
    assert result.changed, result
    onnx.checker.check_model(after, full_check=True)
    assert_same_outputs(proto, after, feeds)
    _, second = run_pass(after, pass_name, options)
    assert not second.changed, f"not at a fixpoint: {second.stats}"
    return after, result


def unchanged(
    proto: onnx.ModelProto, pass_name: str, options: Mapping[str, object] | None = None
) -> PassResult:
    """Run the pass; assert it reports no change and the model is exactly what it was."""
    after, result = run_pass(proto, pass_name, options)
    assert not result.changed, result
    assert all(count == 0 for count in result.stats.values()), result.stats
    # Compare against an untouched graphsurgeon round trip, so serialization details don't count.
    assert after == Model.from_onnx(proto).to_onnx()
    return result
