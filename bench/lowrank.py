"""Low-rank factorization: accuracy and output fidelity against parameters kept, and its cost.

1. digits_cnn (trained on scikit-learn's digits, golden_models/): after the exact `default`
   schedule (BatchNormalization folded into the Conv), `low_rank` with `params_ratio` 0.9 / 0.75
   / 0.5 of the Conv and Gemm weights, `svd` and `whitened` (calibrated on the 128 images of
   digits_cnn.calib.npz), top-1 on the 450 held-out test images. Ranks are multiples of 8 (the
   default) and, since these layers are only 16-32 channels wide, of 4 as well. A table and a plot
   (bench/lowrank_digits.png) of accuracy against the weights kept.
2. A trained text encoder (bench/text_encoder.py) on real text: `params_ratio=0.8` of its MatMul
   weights with weight SVD, whitened SVD at the same rank in every layer of a shape, and
   whitened SVD with the error-driven allocation; the cosine of the pooled sentence embedding
   against fp32 on held-out sentences, the predicted and measured relative error per layer, and
   ONNX Runtime CPU latency before and after.
3. Factorization time against model size: MLPs of growing width, whitened, calibration included.

Run: `.venv/bin/python bench/lowrank.py [--skip-text]`; prints markdown.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GOLDEN, markdown_table, median_seconds  # noqa: E402

from iropt.dsl import load_schedule  # noqa: E402
from iropt.model import Model  # noqa: E402
from iropt.pass_infra import PassContext, PassResult  # noqa: E402
from iropt.pass_manager import PassManager  # noqa: E402
from iropt.registry import create_pass  # noqa: E402

BENCH = Path(__file__).resolve().parent
RATIOS = (0.9, 0.75, 0.5)
LOG = logging.getLogger("bench.lowrank")


def session(proto: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def low_rank(model: Model, calibration: str | None, **options: Any) -> tuple[Model, PassResult, float]:
    """A factorized copy of `model`, the pass result and the seconds it took."""
    candidate = model.copy()
    pass_ = create_pass("low_rank", options)
    start = time.perf_counter()
    result = pass_.run(candidate, PassContext(calibration=calibration, log=LOG))
    return candidate, result, time.perf_counter() - start


def kept_ratio(result: PassResult) -> float:
    return result.stats["params_after"] / result.stats["params_before"] if result.stats.get("params_before") else 1.0


# --- 1. digits ---------------------------------------------------------------------------


def digits() -> tuple[str, list[dict[str, Any]]]:
    model = Model.from_onnx(onnx.load(str(GOLDEN / "digits_cnn.onnx")))
    PassManager().run(model, load_schedule("default"), PassContext(log=LOG))
    test = np.load(GOLDEN / "digits_cnn.test.npz")
    images, labels = test["input"], test["label"]

    def accuracy(candidate: Model) -> float:
        logits = session(candidate.to_onnx()).run(None, {"input": images})[0]
        return float(np.mean(np.argmax(logits, axis=1) == labels))

    calibration = str(GOLDEN / "digits_cnn.calib.npz")
    rows: list[dict[str, Any]] = [{"method": "fp32", "multiple": "-", "target": 1.0, "kept": 1.0,
                                   "accuracy": accuracy(model)}]
    for multiple in (8, 4):
        for ratio in RATIOS:
            for method in ("svd", "whitened"):
                candidate, result, _ = low_rank(
                    model, calibration if method == "whitened" else None, method=method,
                    params_ratio=ratio, rank_multiple=multiple, min_params=1024,
                )
                rows.append({
                    "method": method, "multiple": multiple, "target": ratio, "kept": kept_ratio(result),
                    "accuracy": accuracy(candidate),
                    "ranks": ", ".join(f"{r['layer'].split()[0]}:{r['rank'][0]}" for r in result.info["layers"]),
                })
    table = markdown_table(
        ["method", "rank multiple", "params_ratio", "weights kept", "top-1", "ranks"],
        [[r["method"], str(r["multiple"]), f"{r['target']:.2f}", f"{r['kept']:.3f}", f"{100 * r['accuracy']:.2f}%",
          r.get("ranks", "-")] for r in rows],
    )
    return table, rows


def plot_digits(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fp32 = rows[0]["accuracy"] * 100
    for method, marker in (("svd", "o"), ("whitened", "s")):
        for multiple, style in ((8, "-"), (4, "--")):
            points = sorted((r["kept"], r["accuracy"] * 100) for r in rows
                            if r["method"] == method and r["multiple"] == multiple)
            ax.plot(*zip(*points, strict=True), style, marker=marker, label=f"{method}, ranks x{multiple}")
    ax.axhline(fp32, color="gray", lw=0.8, label=f"fp32 {fp32:.1f}%")
    ax.axhline(95, color="red", lw=0.8, ls=":", label="goal 95% at 0.75")
    ax.set_xlabel("Conv/Gemm weights kept (fraction)")
    ax.set_ylabel("top-1 on 450 held-out digits (%)")
    ax.set_title("digits_cnn: low_rank accuracy against weights kept")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- 3. factorization time -----------------------------------------------------------------


def mlp(width: int, depth: int, rng: np.random.Generator) -> Model:
    nodes, inits = [], []
    current = "x"
    for i in range(depth):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(onnx.helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        nodes.append(onnx.helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
        current = f"r{i}"
    graph = onnx.helper.make_graph(
        nodes, "mlp", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", width])],
        [onnx.helper.make_tensor_value_info(current, onnx.TensorProto.FLOAT, None)], inits,
    )
    return Model.from_onnx(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def timing(tmp: Path) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for width in (128, 256, 512, 1024):
        model = mlp(width, 4, rng)
        path = tmp / f"calib{width}.npz"
        np.savez(path, x=rng.standard_normal((512, width)).astype(np.float32))
        _, _, svd_s = low_rank(model, None, method="svd", params_ratio=0.5)
        _, result, whitened_s = low_rank(model, str(path), params_ratio=0.5)
        rows.append([str(width), f"{4 * width * width / 1e6:.2f}", f"{svd_s:.2f}", f"{whitened_s:.2f}",
                     str(result.stats["factorized"])])
    return markdown_table(
        ["width", "weights (M)", "svd (s)", "whitened incl. 512-row calibration (s)", "layers"], rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-text", action="store_true", help="leave out the text encoder")
    args = parser.parse_args(argv)
    table, rows = digits()
    plot = BENCH / "lowrank_digits.png"
    plot_digits(rows, plot)
    print("### digits_cnn: top-1 against Conv/Gemm weights kept\n")
    print(table)
    at = {(r["method"], r["multiple"]): r["accuracy"] for r in rows if r["target"] == 0.75}
    best = max(at.values())
    print(f"\nGoal >= 95% at params_ratio 0.75: {'PASS' if best >= 0.95 else 'FAIL'} "
          f"(best {100 * best:.2f}%). Plot: bench/{plot.name}\n")
    if not args.skip_text:
        from lowrank_text import text_section

        print(text_section(LOG))
    with tempfile.TemporaryDirectory() as tmp:
        print("### Factorization time against model size (4-layer MLP, params_ratio 0.5)\n")
        print(timing(Path(tmp)))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
