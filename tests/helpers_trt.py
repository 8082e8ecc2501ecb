"""Small models for the TensorRT back end and the TensorRT Q/DQ lint, built with onnx.helper.

`QdqGraph` assembles explicitly quantized graphs one piece at a time (an activation Q -> DQ pair,
an int8 weight behind a DQ, a float weight behind Q -> DQ), so each lint test states exactly the
one thing that differs from a model TensorRT accepts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from iropt.io.load import load_model
from iropt.ir.model import Model
from iropt.lowering.tensorrt import tensorrt_flavor

OPSET = 17

def _gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# Running an engine (and loading it for the engine inspector) needs an NVIDIA GPU.
GPU = _gpu_available()

requires_tensorrt = pytest.mark.skipif(
    tensorrt_flavor() is None, reason="TensorRT (tensorrt or tensorrt_rtx) not installed"
)


def conv_model(batch: str | int = "batch", name_prefix: str = "") -> Model:
    """x[batch, 3, 8, 8] -> Conv(4 filters, 3x3, pad 1) + bias -> Relu -> y[batch, 4, 8, 8]."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "weight", "bias"], ["conv_out"], pads=[1, 1, 1, 1],
                             name=f"{name_prefix}conv0"),
            helper.make_node("Relu", ["conv_out"], ["y"], name=f"{name_prefix}relu0"),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])],
        [weight, bias],
    )
    return _finish(graph)


def custom_op_model() -> Model:
    """Two nodes of an op domain TensorRT has no importer for."""
    graph = helper.make_graph(
        [
            helper.make_node("Mystery", ["x"], ["h"], domain="example.custom", name="mystery_a"),
            helper.make_node("Enigma", ["h"], ["y"], domain="example.custom", name="enigma_b"),
        ],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return _finish(graph, [helper.make_opsetid("example.custom", 1)], check=False)


def float16_conv_model() -> Model:
    """The conv model with float16 input, weight and output (what strongly typed fp16 needs)."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float16), "weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "weight"], ["y"], pads=[1, 1, 1, 1], name="conv16")],
        "conv16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 8, 8])],
        [weight],
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto, extra_opsets: list[Any] | None = None, check: bool = True) -> Model:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), *(extra_opsets or [])])
    if check:
        onnx.checker.check_model(proto, full_check=True)
    return Model.from_onnx(proto)


def symmetric_weight(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float scale): symmetric int8 weights, per channel along `axis` or per tensor."""
    if axis is None:
        scale = np.asarray(np.abs(weight).max() / 127, dtype=np.float32)
        return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale
    moved = np.moveaxis(np.abs(weight), axis, 0).reshape(weight.shape[axis], -1)
    scale = (moved.max(axis=1) / 127).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8), scale


class QdqGraph:
    """An ONNX graph under construction: initializers, nodes, and the Q/DQ pieces the lint judges."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.rng = np.random.default_rng(0)

    def input(self, name: str, shape: list[Any], dtype: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, shape: list[Any] | None, dtype: int = TensorProto.FLOAT) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None,
             domain: str = "", **attrs: Any) -> str:
        outs = outputs or [f"{name}_out"]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0]

    def qdq(self, x: str, name: str, scale: Any = 0.05, zero_point: Any = None,
            axis: int | None = None, dq_scale: Any = None) -> str:
        """x -> QuantizeLinear -> DequantizeLinear; int8 zero point 0 unless told otherwise."""
        zero = np.asarray(np.int8(0) if zero_point is None else zero_point)
        s = self.const(f"{name}_scale", np.asarray(scale, dtype=np.float32))
        z = self.const(f"{name}_zero", zero)
        attrs = {} if axis is None else {"axis": axis}
        q = self.node("QuantizeLinear", [x, s, z], f"{name}_q", **attrs)
        if dq_scale is not None:
            s = self.const(f"{name}_dq_scale", np.asarray(dq_scale, dtype=np.float32))
        return self.node("DequantizeLinear", [q, s, z], f"{name}_dq", **attrs)

    def int8_weight(self, name: str, weight: np.ndarray, axis: int | None, zero: Any = None,
                    scale_axis: int | None = None) -> str:
        """A constant int8 weight behind DequantizeLinear (scales along `axis`; DQ axis `scale_axis`)."""
        values, scale = symmetric_weight(weight, axis)
        w = self.const(f"{name}_int8", values)
        s = self.const(f"{name}_scale", scale)
        z = self.const(f"{name}_zero", np.zeros(scale.shape, np.int8) if zero is None else zero)
        dq_axis = axis if scale_axis is None else scale_axis
        attrs = {} if dq_axis is None else {"axis": dq_axis}
        return self.node("DequantizeLinear", [w, s, z], f"{name}_dq", **attrs)

    def float_weight_qdq(self, name: str, weight: np.ndarray, axis: int) -> str:
        """A float weight behind QuantizeLinear -> DequantizeLinear (TensorRT quantizes it)."""
        _, scale = symmetric_weight(weight, axis)
        w = self.const(f"{name}_float", weight.astype(np.float32))
        s = self.const(f"{name}_scale", scale)
        z = self.const(f"{name}_zero", np.zeros(scale.shape, np.int8))
        q = self.node("QuantizeLinear", [w, s, z], f"{name}_q", axis=axis)
        return self.node("DequantizeLinear", [q, s, z], f"{name}_dq", axis=axis)

    def weights(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32)

    def model(self, opset: int = OPSET, check: bool = True) -> Model:
        graph = helper.make_graph(self.nodes, "qdq", self.inputs, self.outputs, self.initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        if check:
            onnx.checker.check_model(proto, full_check=True)
        return Model.from_onnx(proto)


def qdq_conv(
    *,
    act_zero: Any = None,
    act_scale: Any = 0.05,
    weight_axis: int = 0,
    dq_axis: int | None = None,
    bias: str = "float",
    float_weight: bool = False,
    batch: str | int = 1,
) -> Model:
    """x -> Q/DQ -> Conv(weight DQ, bias) -> y: TensorRT's form unless an argument says otherwise.

    bias: "float" (a float initializer), "int32" (int32 through DequantizeLinear, ORT's form) or "none".
    """
    g = QdqGraph()
    x = g.input("x", [batch, 3, 8, 8])
    xq = g.qdq(x, "x", scale=act_scale, zero_point=act_zero)
    raw = g.weights((4, 3, 3, 3))
    w = g.float_weight_qdq("w", raw, weight_axis) if float_weight else g.int8_weight("w", raw, weight_axis,
                                                                                     scale_axis=dq_axis)
    inputs = [xq, w]
    if bias == "float":
        inputs.append(g.const("b", g.weights((4,))))
    elif bias == "int32":
        _, w_scale = symmetric_weight(raw, weight_axis)
        b_scale = (np.float32(act_scale) * w_scale).astype(np.float32)
        inputs.append(g.node("DequantizeLinear", [g.const("b_int32", np.arange(4, dtype=np.int32)),
                                                  g.const("b_scale", b_scale),
                                                  g.const("b_zero", np.zeros(4, np.int32))],
                             "b_dq", axis=0))
    g.node("Conv", inputs, "conv", outputs=["y"], pads=[1, 1, 1, 1])
    g.output("y", [batch, 4, 8, 8])
    return g.model()


# --- golden models as engines: fp32, fp16, int8 -----------------------------------------------

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")


def fp16_converter() -> str:
    """What makes the fp16 variants: iropt's convert_fp16 pass where it is registered, else
    onnxconverter-common's convert_float_to_float16."""
    from iropt.infra.registry import PASSES

    return "convert_fp16" if "convert_fp16" in PASSES.names() else "onnxconverter-common"


def golden_variant(name: str, precision: str) -> Model:
    """Golden model `name` as TensorRT builds it in `precision`: as it is (fp32); converted to
    float16, inputs and outputs kept float32 (fp16, see `fp16_converter`); or run through
    golden_models/int8_tensorrt.opt with its inputs as calibration data (int8: Q/DQ)."""
    source = GOLDEN / f"{name}.onnx"
    if precision == "fp32":
        return load_model(source)
    if precision == "fp16" and fp16_converter() == "onnxconverter-common":
        from onnxconverter_common import float16

        return Model.from_onnx(float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True))
    from iropt.app.optimize import RunOptions, optimize

    with tempfile.TemporaryDirectory() as tmp:
        schedule, calibration = str(GOLDEN / "int8_tensorrt.opt"), str(GOLDEN / f"{name}.inputs.npz")
        if precision == "fp16":
            schedule = str(Path(tmp) / "fp16.opt")
            Path(schedule).write_text("convert_fp16\n")
        outcome = optimize(RunOptions(
            schedule=schedule, model=source, output=Path(tmp) / "variant.onnx",
            calibration=calibration, emit=False, verify=False,
        ))
        assert outcome.output is not None
        return load_model(outcome.output)
