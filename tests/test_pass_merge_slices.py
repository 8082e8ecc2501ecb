"""merge_consecutive_slices: Slice pairs with constant parameters fold into one Slice."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_elim import attr_of, constant_input, model_text, ops, producer_of, rewritten, unchanged
from hypothesis import given, settings
from hypothesis import strategies as st

from iropt.passes.merge_consecutive_slices import INT64_MAX, clamp_range, compose_axis

PASS = "merge_consecutive_slices"


def ints(values: list[int]) -> str:
    return "{" + ", ".join(map(str, values)) + "}"


def slice_pair(first: tuple[list[int], ...], second: tuple[list[int], ...], source: str = "x") -> str:
    """Two Slices (starts, ends, axes, steps) as constant-input Slices (opset >= 10)."""
    lines = []
    for prefix, params, data, out in (("p", first, source, "t"), ("q", second, "t", "y")):
        names = []
        for name, values in zip(("starts", "ends", "axes", "steps"), params, strict=False):
            lines.append(f"{prefix}{name} = Constant<value = int64[{len(values)}] {ints(values)}>()")
            names.append(f"{prefix}{name}")
        lines.append(f"{out} = Slice({data}, {', '.join(names)})")
    return "\n".join(lines)


def merged_params(model: object, output: str = "y") -> list[list[int]]:
    """starts, ends, axes, steps of the Slice writing `output`."""
    return [constant_input(model, output, i) for i in range(1, 5)]  # type: ignore[arg-type]


def test_disjoint_axes_combine() -> None:
    text = model_text(
        "(float[6,8] x) => (float[4,3] y)",
        slice_pair(([1], [5], [0]), ([2], [8], [1], [2])),
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1}
    assert [o for o in ops(model) if o != "Constant"] == ["Slice"]
    assert producer_of(model, "y")[1][0] == "x"
    assert merged_params(model) == [[1, 2], [5, 8], [0, 1], [1, 2]]


def test_same_axis_composes_without_static_size() -> None:
    # x[2:100:2][1:4:3] on a dynamic axis: start 2 + 1*2, end min(100, 2 + 4*2), step 6.
    text = model_text(
        "(float[N,4] x) => (float[?,4] y)",
        slice_pair(([2], [100], [0], [2]), ([1], [4], [0], [3])),
    )
    for n in (0, 3, 7, 12, 30):
        model, _ = rewritten(text, PASS, sizes={"N": n})
    assert merged_params(model) == [[4], [10], [0], [6]]


def test_same_axis_with_negative_values_needs_static_size() -> None:
    text = model_text(
        "(float[10,3] x) => (float[?,3] y)",
        slice_pair(([-2], [0], [0], [-1]), ([1], [-2], [0], [2])),
    )
    model, _ = rewritten(text, PASS)
    # x[8], x[7], ..., x[1] (nine rows), then rows 1, 3, 5 of that: x[7], x[5], x[3].
    assert merged_params(model) == [[7], [1], [0], [-2]]


# Exhaustive over small parameters: the composed Slice selects exactly what the pair does
# (ONNX Runtime is the judge of the rewritten model's outputs).
CASES = [
    (s1, e1, t1, s2, e2, t2)
    for s1, e1, t1 in [(0, INT64_MAX, 1), (-3, -9, -1), (1, -1, 2), (7, -100, -2), (-100, 5, 3), (4, 4, 1)]
    for s2, e2, t2 in [(0, 2, 1), (-1, -100, -1), (1, INT64_MAX, 2), (-2, 0, -2), (5, 1, 1)]
]


@pytest.mark.parametrize(("s1", "e1", "t1", "s2", "e2", "t2"), CASES)
def test_same_axis_composition_is_exact_on_a_static_axis(s1: int, e1: int, t1: int, s2: int, e2: int, t2: int) -> None:
    text = model_text(
        "(float[9,2] x) => (float[?,2] y)",
        slice_pair(([s1], [e1], [0], [t1]), ([s2], [e2], [0], [t2])),
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 1}
    assert producer_of(model, "y")[1][0] == "x"


def test_partially_overlapping_axes() -> None:
    text = model_text(
        "(float[6,8,5] x) => (float[?,?,?] y)",
        slice_pair(([1, 0], [5, 8], [0, 1]), ([1, 0, 1], [3, 4, 5], [0, 1, 2], [2, 1, 2])),
    )
    model, _ = rewritten(text, PASS)
    # Axis 0: rows 1..4, then every second from index 1: row 2 only; axis 1: 0..7 then 0..3;
    # axis 2 is sliced by the second alone.
    assert merged_params(model) == [[2, 0, 1], [4, 4, 5], [0, 1, 2], [2, 1, 2]]


def test_opset_9_attributes() -> None:
    text = model_text(
        "(float[6,8] x) => (float[3,5] y)",
        """
        t = Slice<starts = [1], ends = [5], axes = [0]>(x)
        y = Slice<starts = [1, 2], ends = [4, 7], axes = [0, 1]>(t)
        """,
        opset=9,
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "y") == ("Slice", ["x"])
    assert attr_of(model, "y", "starts") == [2, 2]
    assert attr_of(model, "y", "ends") == [5, 7]
    assert attr_of(model, "y", "axes") == [0, 1]


def test_chain_collapses_in_one_run() -> None:
    text = model_text(
        "(float[12,6] x) => (float[?,?] y)",
        """
        s0 = Constant<value = int64[1] {1}>()
        e0 = Constant<value = int64[1] {11}>()
        a0 = Constant<value = int64[1] {0}>()
        a1 = Constant<value = int64[1] {1}>()
        t = Slice(x, s0, e0, a0)
        u = Slice(t, s0, e0, a1)
        y = Slice(u, s0, e0, a0)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats == {"merged": 2}
    assert [o for o in ops(model) if o != "Constant"] == ["Slice"]


def test_first_with_another_consumer_stays() -> None:
    text = model_text(
        "(float[6,8] x) => (float[4,3] y, float[4,8] z)",
        slice_pair(([1], [5], [0]), ([2], [8], [1], [2])) + "\nz = Neg(t)",
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "y")[1][0] == "x"
    assert producer_of(model, "t")[0] == "Slice"
    assert producer_of(model, "z") == ("Neg", ["t"])


def test_intermediate_graph_output_stays() -> None:
    text = model_text(
        "(float[6,8] x) => (float[4,8] t, float[4,3] y)",
        slice_pair(([1], [5], [0]), ([2], [8], [1], [2])),
    )
    model, _ = rewritten(text, PASS)
    assert producer_of(model, "t")[1][0] == "x"
    assert producer_of(model, "y")[1][0] == "x"


def test_negative_values_on_a_dynamic_axis_are_left_alone() -> None:
    unchanged(
        model_text("(float[N,4] x) => (float[?,4] y)", slice_pair(([1], [-1], [0]), ([0], [2], [0]))), PASS
    )


def test_negative_axis_with_unknown_rank_is_left_alone() -> None:
    text = model_text(
        "(float[6,8] x) => (float[?,?] y)",
        "r = Relu(x)\n"
        + slice_pair(([1], [5], [-1]), ([1], [3], [0]), source="r").replace("y = ", "u = ")
        + "\ny = Neg(u)",
    )
    unchanged(text, PASS)


def test_non_constant_parameters_are_left_alone() -> None:
    text = model_text(
        "(float[6,8] x, int64[1] k) => (float[?,?] y)",
        """
        e = Constant<value = int64[1] {5}>()
        a = Constant<value = int64[1] {0}>()
        t = Slice(x, k, e, a)
        y = Slice(t, k, e, a)
        """,
    )
    unchanged(text, PASS)


def test_clamp_range_follows_onnx_not_python() -> None:
    # ONNX clamps a too-negative start to 0 even for a negative step; Python would give -1.
    assert list(clamp_range(-10, -100, -1, 5)) == [0]
    assert list(range(5))[slice(-10, None, -1)] == []
    assert list(clamp_range(INT64_MAX, -(2**63), -1, 4)) == [3, 2, 1, 0]
    assert np.arange(4)[slice(1, 3)].tolist() == list(clamp_range(1, 3, 1, 4))


BOUND = st.integers(-12, 12) | st.sampled_from([INT64_MAX, -(2**63)])
STEP = st.integers(-4, 4).filter(bool)


@settings(max_examples=400, deadline=None)
@given(first=st.tuples(BOUND, BOUND, STEP), second=st.tuples(BOUND, BOUND, STEP), size=st.integers(0, 10))
def test_compose_axis_selects_what_the_pair_selects(
    first: tuple[int, int, int], second: tuple[int, int, int], size: int
) -> None:
    outer = clamp_range(*first, size)
    expected = [outer[i] for i in clamp_range(*second, len(outer))]
    static = compose_axis(first, second, size)
    assert static is not None
    assert list(clamp_range(*static, size)) == expected
    # Without the size, a composition is offered only when it holds for every size.
    dynamic = compose_axis(first, second, None)
    if dynamic is not None:
        assert list(clamp_range(*dynamic, size)) == expected
