"""int8 on a full-size network: ResNet-50 at batch 8 on ONNX Runtime's CPU, fp32 against int8.

The golden conv models are small enough (0.03-2 ms a batch) that session overhead and ORT's
missing int8 kernels decide their int8 speed-up (bench/quant.py). This bench runs the same
quantizer on a network of the size people serve, to show what int8 does where the convolutions
themselves are the cost.

Model (built here, deterministic): the ResNet-50 of the onnx package's `light_resnet50` test
model, whose weights are constant fills, so:
1. iropt's `upgrade_opset(to=13)` takes it from opset 9 to 13 (per-channel Q/DQ needs 13), and
   `default` folds its weight-building ConstantOfShape nodes and its BatchNormalizations;
3. every Conv/Gemm weight is replaced with He-normal values and every bias with N(0, 0.01)
   (seed 0), so activations have realistic ranges;
4. the input is renamed `input` and given batch 8 (the head's Reshape becomes [-1, 2048]), and
   the final Softmax is dropped so that the outputs compared are the logits.
Calibration: 32 rows of N(0, 1) images; evaluation: 8 other rows. Variants: fp32; iropt
(`default`, then `quantize` with its defaults, target ort); ORT `quantize_static` best settings
(quant_pre_process, QDQ, QUInt8 activations, QInt8 per-channel weights). Latency: interleaved
rounds, 1 and 2 intra-op threads, median. Random weights make top-1 meaningless: cosine of the
logits against fp32 is reported instead.

Run: `.venv/bin/python bench/quant_large.py`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table
from latency import interleaved_latency_ms, run_outputs, session
from quant import BATCH, quantize_iropt, quantize_ort, write_feed_folder

THREADS = (1, 2)
CALIB_ROWS = 32
OPSET = 13
VARIANTS = {"fp32": "fp32", "iropt": "iropt int8", "ort_best": "ORT best"}


def light_resnet50() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"


def build_model(work: Path) -> Path:
    """ResNet-50 with random He weights at batch 8 (see the module docstring)."""
    from iropt.app.optimize import RunOptions, optimize
    from iropt.schedules import builtin_schedule_text

    schedule = work / "prepare.opt"
    schedule.write_text(f"upgrade_opset(to={OPSET})\n" + (builtin_schedule_text("default") or ""))
    folded = work / "resnet50.default.onnx"
    optimize(RunOptions(schedule=str(schedule), model=light_resnet50(), output=folded, verify=False))
    proto = onnx.load(str(folded))
    _randomize_weights(proto, np.random.default_rng(0))
    _batch_of_eight(proto)
    _logits_out(proto)
    onnx.checker.check_model(proto, full_check=True)
    path = work / "resnet50.onnx"
    onnx.save(proto, str(path))
    return path


def _randomize_weights(proto: onnx.ModelProto, rng: np.random.Generator) -> None:
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    weights = {n.input[1] for n in layers}
    biases = {n.input[2] for n in layers if len(n.input) > 2}
    for index, tensor in enumerate(proto.graph.initializer):
        shape = tuple(tensor.dims)
        if tensor.name in weights:
            values = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        elif tensor.name in biases:
            values = rng.standard_normal(shape) * 0.01
        else:
            continue
        proto.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), tensor.name))


def _batch_of_eight(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    old_name = graph.input[0].name
    for node in graph.node:
        node.input[:] = ["input" if name == old_name else name for name in node.input]
    graph.input[0].name = "input"
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = BATCH
    for output in graph.output:
        output.type.tensor_type.shape.dim[0].dim_value = BATCH
    del graph.value_info[:]  # inferred for batch 1
    (reshape,) = [n for n in graph.node if n.op_type == "Reshape"]
    for index, tensor in enumerate(graph.initializer):
        if tensor.name == reshape.input[1]:
            shape = onnx.numpy_helper.to_array(tensor).copy()
            shape[0] = -1
            graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(shape, tensor.name))


def _logits_out(proto: onnx.ModelProto) -> None:
    """End at the logits: a Softmax over random-weight logits is near uniform, and its cosine
    against fp32 would say nothing."""
    graph = proto.graph
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax" and n.output[0] == graph.output[0].name]
    graph.node.remove(softmax)
    graph.output[0].name = softmax.input[0]


def measure(work: Path) -> tuple[dict[str, Path], dict[int, dict[str, float]], dict[str, float]]:
    model = build_model(work)
    rng = np.random.default_rng(1)
    calibration = write_feed_folder(rng.standard_normal((CALIB_ROWS, 3, 224, 224)).astype(np.float32), work / "calib")
    feed = {"input": rng.standard_normal((BATCH, 3, 224, 224)).astype(np.float32)}
    paths = {"fp32": model, "iropt": work / "resnet50.iropt.onnx", "ort_best": work / "resnet50.ort_best.onnx"}
    quantize_iropt(model, calibration, paths["iropt"])
    quantize_ort(model, calibration, paths["ort_best"], best=True)
    latency = {}
    for threads in THREADS:
        sessions = {key: session(path, threads=threads) for key, path in paths.items()}
        latency[threads] = interleaved_latency_ms(sessions, feed, budget_s=10.0, min_rounds=5, max_rounds=15)
    (reference,) = run_outputs(session(model), feed).values()
    cosines = {}
    for key in ("iropt", "ort_best"):
        (logits,) = run_outputs(session(paths[key]), feed).values()
        cosines[key] = _cosine(reference, logits)
    return paths, latency, cosines


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def render(latency: dict[int, dict[str, float]], cosines: dict[str, float]) -> str:
    rows = []
    for threads, times in latency.items():
        fp32 = times["fp32"]
        cells = [f"{threads}", f"{fp32:.1f}"]
        for key in ("iropt", "ort_best"):
            cells.append(f"{times[key]:.1f} ({fp32 / times[key]:.2f}x)")
        cells.append(f"{times['iropt'] / times['ort_best']:.2f}")
        rows.append(cells)
    header = ["threads", "fp32 ms", "iropt int8 ms (speedup)", "ORT best ms (speedup)", "iropt / ORT best"]
    cosine_line = ", ".join(f"{VARIANTS[key]} {value:.5f}" for key, value in cosines.items())
    return "\n".join(
        [
            f"ResNet-50 (light_resnet50's architecture, He-random weights), batch {BATCH}, ORT CPU; "
            "median ms over interleaved rounds.",
            "",
            markdown_table(header, rows),
            "",
            f"Cosine of the logits against fp32 (8 held-out random images): {cosine_line}.",
        ]
    )


def main() -> None:
    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="iropt-bench-quant-large-") as tmp:
        _, latency, cosines = measure(Path(tmp))
    print(render(latency, cosines))


if __name__ == "__main__":
    main()
