"""eliminate_dead_code: dead nodes and their weights go; the interface and subgraph uses stay."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
from helpers_cleanup import assert_same_outputs, ops, parse, random_feeds, run_pass, structure

from iropt.ir.model import Model, graph_stats

MAIN = """
<ir_version: 8, opset_import: ["" : 17]>
main (float[2,3] x, float[2,3] unused_input) => (float[2,3] y, float[2,3] passthrough)
<float[3] w = {1.0, 2.0, 3.0}, float[3] w_dead = {4.0, 5.0, 6.0}>
{
  a = Add(x, w)
  y = Relu(a)
  d1 = Mul(x, w_dead)
  d2 = Sigmoid(d1)
  d3 = Add(d2, w)
  passthrough = Identity(unused_input)
}
"""


def test_removes_dead_chain_and_its_initializer() -> None:
    proto = parse(MAIN)
    # Shape annotations of a dead tensor must not outlive its producer.
    proto.graph.value_info.extend(
        [
            onnx.helper.make_tensor_value_info("d1", onnx.TensorProto.FLOAT, [2, 3]),
            onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2, 3]),
        ]
    )
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_dead_code", model)

    assert result.changed
    assert result.stats == {"nodes": 3, "initializers": 1}
    assert ops(model) == ["Add", "Relu", "Identity"]
    # The interface is untouched, the unused input included.
    assert [t.name for t in model.graph.inputs] == ["x", "unused_input"]
    assert [t.name for t in model.graph.outputs] == ["y", "passthrough"]
    exported = model.to_onnx()
    assert [i.name for i in exported.graph.initializer] == ["w"]
    assert [v.name for v in exported.graph.value_info] == ["a"]
    feeds = random_feeds({"x": (2, 3), "unused_input": (2, 3)})
    assert_same_outputs(proto, model, feeds)


def test_model_without_dead_code_is_left_alone() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x, float[2,3] spare) => (float[2,3] y, float[2,3] x_out, float[2,3] k)
        <float[2,3] k = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}>
        {
          y = Relu(x)
          x_out = Identity(x)
        }
        """
    )
    model = Model.from_onnx(proto)
    before = structure(model)

    result = run_pass("eliminate_dead_code", model)

    assert result.changed is False
    assert result.stats == {"nodes": 0, "initializers": 0}
    assert structure(model) == before
    # An initializer that is a graph output is part of the interface.
    assert [i.name for i in model.to_onnx().graph.initializer] == ["k"]
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3), "spare": (2, 3)}))


def test_partly_used_multi_output_node_is_kept_whole() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,6] x) => (float[2,3] y)
        <int64[2] split = {3, 3}>
        {
          lo, hi = Split<axis = 1>(x, split)
          y = Relu(lo)
        }
        """
    )
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_dead_code", model)

    assert result.changed is False
    assert [t.name for t in model.graph.nodes[0].outputs] == ["lo", "hi"]
    assert_same_outputs(proto, model, random_feeds({"x": (2, 6)}))


SUBGRAPHS = """
<ir_version: 8, opset_import: ["" : 17]>
main (float[2,3] x, bool c) => (float[2,3] y, float[2,3] z)
<int64 trip = {3}, bool keep_going = {1}, float[3] w_if = {1.0, 1.0, 1.0}>
{
  used_in_then = Relu(x)
  used_in_loop = Sigmoid(x)
  used_by_dead_inner = Exp(x)
  y = If(c) <
    then_branch = then_g () => (float[2,3] t) {
      junk = Neg(used_by_dead_inner)
      t = Add(used_in_then, x)
    },
    else_branch = else_g () => (float[2,3] e) {
      e = Mul(x, w_if)
    }
  >
  z = Loop(trip, keep_going, x) <
    body = body_g (int64 i, bool cond_in, float[2,3] v) => (bool cond_out, float[2,3] v_out) {
      cond_out = Identity(cond_in)
      v_out = Add(v, used_in_loop)
    }
  >
  dead_if = If(c) <
    then_branch = a_g () => (float[2,3] p) { p = Tanh(x) },
    else_branch = b_g () => (float[2,3] q) { q = Abs(x) }
  >
}
"""


def test_keeps_producers_used_only_inside_subgraphs() -> None:
    proto = parse(SUBGRAPHS)
    model = Model.from_onnx(proto)
    nodes_before = graph_stats(model).nodes

    result = run_pass("eliminate_dead_code", model)

    # Removed: Neg in the then-branch, the Exp only it read, and the unused If with its two
    # branch nodes.
    assert result.stats["nodes"] == 5
    assert graph_stats(model).nodes == nodes_before - 5
    assert ops(model) == ["Relu", "Sigmoid", "If", "Loop"]
    if_node = model.graph.nodes[2]
    assert [n.op for n in if_node.attrs["then_branch"].nodes] == ["Add"]
    assert [n.op for n in if_node.attrs["else_branch"].nodes] == ["Mul"]
    # Loop-body nodes are live through the body's outputs, even the pass-through Identity.
    assert [n.op for n in model.graph.nodes[3].attrs["body"].nodes] == ["Identity", "Add"]
    # The removed consumer no longer holds on to the outer tensor it read.
    assert "used_by_dead_inner" not in model.graph.tensors()
    x = random_feeds({"x": (2, 3)})["x"]
    for condition in (True, False):
        assert_same_outputs(proto, model, {"x": x, "c": np.array(condition)})


def test_second_run_is_a_fixpoint() -> None:
    model = Model.from_onnx(parse(SUBGRAPHS))
    assert run_pass("eliminate_dead_code", model).changed
    before = structure(model)

    result = run_pass("eliminate_dead_code", model)

    assert result.changed is False
    assert structure(model) == before


def test_long_dead_chain_is_removed_without_recursion() -> None:
    # Deeper than Python's recursion limit: the walk must be iterative.
    length = 3000
    nodes = [onnx.helper.make_node("Relu", ["x"], ["h0"])]
    nodes += [onnx.helper.make_node("Neg", [f"h{i}"], [f"h{i + 1}"]) for i in range(length)]
    nodes.append(onnx.helper.make_node("Identity", ["x"], ["y"]))
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in ("x", "y")]
    graph = onnx.helper.make_graph(nodes, "chain", info[:1], info[1:])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_dead_code", model)

    assert result.stats == {"nodes": length + 1, "initializers": 0}
    assert ops(model) == ["Identity"]
    assert_same_outputs(proto, model, random_feeds({"x": (2,)}))


def test_out_of_order_model_keeps_producers_read_by_subgraphs() -> None:
    # The If precedes the Relu whose value its branch reads; graphsurgeon then imports the
    # branch's read as a separate, producer-less tensor. The Relu is still live.
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x, bool c) => (float[2,3] y)
        {
          r = Relu(x)
          y = If(c) <
            then_branch = then_g () => (float[2,3] t) { t = Neg(r) },
            else_branch = else_g () => (float[2,3] e) { e = Identity(x) }
          >
          dead = Exp(x)
        }
        """
    )
    unsorted = onnx.ModelProto()
    unsorted.CopyFrom(proto)
    relu, if_node, exp = (onnx.NodeProto() for _ in range(3))
    relu.CopyFrom(proto.graph.node[0])
    if_node.CopyFrom(proto.graph.node[1])
    exp.CopyFrom(proto.graph.node[2])
    del unsorted.graph.node[:]
    unsorted.graph.node.extend([if_node, relu, exp])
    model = Model.from_onnx(unsorted)

    result = run_pass("eliminate_dead_code", model)

    assert result.stats == {"nodes": 1, "initializers": 0}
    assert ops(model) == ["If", "Relu"]
    x = random_feeds({"x": (2, 3)})["x"]
    run_pass("toposort", model)
    for condition in (True, False):
        assert_same_outputs(proto, model, {"x": x, "c": np.array(condition)})
