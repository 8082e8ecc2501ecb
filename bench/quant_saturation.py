"""Integer formats against the int16 saturation of x86 CPUs without VNNI, on this machine.

ONNX Runtime's u8s8 integer GEMM on AVX2 (and AVX-512BW) without VNNI multiplies with
VPMADDUBSW, which adds two uint8 x int8 products into an int16 and saturates: 255 * 127 * 2 =
64770 does not fit in 32767. Activations quantized to uint8 with a zero point near 128 make
large products the common case, so a full-range int8 weight gives wrong sums. Formats that
cannot saturate:

- `u8s8 7-bit`: weights in [-64, 63] (ORT's `reduce_range`): 255 * 64 * 2 = 32640 fits.
- `u8u8`: uint8 weights with a zero point; ORT's u8u8 kernels widen to int16 before the
  multiply (VPMADDWD), which does not saturate.

Dynamic MatMul: per format and shape, the output cosine against float (the same random weights and inputs) and
the ORT latency with graph optimizations on (MatMulInteger chains fuse to DynamicQuantizeMatMul;
QDQ to QLinearConv / QGemm), 1 thread, ratios against float measured interleaved.

Static QDQ (iropt `quantize`, format ort, every layer quantized) on golden models: output
cosine against float with ORT's fused QLinearConv/QGemm kernels (optimizations on) and with the
QDQ model as written (off: float kernels between DequantizeLinear and QuantizeLinear, no
saturation possible), for `weight_range="full"` (8-bit) and `"reduced"` (7-bit), and latency.

Run: `.venv/bin/python bench/quant_saturation.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GOLDEN, markdown_table
from latency import interleaved_latency_ms, run_outputs, session

OPSET = 17
# (rows, K, N): the failing test's shape, a BERT-base-like FFN and attention projection.
SHAPES = ((4, 8, 6), (128, 384, 1536), (128, 768, 768))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def _model(nodes: list[onnx.NodeProto], inits: list[np.ndarray | tuple[str, np.ndarray]], k: int, n: int) -> bytes:
    tensors = [numpy_helper.from_array(value, name) for name, value in inits]  # type: ignore[misc]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return model.SerializeToString()


def float_model(w: np.ndarray) -> bytes:
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("w", w)], *w.shape)


def dynamic_model(w: np.ndarray, fmt: str) -> bytes:
    """DynamicQuantizeLinear + MatMulInteger + scale, weights per column in format `fmt`."""
    amax = np.abs(w).max(axis=0)
    if fmt == "u8s8":
        scale = amax / 127
        w_q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        zero = np.zeros(w.shape[1], np.int8)
    elif fmt == "u8s8 7-bit":
        scale = amax / 63
        w_q = np.clip(np.rint(w / scale), -63, 63).astype(np.int8)
        zero = np.zeros(w.shape[1], np.int8)
    else:  # u8u8: asymmetric per column
        low, high = np.minimum(w.min(axis=0), 0), np.maximum(w.max(axis=0), 0)
        scale = (high - low) / 255
        zero_f = np.clip(np.rint(-low / scale), 0, 255)
        w_q = np.clip(np.rint(w / scale) + zero_f, 0, 255).astype(np.uint8)
        zero = zero_f.astype(np.uint8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["y"]),
    ]
    inits = [("wq", w_q), ("wz", zero), ("ws", scale.astype(np.float32))]
    return _model(nodes, inits, *w.shape)


def measure(name: str, shape: tuple[int, int, int], models: dict[str, bytes], x: np.ndarray) -> list[list[str]]:
    sessions = {key: session(model) for key, model in models.items()}
    reference = run_outputs(sessions["float"], {"x": x})["y"]
    latency = interleaved_latency_ms(sessions, {"x": x}, budget_s=3.0)
    rows = []
    for key, sess in sessions.items():
        got = run_outputs(sess, {"x": x})["y"]
        plain = run_outputs(session(models[key], level="disable"), {"x": x})["y"]
        rows.append([
            name, "x".join(map(str, shape)), key, f"{_cosine(reference, got):.5f}",
            f"{_cosine(reference, plain):.5f}", f"{latency[key]:.3f}", f"{latency['float'] / latency[key]:.2f}x",
        ])
    return rows


def dynamic_rows() -> list[list[str]]:
    rows = []
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        m, k, n = shape
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        x = rng.standard_normal((m, k)).astype(np.float32)
        models = {"float": float_model(w)}
        models |= {fmt: dynamic_model(w, fmt) for fmt in ("u8s8", "u8s8 7-bit", "u8u8")}
        rows += measure("dynamic MatMul", shape, models, x)
    return rows


STATIC_MODELS = ("conv_bn", "digits_cnn", "resnet", "mobilenet", "mlp", "transformer")


def static_model(name: str, weight_range: str) -> bytes:
    import logging

    from iropt.infra.pass_base import PassContext
    from iropt.infra.registry import create_pass
    from iropt.io.load import load_model

    logging.disable(logging.WARNING)
    model = load_model(GOLDEN / f"{name}.onnx")
    ctx = PassContext()
    for step in ("infer_shapes", "fold_constants", "fuse_bn_conv", "fuse_matmul_add", "eliminate_dead_code"):
        create_pass(step, {}).run(model, ctx)
    calibration = GOLDEN / f"{name}.calib.npz"
    if not calibration.exists():
        calibration = GOLDEN / f"{name}.inputs.npz"
    options = {"calibration": str(calibration), "placement": "all", "weight_range": weight_range}
    if weight_range == "float":
        return model.to_onnx().SerializeToString()
    create_pass("quantize", options).run(model, ctx)
    return model.to_onnx().SerializeToString()


def static_rows() -> list[list[str]]:
    rows = []
    for name in STATIC_MODELS:
        inputs = dict(np.load(GOLDEN / f"{name}.inputs.npz"))
        models = {key: static_model(name, key) for key in ("float", "full", "reduced")}
        sessions = {key: session(model) for key, model in models.items()}
        reference = run_outputs(sessions["float"], inputs)
        latency = interleaved_latency_ms(sessions, inputs, budget_s=1.0)
        for key, sess in sessions.items():
            fused = run_outputs(sess, inputs)
            plain = run_outputs(session(models[key], level="disable"), inputs)
            rows.append([
                f"static QDQ {name}", "golden inputs", "float" if key == "float" else f"u8s8 {key}",
                f"{min(_cosine(reference[k], fused[k]) for k in reference):.5f}",
                f"{min(_cosine(reference[k], plain[k]) for k in reference):.5f}",
                f"{latency[key]:.3f}", f"{latency['float'] / latency[key]:.2f}x",
            ])
    return rows


def main(extra: list[Callable[[], list[list[str]]]] | None = None) -> None:
    rows = dynamic_rows()
    for fn in extra or []:
        rows += fn()
    headers = ["case", "shape", "format", "cosine (ORT all)", "cosine (ORT off)", "ms", "vs float"]
    print(
        "ORT's u8s8 kernels on this CPU (AVX2, no VNNI) add pairs of uint8 x int8 products in int16 "
        "(VPMADDUBSW), which saturates with full-range int8 weights. Cosine against float with ORT's "
        "fused int8 kernels (all) and with the model as written (off); latency with optimizations on, "
        "1 thread, variants of a case interleaved. 7-bit weights (u8s8 7-bit, `weight_range=\"reduced\"`, "
        "the default for ONNX Runtime) cannot saturate, cost nothing in speed and lose little; u8u8 does "
        "not saturate either but is slower (and gains nothing from VNNI where it exists).\n"
    )
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main([static_rows])
