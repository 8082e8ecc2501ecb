"""fuse_bn_conv: BatchNormalization folded into Conv, ConvTranspose, Gemm and MatMul, or turned
into Mul + Add on its own; refusals leave the model untouched and say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_fusion import (
    ATOL,
    RTOL,
    bn_params,
    build,
    fused,
    histogram,
    rand,
    run_ort,
    run_pass,
    unchanged,
)

from iropt.ir.model import Model
from iropt.passes.fuse_bn_conv import FuseBnConv
from iropt.rewrite import explain

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
BN = "BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)"


def conv_bn_model(
    rng: np.random.Generator, spatial: int, *, group: int = 1, bias: bool = False, attrs: str = ""
) -> onnx.ModelProto:
    """Conv (4 -> 6 channels, kernel 3, `spatial` axes of size 7) followed by BatchNormalization."""
    weights = {"w": rand(rng, 6, 4 // group, *[3] * spatial), **bn_params(rng, 6)}
    if bias:
        weights["b"] = rand(rng, 6)
    size, unknown = ",".join(["7"] * spatial), ",".join(["?"] * spatial)
    text = f"""
    g (float[2,4,{size}] x) => (float[2,6,{unknown}] y) {{
        t = Conv <group = {group}{", " + attrs if attrs else ""}> ({"x, w, b" if bias else "x, w"})
        y = {BN}
    }}"""
    return build(text, weights)


@pytest.mark.parametrize(
    ("spatial", "group", "bias", "attrs"),
    [
        (2, 1, False, "pads = [1, 1, 1, 1]"),
        (2, 1, True, "strides = [2, 2], dilations = [2, 1]"),
        (2, 2, True, "pads = [0, 1, 2, 1]"),
        (1, 1, True, "strides = [2]"),
        (3, 1, False, "pads = [1, 0, 1, 1, 0, 1]"),
    ],
    ids=["2d", "2d-stride-dilation-bias", "2d-groups", "1d", "3d"],
)
def test_conv_bn_folds_into_conv(spatial: int, group: int, bias: bool, attrs: str) -> None:
    proto = conv_bn_model(np.random.default_rng(1), spatial, group=group, bias=bias, attrs=attrs)
    after, result = fused(proto, "fuse_bn_conv")
    assert result.stats["conv_bn"] == 1
    assert histogram(after) == {"Conv": 1}
    assert len(after.graph.node[0].input) == 3  # a bias was added or rewritten


def test_depthwise_conv_bn() -> None:
    rng = np.random.default_rng(2)
    weights = {"w": rand(rng, 8, 1, 3, 3), "b": rand(rng, 8), **bn_params(rng, 8)}
    proto = build(
        f"""
        g (float[1,8,6,6] x) => (float[1,8,6,6] y) {{
            t = Conv <group = 8, pads = [1, 1, 1, 1]> (x, w, b)
            y = {BN}
        }}""",
        weights,
    )
    after, result = fused(proto, "fuse_bn_conv")
    assert histogram(after) == {"Conv": 1}
    assert result.stats["conv_bn"] == 1


@pytest.mark.parametrize(("group", "bias"), [(1, False), (2, True), (3, True)])
def test_conv_transpose_bn(group: int, bias: bool) -> None:
    rng = np.random.default_rng(3)
    c_in, per_group = 6, 2
    out = per_group * group
    weights = {"w": rand(rng, c_in, per_group, 3, 3), **bn_params(rng, out)}
    if bias:
        weights["b"] = rand(rng, out)
    proto = build(
        f"""
        g (float[2,{c_in},5,5] x) => (float[2,{out},11,11] y) {{
            t = ConvTranspose <group = {group}, strides = [2, 2]> ({"x, w, b" if bias else "x, w"})
            y = {BN}
        }}""",
        weights,
    )
    after, result = fused(proto, "fuse_bn_conv")
    assert result.stats["conv_transpose_bn"] == 1
    assert histogram(after) == {"ConvTranspose": 1}


@pytest.mark.parametrize(
    ("trans_b", "c_shape", "beta"),
    [(0, None, 1.0), (1, (5,), 1.0), (0, (1, 5), 0.5), (1, (3, 5), 2.0), (1, (3, 1), 1.0)],
)
def test_gemm_bn(trans_b: int, c_shape: tuple[int, ...] | None, beta: float) -> None:
    rng = np.random.default_rng(4)
    weights = {"w": rand(rng, *((5, 4) if trans_b else (4, 5))), **bn_params(rng, 5)}
    inputs = "a, w"
    if c_shape is not None:
        weights["c"] = rand(rng, *c_shape)
        inputs += ", c"
    proto = build(
        f"""
        g (float[3,4] a) => (float[3,5] y) {{
            t = Gemm <transB = {trans_b}, alpha = 0.75, beta = {beta}> ({inputs})
            y = {BN}
        }}""",
        weights,
    )
    after, result = fused(proto, "fuse_bn_conv")
    assert result.stats["gemm_bn"] == 1
    assert histogram(after) == {"Gemm": 1}


def test_matmul_bn_becomes_matmul_add_then_gemm() -> None:
    rng = np.random.default_rng(5)
    proto = build(
        f"""
        g (float[N,4] a) => (float[N,5] y) {{
            t = MatMul (a, w)
            y = {BN}
        }}""",
        {"w": rand(rng, 4, 5), **bn_params(rng, 5)},
    )
    after, result = fused(proto, "fuse_bn_conv")
    assert result.stats["matmul_bn"] == 1
    assert histogram(after) == {"MatMul": 1, "Add": 1}
    # The bias is a constant, so fuse_matmul_add can finish the job.
    gemm, second = fused(after, "fuse_matmul_add")
    assert histogram(gemm) == {"Gemm": 1}
    assert second.stats["matmul_add"] == 1


def test_standalone_bn_becomes_mul_add_with_channel_shaped_constants() -> None:
    rng = np.random.default_rng(6)
    proto = build(
        f"""
        g (float[2,3,4,5] t) => (float[2,3,4,5] y) {{
            y = {BN}
        }}""",
        bn_params(rng, 3),
    )
    after, result = fused(proto, "fuse_bn_conv")
    assert result.stats["standalone_bn"] == 1
    assert histogram(after) == {"Mul": 1, "Add": 1}
    shapes = sorted(list(init.dims) for init in after.graph.initializer)
    assert shapes == [[3, 1, 1], [3, 1, 1]]
    assert after.graph.node[-1].output[0] == "y"


def test_standalone_is_an_option() -> None:
    proto = build(
        f"""
        g (float[2,3,4] t) => (float[2,3,4] y) {{
            y = {BN}
        }}""",
        bn_params(np.random.default_rng(7), 3),
    )
    result = unchanged(proto, "fuse_bn_conv", {"standalone": False})
    assert result.stats == {"conv_bn": 0, "conv_transpose_bn": 0, "gemm_bn": 0, "matmul_bn": 0}


def test_batched_matmul_is_not_folded_but_goes_standalone() -> None:
    # For a 3-D MatMul output, BN's channel axis 1 is not the weight's column axis.
    rng = np.random.default_rng(8)
    proto = build(
        f"""
        g (float[2,3,4] a) => (float[2,3,5] y) {{
            t = MatMul (a, w)
            y = {BN}
        }}""",
        {"w": rand(rng, 4, 5), **bn_params(rng, 3)},
    )
    model = Model.from_onnx(proto)
    bn = next(n for n in model.graph.nodes if n.op == "BatchNormalization")
    lines = explain(FuseBnConv().rules(), bn, model.graph)
    assert "matmul_bn: MatMul.A has rank 3; need rank 2" in lines
    after, result = fused(proto, "fuse_bn_conv")
    assert result.stats["matmul_bn"] == 0 and result.stats["standalone_bn"] == 1
    assert histogram(after) == {"MatMul": 1, "Mul": 1, "Add": 1}


def test_conv_with_two_consumers_is_not_folded() -> None:
    rng = np.random.default_rng(9)
    proto = build(
        f"""
        g (float[1,2,5,5] x) => (float[1,3,3,3] y, float[1,3,3,3] z) {{
            t = Conv (x, w)
            y = {BN}
            z = Relu (t)
        }}""",
        {"w": rand(rng, 3, 2, 3, 3), **bn_params(rng, 3)},
    )
    model = Model.from_onnx(proto)
    bn = next(n for n in model.graph.nodes if n.op == "BatchNormalization")
    assert "conv_bn: Conv output 't' has 2 consumers" in explain(FuseBnConv().rules(), bn, model.graph)
    unchanged(proto, "fuse_bn_conv", {"standalone": False})


def test_conv_output_that_is_a_graph_output_is_not_folded() -> None:
    rng = np.random.default_rng(10)
    proto = build(
        f"""
        g (float[1,2,5,5] x) => (float[1,3,3,3] y, float[1,3,3,3] t) {{
            t = Conv (x, w)
            y = {BN}
        }}""",
        {"w": rand(rng, 3, 2, 3, 3), **bn_params(rng, 3)},
    )
    model = Model.from_onnx(proto)
    bn = next(n for n in model.graph.nodes if n.op == "BatchNormalization")
    assert "conv_bn: Conv output 't' is a graph output" in explain(FuseBnConv().rules(), bn, model.graph)
    unchanged(proto, "fuse_bn_conv", {"standalone": False})


def test_non_constant_scale_is_refused_with_its_reason() -> None:
    rng = np.random.default_rng(11)
    params = bn_params(rng, 3)
    del params["bn_scale"]
    proto = build(
        f"""
        g (float[1,2,5,5] x, float[3] bn_scale) => (float[1,3,3,3] y) {{
            t = Conv (x, w)
            y = {BN}
        }}""",
        {"w": rand(rng, 3, 2, 3, 3), **params},
    )
    model = Model.from_onnx(proto)
    bn = next(n for n in model.graph.nodes if n.op == "BatchNormalization")
    lines = explain(FuseBnConv().rules(), bn, model.graph)
    assert "conv_bn: BatchNormalization.scale is not a constant ('bn_scale')" in lines
    assert "standalone_bn: BatchNormalization.scale is not a constant ('bn_scale')" in lines
    assert lines[1].startswith("conv_transpose_bn: BatchNormalization.X comes from Conv, not ConvTranspose")
    unchanged(proto, "fuse_bn_conv")


def test_training_mode_is_refused() -> None:
    rng = np.random.default_rng(12)
    proto = build(
        """
        g (float[2,2,5,5] x) => (float[2,3,3,3] y, float[3] rm, float[3] rv) {
            t = Conv (x, w)
            y, rm, rv = BatchNormalization <training_mode = 1> (t, bn_scale, bn_bias, bn_mean, bn_var)
        }""",
        {"w": rand(rng, 3, 2, 3, 3), **bn_params(rng, 3)},
    )
    model = Model.from_onnx(proto)
    bn = next(n for n in model.graph.nodes if n.op == "BatchNormalization")
    lines = explain(FuseBnConv().rules(), bn, model.graph)
    assert "conv_bn: BatchNormalization.training_mode is 1: must be 0 (inference mode)" in lines
    unchanged(proto, "fuse_bn_conv")


def test_training_outputs_without_the_attribute_are_refused() -> None:
    # Opset 9-13 has no training_mode: extra outputs are what mark training.
    rng = np.random.default_rng(13)
    proto = build(
        """
        g (float[2,2,5,5] x) => (float[2,3,3,3] y, float[3] rm, float[3] rv, float[3] sm, float[3] sv) {
            t = Conv (x, w)
            y, rm, rv, sm, sv = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
        }""",
        {"w": rand(rng, 3, 2, 3, 3), **bn_params(rng, 3)},
        opset=12,
    )
    model = Model.from_onnx(proto)
    bn = next(n for n in model.graph.nodes if n.op == "BatchNormalization")
    assert "conv_bn: BatchNormalization has 5 outputs (training mode)" in explain(
        FuseBnConv().rules(), bn, model.graph, opset=12
    )
    unchanged(proto, "fuse_bn_conv")


def test_opset_12_inference_bn_folds() -> None:
    rng = np.random.default_rng(14)
    proto = build(
        f"""
        g (float[1,2,5,5] x) => (float[1,3,3,3] y) {{
            t = Conv (x, w)
            y = {BN}
        }}""",
        {"w": rand(rng, 3, 2, 3, 3), **bn_params(rng, 3)},
        opset=12,
    )
    after, _ = fused(proto, "fuse_bn_conv")
    assert histogram(after) == {"Conv": 1}


def test_shared_weight_is_not_modified_in_place() -> None:
    rng = np.random.default_rng(15)
    weights = {"w": rand(rng, 3, 2, 3, 3), **bn_params(rng, 3, "p"), **bn_params(rng, 3, "q")}
    proto = build(
        """
        g (float[1,2,5,5] x) => (float[1,3,3,3] y, float[1,3,3,3] z, float[1,3,3,3] u) {
            t = Conv (x, w)
            y = BatchNormalization (t, p_scale, p_bias, p_mean, p_var)
            s = Conv (x, w)
            z = BatchNormalization (s, q_scale, q_bias, q_mean, q_var)
            u = Conv (x, w)
        }""",
        weights,
    )
    after, result = fused(proto, "fuse_bn_conv")
    assert result.stats["conv_bn"] == 2
    assert histogram(after) == {"Conv": 3}
    assert len({node.input[1] for node in after.graph.node}) == 3


def test_conv_bn_inside_an_if_branch() -> None:
    rng = np.random.default_rng(16)
    proto = build(
        """
        g (bool c, float[1,2,5,5] x) => (float[1,3,3,3] y) {
            y = If (c) <
                then_branch = then_g () => (float[1,3,3,3] yt) {
                    t = Conv (x, w)
                    yt = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
                },
                else_branch = else_g () => (float[1,3,3,3] ye) {
                    ye = Conv (x, w)
                }
            >
        }""",
        {"w": rand(rng, 3, 2, 3, 3), **bn_params(rng, 3)},
    )
    x = rand(rng, 1, 2, 5, 5)
    for branch in (True, False):
        after, result = fused(proto, "fuse_bn_conv", feeds={"c": np.array(branch), "x": x})
    assert result.stats["conv_bn"] == 1
    assert histogram(after) == {"If": 1, "Conv": 2}


def test_golden_conv_bn() -> None:
    proto = onnx.load(str(GOLDEN / "conv_bn.onnx"))
    with np.load(GOLDEN / "conv_bn.inputs.npz") as data:
        inputs = {k: data[k] for k in data.files}
    with np.load(GOLDEN / "conv_bn.outputs.npz") as data:
        outputs = {k: data[k] for k in data.files}
    after, result = run_pass(proto, "fuse_bn_conv")
    onnx.checker.check_model(after, full_check=True)
    assert result.stats == {
        "conv_bn": 1,
        "conv_transpose_bn": 1,
        "gemm_bn": 1,
        "matmul_bn": 0,
        "standalone_bn": 0,
    }
    assert "BatchNormalization" not in histogram(after)
    actual = run_ort(after, inputs)
    assert actual.keys() == outputs.keys()
    for name, value in outputs.items():
        np.testing.assert_allclose(actual[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
