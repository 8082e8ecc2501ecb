"""quantize on random valid graphs (tests/strategies.py): always a valid, runnable model.

Whatever the graph, the quantized model passes the full ONNX checker, keeps its inputs and
outputs (names, order, shapes, types), runs in ONNX Runtime both as written and with ORT's own
optimizations (which is where QDQ fusions happen), and, calibrated on the inputs it then runs
on, stays close to the float model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx.printer
from helpers_quant import checked, cosine, quantize, run, write_feeds
from hypothesis import given, note
from hypothesis import strategies as st
from strategies import models, random_inputs

from iropt.ir.model import Model


@given(models(), st.sampled_from(["ort", "tensorrt", "dynamic"]), st.sampled_from(["minmax", "entropy"]))
def test_random_graphs_quantize_to_valid_close_models(proto: onnx.ModelProto, fmt: str, method: str) -> None:
    """`fmt` "dynamic" is mode="dynamic" (which has no format or method)."""
    note(onnx.printer.to_text(proto))
    feeds = random_inputs(proto, seed=0)
    model = Model.from_onnx(proto)
    original = model.copy()
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_feeds(Path(tmp), feeds)
        if fmt == "dynamic":
            result, _ = quantize(model, spec, mode="dynamic")
        else:
            result, _ = quantize(model, spec, format=fmt, method=method, skip_slow_layers=False)
    quantized = checked(model)
    assert [i.name for i in quantized.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in quantized.graph.output] == [o.name for o in proto.graph.output]
    want = run(original, feeds)
    for optimized in (False, True):
        got = run(model, feeds, optimized=optimized)
        assert list(got) == list(want)
        for name, value in want.items():
            assert got[name].shape == value.shape and got[name].dtype == value.dtype
            assert np.all(np.isfinite(got[name]) == np.isfinite(value))
            if result.changed and method == "minmax" and np.all(np.isfinite(value)) and np.any(value):
                # Calibrated on these very inputs: every value is inside its range.
                assert cosine(value, got[name]) >= 0.9, name
