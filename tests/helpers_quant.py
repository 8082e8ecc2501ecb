"""Shared helpers for the calibration and quantization tests.

Small float models are written in ONNX text with their weights passed as numpy arrays
(`build`); calibration data goes to an `.npz` file (`write_feeds`) that the pass reads through
`iropt.verify.feeds`, as it would from `--calibration`. Models run in the real ONNX Runtime: with its
graph optimizations off (the QDQ model as written) or on (to see what ORT fuses it into).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import onnxruntime as ort

from iropt.infra.pass_base import PassContext, PassResult
from iropt.infra.registry import create_pass, target_spec
from iropt.ir.model import Model
from iropt.passes.quantize import Quantize

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"


def build(graph_text: str, weights: Mapping[str, np.ndarray] | None = None, opset: int = 17) -> Model:
    """A checked model from the text of one graph plus float initializers."""
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{graph_text}')
    for name, value in (weights or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(proto, full_check=True)
    return Model.from_onnx(proto)


def rand(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def write_feeds(folder: Path, feeds: Mapping[str, np.ndarray], name: str = "calib.npz") -> str:
    """Save one feed (arrays keyed by input name) as an .npz calibration file; returns its path."""
    path = folder / name
    np.savez(path, **{key: np.asarray(value) for key, value in feeds.items()})
    return str(path)


def quantize(
    model: Model,
    calibration: str | None,
    *,
    target: str | None = None,
    log: logging.Logger | None = None,
    **options: Any,
) -> tuple[PassResult, Quantize]:
    """Run the registered `quantize` pass on `model` in place; the pass comes back for its results.

    Placement follows fixed rules unless asked otherwise: measured placement times the model,
    which these tests need neither the time for nor the machine-dependent outcome of."""
    if "placement" not in options and "skip_slow_layers" not in options:
        options = {**options, "placement": "rules"}
    pass_ = create_pass("quantize", options)
    assert isinstance(pass_, Quantize)
    ctx = PassContext(
        target=target_spec(target) if target else None,
        calibration=calibration,
        log=log or logging.getLogger("iropt.test_quantize"),
    )
    return pass_.run(model, ctx), pass_


def checked(model: Model) -> onnx.ModelProto:
    """The model's proto after the full ONNX checker."""
    proto = model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    return proto


def session(model: Model | onnx.ModelProto, *, optimized: bool = False, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    proto = model.to_onnx() if isinstance(model, Model) else model
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, optimized: bool = False) -> dict[str, np.ndarray]:
    """All outputs by name, through ONNX Runtime CPU (graph optimizations off unless `optimized`)."""
    sess = session(model, optimized=optimized)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def ort_optimized_ops(model: Model) -> Counter[str]:
    """Op types of the graph ONNX Runtime runs after its own optimizations (level ALL, CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.to_onnx().SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"))
    return Counter(node.op_type for node in optimized.graph.node)


def op_counts(model: Model) -> Counter[str]:
    return Counter(node.op for node in model.graph.nodes)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def dequantized_from(tensor: gs.Tensor) -> tuple[gs.Node, gs.Node | None] | None:
    """(DequantizeLinear, its QuantizeLinear or None for a stored initializer) feeding `tensor`."""
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q = producer(dq.inputs[0])
    return dq, (q if q is not None and q.op == "QuantizeLinear" else None)


def qdq_params(dq: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) values of a DequantizeLinear."""
    scale = np.asarray(dq.inputs[1].values)
    zero = np.asarray(dq.inputs[2].values) if len(dq.inputs) > 2 else np.zeros_like(scale, dtype=np.uint8)
    return scale, zero


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def conv_relu_model(rng: np.random.Generator, cin: int = 8, cout: int = 16, *, bias: bool = True) -> Model:
    """x[N, cin, 6, 6] -> Conv 3x3 (pad 1) -> Relu -> Conv 1x1 -> y: two quantizable convs."""
    weights = {"w1": rand(rng, cout, cin, 3, 3), "w2": rand(rng, 4, cout, 1, 1)}
    if bias:
        weights |= {"b1": rand(rng, cout), "b2": rand(rng, 4)}
    b1, b2 = (", b1", ", b2") if bias else ("", "")
    text = f"""
g (float[N, {cin}, 6, 6] x) => (float[N, 4, 6, 6] y) {{
  c1 = Conv <pads = [1, 1, 1, 1]> (x, w1{b1})
  r1 = Relu (c1)
  y = Conv (r1, w2{b2})
}}"""
    return build(text, weights)


def mlp_model(rng: np.random.Generator, sizes: tuple[int, ...] = (16, 32, 32, 8)) -> tuple[Model, dict[str, np.ndarray]]:
    """Gemm (transB=1) + Relu layers named fc1.. with weights `w1`, biases `b1`...; returns the weights."""
    weights: dict[str, np.ndarray] = {}
    lines = []
    current = "x"
    layers = len(sizes) - 1
    for index in range(1, layers + 1):
        n_in, n_out = sizes[index - 1], sizes[index]
        weights[f"w{index}"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        weights[f"b{index}"] = rand(rng, n_out, scale=0.1)
        out = "y" if index == layers else f"h{index}"
        pre = out if index == layers else f"g{index}"
        lines.append(f"  {pre} = Gemm <transB = 1> ({current}, w{index}, b{index})")
        if index < layers:
            lines.append(f"  {out} = Relu ({pre})")
        current = out
    body = "\n".join(lines)
    text = f"g (float[N, {sizes[0]}] x) => (float[N, {sizes[-1]}] y) {{\n{body}\n}}"
    model = build(text, weights)
    for node in model.graph.nodes:
        if node.op == "Gemm":
            node.name = f"fc{node.inputs[1].name[1:]}"
    return model, weights
