"""4-bit weights and int8 dynamic quantization of a trained sentence encoder, against ONNX Runtime's quantizers.

Model: all-MiniLM-L6-v2 (bench/minilm_encoder.py: 6 layers, 384 wide, 30522-token vocabulary),
sequences of 64 tokens. Text: sentences of Python's bundled help topics, shuffled with a fixed
seed; CALIB sentences calibrate (GPTQ's layer inputs), the next EVAL sentences are the test set.

Variants (all run by ONNX Runtime on the CPU, optimizations on):
- fp32: the model as built;
- int8 dynamic: iropt `quantize(mode="dynamic")` (7-bit int8 MatMul weights, word-embedding
  table int8 per row, or in 4-bit blocks with `embedding_bits=4`) against ORT
  `quantize_dynamic` (its defaults: int8 weights per tensor);
- int4: iropt `quantize(bits=4)` (MatMulNBits, word-embedding table in 4-bit blocks as
  GatherBlockQuantized) with rtn or gptq, block 32/64/128, symmetric or with zero points, and
  MatMulNBits' accuracy level 4 (int8 compute), against
  `onnxruntime.quantization.matmul_nbits_quantizer` with its DEFAULT (round to nearest, ORT's
  kernel), HQQ and GPTQ algorithms at the same block size.

Figures: cosine of the sentence embeddings against fp32 (mean and minimum over the test
sentences), the saved file size, the bytes of the MatMul weights (quantized weights, scales and
zero points of the projection layers) against their fp32 bytes, latency of a batch of 8
sentences with 1 thread (variants interleaved), and the time the quantizer took.

Run: `.venv/bin/python bench/quant_int4.py` (needs the bench extra for the model's weights).
`--blocks 32,128` compares several block sizes; `--only iropt,RTN` keeps fp32 and the variants
whose names contain one of the words (a quick run without ORT's slow HQQ and GPTQ modes).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_encoder as text_encoder
from common import markdown_table
from latency import interleaved_latency_ms, run_outputs, session

CALIB = 64
EVAL = 64
BATCH = 8
MATMUL_OPS = ("MatMul", "MatMulNBits", "MatMulInteger")
# Block sizes compared (`--blocks 32,128`); 32 is the figure.
BLOCKS = tuple(int(b) for b in (sys.argv[sys.argv.index("--blocks") + 1] if "--blocks" in sys.argv else "32").split(","))
ONLY = tuple(sys.argv[sys.argv.index("--only") + 1].split(",")) if "--only" in sys.argv else ()


def texts() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    sentences = text_encoder.sentences()
    order = np.random.default_rng(0).permutation(len(sentences))
    chosen = [sentences[i] for i in order[: CALIB + EVAL]]
    return text_encoder.encode(chosen[:CALIB]), text_encoder.encode(chosen[CALIB:])


def matmul_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the constants the projection layers read (weights, scales, zero points)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    total, seen = 0, set()

    def add(name: str) -> None:
        if name in inits and name not in seen:
            seen.add(name)
            total_bytes = len(inits[name].raw_data) or onnx.numpy_helper.to_array(inits[name]).nbytes
            nonlocal total
            total += total_bytes

    for node in model.graph.node:
        if node.op_type not in MATMUL_OPS:
            continue
        for name in node.input[1:]:
            add(name)
            source = producers.get(name)
            if source is not None and source.op_type == "DequantizeLinear":
                for dq_input in source.input:
                    add(dq_input)
    return total


def iropt_variant(path: Path, calib: Path, **options: object) -> onnx.ModelProto:
    from iropt.infra.pass_base import PassContext
    from iropt.infra.registry import create_pass
    from iropt.io.load import load_model

    model = load_model(path)
    create_pass("quantize", {"calibration": str(calib), **options}).run(model, PassContext())
    return model.to_onnx()


def ort_dynamic(path: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(str(path), str(out))
        return onnx.load(str(out))


def ort_nbits(path: Path, algorithm: str, block: int, calib: dict[str, np.ndarray], symmetric: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter([{k: v[i : i + BATCH] for k, v in calib.items()} for i in range(0, CALIB, BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rows, None)

    config: nbits.WeightOnlyQuantConfig
    if algorithm == "DEFAULT":
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric)
    elif algorithm == "HQQ":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block)
    else:
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block)
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(path)), block_size=block, is_symmetric=symmetric,
                                           algo_config=config)
    # ORT's GPTQ prints a progress bar on stdout, which holds this bench's results table.
    with contextlib.redirect_stdout(sys.stderr):
        quantizer.process()
    return quantizer.model.model


def main() -> None:
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = text_encoder.build(folder)
        calib, evaluation = texts()
        calib_path = folder / "calib.npz"
        np.savez(calib_path, **calib)
        variants: dict[str, Callable[[], onnx.ModelProto]] = {
            "fp32": lambda: onnx.load(str(path)),
            "iropt int8 dynamic": lambda: iropt_variant(path, calib_path, mode="dynamic"),
            "iropt int8 dynamic, 4-bit table": lambda: iropt_variant(path, calib_path, mode="dynamic",
                                                                      embedding_bits=4),
            "ORT quantize_dynamic": lambda: ort_dynamic(path),
        }
        for block in BLOCKS:
            variants[f"iropt int4 rtn b{block} sym"] = (
                lambda b=block: iropt_variant(path, calib_path, bits=4, block_size=b))
            variants[f"iropt int4 gptq b{block} sym"] = (
                lambda b=block: iropt_variant(path, calib_path, bits=4, block_size=b, weight_method="gptq"))
            variants[f"iropt int4 gptq b{block} zp"] = (
                lambda b=block: iropt_variant(path, calib_path, bits=4, block_size=b, weight_method="gptq",
                                              symmetric=False))
            variants[f"iropt int4 gptq b{block} zp acc4"] = (
                lambda b=block: iropt_variant(path, calib_path, bits=4, block_size=b, weight_method="gptq",
                                              symmetric=False, accuracy_level=4))
            variants[f"ORT RTN b{block} sym"] = lambda b=block: ort_nbits(path, "DEFAULT", b, calib, True)
            variants[f"ORT RTN b{block} zp"] = lambda b=block: ort_nbits(path, "DEFAULT", b, calib, False)
            variants[f"ORT HQQ b{block}"] = lambda b=block: ort_nbits(path, "HQQ", b, calib, False)
        for block in BLOCKS:  # the slowest peer last
            variants[f"ORT GPTQ b{block}"] = lambda b=block: ort_nbits(path, "GPTQ", b, calib, False)
        if ONLY:
            variants = {n: make for n, make in variants.items() if n == "fp32" or any(w in n for w in ONLY)}
        results: dict[str, dict] = {}
        for name, make in variants.items():
            start = time.perf_counter()
            try:
                proto = make()
            except Exception as error:  # a peer's mode that fails here is reported, not fatal
                results[name] = {"error": f"{type(error).__name__}: {str(error)[:80]}"}
                continue
            seconds = time.perf_counter() - start
            file = folder / f"{len(results)}.onnx"
            onnx.save(proto, str(file))
            results[name] = {"file": file, "seconds": seconds, "weights": matmul_weight_bytes(proto)}
            print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        print(render(results, evaluation))


def render(results: dict[str, dict], evaluation: dict[str, np.ndarray]) -> str:
    reference_sess = session(results["fp32"]["file"])
    reference = run_outputs(reference_sess, evaluation)["embedding"]
    batch = {k: v[:BATCH] for k, v in evaluation.items()}
    sessions = {name: session(r["file"]) for name, r in results.items() if "file" in r}
    latency = interleaved_latency_ms(sessions, batch, budget_s=2.0)
    fp32 = results["fp32"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", "-", "-", r["error"]])
            continue
        got = run_outputs(sessions[name], evaluation)["embedding"].astype(np.float64)
        want = reference.astype(np.float64)
        cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        size = r["file"].stat().st_size
        rows.append([
            name, f"{cos.mean():.4f}", f"{cos.min():.4f}",
            f"{size / 2**20:.1f} ({size / fp32['file'].stat().st_size:.2f}x)",
            f"{r['weights'] / fp32['weights']:.3f}x",
            f"{latency[name]:.1f} ({latency['fp32'] / latency[name]:.2f}x)", f"{r['seconds']:.1f}", "",
        ])
    headers = ["variant", "cosine mean", "cosine min", "file MiB (vs fp32)", "MatMul weights vs fp32",
               f"latency ms, batch {BATCH} (speed-up)", "quantize s", "note"]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    main()
