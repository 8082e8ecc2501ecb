"""convert_fp16: float16 tensors and weights, float32 where float16 is unsafe, clean Casts.

Every converted model passes the full ONNX checker, loads in ONNX Runtime with strict type
inference, has no Cast chains and no Cast that disagrees with its value types, and its outputs
are compared with the float32 model's through ONNX Runtime by cosine similarity.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers_quant import GOLDEN, build, cosine, rand, write_feeds

from iropt.app.cli import main
from iropt.compress.fp16 import cast_problems
from iropt.errors import OptionError
from iropt.infra.pass_base import PassContext, PassResult
from iropt.infra.registry import create_pass
from iropt.io.load import load_model
from iropt.ir.model import Model

F16 = onnx.TensorProto.FLOAT16
F32 = onnx.TensorProto.FLOAT


def convert(model: Model, calibration: str | None = None, **options: Any) -> PassResult:
    ctx = PassContext(calibration=calibration, log=logging.getLogger("iropt.test_convert_fp16"))
    return create_pass("convert_fp16", options).run(model, ctx)


def strict_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    """ONNX Runtime with strict type inference: a value typed one way and produced another fails."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.strict_shape_type_inference", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = strict_session(proto)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name: feeds[i.name] for i in session.get_inputs()}
    return dict(zip(names, session.run(names, wanted), strict=True))


def checked(model: Model) -> onnx.ModelProto:
    proto = model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    assert cast_problems(model.graph) == []
    return proto


def elem_types(values: Any) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in values}


def kept(result: PassResult) -> dict[str, str]:
    return {item["node"]: item["reason"] for item in result.info["kept_float32"]}


@pytest.mark.parametrize("name", ["conv_bn", "mobilenet", "transformer", "traced_lstm", "control_flow"])
def test_golden_model_converts_with_cosine_above_0999(name: str) -> None:
    inputs = str(GOLDEN / f"{name}.inputs.npz")
    feeds = dict(np.load(inputs))
    model = load_model(GOLDEN / f"{name}.onnx")
    reference = run(model.to_onnx(), feeds)
    result = convert(model, inputs)
    proto = checked(model)
    converted = run(proto, feeds)
    for output, expected in reference.items():
        assert converted[output].dtype == np.float32  # keep_io_types
        assert cosine(expected, converted[output]) >= 0.999, output
    assert result.changed and result.stats["half_nodes"] > 0
    assert result.info["half_weight_fraction"] >= 0.9
    emulated = result.info["emulated_cosine"]
    assert emulated and all(value >= 0.999 for value in emulated.values())
    weights = [i for i in proto.graph.initializer if i.data_type in (F16, F32)]
    assert weights and all(i.data_type == F16 for i in weights)


def test_interface_and_weights_types_and_one_cast_per_boundary() -> None:
    rng = np.random.default_rng(0)
    model = build(
        """
        g (float[2, 8] x) => (float[2, 4] y) {
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2)
        }
        """,
        {"w1": rand(rng, 8, 16), "w2": rand(rng, 16, 4)},
    )
    convert(model, range_check=False)
    proto = checked(model)
    assert elem_types(proto.graph.input) == {"x": F32}
    assert elem_types(proto.graph.output) == {"y": F32}
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert [(c.input[0], c.attribute[0].i) for c in casts] == [("x", F16), ("y_fp16", F32)]
    assert {i.name: i.data_type for i in proto.graph.initializer} == {"w1": F16, "w2": F16}


def test_keep_io_types_false_makes_the_interface_float16() -> None:
    rng = np.random.default_rng(1)
    model = build("g (float[2, 8] x) => (float[2, 4] y) { y = MatMul(x, w) }", {"w": rand(rng, 8, 4)})
    x = rand(rng, 2, 8)
    expected = run(model.to_onnx(), {"x": x})["y"]
    convert(model, keep_io_types=False, range_check=False)
    proto = checked(model)
    assert elem_types(proto.graph.input) == {"x": F16} and elem_types(proto.graph.output) == {"y": F16}
    assert not any(n.op_type == "Cast" for n in proto.graph.node)
    got = run(proto, {"x": x.astype(np.float16)})["y"]
    assert got.dtype == np.float16 and cosine(expected, got) >= 0.999


def test_blocked_ops_and_schema_only_inputs_stay_float32() -> None:
    rng = np.random.default_rng(2)
    model = build(
        """
        g (float[1, 2, 4, 4] x) => (float[1, 2, 8, 8] y, float[1, 2, 8, 2] v, int64[1, 2, 8, 2] i) {
            a = Relu(x)
            y = Resize<mode = "nearest">(a, roi, scales)
            v, i = TopK<axis = -1>(y, k)
        }
        """,
        {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32), "k": np.array([2], np.int64)},
    )
    x = rand(rng, 1, 2, 4, 4)
    expected = run(model.to_onnx(), {"x": x})
    result = convert(model, range_check=False)
    proto = checked(model)
    assert "blocked" in kept(result)["TopK#2"]
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    assert inits["scales"] == F32  # Resize's scales have no float16 form
    resize = next(n for n in proto.graph.node if n.op_type == "Resize")
    topk = next(n for n in proto.graph.node if n.op_type == "TopK")
    assert resize.input[2] == "scales" and topk.input[0] == "y"  # TopK reads the float32 output
    got = run(proto, {"x": x})
    assert np.array_equal(got["i"], expected["i"]) and cosine(expected["v"], got["v"]) >= 0.999


def test_block_nodes_patterns_keep_named_nodes() -> None:
    rng = np.random.default_rng(3)
    model = build(
        """
        g (float[2, 8] x) => (float[2, 8] y) {
            a = Relu(x)
            y = Sigmoid(a)
        }
        """,
    )
    model.graph.nodes[1].name = "head/sigmoid"
    result = convert(model, block_nodes=["head/*"], range_check=False)
    proto = checked(model)
    assert kept(result) == {"head/sigmoid": "name matches block_nodes pattern 'head/*'"}
    x = rand(rng, 2, 8)
    assert cosine(1 / (1 + np.exp(-np.maximum(x, 0))), run(proto, {"x": x})["y"]) >= 0.9999
    assert Counter(n.op_type for n in proto.graph.node)["Cast"] == 2  # x -> fp16, a -> fp32


def test_activations_beyond_the_safe_range_stay_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = build(
        """
        g (float[4, 8] x) => (float[4, 8] y) {
            big = Mul(x, scale)
            e = Relu(big)
            y = Div(e, scale)
        }
        """,
        {"scale": np.array(5e4, np.float32)},
    )
    x = rand(rng, 4, 8, scale=1.0)
    calibration = write_feeds(tmp_path, {"x": x})
    expected = run(model.to_onnx(), {"x": x})["y"]
    result = convert(model, calibration)
    proto = checked(model)
    reasons = kept(result)
    assert set(reasons) == {"Mul#0", "Relu#1", "Div#2"}
    assert "reaches |x|" in reasons["Mul#0"] and "max_abs" in reasons["Relu#1"]
    got = run(proto, {"x": x})["y"]
    assert np.isfinite(got).all() and cosine(expected, got) >= 0.9999


def test_generated_inputs_when_no_data_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = build("g (float[4, 8] x) => (float[4, 8] y) { y = Relu(x) }")
    with caplog.at_level(logging.WARNING):
        result = convert(model)
    assert result.changed and "generated random inputs" in caplog.text


def test_weights_beyond_float16_stay_float32() -> None:
    rng = np.random.default_rng(5)
    mask = np.where(np.tril(np.ones((4, 4))) > 0, 0.0, -1e9).astype(np.float32)
    model = build(
        """
        g (float[4, 4] x) => (float[4, 4] y) {
            s = Add(x, mask)
            y = Softmax<axis = -1>(s)
        }
        """,
        {"mask": mask},
    )
    x = rand(rng, 4, 4)
    expected = run(model.to_onnx(), {"x": x})["y"]
    result = convert(model, range_check=False)
    proto = checked(model)
    assert "beyond float16's 65504" in kept(result)["Add#0"]
    assert {i.name: i.data_type for i in proto.graph.initializer} == {"mask": F32}
    got = run(proto, {"x": x})["y"]
    assert np.isfinite(got).all() and cosine(expected, got) >= 0.999


def test_long_reductions_stay_float32_short_ones_convert() -> None:
    model = build(
        """
        g (float[2, 8192] x, float[2, 16] z) => (float[2, 1] y, float[2, 1] w) {
            y = ReduceSum<keepdims = 1>(x, axes)
            w = ReduceSum<keepdims = 1>(z, axes)
        }
        """,
        {"axes": np.array([1], np.int64)},
    )
    rng = np.random.default_rng(6)
    feeds = {"x": rand(rng, 2, 8192), "z": rand(rng, 2, 16)}
    expected = run(model.to_onnx(), feeds)
    result = convert(model, range_check=False)
    proto = checked(model)
    assert kept(result) == {"ReduceSum#0": "reduces 8192 elements into one value (beyond max_reduction 4096)"}
    got = run(proto, feeds)
    assert np.allclose(got["y"], expected["y"], rtol=1e-5)  # float32 throughout
    assert result.stats["half_nodes"] == 1


def test_existing_casts_retarget_without_chains() -> None:
    model = build(
        """
        g (int64[2, 4] ids, float[2, 4] x) => (float[2, 4] y) {
            f = Cast<to = 1>(ids)
            g2 = Cast<to = 1>(x)
            s = Add(f, g2)
            y = Relu(s)
        }
        """,
    )
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    expected = run(model.to_onnx(), {"ids": ids, "x": x})["y"]
    convert(model, range_check=False)
    proto = checked(model)
    casts = [(n.input[0], n.attribute[0].i) for n in proto.graph.node if n.op_type == "Cast"]
    # Cast(ids -> float) now writes float16; the no-op Cast(x -> float) went, one Cast per boundary.
    assert sorted(casts) == sorted([("ids", F16), ("x", F16), ("y_fp16", F32)])
    assert np.allclose(run(proto, {"ids": ids, "x": x})["y"], expected, atol=1e-3)


def test_subgraphs_stay_float32_with_the_values_they_read() -> None:
    model = load_model(GOLDEN / "control_flow.onnx")
    result = convert(model, range_check=False)
    checked(model)
    reasons = kept(result)
    assert all("holds a subgraph" in reasons[n.name] for n in model.graph.nodes if n.op in ("If", "Loop"))


def test_a_model_without_float_is_unchanged() -> None:
    model = build("g (int64[4] a, int64[4] b) => (int64[4] c) { c = Add(a, b) }")
    before = model.to_onnx().SerializeToString()
    result = convert(model)
    assert not result.changed and model.to_onnx().SerializeToString() == before


def test_bad_options_are_option_errors() -> None:
    with pytest.raises(OptionError, match="max_abs"):
        create_pass("convert_fp16", {"max_abs": 1e6})
    with pytest.raises(OptionError, match="at least 1"):
        create_pass("convert_fp16", {"max_reduction": 0})


def test_cli_run_reports_kept_nodes_and_verifies_by_cosine(tmp_path: Path) -> None:
    schedule = tmp_path / "fp16.opt"
    schedule.write_text('convert_fp16(block_op_types=["Softmax"])\nverify(metric="cosine", min=0.999)\n')
    out, report = tmp_path / "t.fp16.onnx", tmp_path / "r.json"
    inputs = str(GOLDEN / "transformer.inputs.npz")
    code = main(["-q", "run", str(schedule), str(GOLDEN / "transformer.onnx"), "-o", str(out),
                 "--inputs", inputs, "--calibration", inputs, "--report", str(report)])
    assert code == 0 and out.exists()
    record = json.loads(report.read_text())["passes"][0]
    assert [k["op"] for k in record["info"]["kept_float32"]] == ["Softmax"]
    assert record["stats"]["half_weights_pct"] == 100


def test_cli_bad_option_exits_2(tmp_path: Path) -> None:
    schedule = tmp_path / "bad.opt"
    schedule.write_text("convert_fp16(max_abs=1e9)\n")
    out = tmp_path / "o.onnx"
    assert main(["-q", "run", str(schedule), str(GOLDEN / "mlp.onnx"), "-o", str(out)]) == 2
    assert not out.exists()


def test_emulation_shows_the_overflow_the_cpu_hides_and_range_check_prevents_it(tmp_path: Path) -> None:
    from iropt.compress.fp16.emulate import emulate_half

    text = """
        g (float[2, 4] x) => (float[2, 4] y) {
            a = Mul(x, c)
            b = Mul(a, c)
            y = Div(b, c)
        }
        """
    x = np.array([[1, 2, 3, 4], [-1, -2, -3, -4]], np.float32)
    weights = {"c": np.array(300, np.float32)}
    expected = x * 300
    naive = build(text, weights)
    convert(naive, range_check=False)
    proto = checked(naive)
    # ONNX Runtime's CPU provider computes the chain in float32 between its own Casts: no overflow.
    assert np.allclose(run(proto, {"x": x})["y"], expected, rtol=1e-3)
    emulated = emulate_half(proto)
    onnx.checker.check_model(emulated, full_check=True)
    assert not np.isfinite(run(emulated, {"x": x})["y"]).all()  # 9e5 passes float16's 65504
    checked_model = build(text, weights)
    result = convert(checked_model, write_feeds(tmp_path, {"x": x}))
    assert set(kept(result)) == {"Mul#1", "Div#2"}  # b = 9e5 stays float32, with its reader
    got = run(emulate_half(checked(checked_model)), {"x": x})["y"]
    assert np.allclose(got, expected, rtol=1e-3)
    assert result.info["emulated_cosine"]["y"] >= 0.9999


def test_rounding_the_cpu_hides_is_reported_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # (x + 1000) - 1000 in float16 loses x (float16 steps by 0.5 near 1000); ONNX Runtime's CPU
    # provider computes the pair in float32 and would not show it.
    model = build(
        """
        g (float[2, 4] x) => (float[2, 4] y) {
            a = Add(x, c)
            y = Sub(a, c)
        }
        """,
        {"c": np.array(1000, np.float32)},
    )
    x = np.linspace(0.01, 0.2, 8, dtype=np.float32).reshape(2, 4)
    with caplog.at_level(logging.WARNING):
        result = convert(model, write_feeds(tmp_path, {"x": x}))
    assert np.allclose(run(checked(model), {"x": x})["y"], x, atol=1e-4)  # what the CPU shows
    assert not result.info["emulated_cosine"]["y"] >= 0.99
    assert "float16 rounding emulated" in caplog.text


@pytest.mark.parametrize("name", ["transformer", "control_flow", "traced_decoder"])
def test_a_second_run_changes_nothing(name: str) -> None:
    model = load_model(GOLDEN / f"{name}.onnx")
    assert convert(model, range_check=False).changed
    once = model.to_onnx().SerializeToString()
    again = convert(model, range_check=False)
    assert not again.changed and model.to_onnx().SerializeToString() == once
