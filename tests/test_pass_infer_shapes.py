"""infer_shapes: ONNX shape inference written back onto the graph, adding knowledge only."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import pytest
from helpers_cleanup import assert_same_outputs, parse, random_feeds, run_pass, structure

from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.ir.graph import iter_graphs
from iropt.ir.model import Model
from iropt.passes import infer_shapes


def annotations(model: Model) -> dict[str, tuple[object, object]]:
    """name -> (dtype, shape) of every variable in every graph."""
    found = {}
    for graph in iter_graphs(model.graph):
        for name, tensor in graph.tensors().items():
            if not hasattr(tensor, "values"):
                found[name] = (tensor.dtype, None if tensor.shape is None else list(tensor.shape))
    return found


CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y)
{
  a = Relu(x)
  b = Neg(a)
  sh = Shape(x)
  z = ConstantOfShape(sh)
  y = Add(b, z)
}
"""


def test_fills_in_shapes_with_data_propagation() -> None:
    proto = parse(CHAIN)
    model = Model.from_onnx(proto)
    model.metadata = {"author": "test"}
    assert model.graph.tensors()["a"].shape is None

    result = run_pass("infer_shapes", model)

    assert result.changed
    assert result.stats == {"inferred": 4, "refined": 0}
    shapes = annotations(model)
    assert shapes["a"] == (np.float32, [2, 4])
    assert shapes["b"] == (np.float32, [2, 4])
    assert shapes["sh"] == (np.int64, [2])
    # Only data propagation knows what Shape(x) holds, and so z's shape.
    assert shapes["z"] == (np.float32, [2, 4])
    assert model.metadata == {"author": "test"}
    exported = model.to_onnx()
    assert {v.name for v in exported.graph.value_info} == {"a", "b", "sh", "z"}
    assert_same_outputs(proto, model, random_feeds({"x": (2, 4)}))


def test_without_data_propagation_shape_values_stay_symbolic() -> None:
    model = Model.from_onnx(parse(CHAIN))

    run_pass("infer_shapes", model, data_prop=False)

    dims = annotations(model)["z"][1]
    # Inference names such dims `unk__N`; invented names are not written: the rank is known,
    # the sizes are not.
    assert dims == [None, None]
    # A later run with data propagation makes them concrete.
    result = run_pass("infer_shapes", model)
    assert result.stats == {"inferred": 0, "refined": 1}
    assert annotations(model)["z"][1] == [2, 4]


def test_second_run_learns_nothing() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,2] y)
        <int64[2] s = {-1, 2}>
        {
          a = Relu(x)
          nz = NonZero(a)
          r = Reshape(a, s)
          y = Sigmoid(r)
        }
        """
    )
    model = Model.from_onnx(proto)
    assert run_pass("infer_shapes", model).changed
    before_shapes = annotations(model)
    before = structure(model)

    # Fresh symbols (unk__N) for unknown dimensions must not count as news the second time.
    result = run_pass("infer_shapes", model)

    assert result.changed is False
    assert result.stats == {"inferred": 0, "refined": 0}
    assert annotations(model) == before_shapes
    assert structure(model) == before
    assert_same_outputs(proto, model, random_feeds({"x": (3, 4)}))


def test_known_shapes_are_refined_but_never_overwritten() -> None:
    proto = parse(CHAIN)
    # `a` is declared with symbols where inference knows numbers; `b` has a wrong rank.
    proto.graph.value_info.extend(
        [
            onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["A", "B"]),
            onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2, 4, 1]),
        ]
    )
    model = Model.from_onnx(proto)

    result = run_pass("infer_shapes", model)

    assert result.stats == {"inferred": 2, "refined": 1}
    assert annotations(model)["a"] == (np.float32, [2, 4])
    assert annotations(model)["b"] == (np.float32, [2, 4, 1])


def test_subgraph_tensors_are_annotated() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,5] x, bool c) => (float[3,5] y)
        {
          outer = Relu(x)
          y = If(c) <
            then_branch = then_g () => (float[3,5] t) { inner = Neg(outer) t = Exp(inner) },
            else_branch = else_g () => (float[3,5] e) { e = Sigmoid(outer) }
          >
        }
        """
    )
    model = Model.from_onnx(proto)

    result = run_pass("infer_shapes", model)

    assert result.stats == {"inferred": 2, "refined": 0}
    branch = model.graph.nodes[1].attrs["then_branch"]
    inner = next(t for t in branch.tensors().values() if t.name == "inner")
    assert (inner.dtype, list(inner.shape)) == (np.float32, [3, 5])
    x = random_feeds({"x": (3, 5)})["x"]
    for condition in (True, False):
        assert_same_outputs(proto, model, {"x": x, "c": np.array(condition)})


def test_custom_op_stops_inference_without_failing() -> None:
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[2,4] x) => (float[2,4] y)
        {
          a = Relu(x)
          b = com.example.Mystery(a)
          y = Neg(b)
        }
        """
    )
    model = Model.from_onnx(proto)

    result = run_pass("infer_shapes", model)

    assert result.stats == {"inferred": 1, "refined": 0}
    assert annotations(model)["a"] == (np.float32, [2, 4])
    assert annotations(model)["b"] == (None, None)
    onnx.checker.check_model(model.to_onnx())


def test_inference_failure_leaves_model_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y)
        {
          a = Relu(x)
          y = Neg(a)
        }
        """
    )
    model = Model.from_onnx(proto)
    # A Loop without its body: ONNX shape inference raises even in non-strict mode.
    model.graph.nodes[0].op = "Loop"
    before = structure(model)
    before_shapes = annotations(model)

    with caplog.at_level(logging.WARNING, logger="iropt"):
        result = run_pass("infer_shapes", model)

    assert result.changed is False
    assert result.stats == {"failed": 1}
    assert structure(model) == before
    assert annotations(model) == before_shapes
    assert "ONNX shape inference failed" in caplog.text


def test_large_models_go_through_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Pretend every model is over the protobuf limit; the weight is big enough to go external.
    monkeypatch.setattr(infer_shapes, "IN_MEMORY_LIMIT", 0)
    weight = onnx.helper.make_tensor(
        "w", onnx.TensorProto.FLOAT, [4, 512], np.arange(2048, dtype=np.float32) / 2048
    )
    nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["m"]), onnx.helper.make_node("Relu", ["m"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes,
        "big",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 512])],
        [weight],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model = Model.from_onnx(proto)
    work = tmp_path / "work"
    work.mkdir()

    result = create_pass("infer_shapes").run(model, PassContext(work_dir=work))

    assert result.stats == {"inferred": 1, "refined": 0}
    assert annotations(model)["m"] == (np.float32, [3, 512])
    assert list(work.iterdir()) == []
    # The weights themselves stayed in memory, untouched.
    np.testing.assert_array_equal(model.graph.tensors()["w"].values, onnx.numpy_helper.to_array(weight))
    assert_same_outputs(proto, model, random_feeds({"x": (3, 4)}))


def test_a_fully_annotated_model_is_not_inferred_again(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model.from_onnx(parse(CHAIN))
    first = create_pass("infer_shapes", {}).run(model, PassContext())
    assert first.changed  # every tensor of CHAIN now has a dtype and a static shape

    def no_inference(*args: object) -> onnx.ModelProto:
        raise AssertionError("shape inference ran on a model with nothing left to learn")

    monkeypatch.setattr(infer_shapes, "_infer", no_inference)
    second = create_pass("infer_shapes", {}).run(model, PassContext())
    assert not second.changed and second.stats == {"inferred": 0, "refined": 0}
