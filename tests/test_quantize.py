"""quantize (static): where QuantizeLinear/DequantizeLinear go, per op type and per format.

Every quantized model passes the full ONNX checker and runs in ONNX Runtime. The `ort` format
has uint8 activations, int8 per-channel weights stored as int8 initializers with a
DequantizeLinear, and int32 biases scaled by input_scale * weight_scale, and ORT fuses it into
its QLinear ops; the `tensorrt` format has only int8 with zero points 0, float biases, and Q/DQ
on both inputs of Conv/Gemm/MatMul and of a residual Add.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers_quant import (
    build,
    checked,
    conv_relu_model,
    cosine,
    dequantized_from,
    mlp_model,
    op_counts,
    ort_optimized_ops,
    producer,
    qdq_params,
    quantize,
    rand,
    run,
    write_feeds,
)
from hypothesis import given
from hypothesis import strategies as st

from iropt.errors import OptionError, UserError
from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.ir.model import Model
from iropt.passes.infer_shapes import InferShapes


def _calibrate_on(tmp_path: Path, model: Model, rows: int = 16, seed: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    """Random calibration inputs for `model`'s inputs (a symbolic batch becomes `rows`)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in model.graph.inputs:
        shape = [d if isinstance(d, int) else rows for d in tensor.shape]
        feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return write_feeds(tmp_path, feeds), feeds


def _quantized(
    tmp_path: Path, model: Model, **options: Any
) -> tuple[Model, Model, dict[str, np.ndarray], dict[str, int]]:
    """(float copy, quantized model, calibration feeds, stats), the model checked by onnx."""
    original = model.copy()
    spec, feeds = _calibrate_on(tmp_path, model)
    result, _ = quantize(model, spec, **options)
    checked(model)
    return original, model, feeds, result.stats


def _consumer_ops(tensor: gs.Tensor) -> list[str]:
    return [node.op for node in tensor.outputs]


def _assert_input_dequantized(node: gs.Node, index: int, *, stored: bool = False) -> gs.Node:
    """Input `index` of `node` comes from a DequantizeLinear (of an initializer when `stored`)."""
    found = dequantized_from(node.inputs[index])
    assert found is not None, f"{node.name} input {index} is not dequantized"
    dq, q = found
    if stored:
        assert q is None and isinstance(dq.inputs[0], gs.Constant), "a weight is stored quantized"
    else:
        assert q is not None, f"{node.name} input {index}: DequantizeLinear without QuantizeLinear"
    return dq


def _output_quantize(tensor: gs.Tensor) -> gs.Node:
    """The QuantizeLinear reading `tensor` (exactly one)."""
    (q,) = [n for n in tensor.outputs if n.op == "QuantizeLinear"]
    return q


def _q_params(q: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(q.inputs[1].values), np.asarray(q.inputs[2].values)


def _close(original: Model, quantized: Model, feeds: dict[str, np.ndarray], minimum: float = 0.999) -> None:
    want = run(original, feeds)
    got = run(quantized, feeds)
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype
        assert cosine(value, got[name]) >= minimum, name


# --- the ort format --------------------------------------------------------------------------


def test_ort_conv_relu_conv(tmp_path: Path) -> None:
    original, model, feeds, stats = _quantized(tmp_path, conv_relu_model(np.random.default_rng(0)))
    assert stats == {
        "quantized_nodes": 2, "quantized_activations": 3, "quantized_weights": 2, "quantized_biases": 2,
        "kept_float": 0, "skipped_slow": 0, "calibration_samples": 16,
    }
    conv1, relu, conv2 = (n for n in model.graph.nodes if n.op in ("Conv", "Relu"))
    # Activation: uint8 Q/DQ on the graph input.
    x_dq = _assert_input_dequantized(conv1, 0)
    x_scale, x_zero = qdq_params(x_dq)
    assert x_zero.dtype == np.uint8
    # Weight: an int8 initializer + DequantizeLinear, per output channel (axis 0), zero point 0.
    w_dq = _assert_input_dequantized(conv1, 1, stored=True)
    w_scale, w_zero = qdq_params(w_dq)
    assert w_dq.inputs[0].values.dtype == np.int8 and w_dq.attrs["axis"] == 0
    assert w_scale.shape == (16,) and w_zero.dtype == np.int8 and not w_zero.any()
    # Bias: int32 with scale = input scale * weight scale, zero point 0.
    b_dq = _assert_input_dequantized(conv1, 2, stored=True)
    b_scale, b_zero = qdq_params(b_dq)
    assert b_dq.inputs[0].values.dtype == np.int32 and b_zero.dtype == np.int32 and not b_zero.any()
    np.testing.assert_array_equal(b_scale, (x_scale.astype(np.float64) * w_scale).astype(np.float32))
    # The Relu reads the Conv directly; the QuantizeLinear comes after it with zero point 0.
    assert producer(relu.inputs[0]) is conv1
    q = _output_quantize(relu.outputs[0])
    assert int(_q_params(q)[1]) == 0
    # The second Conv's output is the graph output, still named y, through Q/DQ.
    assert [t.name for t in model.graph.outputs] == ["y"]
    assert producer(model.graph.outputs[0]).op == "DequantizeLinear"
    assert producer(conv2.inputs[0]).op == "DequantizeLinear"
    _close(original, model, feeds)
    # ONNX Runtime fuses both into QLinearConv and drops the Relu (zero point 0 clamps at 0).
    fused = ort_optimized_ops(model)
    assert fused["QLinearConv"] == 2 and fused["Conv"] == 0 and fused["Relu"] == 0


def test_conv_with_few_input_channels_stays_float_for_ort(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _, model, _, stats = _quantized(tmp_path, conv_relu_model(rng, cin=3))
    first = next(n for n in model.graph.nodes if n.op == "Conv")
    assert isinstance(first.inputs[1], gs.Constant) and first.inputs[1].values.dtype == np.float32
    assert stats["skipped_slow"] == 1 and stats["quantized_nodes"] == 1
    # The relu output still feeds the quantized second Conv through Q/DQ.
    second = [n for n in model.graph.nodes if n.op == "Conv"][1]
    _assert_input_dequantized(second, 0)
    for options in ({"skip_slow_layers": False}, {"format": "tensorrt"}):
        _, _, _, stats = _quantized(tmp_path, conv_relu_model(rng, cin=3), **options)
        assert stats["quantized_nodes"] == 2 and stats["skipped_slow"] == 0


def test_few_input_channels_with_a_large_output_are_quantized_for_ort(tmp_path: Path) -> None:
    # 3 -> 32 channels on 64x64: 131k outputs per image, where QLinearConv beats the float Conv.
    rng = np.random.default_rng(5)
    text = """
g (float[N, 3, 64, 64] x) => (float[N, 8, 64, 64] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r = Relu (c)
  y = Conv (r, w2)
}"""
    model = build(text, {"w1": rand(rng, 32, 3, 3, 3), "b1": rand(rng, 32), "w2": rand(rng, 8, 32, 1, 1)})
    model.graph.inputs[0].shape = [2, 3, 64, 64]  # static shapes: the output size is known
    InferShapes().run(model, PassContext())
    _, quantized, _, stats = _quantized(tmp_path, model)
    assert stats["skipped_slow"] == 0 and stats["quantized_nodes"] == 2
    first = next(n for n in quantized.graph.nodes if n.op == "Conv")
    _assert_input_dequantized(first, 0)


def test_pool_after_a_float_layer_stays_float(tmp_path: Path) -> None:
    # The stem stays float (3 channels, small output); quantizing the MaxPool's input instead of
    # its output would move more data and run ORT's slow NCHW uint8 pool.
    rng = np.random.default_rng(6)
    text = """
g (float[N, 3, 8, 8] x) => (float[N, 8, 4, 4] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w1)
  p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)
  y = Conv (p, w2)
}"""
    model = build(text, {"w1": rand(rng, 16, 3, 3, 3), "w2": rand(rng, 8, 16, 1, 1)})
    original, quantized, feeds, stats = _quantized(tmp_path, model)
    pool = next(n for n in quantized.graph.nodes if n.op == "MaxPool")
    assert producer(pool.inputs[0]).op == "Conv"  # reads the float Conv directly
    _output_quantize(pool.outputs[0])
    assert stats["skipped_slow"] == 1 and stats["quantized_nodes"] == 1
    _close(original, quantized, feeds)


def test_conv_followed_by_hardswish_stays_float_for_ort(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    text = """
g (float[N, 8, 5, 5] x) => (float[N, 8, 5, 5] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w1)
  h = HardSwish (c)
  y = Conv (h, w2)
}"""
    model = build(text, {"w1": rand(rng, 8, 8, 3, 3), "w2": rand(rng, 8, 8, 1, 1)})
    _, model, _, stats = _quantized(tmp_path, model)
    convs = [n for n in model.graph.nodes if n.op == "Conv"]
    assert isinstance(convs[0].inputs[1], gs.Constant) and stats["skipped_slow"] == 1
    _assert_input_dequantized(convs[1], 0)
    _assert_input_dequantized(convs[1], 1, stored=True)


# --- weight axes ----------------------------------------------------------------------------

AXIS_CASES = {
    "conv": ("g (float[N, 8, 5, 5] x) => (float[N, 6, 3, 3] y) { y = Conv (x, w, b) }", (6, 8, 3, 3), 0, 6),
    "conv_transpose": (
        "g (float[N, 8, 4, 4] x) => (float[N, 6, 6, 6] y) { y = ConvTranspose (x, w, b) }", (8, 6, 3, 3), 1, 6,
    ),
    "gemm_transB": ("g (float[N, 8] x) => (float[N, 6] y) { y = Gemm <transB = 1> (x, w, b) }", (6, 8), 0, 6),
    "gemm": ("g (float[N, 8] x) => (float[N, 6] y) { y = Gemm (x, w, b) }", (8, 6), 1, 6),
    "matmul": ("g (float[N, 8] x) => (float[N, 6] y) { y = MatMul (x, w) }", (8, 6), 1, 6),
}


@pytest.mark.parametrize("fmt", ["ort", "tensorrt"])
@pytest.mark.parametrize("case", sorted(AXIS_CASES))
def test_weights_are_quantized_per_output_channel(tmp_path: Path, case: str, fmt: str) -> None:
    text, shape, axis, channels = AXIS_CASES[case]
    rng = np.random.default_rng(3)
    weights = {"w": rand(rng, *shape)}
    if "b)" in text:
        weights["b"] = rand(rng, channels)
    original, model, feeds, stats = _quantized(tmp_path, build(text, weights), format=fmt, skip_slow_layers=False)
    (node,) = [n for n in model.graph.nodes if n.op not in ("QuantizeLinear", "DequantizeLinear")]
    _assert_input_dequantized(node, 0)
    w_dq = _assert_input_dequantized(node, 1, stored=True)
    scale, zero = qdq_params(w_dq)
    assert w_dq.attrs["axis"] == axis and scale.shape == (channels,)
    assert zero.dtype == np.int8 and not zero.any()
    stored = w_dq.inputs[0].values
    # uint8 x int8 (ort) keeps weights to 7 bits: x86 CPUs without VNNI saturate full-range ones.
    qmax = 63 if fmt == "ort" else 127
    assert stored.dtype == np.int8 and stored.shape == shape and np.abs(stored.astype(int)).max() == qmax
    if "b" in weights:
        bias = node.inputs[2]
        if fmt == "ort":
            assert stats["quantized_biases"] == 1
            assert _assert_input_dequantized(node, 2, stored=True).inputs[0].values.dtype == np.int32
        else:
            assert isinstance(bias, gs.Constant) and bias.values.dtype == np.float32
    _close(original, model, feeds)


def test_grouped_conv_transpose_uses_one_weight_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    text = "g (float[N, 8, 4, 4] x) => (float[N, 8, 6, 6] y) { y = ConvTranspose <group = 2> (x, w, b) }"
    original, model, feeds, _ = _quantized(
        tmp_path, build(text, {"w": rand(rng, 8, 4, 3, 3), "b": rand(rng, 8)}), skip_slow_layers=False
    )
    (node,) = [n for n in model.graph.nodes if n.op == "ConvTranspose"]
    w_dq = _assert_input_dequantized(node, 1, stored=True)
    assert "axis" not in w_dq.attrs and qdq_params(w_dq)[0].shape == ()
    b_dq = _assert_input_dequantized(node, 2, stored=True)
    assert qdq_params(b_dq)[0].shape == () and "axis" not in b_dq.attrs
    _close(original, model, feeds)


# --- placement per op type --------------------------------------------------------------------

CONV = "Conv <pads = [1, 1, 1, 1]>"


def _chain(middle: str, out_shape: str = "[N, 8, 6, 6]", extra: dict[str, np.ndarray] | None = None) -> Model:
    """x -> Conv -> Relu -> <middle: r -> m> -> Conv -> y, 8 channels, 6x6."""
    rng = np.random.default_rng(5)
    text = f"""
g (float[N, 8, 6, 6] x) => (float{out_shape} y) {{
  c = {CONV} (x, w1, b1)
  r = Relu (c)
{middle}
  y = {CONV} (m, w2, b2)
}}"""
    weights = {"w1": rand(rng, 8, 8, 3, 3), "b1": rand(rng, 8), "w2": rand(rng, 8, 8, 3, 3), "b2": rand(rng, 8)}
    return build(text, weights | (extra or {}))


SHARED_SCALE = {
    "MaxPool": ("  m = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)", "[N, 8, 3, 3]", None),
    "Resize": (
        '  m = Resize <mode = "nearest"> (r, , scales)', "[N, 8, 12, 12]",
        {"scales": np.array([1, 1, 2, 2], dtype=np.float32)},
    ),
    "Flatten+Reshape": ("  f = Flatten (r)\n  m = Reshape (f, shape)", "[N, 8, 6, 6]",
                        {"shape": np.array([-1, 8, 6, 6], dtype=np.int64)}),
}


@pytest.mark.parametrize("fmt", ["ort", "tensorrt"])
@pytest.mark.parametrize("op", sorted(SHARED_SCALE))
def test_ops_inside_their_input_range_share_its_scale(tmp_path: Path, op: str, fmt: str) -> None:
    middle, shape, extra = SHARED_SCALE[op]
    original, model, feeds, _ = _quantized(tmp_path, _chain(middle, shape, extra), format=fmt)
    relu = next(n for n in model.graph.nodes if n.op == "Relu")
    middle_node = next(n for n in relu.outputs[0].outputs if n.op == "QuantizeLinear")
    in_params = _q_params(middle_node)
    m = next(n for n in model.graph.nodes if n.op in ("MaxPool", "Resize", "Reshape"))
    if m.op != "Reshape":  # the Reshape reads the Flatten, which reads the dequantized Relu
        _assert_input_dequantized(m, 0)
    out_params = _q_params(_output_quantize(m.outputs[0]))
    np.testing.assert_array_equal(in_params[0], out_params[0])
    np.testing.assert_array_equal(in_params[1], out_params[1])
    _close(original, model, feeds)
    if fmt == "ort":
        # Same scale on both sides: ORT drops the Q/DQ pair and runs the op on uint8 data.
        fused = ort_optimized_ops(model)
        assert fused["QLinearConv"] == 2 and fused["DequantizeLinear"] <= 1


@pytest.mark.parametrize(
    ("middle", "qlinear"),
    [
        ("  m = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r)", "QLinearAveragePool"),
        ("  m = Add (r, c2)", "QLinearAdd"),
        ("  m = Mul (r, c2)", "QLinearMul"),
    ],
)
def test_cheap_ops_between_quantized_nodes_are_quantized(tmp_path: Path, middle: str, qlinear: str) -> None:
    rng = np.random.default_rng(6)
    middle = f"  c2 = {CONV} (r, w3)\n{middle}"
    original, model, feeds, _ = _quantized(tmp_path, _chain(middle, extra={"w3": rand(rng, 8, 8, 3, 3)}))
    m = next(n for n in model.graph.nodes if n.op in ("AveragePool", "Add", "Mul"))
    for index in range(len(m.inputs)):
        _assert_input_dequantized(m, index)
    _output_quantize(m.outputs[0])
    _close(original, model, feeds)
    assert ort_optimized_ops(model)[qlinear] == 1


def test_residual_add_quantizes_both_inputs(tmp_path: Path) -> None:
    middle = f"  c2 = {CONV} (r, w3, b3)\n  a = Add (c2, r)\n  m = Relu (a)"
    rng = np.random.default_rng(7)
    for fmt in ("ort", "tensorrt"):
        original, model, feeds, _ = _quantized(
            tmp_path, _chain(middle, extra={"w3": rand(rng, 8, 8, 3, 3), "b3": rand(rng, 8)}), format=fmt
        )
        add = next(n for n in model.graph.nodes if n.op == "Add")
        _assert_input_dequantized(add, 0)
        _assert_input_dequantized(add, 1)
        _close(original, model, feeds)
        if fmt == "ort":
            # The Relu after the Add is absorbed: its output is quantized with zero point 0.
            relu_after = next(n for n in add.outputs[0].outputs)
            assert relu_after.op == "Relu" and int(_q_params(_output_quantize(relu_after.outputs[0]))[1]) == 0
            fused = ort_optimized_ops(model)
            assert fused["QLinearAdd"] == 1 and fused["QLinearConv"] == 3 and fused["Relu"] == 0


def test_global_average_pool_flatten_gemm_head(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    text = f"""
g (float[N, 8, 6, 6] x) => (float[N, 5] y) {{
  c = {CONV} (x, w1, b1)
  r = Relu (c)
  p = GlobalAveragePool (r)
  f = Flatten (p)
  y = Gemm <transB = 1> (f, w2, b2)
}}"""
    weights = {"w1": rand(rng, 8, 8, 3, 3), "b1": rand(rng, 8), "w2": rand(rng, 5, 8), "b2": rand(rng, 5)}
    original, model, feeds, _ = _quantized(tmp_path, build(text, weights))
    pool = next(n for n in model.graph.nodes if n.op == "GlobalAveragePool")
    flatten = next(n for n in model.graph.nodes if n.op == "Flatten")
    gemm = next(n for n in model.graph.nodes if n.op == "Gemm")
    _assert_input_dequantized(pool, 0)
    _assert_input_dequantized(flatten, 0)
    _assert_input_dequantized(gemm, 0)
    # The pool requantizes (its averages span less than its inputs); the Flatten shares its scale.
    np.testing.assert_array_equal(
        _q_params(_output_quantize(pool.outputs[0]))[0], _q_params(_output_quantize(flatten.outputs[0]))[0]
    )
    # The Gemm's output is the graph output and float: QGemm writes float directly.
    assert producer(model.graph.outputs[0]) is gemm
    _close(original, model, feeds)
    fused = ort_optimized_ops(model)
    assert fused["QLinearGlobalAveragePool"] == 1 and fused["QGemm"] == 1 and fused["Gemm"] == 0


@pytest.mark.parametrize("fmt", ["ort", "tensorrt"])
def test_concat_scales_are_shared_for_tensorrt_only(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(9)
    text = f"""
g (float[N, 8, 6, 6] x) => (float[N, 8, 6, 6] y) {{
  a = {CONV} (x, w1)
  b = {CONV} (x, w2)
  r = Relu (b)
  c = Concat <axis = 1> (a, r)
  y = {CONV} (c, w3)
}}"""
    weights = {"w1": rand(rng, 4, 8, 3, 3), "w2": rand(rng, 4, 8, 3, 3, scale=2.0), "w3": rand(rng, 8, 8, 3, 3)}
    original, model, feeds, _ = _quantized(tmp_path, build(text, weights), format=fmt)
    concat = next(n for n in model.graph.nodes if n.op == "Concat")
    scales = [float(qdq_params(_assert_input_dequantized(concat, i))[0]) for i in (0, 1)]
    out_scale = float(_q_params(_output_quantize(concat.outputs[0]))[0]) if fmt == "ort" else None
    if fmt == "tensorrt":
        assert scales[0] == scales[1]
    else:
        assert scales[0] != scales[1] and out_scale is not None
        assert ort_optimized_ops(model)["QLinearConcat"] == 1
    _close(original, model, feeds)


def test_sensitive_ops_stay_float_unless_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    text = """
g (float[N, 4, 8] x) => (float[N, 4, 6] y) {
  n = LayerNormalization <axis = -1> (x, gamma, beta)
  h = MatMul (n, w1)
  y = Softmax <axis = -1> (h)
}"""
    weights = {"gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32), "w1": rand(rng, 8, 6)}
    original, model, feeds, stats = _quantized(tmp_path, build(text, weights))
    norm = next(n for n in model.graph.nodes if n.op == "LayerNormalization")
    softmax = next(n for n in model.graph.nodes if n.op == "Softmax")
    matmul = next(n for n in model.graph.nodes if n.op == "MatMul")
    assert producer(norm.inputs[0]) is None and producer(softmax.inputs[0]) is matmul
    _assert_input_dequantized(matmul, 0)
    assert stats["quantized_nodes"] == 1
    _close(original, model, feeds)
    _, asked, _, stats = _quantized(tmp_path, build(text, weights), op_types=["MatMul", "Softmax"])
    softmax = next(n for n in asked.graph.nodes if n.op == "Softmax")
    _assert_input_dequantized(softmax, 0)
    _output_quantize(softmax.outputs[0])
    assert stats["quantized_nodes"] == 2


# --- the tensorrt format ------------------------------------------------------------------------


def _residual_net() -> Model:
    rng = np.random.default_rng(11)
    text = f"""
g (float[N, 8, 6, 6] x) => (float[N, 5] y) {{
  c1 = {CONV} (x, w1, b1)
  r1 = Relu (c1)
  c2 = {CONV} (r1, w2, b2)
  a = Add (c2, r1)
  r2 = Relu (a)
  p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r2)
  f = Flatten (p)
  h = MatMul (f, w3)
  y = Gemm <transB = 1> (h, w4, b4)
}}"""
    weights = {
        "w1": rand(rng, 8, 8, 3, 3), "b1": rand(rng, 8), "w2": rand(rng, 8, 8, 3, 3), "b2": rand(rng, 8),
        "w3": rand(rng, 72, 16, scale=0.2), "w4": rand(rng, 5, 16), "b4": rand(rng, 5),
    }
    return build(text, weights)


def test_tensorrt_format_is_int8_symmetric_with_float_bias(tmp_path: Path) -> None:
    original, model, feeds, stats = _quantized(tmp_path, _residual_net(), format="tensorrt")
    assert stats["quantized_biases"] == 0
    qdq = [n for n in model.graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero = np.asarray(node.inputs[2].values)
        assert zero.dtype == np.int8 and not zero.any(), node.name
        if node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant):
            assert node.inputs[0].values.dtype == np.int8, node.name
    assert not any(
        isinstance(t, gs.Constant) and t.values.dtype == np.int32 for t in model.graph.tensors().values()
    )
    for node in model.graph.nodes:
        if node.op in ("Conv", "Gemm", "MatMul"):
            _assert_input_dequantized(node, 0)
            _assert_input_dequantized(node, 1, stored=True)
            if len(node.inputs) > 2:
                assert isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.dtype == np.float32
    add = next(n for n in model.graph.nodes if n.op == "Add")
    _assert_input_dequantized(add, 0)
    _assert_input_dequantized(add, 1)
    # No Q/DQ on the final Gemm's output: TensorRT wants Q/DQ on inputs.
    assert producer(model.graph.outputs[0]).op == "Gemm"
    _close(original, model, feeds)


@pytest.mark.parametrize(("target", "dtype"), [(None, np.uint8), ("ort", np.uint8), ("tensorrt", np.int8)])
def test_format_auto_follows_the_target(tmp_path: Path, target: str | None, dtype: type) -> None:
    model = conv_relu_model(np.random.default_rng(12))
    spec, _ = _calibrate_on(tmp_path, model)
    quantize(model, spec, target=target)
    zeros = {np.asarray(n.inputs[2].values).dtype for n in model.graph.nodes if n.op == "QuantizeLinear"}
    assert zeros == {np.dtype(dtype)}


# --- options and refusals ---------------------------------------------------------------------


def test_exclude_nodes_and_op_types(tmp_path: Path) -> None:
    for options in ({"exclude_nodes": ["fc[13]"]}, {"exclude_nodes": ["fc1", "fc3"]}):
        model = _named_mlp()
        _, model, _, stats = _quantized(tmp_path, model, **options)
        quantized = {n.name for n in model.graph.nodes if n.op == "Gemm" and dequantized_from(n.inputs[1])}
        assert quantized == {"fc2"} and stats["quantized_nodes"] == 1
    _, model, _, stats = _quantized(tmp_path, _named_mlp(), exclude_op_types=["Gemm"])
    assert not stats.get("quantized_nodes") and op_counts(model)["QuantizeLinear"] == 0


def _named_mlp() -> Model:
    model, _ = mlp_model(np.random.default_rng(13))
    return model


def test_calibration_option_overrides_the_context(tmp_path: Path) -> None:
    model = conv_relu_model(np.random.default_rng(14))
    spec, _ = _calibrate_on(tmp_path, model, rows=10)
    ctx = PassContext(calibration=str(tmp_path / "missing.npz"))
    result = create_pass("quantize", {"calibration": spec, "batch_size": 3}).run(model, ctx)
    assert result.stats["calibration_samples"] == 10
    model = conv_relu_model(np.random.default_rng(14))
    with pytest.raises(UserError, match=r"missing\.npz"):
        create_pass("quantize", {}).run(model, ctx)


def test_progress_and_max_samples(tmp_path: Path) -> None:
    model = conv_relu_model(np.random.default_rng(15))
    spec, _ = _calibrate_on(tmp_path, model, rows=20)
    seen: list[tuple[str, int]] = []

    def progress(items: Any, description: str, total: int | None = None) -> Any:
        for item in items:
            seen.append((description, next(iter(item.values())).shape[0]))
            yield item

    ctx = PassContext(calibration=spec, progress=progress)
    result = create_pass("quantize", {"batch_size": 4, "max_samples": 10}).run(model, ctx)
    assert result.stats["calibration_samples"] == 10
    assert seen == [("calibrating", 4), ("calibrating", 4), ("calibrating", 2)]


def test_generated_calibration_data_warns(caplog: pytest.LogCaptureFixture) -> None:
    model = conv_relu_model(np.random.default_rng(16))
    with caplog.at_level(logging.WARNING):
        result, _ = quantize(model, None, log=logging.getLogger("iropt.test_quantize"))
    assert result.stats["quantized_nodes"] == 2
    assert "no calibration data" in caplog.text
    checked(model)


def test_old_opset_is_upgraded_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(17)
    model = build("g (float[N, 8] x) => (float[N, 6] y) { y = MatMul (x, w) }", {"w": rand(rng, 8, 6)}, opset=12)
    spec, _ = _calibrate_on(tmp_path, model)
    with caplog.at_level(logging.WARNING, logger="iropt"):
        result, _ = quantize(model, spec)
    assert model.opset == 13 and result.stats["quantized_nodes"] == 1
    assert result.stats["upgraded_from_opset"] == 12
    assert any("upgraded the model from opset 12 to 13" in r.getMessage() for r in caplog.records)
    # Too old for onnx's version converter: said, with what was tried.
    old = build("g (float[N, 8] x) => (float[N, 6] y) { y = MatMul (x, w) }", {"w": rand(rng, 8, 6)}, opset=6)
    with pytest.raises(UserError, match=r"opset >= 11.*opset 6"):
        quantize(old, None, mode="dynamic")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"op_types": ["Conv", "Einsum"]}, "Einsum"),
        ({"percentile": 0.0}, "percentile"),
        ({"bins": 10}, "bins"),
        ({"batch_size": 0}, "batch_size"),
        ({"mode": "dynamic", "op_types": ["Conv"]}, "dynamic"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        create_pass("quantize", options)


def test_nothing_to_quantize_leaves_the_model_alone(tmp_path: Path) -> None:
    model = build("g (float[N, 8] x) => (float[N, 8] y) { r = Relu (x)\n y = Softmax (r) }")
    before = model.to_onnx().SerializeToString()
    result, _ = quantize(model, None)
    assert not result.changed and model.to_onnx().SerializeToString() == before


# --- properties ----------------------------------------------------------------------------------


@given(
    rows=st.integers(1, 4), inner=st.integers(1, 12), outer=st.integers(1, 6),
    spread=st.floats(0.01, 100.0), fmt=st.sampled_from(["ort", "tensorrt"]), seed=st.integers(0, 2**16),
)
def test_quantized_gemm_error_is_bounded_by_its_steps(
    rows: int, inner: int, outer: int, spread: float, fmt: str, seed: int
) -> None:
    """|y' - y| <= sum_k(|x| sw/2 + |w| sx/2 + sx sw/4) + bias step/2, from the model's own scales.

    Calibrated on the very input it runs on, every x is inside its range, so each quantized x
    and w is within half a step of the float value.
    """
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, inner)) * spread).astype(np.float32)
    w, b = rand(rng, outer, inner), rand(rng, outer)
    model = build(
        f"g (float[N, {inner}] x) => (float[N, {outer}] y) {{ y = Gemm <transB = 1> (x, w, b) }}", {"w": w, "b": b}
    )
    with tempfile.TemporaryDirectory() as tmp:
        quantize(model, write_feeds(Path(tmp), {"x": x}), format=fmt)
    gemm = next(n for n in model.graph.nodes if n.op == "Gemm")
    sx = float(qdq_params(dequantized_from(gemm.inputs[0])[0])[0])  # type: ignore[index]
    sw = qdq_params(dequantized_from(gemm.inputs[1])[0])[0].astype(np.float64)  # type: ignore[index]
    bias_step = sx * sw if fmt == "ort" else np.zeros_like(sw)
    bound = np.abs(x) @ np.broadcast_to(sw / 2, (inner, outer)) + (np.abs(w).T * sx / 2).sum(axis=0)
    bound = bound + inner * sx * sw / 4 + bias_step / 2
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    got = run(model, {"x": x})["y"]
    slack = 1e-5 * (np.abs(x) @ np.abs(w).T + np.abs(b)) + 1e-6  # float32 accumulation
    assert np.all(np.abs(got - want) <= bound + slack)


def test_checked_model_keeps_interface(tmp_path: Path) -> None:
    original, model, _, _ = _quantized(tmp_path, _residual_net())
    proto = checked(model)
    before = original.to_onnx()
    assert [i.name for i in proto.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in proto.graph.output] == [o.name for o in before.graph.output]
