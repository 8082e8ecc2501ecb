"""Sensitivity analysis cost: fast ranking against exhaustive, relative to the plain quantization.

Models: the golden unet (an encoder-decoder with a dense per-pixel output: the shape of a text
detector's segmentation head), resnet and mobilenet, calibrated on 64 rows made from their
inputs (bench/quant.py's rows); and the zoo's trained text detector (bench/zoo.py: a DBNet-style
MobileNetV3 + FPN at 320x320, calibrated on 16 text-like images, tested on 8 others). The
target cosine is set between the plain int8 model's cosine and 1 (a third of the way from 1,
on the calibration rows), so that the analysis has layers to keep in float.

Per model: wall time of `quantize` plain, with `sensitivity_ranking="fast"` and with
`"exhaustive"` (each measured in this process, one after another), the ratio to the plain time,
the cosine the analysis reports for the model it chose (a real rewrite run on the calibration
rows, the rows it searched on) against the target, the cosine on held-out rows, the layers kept
in float, and what the analysis ran: trials on the emulation model (one session, a run per
trial), sessions opened, and real runs (rewritten models: the check of the model chosen).

Run: `.venv/bin/python bench/quant_sensitivity.py` (`--models text_detector` for one).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GOLDEN, markdown_table
from latency import run_outputs, session
from quant import _rows

GOLDEN_MODELS = ("unet", "resnet", "mobilenet")
DETECTOR = "text_detector"
CALIB_ROWS = 64
TEST_ROWS = 32
# The detector is large (320x320 images): few rows keep the bench short.
DETECTOR_CALIB_ROWS = 16
DETECTOR_TEST_ROWS = 8
PREPARE = ("infer_shapes", "fold_constants", "fuse_bn_conv", "fuse_matmul_add", "eliminate_dead_code")


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    calibration: np.ndarray
    test: np.ndarray


def _case(name: str) -> Case:
    if name == DETECTOR:
        import zoo

        model = zoo.build(DETECTOR)
        return Case(name, model.path, model.calibration(DETECTOR_CALIB_ROWS), model.test(DETECTOR_TEST_ROWS))
    return Case(name, GOLDEN / f"{name}.onnx", _rows(name, CALIB_ROWS, seed=0), _rows(name, TEST_ROWS, seed=1))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def _quantize(path: Path, calib: Path, **options: object) -> tuple[bytes, float, dict]:
    from iropt.infra.pass_base import PassContext
    from iropt.infra.registry import create_pass
    from iropt.io.load import load_model

    model = load_model(path)
    ctx = PassContext()
    for step in PREPARE:
        create_pass(step, {}).run(model, ctx)
    start = time.perf_counter()
    # Placement by rules: measured placement keeps whole models float on CPUs where int8 does
    # not pay, and this bench is about which layers accuracy needs in float.
    result = create_pass("quantize", {"calibration": str(calib), "placement": "rules", **options}).run(model, ctx)
    seconds = time.perf_counter() - start
    return model.to_onnx().SerializeToString(), seconds, result.info


def _bench(case: Case, folder: Path, rankings: tuple[str, ...]) -> list[list[str]]:
    calib = folder / f"{case.name}.npz"
    np.savez(calib, input=case.calibration)
    calibration, evaluation = {"input": case.calibration}, {"input": case.test}
    reference = run_outputs(session(case.path), evaluation)
    calib_reference = run_outputs(session(case.path), calibration)

    def cos(model: bytes, feeds: dict, want: dict) -> float:
        got = run_outputs(session(model, level="disable"), feeds)
        return min(_cosine(want[k], got[k]) for k in want)

    plain, plain_s, _ = _quantize(case.path, calib)
    plain_cos = cos(plain, calibration, calib_reference)
    target = 1.0 - (1.0 - plain_cos) / 3
    rows = [[case.name, "plain", f"{plain_s:.1f}", "1.0x", f"{plain_cos:.6f}", f"{cos(plain, evaluation, reference):.6f}",
             "-", "-", "-", "-"]]
    for ranking in rankings:
        model, seconds, info = _quantize(case.path, calib, sensitivity=True, target_min=target,
                                         sensitivity_ranking=ranking, sensitivity_samples=len(case.calibration))
        met = "met" if info["score"] >= target else "NOT met"
        rows.append([
            case.name, f"{ranking} (target {target:.6f})", f"{seconds:.1f}", f"{seconds / plain_s:.1f}x",
            f"{info['score']:.6f} ({met})", f"{cos(model, evaluation, reference):.6f}", str(len(info["kept_float"])),
            str(info["emulation_runs"]), str(info["sessions"]), str(info["real_runs"]),
        ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[*GOLDEN_MODELS, DETECTOR])
    parser.add_argument("--rankings", nargs="*", default=["fast", "exhaustive"])
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += _bench(_case(name), Path(tmp), tuple(args.rankings))
    headers = ["model", "quantize", "time s", "vs plain", "cosine (calibration rows)", "cosine (held-out)",
               "kept float", "emulated trials", "sessions", "real runs"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
