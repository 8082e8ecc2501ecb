"""dedupe_initializers: equal initializers are stored once, different ones are kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
from helpers_fold import assert_same_outputs, initializer_names, model_of, parse, random_feeds, run_pass

from iropt.ir.model import Model


def _conv_model(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """y = Conv(x, w1) + Conv(x, w2), with the weights as initializers."""
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
            onnx.helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1]),
            onnx.helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "convs",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


WEIGHT = np.random.default_rng(7).standard_normal((4, 2, 3, 3)).astype(np.float32)


def test_identical_weights_are_merged() -> None:
    proto = _conv_model(WEIGHT, WEIGHT.copy())
    model = Model.from_onnx(proto)
    result = run_pass("dedupe_initializers", model)
    assert result.stats == {"merged": 1, "bytes_saved": WEIGHT.nbytes}
    assert initializer_names(model) == {"w1"}
    convs = model.graph.nodes[:2]
    assert convs[0].inputs[1] is convs[1].inputs[1]
    assert_same_outputs(proto, model, random_feeds({"x": (1, 2, 6, 6)}))
    assert not run_pass("dedupe_initializers", model).changed


def test_different_weights_are_kept() -> None:
    other = WEIGHT.copy()
    other[3, 1, 2, 2] = np.nextafter(other[3, 1, 2, 2], np.float32(np.inf))  # one ulp apart
    proto = _conv_model(WEIGHT, other)
    model = Model.from_onnx(proto)
    result = run_pass("dedupe_initializers", model)
    assert not result.changed
    assert initializer_names(model) == {"w1", "w2"}
    assert_same_outputs(proto, model, random_feeds({"x": (1, 2, 6, 6)}))


SAME_BYTES = """
<ir_version: 8, opset_import: ["" : 17]>
bytes (float[4] x, int32[4] i, float[2, 2] m) => (float[4] y, int32[4] j, float[2, 2] n, float[4] z) <float[4] f = {1.0, 2.0, 0.0, 4.0}, int32[4] k = {1065353216, 1073741824, 0, 1082130432}, float[2, 2] g = {1.0, 2.0, 0.0, 4.0}, float[4] h = {1.0, 2.0, -0.0, 4.0}> {
    y = Add(x, f)
    j = Add(i, k)
    n = Add(m, g)
    z = Add(x, h)
}
"""


def test_same_bytes_with_other_dtype_shape_or_signed_zero_are_kept() -> None:
    # k holds the bit patterns of f as int32, g has f's bytes in another shape, h differs from f
    # only in the sign of a zero.
    proto = parse(SAME_BYTES)
    model = Model.from_onnx(proto)
    result = run_pass("dedupe_initializers", model)
    assert not result.changed
    assert initializer_names(model) == {"f", "k", "g", "h"}
    feeds = {
        "x": np.array([0.5, 1.5, -2.0, 3.0], dtype=np.float32),
        "i": np.array([1, 2, 3, 4], dtype=np.int32),
        "m": np.ones((2, 2), dtype=np.float32),
    }
    assert_same_outputs(proto, model, feeds)


SCOPES = """
<ir_version: 8, opset_import: ["" : 17]>
scopes (float[3] x, bool c, int64 trip) => (float[3] y, float[3] s, float[3] k2) <float[3] k = {1.0, 2.0, 3.0}, float[3] k2 = {1.0, 2.0, 3.0}> {
    a = Mul(x, k)
    y = If(c) <
        then_branch = t () => (float[3] p) <float[3] kt = {5.0, 6.0, 7.0}> { p = Add(a, kt) },
        else_branch = e () => (float[3] q) <float[3] ke = {5.0, 6.0, 7.0}> { q = Sub(a, ke) }
    >
    s = Loop(trip, c, x) <body = body (int64 i, bool cin, float[3] v) => (bool cout, float[3] vout) <float[3] kb = {1.0, 2.0, 3.0}> {
        cout = Identity(cin)
        vout = Add(v, kb)
    }>
}
"""


def test_scopes_and_graph_outputs() -> None:
    proto = parse(SCOPES)
    model = Model.from_onnx(proto)
    result = run_pass("dedupe_initializers", model)
    # The Loop body's kb equals the main graph's k, which the body can see: it is merged.
    # kt and ke live in sibling branches, which cannot see each other: both stay.
    # k2 equals k but is a graph output: it stays.
    assert result.stats == {"merged": 1, "bytes_saved": 12}
    loop = model.graph.nodes[2]
    assert loop.attrs["body"].nodes[1].inputs[1] is model.graph.nodes[0].inputs[1]
    branches = model.graph.nodes[1].attrs
    assert branches["then_branch"].nodes[0].inputs[1].name == "kt"
    assert branches["else_branch"].nodes[0].inputs[1].name == "ke"
    assert [t.name for t in model.graph.outputs] == ["y", "s", "k2"]
    for c in (True, False):
        feeds = {"x": np.array([0.5, -1.0, 2.0], dtype=np.float32), "c": np.array(c), "trip": np.array(2)}
        assert_same_outputs(proto, model, feeds)


def test_nothing_to_dedupe_changes_nothing() -> None:
    model = model_of(SAME_BYTES)
    before = model.to_onnx().SerializeToString()
    assert not run_pass("dedupe_initializers", model).changed
    assert model.to_onnx().SerializeToString() == before
