"""fuse_pad: a zero constant Pad folds into Conv / AveragePool pads, a -inf Pad into MaxPool pads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers_fusion import build, fused, histogram, rand, unchanged

from iropt.ir.model import Model
from iropt.passes.fuse_pad import FusePad
from iropt.rewrite import explain


def pads(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def conv_after_pad(
    pad_values: np.ndarray,
    *,
    conv_attrs: str = "pads = [1, 0, 1, 2]",
    value: float | None = None,
    mode: str = "constant",
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {"w": rand(rng, 3, 2, 3, 3), "p": pad_values}
    pad_inputs = "x, p"
    if value is not None:
        weights["v"] = np.array(value, np.float32)
        pad_inputs += ", v"
    return build(
        f"""
        g (float[1,2,6,6] x) => (float[?,?,?,?] y) {{
            t = Pad <mode = "{mode}"> ({pad_inputs})
            y = Conv <{conv_attrs}> (t, w)
        }}""",
        weights,
    )


def target_pads(proto: onnx.ModelProto) -> list[int]:
    (node,) = proto.graph.node
    return next(list(a.ints) for a in node.attribute if a.name == "pads")


def test_pad_folds_into_conv_pads() -> None:
    after, result = fused(conv_after_pad(pads(0, 0, 2, 1, 0, 0, 0, 3)), "fuse_pad")
    assert result.stats == {"pad_conv": 1, "pad_average_pool": 0, "pad_max_pool": 0}
    assert histogram(after) == {"Conv": 1}
    assert target_pads(after) == [1 + 2, 0 + 1, 1 + 0, 2 + 3]


def test_explicit_zero_value_stride_and_dilation() -> None:
    proto = conv_after_pad(
        pads(0, 0, 1, 1, 0, 0, 2, 2), conv_attrs="strides = [2, 1], dilations = [1, 2]", value=0.0
    )
    after, _ = fused(proto, "fuse_pad")
    assert target_pads(after) == [1, 1, 2, 2]


def test_1d_conv_and_opset_10_attribute_form() -> None:
    rng = np.random.default_rng(1)
    proto = build(
        """
        g (float[1,2,9] x) => (float[1,3,?] y) {
            t = Pad <pads = [0, 0, 2, 0, 0, 1]> (x)
            y = Conv (t, w)
        }""",
        {"w": rand(rng, 3, 2, 3)},
        opset=10,
    )
    after, result = fused(proto, "fuse_pad")
    assert result.stats["pad_conv"] == 1
    assert target_pads(after) == [2, 1]


def test_opset_18_axes_input() -> None:
    rng = np.random.default_rng(2)
    proto = build(
        """
        g (float[1,2,5,5] x) => (float[1,3,?,?] y) {
            t = Pad (x, p, , axes)
            y = Conv (t, w)
        }""",
        {"w": rand(rng, 3, 2, 3, 3), "p": pads(1, 2, 3, 0), "axes": np.array([-1, 2], np.int64)},
        opset=18,
    )
    after, _ = fused(proto, "fuse_pad")
    # axes [-1, 2]: W gets begin 1 / end 3, H gets begin 2 / end 0.
    assert target_pads(after) == [2, 1, 0, 3]


def pool_after_pad(op: str, value: float, attrs: str, outputs: str = "y") -> onnx.ModelProto:
    return build(
        f"""
        g (float[1,2,6,6] x) => (float[?,?,?,?] y) {{
            t = Pad (x, p, v)
            {outputs} = {op} <kernel_shape = [3, 3]{", " + attrs if attrs else ""}> (t)
        }}""",
        {"p": pads(0, 0, 1, 2, 0, 0, 1, 0), "v": np.array(value, np.float32)},
    )


def test_average_pool_counting_the_padding() -> None:
    after, result = fused(
        pool_after_pad("AveragePool", 0.0, "count_include_pad = 1, strides = [2, 2]"), "fuse_pad"
    )
    assert result.stats["pad_average_pool"] == 1
    assert histogram(after) == {"AveragePool": 1}
    assert target_pads(after) == [1, 2, 1, 0]


def test_max_pool_with_minus_infinity() -> None:
    after, result = fused(pool_after_pad("MaxPool", -np.inf, "pads = [1, 0, 1, 1]"), "fuse_pad")
    assert result.stats["pad_max_pool"] == 1
    assert target_pads(after) == [2, 2, 2, 1]


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        (
            pool_after_pad("AveragePool", 0.0, ""),
            "pad_average_pool: AveragePool.count_include_pad is 0: must be 1 (padding counted in the average)",
        ),
        (
            pool_after_pad("AveragePool", 0.0, "count_include_pad = 1, ceil_mode = 1, strides = [2, 2]"),
            "pad_average_pool: AveragePool.ceil_mode is 1: must be 0",
        ),
        (pool_after_pad("MaxPool", 0.0, ""), "pad_max_pool: Pad value is 0.0; MaxPool pads with -inf"),
        (
            pool_after_pad("MaxPool", -np.inf, "pads = [0, 1, 0, 0]"),
            "pad_max_pool: MaxPool pads would reach the kernel size [3, 3]",
        ),
        (
            pool_after_pad("MaxPool", -np.inf, "", outputs="y, i"),
            "pad_max_pool: MaxPool has a second output (Indices would index the unpadded input)",
        ),
        (
            conv_after_pad(pads(0, 0, 1, 1, 0, 0, 1, 1), value=0.5),
            "pad_conv: Pad value is 0.5; Conv pads with 0.0",
        ),
        (conv_after_pad(pads(0, 1, 1, 1, 0, 0, 1, 1)), "pad_conv: Pad pads the batch or channel axis"),
        (conv_after_pad(pads(0, 0, -1, 1, 0, 0, 1, 1)), "pad_conv: Pad has negative pads (it crops)"),
        (
            conv_after_pad(pads(0, 0, 1, 1, 0, 0, 1, 1), mode="reflect"),
            "pad_conv: Pad.mode is 'reflect', expected 'constant'",
        ),
        (
            conv_after_pad(pads(0, 0, 1, 1, 0, 0, 1, 1), conv_attrs='auto_pad = "SAME_UPPER"'),
            "pad_conv: Conv.auto_pad is 'SAME_UPPER': must be NOTSET (explicit pads)",
        ),
    ],
    ids=[
        "avgpool-excludes-pad",
        "avgpool-ceil",
        "maxpool-zero",
        "maxpool-kernel",
        "maxpool-indices",
        "value",
        "channel",
        "negative",
        "reflect",
        "auto-pad",
    ],
)
def test_refusals(proto: onnx.ModelProto, reason: str) -> None:
    model = Model.from_onnx(proto)
    target = model.graph.nodes[-1]
    assert reason in explain(FusePad().rules(), target, model.graph)
    unchanged(proto, "fuse_pad")


def test_pad_with_two_consumers_is_refused() -> None:
    rng = np.random.default_rng(3)
    proto = build(
        """
        g (float[1,2,6,6] x) => (float[1,3,6,6] y, float[1,2,8,8] t) {
            t = Pad (x, p)
            y = Conv (t, w)
        }""",
        {"w": rand(rng, 3, 2, 3, 3), "p": pads(0, 0, 1, 1, 0, 0, 1, 1)},
    )
    model = Model.from_onnx(proto)
    conv = model.graph.nodes[-1]
    assert "pad_conv: Pad output 't' is a graph output" in explain(FusePad().rules(), conv, model.graph)
    unchanged(proto, "fuse_pad")
