"""fuse_conv_add: a per-output-channel constant Add folds into the Conv bias; anything else stays."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers_fusion import build, fused, histogram, rand, unchanged

from iropt.ir.model import Model
from iropt.passes.fuse_conv_add import FuseConvAdd
from iropt.rewrite import explain


def conv_add(c: np.ndarray, *, bias: bool, swapped: bool = False, group: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {"w": rand(rng, 4, 2 // group, 3, 3), "c": c}
    if bias:
        weights["b"] = rand(rng, 4)
    operands = "c, t" if swapped else "t, c"
    return build(
        f"""
        g (float[2,2,6,6] x) => (float[2,4,4,4] y) {{
            t = Conv <group = {group}, dilations = [1, 1]> ({"x, w, b" if bias else "x, w"})
            y = Add ({operands})
        }}""",
        weights,
    )


PER_CHANNEL = {
    "scalar": np.float32(0.75),
    "one": np.array([0.5], np.float32),
    "c11": np.arange(4, dtype=np.float32).reshape(4, 1, 1),
    "1c11": np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1) - 1.5,
    "111": np.full((1, 1, 1), 2.0, np.float32),
}


@pytest.mark.parametrize("shape", list(PER_CHANNEL))
@pytest.mark.parametrize("bias", [False, True])
def test_per_channel_add_folds_into_bias(shape: str, bias: bool) -> None:
    after, result = fused(conv_add(PER_CHANNEL[shape], bias=bias), "fuse_conv_add")
    assert result.stats == {"conv_add": 1}
    assert histogram(after) == {"Conv": 1}
    assert after.graph.node[0].output[0] == "y"


def test_constant_on_the_left_and_grouped_conv() -> None:
    after, _ = fused(conv_add(PER_CHANNEL["c11"], bias=True, swapped=True, group=2), "fuse_conv_add")
    assert histogram(after) == {"Conv": 1}


def test_conv_transpose_add() -> None:
    rng = np.random.default_rng(1)
    proto = build(
        """
        g (float[1,4,3,3] x) => (float[1,6,5,5] y) {
            t = ConvTranspose <group = 2> (x, w)
            y = Add (t, c)
        }""",
        {"w": rand(rng, 4, 3, 3, 3), "c": rand(rng, 6, 1, 1)},
    )
    after, _ = fused(proto, "fuse_conv_add")
    assert histogram(after) == {"ConvTranspose": 1}


def test_chain_of_adds_folds_completely() -> None:
    rng = np.random.default_rng(2)
    proto = build(
        """
        g (float[1,2,4] x) => (float[1,3,2] y) {
            t = Conv (x, w)
            u = Add (t, c1)
            y = Add (u, c2)
        }""",
        {"w": rand(rng, 3, 2, 3), "c1": rand(rng, 3, 1), "c2": np.float32(1.5)},
    )
    after, result = fused(proto, "fuse_conv_add")
    assert result.stats == {"conv_add": 2}
    assert histogram(after) == {"Conv": 1}


@pytest.mark.parametrize(
    "c",
    [
        np.ones((4, 4, 4), np.float32),  # varies along the spatial axes
        np.ones((4,), np.float32),  # broadcasts along the last (spatial) axis
        np.ones((2, 4, 1, 1), np.float32),  # would change the batch axis
        np.ones((1, 1, 4, 4, 4), np.float32),  # more axes than the output
    ],
    ids=["spatial", "last-axis", "batch", "rank5"],
)
def test_non_per_channel_constant_is_refused(c: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    out_shape = ",".join("?" * max(4, c.ndim))
    proto = build(
        f"""
        g (float[2,2,6,6] x) => (float[{out_shape}] y) {{
            t = Conv (x, w)
            y = Add (t, c)
        }}""",
        {"w": rand(rng, 4, 2, 3, 3), "c": c},
    )
    model = Model.from_onnx(proto)
    add = next(n for n in model.graph.nodes if n.op == "Add")
    (line,) = explain(FuseConvAdd().rules(), add, model.graph)
    if c.ndim > 4:
        expected = "has more axes than the rank-4 output"
    else:
        expected = "is not per-channel for 4 channels (axis 1 of rank 4)"
    assert line == f"conv_add: Add constant of shape {list(c.shape)} {expected}"
    unchanged(proto, "fuse_conv_add")


def test_variable_operand_and_shared_conv_output_are_refused() -> None:
    rng = np.random.default_rng(4)
    proto = build(
        """
        g (float[1,2,5,5] x, float[4,1,1] c) => (float[1,4,3,3] y, float[1,4,3,3] z, float[1,4,3,3] r) {
            t = Conv (x, w)
            y = Add (t, c)
            s = Conv (x, w)
            z = Add (s, k)
            r = Relu (s)
        }""",
        {"w": rand(rng, 4, 2, 3, 3), "k": rand(rng, 4, 1, 1)},
    )
    model = Model.from_onnx(proto)
    first, second = (n for n in model.graph.nodes if n.op == "Add")
    # Add is commutative: both operand orders were tried, and both reasons are given.
    assert explain(FuseConvAdd().rules(), first, model.graph) == [
        "conv_add: Add.B is not a constant ('c'); swapped: Add.A is not a constant ('t')"
    ]
    assert explain(FuseConvAdd().rules(), second, model.graph) == [
        "conv_add: Conv output 's' has 2 consumers; swapped: Add.A is not a constant ('s')"
    ]
    unchanged(proto, "fuse_conv_add")
