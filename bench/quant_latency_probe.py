"""Where does int8 time go? fp32-vs-int8 latency of the conv golden models on ONNX Runtime's CPU.

For each model: the fp32 model is our fp32 schedule (fold constants, fold BatchNormalization and
the other fusions of `golden_models/int8_ort.opt`, without the quantize step), the int8 model is
that schedule with its `quantize` step (or `--schedule`). Both run in sessions with the same
options (ORT graph optimizations ALL, `threads` intra-op threads, one inter-op thread,
sequential), batch 8, and are timed alternately in blocks (time.perf_counter, warm-up first,
`--runs` runs; see `time_pair` for the statistic), so load on the machine hits both the same way.

Prints, per thread count: model, fp32 µs, int8 µs, speedup, cosine (int8 vs fp32 outputs on a
held-out batch), and for digits_cnn the top-1 accuracy drop on the test split.

    python bench/quant_latency_probe.py                       # all conv models, 1 and 2 threads
    python bench/quant_latency_probe.py resnet --profile DIR  # + ORT per-op profile and optimized graphs

With `--profile DIR`: DIR/NAME.{fp32,int8}.ort.onnx (the graph ORT runs after its own
optimizations) and a per-op-type time table from ORT's profiler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden_models"
MODELS = ("digits_cnn", "conv_bn", "resnet", "mobilenet", "unet")
BATCH = 8
CALIBRATION_ROWS = 64

FP32_SCHEDULE = """
target ort(providers=["CPUExecutionProvider"])
infer_shapes
fixpoint(max=8) {
  fold_constants(max_bytes=1MiB)
  fuse_bn_conv
  fuse_conv_add
  fuse_conv_mul
  fuse_matmul_add
  sum_to_add
  eliminate_identity
  eliminate_dead_code
}
"""


def session(path: Path, threads: int, *, optimized: Path | None = None, profile: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds_for(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows, a held-out batch of BATCH rows) for a model's single input."""
    if name == "digits_cnn":
        calib = np.load(GOLDEN / "digits_cnn.calib.npz")["input"]
        test = np.load(GOLDEN / "digits_cnn.test.npz")["input"][:BATCH]
        return calib.astype(np.float32), test.astype(np.float32)
    stored = next(iter(np.load(GOLDEN / f"{name}.inputs.npz").values()))
    rng = np.random.default_rng(0)
    shape = stored.shape[1:]
    calib = rng.standard_normal((CALIBRATION_ROWS, *shape)).astype(np.float32)
    held = rng.standard_normal((BATCH, *shape)).astype(np.float32)
    return calib, held


def build(name: str, work: Path, schedule: Path, models: Path = GOLDEN) -> tuple[Path, Path, str]:
    """Write NAME.fp32.onnx and NAME.int8.onnx into `work`; returns their paths and the input name."""
    from iropt.app.optimize import RunOptions, optimize

    source = models / f"{name}.onnx"
    calib, _ = feeds_for(name)
    input_name = next(iter(np.load(GOLDEN / f"{name}.inputs.npz").keys()))
    calib_path = work / f"{name}.calib.npz"
    np.savez(calib_path, allow_pickle=False, **{input_name: calib})
    fp32_schedule = work / "fp32.opt"
    fp32_schedule.write_text(FP32_SCHEDULE)
    fp32, int8 = work / f"{name}.fp32.onnx", work / f"{name}.int8.onnx"
    optimize(RunOptions(schedule=str(fp32_schedule), model=source, output=fp32, verify=False, emit=False))
    optimize(RunOptions(schedule=str(schedule), model=source, output=int8, calibration=str(calib_path),
                        verify=False, emit=False))
    return fp32, int8, input_name


def time_pair(
    sessions: Mapping[str, ort.InferenceSession], feed: dict[str, np.ndarray], runs: int, threads: int
) -> dict[str, float]:
    """µs per run of each session, timed in alternating blocks after a warm-up.

    This machine is shared (load well above its 2 cores), so wall-clock medians are noisy and
    one-sided. With one intra-op thread ORT runs every kernel on the calling thread, so the
    calling thread's CPU time (time.thread_time) measures the run without the time it spent
    preempted; with more threads the work is spread over ORT's pool, so the figure is the
    10th percentile of wall-clock times (the runs least disturbed by other work).
    """
    for sess in sessions.values():
        for _ in range(20):
            sess.run(None, feed)
    clock = time.thread_time if threads == 1 else time.perf_counter
    samples: dict[str, list[float]] = defaultdict(list)
    block = 10
    for _ in range(max(1, runs // block)):
        for key, sess in sessions.items():
            for _ in range(block):
                start = clock()
                sess.run(None, feed)
                samples[key].append(clock() - start)
    if threads == 1:
        return {key: statistics.median(values) * 1e6 for key, values in samples.items()}
    return {key: float(np.percentile(values, 10)) * 1e6 for key, values in samples.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denominator) if denominator else 1.0


def digits_top1_drop(fp32: Path, int8: Path, input_name: str) -> float:
    data = np.load(GOLDEN / "digits_cnn.test.npz")
    x, labels = data["input"].astype(np.float32), data["label"]
    accuracy = []
    for path in (fp32, int8):
        logits = session(path, 1).run(None, {input_name: x})[0]
        accuracy.append(float(np.mean(np.argmax(logits, axis=1) == labels)) * 100.0)
    return accuracy[0] - accuracy[1]


def profile_ops(path: Path, threads: int, feed: dict[str, np.ndarray], out: Path, tag: str, runs: int) -> dict[str, float]:
    """Median µs per run by op type (ORT's profiler, kernel events; warm-up runs left out), and
    the graph ORT runs after its own optimizations (OUT/TAG.ort.onnx)."""
    sess = session(path, threads, optimized=out / f"{tag}.ort.onnx", profile=out / tag)
    warmup = 10
    for _ in range(warmup + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[warmup:]
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in windows]
    starts = [w[0] for w in windows]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        index = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if 0 <= index < len(windows) and event["ts"] <= windows[index][1]:
            per_run[index][event["args"]["op_name"]] += event["dur"]
    ops = {op for run in per_run for op in run}
    medians = {op: statistics.median(run.get(op, 0.0) for run in per_run) for op in ops}
    return dict(sorted(medians.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--schedule", type=Path, default=GOLDEN / "int8_ort.opt")
    parser.add_argument("--profile", type=Path, help="write ORT-optimized graphs and per-op times here")
    parser.add_argument("--models-dir", type=Path, default=GOLDEN,
                        help="read NAME.onnx here instead of golden_models/ (inputs still from golden_models/)")
    parser.add_argument("--keep", type=Path, help="build the models here instead of a temporary folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        built = {name: build(name, work, args.schedule, args.models_dir) for name in args.models}
        for threads in args.threads:
            print(f"\nthreads={threads}  batch={BATCH}  runs={args.runs}")
            print(f"{'model':<12}{'fp32 µs':>10}{'int8 µs':>10}{'speedup':>9}{'cosine':>10}  notes")
            for name, (fp32, int8, input_name) in built.items():
                _, held = feeds_for(name)
                feed = {input_name: held}
                sessions = {"fp32": session(fp32, threads), "int8": session(int8, threads)}
                times = time_pair(sessions, feed, args.runs, threads)
                out32 = sessions["fp32"].run(None, feed)[0]
                out8 = sessions["int8"].run(None, feed)[0]
                notes = ""
                if name == "digits_cnn":
                    notes = f"top-1 drop {digits_top1_drop(fp32, int8, input_name):.2f} pts"
                print(f"{name:<12}{times['fp32']:>10.1f}{times['int8']:>10.1f}"
                      f"{times['fp32'] / times['int8']:>8.2f}x{cosine(out32, out8):>10.5f}  {notes}")
                if args.profile is not None:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    for tag, path in (("fp32", fp32), ("int8", int8)):
                        ops = profile_ops(path, threads, feed, args.profile, f"{name}.{tag}.t{threads}", 50)
                        summary = ", ".join(f"{op} {us:.1f}" for op, us in ops.items())
                        print(f"    {tag} µs/op-type: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
