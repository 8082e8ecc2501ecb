"""iropt.ir.channels: the weight layout rules, checked against what ONNX Runtime computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from iropt.ir.channels import scale_output_channels, weight_layout
from iropt.verify.runtime import OrtRunner, make_session


def _node(op: str, **attrs: int) -> gs.Node:
    return gs.Node(op, attrs=attrs)


@pytest.mark.parametrize(
    ("op", "attrs", "shape", "out_axis", "outputs", "inputs"),
    [
        ("Conv", {"group": 2}, (6, 2, 3, 3), 0, 6, 4),
        ("ConvTranspose", {"group": 2}, (4, 3, 3, 3), 1, 6, 4),
        ("Gemm", {}, (5, 7), 1, 7, 5),
        ("Gemm", {"transB": 1}, (7, 5), 0, 7, 5),
        ("MatMul", {}, (2, 5, 7), 2, 7, 5),
    ],
)
def test_layouts(op: str, attrs: dict[str, int], shape: tuple[int, ...], out_axis: int, outputs: int, inputs: int) -> None:
    layout = weight_layout(_node(op, **attrs), len(shape))
    assert layout is not None and layout.out_axis == out_axis
    assert layout.output_channels(shape) == outputs and layout.input_channels(shape) == inputs


def test_grouped_conv_transpose_has_no_single_channel_axis() -> None:
    assert weight_layout(_node("ConvTranspose", group=2), 4).per_channel_axis is None  # type: ignore[union-attr]
    assert weight_layout(_node("ConvTranspose"), 4).per_channel_axis == 1  # type: ignore[union-attr]
    assert weight_layout(_node("Relu"), 4) is None


@pytest.mark.parametrize(("op", "group"), [("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2)])
def test_scaling_output_channels_scales_the_outputs(op: str, group: int) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3) if op == "ConvTranspose" else (6, 4 // group, 3, 3)).astype(np.float32)
    layout = weight_layout(_node(op, group=group), 4)
    assert layout is not None
    channels = layout.output_channels(weight.shape)
    scale = rng.uniform(0.5, 2.0, channels)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    plain = _run_conv(op, group, weight, x)
    scaled = _run_conv(op, group, scale_output_channels(layout, weight, scale).astype(np.float32), x)
    np.testing.assert_allclose(scaled, plain * scale.reshape(1, -1, 1, 1), rtol=1e-4, atol=1e-5)


def _run_conv(op: str, group: int, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    node = onnx.helper.make_node(op, ["x", "w"], ["y"], group=group)
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    return OrtRunner(make_session(model, optimization_level="disable")).run({"x": x})["y"]
