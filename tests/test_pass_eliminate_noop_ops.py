"""eliminate_noop_ops: ops that provably return their input disappear, counted per kind."""

from __future__ import annotations

import pytest
from helpers_elim import all_ops, model_text, ops, producer_of, rewritten, unchanged

from iropt.ir.model import Model

PASS = "eliminate_noop_ops"
KEYS = (
    "transpose", "reshape", "cast", "pad", "slice", "expand", "concat", "flatten", "squeeze", "unsqueeze",
    "add", "sub", "mul", "div",
)
MAX = 2**63 - 1


def between(x_type: str, y_type: str, noop: str, consts: str = "", opset: int = 17, infos: str = "") -> str:
    """x -> Relu -> a -> <noop writing b> -> Neg -> y, with `a` annotated as `x_type`."""
    value_infos = f"<{x_type} a{', ' + infos if infos else ''}>"
    return model_text(
        f"({x_type} x) => ({y_type} y) {value_infos}",
        f"{consts}\na = Relu(x)\n{noop}\ny = Neg(b)",
        opset,
    )


def expect_removed(model: Model, stats: dict[str, int], key: str) -> None:
    assert stats == {k: int(k == key) for k in KEYS}
    assert [o for o in ops(model) if o != "Constant"] == ["Relu", "Neg"]
    assert producer_of(model, "y") == ("Neg", ["a"])


NOOPS = [
    # (stats key, x type, noop line, constants, opset)
    ("transpose", "float[2,3,4]", "b = Transpose<perm = [0, 1, 2]>(a)", "", 17),
    ("transpose", "float[5]", "b = Transpose(a)", "", 17),
    ("reshape", "float[2,3,4]", "b = Reshape(a, s)", "s = Constant<value = int64[3] {2, 3, 4}>()", 17),
    ("reshape", "float[2,3,4]", "b = Reshape(a, s)", "s = Constant<value = int64[3] {0, -1, 4}>()", 17),
    ("reshape", "float[N,3]", "b = Reshape(a, s)", "s = Constant<value = int64[2] {0, 3}>()", 17),
    ("reshape", "float[0,3]", "b = Reshape<allowzero = 1>(a, s)", "s = Constant<value = int64[2] {0, 3}>()", 17),
    ("cast", "float[2,3]", "b = Cast<to = 1>(a)", "", 17),
    ("pad", "float[2,3]", "b = Pad(a, p)", "p = Constant<value = int64[4] {0, 0, 0, 0}>()", 17),
    ("pad", "float[2,3]", 'b = Pad<mode = "reflect">(a, p)', "p = Constant<value = int64[4] {0, 0, 0, 0}>()", 17),
    ("pad", "float[2,3]", "b = Pad<pads = [0, 0, 0, 0]>(a)", "", 10),
    ("slice", "float[6,4]", "b = Slice(a, s, e, ax)",
     f"s = Constant<value = int64[2] {{-6, 0}}>()\ne = Constant<value = int64[2] {{6, {MAX}}}>()\n"
     "ax = Constant<value = int64[2] {0, 1}>()", 17),
    ("slice", "float[N,4]", "b = Slice(a, s, e)",
     f"s = Constant<value = int64[1] {{0}}>()\ne = Constant<value = int64[1] {{{MAX}}}>()", 17),
    ("slice", "float[6,4]", "b = Slice<starts = [0], ends = [100], axes = [1]>(a)", "", 9),
    ("expand", "float[2,3]", "b = Expand(a, s)", "s = Constant<value = int64[2] {2, 3}>()", 17),
    ("expand", "float[N,3]", "b = Expand(a, s)", "s = Constant<value = int64[2] {1, 3}>()", 17),
    ("expand", "float[N,3]", "b = Expand(a, s)", "s = Constant<value = int64[1] {1}>()", 17),
    ("concat", "float[2,3]", "b = Concat<axis = 1>(a)", "", 17),
    ("flatten", "float[N,3]", "b = Flatten<axis = 1>(a)", "", 17),
    ("flatten", "float[1,3]", "b = Flatten<axis = 0>(a)", "", 17),
    ("squeeze", "float[2,3]", "b = Squeeze(a)", "", 17),
    ("squeeze", "float[2,3]", "b = Squeeze(a)", "", 11),
    ("unsqueeze", "float[2,3]", "b = Unsqueeze(a, k)", "k = Constant<value = int64[0] {}>()", 17),
    ("add", "float[N,3]", "b = Add(a, z)", "z = Constant<value = float[3] {0, 0, 0}>()", 17),
    ("add", "float[2,3]", "b = Add(z, a)", "z = Constant<value = float {0}>()", 17),
    ("sub", "float[2,3]", "b = Sub(a, z)", "z = Constant<value = float[1] {0}>()", 17),
    ("mul", "float[2,3]", "b = Mul(z, a)", "z = Constant<value = float[2,1] {1, 1}>()", 17),
    ("mul", "float[N,3]", "b = Mul(a, z)", "z = Constant<value = float[1,3] {1, 1, 1}>()", 17),
    ("div", "float[2,3]", "b = Div(a, z)", "z = Constant<value = float {1}>()", 17),
]


@pytest.mark.parametrize(("key", "x_type", "noop", "consts", "opset"), NOOPS)
def test_noop_is_removed(key: str, x_type: str, noop: str, consts: str, opset: int) -> None:
    y_type = x_type
    model, result = rewritten(between(x_type, y_type, noop, consts, opset), PASS, sizes={"N": 4})
    expect_removed(model, result.stats, key)


@pytest.mark.parametrize(("key", "x_type", "noop", "consts", "opset"), NOOPS)
def test_noop_between_graph_input_and_output_stays(
    key: str, x_type: str, noop: str, consts: str, opset: int
) -> None:
    # Removing it would rename the graph input or the graph output: neither may change.
    text = model_text(f"({x_type} a) => ({x_type} b)", f"{consts}\n{noop}", opset)
    unchanged(text, PASS)


def test_noop_writing_a_graph_output_renames_the_producer() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y, float[2,3] z) <float[2,3] a>",
        """
        a = Relu(x)
        y = Transpose<perm = [0, 1]>(a)
        z = Neg(a)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats["transpose"] == 1
    assert ops(model) == ["Relu", "Neg"]
    assert producer_of(model, "y") == ("Relu", ["x"])
    assert producer_of(model, "z") == ("Neg", ["y"])


def test_noop_reading_a_constant_is_bypassed() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y) <float[2,3] c>",
        """
        c = Constant<value = float[2,3] {1, 2, 3, 4, 5, 6}>()
        b = Cast<to = 1>(c)
        y = Add(x, b)
        """,
    )
    model, result = rewritten(text, PASS)
    assert result.stats["cast"] == 1
    assert producer_of(model, "y") == ("Add", ["x", "c"])


def test_noop_writing_a_graph_output_from_a_constant_node_reroutes() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y, float[2,3] z) <float[2,3] c>",
        """
        c = Constant<value = float[2,3] {1, 2, 3, 4, 5, 6}>()
        z = Cast<to = 1>(c)
        y = Add(x, c)
        """,
    )
    # The Constant node could write `z` itself: that is a legitimate reroute.
    model, result = rewritten(text, PASS)
    assert result.stats["cast"] == 1
    assert producer_of(model, "z") == ("Constant", [])


def test_noop_writing_a_graph_output_from_an_initializer_stays() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y, float[2,3] z) <float[2,3] c = {1, 2, 3, 4, 5, 6}>",
        """
        z = Cast<to = 1>(c)
        y = Add(x, c)
        """,
    )
    unchanged(text, PASS)


def test_chain_of_noops_goes_in_one_run() -> None:
    text = model_text(
        "(float[2,3] x) => (float[2,3] y) <float[2,3] a, float[2,3] b, float[2,3] c>",
        """
        s = Constant<value = int64[2] {2, 3}>()
        a = Relu(x)
        b = Transpose<perm = [0, 1]>(a)
        c = Reshape(b, s)
        d = Cast<to = 1>(c)
        y = Neg(d)
        """,
    )
    model, result = rewritten(text, PASS)
    assert (result.stats["transpose"], result.stats["reshape"], result.stats["cast"]) == (1, 1, 1)
    assert producer_of(model, "y") == ("Neg", ["a"])


def test_noop_inside_a_subgraph() -> None:
    text = model_text(
        "(bool c, float[2,3] x) => (float[2,3] y)",
        """
        y = If(c) <
          then_branch = g1 () => (float[2,3] o1) <float[2,3] r1> {
            r1 = Relu(x)
            o1 = Transpose<perm = [0, 1]>(r1)
          },
          else_branch = g2 () => (float[2,3] o2) {
            o2 = Transpose<perm = [0, 1]>(x)
          }
        >
        """,
    )
    model, result = rewritten(text, PASS, sizes={})
    # The then-branch Transpose goes (Relu writes o1); the else-branch one reads an outer
    # tensor and writes the branch output, so it stays.
    assert result.stats["transpose"] == 1
    assert all_ops(model) == ["If", "Relu", "Transpose"]


NOT_NOOPS = [
    # Unknown shapes or dtypes: `a` carries no annotation.
    ("float[2,3,4]", "b = Reshape(a, s)", "s = Constant<value = int64[3] {2, 3, 4}>()", False),
    ("float[2,3]", "b = Cast<to = 1>(a)", "", False),
    ("float[2,3]", "b = Expand(a, s)", "s = Constant<value = int64[2] {2, 3}>()", False),
    ("float[2,3]", "b = Squeeze(a)", "", False),
    ("float[5]", "b = Transpose(a)", "", False),
    # Non-constant shape / pads / axes.
    ("float[2,3]", "b = Reshape(a, s)", "s = Shape(x)", True),
    ("float[2,3]", "b = Pad(a, p)", "z = Shape(x)\np = Concat<axis = 0>(z, z)", True),
    ("float[2,3]", "b = Unsqueeze(a, k)", "k = Shape(x)", True),
    # Ops that do something.
    ("float[2,3]", "b = Transpose<perm = [1, 0]>(a)", "", True),
    ("float[N,3]", "b = Reshape(a, s)", "s = Constant<value = int64[2] {-1, 3}>()", True),
    ("float[2,3]", "d = Cast<to = 11>(a)\nb = Cast<to = 1>(d)", "", True),
    ("float[2,3]", "b = Pad(a, p)", "p = Constant<value = int64[4] {0, 1, 0, 0}>()", True),
    ("float[N,4]", "b = Slice(a, s, e)",
     "s = Constant<value = int64[1] {0}>()\ne = Constant<value = int64[1] {2147483647}>()", True),
    ("float[6,4]", "b = Slice(a, s, e, ax, st)",
     "s = Constant<value = int64[1] {-1}>()\ne = Constant<value = int64[1] {-100}>()\n"
     "ax = Constant<value = int64[1] {0}>()\nst = Constant<value = int64[1] {-1}>()", True),
    ("float[N,3]", "b = Expand(a, s)", "s = Constant<value = int64[2] {4, 3}>()", True),
    ("float[2,3]", "b = Concat<axis = 0>(a, a)", "", True),
    ("float[N,3]", "b = Flatten<axis = 0>(a)", "", True),
    ("float[2,1]", "b = Squeeze(a)", "", True),
    ("float[2,1]", "b = Squeeze(a, k)", "k = Constant<value = int64[0] {}>()", True),
    # Arithmetic: not the identity element, on the wrong side, or a constant that broadcasts
    # the other input to a larger shape (also when that shape is unknown).
    ("float[2,3]", "b = Add(a, z)", "z = Constant<value = float[3] {0, 0, 0.5}>()", True),
    ("float[2,3]", "b = Sub(z, a)", "z = Constant<value = float {0}>()", True),
    ("float[2,3]", "b = Div(z, a)", "z = Constant<value = float {1}>()", True),
    ("float[2,3]", "b = Mul(a, z)", "z = Constant<value = float {0}>()", True),
    ("float[N,1]", "b = Add(a, z)", "z = Constant<value = float[3] {0, 0, 0}>()", True),
    ("float[2,3]", "b = Add(a, z)", "z = Constant<value = float[2,2,3] {0,0,0,0,0,0,0,0,0,0,0,0}>()", True),
    ("float[N,3]", "b = Mul(a, z)", "z = Constant<value = float[3] {1, 1, 1}>()", False),
]


@pytest.mark.parametrize(("x_type", "op", "consts", "annotated"), NOT_NOOPS)
def test_not_provably_a_noop_is_left_alone(x_type: str, op: str, consts: str, annotated: bool) -> None:
    infos = f"<{x_type} a>" if annotated else ""
    text = model_text(
        f"({x_type} x) => (float y) {infos}", f"{consts}\na = Relu(x)\n{op}\ny = ReduceSum<keepdims = 0>(b)"
    )
    unchanged(text, PASS)
