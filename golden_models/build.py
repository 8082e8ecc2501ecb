"""Rebuild the golden models: small ONNX graphs with fixed inputs and expected outputs.

Run ``python golden_models/build.py`` (or import this file and call :func:`build_all`). For each
model NAME it writes, next to this script unless ``--out`` says otherwise:

- ``NAME.onnx``         the model (opset 17, IR version 8, dynamic batch dimension "batch"),
- ``NAME.inputs.npz``   fixed float32 inputs keyed by graph input name,
- ``NAME.outputs.npz``  outputs from ONNX Runtime (CPU, graph optimizations off) on those inputs,

plus ``manifest.json`` describing every model. Everything is seeded, and the ``.npz`` archives are
written with fixed zip timestamps, so two runs produce identical bytes.

All models except ``digits_cnn`` are built with ``onnx.helper`` and numpy only. ``digits_cnn`` is a
small CNN trained with torch on scikit-learn's bundled ``load_digits()`` data (no network needed);
without torch or scikit-learn that one model fails with a message and the others are still built.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17 (onnx.helper.VERSION_TABLE)
BATCH = "batch"
HERE = Path(__file__).resolve().parent

Shape = Sequence[int | str | None]
Arrays = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Small graph-building helpers
# --------------------------------------------------------------------------------------------


class GraphBuilder:
    """Collects nodes and initializers; every node gets a readable name, its output ``NAME_out``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray | float | int | Sequence[int]) -> str:
        """Add an initializer (floats become float32, python ints int64) and return its name."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(
        self, op_type: str, inputs: Sequence[str], name: str, out: str | None = None, **attrs: Any
    ) -> str:
        """Add a single-output node and return its output (``NAME_out`` unless ``out`` is given)."""
        return self.op_multi(op_type, inputs, name, [out or f"{name}_out"], **attrs)[0]

    def op_multi(
        self, op_type: str, inputs: Sequence[str], name: str, outputs: Sequence[str], **attrs: Any
    ) -> list[str]:
        """Add a node with explicitly named outputs."""
        self.nodes.append(
            helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs)
        )
        return list(outputs)

    # -- random parameters -------------------------------------------------------------------

    def he(self, name: str, shape: Sequence[int], fan_in: int) -> str:
        """He-normal weights, so activations keep a scale near 1 through ReLU stacks."""
        w = self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return self.const(name, w.astype(np.float32))

    def small(self, name: str, shape: Sequence[int], scale: float = 0.1) -> str:
        """Small uniform values (biases)."""
        return self.const(name, self.rng.uniform(-scale, scale, shape).astype(np.float32))

    # -- layers ------------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        name: str,
        c_in: int,
        c_out: int,
        k: int = 3,
        stride: int = 1,
        group: int = 1,
        bias: bool = True,
    ) -> str:
        """Conv with 'same'-style symmetric padding for odd kernels."""
        w = self.he(f"{name}.weight", [c_out, c_in // group, k, k], fan_in=(c_in // group) * k * k)
        inputs = [x, w] + ([self.small(f"{name}.bias", [c_out])] if bias else [])
        p = k // 2
        return self.op(
            "Conv",
            inputs,
            name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[p, p, p, p],
            group=group,
            dilations=[1, 1],
        )

    def conv_transpose(
        self, x: str, name: str, c_in: int, c_out: int, k: int = 2, stride: int = 2
    ) -> str:
        """ConvTranspose (weight layout [C_in, C_out, k, k]) that upsamples by ``stride``."""
        w = self.he(f"{name}.weight", [c_in, c_out, k, k], fan_in=c_in * k * k // (stride * stride))
        b = self.small(f"{name}.bias", [c_out])
        return self.op(
            "ConvTranspose", [x, w, b], name, kernel_shape=[k, k], strides=[stride, stride]
        )

    def batch_norm(self, x: str, name: str, channels: int, out: str | None = None) -> str:
        """Inference-form BatchNormalization with non-trivial scale, bias, mean and variance."""
        rng = self.rng
        params = [
            self.const(f"{name}.scale", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
            self.const(f"{name}.bias", rng.uniform(-0.3, 0.3, channels).astype(np.float32)),
            self.const(f"{name}.mean", rng.uniform(-0.3, 0.3, channels).astype(np.float32)),
            self.const(f"{name}.var", rng.uniform(0.5, 2.0, channels).astype(np.float32)),
        ]
        return self.op("BatchNormalization", [x, *params], name, out, epsilon=1e-5)

    def gemm(self, x: str, name: str, n_in: int, n_out: int) -> str:
        """Gemm with a torch-Linear weight layout ([out, in], transB=1)."""
        w = self.he(f"{name}.weight", [n_out, n_in], fan_in=n_in)
        b = self.small(f"{name}.bias", [n_out])
        return self.op("Gemm", [x, w, b], name, transB=1)

    def linear(self, x: str, name: str, n_in: int, n_out: int, gain: float = 2.0) -> str:
        """MatMul + Add with a [in, out] weight (the pattern a MatMul+Add->Gemm fusion targets)."""
        w = self.const(
            f"{name}.weight",
            (self.rng.standard_normal([n_in, n_out]) * np.sqrt(gain / n_in)).astype(np.float32),
        )
        b = self.small(f"{name}.bias", [n_out])
        y = self.op("MatMul", [x, w], f"{name}_matmul")
        return self.op("Add", [y, b], f"{name}_add")

    def graph(
        self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.GraphProto:
        """Assemble the collected nodes and initializers into a graph."""
        return helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)


def tensor(name: str, shape: Shape | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A typed value-info; ``shape=None`` leaves the shape unspecified."""
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    """Wrap a graph into an opset-17, IR-8 model with a fixed producer."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="iropt-golden",
        producer_version="1",
        ir_version=IR_VERSION,
    )
    model.doc_string = doc
    return model


# --------------------------------------------------------------------------------------------
# Model descriptions
# --------------------------------------------------------------------------------------------


@dataclass
class Golden:
    """One golden model: the graph, its fixed inputs, and extra arrays files to store next to it."""

    name: str
    description: str
    features: list[str]
    model: onnx.ModelProto
    inputs: Arrays
    extra_files: dict[str, Arrays] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def build_conv_bn() -> Golden:
    """Unfused BatchNormalization after Conv (no bias), ConvTranspose and Gemm."""
    b = GraphBuilder(np.random.default_rng(1001))
    x = b.conv("input", "conv", 3, 8, k=3, bias=False)
    x = b.op("Relu", [b.batch_norm(x, "conv_bn", 8)], "conv_relu")
    x = b.conv_transpose(x, "deconv", 8, 4)  # 8x8 -> 16x16
    x = b.op("Relu", [b.batch_norm(x, "deconv_bn", 4)], "deconv_relu")
    x = b.op("Flatten", [x], "flatten", axis=1)
    x = b.gemm(x, "fc", 4 * 16 * 16, 10)
    b.batch_norm(x, "fc_bn", 10, out="output")
    graph = b.graph("conv_bn", [tensor("input", [BATCH, 3, 8, 8])], [tensor("output", [BATCH, 10])])
    return Golden(
        name="conv_bn",
        description="Conv/ConvTranspose/Gemm each followed by an unfused BatchNormalization (random stats).",
        features=[
            "Conv",
            "Conv without bias",
            "ConvTranspose",
            "Gemm transB",
            "BatchNormalization (unfused)",
            "BatchNormalization on 2-D input",
            "Relu",
            "Flatten",
        ],
        model=make_model(graph, "Golden model conv_bn: BN after Conv, ConvTranspose and Gemm."),
        inputs={"input": _normal(1, [2, 3, 8, 8])},
    )


def _conv_bn_relu(
    b: GraphBuilder, x: str, name: str, c_in: int, c_out: int, stride: int = 1, relu: bool = True
) -> str:
    """Conv (no bias) + BatchNormalization (+ Relu), the torchvision block."""
    y = b.batch_norm(
        b.conv(x, f"{name}_conv", c_in, c_out, stride=stride, bias=False), f"{name}_bn", c_out
    )
    return b.op("Relu", [y], f"{name}_relu") if relu else y


def _basic_block(b: GraphBuilder, x: str, name: str, c_in: int, c_out: int, stride: int) -> str:
    """ResNet basic block; a 1x1 Conv+BN shortcut when the shape changes."""
    y = _conv_bn_relu(b, x, f"{name}_a", c_in, c_out, stride)
    y = _conv_bn_relu(b, y, f"{name}_b", c_out, c_out, relu=False)
    if stride != 1 or c_in != c_out:
        x = b.batch_norm(
            b.conv(x, f"{name}_down_conv", c_in, c_out, k=1, stride=stride, bias=False),
            f"{name}_down_bn",
            c_out,
        )
    return b.op("Relu", [b.op("Add", [y, x], f"{name}_add")], f"{name}_relu")


def build_resnet() -> Golden:
    """A three-stage residual net for 32x32 RGB inputs."""
    b = GraphBuilder(np.random.default_rng(1002))
    x = _conv_bn_relu(b, "input", "stem", 3, 16)
    x = _basic_block(b, x, "layer1", 16, 16, stride=1)
    x = _basic_block(b, x, "layer2", 16, 32, stride=2)
    x = _basic_block(b, x, "layer3", 32, 64, stride=2)
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    w, bias = b.he("fc.weight", [10, 64], 64), b.small("fc.bias", [10])
    b.op("Gemm", [x, w, bias], "fc", "logits", transB=1)
    graph = b.graph(
        "resnet", [tensor("input", [BATCH, 3, 32, 32])], [tensor("logits", [BATCH, 10])]
    )
    return Golden(
        name="resnet",
        description="Small ResNet: Conv+BN+Relu basic blocks with Add joins and 1x1 strided shortcuts, "
        "GlobalAveragePool, Gemm head.",
        features=[
            "Conv",
            "strided Conv",
            "BatchNormalization (unfused)",
            "Relu",
            "residual Add",
            "GlobalAveragePool",
            "Flatten",
            "Gemm",
        ],
        model=make_model(graph, "Golden model resnet."),
        inputs={"input": _normal(2, [2, 3, 32, 32])},
    )


def _act(b: GraphBuilder, x: str, name: str, kind: str) -> str:
    """ReLU6 as Clip(0, 6) with constant min/max inputs, or HardSwish."""
    if kind == "relu6":
        return b.op(
            "Clip",
            [x, b.const(f"{name}.min", np.float32(0.0)), b.const(f"{name}.max", np.float32(6.0))],
            name,
        )
    return b.op("HardSwish", [x], name)


def _inverted_residual(
    b: GraphBuilder, x: str, name: str, c_in: int, c_out: int, expand: int, stride: int, act: str
) -> str:
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise (group == channels), 1x1 linear project."""
    hidden = c_in * expand
    y = _act(
        b,
        b.batch_norm(
            b.conv(x, f"{name}_expand", c_in, hidden, k=1, bias=False), f"{name}_expand_bn", hidden
        ),
        f"{name}_expand_act",
        act,
    )
    y = b.batch_norm(
        b.conv(y, f"{name}_dw", hidden, hidden, k=3, stride=stride, group=hidden, bias=False),
        f"{name}_dw_bn",
        hidden,
    )
    y = _act(b, y, f"{name}_dw_act", act)
    y = b.batch_norm(
        b.conv(y, f"{name}_project", hidden, c_out, k=1, bias=False), f"{name}_project_bn", c_out
    )
    if stride == 1 and c_in == c_out:
        y = b.op("Add", [y, x], f"{name}_add")
    return y


def build_mobilenet() -> Golden:
    """Inverted residuals with depthwise convolutions, ReLU6 (Clip) and HardSwish."""
    b = GraphBuilder(np.random.default_rng(1003))
    x = b.batch_norm(b.conv("input", "stem", 3, 16, stride=2, bias=False), "stem_bn", 16)
    x = _act(b, x, "stem_act", "relu6")
    x = _inverted_residual(b, x, "block1", 16, 16, expand=4, stride=1, act="relu6")
    x = _inverted_residual(b, x, "block2", 16, 24, expand=4, stride=2, act="hardswish")
    x = _inverted_residual(b, x, "block3", 24, 24, expand=4, stride=1, act="hardswish")
    # Depthwise-separable block with biased convs and no BN: dw 3x3 then pw 1x1.
    x = _act(b, b.conv(x, "sep_dw", 24, 24, k=3, group=24), "sep_dw_act", "relu6")
    x = _act(b, b.conv(x, "sep_pw", 24, 64, k=1), "sep_pw_act", "hardswish")
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    w, bias = b.he("fc.weight", [10, 64], 64), b.small("fc.bias", [10])
    b.op("Gemm", [x, w, bias], "fc", "logits", transB=1)
    graph = b.graph(
        "mobilenet", [tensor("input", [BATCH, 3, 32, 32])], [tensor("logits", [BATCH, 10])]
    )
    return Golden(
        name="mobilenet",
        description="MobileNetV2-style inverted residuals (1x1 expand, depthwise 3x3 group==channels, "
        "1x1 project, residual Add), a depthwise-separable block, ReLU6 as Clip and HardSwish.",
        features=[
            "Conv",
            "depthwise Conv (group == channels)",
            "pointwise Conv",
            "BatchNormalization (unfused)",
            "Clip (ReLU6) with min/max inputs",
            "HardSwish",
            "residual Add",
            "GlobalAveragePool",
            "Gemm",
        ],
        model=make_model(graph, "Golden model mobilenet."),
        inputs={"input": _normal(3, [2, 3, 32, 32])},
    )


def build_mlp() -> Golden:
    """Three MatMul+Add layers with Relu between them."""
    b = GraphBuilder(np.random.default_rng(1004))
    x = b.op("Relu", [b.linear("input", "fc1", 64, 128)], "fc1_relu")
    x = b.op("Relu", [b.linear(x, "fc2", 128, 64)], "fc2_relu")
    w = b.const("fc3.weight", (b.rng.standard_normal([64, 10]) / 8.0).astype(np.float32))
    y = b.op("MatMul", [x, w], "fc3_matmul")
    b.op("Add", [y, b.small("fc3.bias", [10])], "fc3_add", "logits")
    graph = b.graph("mlp", [tensor("input", [BATCH, 64])], [tensor("logits", [BATCH, 10])])
    return Golden(
        name="mlp",
        description="Three-layer perceptron built from MatMul + Add (+ Relu).",
        features=["MatMul", "Add (bias)", "Relu", "MatMul+Add -> Gemm candidate"],
        model=make_model(graph, "Golden model mlp."),
        inputs={"input": _normal(4, [2, 64])},
    )


def _split_heads(
    b: GraphBuilder, x: str, name: str, heads: int, head_dim: int, perm: list[int]
) -> str:
    """[B, S, D] -> [B, S, H, Dh] -> transpose by ``perm``."""
    shape = b.const(f"{name}.shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    return b.op(
        "Transpose",
        [b.op("Reshape", [x, shape], f"{name}_reshape")],
        f"{name}_transpose",
        perm=perm,
    )


def _layer_norm(b: GraphBuilder, x: str, name: str, d: int) -> str:
    """LayerNormalization over the last axis with non-trivial gamma/beta."""
    gamma = b.const(f"{name}.weight", b.rng.uniform(0.8, 1.2, d).astype(np.float32))
    beta = b.small(f"{name}.bias", [d])
    return b.op("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=1e-5)


def _gelu(b: GraphBuilder, x: str, name: str) -> str:
    """Exact GELU decomposed for opset 17: x * 0.5 * (1 + Erf(x / sqrt(2)))."""
    y = b.op("Div", [x, b.const(f"{name}.sqrt2", np.float32(np.sqrt(2.0)))], f"{name}_div")
    y = b.op(
        "Add",
        [b.op("Erf", [y], f"{name}_erf"), b.const(f"{name}.one", np.float32(1.0))],
        f"{name}_add",
    )
    y = b.op("Mul", [x, y], f"{name}_mul")
    return b.op("Mul", [y, b.const(f"{name}.half", np.float32(0.5))], f"{name}_mul_half")


def build_transformer() -> Golden:
    """A pre-norm transformer encoder block: 4-head self-attention and a GELU MLP."""
    d, heads, seq, ff = 64, 4, 16, 128
    head_dim = d // heads
    b = GraphBuilder(np.random.default_rng(1005))
    h = _layer_norm(b, "input", "ln1", d)
    q = _split_heads(
        b, b.linear(h, "attn_q", d, d, gain=1.0), "attn_q", heads, head_dim, [0, 2, 1, 3]
    )
    k = _split_heads(
        b, b.linear(h, "attn_k", d, d, gain=1.0), "attn_k", heads, head_dim, [0, 2, 3, 1]
    )
    v = _split_heads(
        b, b.linear(h, "attn_v", d, d, gain=1.0), "attn_v", heads, head_dim, [0, 2, 1, 3]
    )
    scores = b.op("MatMul", [q, k], "attn_scores")
    scores = b.op(
        "Div", [scores, b.const("attn_scale", np.float32(np.sqrt(head_dim)))], "attn_scale_div"
    )
    probs = b.op("Softmax", [scores], "attn_softmax", axis=-1)
    ctx = b.op(
        "Transpose",
        [b.op("MatMul", [probs, v], "attn_context")],
        "attn_merge_transpose",
        perm=[0, 2, 1, 3],
    )
    ctx = b.op(
        "Reshape",
        [ctx, b.const("attn_merge.shape", np.array([0, 0, d], dtype=np.int64))],
        "attn_merge_reshape",
    )
    x = b.op("Add", ["input", b.linear(ctx, "attn_out", d, d, gain=1.0)], "attn_residual")
    h = _gelu(b, b.linear(_layer_norm(b, x, "ln2", d), "mlp_fc1", d, ff, gain=1.0), "mlp_gelu")
    b.op("Add", [x, b.linear(h, "mlp_fc2", ff, d, gain=1.0)], "mlp_residual", "output")
    graph = b.graph(
        "transformer", [tensor("input", [BATCH, seq, d])], [tensor("output", [BATCH, seq, d])]
    )
    return Golden(
        name="transformer",
        description="Pre-norm transformer encoder block (d=64, 4 heads, seq=16): LayerNormalization, "
        "multi-head self-attention via Reshape/Transpose/MatMul/Softmax, exact GELU as Erf ops.",
        features=[
            "LayerNormalization",
            "MatMul",
            "Add",
            "Reshape (0 = copy dim)",
            "Transpose",
            "Softmax",
            "Div (attention scale)",
            "GELU decomposed (Div, Erf, Add, Mul)",
            "residual Add",
        ],
        model=make_model(graph, "Golden model transformer."),
        inputs={"input": _normal(5, [2, seq, d])},
    )


def build_unet() -> Golden:
    """Two-level U-Net: strided Conv down, ConvTranspose up, Concat skips."""
    b = GraphBuilder(np.random.default_rng(1006))

    def conv_relu(x: str, name: str, c_in: int, c_out: int, stride: int = 1) -> str:
        return b.op("Relu", [b.conv(x, name, c_in, c_out, stride=stride)], f"{name}_relu")

    e1 = conv_relu("input", "enc1", 3, 8)  # 32x32
    e2 = conv_relu(e1, "down1", 8, 16, stride=2)  # 16x16
    e3 = conv_relu(e2, "down2", 16, 32, stride=2)  # 8x8
    m = conv_relu(e3, "bottleneck", 32, 32)
    u2 = b.conv_transpose(m, "up2", 32, 16)  # 16x16
    d2 = conv_relu(b.op("Concat", [u2, e2], "skip2_concat", axis=1), "dec2", 32, 16)
    u1 = b.conv_transpose(d2, "up1", 16, 8)  # 32x32
    d1 = conv_relu(b.op("Concat", [u1, e1], "skip1_concat", axis=1), "dec1", 16, 8)
    w, bias = b.he("head.weight", [2, 8, 1, 1], 8), b.small("head.bias", [2])
    b.op("Conv", [d1, w, bias], "head", "output", kernel_shape=[1, 1])
    graph = b.graph(
        "unet", [tensor("input", [BATCH, 3, 32, 32])], [tensor("output", [BATCH, 2, 32, 32])]
    )
    return Golden(
        name="unet",
        description="Small U-Net: strided Conv downsampling, ConvTranspose upsampling, Concat skip "
        "connections, 1x1 Conv head producing 2-channel 32x32 logits.",
        features=[
            "Conv",
            "strided Conv",
            "ConvTranspose",
            "Concat (channel skip)",
            "Relu",
            "1x1 Conv",
        ],
        model=make_model(graph, "Golden model unet."),
        inputs={"input": _normal(6, [2, 3, 32, 32])},
    )


def _if_branch(name: str, ops: list[onnx.NodeProto], out: str) -> onnx.GraphProto:
    """An If branch: no inputs, one [batch, 8] output, reads outer-scope values."""
    return helper.make_graph(ops, name, [], [tensor(out, [BATCH, 8])])


def build_control_flow() -> Golden:
    """If on sign(ReduceSum(x)) and a fixed-trip-count Loop; subgraphs read outer-scope weights."""
    b = GraphBuilder(np.random.default_rng(1007))
    w_then = b.he("then.weight", [8, 8], 8)
    w_loop = b.const(
        "loop.weight", (b.rng.standard_normal([8, 8]) / np.sqrt(8.0)).astype(np.float32)
    )
    b_loop = b.small("loop.bias", [8])
    step = b.const("loop.step", np.float32(0.1))
    total = b.op("ReduceSum", ["input"], "cond_reduce_sum", keepdims=0)
    cond = b.op("Greater", [total, b.const("cond.zero", np.float32(0.0))], "cond_greater")

    then_g = _if_branch(
        "then_branch",
        [
            helper.make_node("MatMul", ["input", w_then], ["then_matmul_out"], name="then_matmul"),
            helper.make_node("Relu", ["then_matmul_out"], ["then_out"], name="then_relu"),
        ],
        "then_out",
    )
    else_g = _if_branch(
        "else_branch",
        [
            helper.make_node("Neg", ["input"], ["else_neg_out"], name="else_neg"),
            helper.make_node("Sigmoid", ["else_neg_out"], ["else_out"], name="else_sigmoid"),
        ],
        "else_out",
    )
    branch = b.op("If", [cond], "branch_if", then_branch=then_g, else_branch=else_g)

    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", w_loop], ["body_matmul_out"], name="body_matmul"),
            helper.make_node("Add", ["body_matmul_out", b_loop], ["body_add_out"], name="body_add"),
            helper.make_node("Tanh", ["body_add_out"], ["body_tanh_out"], name="body_tanh"),
            helper.make_node(
                "Cast", ["iter"], ["body_iter_f_out"], name="body_iter_cast", to=TensorProto.FLOAT
            ),
            helper.make_node(
                "Mul", ["body_iter_f_out", step], ["body_offset_out"], name="body_offset"
            ),
            helper.make_node(
                "Add", ["body_tanh_out", "body_offset_out"], ["h_out"], name="body_carry"
            ),
            helper.make_node(
                "ReduceMean", ["h_out"], ["scan_out"], name="body_trace_mean", axes=[1], keepdims=0
            ),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "loop_body",
        [
            tensor("iter", [], TensorProto.INT64),
            tensor("cond_in", [], TensorProto.BOOL),
            tensor("h_in", [BATCH, 8]),
        ],
        [
            tensor("cond_out", [], TensorProto.BOOL),
            tensor("h_out", [BATCH, 8]),
            tensor("scan_out", [BATCH]),
        ],
    )
    trip = b.const("loop.trip_count", np.array(4, dtype=np.int64))
    keep_going = b.const("loop.cond", np.array(True))
    b.op_multi("Loop", [trip, keep_going, branch], "refine_loop", ["output", "trace"], body=body)
    graph = b.graph(
        "control_flow",
        [tensor("input", [BATCH, 8])],
        [tensor("output", [BATCH, 8]), tensor("trace", [4, BATCH])],
    )
    return Golden(
        name="control_flow",
        description="If on ReduceSum(input) > 0 (then: MatMul+Relu, else: Neg+Sigmoid) feeding a Loop with "
        "trip count 4 (body: MatMul+Add+Tanh plus the cast iteration number, loop-carried value "
        "and a per-iteration ReduceMean scan output). Subgraphs read outer-scope initializers.",
        features=[
            "If",
            "Loop",
            "subgraph outer-scope references",
            "loop-carried value",
            "Loop scan output",
            "ReduceSum",
            "Greater",
            "Cast",
            "ReduceMean",
        ],
        model=make_model(graph, "Golden model control_flow."),
        # Positive-sum inputs: the stored outputs take the then-branch.
        inputs={"input": (np.abs(_normal(7, [2, 8])) + 0.1).astype(np.float32)},
        notes={"branch_taken": "then"},
    )


def _normal(seed: int, shape: Sequence[int]) -> np.ndarray:
    """Standard-normal float32 inputs from a fixed seed."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# digits_cnn: trained with torch
# --------------------------------------------------------------------------------------------


def _digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """load_digits() scaled to [0, 1], split 75/25 with a fixed, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, x_te, y_tr, y_te


def _digits_net() -> Any:
    """Conv+BN+ReLU blocks and a Linear head (built lazily so torch stays optional)."""
    from torch import nn

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
        )

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block1 = block(1, 16)
            self.block2 = block(16, 32)
            self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4
            self.block3 = block(32, 32)
            self.flatten = nn.Flatten()
            self.head = nn.Linear(32 * 4 * 4, 10)

        def forward(self, x: Any) -> Any:
            x = self.block3(self.pool(self.block2(self.block1(x))))
            return self.head(self.flatten(x))

    return DigitsCNN()


def _train_digits(x_tr: np.ndarray, y_tr: np.ndarray, epochs: int = 30, batch: int = 32) -> Any:
    """Train deterministically: fixed seed, deterministic algorithms, one thread."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        net = _digits_net()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        xs, ys = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        gen = torch.Generator().manual_seed(0)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(xs), generator=gen).split(batch):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
                opt.step()
            sched.step()
        return net.eval()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _export_digits(net: Any) -> onnx.ModelProto:
    """TorchScript export (dynamo=False) keeping BatchNormalization unfused (TrainingMode.PRESERVE)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated in torch >= 2.9 but still works and needs no onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        path = Path(tmp) / "digits_cnn.onnx"
        torch.onnx.export(
            net,
            (torch.zeros(2, 1, 8, 8),),
            path,
            dynamo=False,
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: BATCH}, "logits": {0: BATCH}},
        )
        model = onnx.load(str(path))
    model.graph.name = "digits_cnn"
    model.doc_string = (
        "Golden model digits_cnn: CNN trained on sklearn load_digits (inputs = pixels / 16)."
    )
    model.producer_name = "iropt-golden (torch " + model.producer_version + ")"
    model.producer_version = "1"
    return model


def _check_export(net: Any, x: np.ndarray, ort_logits: np.ndarray) -> None:
    """The exported graph must agree with the torch module it came from."""
    import torch

    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    if not np.allclose(ort_logits, want, rtol=1e-4, atol=1e-4):
        err = float(np.abs(ort_logits - want).max())
        raise RuntimeError(
            f"digits_cnn: ONNX Runtime and torch disagree after export (max abs error {err:.3g})"
        )


def build_digits_cnn() -> Golden:
    """Train the digits CNN, export it with BN unfused, and keep the test and calibration splits."""
    try:
        for module in ("torch", "sklearn"):  # torch first: it is the one usually missing
            importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(
            f"digits_cnn needs torch and scikit-learn to rebuild ({exc}); install them "
            "(pip install torch scikit-learn) or keep the committed digits_cnn files."
        ) from exc
    x_tr, x_te, y_tr, y_te = _digits_data()
    net = _train_digits(x_tr, y_tr)
    model = _export_digits(net)
    ops = [n.op_type for n in model.graph.node]
    if ops.count("BatchNormalization") != 3 or any(
        len(n.output) != 1 for n in model.graph.node if n.op_type == "BatchNormalization"
    ):
        raise RuntimeError(
            f"digits_cnn export lost its inference-form BatchNormalization nodes: {ops}"
        )
    logits = run_reference(model, {"input": x_te})["logits"]
    _check_export(net, x_te, logits)
    accuracy = float((logits.argmax(axis=1) == y_te).mean())
    if accuracy < 0.95:
        raise RuntimeError(f"digits_cnn reached only {accuracy:.4f} test accuracy (want >= 0.95)")
    return Golden(
        name="digits_cnn",
        description="CNN trained with torch on sklearn load_digits (8x8, 10 classes; pixels / 16): three "
        "Conv(no bias)+BatchNormalization+Relu blocks, MaxPool, Flatten, Linear head (logits). "
        "Exported with the TorchScript exporter, BatchNormalization kept unfused.",
        features=[
            "Conv",
            "BatchNormalization (unfused, trained stats)",
            "Relu",
            "MaxPool",
            "Flatten",
            "Gemm",
            "torch export",
            "real data: accuracy test split",
            "calibration split",
        ],
        model=model,
        inputs={"input": x_te[:8]},
        extra_files={
            "test": {"input": x_te, "label": y_te},
            "calib": {"input": x_tr[:128]},
        },
        notes={"test_accuracy": round(accuracy, 4), "test_samples": len(y_te)},
    )


# --------------------------------------------------------------------------------------------
# Traced PyTorch modules: what the TorchScript exporter writes for dynamic batch sizes
# --------------------------------------------------------------------------------------------

DECODER_VOCAB, DECODER_SEQ, DECODER_WIDTH = 200, 16, 64
LSTM_VOCAB, LSTM_SEQ = 100, 7


def _traced_modules() -> dict[str, Any]:
    """The torch modules behind the traced_* models (built lazily so torch stays optional)."""
    import torch
    from torch import nn

    class Decoder(nn.Module):
        """Embedding + learned positions, one pre-norm causal encoder layer, vocabulary head."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(DECODER_VOCAB, DECODER_WIDTH)
            self.positions = nn.Parameter(torch.randn(1, DECODER_SEQ, DECODER_WIDTH) * 0.02)
            self.layer = nn.TransformerEncoderLayer(
                DECODER_WIDTH, 4, 2 * DECODER_WIDTH, dropout=0.0, batch_first=True, norm_first=True
            )
            self.head = nn.Linear(DECODER_WIDTH, DECODER_VOCAB)

        def forward(self, ids: Any) -> Any:
            n = ids.shape[1]
            mask = torch.triu(torch.full((n, n), float("-inf")), 1)
            return self.head(self.layer(self.embed(ids) + self.positions[:, :n], src_mask=mask))

    class Tagger(nn.Module):
        """Embedding, two-layer LSTM called without a state, Linear on the last step."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(LSTM_VOCAB, 32)
            self.lstm = nn.LSTM(32, 48, num_layers=2, batch_first=True)
            self.head = nn.Linear(48, 5)

        def forward(self, ids: Any) -> Any:
            states, _ = self.lstm(self.embed(ids))
            return self.head(states[:, -1])

    return {"traced_decoder": Decoder, "traced_lstm": Tagger}


def _trace(name: str, seq: int, vocab: int, seed: int) -> tuple[onnx.ModelProto, Arrays]:
    """Export module `name` with the TorchScript exporter (dynamic batch), checked against torch."""
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(f"{name} needs torch to rebuild (pip install torch), or keep the committed files") from exc
    torch.manual_seed(seed)
    module = _traced_modules()[name]().eval()
    ids = np.random.default_rng(seed).integers(0, vocab, (2, seq)).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated, and says so
        path = Path(tmp) / f"{name}.onnx"
        torch.onnx.export(
            module, (torch.from_numpy(ids),), path, dynamo=False, opset_version=OPSET,
            input_names=["ids"], output_names=["logits"],
            dynamic_axes={"ids": {0: BATCH}, "logits": {0: BATCH}},
        )
        model = onnx.load(str(path))
    model.graph.name = name
    model.producer_name = "iropt-golden (torch " + model.producer_version + ")"
    model.producer_version = "1"
    with torch.no_grad():
        want = module(torch.from_numpy(ids)).numpy()
    got = run_reference(model, {"ids": ids})["logits"]
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"{name}: ONNX Runtime and torch disagree after export")
    return model, {"ids": ids}


def _traced_golden(name: str, seq: int, vocab: int, seed: int, description: str, features: list[str]) -> Golden:
    model, inputs = _trace(name, seq, vocab, seed)
    return Golden(name=name, description=description, features=features, model=model, inputs=inputs)


def build_traced_decoder() -> Golden:
    """A causal transformer layer as the TorchScript exporter writes it for a dynamic batch."""
    return _traced_golden(
        "traced_decoder", DECODER_SEQ, DECODER_VOCAB, 1009,
        "torch nn.TransformerEncoderLayer (pre-norm, causal mask) with embedding, positions and "
        "a vocabulary head, exported with the TorchScript exporter, batch dynamic: every Reshape target "
        "is computed at run time from Shape/Gather/Concat chains.",
        ["torch export", "dynamic batch", "run-time Reshape targets", "attention", "Gather embedding"],
    )


def build_traced_lstm() -> Golden:
    """A two-layer LSTM as the TorchScript exporter writes it when called without a state."""
    return _traced_golden(
        "traced_lstm", LSTM_SEQ, LSTM_VOCAB, 1010,
        "torch Embedding + two-layer nn.LSTM (no initial state given) + Linear on the last "
        "step, exported with the TorchScript exporter, batch dynamic: the zero initial states are "
        "built at run time (Shape -> Gather -> Concat -> ConstantOfShape -> Slice).",
        ["torch export", "dynamic batch", "LSTM", "zero initial states built at run time"],
    )


# --------------------------------------------------------------------------------------------
# Running, saving, manifest
# --------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[], Golden]] = {
    "conv_bn": build_conv_bn,
    "resnet": build_resnet,
    "mobilenet": build_mobilenet,
    "mlp": build_mlp,
    "transformer": build_transformer,
    "unet": build_unet,
    "control_flow": build_control_flow,
    "digits_cnn": build_digits_cnn,
    "traced_decoder": build_traced_decoder,
    "traced_lstm": build_traced_lstm,
}


def run_reference(model: onnx.ModelProto, feeds: Arrays) -> Arrays:
    """Outputs from ONNX Runtime on CPU with its graph optimizations off, keyed by output name."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def save_npz(path: Path, arrays: Arrays) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def _shape(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    """A value-info's shape: ints, dim_param strings, or None for unknown dims."""
    dims = vi.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def _io(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    """Manifest entries for graph inputs or outputs."""
    return [
        {
            "name": v.name,
            "shape": _shape(v),
            "dtype": str(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
        }
        for v in values
    ]


def _op_types(graph: onnx.GraphProto) -> set[str]:
    """All op types in a graph, including subgraphs."""
    ops: set[str] = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                ops |= _op_types(sub)
    return ops


def write_golden(golden: Golden, out_dir: Path) -> dict[str, Any]:
    """Check, run and save one model; return its manifest entry."""
    model = golden.model
    onnx.checker.check_model(model, full_check=True)
    outputs = run_reference(model, golden.inputs)
    files = {
        "model": f"{golden.name}.onnx",
        "inputs": f"{golden.name}.inputs.npz",
        "outputs": f"{golden.name}.outputs.npz",
    }
    files |= {kind: f"{golden.name}.{kind}.npz" for kind in golden.extra_files}
    (out_dir / files["model"]).write_bytes(model.SerializeToString())
    save_npz(out_dir / files["inputs"], golden.inputs)
    save_npz(out_dir / files["outputs"], outputs)
    for kind, arrays in golden.extra_files.items():
        save_npz(out_dir / files[kind], arrays)
    return {
        "name": golden.name,
        "description": golden.description,
        "files": files,
        "opset": OPSET,
        "ir_version": model.ir_version,
        "inputs": _io(model.graph.input),
        "outputs": _io(model.graph.output),
        "nodes": len(model.graph.node),
        "op_types": sorted(_op_types(model.graph)),
        "features": golden.features,
        **golden.notes,
    }


def _write_manifest(out_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge new entries into manifest.json (entries of models not rebuilt are kept)."""
    path = out_dir / "manifest.json"
    old = json.loads(path.read_text())["models"] if path.exists() else []
    merged = {e["name"]: e for e in old} | entries
    ordered = [merged[n] for n in BUILDERS if n in merged]
    text = json.dumps({"opset": OPSET, "models": ordered}, indent=2) + "\n"
    path.write_text(text)


def build_all(out_dir: Path = HERE, names: Sequence[str] | None = None) -> list[str]:
    """Build the named models (default: all) into ``out_dir``; return the names that failed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for name in names or list(BUILDERS):
        try:
            entry = write_golden(BUILDERS[name](), out_dir)
        except RuntimeError as exc:
            print(f"{name:<13} FAILED: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        entries[name] = entry
        size = (out_dir / entry["files"]["model"]).stat().st_size
        print(
            f"{name:<13} {size / 1024:8.1f} KiB  {entry['nodes']:3d} nodes  ops: {', '.join(entry['op_types'])}"
        )
    _write_manifest(out_dir, entries)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``build.py [--out DIR] [NAME ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to build (default: all of {', '.join(BUILDERS)})",
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="output folder (default: this script's folder)"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    failed = build_all(args.out, args.names)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
