"""fuse_conv_mul: a per-output-channel constant Mul folds into the Conv weight and bias."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers_fusion import build, fused, histogram, rand, unchanged

from iropt.ir.model import Model
from iropt.passes.fuse_conv_mul import FuseConvMul
from iropt.rewrite import explain


def conv_mul(m: np.ndarray, *, bias: bool, group: int = 1, attrs: str = "") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {"w": rand(rng, 4, 4 // group, 3, 3), "m": m}
    if bias:
        weights["b"] = rand(rng, 4)
    return build(
        f"""
        g (float[2,4,7,7] x) => (float[2,4,?,?] y) {{
            t = Conv <group = {group}{", " + attrs if attrs else ""}> ({"x, w, b" if bias else "x, w"})
            y = Mul (m, t)
        }}""",
        weights,
    )


@pytest.mark.parametrize(
    ("m", "bias", "group", "attrs"),
    [
        (np.float32(-1.25), False, 1, ""),
        (np.linspace(-2, 2, 4, dtype=np.float32).reshape(4, 1, 1), True, 1, "strides = [2, 2]"),
        (np.linspace(0.5, 2, 4, dtype=np.float32).reshape(1, 4, 1, 1), True, 4, "pads = [1, 1, 1, 1]"),
        (np.linspace(0.5, 2, 4, dtype=np.float32).reshape(4, 1, 1), False, 2, "dilations = [2, 2]"),
    ],
    ids=["scalar", "c11-bias-stride", "depthwise", "groups-dilation"],
)
def test_per_channel_mul_folds_into_weights(m: np.ndarray, bias: bool, group: int, attrs: str) -> None:
    after, result = fused(conv_mul(m, bias=bias, group=group, attrs=attrs), "fuse_conv_mul")
    assert result.stats == {"conv_mul": 1}
    assert histogram(after) == {"Conv": 1}
    assert len(after.graph.node[0].input) == (3 if bias else 2)


def test_conv_transpose_with_groups() -> None:
    rng = np.random.default_rng(1)
    proto = build(
        """
        g (float[1,6,3,3] x) => (float[1,4,7,7] y) {
            t = ConvTranspose <group = 2, strides = [2, 2]> (x, w, b)
            y = Mul (t, m)
        }""",
        {
            "w": rand(rng, 6, 2, 3, 3),
            "b": rand(rng, 4),
            "m": np.array([[[0.5]], [[-1]], [[2]], [[3]]], np.float32),
        },
    )
    after, _ = fused(proto, "fuse_conv_mul")
    assert histogram(after) == {"ConvTranspose": 1}


def test_3d_conv() -> None:
    rng = np.random.default_rng(2)
    proto = build(
        """
        g (float[1,2,4,4,4] x) => (float[1,3,2,2,2] y) {
            t = Conv (x, w)
            y = Mul (t, m)
        }""",
        {"w": rand(rng, 3, 2, 3, 3, 3), "m": rand(rng, 3, 1, 1, 1)},
    )
    after, _ = fused(proto, "fuse_conv_mul")
    assert histogram(after) == {"Conv": 1}


def test_spatially_varying_mul_is_refused() -> None:
    proto = conv_mul(np.ones((1, 1, 5, 5), np.float32), bias=True)
    model = Model.from_onnx(proto)
    mul = next(n for n in model.graph.nodes if n.op == "Mul")
    assert explain(FuseConvMul().rules(), mul, model.graph) == [
        "conv_mul: Mul constant of shape [1, 1, 5, 5] is not per-channel for 4 channels (axis 1 of rank 4)"
    ]
    unchanged(proto, "fuse_conv_mul")


def test_non_constant_weight_is_refused() -> None:
    proto = build(
        """
        g (float[1,2,5,5] x, float[3,2,3,3] w) => (float[1,3,3,3] y) {
            t = Conv (x, w)
            y = Mul (t, m)
        }""",
        {"m": np.float32(2)},
    )
    model = Model.from_onnx(proto)
    mul = next(n for n in model.graph.nodes if n.op == "Mul")
    (line,) = explain(FuseConvMul().rules(), mul, model.graph)
    assert line.startswith("conv_mul: Conv.W is not a constant ('w')")
    unchanged(proto, "fuse_conv_mul")
