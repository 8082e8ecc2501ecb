"""merge_consecutive_reshapes: a Reshape reads past a preceding shape-only op when that is exact."""

from __future__ import annotations

import pytest
from helpers_elim import attr_of, constant_input, model_text, ops, producer_of, rewritten, unchanged

PASS = "merge_consecutive_reshapes"


def test_reshape_of_reshape_reads_the_original() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[4,6] y)",
        """
        s1 = Constant<value = int64[2] {6, 4}>()
        s2 = Constant<value = int64[2] {4, 6}>()
        t = Reshape(x, s1)
        y = Reshape(t, s2)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1}
    assert ops(model) == ["Constant", "Constant", "Reshape"]
    assert producer_of(model, "y") == ("Reshape", ["x", "s2"])


def test_minus_one_needs_no_resolution() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[12,2] y)",
        """
        s1 = Constant<value = int64[2] {6, -1}>()
        s2 = Constant<value = int64[2] {-1, 2}>()
        t = Reshape(x, s1)
        y = Reshape(t, s2)
        """,
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "y") == ("Reshape", ["x", "s2"])


def test_copied_axis_resolved_from_the_first_target() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[6,2,2] y)",
        """
        s1 = Constant<value = int64[2] {6, 4}>()
        s2 = Constant<value = int64[3] {0, 2, 2}>()
        t = Reshape(x, s1)
        y = Reshape(t, s2)
        """,
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "y")[1][0] == "x"
    # 0 copied t's axis 0 (size 6); reading x it would copy 2, so it is written out.
    assert constant_input(model, "y", 1) == [6, 2, 2]


def test_copied_axis_resolved_from_the_annotated_shape() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[6,2,2] y) <float[6,4] t>",
        """
        s = Constant<value = int64[3] {0, 2, -1}>()
        t = Flatten<axis = 2>(x)
        y = Reshape(t, s)
        """,
    )
    model, _ = rewritten(text, PASS)
    assert ops(model) == ["Constant", "Reshape"]
    assert producer_of(model, "y")[1][0] == "x"
    assert constant_input(model, "y", 1) == [6, 2, -1]


@pytest.mark.parametrize(
    ("opset", "first"),
    [
        (17, "t = Flatten<axis = 1>(x)"),
        (17, "t = Squeeze(x, axes)"),
        (17, "t = Unsqueeze(x, axes)"),
        (11, "t = Squeeze<axes = [1]>(x)"),
        (11, "t = Unsqueeze<axes = [1]>(x)"),
    ],
)
def test_reshape_after_flatten_squeeze_unsqueeze(opset: int, first: str) -> None:
    text = model_text(
        "(float[4,1,6] x) => (float[3,8] y)",
        f"""
        axes = Constant<value = int64[1] {{1}}>()
        s = Constant<value = int64[2] {{3, 8}}>()
        {first}
        y = Reshape(t, s)
        """,
        opset=opset,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1}
    assert producer_of(model, "y") == ("Reshape", ["x", "s"])
    assert not any(op in ops(model) for op in ("Flatten", "Squeeze", "Unsqueeze"))


@pytest.mark.parametrize(
    ("x_type", "perm", "sizes"),
    [
        ("float[4,1,3,2]", "[0, 2, 1, 3]", {}),
        # LSTM's output [seq, 1, batch, hidden] as [seq, batch, 1, hidden]: S and N symbolic.
        ("float[S,1,N,2]", "[0, 2, 1, 3]", {"S": 3, "N": 4}),
        ("float[1,1,6,2]", "[1, 0, 2, 3]", {}),
    ],
)
def test_reshape_after_a_transpose_of_size_one_axes(x_type: str, perm: str, sizes: dict[str, int]) -> None:
    model, result = rewritten(_transpose_then_reshape(x_type, perm), PASS, sizes=sizes)
    assert result.stats == {"merged": 1}
    assert producer_of(model, "y") == ("Reshape", ["x", "s"])
    assert "Transpose" not in ops(model)


@pytest.mark.parametrize(
    ("x_type", "perm"),
    [
        ("float[4,1,3,2]", "[0, 3, 1, 2]"),  # 3 and 2 change places: the element order changes
        ("float[S,M,N,2]", "[0, 2, 1, 3]"),  # M might not be 1
    ],
)
def test_reshape_after_a_reordering_transpose_is_left_alone(x_type: str, perm: str) -> None:
    unchanged(_transpose_then_reshape(x_type, perm), PASS)


def _transpose_then_reshape(x_type: str, perm: str) -> str:
    return model_text(
        f"({x_type} x) => (float[?, 2] y)",
        f"""
        s = Constant<value = int64[2] {{-1, 2}}>()
        t = Transpose<perm = {perm}>(x)
        y = Reshape(t, s)
        """,
    )


def test_allowzero_keeps_literal_zero() -> None:
    text = model_text(
        "(float[0,3] x) => (float[0,5] y)",
        """
        s1 = Constant<value = int64[2] {3, 0}>()
        s2 = Constant<value = int64[2] {0, 5}>()
        t = Reshape<allowzero = 1>(x, s1)
        y = Reshape<allowzero = 1>(t, s2)
        """,
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "y") == ("Reshape", ["x", "s2"])
    assert attr_of(model, "y", "allowzero") == 1


def test_chain_collapses_in_one_run() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[24] y)",
        """
        s1 = Constant<value = int64[2] {6, 4}>()
        s2 = Constant<value = int64[3] {4, 3, 2}>()
        s3 = Constant<value = int64[1] {24}>()
        a = Reshape(x, s1)
        b = Flatten<axis = 0>(a)
        c = Reshape(b, s2)
        y = Reshape(c, s3)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 2}
    assert producer_of(model, "y") == ("Reshape", ["x", "s3"])
    assert "Flatten" not in ops(model)


def test_first_with_another_consumer_stays() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[4,6] y, float[6,4] z)",
        """
        s1 = Constant<value = int64[2] {6, 4}>()
        s2 = Constant<value = int64[2] {4, 6}>()
        t = Reshape(x, s1)
        y = Reshape(t, s2)
        z = Relu(t)
        """,
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "y") == ("Reshape", ["x", "s2"])
    assert producer_of(model, "t") == ("Reshape", ["x", "s1"])
    assert producer_of(model, "z") == ("Relu", ["t"])


def test_intermediate_graph_output_stays() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[6,4] t, float[4,6] y)",
        """
        s1 = Constant<value = int64[2] {6, 4}>()
        s2 = Constant<value = int64[2] {4, 6}>()
        t = Reshape(x, s1)
        y = Reshape(t, s2)
        """,
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "t") == ("Reshape", ["x", "s1"])
    assert producer_of(model, "y") == ("Reshape", ["x", "s2"])


def test_non_constant_target_is_left_alone() -> None:
    text = model_text(
        "(float[2,3,4] x, float[4,6] z) => (float[4,6] y)",
        """
        s1 = Constant<value = int64[2] {6, 4}>()
        t = Reshape(x, s1)
        s2 = Shape(z)
        y = Reshape(t, s2)
        """,
    )
    unchanged(text, PASS)


def test_copied_axis_of_unknown_size_is_left_alone() -> None:
    # Flatten's output has no shape annotation, so the 0 in `s` cannot be resolved.
    text = model_text(
        "(float[2,3,4] x) => (float[6,2,2] y)",
        """
        s = Constant<value = int64[3] {0, 2, -1}>()
        t = Flatten<axis = 2>(x)
        y = Reshape(t, s)
        """,
    )
    unchanged(text, PASS)


def test_reshape_after_other_op_is_left_alone() -> None:
    text = model_text(
        "(float[2,3,4] x) => (float[4,6] y)",
        """
        s = Constant<value = int64[2] {4, 6}>()
        t = Relu(x)
        y = Reshape(t, s)
        """,
    )
    unchanged(text, PASS)
