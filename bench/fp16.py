"""float16: iropt's `convert_fp16` against onnxconverter-common's float16 converter, side by side.

Models:
- every golden model, calibrated and evaluated on its stored inputs (golden_models/*.inputs.npz;
  digits_cnn on its 450 test images, calibrated on its calibration split);
- models of the kinds users bring, built here with torch (random weights, PyTorch's default
  initialisation; no downloaded weights): `detector` (strided conv backbone with BatchNorm, an
  FPN-style nearest upsample and lateral add, a box head decoded with sigmoid/exp on an anchor
  grid built with Range; it outputs every decoded box and score, as YOLO-style exports do, and
  the indices of the top 20 scores from a TopK), `ocr_crnn` (conv stack, a
  bidirectional LSTM over the width, per-column log-softmax over 37 symbols), `transformer_lm`
  (token and position embeddings, 2 pre-norm blocks of causal self-attention with the mask
  added as float32's lowest value, as Hugging Face exports do, GELU MLP, LM head over 1000
  tokens), and `raw_pixels` (pixels 0..255 into convs without normalisation and a squared
  energy feature whose activations pass 65504: float16 overflows unless the nodes stay float32).

Both converters keep float32 inputs and outputs (iropt's default; `keep_io_types=True` for the
peer). Outputs are compared with the float32 model's through ONNX Runtime on the CPU (graph
optimizations off); cosine is over every float output, the minimum over outputs; integer
outputs (the detector's top-20 indices) are reported as the fraction of the float32 model's
top-20 set that the float16 model also selects: the detector's random weights give scores within
a few float16 steps of each other, so the selection is where float16 shows. "fp16 weights" is the share of
float weight elements stored in float16. "loads strictly" is ONNX Runtime with
`session.strict_shape_type_inference` (a Cast or value whose type disagrees fails there) and the
full ONNX checker.

Cosine is taken twice. "ORT CPU" runs the float16 model on ONNX Runtime's CPU provider, which
has float16 kernels for few ops and computes the rest in float32 between Casts it inserts and
then drops between neighbours: range and rounding of intermediate values stay float32's, so an
overflow a GPU would hit does not show. "fp16 emulated" runs `iropt.compress.fp16.emulate`'s
rewrite of the float16 model, which rounds every float16 value through float16 with explicit
Casts: float16's range and storage precision, float32 arithmetic inside each kernel (as GPU
kernels accumulate). The goal is checked on both.

`iropt bench` then times the float32 and the iropt float16 model of `resnet` and
`transformer_lm` on ONNX Runtime's CPU provider (1 thread, 100 runs in 10 interleaved rounds):
the CPU has float16 kernels for few ops and wraps the rest in Casts, so float16 is for GPUs and
TensorRT; on the CPU only accuracy is checked.

A further table asks ONNX Runtime's CPU provider, op by op, what it does with a float16 node: a
kernel of its own, a float32 kernel wrapped in Casts it inserts itself, or a refusal. That is
what the pass's default block list and the schema check rest on.

Run: `.venv/bin/python bench/fp16.py [--models resnet,detector]`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GOLDEN, golden_models, markdown_table

from iropt.compress.fp16.emulate import emulate_half
from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.io.load import load_model
from iropt.io.save import save_model

MIN_COSINE = 0.999
MIN_HALF_WEIGHTS = 0.90
BUILT = ["detector", "ocr_crnn", "transformer_lm", "raw_pixels"]


# --- the models built with torch ------------------------------------------------------------


def _torch_models() -> dict[str, Callable[[], tuple[Any, Any, list[str], list[str]]]]:
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)

    def conv_bn(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class Detector(nn.Module):
        def __init__(self, classes: int = 5, top: int = 20) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = conv_bn(3, 16, 2), conv_bn(16, 32, 2), conv_bn(32, 64, 2)
            self.lateral = nn.Conv2d(64, 32, 1)
            self.smooth = conv_bn(32, 32, 1)
            self.head = nn.Conv2d(32, 4 + classes, 1)
            self.top = top
            for bn in self.modules():  # trained-looking BatchNorm statistics, not the identity
                if isinstance(bn, nn.BatchNorm2d):
                    bn.running_mean.uniform_(-0.2, 0.2)
                    bn.running_var.uniform_(0.5, 2.0)

        def forward(self, x: Any) -> Any:
            c2 = self.c2(self.c1(x))
            c3 = self.c3(c2)
            p2 = self.smooth(c2 + F.interpolate(self.lateral(c3), scale_factor=2.0, mode="nearest"))
            p = self.head(p2)
            n, _, h, w = p.shape
            stride = x.shape[-1] / w
            ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
            xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
            cx = (torch.sigmoid(p[:, 0]) + xs) * stride
            cy = (torch.sigmoid(p[:, 1]) + ys) * stride
            bw = torch.exp(p[:, 2].clamp(max=4.0)) * stride * 2
            bh = torch.exp(p[:, 3].clamp(max=4.0)) * stride * 2
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).reshape(n, -1, 4)
            scores = torch.sigmoid(p[:, 4:]).amax(dim=1).reshape(n, -1)
            _, index = torch.topk(scores, self.top, dim=1)
            return boxes, scores, index

    class Crnn(nn.Module):
        def __init__(self, symbols: int = 37) -> None:
            super().__init__()
            self.features = nn.Sequential(
                conv_bn(1, 32, 1), nn.MaxPool2d(2), conv_bn(32, 64, 1), nn.MaxPool2d(2),
                conv_bn(64, 96, 1), nn.MaxPool2d((2, 1)), conv_bn(96, 96, 1),
            )
            self.rnn = nn.LSTM(96, 64, bidirectional=True)
            self.out = nn.Linear(128, symbols)

        def forward(self, x: Any) -> Any:
            f = self.features(x).mean(dim=2).permute(2, 0, 1)  # (width, batch, channels)
            h, _ = self.rnn(f)
            return F.log_softmax(self.out(h), dim=-1)

    class Block(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x: Any, mask: Any) -> Any:
            n, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            attention = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + mask, dim=-1)
            x = x + self.proj((attention @ v).transpose(1, 2).reshape(n, t, d))
            return x + self.mlp(self.norm2(x))

    class TransformerLm(nn.Module):
        def __init__(self, vocab: int = 1000, d: int = 128, length: int = 32) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.position = nn.Parameter(torch.randn(1, length, d) * 0.02)
            self.blocks = nn.ModuleList([Block(d, 4), Block(d, 4)])
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)
            lowest = torch.finfo(torch.float32).min
            self.register_buffer("mask", torch.triu(torch.full((length, length), lowest), diagonal=1))

        def forward(self, ids: Any) -> Any:
            x = self.embed(ids) + self.position
            for block in self.blocks:
                x = block(x, self.mask)
            return self.head(self.norm(x))

    class RawPixels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 128, 3, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            h = F.relu(self.conv2(F.relu(self.conv1(x))))
            energy = (h * h).sum(dim=1).mean(dim=(1, 2))  # passes 65504 on 0..255 pixels
            return self.fc(torch.sqrt(energy).unsqueeze(1).expand(-1, 32))

    generator = np.random.default_rng(0)
    return {
        "detector": lambda: (Detector(), generator.standard_normal((2, 3, 64, 64)).astype(np.float32),
                             ["image"], ["boxes", "scores", "top_index"]),
        "ocr_crnn": lambda: (Crnn(), generator.standard_normal((2, 1, 32, 128)).astype(np.float32),
                             ["image"], ["log_probs"]),
        "transformer_lm": lambda: (TransformerLm(), generator.integers(0, 1000, (2, 32)).astype(np.int64),
                                   ["ids"], ["logits"]),
        "raw_pixels": lambda: (RawPixels(), generator.uniform(0, 255, (2, 3, 32, 32)).astype(np.float32),
                               ["pixels"], ["logits"]),
    }


def build_model(name: str, folder: Path) -> tuple[Path, Path]:
    """Export the torch model `name` into `folder`; returns the model and its inputs (.npz)."""
    import torch

    from iropt.lowering.torch_frontend import export_module

    module, example, inputs, outputs = _torch_models()[name]()
    path = folder / f"{name}.onnx"
    export_module(module, torch.from_numpy(example), path, input_names=inputs, output_names=outputs)
    feeds = folder / f"{name}.inputs.npz"
    np.savez(feeds, **{inputs[0]: example})
    return path, feeds


# --- measuring one conversion ---------------------------------------------------------------


@dataclass
class Outcome:
    seconds: float = 0.0
    cosine: float | None = None
    emulated: float | None = None
    index_match: float | None = None
    half_weights: float = 0.0
    size_ratio: float = 0.0
    casts: int = 0
    kept: list[str] = field(default_factory=list)
    strict: str = "yes"
    error: str | None = None


def session(source: onnx.ModelProto | str, strict: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if strict:
        options.add_session_config_entry("session.strict_shape_type_inference", "1")
    model = source.SerializeToString() if isinstance(source, onnx.ModelProto) else source
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name: feeds[i.name] for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, wanted), strict=True))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    denominator = np.linalg.norm(x) * np.linalg.norm(y)
    return float(np.dot(x, y) / denominator) if denominator else float(np.array_equal(x, y))


def half_weight_share(proto: onnx.ModelProto) -> float:
    sizes = {TensorProto.FLOAT: 0, TensorProto.FLOAT16: 0}
    for init in proto.graph.initializer:
        if init.data_type in sizes:
            sizes[init.data_type] += int(np.prod(init.dims))
    total = sum(sizes.values())
    return sizes[TensorProto.FLOAT16] / total if total else 0.0


def measure(
    proto: onnx.ModelProto, reference: dict[str, np.ndarray], feeds: dict[str, np.ndarray], seconds: float,
    original_bytes: int,
) -> Outcome:
    outcome = Outcome(seconds=seconds, half_weights=half_weight_share(proto))
    outcome.size_ratio = proto.ByteSize() / original_bytes
    outcome.casts = sum(1 for n in proto.graph.node if n.op_type == "Cast")
    try:
        onnx.checker.check_model(proto, full_check=True)
        sess = session(proto, strict=True)
    except Exception as error:
        outcome.strict = "no: " + str(error).strip().splitlines()[0][:60]
        sess = session(proto)
    outcome.cosine, outcome.index_match = _agreement(reference, run_all(sess, feeds))
    try:
        emulated = run_all(session(emulate_half(proto)), feeds)
    except Exception as error:
        outcome.strict += f"; emulation failed: {str(error).strip().splitlines()[0][:60]}"
    else:
        outcome.emulated, _ = _agreement(reference, emulated)
    return outcome


def _agreement(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float | None, float | None]:
    """The lowest cosine over float outputs, the lowest top-k set agreement over integer ones."""
    cosines, matches = [], []
    for name, expected in reference.items():
        if expected.dtype.kind == "f":
            cosines.append(cosine(expected, got[name]))
        else:
            matches.append(_set_agreement(expected, got[name]))
    return (min(cosines) if cosines else None), (min(matches) if matches else None)


def _set_agreement(expected: np.ndarray, got: np.ndarray) -> float:
    """Per row, the share of the reference's selected indices that the candidate selects too."""
    rows_a, rows_b = expected.reshape(expected.shape[0], -1), got.reshape(got.shape[0], -1)
    shares = [len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist())) for a, b in zip(rows_a, rows_b, strict=True)]
    return float(np.mean(shares))


def _reason(error: Exception) -> str:
    """ONNX Runtime's message without its error-code preamble, shortened for a table cell."""
    text = str(error).strip().splitlines()[0]
    return text.rsplit(" : ", 1)[-1][:90]


def convert_iropt(path: Path, inputs: Path, calibration: Path) -> tuple[onnx.ModelProto, float, list[str]]:
    model = load_model(path)
    start = time.perf_counter()
    result = create_pass("convert_fp16").run(
        model, PassContext(calibration=str(calibration), log=logging.getLogger("bench.fp16"))
    )
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = save_model(model, Path(tmp) / "m.onnx")
        proto = onnx.load(str(out))
    kept = [f"{k['node']} ({k['op']}): {k['reason']}" for k in result.info["kept_float32"]]
    del inputs
    return proto, seconds, kept


def convert_peer(path: Path) -> tuple[onnx.ModelProto, float]:
    from onnxconverter_common import float16

    proto = onnx.load(str(path))
    start = time.perf_counter()
    converted = float16.convert_float_to_float16(proto, keep_io_types=True)
    return converted, time.perf_counter() - start


LATENCY_MODELS = ("resnet", "transformer_lm")


def bench_model(
    name: str, path: Path, inputs: Path, calibration: Path, keep: Path | None = None
) -> tuple[Outcome, Outcome]:
    """Both converters on one model; `keep` saves iropt's float16 model there."""
    feeds = dict(np.load(inputs))
    original = onnx.load(str(path))
    reference = run_all(session(original), feeds)
    results = []
    try:
        proto, seconds, kept = convert_iropt(path, inputs, calibration)
        mine = measure(proto, reference, feeds, seconds, original.ByteSize())
        mine.kept = kept
        if keep is not None:
            onnx.save(proto, str(keep))
    except Exception as error:
        mine = Outcome(error=f"failed: {_reason(error)}")
    results.append(mine)
    try:
        proto, seconds = convert_peer(path)
        peer = measure(proto, reference, feeds, seconds, original.ByteSize())
    except Exception as error:
        peer = Outcome(error=f"failed: {_reason(error)}")
    results.append(peer)
    del name
    return results[0], results[1]


def latency_rows(pairs: list[tuple[str, Path, Path, Path]]) -> list[list[str]]:
    """`iropt bench` on each float32 model and its float16 conversion, side by side."""
    from iropt.app.bench import BenchOptions, run_bench

    rows = []
    for name, fp32, fp16, inputs in pairs:
        options = BenchOptions(models=(fp32, fp16), threads=1, inputs=str(inputs), warmup=5, runs=100, rounds=10)
        result = run_bench(options)
        ratios = result.ratios()[1]
        first, second = result.models
        rows.append([
            name, f"{first.percentile(50) * 1e3:.3f}", f"{second.percentile(50) * 1e3:.3f}",
            f"{ratios['p50']:.2f}x", f"{ratios['p99']:.2f}x", f"{ratios['session_start']:.2f}x",
            "n/a" if ratios["peak_memory"] is None else f"{ratios['peak_memory']:.2f}x",
        ])
    return rows


# --- ORT's float16 kernels on the CPU -------------------------------------------------------

_PROBES: list[tuple[str, dict[str, Any], int, dict[str, np.ndarray]]] = [
    # (op, attributes, number of float16 activation inputs, extra constant inputs)
    ("Relu", {}, 1, {}), ("Sigmoid", {}, 1, {}), ("Tanh", {}, 1, {}), ("Erf", {}, 1, {}),
    ("Exp", {}, 1, {}), ("Sqrt", {}, 1, {}), ("Add", {}, 2, {}), ("Mul", {}, 2, {}), ("Div", {}, 2, {}),
    ("MatMul", {}, 2, {}), ("Conv", {}, 1, {"w": np.ones((4, 4, 3, 3), np.float16)}),
    ("ConvTranspose", {}, 1, {"w": np.ones((4, 2, 3, 3), np.float16)}),
    ("MaxPool", {"kernel_shape": [2, 2]}, 1, {}), ("GlobalAveragePool", {}, 1, {}),
    ("Softmax", {}, 1, {}), ("LayerNormalization", {}, 1, {"s": np.ones(8, np.float16), "b": np.zeros(8, np.float16)}),
    ("BatchNormalization", {}, 1, {n: np.ones(4, np.float16) for n in "sbmv"}),
    ("ReduceMean", {"axes": [1]}, 1, {}), ("HardSwish", {}, 1, {}), ("Clip", {}, 1, {}),
    ("Transpose", {}, 1, {}), ("Concat", {"axis": 1}, 2, {}), ("Gather", {}, 1, {"i": np.array([0], np.int64)}),
    ("Slice", {}, 1, {"st": np.array([0], np.int64), "en": np.array([1], np.int64)}),
    ("Resize", {"mode": "nearest"}, 1, {"roi": np.zeros(0, np.float16), "sc": np.array([1, 1, 2, 2], np.float16)}),
    ("CumSum", {}, 1, {"ax": np.array(1, np.int64)}), ("TopK", {}, 1, {"k": np.array([2], np.int64)}),
    ("Range", {}, 0, {"a": np.array(0, np.float16), "l": np.array(5, np.float16), "d": np.array(1, np.float16)}),
    ("RoiAlign", {}, 1, {"r": np.zeros((2, 4), np.float16), "i": np.zeros(2, np.int64)}),
    ("NonMaxSuppression", {}, 0, {"bx": np.zeros((1, 5, 4), np.float16), "sc": np.zeros((1, 1, 5), np.float16)}),
]


def probe_cpu_kernels() -> list[list[str]]:
    rows = []
    for op, attrs, activations, constants in _PROBES:
        inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT16, [1, 4, 8, 8]) for i in range(activations)]
        node = helper.make_node(op, [f"x{i}" for i in range(activations)] + list(constants), ["y"], **attrs)
        out_type = TensorProto.INT64 if op == "NonMaxSuppression" else TensorProto.FLOAT16
        outputs = [helper.make_tensor_value_info("y", out_type, None)]
        if op == "TopK":
            node.output.append("idx")
            outputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, None))
        graph = helper.make_graph([node], op, inputs, outputs,
                                  [numpy_helper.from_array(v, k) for k, v in constants.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        rows.append([op, _cpu_behaviour(model)])
    return rows


def _cpu_behaviour(model: onnx.ModelProto) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "placed.onnx")
        options.log_severity_level = 4
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            return "refused: " + str(error).split(":", 3)[-1].strip().splitlines()[0][:70]
        placed = [n.op_type for n in onnx.load(str(Path(tmp) / "placed.onnx")).graph.node]
    if "Cast" in placed:
        return "float32 kernel; ORT inserts Casts around it"
    return "float16 kernel"


# --- report ---------------------------------------------------------------------------------


def _facts(outcome: Outcome) -> list[str]:
    """Top-k agreement, fp16 weights, size, Casts, strict loading, conversion time; "-" when it failed."""
    if outcome.error:
        return ["-"] * 6
    return [
        _fmt(outcome.index_match, 3), f"{outcome.half_weights:.1%}", f"{outcome.size_ratio:.2f}",
        str(outcome.casts), outcome.strict, f"{outcome.seconds * 1e3:.0f}",
    ]


def _fmt(value: float | None, digits: int = 7) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN: non-finite outputs
        return "nan (inf/nan outputs)"
    return f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset (golden names and: " + ", ".join(BUILT) + ")")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    wanted = set(args.models.split(",")) if args.models else None
    rows, kept_rows, failures = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[str, Path, Path, Path]] = []
        for path in golden_models():
            name = path.stem
            inputs = GOLDEN / f"{name}.inputs.npz"
            calibration = GOLDEN / f"{name}.calib.npz"
            if name == "digits_cnn":
                inputs = Path(tmp) / "digits_test.npz"
                test = np.load(GOLDEN / "digits_cnn.test.npz")
                np.savez(inputs, input=test["input"])
            cases.append((name, path, inputs, calibration if calibration.exists() else inputs))
        for name in BUILT:
            if wanted is None or name in wanted:
                path, inputs = build_model(name, Path(tmp))
                cases.append((name, path, inputs, inputs))
        timed: list[tuple[str, Path, Path, Path]] = []
        for name, path, inputs, calibration in cases:
            if wanted is not None and name not in wanted:
                continue
            keep = Path(tmp) / f"{name}.fp16.onnx" if name in LATENCY_MODELS else None
            mine, peer = bench_model(name, path, inputs, calibration, keep)
            if keep is not None and keep.exists():
                timed.append((name, path, keep, inputs))
            low = min(mine.cosine or 0.0, mine.emulated or 0.0)
            if mine.error or not low >= MIN_COSINE or mine.half_weights < MIN_HALF_WEIGHTS:
                failures.append(name)
            rows.append([
                name,
                mine.error or _fmt(mine.cosine), mine.error or _fmt(mine.emulated),
                peer.error or _fmt(peer.cosine), peer.error or _fmt(peer.emulated),
                *(f"{a} / {b}" for a, b in zip(_facts(mine), _facts(peer), strict=True)),
            ])
            kept_rows += [[name, item] for item in mine.kept]
        latency = latency_rows(timed)
    print(markdown_table(
        ["model", "cosine iropt (ORT CPU)", "cosine iropt (fp16 emulated)", "cosine peer (ORT CPU)",
         "cosine peer (fp16 emulated)", "top-20 agreement iropt / peer", "fp16 weights iropt / peer",
         "size iropt / peer", "Casts iropt / peer", "loads strictly iropt / peer", "ms iropt / peer"],
        rows,
    ))
    print()
    print("iropt = `convert_fp16` with its defaults, calibrated as described above; peer = onnxconverter-common "
          "`convert_float_to_float16(keep_io_types=True)`; size = serialized bytes against the float32 model; "
          "ORT CPU = the float16 model as ONNX Runtime's CPU provider runs it (float32 between its own Casts); "
          "fp16 emulated = every float16 value rounded through float16 (`iropt.compress.fp16.emulate`), as a GPU "
          "stores it.")
    print()
    print("Nodes `convert_fp16` kept in float32, and why:")
    print()
    print(markdown_table(["model", "node (op): reason"], kept_rows or [["-", "none"]]))
    print()
    print("`iropt bench`, float32 against float16 (iropt), ONNX Runtime CPU, 1 thread, batch as stored, "
          "ratios float16 / float32:")
    print()
    print(markdown_table(["model", "p50 ms fp32", "p50 ms fp16", "p50", "p99", "session start", "peak memory"],
                         latency or [["-"] * 7]))
    print()
    print("ONNX Runtime's CPU provider with one float16 node, graph optimizations off:")
    print()
    print(markdown_table(["op", "what the CPU provider does"], probe_cpu_kernels()))
    print()
    status = "PASS" if not failures else "FAIL"
    print(f"- {status}: fp16 output cosine >= {MIN_COSINE} and fp16 weights >= {MIN_HALF_WEIGHTS:.0%} "
          f"on every model" + (f" (failed: {', '.join(failures)})" if failures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
