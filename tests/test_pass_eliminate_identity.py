"""eliminate_identity: Identity and inference Dropout disappear; output names never change."""

from __future__ import annotations

import numpy as np
import onnx
from helpers_cleanup import assert_same_outputs, ops, parse, random_feeds, run_ort, run_pass, structure

from iropt.ir.model import Model


def test_inner_identity_is_bypassed() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y)
        {
          a = Identity(x)
          b = Relu(a)
          y = Neg(b)
        }
        """
    )
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_identity", model)

    assert result.changed
    assert result.stats == {"removed": 1}
    assert structure(model) == [("g", "Relu", "x", "->", "b"), ("g", "Neg", "b", "->", "y")]
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3)}))


def test_identity_writing_an_output_renames_its_producer() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y, float[2,3] z)
        {
          a = Relu(x)
          y = Identity(a)
          z = Sigmoid(a)
        }
        """
    )
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_identity", model)

    assert result.stats == {"removed": 1}
    # The graph output keeps its name; Relu now writes it, and Sigmoid reads it.
    assert structure(model) == [("g", "Relu", "x", "->", "y"), ("g", "Sigmoid", "y", "->", "z")]
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3)}))


def test_inference_dropout_is_removed_and_training_dropout_kept() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y, float[2,3] t)
        <float ratio = {0.5}, bool off = {0}, bool on = {1}>
        {
          a = Dropout(x)
          b = Dropout(a, ratio, off)
          y = Relu(b)
          t = Dropout(x, ratio, on)
        }
        """
    )
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_identity", model)

    assert result.stats == {"removed": 2}
    assert ops(model) == ["Relu", "Dropout"]
    assert [t.name for t in model.graph.nodes[0].inputs] == ["x"]
    onnx_model = model.to_onnx()
    onnx.checker.check_model(onnx_model, full_check=True)
    # Dropout with training_mode=true is random: compare only the deterministic output.
    feeds = random_feeds({"x": (2, 3)})
    np.testing.assert_array_equal(run_ort(onnx_model, feeds)["y"], run_ort(proto, feeds)["y"])


def test_dropout_with_mask_output_is_kept() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y, bool[2,3] mask)
        {
          d, mask = Dropout(x)
          y = Relu(d)
        }
        """
    )
    model = Model.from_onnx(proto)
    before = structure(model)

    result = run_pass("eliminate_identity", model)

    assert result.changed is False
    assert structure(model) == before
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3)}))


def test_dropout_with_an_unread_named_mask_is_removed() -> None:
    # Old exporters (opset <= 9) name the mask output even when nothing reads it.
    proto = parse(
        """
        <ir_version: 4, opset_import: ["" : 9]>
        g (float[2,3] x) => (float[2,3] y)
        {
          d, mask = Dropout <ratio = 0.5> (x)
          y = Relu(d)
        }
        """
    )
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_identity", model)

    assert result.stats == {"removed": 1}
    assert structure(model) == [("g", "Relu", "x", "->", "y")]
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3)}))


def test_input_to_output_identity_stays() -> None:
    # Removing it would either rename the graph input or the graph output.
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y, float[2,3] z)
        <float[2,3] k = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}>
        {
          y = Identity(x)
          z = Identity(k)
        }
        """
    )
    model = Model.from_onnx(proto)
    before = structure(model)

    result = run_pass("eliminate_identity", model)

    assert result.changed is False
    assert result.stats == {"removed": 0}
    assert structure(model) == before
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3)}))


SUBGRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, bool c) => (float[2,3] y, float[2,3] z)
{
  outer = Relu(x)
  z = Sigmoid(outer)
  y = If(c) <
    then_branch = then_g () => (float[2,3] t) {
      inner = Neg(outer)
      moved = Identity(inner)
      t = Identity(moved)
    },
    else_branch = else_g () => (float[2,3] e) { e = Identity(outer) }
  >
}
"""


def test_subgraph_identities_are_removed_but_outer_values_are_not_renamed() -> None:
    proto = parse(SUBGRAPH)
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_identity", model)

    # Both Identities after the branch's own Neg go; the else-branch Identity returns an
    # outer-scope value, and renaming the outer Relu to the branch's output would break the graph.
    assert result.stats == {"removed": 2}
    if_node = model.graph.nodes[2]
    then_nodes = if_node.attrs["then_branch"].nodes
    assert [(n.op, n.outputs[0].name) for n in then_nodes] == [("Neg", "t")]
    assert [n.op for n in if_node.attrs["else_branch"].nodes] == ["Identity"]
    assert model.graph.nodes[0].outputs[0].name == "outer"
    x = random_feeds({"x": (2, 3)})["x"]
    for condition in (True, False):
        assert_same_outputs(proto, model, {"x": x, "c": np.array(condition)})


def test_dropout_option_off_keeps_dropout() -> None:
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y)
        {
          a = Dropout(x)
          y = Relu(a)
        }
        """
    )
    model = Model.from_onnx(proto)

    result = run_pass("eliminate_identity", model, dropout=False)

    assert result.changed is False
    assert ops(model) == ["Dropout", "Relu"]
