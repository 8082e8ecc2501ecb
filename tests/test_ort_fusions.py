"""What ONNX Runtime fuses in iropt's output compared with the input model.

A graph optimizer must not make its target slower. ORT on the CPU fuses Add +
LayerNormalization into SkipLayerNormalization when it can prove the two Add inputs have equal
shapes, and that kernel runs slower than the pair on the CPUs measured (bench/RESULTS.md,
"ort_latency"). The proof came from dimension names that ONNX shape inference invents
(`unk__N`) when iropt wrote them into the model; iropt leaves such dimensions unknown.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from iropt.app.optimize import RunOptions, optimize

# A post-norm residual block as PyTorch exports a BERT-style encoder with dynamic axes: the
# position embedding is gathered for a run-time length, so the sum's length has no name.
ENCODER = """
<ir_version: 8, opset_import: ["" : 17]>
encoder (float[batch, seq, 8] x) => (float[batch, seq2, 8] y) {
  shape = Shape(x)
  one = Constant <value = int64[1] {1}> ()
  two = Constant <value = int64[1] {2}> ()
  zero = Constant <value = int64 {0}> ()
  step = Constant <value = int64 {1}> ()
  length_1d = Slice(shape, one, two)
  length = Squeeze(length_1d)
  positions = Range(zero, length, step)
  pos = Gather(table, positions)
  pos3 = Unsqueeze(pos, zero_axis)
  h = Add(x, pos3)
  h2 = LayerNormalization <axis = -1> (h, gamma, beta)
  f = MatMul(h2, w)
  r = Add(h2, f)
  y = LayerNormalization <axis = -1> (r, gamma, beta)
}
"""


def _encoder(path: Path) -> Path:
    model = onnx.parser.parse_model(ENCODER)
    rng = np.random.default_rng(0)
    for name, value in {
        "table": rng.standard_normal((32, 8)), "gamma": np.ones(8), "beta": np.zeros(8),
        "w": rng.standard_normal((8, 8)) / 3, "zero_axis": np.array([0]),
    }.items():
        dtype = np.int64 if name == "zero_axis" else np.float32
        model.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(dtype), name))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _ort_ops(path: Path, tmp_path: Path) -> Counter[str]:
    """The ops of the model ONNX Runtime runs for `path` (CPU, ORT_ENABLE_ALL)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.ort.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_default_does_not_hand_ort_a_skip_layer_norm_fusion(tmp_path: Path) -> None:
    source = _encoder(tmp_path / "encoder.onnx")
    out = tmp_path / "encoder.opt.onnx"
    optimize(RunOptions(schedule="default", model=source, output=out))
    before, after = _ort_ops(source, tmp_path), _ort_ops(out, tmp_path)
    assert before["SkipLayerNormalization"] == 0
    assert after["SkipLayerNormalization"] == before["SkipLayerNormalization"], after
    assert after["LayerNormalization"] == 2


def test_no_invented_dimension_names_are_written(tmp_path: Path) -> None:
    source = _encoder(tmp_path / "encoder.onnx")
    out = tmp_path / "encoder.opt.onnx"
    optimize(RunOptions(schedule="default", model=source, output=out, verify=False))
    graph = onnx.load(str(out)).graph
    names = {d.dim_param for v in [*graph.value_info, *graph.output] for d in v.type.tensor_type.shape.dim}
    assert not [n for n in names if n.startswith("unk__")], names
    # What inference does know is kept: the model's own names and static sizes.
    shapes = {v.name: [d.dim_param or d.dim_value or None for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    assert shapes["h2"] == ["batch", None, 8]

