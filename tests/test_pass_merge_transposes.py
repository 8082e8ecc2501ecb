"""merge_consecutive_transposes: Transpose pairs compose into one, or vanish when they cancel."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_elim import attr_of, model_text, ops, producer_of, rewritten, unchanged

PASS = "merge_consecutive_transposes"


def test_pair_becomes_one_transpose_with_composed_perm() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[3,4,2] y)",
        """
        t = Transpose<perm = [1, 0, 2]>(x)
        y = Transpose<perm = [0, 2, 1]>(t)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1, "cancelled": 0}
    assert ops(model) == ["Transpose"]
    assert producer_of(model, "y") == ("Transpose", ["x"])
    # composed[i] = p1[p2[i]]: y axis i is x axis p1[p2[i]].
    assert attr_of(model, "y", "perm") == [1, 2, 0]


def test_composed_perm_matches_numpy() -> None:
    p1, p2 = [2, 0, 3, 1], [3, 1, 0, 2]
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    expected = np.transpose(np.transpose(x, p1), p2)
    text = model_text(
        "(float[2,3,4,5] x) => (float[?,?,?,?] y)",
        f"""
        t = Transpose<perm = {p1}>(x)
        y = Transpose<perm = {p2}>(t)
        """,
    )
    model, _ = rewritten(text, PASS)
    perm = attr_of(model, "y", "perm")
    assert isinstance(perm, list)
    np.testing.assert_array_equal(np.transpose(x, perm), expected)


def test_cancelling_pair_vanishes() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[2,3,4] y)",
        """
        a = Relu(x)
        t = Transpose<perm = [2, 0, 1]>(a)
        u = Transpose<perm = [1, 2, 0]>(t)
        y = Neg(u)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 0, "cancelled": 1}
    assert ops(model) == ["Relu", "Neg"]
    assert producer_of(model, "y") == ("Neg", ["a"])


def test_cancelling_pair_writing_a_graph_output_renames_the_producer() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y)",
        """
        a = Relu(x)
        t = Transpose<perm = [1, 0]>(a)
        y = Transpose<perm = [1, 0]>(t)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats["cancelled"] == 1
    assert ops(model) == ["Relu"]
    assert producer_of(model, "y") == ("Relu", ["x"])


def test_chain_of_three_collapses_in_one_run() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[2,4,3] y)",
        """
        t = Transpose<perm = [1, 0, 2]>(x)
        u = Transpose<perm = [0, 2, 1]>(t)
        y = Transpose<perm = [2, 1, 0]>(u)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 2, "cancelled": 0}
    assert ops(model) == ["Transpose"]
    assert producer_of(model, "y") == ("Transpose", ["x"])


@pytest.mark.parametrize("length", [60, 61])
def test_long_chain_collapses_in_one_run(length: int) -> None:
    body = "\n".join(f"t{i + 1} = Transpose<perm = [1, 2, 0]>(t{i})" for i in range(length))
    text = model_text("(float[2,3,4] t0) => (float[?,?,?] y)", f"{body}\ny = Neg(t{length})")
    model, _ = rewritten(text, PASS)
    # Rotating three axes by one place three times is the identity.
    if length % 3 == 0:
        assert ops(model) == ["Neg"]
        assert producer_of(model, "y") == ("Neg", ["t0"])
    else:
        assert ops(model) == ["Transpose", "Neg"]
        assert producer_of(model, f"t{length}") == ("Transpose", ["t0"])


def test_first_transpose_with_another_consumer_stays() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[4,3,2] y, float[3,2,4] z)",
        """
        t = Transpose<perm = [1, 0, 2]>(x)
        y = Transpose<perm = [2, 0, 1]>(t)
        z = Relu(t)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1, "cancelled": 0}
    assert ops(model) == ["Transpose", "Transpose", "Relu"]
    assert producer_of(model, "y") == ("Transpose", ["x"])
    assert attr_of(model, "y", "perm") == [2, 1, 0]
    assert producer_of(model, "z") == ("Relu", ["t"])


def test_intermediate_graph_output_stays() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[3,2,4] t, float[2,4,3] y)",
        """
        t = Transpose<perm = [1, 0, 2]>(x)
        y = Transpose<perm = [1, 2, 0]>(t)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1, "cancelled": 0}
    assert producer_of(model, "t") == ("Transpose", ["x"])
    assert producer_of(model, "y") == ("Transpose", ["x"])
    assert attr_of(model, "y", "perm") == [0, 2, 1]


def test_default_perm_resolved_from_known_rank() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[2,3,4] y) <float[2,3,4] a>",
        """
        a = Relu(x)
        t = Transpose(a)
        u = Transpose(t)
        y = Neg(u)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats["cancelled"] == 1
    assert ops(model) == ["Relu", "Neg"]


def test_pair_inside_a_subgraph_is_merged() -> None:
    text = model_text(
        "(bool c, float[2,3,4] x) => (float[4,3,2] y)",
        """
        y = If(c) <
          then_branch = g1 () => (float[4,3,2] o1) {
            t1 = Transpose<perm = [1, 0, 2]>(x)
            o1 = Transpose<perm = [2, 0, 1]>(t1)
          },
          else_branch = g2 () => (float[4,3,2] o2) {
            o2 = Transpose<perm = [2, 1, 0]>(x)
          }
        >
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1, "cancelled": 0}
    then_branch = model.graph.nodes[0].attrs["then_branch"]
    assert [n.op for n in then_branch.nodes] == ["Transpose"]
    assert then_branch.nodes[0].attrs["perm"] == [2, 1, 0]


def test_cancelling_pair_between_graph_input_and_output_stays() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y)",
        """
        t = Transpose<perm = [1, 0]>(x)
        y = Transpose<perm = [1, 0]>(t)
        """,
    )
    unchanged(text, PASS)


def test_default_perm_with_unknown_rank_is_left_alone() -> None:
    # `a` has no shape information, so "reverse the axes" cannot be resolved.
    text = model_text(
        "(float[2,3,4] x) => (float[2,3,4] y)",
        """
        a = Relu(x)
        t = Transpose(a)
        u = Transpose(t)
        y = Neg(u)
        """,
    )
    unchanged(text, PASS)


def test_transpose_after_other_op_is_left_alone() -> None:
    text = model_text(
        "(float[2,3] x) => (float[3,2] y)",
        """
        t = Relu(x)
        y = Transpose<perm = [1, 0]>(t)
        """,
    )
    unchanged(text, PASS)


def test_first_transpose_read_inside_a_subgraph_stays() -> None:
    text = model_text(
        "(bool c, float[2,3,4] x) => (float[4,3,2] y, float[3,2,4] z)",
        """
        t = Transpose<perm = [1, 0, 2]>(x)
        y = Transpose<perm = [2, 0, 1]>(t)
        z = If(c) <
          then_branch = g1 () => (float[3,2,4] o1) { o1 = Neg(t) },
          else_branch = g2 () => (float[3,2,4] o2) { o2 = Abs(t) }
        >
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1, "cancelled": 0}
    assert producer_of(model, "y") == ("Transpose", ["x"])
    assert producer_of(model, "t") == ("Transpose", ["x"])


def test_merge_reaches_past_a_pair_that_could_not_cancel() -> None:
    # t1 -> t2 cancels, but t2 is a graph output and x a graph input, so that pair stays;
    # y's Transpose still composes through both, in the same run.
    text = model_text(
        "(float[2,3,4] x) => (float[2,3,4] t2, float[2,4,3] y)",
        """
        t1 = Transpose<perm = [1, 0, 2]>(x)
        t2 = Transpose<perm = [1, 0, 2]>(t1)
        y = Transpose<perm = [0, 2, 1]>(t2)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 2, "cancelled": 0}
    assert producer_of(model, "t2") == ("Transpose", ["t1"])
    assert producer_of(model, "y") == ("Transpose", ["x"])
    assert attr_of(model, "y", "perm") == [0, 2, 1]


def test_default_perm_rank_taken_from_the_other_perm() -> None:
    # No annotation on `a` or `t`, but the second Transpose's explicit perm gives the rank.
    text = model_text(
        "(float[2,3,4] x) => (float[4,2,3] y)",
        """
        a = Relu(x)
        t = Transpose(a)
        u = Transpose<perm = [0, 2, 1]>(t)
        y = Neg(u)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1, "cancelled": 0}
    assert producer_of(model, "u") == ("Transpose", ["a"])
    assert attr_of(model, "u", "perm") == [2, 0, 1]
