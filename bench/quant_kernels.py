"""What ONNX Runtime's int8 kernels gain, layer shape by layer shape: the ceiling for int8 speed-up.

bench/quant.py measures whole golden models; this bench measures the layers they are made of,
one at a time, so that a model's int8 speed-up can be read as the mix of its layers' speed-ups.

Each layer is a model of its own: the layer (bias, then Relu) on a batch-8 input. The int8 model
is iropt's `quantize` of it, target ort, with `placement="all"` so that every layer is
quantized, even those `quantize` keeps in float by default because they are slower in int8.
Calibration: 16 rows of N(0, 1). Per layer and thread count (median of REPEATS rounds):
- kernel: ORT profiler time of the layer's own kernel, float (`Conv`/`ConvTranspose`, ORT's
  NCHWc form) against int8 (`QLinearConv`; a `ConvTranspose` has no int8 kernel in ORT's CPU
  provider, so its int8 model runs the float kernel between DequantizeLinear and
  QuantizeLinear). This is the most int8 can gain on that layer.
- model: median latency of the one-layer model, float against int8; the int8 figure also pays
  for quantizing the input, the layout changes (NCHW <-> NHWC) and dequantizing the output,
  which a whole model pays once at each edge of its int8 region.

Run: `.venv/bin/python bench/quant_kernels.py`.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table
from latency import interleaved_latency_ms, op_profiles, session
from quant import BATCH, write_feed_folder

THREADS = (1, 2)
CALIB_ROWS = 16
# Profiles taken per layer and thread count; the median of each figure is reported (the ratio of
# two kernels moved by up to 1.5x between single profiles on this shared machine).
REPEATS = 5
FLOAT_KERNELS = ("Conv", "ConvTranspose")
INT8_KERNELS = ("QLinearConv", "ConvTranspose")


@dataclass(frozen=True)
class Layer:
    name: str
    where: str  # which models have a layer of this shape
    c_in: int
    c_out: int
    size: int  # input height and width
    kernel: int = 3
    stride: int = 1
    group: int = 1
    transpose: bool = False

    def weight_shape(self) -> list[int]:
        if self.transpose:
            return [self.c_in, self.c_out // self.group, self.kernel, self.kernel]
        return [self.c_out, self.c_in // self.group, self.kernel, self.kernel]


LAYERS = (
    Layer("conv 3x3 1->16 @8x8", "digits stem", 1, 16, 8),
    Layer("conv 3x3 16->32 @8x8", "digits", 16, 32, 8),
    Layer("conv 3x3 3->8 @8x8", "conv_bn stem", 3, 8, 8),
    Layer("conv 3x3 3->16 @32x32", "resnet, unet stems", 3, 16, 32),
    Layer("conv 3x3 16->16 @32x32", "resnet layer1", 16, 16, 32),
    Layer("conv 3x3 32->32 @16x16", "resnet layer2, unet", 32, 32, 16),
    Layer("conv 3x3 64->64 @8x8", "resnet layer3", 64, 64, 8),
    Layer("conv 1x1 16->64 @16x16", "mobilenet expand", 16, 64, 16, kernel=1),
    Layer("conv 1x1 64->16 @16x16", "mobilenet project", 64, 16, 16, kernel=1),
    Layer("depthwise 3x3 64 @16x16", "mobilenet", 64, 64, 16, group=64),
    Layer("convT 2x2/2 32->16 @8x8", "unet up2", 32, 16, 8, kernel=2, stride=2, transpose=True),
    Layer("convT 2x2/2 8->4 @8x8", "conv_bn", 8, 4, 8, kernel=2, stride=2, transpose=True),
    Layer("conv 3x3 256->256 @14x14", "ResNet-50 stage 3", 256, 256, 14),
    Layer("conv 1x1 256->1024 @14x14", "ResNet-50 stage 3", 256, 1024, 14, kernel=1),
)


def layer_model(layer: Layer, rng: np.random.Generator) -> onnx.ModelProto:
    """The layer with He-normal weights and a small bias, then Relu, on [8, c_in, size, size]."""
    shape = layer.weight_shape()
    fan_in = int(np.prod(shape[1:])) if not layer.transpose else layer.c_in * layer.kernel**2
    weight = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    bias = (rng.standard_normal(layer.c_out) * 0.01).astype(np.float32)
    attrs: dict[str, object] = {"kernel_shape": [layer.kernel] * 2, "strides": [layer.stride] * 2, "group": layer.group}
    if not layer.transpose:
        attrs["pads"] = [layer.kernel // 2] * 4
    nodes = [
        helper.make_node("ConvTranspose" if layer.transpose else "Conv", ["input", "w", "b"], ["y"], **attrs),
        helper.make_node("Relu", ["y"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH, layer.c_in, layer.size, layer.size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def quantize_all(model: Path, calibration: Path, out: Path) -> None:
    """iropt's quantize for ORT with every layer quantized (`placement="all"`)."""
    from iropt.app.optimize import RunOptions, optimize

    logging.disable(logging.WARNING)
    schedule = out.with_suffix(".opt")
    schedule.write_text(
        'target ort(providers=["CPUExecutionProvider"])\n'
        f"quantize(calibration={json.dumps(str(calibration))}, placement=\"all\")\n"
    )
    optimize(RunOptions(schedule=str(schedule), model=model, output=out, verify=False, emit=False))


def kernel_ms(profile: list[tuple[str, float]], kernels: tuple[str, ...]) -> float:
    return sum(ms for op, ms in profile if op in kernels)


def measure_layer(layer: Layer, work: Path, rng: np.random.Generator) -> dict[int, dict[str, float]]:
    """Per thread count: kernel and model ms, float and int8."""
    fp32 = work / "fp32.onnx"
    onnx.save(layer_model(layer, rng), str(fp32))
    shape = (layer.c_in, layer.size, layer.size)
    calibration = write_feed_folder(rng.standard_normal((CALIB_ROWS, *shape)).astype(np.float32), work / "calib")
    int8 = work / "int8.onnx"
    quantize_all(fp32, calibration, int8)
    feed = {"input": rng.standard_normal((BATCH, *shape)).astype(np.float32)}
    results = {}
    for threads in THREADS:
        samples: dict[str, list[float]] = {"kernel_fp32": [], "kernel_int8": [], "model_fp32": [], "model_int8": []}
        sessions = {key: session(path, threads=threads) for key, path in (("fp32", fp32), ("int8", int8))}
        for _ in range(REPEATS):
            profiles = op_profiles({"fp32": fp32, "int8": int8}, feed, threads=threads, tmp=work, runs=100)
            samples["kernel_fp32"].append(kernel_ms(profiles["fp32"], FLOAT_KERNELS))
            samples["kernel_int8"].append(kernel_ms(profiles["int8"], INT8_KERNELS))
            latency = interleaved_latency_ms(sessions, feed, budget_s=0.3, min_rounds=30, max_rounds=200)
            samples["model_fp32"].append(latency["fp32"])
            samples["model_int8"].append(latency["int8"])
        results[threads] = {key: statistics.median(values) for key, values in samples.items()}
    return results


def render(results: dict[Layer, dict[int, dict[str, float]]]) -> str:
    lines = [
        f"One layer (+ bias, Relu) at batch {BATCH}, ORT CPU. kernel: the layer's own kernel time "
        "(ORT profiler), float against int8; model: the one-layer model's median latency, which "
        "for int8 also pays for Q/DQ and layout changes at its edges. int8 as iropt's "
        '`quantize(placement="all")` writes it.',
        "",
    ]
    for threads in THREADS:
        rows = []
        for layer, per_threads in results.items():
            r = per_threads[threads]
            rows.append(
                [
                    layer.name,
                    layer.where,
                    f"{r['kernel_fp32'] * 1000:.0f} / {r['kernel_int8'] * 1000:.0f} ({r['kernel_fp32'] / r['kernel_int8']:.2f}x)",
                    f"{r['model_fp32'] * 1000:.0f} / {r['model_int8'] * 1000:.0f} ({r['model_fp32'] / r['model_int8']:.2f}x)",
                ]
            )
        header = ["layer", "found in", "kernel µs fp32 / int8 (speed-up)", "model µs fp32 / int8 (speed-up)"]
        lines += [f"#### {threads} intra-op thread(s)", "", markdown_table(header, rows), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ort.set_default_logger_severity(3)
    rng = np.random.default_rng(0)
    results = {}
    for layer in LAYERS:
        with tempfile.TemporaryDirectory(prefix="iropt-bench-quant-kernels-") as tmp:
            results[layer] = measure_layer(layer, Path(tmp), rng)
    print(render(results))


if __name__ == "__main__":
    main()
