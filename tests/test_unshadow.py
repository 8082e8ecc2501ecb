"""Subgraph names that shadow an enclosing graph's are renamed on load, and the model computes
the same in ONNX Runtime after a load and save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from iropt.app.optimize import RunOptions, optimize
from iropt.io.load import load_model
from iropt.io.save import save_model
from iropt.ir.unshadow import unshadow

FLOAT3 = [3]


def _value(name: str, elem: int = TensorProto.FLOAT, shape: list[int] | None = FLOAT3) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes: list[onnx.NodeProto], inputs: list[str], initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]), *nodes],
        "g",
        [_value(name, TensorProto.INT64, []) if name == "trip" else _value(name) for name in inputs],
        [_value("y")],
        [numpy_helper.from_array(np.array(0, np.float32), "zero"), *initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [_value(output)])


def _loop_body(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto] = ()) -> onnx.GraphProto:
    return helper.make_graph(
        [*nodes, helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [_value("i", TensorProto.INT64, []), _value("cond_in", TensorProto.BOOL, []), _value("v_in")],
        [_value("cond_out", TensorProto.BOOL, []), _value("v_out")],
        list(initializers),
    )


def _run(path: Path | bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


def _assert_same_after_round_trip(model: onnx.ModelProto, tmp_path: Path, expect_renamed: int) -> None:
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    original = model.SerializeToString()
    renamed, count = unshadow(model)
    assert count == expect_renamed
    assert model.SerializeToString() == original  # the input proto is left as it was
    onnx.checker.check_model(renamed, full_check=True)

    # Load and save alone, then the whole default schedule: passes rely on one producer per tensor.
    save_model(load_model(source), out)
    _assert_same_outputs(model, source, out)
    optimize(RunOptions(schedule="default", model=source, output=out, verify=False, emit=False))
    _assert_same_outputs(model, source, out)


def _assert_same_outputs(model: onnx.ModelProto, source: Path, out: Path) -> None:
    feeds = [{"x": np.array([1.0, 2.0, 3.0], np.float32)}, {"x": np.array([-1.0, -2.0, 0.5], np.float32)}]
    for feed in feeds:
        if any(i.name == "trip" for i in model.graph.input):
            feed["trip"] = np.array(3, np.int64)
        expected = _run(source, feed)
        for actual, want in zip(_run(out, feed), expected, strict=True):
            np.testing.assert_array_equal(actual, want)


def test_if_branches_named_like_the_if_output(tmp_path: Path) -> None:
    then = _branch("then", [helper.make_node("Add", ["x", "x"], ["y"])], "y")
    other = _branch("else", [helper.make_node("Mul", ["x", "x"], ["y"])], "y")
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], ["x"])
    _assert_same_after_round_trip(model, tmp_path, expect_renamed=2)


def test_loop_carried_input_named_like_an_outer_initializer(tmp_path: Path) -> None:
    body = _carrying_v([helper.make_node("Add", ["v", "x"], ["v_out"])])
    model = _model(
        [helper.make_node("Loop", ["trip", "", "v"], ["y"], body=body)],
        ["x", "trip"],
        [numpy_helper.from_array(np.full(3, 0.5, np.float32), "v")],
    )
    _assert_same_after_round_trip(model, tmp_path, expect_renamed=1)


def test_loop_body_initializer_shadowing_an_outer_one(tmp_path: Path) -> None:
    body = _loop_body(
        [helper.make_node("Add", ["v_in", "w"], ["v_out"])],
        [numpy_helper.from_array(np.ones(3, np.float32), "w")],
    )
    model = _model(
        [helper.make_node("Mul", ["x", "w"], ["a"]), helper.make_node("Loop", ["trip", "", "a"], ["y"], body=body)],
        ["x", "trip"],
        [numpy_helper.from_array(np.full(3, 2.0, np.float32), "w")],
    )
    _assert_same_after_round_trip(model, tmp_path, expect_renamed=1)


def _carrying_v(nodes: list[onnx.NodeProto], prefix: str = "") -> onnx.GraphProto:
    """A Loop body whose loop-carried input is named v, like the outer value it starts from
    (a common pattern, and valid ONNX): `nodes` compute PREFIXv_out from v. (ONNX Runtime
    refuses a node output named like an enclosing graph's node output, hence the prefix.)"""
    return helper.make_graph(
        [*nodes, helper.make_node("Identity", ["cond_in"], [f"{prefix}cond_out"])],
        "body",
        [_value("i", TensorProto.INT64, []), _value("cond_in", TensorProto.BOOL, []), _value("v")],
        [_value(f"{prefix}cond_out", TensorProto.BOOL, []), _value(f"{prefix}v_out")],
    )


def _loop_over_v(body: onnx.GraphProto) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Neg", ["x"], ["v"]), helper.make_node("Loop", ["trip", "", "v"], ["y"], body=body)],
        ["x", "trip"],
    )


def test_nested_subgraphs_follow_the_renamed_value(tmp_path: Path) -> None:
    # The body's If branches read v from the body (an implicit input): they must follow the
    # body's renamed v, not the outer one.
    then = _branch("then", [helper.make_node("Add", ["v", "x"], ["t"])], "t")
    other = _branch("else", [helper.make_node("Mul", ["v", "v"], ["e"])], "e")
    body = _carrying_v([
        helper.make_node("ReduceSum", ["v"], ["vs"], keepdims=0),
        helper.make_node("Greater", ["vs", "zero"], ["vc"]),
        helper.make_node("If", ["vc"], ["v_out"], then_branch=then, else_branch=other),
    ])
    _assert_same_after_round_trip(_loop_over_v(body), tmp_path, expect_renamed=1)


def test_a_nested_redeclaration_keeps_its_own_value(tmp_path: Path) -> None:
    # A Loop inside the body carries a v of its own: it is renamed apart from both outer ones.
    # Its other inputs (i, cond_in) repeat the enclosing body's and are renamed too.
    inner = _carrying_v([helper.make_node("Sub", ["v", "x"], ["inner_v_out"])], prefix="inner_")
    body = _carrying_v([
        helper.make_node("Abs", ["v"], ["a"]),
        helper.make_node("Loop", ["trip", "", "a"], ["inner_out"], body=inner),
        helper.make_node("Add", ["inner_out", "v"], ["v_out"]),
    ])
    _assert_same_after_round_trip(_loop_over_v(body), tmp_path, expect_renamed=4)


def test_a_model_without_shadowing_is_returned_as_it_is() -> None:
    then = _branch("then", [helper.make_node("Add", ["x", "x"], ["t"])], "t")
    other = _branch("else", [helper.make_node("Mul", ["x", "x"], ["t"])], "t")  # siblings may share
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], ["x"])
    renamed, count = unshadow(model)
    assert count == 0 and renamed is model


@pytest.mark.parametrize("taken", [["y_1"], ["y_1", "y_2"]])
def test_fresh_names_avoid_every_name_in_the_model(tmp_path: Path, taken: list[str]) -> None:
    # Names like y_1 are already used elsewhere: the renamed values must not collide with them.
    extra = [helper.make_node("Identity", ["x"], [name]) for name in taken]
    then = _branch("then", [*extra, helper.make_node("Add", ["x", "x"], ["y"])], "y")
    other = _branch("else", [helper.make_node("Mul", ["x", "x"], ["y"])], "y")
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], ["x"])
    renamed, _ = unshadow(model)
    onnx.checker.check_model(renamed, full_check=True)
    _assert_same_after_round_trip(model, tmp_path, expect_renamed=2)
