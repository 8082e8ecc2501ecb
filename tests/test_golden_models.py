"""The committed golden models are valid, small, and reproduce their stored outputs in ONNX Runtime.

Needs only onnx, onnxruntime and numpy (no torch): it checks the files that
``golden_models/build.py`` wrote, not the build itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
MANIFEST: list[dict[str, Any]] = json.loads((GOLDEN / "manifest.json").read_text())["models"]
NAMES = [entry["name"] for entry in MANIFEST]
MAX_BYTES = 5 * 1024 * 1024
RTOL, ATOL = 1e-4, 1e-5


def entry(name: str) -> dict[str, Any]:
    """The manifest entry of one model."""
    return next(e for e in MANIFEST if e["name"] == name)


def load(name: str) -> onnx.ModelProto:
    """Load a committed golden model."""
    return onnx.load(str(GOLDEN / entry(name)["files"]["model"]))


def arrays(name: str, kind: str) -> dict[str, np.ndarray]:
    """A stored .npz file of a model (kind: inputs, outputs, test, calib)."""
    with np.load(GOLDEN / entry(name)["files"][kind]) as data:
        return {key: data[key] for key in data.files}


def session(name: str) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with graph optimizations off (the reference setting)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        str(GOLDEN / entry(name)["files"]["model"]), opts, providers=["CPUExecutionProvider"]
    )


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Map each tensor name to the node that produces it."""
    return {out: node for node in graph.node for out in node.output}


def test_manifest_lists_every_model() -> None:
    expected = {
        "conv_bn",
        "resnet",
        "mobilenet",
        "mlp",
        "transformer",
        "unet",
        "control_flow",
        "digits_cnn",
    }
    assert expected <= set(NAMES), f"missing from manifest: {sorted(expected - set(NAMES))}"
    for e in MANIFEST:
        for path in e["files"].values():
            assert (GOLDEN / path).is_file(), (
                f"{e['name']}: {path} listed in manifest.json but missing"
            )


@pytest.mark.parametrize("name", NAMES)
def test_model_is_valid_and_small(name: str) -> None:
    path = GOLDEN / entry(name)["files"]["model"]
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    model = load(name)
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain or "ai.onnx", o.version) for o in model.opset_import} == {("ai.onnx", 17)}
    assert [i.name for i in model.graph.input] == [i["name"] for i in entry(name)["inputs"]]
    assert [o.name for o in model.graph.output] == [o["name"] for o in entry(name)["outputs"]]
    assert all(node.name for node in model.graph.node), "every node should have a name"


@pytest.mark.parametrize("name", NAMES)
def test_stored_outputs_reproduce(name: str) -> None:
    sess = session(name)
    inputs, expected = arrays(name, "inputs"), arrays(name, "outputs")
    assert set(inputs) == {i.name for i in sess.get_inputs()}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))
    assert set(got) == set(expected)
    for key, want in expected.items():
        np.testing.assert_allclose(got[key], want, rtol=RTOL, atol=ATOL, err_msg=f"{name}:{key}")


@pytest.mark.parametrize("name", NAMES)
def test_batch_dimension_is_dynamic(name: str) -> None:
    """Running one sample alone gives that sample's slice of the stored batch outputs."""
    e = entry(name)
    if not all(i["shape"] and i["shape"][0] == "batch" for i in e["inputs"]):
        pytest.skip(f"{name} has no leading dynamic batch dimension on every input")
    inputs, expected = arrays(name, "inputs"), arrays(name, "outputs")
    single = {key: value[:1] for key, value in inputs.items()}
    got = session(name).run([o["name"] for o in e["outputs"]], single)
    for out, value in zip(e["outputs"], got, strict=True):
        axis = out["shape"].index("batch")
        want = np.take(expected[out["name"]], [0], axis=axis)
        np.testing.assert_allclose(
            value, want, rtol=RTOL, atol=ATOL, err_msg=f"{name}:{out['name']}"
        )


def test_digits_accuracy() -> None:
    test = arrays("digits_cnn", "test")
    x, labels = test["input"], test["label"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and labels.dtype == np.int64
    assert len(x) == len(labels) > 400
    logits = session("digits_cnn").run(None, {"input": x})[0]
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.95, f"digits_cnn test accuracy {accuracy:.4f} < 0.95"


def test_digits_calibration_split() -> None:
    calib = arrays("digits_cnn", "calib")
    input_name = entry("digits_cnn")["inputs"][0]["name"]
    assert set(calib) == {input_name}
    assert calib[input_name].shape == (128, 1, 8, 8) and calib[input_name].dtype == np.float32


@pytest.mark.parametrize("name", ["conv_bn", "digits_cnn", "resnet", "mobilenet"])
def test_batchnorm_is_unfused_inference_form(name: str) -> None:
    bns = [n for n in load(name).graph.node if n.op_type == "BatchNormalization"]
    assert bns, f"{name} should keep BatchNormalization unfused"
    assert all(len(n.output) == 1 for n in bns), "BatchNormalization must be in inference form"


def test_conv_bn_has_bn_after_conv_convtranspose_and_gemm() -> None:
    graph = load("conv_bn").graph
    made_by = producers(graph)
    fed_by = {made_by[n.input[0]].op_type for n in graph.node if n.op_type == "BatchNormalization"}
    assert fed_by == {"Conv", "ConvTranspose", "Gemm"}
    bn_params = {
        n.input[i] for n in graph.node if n.op_type == "BatchNormalization" for i in range(1, 5)
    }
    values = {
        t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name in bn_params
    }
    assert len(values) == len(bn_params), "BatchNormalization parameters should all be initializers"
    assert not any(np.allclose(v, 0.0) or np.allclose(v, 1.0) for v in values.values()), (
        "BN stats are trivial"
    )


def test_control_flow_has_if_and_loop_with_real_subgraphs() -> None:
    nodes = {n.op_type: n for n in load("control_flow").graph.node}
    assert {"If", "Loop"} <= set(nodes)
    subgraphs = [
        a.g
        for op in ("If", "Loop")
        for a in nodes[op].attribute
        if a.type == onnx.AttributeProto.GRAPH
    ]
    assert len(subgraphs) == 3
    for sub in subgraphs:
        assert any(n.op_type not in {"Identity"} for n in sub.node), f"{sub.name} has no real ops"
