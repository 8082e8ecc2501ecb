"""toposort: producers before consumers, subgraph reads included, a valid order left as it is."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
import pytest
from helpers_cleanup import assert_same_outputs, parse, random_feeds, run_ort, run_pass, structure

from iropt.errors import PassError
from iropt.infra.pass_manager import run_passes
from iropt.infra.registry import create_pass
from iropt.ir.graph import iter_graphs
from iropt.ir.model import Model
from iropt.ir.toposort import GraphCycleError


def shuffled(
    proto: onnx.ModelProto, order: list[int], graph: onnx.GraphProto | None = None
) -> onnx.ModelProto:
    """A copy of `proto` whose main graph (or `graph`, found by name) lists nodes in `order`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    target = copy.graph if graph is None else _find_graph(copy.graph, graph.name)
    assert target is not None
    nodes = [target.node[i] for i in order]
    reordered = [onnx.NodeProto() for _ in nodes]
    for new, old in zip(reordered, nodes, strict=True):
        new.CopyFrom(old)
    del target.node[:]
    target.node.extend(reordered)
    return copy


def _find_graph(graph: onnx.GraphProto, name: str) -> onnx.GraphProto | None:
    if graph.name == name:
        return graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found = _find_graph(attr.g, name)
                if found is not None:
                    return found
    return None


def assert_sorted(model: Model) -> None:
    """Every node reads only tensors produced earlier in its graph (or outside it)."""
    for graph in iter_graphs(model.graph):
        seen: set[int] = set()
        local = {id(n) for n in graph.nodes}
        for node in graph.nodes:
            for tensor in node.inputs:
                for producer in tensor.inputs:
                    assert id(producer) not in local or id(producer) in seen, node.name
            seen.add(id(node))


DIAMOND = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y)
{
  a = Relu(x)
  b = Neg(a)
  c = Sigmoid(x)
  y = Add(b, c)
}
"""


def test_sorted_graph_keeps_its_exact_order() -> None:
    # A FIFO Kahn sort would emit Sigmoid before Neg; a valid order must not move at all.
    proto = parse(DIAMOND)
    model = Model.from_onnx(proto)
    before = structure(model)

    result = run_pass("toposort", model)

    assert result.changed is False
    assert result.stats == {"moved": 0, "relinked": 0}
    assert structure(model) == before
    assert_same_outputs(proto, model, random_feeds({"x": (2, 3)}))


def test_only_late_producers_move() -> None:
    reference = parse(DIAMOND)
    # Add first: its producers must be pulled in front of it, in their original order.
    model = Model.from_onnx(shuffled(reference, [3, 0, 1, 2]))

    result = run_pass("toposort", model)

    assert result.changed
    assert result.stats == {"moved": 4, "relinked": 0}
    assert [n.op for n in model.graph.nodes] == ["Relu", "Neg", "Sigmoid", "Add"]
    assert_sorted(model)
    assert_same_outputs(reference, model, random_feeds({"x": (2, 3)}))


SUBGRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, bool c) => (float[2,3] y)
{
  outer = Relu(x)
  deep = Exp(x)
  y = If(c) <
    then_branch = then_g () => (float[2,3] t) {
      inner = Neg(outer)
      t = Add(inner, x)
    },
    else_branch = else_g () => (float[2,3] e) {
      e = If(c) <
        then_branch = nested_then () => (float[2,3] n1) { n1 = Sigmoid(deep) },
        else_branch = nested_else () => (float[2,3] n2) { n2 = Identity(x) }
      >
    }
  >
}
"""


def test_if_moves_after_values_its_branches_read() -> None:
    reference = parse(SUBGRAPH)
    # The If comes first although its then-branch reads `outer` and a nested branch reads `deep`;
    # the then-branch itself is reversed too.
    proto = shuffled(reference, [2, 0, 1])
    then_g = proto.graph.node[0].attribute[0].g
    proto = shuffled(proto, [1, 0], graph=then_g)
    model = Model.from_onnx(proto)

    result = run_pass("toposort", model)

    assert result.changed
    # graphsurgeon gives the branches stand-ins for `outer` and `deep` (their producers come
    # later in the file); loading relinks them, so the branches read the real tensors and the
    # pass has nothing left to relink.
    assert result.stats["relinked"] == 0
    assert [n.op for n in model.graph.nodes] == ["Relu", "Exp", "If"]
    outer = model.graph.nodes[0].outputs[0]
    assert [n.op for n in outer.outputs] == ["Neg"]
    branch = model.graph.nodes[2].attrs["then_branch"]
    assert [n.op for n in branch.nodes] == ["Neg", "Add"]
    assert_sorted(model)
    x = random_feeds({"x": (2, 3)})["x"]
    for condition in (True, False):
        assert_same_outputs(reference, model, {"x": x, "c": np.array(condition)})


def test_cycle_is_an_error_naming_its_nodes() -> None:
    nodes = [
        onnx.helper.make_node("Relu", ["b"], ["a"], name="first"),
        onnx.helper.make_node("Neg", ["a"], ["b"], name="second"),
        onnx.helper.make_node("Add", ["a", "x"], ["y"], name="out"),
    ]
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in ("x", "y")]
    graph = onnx.helper.make_graph(nodes, "cyclic", info[:1], info[1:])
    model = Model.from_onnx(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))

    with pytest.raises(GraphCycleError, match="cycle") as caught:
        run_pass("toposort", model)
    message = str(caught.value)
    assert "Relu 'first'" in message and "Neg 'second'" in message and "'cyclic'" in message
    assert "'out'" not in message

    # Through the pass manager the error names the pass and chains the cause.
    with pytest.raises(PassError, match="pass 'toposort' failed") as wrapped:
        run_passes(model, create_pass("toposort"))
    assert isinstance(wrapped.value.__cause__, GraphCycleError)


def test_long_reversed_chain_sorts_without_recursion() -> None:
    # Deeper than Python's recursion limit, and in the worst order: every node is late.
    length = 3000
    nodes = [onnx.helper.make_node("Neg", [f"h{i}"], [f"h{i + 1}"]) for i in range(length)]
    nodes.reverse()
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in ("h0", f"h{length}")]
    graph = onnx.helper.make_graph(nodes, "chain", info[:1], info[1:])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model = Model.from_onnx(proto)

    result = run_pass("toposort", model)

    assert result.changed
    assert [n.outputs[0].name for n in model.graph.nodes] == [f"h{i + 1}" for i in range(length)]
    feeds = random_feeds({"h0": (2,)})
    onnx.checker.check_model(model.to_onnx())
    expected = feeds["h0"] * (-1) ** length
    np.testing.assert_array_equal(run_ort(model.to_onnx(), feeds)[f"h{length}"], expected)
