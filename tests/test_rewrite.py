"""The rewrite API: patterns, captures, refusal reasons, the worklist engine and its guards."""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers_fusion import ATOL, RTOL, assert_same_outputs, build, histogram, run_ort

import iropt.rewrite
from iropt.infra.pass_base import PassContext
from iropt.ir.model import Model
from iropt.rewrite import (
    Match,
    RewriteError,
    RewritePass,
    RewriteRule,
    apply_rules,
    const,
    explain,
    op,
    take_outputs,
    tensor,
)


class FoldMulChain(RewriteRule):
    """Mul(Mul(x, a), b) with constants a, b -> Mul(x, a * b)."""

    name = "fold_mul_chain"
    pattern = op(
        "Mul",
        inputs=[op("Mul", inputs=[tensor("x"), const("a")], name="inner", one_consumer=True), const("b")],
        name="outer",
    )

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        product = match.constant("product", match.value("a") * match.value("b"))
        outputs = take_outputs(match.nodes["outer"])
        graph.nodes.append(gs.Node("Mul", inputs=[match.tensors["x"], product], outputs=outputs))


class NeverApplies(RewriteRule):
    """Anchored at every Mul, refused by its check: counts one attempt per Mul."""

    name = "never"
    pattern = op("Mul", inputs=[tensor(), tensor()])

    def check(self, match: Match) -> str | None:
        return "refused on purpose"

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        raise AssertionError("never called")


@dataclass(kw_only=True)
class FoldMulChainPass(RewritePass):
    def rules(self) -> list[RewriteRule]:
        return [FoldMulChain()]


def mul_chain(length: int, seed: int = 0) -> onnx.ModelProto:
    """y = x * c0 * c1 * ... as a chain of `length` Mul nodes with constants near 1."""
    rng = np.random.default_rng(seed)
    nodes = [
        onnx.helper.make_node(
            "Mul", [f"t{i}" if i else "x", f"c{i}"], [f"t{i + 1}" if i < length - 1 else "y"]
        )
        for i in range(length)
    ]
    weights = [
        onnx.numpy_helper.from_array(rng.uniform(0.95, 1.05, 4).astype(np.float32), f"c{i}")
        for i in range(length)
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "chain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        weights,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def node(model: Model, op_type: str, index: int = 0) -> gs.Node:
    return [n for n in model.graph.nodes if n.op == op_type][index]


# ---------------------------------------------------------------------------------------------
# The worked example in the module docstring


def test_module_docstring_example_runs() -> None:
    doc = iropt.rewrite.__doc__ or ""
    code = textwrap.dedent(doc.split("Worked example")[1].split("\n", 2)[2])
    namespace: dict[str, Any] = {"__name__": "docstring_example"}
    exec(compile(code, "iropt/rewrite.py docstring", "exec"), namespace)
    model = namespace["model"]
    after = model.to_onnx()
    onnx.checker.check_model(after, full_check=True)
    x = np.linspace(-3, 3, 4, dtype=np.float32)
    np.testing.assert_allclose(run_ort(after, {"x": x})["y"], x / 4, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# A custom rule applied by a RewritePass


def test_custom_rule_collapses_a_chain_and_counts_applications() -> None:
    proto = mul_chain(40)
    model = Model.from_onnx(proto)
    result = FoldMulChainPass().run(model, PassContext())
    assert result.changed and result.stats == {"fold_mul_chain": 39}
    after = model.to_onnx()
    onnx.checker.check_model(after, full_check=True)
    assert histogram(after) == {"Mul": 1}
    # The 40 original constants are gone (dead), one folded product remains.
    assert len(after.graph.initializer) == 1
    assert_same_outputs(proto, after)
    assert not FoldMulChainPass().run(model, PassContext()).changed


def test_no_application_reports_zero_counts_and_no_change() -> None:
    model = Model.from_onnx(mul_chain(1))
    result = FoldMulChainPass().run(model, PassContext())
    assert not result.changed and result.stats == {"fold_mul_chain": 0}


def test_match_attempts_grow_linearly() -> None:
    # Counted, not timed: the engine visits each node a bounded number of times.
    attempts = {}
    for length in (2000, 4000):
        graph = Model.from_onnx(mul_chain(length)).graph
        report = apply_rules(graph, [FoldMulChain()])
        assert report.applied == {"fold_mul_chain": length - 1}
        assert [n.op for n in graph.nodes] == ["Mul"]
        attempts[length] = report.attempts
    assert attempts[2000] <= 2 * 2000
    assert attempts[4000] <= 2.1 * attempts[2000]


def test_a_refusing_rule_is_tried_once_per_anchor_node() -> None:
    model = Model.from_onnx(mul_chain(300))
    model.graph.nodes.append(gs.Node("Relu", inputs=[model.graph.outputs[0]], outputs=[gs.Variable("r")]))
    report = apply_rules(model.graph, [NeverApplies()], record_refusals=True)
    assert report.attempts == 300  # Relu is not a candidate: rules are indexed by op type
    assert report.total == 0
    assert {str(r) for r in report.refusals[:1]} == {"never at Mul: refused on purpose"}


def test_rules_with_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="distinct"):
        apply_rules(Model.from_onnx(mul_chain(2)).graph, [FoldMulChain(), FoldMulChain()])


# ---------------------------------------------------------------------------------------------
# Pattern features and their refusal reasons


def test_const_requirement_explains_itself() -> None:
    model = Model.from_onnx(
        build(
            """
            g (float[4] x, float[4] a) => (float[4] y) {
                t = Mul (x, a)
                y = Mul (t, b)
            }""",
            {"b": np.ones(4, np.float32)},
        )
    )
    outer = node(model, "Mul", 1)
    assert explain(FoldMulChain(), outer, model.graph) == ["fold_mul_chain: Mul.B is not a constant ('a')"]
    assert FoldMulChain().explain(outer, model.graph) == "Mul.B is not a constant ('a')"
    assert explain(FoldMulChain(), node(model, "Mul", 0), model.graph) == [
        "fold_mul_chain: Mul.A ('x') is not computed by a node"
    ]


def test_one_consumer_and_graph_output_conditions() -> None:
    model = Model.from_onnx(
        build(
            """
            g (float[4] x) => (float[4] y, float[4] z) {
                t = Mul (x, a)
                y = Mul (t, b)
                z = Relu (t)
            }""",
            {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)},
        )
    )
    assert explain(FoldMulChain(), node(model, "Mul", 1), model.graph) == [
        "fold_mul_chain: Mul output 't' has 2 consumers"
    ]
    model = Model.from_onnx(
        build(
            """
            g (float[4] x) => (float[4] y, float[4] t) {
                t = Mul (x, a)
                y = Mul (t, b)
            }""",
            {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)},
        )
    )
    assert explain(FoldMulChain(), node(model, "Mul", 1), model.graph) == [
        "fold_mul_chain: Mul output 't' is a graph output"
    ]


class Capture(RewriteRule):
    """A rule that only records its matches, to test what patterns capture."""

    def __init__(self, pattern: Any) -> None:
        self.name = "capture"
        self.pattern = pattern
        self.matches: list[Match] = []

    def check(self, match: Match) -> str | None:
        self.matches.append(match)
        return "recorded"

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        raise AssertionError("never called")


GEMM = build(
    """
    g (float[2,3] a) => (float[2,4] y, float[2,4] z) {
        y = Gemm <alpha = 2.0> (a, w)
        z = Gemm <transB = 1> (a, wt, c)
    }""",
    {"w": np.ones((3, 4), np.float32), "wt": np.ones((4, 3), np.float32), "c": np.zeros(4, np.float32)},
)


def test_optional_inputs_and_schema_default_attributes() -> None:
    model = Model.from_onnx(GEMM)
    rule = Capture(
        op("Gemm", inputs=[tensor("a"), const("w"), const("c", optional=True)], attrs={"transB": 0})
    )
    apply_rules(model.graph, [rule])
    (match,) = rule.matches  # only the first Gemm: transB is absent there, and defaults to 0
    assert match.root.outputs[0].name == "y"
    assert match.values["c"] is None and match.tensors["c"] is None
    assert match.value("w").shape == (3, 4)
    second = node(model, "Gemm", 1)
    assert rule.explain(second, model.graph) == "Gemm.transB is 1, expected 0"


def test_predicate_attributes_describe_themselves() -> None:
    def small_alpha(value: object) -> bool:
        """must be below 1.5"""
        return isinstance(value, float) and value < 1.5

    model = Model.from_onnx(GEMM)
    rule = Capture(op("Gemm", attrs={"alpha": small_alpha}))
    assert rule.explain(node(model, "Gemm", 0), model.graph) == "Gemm.alpha is 2.0: must be below 1.5"
    assert rule.explain(node(model, "Gemm", 1), model.graph) == "recorded"


def test_unexpected_extra_inputs_and_missing_inputs() -> None:
    model = Model.from_onnx(GEMM)
    two_inputs = Capture(op("Gemm", inputs=[tensor(), tensor()]))
    assert two_inputs.explain(node(model, "Gemm", 1), model.graph) == "Gemm.C ('c') is not in the pattern"
    three_inputs = Capture(op("Gemm", inputs=[tensor(), tensor(), tensor("c")]))
    assert three_inputs.explain(node(model, "Gemm", 0), model.graph) == "Gemm.C is missing"


def test_same_capture_name_must_bind_the_same_tensor() -> None:
    model = Model.from_onnx(
        build(
            """
            g (float[4] x, float[4] u) => (float[4] y, float[4] z) {
                y = Mul (x, x)
                z = Mul (x, u)
            }"""
        )
    )
    square = Capture(op("Mul", inputs=[tensor("v"), tensor("v")]))
    apply_rules(model.graph, [square])
    assert [m.root.outputs[0].name for m in square.matches] == ["y"]


def test_commutative_patterns_try_both_orders() -> None:
    model = Model.from_onnx(
        build(
            """
            g (float[4] x) => (float[4] y) {
                t = Relu (x)
                y = Add (k, t)
            }""",
            {"k": np.ones(4, np.float32)},
        )
    )
    rule = Capture(op("Add", inputs=[op("Relu", name="relu"), const("k")], commutative=True))
    apply_rules(model.graph, [rule])
    (match,) = rule.matches
    assert match.nodes["relu"].op == "Relu" and match.value("k").shape == (4,)
    plain = Capture(op("Add", inputs=[op("Relu"), const("k")]))
    assert plain.explain(node(model, "Add"), model.graph) == "Add.A ('k') is not computed by a node"


def test_explain_lists_rules_not_anchored_at_the_node() -> None:
    model = Model.from_onnx(GEMM)
    assert explain([FoldMulChain()], node(model, "Gemm"), model.graph) == [
        "fold_mul_chain: not anchored at Gemm (anchors at Mul)"
    ]


def test_refusals_are_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    model = Model.from_onnx(mul_chain(2))
    logger = logging.getLogger("iropt.test_rewrite")
    with caplog.at_level(logging.DEBUG, logger="iropt.test_rewrite"):
        FoldMulChainPass().run(model, PassContext(log=logger))
    assert "fold_mul_chain at " in caplog.text and "Mul.A ('x') is not computed by a node" in caplog.text


def test_fresh_names_do_not_collide() -> None:
    model = Model.from_onnx(mul_chain(3))
    model.graph.inputs.append(gs.Variable("product", dtype=np.float32, shape=[1]))
    report = apply_rules(model.graph, [FoldMulChain()])
    assert report.total == 2
    names = [t.name for t in model.graph.tensors().values()]
    assert len(names) == len(set(names))
    assert "product_1" in names or "product_2" in names


# ---------------------------------------------------------------------------------------------
# Subgraphs


IF_MODEL = """
    g (bool c, float[4] x) => (float[4] y) {
        s = Mul (x, a)
        y = If (c) <
            then_branch = then_g () => (float[4] yt) {
                t = Mul (x, a)
                yt = Mul (t, b)
            },
            else_branch = else_g () => (float[4] ye) {
                ye = Mul (s, b)
            }
        >
    }"""


def test_rules_apply_inside_subgraphs_but_never_across_them() -> None:
    proto = build(IF_MODEL, {"a": np.full(4, 2, np.float32), "b": np.full(4, 3, np.float32)})
    model = Model.from_onnx(proto)
    graphs = [
        model.graph,
        *[v for n in model.graph.nodes for v in n.attrs.values() if isinstance(v, gs.Graph)],
    ]
    else_graph = next(g for g in graphs if g.name == "else_g")
    # The else branch reads `s` from the enclosing graph: the pattern must not reach it.
    assert FoldMulChain().explain(else_graph.nodes[0], else_graph, opset=17) == (
        "Mul.A ('s') comes from an enclosing graph"
    )
    result = FoldMulChainPass().run(model, PassContext())
    assert result.stats == {"fold_mul_chain": 1}
    after = model.to_onnx()
    onnx.checker.check_model(after, full_check=True)
    assert histogram(after) == {"Mul": 3, "If": 1}
    x = np.arange(4, dtype=np.float32)
    for branch in (True, False):
        assert_same_outputs(proto, after, {"c": np.array(branch), "x": x})


# ---------------------------------------------------------------------------------------------
# Guards against rules that break the contract


class DropsOutput(RewriteRule):
    """Rewires consumers but leaves the graph output without a producer: must be caught."""

    name = "drops_output"
    pattern = op("Relu", inputs=[tensor("x")], name="relu")

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        take_outputs(match.nodes["relu"])


class RemovesNodes(RewriteRule):
    name = "removes_nodes"
    pattern = op("Relu", name="relu")

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        graph.nodes.remove(match.nodes["relu"])


class Swap(RewriteRule):
    """Relu <-> Sigmoid in place: two of these undo each other forever."""

    def __init__(self, source: str, target: str) -> None:
        self.name = f"{source}_to_{target}"
        self.pattern = op(source, name="n")
        self.target = target

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        match.nodes["n"].op = self.target


RELU = """
    g (float[4] x) => (float[4] y) {
        y = Relu (x)
    }"""


def test_a_rule_that_drops_a_graph_output_is_an_error() -> None:
    with pytest.raises(RewriteError, match="left graph output 'y' with 0 producers"):
        apply_rules(Model.from_onnx(build(RELU)).graph, [DropsOutput()])


def test_a_rule_that_removes_nodes_itself_is_an_error() -> None:
    with pytest.raises(RewriteError, match=r"removed nodes from graph\.nodes"):
        apply_rules(Model.from_onnx(build(RELU)).graph, [RemovesNodes()])


def test_rules_that_undo_each_other_are_stopped() -> None:
    rules = [Swap("Relu", "Sigmoid"), Swap("Sigmoid", "Relu")]
    with pytest.raises(RewriteError, match="did not converge"):
        apply_rules(Model.from_onnx(build(RELU)).graph, rules)
