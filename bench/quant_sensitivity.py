"""Sensitivity analysis cost: fast ranking against exhaustive, relative to the plain quantization.

Models: the golden unet (an encoder-decoder with a dense per-pixel output: the shape of a text
detector's segmentation head), resnet and mobilenet, calibrated on 64 rows made from their
inputs (bench/quant.py's rows). The target cosine is set between the plain int8 model's cosine
and 1 (a third of the way from 1), so that the analysis has layers to keep in float.

Per model: wall time of `quantize` plain, with `sensitivity_ranking="fast"` and with
`"exhaustive"` (each measured in this process, one after another), the ratio to the plain time,
the layers kept in float, the whole-model runs the analysis made, and the output cosine on 32
held-out rows.

Run: `.venv/bin/python bench/quant_sensitivity.py`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GOLDEN, markdown_table
from latency import run_outputs, session
from quant import _rows

MODELS = ("unet", "resnet", "mobilenet")
CALIB_ROWS = 64


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def _quantize(name: str, calib: Path, **options: object) -> tuple[bytes, float, dict]:
    from iropt.infra.pass_base import PassContext
    from iropt.infra.registry import create_pass
    from iropt.io.load import load_model

    model = load_model(GOLDEN / f"{name}.onnx")
    ctx = PassContext()
    for step in ("infer_shapes", "fold_constants", "fuse_bn_conv", "fuse_matmul_add", "eliminate_dead_code"):
        create_pass(step, {}).run(model, ctx)
    start = time.perf_counter()
    result = create_pass("quantize", {"calibration": str(calib), **options}).run(model, ctx)
    seconds = time.perf_counter() - start
    return model.to_onnx().SerializeToString(), seconds, result.info


def main() -> None:
    logging.disable(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            calib = Path(tmp) / f"{name}.npz"
            np.savez(calib, input=_rows(name, CALIB_ROWS, seed=0))
            evaluation = {"input": _rows(name, 32, seed=1)}
            reference = run_outputs(session(GOLDEN / f"{name}.onnx"), evaluation)
            calib_reference = run_outputs(session(GOLDEN / f"{name}.onnx"), {"input": _rows(name, CALIB_ROWS, 0)})

            def cos(model: bytes, feeds: dict, want: dict) -> float:
                got = run_outputs(session(model, level="disable"), feeds)
                return min(_cosine(want[k], got[k]) for k in want)

            plain, plain_s, _ = _quantize(name, calib)
            plain_cos = cos(plain, {"input": _rows(name, CALIB_ROWS, 0)}, calib_reference)
            target = 1.0 - (1.0 - plain_cos) / 3
            rows.append([name, "plain", f"{plain_s:.1f}", "1.0x", "-", "-", f"{cos(plain, evaluation, reference):.5f}"])
            for ranking in ("fast", "exhaustive"):
                model, seconds, info = _quantize(name, calib, sensitivity=True, target_min=target,
                                                 sensitivity_ranking=ranking, sensitivity_samples=CALIB_ROWS)
                rows.append([
                    name, f"{ranking} (target {target:.5f})", f"{seconds:.1f}", f"{seconds / plain_s:.1f}x",
                    str(len(info["kept_float"])), str(info["model_runs"]), f"{cos(model, evaluation, reference):.5f}",
                ])
    headers = ["model", "quantize", "time s", "vs plain", "kept float", "model runs", "cosine (held-out)"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
