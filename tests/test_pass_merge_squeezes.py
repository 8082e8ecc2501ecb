"""merge_consecutive_squeezes: Squeeze/Unsqueeze pairs combine into one node or cancel."""

from __future__ import annotations

import pytest
from helpers_elim import attr_of, constant_input, model_text, ops, producer_of, rewritten, unchanged

from iropt.ir.model import Model

PASS = "merge_consecutive_squeezes"


def axes_of(model: Model, output: str, opset: int) -> list[int]:
    """The axes of the Squeeze/Unsqueeze writing `output`, read from the opset's place for them."""
    if opset >= 13:
        return constant_input(model, output, 1)
    axes = attr_of(model, output, "axes")
    assert isinstance(axes, list)
    return [int(a) for a in axes]


def pair(op1: str, axes1: list[int], op2: str, axes2: list[int], opset: int) -> str:
    """Body lines `t = op1(x, axes1)`, `y = op2(t, axes2)` in the opset's axes form."""
    if opset >= 13:
        return f"""
        a1 = Constant<value = int64[{len(axes1)}] {{{", ".join(map(str, axes1))}}}>()
        a2 = Constant<value = int64[{len(axes2)}] {{{", ".join(map(str, axes2))}}}>()
        t = {op1}(x, a1)
        y = {op2}(t, a2)
        """
    return f"""
        t = {op1}<axes = {axes1}>(x)
        y = {op2}<axes = {axes2}>(t)
        """


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize(
    ("x_shape", "op1", "axes1", "op2", "axes2", "y_shape", "op", "axes"),
    [
        # Unsqueeze∘Unsqueeze: inserted axes are counted in each output.
        ("2,3", "Unsqueeze", [0], "Unsqueeze", [2], "1,2,1,3", "Unsqueeze", [0, 2]),
        ("2,3", "Unsqueeze", [1, 3], "Unsqueeze", [0], "1,2,1,3,1", "Unsqueeze", [0, 2, 4]),
        ("2,3", "Unsqueeze", [-1], "Unsqueeze", [0, -1], "1,2,3,1,1", "Unsqueeze", [0, 3, 4]),
        # Squeeze∘Squeeze: the second counts in the already squeezed tensor.
        ("1,2,1,3,1", "Squeeze", [0], "Squeeze", [1, 3], "2,3", "Squeeze", [0, 2, 4]),
        ("1,2,1,3,1", "Squeeze", [-1], "Squeeze", [0], "2,1,3", "Squeeze", [0, 4]),
        # Unsqueeze then a Squeeze of some inserted axes: one Unsqueeze.
        ("2,3", "Unsqueeze", [0, 2], "Squeeze", [0], "2,1,3", "Unsqueeze", [1]),
        # Unsqueeze then a Squeeze of all inserted axes and more: one Squeeze.
        ("2,1,3", "Unsqueeze", [0], "Squeeze", [0, 2], "2,3", "Squeeze", [1]),
    ],
)
def test_pairs_combine(
    opset: int, x_shape: str, op1: str, axes1: list[int], op2: str, axes2: list[int],
    y_shape: str, op: str, axes: list[int],
) -> None:
    text = model_text(f"(float[{x_shape}] x) => (float[{y_shape}] y)", pair(op1, axes1, op2, axes2, opset), opset)
    model, result = rewritten(text, PASS)
    assert result.stats == {"combined": 1, "cancelled": 0}
    assert [o for o in ops(model) if o != "Constant"] == [op]
    assert producer_of(model, "y")[1][0] == "x"
    assert axes_of(model, "y", opset) == axes


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize(
    ("op1", "op2", "axes"),
    [("Unsqueeze", "Squeeze", [0, 2]), ("Squeeze", "Unsqueeze", [1]), ("Unsqueeze", "Squeeze", [-1])],
)
def test_pairs_cancel(opset: int, op1: str, op2: str, axes: list[int]) -> None:
    text = model_text(
        "(float[2,1,3] x) => (float[2,1,3] y) <float[2,1,3] u, float[2,1,3] a>",
        "a = Relu(x)\n" + pair(op1, axes, op2, axes, opset).replace("(x", "(a").replace("y =", "u =")
        + "\ny = Neg(u)",
        opset,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"combined": 0, "cancelled": 1}
    assert [o for o in ops(model) if o != "Constant"] == ["Relu", "Neg"]
    assert producer_of(model, "y") == ("Neg", ["a"])


def test_cancelling_pair_writing_a_graph_output_renames_the_producer() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y)",
        "a = Relu(x)\n" + pair("Unsqueeze", [1], "Squeeze", [1], 17).replace("(x", "(a"),
    )
    model, result = rewritten(text, PASS)
    assert result.stats["cancelled"] == 1
    assert [o for o in ops(model) if o != "Constant"] == ["Relu"]
    assert producer_of(model, "y") == ("Relu", ["x"])


def test_squeeze_without_axes_uses_the_static_shape() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y) <float[1,2,1,3] t>",
        """
        a = Constant<value = int64[2] {0, 2}>()
        t = Unsqueeze(x, a)
        u = Squeeze(t)
        y = Neg(u)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats["cancelled"] == 1
    assert producer_of(model, "y") == ("Neg", ["x"])


def test_chain_collapses_in_one_run() -> None:
    text = model_text(
        "(float[2,3] x) => (float[1,1,2,1,3] y)",
        """
        a = Constant<value = int64[1] {0}>()
        b = Constant<value = int64[1] {3}>()
        t = Unsqueeze(x, a)
        u = Unsqueeze(t, a)
        y = Unsqueeze(u, b)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"combined": 2, "cancelled": 0}
    assert [o for o in ops(model) if o != "Constant"] == ["Unsqueeze"]
    assert constant_input(model, "y", 1) == [0, 1, 3]


def test_first_with_another_consumer_stays() -> None:
    text = model_text(
        "(float[2,3] x) => (float[1,2,1,3] y, float[1,2,3] z)",
        """
        a = Constant<value = int64[1] {0}>()
        b = Constant<value = int64[1] {2}>()
        t = Unsqueeze(x, a)
        y = Unsqueeze(t, b)
        z = Relu(t)
        """,
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "y")[1][0] == "x"
    assert producer_of(model, "t") == ("Unsqueeze", ["x", "a"])


def test_cancelling_pair_between_graph_input_and_output_stays() -> None:
    unchanged(model_text("(float[2,3] x) => (float[2,3] y)", pair("Unsqueeze", [1], "Squeeze", [1], 17)), PASS)


def test_non_constant_axes_are_left_alone() -> None:
    text = model_text(
        "(float[2,3] x, int64[1] k) => (float[2,3] y)",
        """
        t = Unsqueeze(x, k)
        u = Squeeze(t, k)
        y = Neg(u)
        """,
    )
    unchanged(text, PASS)


def test_negative_axes_with_unknown_rank_are_left_alone() -> None:
    # Relu's output carries no shape, so the ranks needed for axis -1 are unknown.
    text = model_text(
        "(float[2,3] x) => (float[2,3,1,1] y)",
        "r = Relu(x)\n" + pair("Unsqueeze", [-1], "Unsqueeze", [-1], 17).replace("(x", "(r"),
    )
    unchanged(text, PASS)


def test_squeeze_without_axes_and_unknown_shape_is_left_alone() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y)",
        """
        a = Constant<value = int64[2] {0, 2}>()
        t = Unsqueeze(x, a)
        u = Squeeze(t)
        y = Neg(u)
        """,
    )
    unchanged(text, PASS)


def test_squeeze_then_unsqueeze_of_other_axes_is_left_alone() -> None:
    unchanged(
        model_text("(float[1,2,1] x) => (float[2,1,1] y)", pair("Squeeze", [0], "Unsqueeze", [2], 17)), PASS
    )


def test_unsqueeze_then_squeeze_of_crossing_axes_is_left_alone() -> None:
    # Inserts axis 0, removes axis 2 (one of x's): neither set contains the other.
    unchanged(
        model_text("(float[2,3,1] x) => (float[1,2,3] y)", pair("Unsqueeze", [0], "Squeeze", [3], 17)), PASS
    )


def test_combine_reaches_past_a_pair_that_could_not_cancel() -> None:
    # t -> u cancels, but u is a graph output and x a graph input, so that pair stays;
    # the last Squeeze still combines through both, in the same run.
    text = model_text(
        "(float[1,3] x) => (float[1,3] u, float[3] y)",
        """
        a = Constant<value = int64[1] {0}>()
        t = Unsqueeze(x, a)
        u = Squeeze(t, a)
        v = Squeeze(u, a)
        y = Neg(v)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"combined": 2, "cancelled": 0}
    assert producer_of(model, "u") == ("Squeeze", ["t", "a"])
    assert producer_of(model, "v")[1][0] == "x"
    assert constant_input(model, "v", 1) == [0]
