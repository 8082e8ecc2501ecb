"""Structured channel pruning: iropt's `prune_channels` against Torch-Pruning, without fine-tuning.

1. digits_cnn (golden_models/digits_cnn.onnx, trained on sklearn's digits, 98-99% top-1): test
   accuracy (450 held-out images) at ratios 0.1 / 0.2 / 0.3 / 0.5 for every importance criterion,
   with and without least-squares reconstruction (calibration: the 128 images of
   digits_cnn.calib.npz), against Torch-Pruning's MetaPruner on the same weights (magnitude L1,
   L2 and BatchNorm-scale importance; the head is ignored, as iropt keeps the graph output).
   `round_to=1`, so both remove the same number of channels (the channels column shows them).
2. A ResNet-style classifier (basic blocks 32-64-128-256 channels, 3x96x96 input, random He
   weights with BatchNormalization) at ratio 0.3, l1: MACs and ONNX Runtime CPU latency (1
   thread, batch 1, median, variants interleaved) against the unpruned model, with `round_to` 8
   and 1 (what rounding the kept channels to a multiple of 8 is worth).
3. A transformer encoder trained on Python's bundled documentation (bench/text_encoder.py):
   MatMul weight parameters and output cosine against fp32 on 128 held-out text windows.
4. Pruning time and peak memory (child process, max RSS) against model size (the ResNet-style
   model at widths x1, x2, x4, output_error + reconstruction on 64 calibration rows).

Run: `.venv/bin/python bench/prune.py [--only digits,resnet,transformer,scaling]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GOLDEN, ROOT, markdown_table
from bench.text_encoder import build_text_encoder
from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.io.load import load_model
from iropt.ir.model import Model

RATIOS = (0.1, 0.2, 0.3, 0.5)
CRITERIA = ("l1", "l2", "bn_gamma", "activation", "output_error")
CACHE = ROOT / "out" / "bench_cache"
logging.getLogger("iropt").setLevel(logging.ERROR)


def _session(model: Model | Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    data = model.to_onnx().SerializeToString() if isinstance(model, Model) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _golden_build() -> Any:
    """golden_models/build.py as a module (its graph builder and the digits network)."""
    if "golden_build" not in sys.modules:
        spec = importlib.util.spec_from_file_location("golden_build", GOLDEN / "build.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["golden_build"] = module
        spec.loader.exec_module(module)
    return sys.modules["golden_build"]


def _prune(path: Path, calibration: str | None, **options: Any) -> tuple[Model, dict[str, Any], float]:
    model = load_model(path)
    start = time.perf_counter()
    result = create_pass("prune_channels", options).run(model, PassContext(calibration=calibration))
    return model, result.info.get("prune_channels", {}), time.perf_counter() - start


# --- 1. digits ------------------------------------------------------------------------------


def _digits_accuracy(model: Model | Path) -> float:
    test = np.load(GOLDEN / "digits_cnn.test.npz")
    logits = _session(model, 2).run(None, {"input": test["input"]})[0]
    return float((logits.argmax(1) == test["label"]).mean())


def _torch_digits_net() -> Any:
    import torch

    net = _golden_build()._digits_net()
    weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
               for t in onnx.load(str(GOLDEN / "digits_cnn.onnx")).graph.initializer}
    missing = net.load_state_dict(weights, strict=False).missing_keys
    assert all(key.endswith("num_batches_tracked") for key in missing), missing
    return net.eval()


def _torch_pruning(kind: str, ratio: float) -> tuple[float, list[int]]:
    import torch
    import torch_pruning as tp

    net = _torch_digits_net()
    importance = {
        "l1": tp.importance.MagnitudeImportance(p=1),
        "l2": tp.importance.MagnitudeImportance(p=2),
        "bn_gamma": tp.importance.BNScaleImportance(),
    }[kind]
    pruner = tp.pruner.MetaPruner(
        net, torch.zeros(1, 1, 8, 8), importance=importance, pruning_ratio=ratio, ignored_layers=[net.head]
    )
    pruner.step()
    test = np.load(GOLDEN / "digits_cnn.test.npz")
    with torch.no_grad():
        logits = net(torch.from_numpy(test["input"])).numpy()
    channels = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    return float((logits.argmax(1) == test["label"]).mean()), channels


def bench_digits() -> str:
    path = GOLDEN / "digits_cnn.onnx"
    calibration = str(GOLDEN / "digits_cnn.calib.npz")
    rows = [["fp32 (unpruned)", *(f"{_digits_accuracy(path):.4f}" for _ in RATIOS), "16-32-32", "-"]]
    best: dict[float, float] = {}
    for criterion in CRITERIA:
        for refit in (False, True):
            cells, channels, seconds = [], "", []
            for ratio in RATIOS:
                model, info, spent = _prune(path, calibration, ratio=ratio, round_to=1, importance=criterion,
                                            reconstruct=refit)
                accuracy = _digits_accuracy(model)
                best[ratio] = max(best.get(ratio, 0.0), accuracy)
                cells.append(f"{accuracy:.4f}")
                channels = "-".join(str(g["channels_after"]) for g in info["groups"][:3])
                seconds.append(spent)
            label = f"iropt {criterion}" + (" + reconstruction" if refit else "")
            rows.append([label, *cells, channels + " (at 0.5)", f"{np.median(seconds):.2f}"])
    tp_best: dict[float, float] = {}
    for kind in ("l1", "l2", "bn_gamma"):
        cells, channels = [], []
        for ratio in RATIOS:
            accuracy, channels = _torch_pruning(kind, ratio)
            tp_best[ratio] = max(tp_best.get(ratio, 0.0), accuracy)
            cells.append(f"{accuracy:.4f}")
        rows.append([f"Torch-Pruning {kind}", *cells, "-".join(map(str, channels)) + " (at 0.5)", "-"])
    table = markdown_table(
        ["method", *(f"top-1 @ {r}" for r in RATIOS), "channels kept", "median s"], rows
    )
    verdict = ", ".join(
        f"{r}: iropt best {best[r]:.4f} vs Torch-Pruning best {tp_best[r]:.4f}" for r in RATIOS
    )
    return f"### digits_cnn: top-1 on the test split without fine-tuning\n\n{table}\n\nBest per ratio: {verdict}.\n"


# --- 2. ResNet-style: MACs and latency ------------------------------------------------------


def resnet_style(width: int = 32, size: int = 96, seed: int = 0) -> Path:
    """A ResNet-style classifier (4 stages of basic blocks) built with golden_models/build.py's helpers."""
    build = _golden_build()
    b = build.GraphBuilder(np.random.default_rng(seed))
    x = build._conv_bn_relu(b, "input", "stem", 3, width, stride=2)
    c = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        out = width * mult
        x = build._basic_block(b, x, f"s{stage}a", c, out, stride=1 if stage == 0 else 2)
        x = build._basic_block(b, x, f"s{stage}b", out, out, stride=1)
        c = out
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    b.op("Gemm", [x, b.he("fc.weight", [10, c], c), b.small("fc.bias", [10])], "fc", "logits", transB=1)
    graph = b.graph("resnet_style", [build.tensor("input", ["N", 3, size, size])], [build.tensor("logits", ["N", 10])])
    proto = build.make_model(graph, "ResNet-style bench model")
    path = CACHE / f"resnet_style_w{width}_s{size}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _macs(info: dict[str, Any]) -> tuple[int, int]:
    return sum(r["macs_before"] for r in info["layers"]), sum(r["macs_after"] for r in info["layers"])


def _latency(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], rounds: int = 30) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feed)
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) * 1000 for name, values in times.items()}


def bench_resnet() -> str:
    path = resnet_style()
    variants = {"unpruned": load_model(path)}
    infos = {}
    for round_to in (8, 1):
        model, info, _ = _prune(path, None, ratio=0.3, round_to=round_to, importance="l1")
        variants[f"ratio 0.3, round_to={round_to}"] = model
        infos[f"ratio 0.3, round_to={round_to}"] = info
    feed = {"input": np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)}
    latency = _latency({name: _session(model) for name, model in variants.items()}, feed)
    base_macs = _macs(next(iter(infos.values())))[0]
    rows = [["unpruned", f"{base_macs / 1e6:.1f}", "-", f"{latency['unpruned']:.2f}", "-"]]
    for name, info in infos.items():
        macs = _macs(info)[1]
        rows.append([name, f"{macs / 1e6:.1f}", f"{100 * (macs / base_macs - 1):+.1f}%",
                     f"{latency[name]:.2f}", f"{100 * (latency[name] / latency['unpruned'] - 1):+.1f}%"])
    table = markdown_table(["model", "MMACs", "MACs", "ORT latency ms (1 thread, batch 1)", "latency"], rows)
    return f"### ResNet-style (32-64-128-256 channels, 3x96x96): ratio 0.3, l1\n\n{table}\n"


# --- 3. transformer encoder -----------------------------------------------------------------


def _matmul_params(model: Model) -> int:
    return sum(
        int(np.prod(n.inputs[1].shape)) for n in model.graph.nodes
        if n.op == "MatMul" and hasattr(n.inputs[1], "values")
    )


def _cosines(want: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    flat = float(np.dot(want.ravel(), got.ravel()) / (np.linalg.norm(want) * np.linalg.norm(got)))
    a, b = want.reshape(-1, want.shape[-1]), got.reshape(-1, got.shape[-1])
    per_token = float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
    return flat, per_token


def _simplified(path: Path, inputs: Path) -> Path:
    """The model after iropt's `default` schedule: run-time Reshape targets become constants."""
    out = path.with_name(path.stem + ".default.onnx")
    if not out.exists():
        subprocess.run([str(Path(sys.executable).with_name("iropt")), "run", "default", str(path), "-o", str(out),
                        "--inputs", str(inputs), "-q"], check=True)
    return out


def bench_transformer() -> str:
    files = build_text_encoder(CACHE)
    test = {"ids": np.load(files.test)["ids"]}
    # The exporter computes the head-split Reshape targets at run time (Shape ops, for the dynamic
    # batch), which hides the heads; `default` makes them constants, so heads are pruned too.
    path = _simplified(files.model, files.test)
    base = load_model(path)
    want = _session(base, 2).run(None, test)[0]
    base_params = _matmul_params(base)
    rows = []
    for ratio in (0.35, 0.5, 0.8):
        for criterion, refit in (("l1", False), ("output_error", False), ("output_error", True)):
            model, info, spent = _prune(path, str(files.calibration), ratio=ratio, importance=criterion,
                                        reconstruct=refit)
            flat, per_token = _cosines(want, _session(model, 2).run(None, test)[0])
            params = _matmul_params(model)
            label = f"{criterion}" + (" + reconstruction" if refit else "")
            hidden = "/".join(str(g["channels_after"]) for g in info["groups"] if g["channels_before"] == 512)
            heads = "/".join(str(g["channels_after"]) for g in info["groups"] if g["channels_before"] == 4)
            rows.append([f"{ratio}", label, hidden, heads, f"{100 * (params / base_params - 1):+.1f}%",
                         f"{flat:.4f}", f"{per_token:.4f}", f"{spent:.1f}"])
    table = markdown_table(
        ["ratio", "importance", "FFN hidden kept", "heads kept", "MatMul params", "cosine", "mean token cosine", "s"],
        rows,
    )
    meta = files.meta
    return (
        "### Transformer encoder trained on Python's documentation (bench/text_encoder.py)\n\n"
        f"d={meta['config']['width']}, {meta['config']['layers']} layers, {meta['config']['heads']} heads, "
        f"FFN {meta['config']['hidden']}, seq {meta['config']['seq']}; masked-byte accuracy "
        f"{meta['masked_byte_accuracy']:.3f} after {meta['config']['steps']} steps; {base_params} MatMul weight "
        "parameters. Calibration: 256 windows of the training text; test: 128 windows of the held-out 10%. "
        "Pruned after `default` (run-time head-split Reshape targets become constants), local scope, "
        "round_to 8; the residual stream stays (embedding Gather, LayerNorm).\n\n"
        f"{table}\n"
    )


# --- 4. time and memory against model size --------------------------------------------------


def _child(path: Path, calibration: Path) -> None:
    start = time.perf_counter()
    _prune(path, str(calibration), ratio=0.3, importance="output_error", reconstruct=True, max_samples=64,
           batch_size=16)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _baseline_rss() -> float:
    code = "import onnxruntime, onnx_graphsurgeon, iropt.passes, resource; " \
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def bench_scaling() -> str:
    rows = []
    floor = _baseline_rss()
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calib.npz"
        np.savez(calibration, input=np.random.default_rng(0).standard_normal((64, 3, 64, 64)).astype(np.float32))
        for width in (16, 32, 64):
            path = resnet_style(width=width, size=64)
            size_mib = path.stat().st_size / 2**20
            out = subprocess.run([sys.executable, __file__, "--child", str(path), str(calibration)],
                                 capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append([f"x{width // 16}", f"{size_mib:.1f}", f"{result['seconds']:.1f}",
                         f"{result['max_rss_mib']:.0f}", f"{result['max_rss_mib'] - floor:.0f}"])
    table = markdown_table(["ResNet-style width", "model MiB", "prune s", "peak RSS MiB", "over import floor"], rows)
    return (
        "### Pruning time and peak memory against model size\n\n"
        "ResNet-style at 3x64x64, ratio 0.3, output_error + reconstruction, 64 calibration rows in batches "
        f"of 16; import floor (python + onnxruntime + iropt) {floor:.0f} MiB.\n\n{table}\n"
    )


BENCHES = {"digits": bench_digits, "resnet": bench_resnet, "transformer": bench_transformer, "scaling": bench_scaling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHES))
    parser.add_argument("--child", nargs=2, type=Path)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    start = time.perf_counter()
    for name in args.only.split(","):
        print(BENCHES[name]())
        sys.stdout.flush()
    print(f"_bench wall time {time.perf_counter() - start:.0f} s._")


if __name__ == "__main__":
    main()
