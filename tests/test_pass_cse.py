"""eliminate_common_subexpressions: merged nodes compute what the originals computed."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from helpers_fold import assert_same_outputs, model_of, ops, parse, random_feeds, run_pass

from iropt.ir.model import Model


def _values(count: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return ", ".join(f"{v:.6f}" for v in rng.standard_normal(count))


TWO_BRANCHES = f"""
<ir_version: 8, opset_import: ["" : 17]>
branches (float[1, 2, 5, 5] x) => (float[1, 3, 5, 5] y) <float[3, 2, 3, 3] w = {{{_values(54, 1)}}}, float[3] b = {{{_values(3, 2)}}}> {{
    r1 = Relu(x)
    c1 = Conv<pads = [1, 1, 1, 1]>(r1, w, b)
    r2 = Relu(x)
    c2 = Conv<pads = [1, 1, 1, 1]>(r2, w, b)
    y = Add(c1, c2)
}}
"""


def test_duplicated_relu_conv_branches_merge_in_one_sweep() -> None:
    proto = parse(TWO_BRANCHES)
    model = Model.from_onnx(proto)
    result = run_pass("eliminate_common_subexpressions", model)
    # The second Relu merges first; that makes the second Conv read the same tensors.
    assert result.stats["merged"] == 2
    assert ops(model) == ["Relu", "Conv", "Add"]
    add = model.graph.nodes[2]
    assert add.inputs[0] is add.inputs[1] is model.graph.nodes[1].outputs[0]
    assert_same_outputs(proto, model, random_feeds({"x": (1, 2, 5, 5)}))
    assert not run_pass("eliminate_common_subexpressions", model).changed


DIFFERENT_ATTRS = """
<ir_version: 8, opset_import: ["" : 17]>
different (float[2, 3] x) => (float[2, 3] y, float[3, 2] t, float[3, 2] u) {
    a = LeakyRelu<alpha = 0.1>(x)
    b = LeakyRelu<alpha = 0.2>(x)
    y = Add(a, b)
    t = Transpose<perm = [1, 0]>(x)
    u = Transpose(x)
    m = ReduceMean<keepdims = 0>(x)
    n = ReduceMean<keepdims = 1>(x)
}
"""


def test_different_attributes_are_not_merged() -> None:
    proto = parse(DIFFERENT_ATTRS)
    model = Model.from_onnx(proto)
    result = run_pass("eliminate_common_subexpressions", model)
    assert not result.changed
    assert ops(model).count("LeakyRelu") == 2 and ops(model).count("Transpose") == 2
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3)}))


FLOATS = """
<ir_version: 8, opset_import: ["" : 17]>
floats (float[4] x) => (float[4] y, float[4] z) <float zero_pos = {0.0}, float zero_neg = {-0.0}, float one = {1.0}> {
    a = LeakyRelu<alpha = 0.25>(x)
    b = LeakyRelu<alpha = 0.25>(x)
    y = Add(a, b)
    c = Clip(x, zero_pos, one)
    d = Clip(x, zero_neg, one)
    z = Sub(c, d)
}
"""


def test_equal_float_attributes_merge_and_signed_zeros_do_not() -> None:
    proto = parse(FLOATS)
    model = Model.from_onnx(proto)
    result = run_pass("eliminate_common_subexpressions", model)
    # Clip's bounds are small constants: 0.0 and -0.0 differ bit for bit and stay apart.
    assert result.stats == {"merged": 1, "constants_merged": 0}
    assert ops(model) == ["LeakyRelu", "Add", "Clip", "Clip", "Sub"]
    assert_same_outputs(proto, model, random_feeds({"x": (4,)}))


GRAPH_OUTPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
outputs (float[4] x) => (float[4] y1, float[4] y2, float[4] z, float[4] w) {
    y1 = Relu(x)
    y2 = Relu(x)
    t = Sigmoid(x)
    w = Mul(t, t)
    z = Sigmoid(x)
}
"""


def test_graph_outputs_keep_their_names() -> None:
    proto = parse(GRAPH_OUTPUTS)
    model = Model.from_onnx(proto)
    result = run_pass("eliminate_common_subexpressions", model)
    # y1 and y2 are both outputs: merging would need an Identity, so they stay. The second
    # Sigmoid writes output z: the first Sigmoid now writes z, and Mul reads it.
    assert result.stats["merged"] == 1
    assert ops(model) == ["Relu", "Relu", "Sigmoid", "Mul"]
    sigmoid = model.graph.nodes[2]
    assert sigmoid.outputs[0].name == "z"
    assert model.graph.nodes[3].inputs[0] is sigmoid.outputs[0]
    assert [t.name for t in model.graph.outputs] == ["y1", "y2", "z", "w"]
    assert_same_outputs(proto, model, random_feeds({"x": (4,)}))


SMALL_CONSTANTS = """
<ir_version: 8, opset_import: ["" : 17]>
consts (float[4] x) => (float[4] y) <float[4] one_a = {1.0, 1.0, 1.0, 1.0}, float[4] one_b = {1.0, 1.0, 1.0, 1.0}> {
    a = Add(x, one_a)
    b = Add(x, one_b)
    s = Mul(a, b)
    y = Sub(s, one_b)
}
"""


def test_equal_small_constants_merge_so_their_readers_do() -> None:
    proto = parse(SMALL_CONSTANTS)
    model = Model.from_onnx(proto)
    result = run_pass("eliminate_common_subexpressions", model)
    assert result.stats == {"merged": 1, "constants_merged": 1}
    assert ops(model) == ["Add", "Mul", "Sub"]
    exported = {t.name for t in model.to_onnx().graph.initializer}
    assert exported == {"one_a"}
    assert_same_outputs(proto, model, random_feeds({"x": (4,)}))


RANDOM = """
<ir_version: 8, opset_import: ["" : 17]>
random (float[4] x) => (float[4] y) {
    a = RandomNormalLike(x)
    b = RandomNormalLike(x)
    y = Sub(a, b)
}
"""


def test_random_ops_are_not_merged() -> None:
    model = model_of(RANDOM)
    result = run_pass("eliminate_common_subexpressions", model)
    assert not result.changed
    assert ops(model) == ["RandomNormalLike", "RandomNormalLike", "Sub"]


SUBGRAPHS = """
<ir_version: 8, opset_import: ["" : 17]>
scopes (float[4] x, bool c) => (float[4] y, float[4] z) {
    e = Exp(x)
    y = If(c) <
        then_branch = t () => (float[4] a) { e2 = Exp(x)
                                             a = Add(e2, x) },
        else_branch = e () => (float[4] b) { b = Neg(x) }
    >
    z = If(c) <
        then_branch = t () => (float[4] a2) { e3 = Exp(x)
                                              a2 = Add(e3, x) },
        else_branch = e () => (float[4] b2) { b2 = Neg(x) }
    >
}
"""


def test_subgraph_nodes_reuse_outer_values_but_ifs_never_merge() -> None:
    proto = parse(SUBGRAPHS)
    model = Model.from_onnx(proto)
    result = run_pass("eliminate_common_subexpressions", model)
    # Each branch's Exp(x) is the main graph's e, computed before the If; the two Ifs hold
    # equal subgraphs but nodes with subgraphs are never merged.
    assert result.stats["merged"] == 2
    assert ops(model) == ["Exp", "If", "If"]
    outer = model.graph.nodes[0].outputs[0]
    for node in model.graph.nodes[1:]:
        branch = node.attrs["then_branch"]
        assert [n.op for n in branch.nodes] == ["Add"]
        assert branch.nodes[0].inputs[0] is outer
    for c in (True, False):
        feeds = {**random_feeds({"x": (4,)}), "c": np.array(c)}
        assert_same_outputs(proto, model, feeds)


def test_nothing_to_merge_changes_nothing() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    plain (float[4] x, float[4] b) => (float[4] y) {
        t = Relu(x)
        u = Relu(b)
        y = Add(t, u)
    }
    """
    model = model_of(text)
    before = model.to_onnx().SerializeToString()
    result = run_pass("eliminate_common_subexpressions", model)
    assert not result.changed
    assert model.to_onnx().SerializeToString() == before
    assert all(isinstance(t, gs.Variable) for t in model.graph.nodes[2].inputs)
