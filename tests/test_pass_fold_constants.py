"""fold_constants and the node evaluator behind it (iropt.ir.evaluate).

Every rewritten model passes the ONNX checker and computes what the original computes under
ONNX Runtime (graph optimizations off); folded values are also compared with numpy.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import pytest
from helpers_fold import (
    assert_same_outputs,
    model_of,
    ops,
    parse,
    random_feeds,
    run_ort,
    run_pass,
)
from hypothesis import given
from hypothesis import strategies as st

from iropt.ir.evaluate import FAST_PATH_OPS, EvaluationError, evaluate_node, reference_evaluate
from iropt.ir.model import Model

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[N, 4] x) => (float[N, 4] y) <float[4] w = {1.0, -2.0, 3.5, 0.25}> {
    two = Constant<value_float = 2.0>()
    w2 = Mul(w, two)
    w3 = Sub(w2, w)
    w4 = Div(w3, two)
    y = Add(x, w4)
}
"""


def test_arithmetic_chain_folds_to_one_initializer() -> None:
    proto = parse(CHAIN)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    assert result.changed
    assert result.stats["constants_converted"] == 1
    assert result.stats["folded"] == 3
    assert ops(model) == ["Add"]
    folded = model.graph.nodes[0].inputs[1]
    assert isinstance(folded, gs.Constant) and folded.name == "w4"
    w = np.array([1.0, -2.0, 3.5, 0.25], dtype=np.float32)
    two = np.float32(2.0)
    np.testing.assert_array_equal(folded.values, (w * two - w) / two)
    assert folded.values.dtype == np.float32
    assert_same_outputs(proto, model, random_feeds({"x": (3, 4)}))


def test_second_run_changes_nothing() -> None:
    model = model_of(CHAIN)
    run_pass("fold_constants", model)
    again = run_pass("fold_constants", model)
    assert not again.changed
    assert ops(model) == ["Add"]


CONSTANT_KINDS = """
<ir_version: 8, opset_import: ["" : 17]>
kinds (float[3] x, int64[3] i) => (float[3] y, int64[3] j, float[3] z, string s, string[2] s2) {
    a = Constant<value = float[3] {1.0, 2.0, 3.0}>()
    b = Constant<value_float = 0.5>()
    c = Constant<value_floats = [4.0, 5.0, 6.0]>()
    d = Constant<value_int = 7>()
    e = Constant<value_ints = [1, 2, 3]>()
    s = Constant<value_string = "kept">()
    s2 = Constant<value = string[2] {"a", "b"}>()
    t0 = Add(x, a)
    t1 = Mul(t0, b)
    y = Sub(t1, c)
    k = Add(i, d)
    j = Mul(k, e)
    z = Identity(a)
}
"""


def test_constant_nodes_become_initializers() -> None:
    proto = parse(CONSTANT_KINDS)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    # Five numeric Constants become initializers; string ones stay nodes (an initializer whose
    # values a pass decodes is written back as raw bytes, which strings cannot be).
    assert result.stats["constants_converted"] == 5
    # z = Identity(a) reads a constant: z is a graph output, now an initializer of that name.
    assert result.stats["folded"] == 1
    assert ops(model) == ["Constant", "Constant", "Add", "Mul", "Sub", "Add", "Mul"]
    exported = model.to_onnx()
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in exported.graph.initializer}
    np.testing.assert_array_equal(initializers["c"], np.array([4.0, 5.0, 6.0], dtype=np.float32))
    assert initializers["b"].dtype == np.float32 and initializers["b"].shape == ()
    assert initializers["d"].dtype == np.int64 and initializers["d"].shape == ()
    assert initializers["e"].dtype == np.int64
    assert "z" in initializers and [o.name for o in exported.graph.output] == ["y", "j", "z", "s", "s2"]
    feeds = {"x": np.array([0.5, -1.0, 2.0], dtype=np.float32), "i": np.array([3, -4, 5], dtype=np.int64)}
    outputs = assert_same_outputs(proto, model, feeds)
    assert outputs["s"] == "kept"
    assert outputs["s2"].tolist() == ["a", "b"]


SHAPES = """
<ir_version: 8, opset_import: ["" : 17]>
shapes (float[2, 3, 4] x) => (float[2, 12] y, int64[1] mid, int64 n) {
    head = Shape<end = 1>(x)
    rest = Shape<start = 1>(x)
    count = ReduceProd<keepdims = 1>(rest)
    target = Concat<axis = 0>(head, count)
    y = Reshape(x, target)
    mid = Shape<start = 1, end = -1>(x)
    n = Size(x)
}
"""


def test_shape_and_size_of_static_shapes_fold() -> None:
    proto = parse(SHAPES)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    assert result.stats["shapes_folded"] == 4  # head, rest, mid, n
    assert result.stats["folded"] == 2  # ReduceProd (reference evaluator), Concat (fast path)
    assert ops(model) == ["Reshape"]
    target = model.graph.nodes[0].inputs[1]
    assert isinstance(target, gs.Constant)
    np.testing.assert_array_equal(target.values, np.array([2, 12], dtype=np.int64))
    outputs = assert_same_outputs(proto, model, random_feeds({"x": (2, 3, 4)}))
    np.testing.assert_array_equal(outputs["mid"], [3])
    assert outputs["n"] == 24


DYNAMIC_SHAPES = """
<ir_version: 8, opset_import: ["" : 17]>
dynamic (float[N, 3] x) => (int64[2] s, int64 n, int64[1] tail) {
    s = Shape(x)
    n = Size(x)
    tail = Shape<start = 1>(x)
}
"""


def test_shapes_with_unknown_dims_do_not_fold() -> None:
    proto = parse(DYNAMIC_SHAPES)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    # Shape(x) and Size(x) depend on N; Shape<start=1> covers the known dimension only.
    assert result.stats["shapes_folded"] == 1
    assert ops(model) == ["Shape", "Size"]
    outputs = assert_same_outputs(proto, model, random_feeds({"x": (5, 3)}))
    np.testing.assert_array_equal(outputs["s"], [5, 3])


def test_fold_shapes_option_off() -> None:
    model = model_of(SHAPES)
    result = run_pass("fold_constants", model, fold_shapes=False)
    assert result.stats["shapes_folded"] == 0
    assert ops(model).count("Shape") == 3 and "Size" in ops(model)


LOOP = """
<ir_version: 8, opset_import: ["" : 17]>
loop (float[2] x, int64 trip, bool go) => (float[2] s) <float[2] k = {0.5, 1.5}> {
    s = Loop(trip, go, x) <body = body (int64 i, bool cin, float[2] v) => (bool cout, float[2] vout) {
        cout = Identity(cin)
        two = Constant<value_float = 2.0>()
        k2 = Mul(k, two)
        vout = Add(v, k2)
    }>
}
"""


def test_folds_inside_loop_body_reading_outer_constants() -> None:
    proto = parse(LOOP)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    assert result.stats == {
        "folded": 1,
        "shapes_folded": 0,
        "ifs_inlined": 0,
        "constants_converted": 1,
        "skipped_size": 0,
    }
    body = model.graph.nodes[0].attrs["body"]
    assert [n.op for n in body.nodes] == ["Identity", "Add"]
    feeds = {"x": np.array([1.0, -2.0], dtype=np.float32), "trip": np.array(3), "go": np.array(True)}
    outputs = assert_same_outputs(proto, model, feeds)
    np.testing.assert_allclose(outputs["s"], feeds["x"] + 3 * np.array([1.0, 3.0], dtype=np.float32))


IF_BRANCHES = """
<ir_version: 8, opset_import: ["" : 17]>
branches (float[2] x, bool c) => (float[2] y) <float[2] k = {0.5, 1.5}> {
    y = If(c) <
        then_branch = t () => (float[2] a) { k2 = Neg(k)
                                             a = Add(x, k2) },
        else_branch = e () => (float[2] b) { k3 = Mul(k, k)
                                             b = Sub(x, k3) }
    >
}
"""


@pytest.mark.parametrize("condition", [True, False])
def test_folds_inside_if_branches(condition: bool) -> None:
    proto = parse(IF_BRANCHES)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    assert result.stats["folded"] == 2 and result.stats["ifs_inlined"] == 0
    node = model.graph.nodes[0]
    assert [n.op for n in node.attrs["then_branch"].nodes] == ["Add"]
    assert [n.op for n in node.attrs["else_branch"].nodes] == ["Sub"]
    feeds = {"x": np.array([1.0, -2.0], dtype=np.float32), "c": np.array(condition)}
    assert_same_outputs(proto, model, feeds)


# The taken branch computes a tensor named like a tensor of another If's branch ("t1"): once
# inlined, that name would be shadowed. y is a graph output and z reads it.
CONSTANT_IF = """
<ir_version: 8, opset_import: ["" : 17]>
inline (float[2] x, bool d) => (float[2] y, float[2] z) <bool c = {COND}, float[2] k = {0.5, -1.5}> {
    s = Sigmoid(x)
    y = If(c) <
        then_branch = t () => (float[2] a) { t1 = Mul(x, k)
                                             a = Relu(t1) },
        else_branch = e () => (float[2] b) { b = Neg(x) }
    >
    w = If(d) <
        then_branch = t2 () => (float[2] a2) { t1 = Add(x, k)
                                               a2 = Abs(t1) },
        else_branch = e2 () => (float[2] b2) { b2 = Identity(s) }
    >
    z = Add(y, w)
}
"""


@pytest.mark.parametrize("condition", [True, False])
def test_if_with_constant_condition_is_inlined(condition: bool) -> None:
    proto = parse(CONSTANT_IF.replace("COND", str(int(condition))))
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    assert result.stats["ifs_inlined"] == 1
    inlined = ["Mul", "Relu"] if condition else ["Neg"]
    assert ops(model) == ["Sigmoid", *inlined, "If", "Add"]
    # The branch's last node writes the graph output itself: no Identity, same output names.
    producer = model.graph.outputs[0].inputs[0]
    assert producer.op == inlined[-1]
    assert [t.name for t in model.graph.outputs] == ["y", "z"]
    x = np.array([0.7, -0.3], dtype=np.float32)
    k = np.array([0.5, -1.5], dtype=np.float32)
    for d in (True, False):
        # The checker inside refuses the model if the inlined t1 still shadowed the other branch's.
        outputs = assert_same_outputs(proto, model, {"x": x, "d": np.array(d)})
        expected_y = np.maximum(x * k, 0) if condition else -x
        np.testing.assert_allclose(outputs["y"], expected_y, rtol=1e-5, atol=1e-6)


CONSTANT_IF_CONSTANT_BRANCH = """
<ir_version: 8, opset_import: ["" : 17]>
folded (float[2] x) => (float[2] y, float[2] z) <float[2] k = {0.5, -1.5}> {
    c = Constant<value_int = 0>()
    cb = Cast<to = 9>(c)
    y = If(cb) <
        then_branch = t () => (float[2] a) { a = Neg(x) },
        else_branch = e () => (float[2] b) { b = Mul(k, k) }
    >
    w = Add(y, k)
    z = Mul(x, w)
}
"""


def test_inlined_constant_branch_keeps_folding_downstream() -> None:
    proto = parse(CONSTANT_IF_CONSTANT_BRANCH)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    assert result.stats["ifs_inlined"] == 1
    # Cast, the branch's Mul and the Add after the If all fold in the same sweep.
    assert result.stats["folded"] == 3
    assert ops(model) == ["Mul"]
    y = model.graph.outputs[0]
    assert isinstance(y, gs.Constant) and y.name == "y"
    assert_same_outputs(proto, model, {"x": np.array([2.0, 3.0], dtype=np.float32)})


def test_inlined_branch_returning_outer_value_gets_identity() -> None:
    # ONNX Runtime refuses a branch that returns an outer value directly, but graphsurgeon
    # rewrites can produce one; the inlined result must still be a valid model.
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    passthrough (float[2] x) => (float[2] y) <bool c = {1}> {
        y = If(c) <then_branch = t () => (float[2] x) { }, else_branch = e () => (float[2] b) { b = Neg(x) }>
    }
    """
    model = model_of(text, check=False)
    result = run_pass("fold_constants", model)
    assert result.stats["ifs_inlined"] == 1
    assert ops(model) == ["Identity"]
    proto = model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    x = np.array([1.5, -2.5], dtype=np.float32)
    np.testing.assert_array_equal(run_ort(proto, {"x": x})["y"], x)


def test_inline_if_option_off() -> None:
    model = model_of(CONSTANT_IF.replace("COND", "1"))
    result = run_pass("fold_constants", model, inline_if=False)
    assert result.stats["ifs_inlined"] == 0
    assert "If" in ops(model)


# ConstantOfShape of 2 Mi float32 elements: 8 MiB of initializer if folded.
SIZE_GUARD = """
<ir_version: 8, opset_import: ["" : 17]>
guard (float[1] x) => (float[1] y) <int64[1] n = {2097152}> {
    big = ConstantOfShape<value = float[1] {1.0}>(n)
    total = ReduceSum<keepdims = 1>(big)
    y = Add(x, total)
}
"""


def test_size_guard_skips_big_folds(caplog: pytest.LogCaptureFixture) -> None:
    proto = parse(SIZE_GUARD)
    model = Model.from_onnx(proto)
    with caplog.at_level(logging.INFO, logger="iropt"):
        result = run_pass("fold_constants", model, max_bytes=1 << 20)
    assert result.stats["skipped_size"] == 1
    assert result.stats["folded"] == 0
    assert not result.changed
    assert ops(model) == ["ConstantOfShape", "ReduceSum", "Add"]
    assert any("ConstantOfShape" in r.getMessage() and "'big'" in r.getMessage() for r in caplog.records)
    assert_same_outputs(proto, model, {"x": np.array([0.5], dtype=np.float32)})


def test_size_guard_allows_folds_within_the_limit() -> None:
    proto = parse(SIZE_GUARD)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model, max_bytes=16 << 20)
    assert result.stats["skipped_size"] == 0
    # ConstantOfShape, then ReduceSum (its 8 MiB input dies with it).
    assert result.stats["folded"] == 2
    assert ops(model) == ["Add"]
    total = model.graph.nodes[0].inputs[1]
    np.testing.assert_array_equal(total.values, np.array([2097152.0], dtype=np.float32))
    assert_same_outputs(proto, model, {"x": np.array([0.5], dtype=np.float32)})


WEIGHT_FILL = """
<ir_version: 8, opset_import: ["" : 17]>
weights (float[1,64,8,8] x) => (float[1,1024,8,8] y) {
    shape = Constant <value = int64[4] {1024, 64, 3, 3}> ()
    w = ConstantOfShape <value = float[1] {0.01}> (shape)
    y = Conv <pads = [1, 1, 1, 1]> (x, w)
}
"""


def test_weights_are_folded_whatever_their_size() -> None:
    # 1024x64x3x3 float32 = 2.25 MiB, over max_bytes, but read only as a Conv weight: every
    # runtime materializes it, and fusions need it constant.
    proto = parse(WEIGHT_FILL)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model, max_bytes=1 << 20)
    assert result.stats["skipped_size"] == 0
    assert ops(model) == ["Conv"]
    weight = model.graph.nodes[0].inputs[1]
    assert weight.values.shape == (1024, 64, 3, 3)
    assert_same_outputs(proto, model, {"x": np.random.default_rng(0).standard_normal((1, 64, 8, 8)).astype(np.float32)})


def test_weight_exemption_can_be_turned_off() -> None:
    model = Model.from_onnx(parse(WEIGHT_FILL))
    result = run_pass("fold_constants", model, max_bytes=1 << 20, fold_weights=False)
    assert result.stats["skipped_size"] == 1
    assert ops(model) == ["ConstantOfShape", "Conv"]


RANDOM = """
<ir_version: 8, opset_import: ["" : 17]>
random (float[2] x) => (float[2] y, float[2] r) <float[2] k = {1.0, 2.0}> {
    r0 = RandomUniformLike<seed = 1.0>(k)
    r = Mul(r0, k)
    u = RandomNormal<shape = [2], seed = 2.0>()
    b = Bernoulli<seed = 3.0>(k)
    y = Add(x, u)
}
"""


def test_random_ops_are_not_folded() -> None:
    model = model_of(RANDOM)
    result = run_pass("fold_constants", model)
    assert not result.changed
    assert ops(model) == ["RandomUniformLike", "Mul", "RandomNormal", "Bernoulli", "Add"]


CUSTOM = """
<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
custom (float[2] x) => (float[2] y) <float[2] k = {1.0, 2.0}> {
    c = com.example.Twice(k)
    y = Add(x, c)
}
"""


def test_custom_domain_op_is_left_alone() -> None:
    model = model_of(CUSTOM, check=False)
    result = run_pass("fold_constants", model)
    assert not result.changed
    assert ops(model) == ["Twice", "Add"]
    assert model.graph.nodes[0].domain == "com.example"


NOTHING_CONSTANT = """
<ir_version: 8, opset_import: ["" : 17]>
plain (float[N, 4] x, float[4] b) => (float[N, 4] y) {
    t = Relu(x)
    y = Add(t, b)
}
"""


def test_nothing_constant_changes_nothing() -> None:
    proto = parse(NOTHING_CONSTANT)
    model = Model.from_onnx(proto)
    before = model.to_onnx().SerializeToString()
    result = run_pass("fold_constants", model)
    assert not result.changed
    assert all(v == 0 for v in result.stats.values())
    assert model.to_onnx().SerializeToString() == before


# -- the evaluator ------------------------------------------------------------------------------

I64 = np.int64


def _case(
    op: str, inputs: list[np.ndarray | None], **attrs: object
) -> tuple[str, list[np.ndarray | None], dict]:
    return op, inputs, attrs


EVALUATOR_CASES = [
    _case("Shape", [np.zeros((2, 3, 4), np.float32)]),
    _case("Shape", [np.zeros((2, 3, 4), np.float32)], start=-2),
    _case("Shape", [np.zeros((2, 3, 4), np.float32)], start=1, end=10),
    _case("Size", [np.zeros((2, 3), np.float16)]),
    _case("Gather", [np.arange(5, dtype=I64) * 3, np.array([-1, 0, 2], I64)]),
    _case("Gather", [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(1, np.int32)], axis=1),
    _case("Concat", [np.array([1, 2], I64), np.array([7], I64)], axis=0),
    _case("Concat", [np.ones((2, 1), np.float32), np.zeros((2, 2), np.float32)], axis=-1),
    _case("Unsqueeze", [np.ones((2, 3), np.float32), np.array([0, -1], I64)]),
    _case("Squeeze", [np.ones((1, 3, 1), np.float32), np.array([-1], I64)]),
    _case("Squeeze", [np.ones((1, 3, 1), np.int32)]),
    _case("Reshape", [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.array([0, -1], I64)]),
    _case("Reshape", [np.array([[5.0]], np.float32), np.array([], I64)]),  # to rank 0, a copy
    _case("Squeeze", [np.array([[7]], I64)]),  # to rank 0
    _case("Cast", [np.array([-1.7, 2.5, 3.9, -0.5], np.float32)], to=onnx.TensorProto.INT32),
    _case("Cast", [np.array([1, -3, 2**40], I64)], to=onnx.TensorProto.FLOAT),
    _case("Cast", [np.array([0.0, -2.0, 0.1], np.float32)], to=onnx.TensorProto.BOOL),
    _case("Cast", [np.array([1.0e-4, 70000.0, 1 / 3], np.float32)], to=onnx.TensorProto.FLOAT16),
    _case("Add", [np.array([1, 2, 3], I64), np.array(10, I64)]),
    _case("Sub", [np.array([[1.5], [2.0]], np.float32), np.array([0.25, 3.0], np.float32)]),
    _case("Mul", [np.array([3, -4], np.int32), np.array([-5, 6], np.int32)]),
    _case("Div", [np.array([-7, 7, -7, 7, 6], I64), np.array([2, -2, -2, 2, 3], I64)]),
    _case("Div", [np.array([1.0, -3.0], np.float32), np.array([3.0, 7.0], np.float32)]),
    _case("Neg", [np.array([1, -2], np.int32)]),
    _case("Equal", [np.array([1, 2, 3], I64), np.array([1, 0, 3], I64)]),
    _case("Less", [np.array([1.0, 2.0], np.float32), np.array([1.5, 1.5], np.float32)]),
    _case("Greater", [np.array([1, 2], I64), np.array([1, 1], I64)]),
    _case("And", [np.array([True, True, False]), np.array([True, False, False])]),
    _case("Or", [np.array([True, False]), np.array([False, False])]),
    _case("Not", [np.array([True, False])]),
    _case("Where", [np.array([True, False]), np.array([1, 2], I64), np.array([3, 4], I64)]),
    _case("Range", [np.array(0, I64), np.array(10, I64), np.array(3, I64)]),
    _case("Range", [np.array(10, np.int32), np.array(-1, np.int32), np.array(-4, np.int32)]),
    _case("Range", [np.array(0.0, np.float32), np.array(1.0, np.float32), np.array(0.25, np.float32)]),
    _case(
        "Slice",
        [
            np.arange(10, dtype=I64),
            np.array([-1], I64),
            np.array([-(2**63)], I64),
            np.array([0], I64),
            np.array([-2], I64),
        ],
    ),
    _case(
        "Slice",
        [
            np.arange(12, dtype=np.float32).reshape(3, 4),
            np.array([1, 0], I64),
            np.array([2**62, 3], I64),
            np.array([0, -1], I64),
        ],
    ),
    _case("Slice", [np.arange(5, dtype=I64), np.array([2], I64), np.array([1], I64)]),
    _case("Transpose", [np.arange(6, dtype=np.float32).reshape(1, 2, 3)], perm=[2, 0, 1]),
    _case("Transpose", [np.arange(6, dtype=np.float32).reshape(2, 3)]),
    _case(
        "ConstantOfShape",
        [np.array([2, 3], I64)],
        value=onnx.helper.make_tensor("v", onnx.TensorProto.INT64, [1], [7]),
    ),
    _case("ConstantOfShape", [np.array([2], I64)]),
    _case("Expand", [np.array([[1.0], [2.0], [3.0]], np.float32), np.array([2, 1, 4], I64)]),
    _case("Identity", [np.array([1, 2], np.uint8)]),
    # Reference evaluator only:
    _case("ReduceProd", [np.array([2, 3, 4], I64)], keepdims=0),
    _case("MatMul", [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 2), np.float32)]),
    _case("Tile", [np.array([1, 2], np.int32), np.array([3], I64)]),
    _case("Sqrt", [np.array([4.0, 2.0], np.float64)]),
]


def _single_node(op: str, inputs: list[np.ndarray | None], attrs: dict) -> tuple[onnx.ModelProto, gs.Node]:
    names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
    node = onnx.helper.make_node(op, names, ["y"], **attrs)
    graph = onnx.helper.make_graph(
        [node],
        "single",
        [
            onnx.helper.make_tensor_value_info(
                n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)
            )
            for n, v in zip(names, inputs, strict=True)
            if v is not None
        ],
        [onnx.helper.make_empty_tensor_value_info("y")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, gs.import_onnx(proto).nodes[0]


@pytest.mark.parametrize(
    ("op", "inputs", "attrs"), EVALUATOR_CASES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_evaluator_matches_onnx_runtime(op: str, inputs: list[np.ndarray | None], attrs: dict) -> None:
    proto, node = _single_node(op, inputs, attrs)
    feeds = {f"i{k}": v for k, v in enumerate(inputs) if v is not None}
    expected = run_ort(proto, feeds)["y"]
    (fast,) = evaluate_node(node, inputs, 17)
    (reference,) = reference_evaluate(node, inputs, 17)
    for got in (fast, reference):
        assert got is not None
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(got, expected)


def test_evaluator_fast_path_covers_shape_arithmetic() -> None:
    assert {"Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Cast", "Slice"} <= FAST_PATH_OPS
    assert {"Add", "Sub", "Mul", "Div", "Equal", "Where", "Range"} <= FAST_PATH_OPS


def test_evaluator_results_do_not_alias_inputs() -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    for op, inputs in [
        ("Identity", [data]),
        ("Reshape", [data, np.array([3, 2], I64)]),
        ("Transpose", [data]),
    ]:
        _, node = _single_node(op, inputs, {})
        (out,) = evaluate_node(node, inputs, 17)
        assert out is not None and not np.shares_memory(out, data)


@pytest.mark.parametrize(
    ("op", "inputs", "attrs"),
    [
        _case("Div", [np.array([1, 2], I64), np.array([1, 0], I64)]),  # integer division by zero
        _case("Cast", [np.array([np.nan], np.float32)], to=onnx.TensorProto.INT32),  # undefined value
        _case("Cast", [np.array([3.0e9], np.float32)], to=onnx.TensorProto.INT32),  # out of range
        _case("Gather", [np.arange(3, dtype=I64), np.array([3], I64)]),  # out of range
        _case("SequenceEmpty", []),  # not a tensor
    ],
    ids=["div-by-zero", "cast-nan", "cast-range", "gather-range", "sequence"],
)
def test_evaluator_refuses_undefined_or_non_tensor_results(op: str, inputs: list, attrs: dict) -> None:
    _, node = _single_node(op, inputs, attrs)
    with pytest.raises(EvaluationError):
        evaluate_node(node, inputs, 17)


NESTED_IF = """
<ir_version: 8, opset_import: ["" : 17]>
nested (float[2] x) => (float[2] z) <bool c = {1}, bool c2 = {0}> {
    y = If(c) <
        then_branch = t () => (float[2] a) {
            a = If(c2) <then_branch = tt () => (float[2] p) { p = Neg(x) },
                        else_branch = te () => (float[2] q) { q = Abs(x) }>
        },
        else_branch = e () => (float[2] b) { b = Relu(x) }
    >
    z = Mul(y, x)
}
"""


def test_nested_constant_ifs_inline_into_the_main_graph() -> None:
    proto = parse(NESTED_IF)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    assert result.stats["ifs_inlined"] == 2
    assert ops(model) == ["Abs", "Mul"]
    # The If output y is internal: the inlined Abs writes it and Mul still reads it.
    assert model.graph.nodes[0].outputs[0].name == "y"
    assert model.graph.nodes[1].inputs[0] is model.graph.nodes[0].outputs[0]
    x = np.array([-1.25, 2.0], dtype=np.float32)
    outputs = assert_same_outputs(proto, model, {"x": x})
    np.testing.assert_allclose(outputs["z"], np.abs(x) * x, rtol=1e-5, atol=1e-6)


def test_bfloat16_constants_fold_with_their_type() -> None:
    import ml_dtypes

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    bf (float[3] x) => (float[3] y, bfloat16[3] z) <float[3] v = {0.1, 0.2, 0.3}> {
        wf = Cast<to = 1>(w)
        y = Add(x, wf)
        z = Cast<to = 16>(v)
    }
    """
    proto = parse(text, check=False)
    w = np.array([1.0, 2.5, -3.0], dtype=ml_dtypes.bfloat16)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    onnx.checker.check_model(proto, full_check=True)
    model = Model.from_onnx(proto)
    result = run_pass("fold_constants", model)
    assert result.stats["folded"] == 2
    exported = model.to_onnx()
    onnx.checker.check_model(exported, full_check=True)
    initializers = {t.name: t for t in exported.graph.initializer}
    assert initializers["z"].data_type == onnx.TensorProto.BFLOAT16
    v = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(initializers["z"]), v.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(initializers["wf"]), w.astype(np.float32))
    # numpy cannot carry bfloat16 out of ONNX Runtime: compare the float32 output only.
    x = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(
        run_ort(exported, {"x": x}, only=["y"])["y"], x + w.astype(np.float32), rtol=1e-5, atol=1e-6
    )


_BOUNDS = st.one_of(st.integers(-7, 7), st.sampled_from([-(2**63), 2**63 - 1, -(2**31), 2**31 - 1]))


@given(
    dims=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    data=st.data(),
)
def test_fast_slice_matches_onnx_runtime(dims: list[int], data: st.DataObject) -> None:
    rank = len(dims)
    axes = data.draw(
        st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank, unique_by=lambda a: a % rank)
    )
    starts = [data.draw(_BOUNDS) for _ in axes]
    ends = [data.draw(_BOUNDS) for _ in axes]
    steps = [data.draw(st.sampled_from([-3, -2, -1, 1, 2, 5])) for _ in axes]
    inputs: list[np.ndarray | None] = [
        np.arange(int(np.prod(dims)), dtype=np.float32).reshape(dims),
        np.array(starts, I64),
        np.array(ends, I64),
        np.array(axes, I64),
        np.array(steps, I64),
    ]
    proto, node = _single_node("Slice", inputs, {})
    if any(step < 0 and end in (2**31 - 1, 2**63 - 1) for step, end in zip(steps, ends, strict=True)):
        # ONNX Runtime and the specification disagree here: the evaluator declines.
        with pytest.raises(EvaluationError):
            evaluate_node(node, inputs, 17)
        return
    expected = run_ort(proto, {f"i{k}": v for k, v in enumerate(inputs) if v is not None})["y"]
    (got,) = evaluate_node(node, inputs, 17)
    assert got is not None and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


# Weights as a quantized model stores them: constant int8 (int4) through DequantizeLinear. Opset 21
# is where onnx's reference evaluator implements DequantizeLinear, so it could be folded.
QUANTIZED_WEIGHT = """
<ir_version: 10, opset_import: ["" : 21]>
qmodel (float[N, 4] x) => (float[N, 3] y)
  <{dtype}[4, 3] w_q = {{1, -2, 3, 4, -5, 6, 7, -1, 2, 3, 0, -3}}, float w_scale = {{0.25}},
   float[3] b = {{0.5, -1.0, 2.0}}, float b_scale = {{0.5}}> {{
    w = DequantizeLinear(w_q, w_scale)
    b_q = QuantizeLinear(b, b_scale)
    b_int8 = DequantizeLinear(b_q, b_scale)
    xw = MatMul(x, w)
    y = Add(xw, b_int8)
}}
"""


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_dequantize_linear_of_weights_is_kept(dtype: str) -> None:
    proto = parse(QUANTIZED_WEIGHT.format(dtype=dtype))
    # onnx's parser writes int4 literals one per int32 (ORT wants two per byte): make it anew.
    parsed = proto.graph.initializer[0]
    proto.graph.initializer[0].CopyFrom(
        onnx.helper.make_tensor("w_q", parsed.data_type, parsed.dims, list(parsed.int32_data))
    )
    model = Model.from_onnx(proto)

    result = run_pass("fold_constants", model)

    # The quantized weight stays int8 (int4) behind its DequantizeLinear; the QuantizeLinear of a
    # constant is folded into the int8 value it computes.
    assert ops(model) == ["DequantizeLinear", "DequantizeLinear", "MatMul", "Add"]
    assert result.stats["folded"] == 1
    tensors = model.graph.tensors()
    assert isinstance(tensors["b_q"], gs.Constant)
    stored = {t.name: t.data_type for t in model.to_onnx().graph.initializer}
    assert stored["w_q"] == getattr(onnx.TensorProto, dtype.upper())
    assert_same_outputs(proto, model, random_feeds({"x": (2, 4)}))


# Shape of [N, 3, 4]: Slice and Gather picking only the known dimensions fold, the others stay.
SHAPE_SELECTIONS = """
<ir_version: 8, opset_import: ["" : 17]>
picks (float[N, 3, 4] x) => (float[N, 12] y, float[N, 3, 4] z, int64 n)
  <int64[1] zero = {0}, int64[1] one = {1}, int64[1] two = {2}, int64[1] three = {3},
   int64 first_axis = {0}, int64 last_axis = {2}, int64[1] minus_one = {-1}> {
    s = Shape(x)
    tail = Slice(s, one, three)
    last = Gather<axis = 0>(s, last_axis)
    head = Slice(s, zero, two)
    first = Gather(s, first_axis)
    cols = ReduceProd<keepdims = 1>(tail)
    flat = Concat<axis = 0>(minus_one, cols)
    y = Reshape(x, flat)
    last_1d = Unsqueeze(last, zero)
    full = Concat<axis = 0>(head, last_1d)
    z = Reshape(x, full)
    n = Identity(first)
}
"""


def test_shape_selections_of_known_dimensions_fold() -> None:
    proto = parse(SHAPE_SELECTIONS)
    model = Model.from_onnx(proto)

    result = run_pass("fold_constants", model)

    # tail -> [3, 4] and last -> 4 fold, and what they alone feed folds after them; head
    # ([N, 3]) and first (N) depend on N and stay.
    assert result.stats["shapes_folded"] == 2
    tensors = model.graph.tensors()
    np.testing.assert_array_equal(tensors["flat"].values, [-1, 12])
    np.testing.assert_array_equal(tensors["last_1d"].values, [4])
    assert all(isinstance(tensors[name], gs.Variable) for name in ("head", "first", "full"))
    assert_same_outputs(proto, model, random_feeds({"x": (5, 3, 4)}))


@pytest.mark.parametrize(
    ("shape_attrs", "pick", "folds"),
    [
        ("", "Slice(s, k1, k3)", True),  # [3, 4]
        ("", "Slice(s, k2, k0, k0, km1)", True),  # backwards: [4, 3]
        ("", "Slice(s, k3, k1, k0, km1)", False),  # backwards: [M, 4]
        ("", "Slice(s, km2, kbig)", False),  # [4, M]
        ("", "Gather(s, km3)", True),  # 3 (negative index)
        ("", "Gather(s, k03)", False),  # [N, 4]
        ("<start = 1>", "Slice(s, k0, k2)", True),  # Shape starts at dim 1: [3, 4]
        ("<start = 1, end = -1>", "Gather(s, k1)", True),  # 4
        ("<start = -1>", "Gather(s, k0)", False),  # M
    ],
)
def test_shape_selection_folds_only_known_dimensions(shape_attrs: str, pick: str, folds: bool) -> None:
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    picks (float[N, 3, 4, M] x) => (int64[?] y)
      <int64[1] k0 = {{0}}, int64[1] k1 = {{1}}, int64[1] k2 = {{2}}, int64[1] k3 = {{3}},
       int64[1] km1 = {{-1}}, int64[1] km2 = {{-2}}, int64[1] kbig = {{100}}, int64 km3 = {{-3}},
       int64[2] k03 = {{0, 3}}> {{
        s = Shape{shape_attrs}(x)
        p = {pick}
        y = Reshape(p, km1)
    }}
    """
    proto = parse(text)
    model = Model.from_onnx(proto)

    result = run_pass("fold_constants", model)

    assert result.stats["shapes_folded"] == int(folds)
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3, 4, 5)}))
