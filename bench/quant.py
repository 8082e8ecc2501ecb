"""int8 quantization: iropt's `quantize` against ONNX Runtime's `quantize_static`, side by side.

Models: the golden conv models (digits_cnn, conv_bn, resnet, mobilenet, unet), batch 8, and the
trained third-party-style models of `bench/zoo.py`: the text-direction classifier (a depthwise
MobileNetV3, [8, 3, 48, 192]) and the DBNet-style text detector ([2, 3, 320, 320], batch 2 to
keep the bench short), calibrated and evaluated on their own text-like images.
Variants, all run by ONNX Runtime on the CPU at its default ALL optimization level:
- fp32: the original model;
- iropt: the `default` schedule, then `quantize(calibration=...)`, target `ort` (format ort:
  uint8 activations, int8 per-channel weights; method minmax; placement measured: layers that do
  not run faster in int8 on this machine stay float, and the model is checked end to end to be
  no slower than float; the pass's defaults);
- ORT defaults: `quantize_static` with its defaults (QDQ, int8 activations and weights,
  per-tensor, MinMax) on the original model;
- ORT best: `quant_pre_process` (ORT's recommended preparation: shape inference and ORT's
  basic optimizations, which fold BatchNormalization), then `quantize_static` with QDQ,
  activation_type=QUInt8, weight_type=QInt8, per_channel=True.

Calibration data, identical for every tool (a folder of .npz files of 8 rows each, read by
iropt as a feed folder and by ORT through a CalibrationDataReader): for digits_cnn the 128
images of golden_models/digits_cnn.calib.npz; for the others 128 rows made from the model's
inputs.npz (2 rows) replicated and perturbed with Gaussian noise (sigma = 0.25 x the inputs'
std, seed 0). Evaluation data, never used for calibration: digits_cnn's test split
(digits_cnn.test.npz, 450 images with labels) and, for the others, 32 rows made the same way
with seed 1. Latency is measured on one batch of 8 with 1 and with 2 intra-op threads, the
variants of a model interleaved round by round so that machine noise hits them alike.

Calibration cost: iropt's quantize (and ORT best, for reference) on 64 and on 512 rows, each
in a child process of its own; reported are the time of the quantize step and the peak RSS of
the child. Run: `.venv/bin/python bench/quant.py [--models resnet,unet]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GOLDEN, markdown_table
from latency import interleaved_latency_ms, op_profiles, peak_rss_mb, run_child, run_outputs, session

GOLDEN_MODELS = ["digits_cnn", "conv_bn", "resnet", "mobilenet", "unet"]
ZOO_MODELS = ["text_direction", "text_detector"]
MODELS = GOLDEN_MODELS + ZOO_MODELS
BATCH = 8
# The detector's 320x320 images: a smaller batch and fewer calibration rows keep the bench short.
ZOO_BATCH = {"text_detector": 2}
ZOO_CALIB_ROWS = {"text_detector": 32}
CALIB_ROWS = 128
EVAL_ROWS = 32
MEMORY_ROWS = (64, 512)
THREADS = (1, 2)
VARIANTS = ["fp32", "iropt", "ort_default", "ort_best"]
LABELS = {"fp32": "fp32", "iropt": "iropt int8", "ort_default": "ORT defaults", "ort_best": "ORT best"}
CHILD_TIMEOUT_S = 300.0

# Goals (the int8 speed goal is "never slower than fp32": the 2x of full-size networks is out of
# reach of ORT's int8 kernels on these small layers, see bench/quant_kernels.py).
MAX_TOP1_DROP = 0.3  # percentage points
MIN_COSINE = 0.99
MEMORY_SLACK = 0.10


# --- data ------------------------------------------------------------------------------------


def batch_of(name: str) -> int:
    return ZOO_BATCH.get(name, BATCH)


def calib_rows(name: str) -> int:
    return ZOO_CALIB_ROWS.get(name, CALIB_ROWS)


def model_path(name: str) -> Path:
    """The golden model's file, or the zoo model's (trained and cached by `zoo.build`)."""
    if name in ZOO_MODELS:
        import zoo

        return zoo.build(name).path
    return GOLDEN / f"{name}.onnx"


def _rows(name: str, count: int, seed: int) -> np.ndarray:
    """`count` input rows for model `name` (see the module docstring for where they come from);
    a zoo model's calibration images for seed 0, its test images otherwise."""
    if name in ZOO_MODELS:
        import zoo

        model = zoo.build(name)
        return (model.calibration(count) if seed == 0 else model.test(count)).astype(np.float32)
    rng = np.random.default_rng(seed)
    if name == "digits_cnn":
        base = np.load(GOLDEN / "digits_cnn.calib.npz")["input"]
        rows = np.concatenate([base] * (count // len(base) + 1))[:count]
        if count > len(base):  # beyond the 128 real images: perturbed copies, still pixels in [0, 1]
            noise = rng.normal(0, 0.05, rows.shape) * (np.arange(count) >= len(base))[:, None, None, None]
            rows = np.clip(rows + noise, 0.0, 1.0)
        return rows.astype(np.float32)
    base = np.load(GOLDEN / f"{name}.inputs.npz")["input"]
    rows = base[np.arange(count) % len(base)]
    return (rows + rng.normal(0, 0.25 * float(base.std()), rows.shape)).astype(np.float32)


def write_feed_folder(rows: np.ndarray, folder: Path, batch: int = BATCH) -> Path:
    """One .npz per batch of rows, keyed by the input name (`input` for every model here)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(rows), batch)):
        np.savez(folder / f"{index:05d}.npz", input=rows[start : start + batch])
    return folder


def read_feed_folder(folder: Path) -> Iterator[dict[str, np.ndarray]]:
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as data:
            yield {"input": data["input"]}


def eval_set(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Evaluation rows and, for digits_cnn, their labels."""
    if name == "digits_cnn":
        test = np.load(GOLDEN / "digits_cnn.test.npz")
        return test["input"].astype(np.float32), test["label"]
    return _rows(name, EVAL_ROWS, seed=1), None


# --- the quantizers ----------------------------------------------------------------------------


def quantize_iropt(model: Path, calibration: Path, out: Path) -> dict[str, Any]:
    """default schedule + quantize, target ort; returns total and quantize-pass seconds."""
    import logging

    from iropt.app.optimize import RunOptions, optimize
    from iropt.schedules import builtin_schedule_text

    logging.disable(logging.WARNING)
    text = (
        'target ort(providers=["CPUExecutionProvider"])\n'
        + (builtin_schedule_text("default") or "")
        + f"\nquantize(calibration={json.dumps(str(calibration))})\n"
    )
    schedule = out.with_suffix(".opt")
    schedule.write_text(text)
    start = time.perf_counter()
    outcome = optimize(RunOptions(schedule=str(schedule), model=model, output=out, verify=False, emit=False))
    seconds = time.perf_counter() - start
    record = next(r for r in outcome.report.records if r.name == "quantize")
    measuring = record.info.get("measured", {}).get("measuring_seconds")
    return {"seconds": seconds, "calibration_seconds": record.seconds, "stats": record.stats,
            "measuring_seconds": measuring}


class FolderReader:
    """ORT CalibrationDataReader over a feed folder (streams: one file in memory at a time)."""

    def __init__(self, folder: Path) -> None:
        self._files = iter(sorted(folder.glob("*.npz")))

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self._files, None)
        if path is None:
            return None
        with np.load(path) as data:
            return {"input": data["input"]}

    def rewind(self) -> None:  # part of the reader protocol in recent ORT versions
        pass


def quantize_ort(model: Path, calibration: Path, out: Path, *, best: bool) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    reader = type("Reader", (FolderReader, CalibrationDataReader), {})(calibration)
    start = time.perf_counter()
    if not best:
        quantize_static(str(model), str(out), reader)
        return {"seconds": time.perf_counter() - start}
    prepared = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(model), str(prepared))
    calibrating = time.perf_counter()
    quantize_static(
        str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
    )
    end = time.perf_counter()
    return {"seconds": end - start, "calibration_seconds": end - calibrating}


def child(tool: str, model: Path, calibration: Path, out: Path) -> None:
    """One calibration-cost measurement in a fresh process: time and peak RSS.

    Both tools' modules are imported first and the peak is then reset, so the peak is what
    loading, calibrating, rewriting and saving took on top of the interpreter and libraries.
    """
    import onnxruntime.quantization  # noqa: F401
    from latency import reset_peak_rss, rss_now_mb

    import iropt.app.optimize
    import iropt.passes.quantize

    iropt.app.optimize.load_pipeline("default")  # registers every pass, as a run would
    reset_peak_rss()
    before = rss_now_mb()
    if tool == "iropt":
        result = quantize_iropt(model, calibration, out)
    else:
        result = quantize_ort(model, calibration, out, best=True)
    result["peak_rss_mb"] = peak_rss_mb()
    result["rss_before_mb"] = before
    result.pop("stats", None)
    print(json.dumps(result))


# --- measurements ------------------------------------------------------------------------------


@dataclass
class ModelResult:
    name: str
    quantize: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[int, dict[str, float]] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)
    top1: dict[str, float] = field(default_factory=dict)
    memory: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    profile: dict[tuple[int, str], list[tuple[str, float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def warm_up(tmp: Path) -> None:
    """One untimed quantization by each tool, so no timed one pays for first-use imports.

    iropt's timing cache is a folder of the warm-up's own meanwhile, so the timed digits_cnn run
    measures its placement rather than finding it cached."""
    folder = write_feed_folder(_rows("digits_cnn", BATCH, seed=9), tmp / "warm-up")
    model = GOLDEN / "digits_cnn.onnx"
    saved = os.environ.get("IROPT_CACHE_DIR")
    os.environ["IROPT_CACHE_DIR"] = str(tmp / "warm-up-cache")
    try:
        quantize_iropt(model, folder, tmp / "warm-up.iropt.onnx")
    finally:
        if saved is None:
            del os.environ["IROPT_CACHE_DIR"]
        else:
            os.environ["IROPT_CACHE_DIR"] = saved
    quantize_ort(model, folder, tmp / "warm-up.ort.onnx", best=True)


def measure(name: str, tmp: Path) -> ModelResult:
    result = ModelResult(name)
    model = model_path(name)
    batch = batch_of(name)
    calibration = write_feed_folder(_rows(name, calib_rows(name), seed=0), tmp / f"{name}.calib", batch)
    paths = {"fp32": model}
    jobs = {
        "iropt": lambda out: quantize_iropt(model, calibration, out),
        "ort_default": lambda out: quantize_ort(model, calibration, out, best=False),
        "ort_best": lambda out: quantize_ort(model, calibration, out, best=True),
    }
    for variant, job in jobs.items():
        out = tmp / f"{name}.{variant}.onnx"
        try:
            result.quantize[variant] = job(out)
            paths[variant] = out
        except Exception as error:
            result.errors[variant] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    _accuracy(result, paths)
    feed = {"input": _rows(name, batch, seed=2)[-batch:]}
    for threads in THREADS:
        sessions = {v: session(p, threads=threads) for v, p in paths.items()}
        result.latency[threads] = interleaved_latency_ms(sessions, feed)
        if "iropt" in paths:
            pair = {v: paths[v] for v in ("fp32", "iropt")}
            for variant, profile in op_profiles(pair, feed, threads=threads, tmp=tmp).items():
                result.profile[threads, variant] = profile
    return result


def _accuracy(result: ModelResult, paths: dict[str, Path]) -> None:
    from iropt.verify.compare import compare
    from iropt.verify.criteria import Criterion

    rows, labels = eval_set(result.name)
    batch = batch_of(result.name)
    batches = [{"input": rows[i : i + batch]} for i in range(0, len(rows), batch)]
    reference = session(paths["fp32"], level="disable")
    expected = [run_outputs(reference, b) for b in batches]
    criterion = Criterion(metric="cosine", min=MIN_COSINE)
    for variant, path in list(paths.items()):
        try:
            sess = session(path)
            outputs = [run_outputs(sess, b) for b in batches]
        except Exception as error:  # a quantizer's model that ORT cannot run: reported, not timed
            result.errors[variant] = f"runs: {type(error).__name__}: {str(error).strip().splitlines()[0][-200:]}"
            del paths[variant]
            continue
        if variant != "fp32":
            comparison = compare(expected, outputs, criterion)
            result.cosine[variant] = min(o.cosine for o in comparison.outputs if o.cosine is not None)
        if labels is not None:
            logits = np.concatenate([next(iter(o.values())) for o in outputs])
            result.top1[variant] = float((logits.argmax(axis=1) == labels).mean() * 100.0)


def measure_memory(result: ModelResult, tmp: Path) -> None:
    model = model_path(result.name)
    for rows in MEMORY_ROWS:
        folder = write_feed_folder(_rows(result.name, rows, seed=3), tmp / f"{result.name}.mem{rows}")
        for tool in ("iropt", "ort_best"):
            out = tmp / f"{result.name}.mem{rows}.{tool}.onnx"
            args = [__file__, "--child", tool, str(model), str(folder), str(out)]
            result.memory.setdefault(tool, {})[rows] = run_child(args, CHILD_TIMEOUT_S)


# --- report ------------------------------------------------------------------------------------


def _speedup(r: ModelResult, threads: int, variant: str) -> float | None:
    lat = r.latency.get(threads, {})
    if variant not in lat or "fp32" not in lat:
        return None
    return lat["fp32"] / lat[variant]


def latency_table(results: Sequence[ModelResult], threads: int) -> str:
    rows = []
    for r in results:
        lat = r.latency.get(threads, {})
        cells = [r.name]
        for v in VARIANTS:
            if v not in lat:
                cells.append("failed")
                continue
            s = _speedup(r, threads, v)
            cells.append(f"{lat[v]:.3f}" + ("" if v == "fp32" or s is None else f" ({s:.2f}x)"))
        ratio = lat["iropt"] / lat["ort_best"] if "iropt" in lat and "ort_best" in lat else None
        cells.append("-" if ratio is None else f"{ratio:.2f}")
        rows.append(cells)
    headers = ["model", *[f"{LABELS[v]} ms" + ("" if v == "fp32" else " (speedup)") for v in VARIANTS],
               "iropt / ORT best"]
    return markdown_table(headers, rows)


def quality_table(results: Sequence[ModelResult]) -> str:
    rows = []
    for r in results:
        cells = [r.name]
        for v in VARIANTS[1:]:
            cells.append(f"{r.cosine[v]:.5f}" if v in r.cosine else "failed")
        for v in VARIANTS:
            cells.append(f"{r.top1[v]:.2f}" if v in r.top1 else "-")
        rows.append(cells)
    headers = ["model", *[f"cosine {LABELS[v]}" for v in VARIANTS[1:]], *[f"top-1 % {LABELS[v]}" for v in VARIANTS]]
    return markdown_table(headers, rows)


def quantize_time_table(results: Sequence[ModelResult]) -> str:
    rows = []
    for r in results:
        cells = [r.name]
        for v in VARIANTS[1:]:
            q = r.quantize.get(v)
            cells.append("failed" if q is None else f"{q['seconds']:.2f}")
        measuring = r.quantize.get("iropt", {}).get("measuring_seconds")
        cells.append("-" if measuring is None else f"{measuring:.2f}")
        stats = r.quantize.get("iropt", {}).get("stats", {})
        cells.append(", ".join(f"{k} {v}" for k, v in stats.items() if v) or "-")
        rows.append(cells)
    return markdown_table(["model", *[f"{LABELS[v]} s" for v in VARIANTS[1:]], "of which iropt measuring placement s",
                           "iropt quantize stats"], rows)


def memory_table(results: Sequence[ModelResult]) -> str:
    rows = []
    for r in results:
        if not r.memory:  # zoo models: their calibration cost is not measured
            continue
        for tool in ("iropt", "ort_best"):
            cells = [r.name, LABELS[tool]]
            by_rows = r.memory.get(tool, {})
            for n in MEMORY_ROWS:
                m = by_rows.get(n, {"error": "not run"})
                if "error" in m:
                    cells += [f"failed: {m['error']}", "-"]
                else:
                    cells += [f"{m.get('calibration_seconds') or m['seconds']:.2f}",
                              f"{m['peak_rss_mb']:.0f} (+{m['peak_rss_mb'] - m['rss_before_mb']:.0f})"]
            growth = _memory_growth(by_rows)
            cells.append("-" if growth is None else f"{growth * 100:+.1f}%")
            rows.append(cells)
    headers = ["model", "tool"]
    for n in MEMORY_ROWS:
        headers += [f"calibrate+quantize s @{n}", f"peak RSS MiB @{n} (+ over RSS before)"]
    headers.append(f"peak RSS @{MEMORY_ROWS[1]} vs @{MEMORY_ROWS[0]}")
    return markdown_table(headers, rows)


def _memory_growth(by_rows: dict[int, dict[str, Any]]) -> float | None:
    small, large = (by_rows.get(n, {}) for n in MEMORY_ROWS)
    if "peak_rss_mb" not in small or "peak_rss_mb" not in large:
        return None
    return float(large["peak_rss_mb"] / small["peak_rss_mb"] - 1.0)


def goals(results: Sequence[ModelResult]) -> list[str]:
    lines = []
    for threads in THREADS:
        slower = []
        for r in results:
            lat = r.latency.get(threads, {})
            if "iropt" not in lat:
                slower.append(f"{r.name} (iropt failed)")
            elif lat["iropt"] > lat["fp32"]:
                slower.append(f"{r.name} ({lat['fp32'] / lat['iropt']:.2f}x)")
        lines.append(_goal(f"int8 <= fp32 latency on every model, {threads} thread(s)", slower))
    for threads in THREADS:
        behind = []
        for r in results:
            lat = r.latency.get(threads, {})
            if "iropt" not in lat:
                behind.append(f"{r.name} (iropt failed)")
            elif "ort_best" in lat and lat["iropt"] > lat["ort_best"]:
                behind.append(f"{r.name} ({lat['iropt'] / lat['ort_best']:.2f}x ORT best's latency)")
        lines.append(_goal(f"iropt int8 at least as fast as quantize_static best, {threads} thread(s)", behind))
    digits = next((r for r in results if r.name == "digits_cnn"), None)
    if digits is not None and "fp32" in digits.top1:
        drop = digits.top1["fp32"] - digits.top1.get("iropt", 0.0)
        lines.append(_goal(f"digits top-1 drop <= {MAX_TOP1_DROP} points (fp32 {digits.top1['fp32']:.2f}%, "
                           f"iropt {digits.top1.get('iropt', float('nan')):.2f}%, drop {drop:.2f})",
                           [] if drop <= MAX_TOP1_DROP else [f"drop {drop:.2f}"]))
    worse = []
    for r in results:
        ours = r.cosine.get("iropt")
        theirs = max((r.cosine[v] for v in ("ort_default", "ort_best") if v in r.cosine), default=None)
        if ours is None or ours < MIN_COSINE or (theirs is not None and ours < theirs):
            worse.append(f"{r.name} (iropt {ours if ours is None else f'{ours:.5f}'}, best ORT "
                         f"{theirs if theirs is None else f'{theirs:.5f}'})")
    lines.append(_goal(f"cosine vs fp32 >= {MIN_COSINE} and not below either quantize_static variant", worse))
    measured = [r for r in results if r.memory]  # none with --no-memory; zoo models are not measured
    if not measured:
        return lines
    grew = []
    for r in measured:
        growth = _memory_growth(r.memory.get("iropt", {}))
        if growth is None or growth > MEMORY_SLACK:
            grew.append(f"{r.name} ({'failed' if growth is None else f'{growth * 100:+.1f}%'})")
    lines.append(_goal(f"iropt peak RSS calibrating {MEMORY_ROWS[1]} rows within {MEMORY_SLACK:.0%} of "
                       f"{MEMORY_ROWS[0]} rows", grew))
    return lines


def _goal(text: str, failures: list[str]) -> str:
    return f"- {'PASS' if not failures else 'FAIL'}: {text}" + ("" if not failures else ": " + "; ".join(failures))


def profile_notes(results: Sequence[ModelResult]) -> list[str]:
    """Where the time goes, fp32 against int8, for every model that misses the speedup goal."""
    notes = []
    for r in results:
        for threads in THREADS:
            s = _speedup(r, threads, "iropt")
            if s is None or s >= 1.0 or (threads, "iropt") not in r.profile:
                continue
            lat = r.latency[threads]
            notes.append(f"- {r.name}, {threads} thread(s): {s:.2f}x ({lat['fp32']:.3f} -> {lat['iropt']:.3f} ms). "
                         "Profile, ms per run: "
                         f"fp32 {_profile_text(r.profile.get((threads, 'fp32'), []))}; "
                         f"iropt int8 {_profile_text(r.profile[threads, 'iropt'])}")
    return notes


def _profile_text(profile: list[tuple[str, float]]) -> str:
    total = sum(ms for _, ms in profile)
    return f"total {total:.3f} = " + ", ".join(f"{op} {ms:.3f}" for op, ms in profile[:6])


def render(results: Sequence[ModelResult], with_memory: bool) -> str:
    parts = ["Goals:", "", *goals(results), ""]
    for threads in THREADS:
        parts += [f"#### ORT CPU latency, batch {BATCH} ({', '.join(f'{k} {v}' for k, v in ZOO_BATCH.items())}), "
                  f"{threads} intra-op thread(s), ms (median; speedup vs fp32)",
                  "", latency_table(results, threads), ""]
    parts += ["#### Output cosine vs fp32 (min over outputs) and digits top-1 (450 test images)", "",
              quality_table(results), ""]
    parts += ["#### Quantization wall time (load, passes or preprocessing, calibration, save), s", "",
              quantize_time_table(results), ""]
    if with_memory:
        parts += ["#### Calibration cost, 64 vs 512 rows (each in a fresh process)", "", memory_table(results), ""]
    notes = profile_notes(results)
    if notes:
        parts += ["#### Where the time goes where int8 is slower than fp32 (ORT profiler, 200 runs of each, interleaved; its "
                  "totals run higher than the latencies above because profiling adds overhead)", "", *notes, ""]
    errors = [f"- {r.name} {v}: {e}" for r in results for v, e in r.errors.items()]
    if errors:
        parts += ["#### Failures", "", *errors, ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated golden model names")
    parser.add_argument("--no-memory", action="store_true", help="skip the 64 vs 512 calibration runs")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tool, model, calibration, out = args.child
        child(tool, Path(model), Path(calibration), Path(out))
        return
    ort.set_default_logger_severity(3)
    results = []
    with tempfile.TemporaryDirectory(prefix="iropt-bench-quant-") as tmp:
        warm_up(Path(tmp))
        for name in args.models.split(","):
            print(f"quant: {name}", file=sys.stderr, flush=True)
            result = measure(name, Path(tmp))
            if not args.no_memory and name in GOLDEN_MODELS:
                measure_memory(result, Path(tmp))
            results.append(result)
    print(render(results, not args.no_memory))


if __name__ == "__main__":
    main()
