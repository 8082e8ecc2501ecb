"""The `default` schedule on models as PyTorch's TorchScript exporter writes them for a dynamic
batch (golden traced_decoder and traced_lstm): the run-time shape plumbing goes, and the result
still computes the stored outputs, at the stored batch size and at others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_ort import run_ort

from iropt.app.optimize import RunOptions, optimize

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"

# Nodes after `default` at most (all graphs, Constant nodes included): what onnxslim reaches is
# 46 for the decoder and what onnxsim reaches is 9 for the LSTM (torch 2.13 exports).
MAX_NODES = {"traced_decoder": 43, "traced_lstm": 9}
# Ops the shape plumbing is made of; none of them is left.
PLUMBING = {"Shape", "ConstantOfShape", "Concat"}


@pytest.mark.parametrize("name", sorted(MAX_NODES))
def test_default_removes_the_shape_plumbing_of_traced_models(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.onnx"

    outcome = optimize(RunOptions(schedule="default", model=GOLDEN / f"{name}.onnx", output=out))

    assert outcome.verified
    optimized = onnx.load(str(out))
    ops = [node.op_type for node in optimized.graph.node]
    assert len(ops) <= MAX_NODES[name], ops
    assert not PLUMBING & set(ops), ops
    stored_inputs = dict(np.load(GOLDEN / f"{name}.inputs.npz"))
    stored_outputs = dict(np.load(GOLDEN / f"{name}.outputs.npz"))
    for key, value in run_ort(optimized, stored_inputs).items():
        np.testing.assert_allclose(value, stored_outputs[key], rtol=1e-4, atol=1e-5)
    # The batch stays dynamic: constants that replaced run-time shapes must hold for any batch.
    original = onnx.load(str(GOLDEN / f"{name}.onnx"))
    for batch in (1, 5):
        ids = np.resize(stored_inputs["ids"], (batch, stored_inputs["ids"].shape[1]))
        want, got = run_ort(original, {"ids": ids}), run_ort(optimized, {"ids": ids})
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5)
