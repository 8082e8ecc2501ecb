"""The TensorRT Q/DQ lint: one rule at a time, on hand-built models that differ from TensorRT's
form in exactly that rule; and, where TensorRT-RTX is installed, that the models the lint calls
clean do build and the ones it rejects for scales, zero points or int32 bias do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_trt import QdqGraph, qdq_conv, requires_tensorrt
from onnx import TensorProto

from iropt.errors import UserError
from iropt.io.load import load_model
from iropt.ir.model import Model
from iropt.lowering.tensorrt_lint import RULES, LintIssue, format_lint, has_errors, lint_qdq_for_tensorrt

GOLDEN = Path(__file__).resolve().parent.parent / "golden_models"


def rules(issues: list[LintIssue]) -> set[tuple[str, str, str]]:
    return {(issue.rule, issue.severity, issue.node) for issue in issues}


def only(issues: list[LintIssue], rule: str) -> list[LintIssue]:
    return [issue for issue in issues if issue.rule == rule]


# --- models TensorRT takes as they are ------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: qdq_conv(), id="int8-weight-dq"),
        pytest.param(lambda: qdq_conv(float_weight=True), id="float-weight-q-dq"),
        pytest.param(lambda: qdq_conv(bias="none"), id="no-bias"),
    ],
)
def test_tensorrt_form_has_no_issues(model) -> None:  # type: ignore[no-untyped-def]
    assert lint_qdq_for_tensorrt(model()) == []


def test_model_without_qdq_has_no_issues() -> None:
    assert lint_qdq_for_tensorrt(load_model(GOLDEN / "resnet.onnx")) == []


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [-0.05, 0.0, float("inf")])
def test_scale_must_be_strictly_positive(scale: float) -> None:
    issues = lint_qdq_for_tensorrt(qdq_conv(act_scale=scale))
    # Both the Q and the DQ of the activation share the bad scale.
    assert rules(issues) == {("qdq-scale", "error", "x_q"), ("qdq-scale", "error", "x_dq")}
    assert "strictly positive" in issues[0].message


def test_scale_must_be_a_constant() -> None:
    g = QdqGraph()
    x, scale = g.input("x", [1, 4]), g.input("scale", [])
    zero = g.const("zero", np.int8(0))
    q = g.node("QuantizeLinear", [x, scale, zero], "q")
    g.node("DequantizeLinear", [q, scale, zero], "dq", outputs=["y"])
    g.output("y", [1, 4])
    issues = lint_qdq_for_tensorrt(g.model())
    assert rules(issues) == {("qdq-scale", "error", "q"), ("qdq-scale", "error", "dq")}
    assert "not a constant" in issues[0].message


def test_per_channel_scale_needs_one_value_per_channel() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 3, 4, 4])
    g.qdq(x, "x", scale=[0.1, 0.2], zero_point=np.zeros(2, np.int8), axis=1)
    g.output("x_dq_out", None)
    issues = only(lint_qdq_for_tensorrt(g.model(check=False)), "qdq-scale")
    assert {i.node for i in issues} == {"x_q", "x_dq"}
    assert "2 values but axis 1" in issues[0].message


def test_nonzero_zero_point_is_rejected() -> None:
    issues = lint_qdq_for_tensorrt(qdq_conv(act_zero=np.int8(3)))
    assert rules(issues) == {("qdq-zero-point", "error", "x_q"), ("qdq-zero-point", "error", "x_dq")}
    assert "[3]" in issues[0].message and "symmetric" in issues[0].message


def test_uint8_is_rejected_even_with_zero_point_0() -> None:
    issues = lint_qdq_for_tensorrt(qdq_conv(act_zero=np.uint8(0)))
    assert rules(issues) == {("qdq-dtype", "error", "x_q")}
    assert "uint8" in issues[0].message and "int8 with zero point 0" in issues[0].message


def test_uint8_with_offset_zero_point_gets_both_errors() -> None:
    issues = lint_qdq_for_tensorrt(qdq_conv(act_zero=np.uint8(128)))
    assert ("qdq-dtype", "error", "x_q") in rules(issues)
    assert ("qdq-zero-point", "error", "x_q") in rules(issues)


def test_quantize_without_zero_point_produces_uint8() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 4])
    scale = g.const("scale", np.float32(0.1))
    q = g.node("QuantizeLinear", [x, scale], "q")
    g.node("DequantizeLinear", [q, scale], "dq", outputs=["y"])
    g.output("y", [1, 4])
    issues = lint_qdq_for_tensorrt(g.model())
    assert rules(issues) == {("qdq-dtype", "error", "q")}
    assert "without a zero point produces uint8" in issues[0].message


def test_output_dtype_int8_without_zero_point_is_fine() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 4])
    scale = g.const("scale", np.float32(0.1))
    q = g.node("QuantizeLinear", [x, scale], "q", output_dtype=TensorProto.INT8)
    g.node("DequantizeLinear", [q, scale], "dq", outputs=["y"])
    g.output("y", [1, 4])
    assert lint_qdq_for_tensorrt(g.model(opset=21)) == []


def test_int32_bias_through_dequantize_is_rejected() -> None:
    issues = lint_qdq_for_tensorrt(qdq_conv(bias="int32"))
    assert rules(issues) == {("qdq-int32-bias", "error", "b_dq")}
    assert "QuantizeBias" in issues[0].message and "float" in issues[0].message


def test_dangling_quantize_into_graph_output() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 4])
    g.node("QuantizeLinear", [x, g.const("s", np.float32(0.1)), g.const("z", np.int8(0))], "q",
           outputs=["y"])
    g.output("y", [1, 4], TensorProto.INT8)
    issues = lint_qdq_for_tensorrt(g.model())
    assert rules(issues) == {("qdq-dangling-q", "error", "q")}
    assert "graph output 'y'" in issues[0].message


def test_dangling_quantize_into_arithmetic() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 4])
    q = g.node("QuantizeLinear", [x, g.const("s", np.float32(0.1)), g.const("z", np.int8(0))], "q")
    g.node("Cast", [q], "cast", outputs=["y"], to=TensorProto.FLOAT)
    g.output("y", [1, 4])
    issues = lint_qdq_for_tensorrt(g.model())
    assert rules(issues) == {("qdq-dangling-q", "error", "q")}
    assert "node 'cast' (Cast)" in issues[0].message


def test_quantized_value_may_move_through_layout_ops_to_its_dq() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 3, 4, 4])
    s, z = g.const("s", np.float32(0.1)), g.const("z", np.int8(0))
    q = g.node("QuantizeLinear", [x, s, z], "q")
    t = g.node("Transpose", [q], "transpose", perm=[0, 1, 3, 2])
    g.node("DequantizeLinear", [t, s, z], "dq", outputs=["y"])
    g.output("y", [1, 3, 4, 4])
    assert lint_qdq_for_tensorrt(g.model()) == []


@pytest.mark.parametrize(
    ("op", "domain"), [("ConvInteger", ""), ("DynamicQuantizeLinear", ""), ("QGemm", "com.microsoft")]
)
def test_qoperator_format_is_rejected(op: str, domain: str) -> None:
    g = QdqGraph()
    x = g.input("x", [1, 4])
    g.node(op, [x], "qop", domain=domain, outputs=["y"])
    g.output("y", None)
    issues = lint_qdq_for_tensorrt(g.model(check=False))
    assert rules(issues) == {("qdq-qoperator", "error", "qop")}
    assert "QDQ format" in issues[0].message


# --- warnings -------------------------------------------------------------------------------------


def test_conv_weight_scales_on_input_channels() -> None:
    # Scales computed per input channel (axis 1) and declared so: valid ONNX, wrong for int8 kernels.
    issues = lint_qdq_for_tensorrt(qdq_conv(weight_axis=1))
    assert rules(issues) == {("qdq-weight-axis", "warning", "w_dq")}
    assert "axis 1" in issues[0].message and "set axis=0" in issues[0].message


@pytest.mark.parametrize(
    ("op", "shape", "attrs", "good_axis", "bad_axis"),
    [
        ("ConvTranspose", (3, 4, 3, 3), {}, 1, 0),
        ("Gemm", (5, 6), {"transB": 1}, 0, 1),
        ("Gemm", (6, 5), {}, 1, 0),
        ("MatMul", (6, 5), {}, 1, 0),
    ],
)
def test_weight_axis_is_the_output_channel_axis(
    op: str, shape: tuple[int, ...], attrs: dict[str, int], good_axis: int, bad_axis: int
) -> None:
    def build(axis: int) -> Model:
        g = QdqGraph()
        x = g.input("x", [1, 3, 8, 8] if op == "ConvTranspose" else [2, 6])
        w = g.int8_weight("w", g.weights(shape), axis)
        g.node(op, [g.qdq(x, "x"), w], "op", outputs=["y"], **attrs)
        g.output("y", None)
        return g.model(check=False)

    assert lint_qdq_for_tensorrt(build(good_axis)) == []
    issues = lint_qdq_for_tensorrt(build(bad_axis))
    assert rules(issues) == {("qdq-weight-axis", "warning", "w_dq")}
    assert f"set axis={good_axis}" in issues[0].message


def test_per_channel_activation() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 3, 4, 4])
    g.qdq(x, "x", scale=[0.1, 0.2, 0.3], zero_point=np.zeros(3, np.int8), axis=1)
    g.output("x_dq_out", [1, 3, 4, 4])
    issues = lint_qdq_for_tensorrt(g.model())
    assert rules(issues) == {("qdq-activation-per-channel", "warning", "x_q")}


def test_dequantize_of_an_int8_graph_input() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 4], TensorProto.INT8)
    g.node("DequantizeLinear", [x, g.const("s", np.float32(0.1)), g.const("z", np.int8(0))], "dq",
           outputs=["y"])
    g.output("y", [1, 4])
    issues = lint_qdq_for_tensorrt(g.model())
    assert rules(issues) == {("qdq-activation-pair", "warning", "dq")}
    assert "a graph input" in issues[0].message


def test_pair_with_different_scales_requantizes() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 4])
    g.qdq(x, "x", scale=0.1, dq_scale=0.2)
    g.output("x_dq_out", [1, 4])
    assert rules(lint_qdq_for_tensorrt(g.model())) == {("qdq-pair-mismatch", "warning", "x_dq")}


def test_weighted_op_with_quantized_weight_but_float_input() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 3, 8, 8])
    w = g.int8_weight("w", g.weights((4, 3, 3, 3)), 0)
    g.node("Conv", [x, w], "conv", outputs=["y"])
    g.output("y", [1, 4, 6, 6])
    issues = lint_qdq_for_tensorrt(g.model())
    assert rules(issues) == {("qdq-half-quantized", "warning", "conv")}
    assert "input 'x' is not quantized" in issues[0].message


def test_weighted_op_with_quantized_input_but_float_weight() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 3, 8, 8])
    g.node("Conv", [g.qdq(x, "x"), g.const("w", g.weights((4, 3, 3, 3)))], "conv", outputs=["y"])
    g.output("y", [1, 4, 6, 6])
    issues = lint_qdq_for_tensorrt(g.model())
    assert rules(issues) == {("qdq-half-quantized", "warning", "conv")}
    assert "weight 'w' is not quantized" in issues[0].message


def _residual(quantize_skip: bool, skip_from_dq_only: bool = False) -> Model:
    """conv(int8) + skip, where skip is x (float), x through Q/DQ, or a float op's output."""
    g = QdqGraph()
    x = g.input("x", [1, 4, 8, 8])
    xq = g.qdq(x, "x")
    conv = g.node("Conv", [xq, g.int8_weight("w", g.weights((4, 4, 3, 3)), 0)], "conv", pads=[1, 1, 1, 1])
    if skip_from_dq_only:
        left, right = xq, g.node("Relu", [x], "relu")
    else:
        left, right = conv, g.qdq(x, "skip") if quantize_skip else x
    g.node("Add", [left, right], "add", outputs=["y"])
    g.output("y", [1, 4, 8, 8])
    return g.model()


def test_residual_add_with_quantized_skip_is_fusable() -> None:
    assert lint_qdq_for_tensorrt(_residual(quantize_skip=True)) == []


def test_residual_add_with_float_skip() -> None:
    issues = lint_qdq_for_tensorrt(_residual(quantize_skip=False))
    assert rules(issues) == {("qdq-residual-add", "warning", "add")}
    assert "input 'x' is not quantized" in issues[0].message


def test_add_of_a_quantized_and_a_float_value() -> None:
    issues = lint_qdq_for_tensorrt(_residual(quantize_skip=False, skip_from_dq_only=True))
    assert rules(issues) == {("qdq-residual-add", "warning", "add")}
    assert "'relu_out'" in issues[0].message


def test_subgraphs_are_linted() -> None:
    import onnx
    from onnx import helper

    inner = QdqGraph()
    inner.node("QuantizeLinear", ["x", "s", "zu"], "inner_q", outputs=["iq"])
    inner.node("DequantizeLinear", ["iq", "s", "zu"], "inner_dq", outputs=["branch_out"])
    branch = helper.make_graph(inner.nodes, "then", [], [helper.make_tensor_value_info("branch_out", 1, [1, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", 1, [1, 4])])
    outer = QdqGraph()
    outer.input("x", [1, 4])
    outer.input("cond", [], TensorProto.BOOL)
    outer.const("s", np.float32(0.1))
    outer.const("zu", np.uint8(0))
    outer.node("If", ["cond"], "if", outputs=["y"], then_branch=branch, else_branch=other)
    outer.output("y", [1, 4])
    proto = helper.make_model(
        helper.make_graph(outer.nodes, "g", outer.inputs, outer.outputs, outer.initializers),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.checker.check_model(proto)
    issues = lint_qdq_for_tensorrt(Model.from_onnx(proto))
    assert rules(issues) == {("qdq-dtype", "error", "inner_q")}


# --- the report -----------------------------------------------------------------------------------


def test_format_lint_summarises_errors_first() -> None:
    issues = lint_qdq_for_tensorrt(_residual(quantize_skip=False)) + lint_qdq_for_tensorrt(qdq_conv(bias="int32"))
    text = format_lint(sorted(issues, key=lambda i: i.severity != "error"))
    lines = text.splitlines()
    assert lines[0] == "TensorRT Q/DQ lint: 1 error(s), 1 warning(s)"
    assert lines[1].startswith("  error: b_dq:") and lines[1].endswith("[qdq-int32-bias]")
    assert lines[2].startswith("  warning: add:")
    assert format_lint([]) == "TensorRT Q/DQ lint: no issues"
    assert has_errors(issues) and not has_errors(only(issues, "qdq-residual-add"))


def test_lint_returns_errors_before_warnings() -> None:
    g = QdqGraph()
    x = g.input("x", [1, 3, 8, 8])
    w = g.int8_weight("w", g.weights((4, 3, 3, 3)), 0)
    conv = g.node("Conv", [x, w], "conv")  # warning: float input
    g.qdq(conv, "out", zero_point=np.int8(5))  # error: zero point
    g.output("out_dq_out", [1, 4, 6, 6])
    severities = [issue.severity for issue in lint_qdq_for_tensorrt(g.model())]
    assert severities == sorted(severities, key=lambda s: s != "error") and "warning" in severities


def test_every_rule_is_documented() -> None:
    from iropt.lowering import tensorrt_lint as trt_lint

    assert trt_lint.__doc__ is not None
    for rule in RULES:
        assert f"`{rule}`" in trt_lint.__doc__, rule


# --- against TensorRT itself ----------------------------------------------------------------------


@requires_tensorrt
@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: qdq_conv(batch="batch"), id="int8-weight-dq"),
        pytest.param(lambda: qdq_conv(float_weight=True), id="float-weight-q-dq"),
        pytest.param(lambda: _residual(quantize_skip=True), id="fusable-residual"),
    ],
)
def test_models_the_lint_accepts_build(model) -> None:  # type: ignore[no-untyped-def]
    from iropt.lowering.tensorrt import TensorRTBackend

    built = model()
    assert not has_errors(lint_qdq_for_tensorrt(built))
    backend = TensorRTBackend(precision="int8")
    assert len(backend.build_engine(built)) > 0
    assert backend.last_build is not None and backend.last_build.strongly_typed


@requires_tensorrt
@pytest.mark.parametrize(
    ("model", "rule", "node"),
    [
        pytest.param(lambda: qdq_conv(act_scale=-0.05), "qdq-scale", "x_q", id="negative-scale"),
        pytest.param(lambda: qdq_conv(act_zero=np.int8(3)), "qdq-zero-point", "x_q", id="zero-point"),
        pytest.param(lambda: qdq_conv(bias="int32"), "qdq-int32-bias", "b_dq", id="int32-bias"),
    ],
)
def test_models_the_lint_rejects_fail_to_parse(model, rule: str, node: str) -> None:  # type: ignore[no-untyped-def]
    from iropt.lowering.tensorrt import TensorRTBackend

    with pytest.raises(UserError) as caught:
        TensorRTBackend(precision="int8").build_engine(model())
    message = str(caught.value)
    # TensorRT's own error names the node; the lint's finding (with the fix) follows it.
    assert f"node '{node}'" in message
    assert "TensorRT Q/DQ lint:" in message and f"[{rule}]" in message


@pytest.fixture(scope="module")
def ort_default_qdq(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """digits_cnn through onnxruntime.quantization.quantize_static with its defaults (QDQ format)."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    calibration = np.load(GOLDEN / "digits_cnn.calib.npz")["input"][:32]

    class Reader(quantization.CalibrationDataReader):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i : i + 8]} for i in range(0, 32, 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out = tmp_path_factory.mktemp("ortq") / "digits_cnn.ortq.onnx"
    quantization.quantize_static(str(GOLDEN / "digits_cnn.onnx"), str(out), Reader(),
                                 quant_format=quantization.QuantFormat.QDQ)
    return load_model(out)


def test_onnxruntime_default_qdq_output_is_flagged(ort_default_qdq: Model) -> None:
    issues = lint_qdq_for_tensorrt(ort_default_qdq)
    bias_errors = only(issues, "qdq-int32-bias")
    bias_dqs = [n.name for n in ort_default_qdq.graph.nodes
                if n.op == "DequantizeLinear" and n.inputs[0].dtype == np.int32]
    assert bias_dqs and sorted(i.node for i in bias_errors) == sorted(bias_dqs)
    # ORT calibrates activations asymmetrically: at least one zero point is not 0.
    assert only(issues, "qdq-zero-point")
    assert all(i.severity == "error" for i in bias_errors)


@requires_tensorrt
def test_onnxruntime_default_qdq_output_fails_to_parse(ort_default_qdq: Model) -> None:
    from iropt.lowering.tensorrt import TensorRTBackend

    with pytest.raises(UserError) as caught:
        TensorRTBackend(precision="int8").build_engine(ort_default_qdq)
    message = str(caught.value)
    assert "cannot parse the model" in message and "[qdq-int32-bias]" in message


# --- the quantize pass's output -------------------------------------------------------------------


def _quantized(name: str, fmt: str, calibration: str | None) -> Model:
    from iropt.errors import UnknownPassError
    from iropt.infra.pass_manager import run_passes
    from iropt.infra.registry import create_pass

    try:
        # Placement by rules: measured placement may keep the whole model float on this CPU,
        # and the lint needs the Q/DQ that format ort writes.
        quantize = create_pass(
            "quantize", {"format": fmt, "calibration": calibration, "max_samples": 16, "placement": "rules"}
        )
    except UnknownPassError:
        pytest.skip("the quantize pass is not registered")
    model = load_model(GOLDEN / f"{name}.onnx")
    run_passes(model, create_pass("fuse_bn_conv"), quantize)
    return model


@pytest.fixture(scope="module")
def digits_tensorrt() -> Model:
    return _quantized("digits_cnn", "tensorrt", str(GOLDEN / "digits_cnn.calib.npz"))


@pytest.fixture(scope="module")
def resnet_tensorrt() -> Model:
    # No calibration file: the pass calibrates on generated inputs (fine for checking structure).
    return _quantized("resnet", "tensorrt", None)


def test_quantize_for_tensorrt_passes_the_lint(digits_tensorrt: Model, resnet_tensorrt: Model) -> None:
    for model in (digits_tensorrt, resnet_tensorrt):
        assert any(n.op == "QuantizeLinear" for n in model.graph.nodes)
        assert lint_qdq_for_tensorrt(model) == []


def test_quantize_for_ort_is_flagged_for_tensorrt() -> None:
    model = _quantized("digits_cnn", "ort", str(GOLDEN / "digits_cnn.calib.npz"))
    issues = lint_qdq_for_tensorrt(model)
    assert has_errors(issues)
    found = {issue.rule for issue in issues}
    assert {"qdq-dtype", "qdq-int32-bias"} <= found
    assert any("uint8" in issue.message for issue in only(issues, "qdq-dtype"))


@requires_tensorrt
def test_quantize_for_tensorrt_builds(digits_tensorrt: Model, resnet_tensorrt: Model) -> None:
    from iropt.lowering.tensorrt import TensorRTBackend

    for model in (digits_tensorrt, resnet_tensorrt):
        backend = TensorRTBackend(precision="int8", max_shapes={"input": [4, *model.graph.inputs[0].shape[1:]]})
        assert len(backend.build_engine(model)) > 0
        assert backend.last_build is not None and backend.last_build.strongly_typed
