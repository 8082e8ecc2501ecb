"""The ONNX Runtime back end: sessions, options, emitted artefacts and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers_verify import affine_feeds, affine_model, affine_numpy, custom_op_model

from iropt.errors import OptionError, UserError
from iropt.infra.options import option_specs
from iropt.infra.registry import BACKENDS
from iropt.io.save import save_model
from iropt.lowering.ort import OrtBackend
from iropt.verify import runtime as ort_backend
from iropt.verify.runtime import OrtRunner, make_session

RTOL, ATOL = 1e-6, 1e-6


def test_registered_with_typed_options_and_defaults() -> None:
    entry = BACKENDS.get("ort")
    assert entry.cls is OrtBackend
    defaults = {spec.name: spec.default for spec in option_specs(OrtBackend)}
    assert defaults == {
        "providers": ["CPUExecutionProvider"],
        "intra_op_threads": 0,
        "inter_op_threads": 0,
        "optimization_level": "all",
        "strict_providers": False,
        "save_optimized": False,
        "save_ort_format": False,
        "portable": True,
    }


def test_compile_runs_the_model() -> None:
    backend = BACKENDS.create("ort", {"intra_op_threads": 1, "optimization_level": "extended"})
    runner = backend.compile(affine_model())
    assert isinstance(runner, OrtRunner)
    assert runner.input_names == ["x"] and runner.output_names == ["y"]
    for feed in affine_feeds(2):
        np.testing.assert_allclose(runner.run(feed)["y"], affine_numpy(feed["x"]), rtol=RTOL, atol=ATOL)
    options = runner.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("disable", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        ("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
        ("layout", ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT),
        ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ],
)
def test_optimization_levels(level: str, expected: ort.GraphOptimizationLevel) -> None:
    session = make_session(affine_model(), optimization_level=level)  # type: ignore[arg-type]
    assert session.get_session_options().graph_optimization_level == expected


def test_unknown_provider_is_a_user_error_listing_the_available_ones() -> None:
    with pytest.raises(UserError, match="'NoSuchExecutionProvider' is not available") as info:
        BACKENDS.create("ort", {"providers": ["NoSuchExecutionProvider"]})
    for provider in ort.get_available_providers():
        assert provider in str(info.value)
    with pytest.raises(UserError, match="at least one provider"):
        OrtBackend(providers=[])


def test_bad_option_values_are_option_errors() -> None:
    with pytest.raises(OptionError, match="optimization_level"):
        BACKENDS.create("ort", {"optimization_level": "maximum"})


def test_ort_refuses_a_custom_domain_op_with_a_user_error() -> None:
    with pytest.raises(UserError, match=r"^ONNX Runtime cannot run this model: .*Frobnicate") as info:
        OrtBackend().compile(custom_op_model())
    assert "\n" not in str(info.value)  # the first line of ORT's message only


def test_run_failure_is_a_user_error() -> None:
    runner = OrtBackend().compile(affine_model())
    with pytest.raises(UserError, match="ONNX Runtime failed to run the model"):
        runner.run({"x": np.ones((2, 5), np.float32)})


def test_runner_ignores_feeds_for_inputs_the_model_lacks() -> None:
    runner = OrtBackend().compile(affine_model())
    feed = affine_feeds(1)[0]
    out = runner.run({**feed, "removed_input": np.zeros(1, np.float32)})
    np.testing.assert_allclose(out["y"], affine_numpy(feed["x"]), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("as_proto", [False, True], ids=["model", "proto"])
def test_large_models_go_through_a_file_with_external_data(monkeypatch: pytest.MonkeyPatch, as_proto: bool) -> None:
    # Lower the in-memory limit instead of building a 2 GB model: the file path is the same.
    monkeypatch.setattr(ort_backend, "IN_MEMORY_LIMIT", 0)
    model = affine_model()
    runner = OrtRunner(make_session(model.to_onnx() if as_proto else model, optimization_level="disable"))
    feed = affine_feeds(1)[0]
    np.testing.assert_allclose(runner.run(feed)["y"], affine_numpy(feed["x"]), rtol=RTOL, atol=ATOL)


def test_session_from_a_path(tmp_path: Path) -> None:
    path = save_model(affine_model(), tmp_path / "m.onnx")
    runner = OrtRunner.from_model(path, optimization_level="disable")
    feed = affine_feeds(1)[0]
    np.testing.assert_allclose(runner.run(feed)["y"], affine_numpy(feed["x"]), rtol=RTOL, atol=ATOL)


def test_emit_writes_nothing_by_default(tmp_path: Path) -> None:
    out = save_model(affine_model(), tmp_path / "m.opt.onnx")
    assert OrtBackend().emit(affine_model(), out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.opt.onnx"]


def test_save_optimized_writes_ort_optimized_model(tmp_path: Path) -> None:
    out = save_model(affine_model(), tmp_path / "m.opt.onnx")
    written = OrtBackend(save_optimized=True, optimization_level="basic").emit(affine_model(), out)
    assert written == [tmp_path / "m.opt.ort-optimized.onnx"]
    optimized = onnx.load(str(written[0]))
    # ORT's basic level removes the Identity nodes the input model has.
    assert "Identity" not in {n.op_type for n in optimized.graph.node}
    session = ort.InferenceSession(str(written[0]), providers=["CPUExecutionProvider"])
    feed = affine_feeds(1)[0]
    np.testing.assert_allclose(session.run(None, feed)[0], affine_numpy(feed["x"]), rtol=RTOL, atol=ATOL)
    # Nothing else is left behind (the scratch folder is gone).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.opt.onnx", "m.opt.ort-optimized.onnx"]


def test_save_ort_format_writes_an_ort_file(tmp_path: Path) -> None:
    out = save_model(affine_model(), tmp_path / "m.opt.onnx")
    (written,) = OrtBackend(save_ort_format=True).emit(affine_model(), out)
    assert written == tmp_path / "m.opt.ort"
    assert written.read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer file identifier
    session = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    feed = affine_feeds(1)[0]
    np.testing.assert_allclose(session.run(None, feed)[0], affine_numpy(feed["x"]), rtol=RTOL, atol=ATOL)


GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
AZURE = "AzureExecutionProvider"
needs_azure = pytest.mark.skipif(
    AZURE not in ort.get_available_providers(),
    reason="needs an ONNX Runtime build with AzureExecutionProvider, which runs no ops itself",
)


def test_provider_fallback_in_words() -> None:
    assert ort_backend.provider_fallback(["CPUExecutionProvider"], ["CPUExecutionProvider"], False) is None
    missing = ort_backend.provider_fallback(
        ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], False
    )
    assert missing is not None and "CUDAExecutionProvider did not start" in missing
    cpu = ort_backend.provider_fallback(["CUDAExecutionProvider"], ["CUDAExecutionProvider"], True)
    assert cpu is not None and "would run on CPUExecutionProvider" in cpu


@needs_azure
def test_nodes_sent_to_an_unasked_cpu_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="iropt.ort"):
        session = make_session(affine_model(), providers=[AZURE])
    assert "some nodes would run on CPUExecutionProvider" in caplog.text
    assert "strict_providers=true" in caplog.text
    feed = affine_feeds(1)[0]
    np.testing.assert_allclose(session.run(None, feed)[0], affine_numpy(feed["x"]), rtol=RTOL, atol=ATOL)


@needs_azure
def test_strict_providers_refuses_a_cpu_fallback() -> None:
    with pytest.raises(UserError, match="strict_providers=true refuses a fallback"):
        OrtBackend(providers=[AZURE], strict_providers=True).compile(affine_model())
    # Listing the CPU provider allows it: no fallback, no error.
    OrtBackend(providers=[AZURE, "CPUExecutionProvider"], strict_providers=True).compile(affine_model())


@needs_azure
def test_run_with_strict_providers_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    from iropt.app.cli import main

    schedule = tmp_path / "s.opt"
    schedule.write_text(f'target ort(providers=["{AZURE}"], strict_providers=true)\neliminate_identity\n')
    out = tmp_path / "m.opt.onnx"
    assert main(["-q", "run", str(schedule), str(GOLDEN / "mlp.onnx"), "-o", str(out)]) == 2
    assert list(tmp_path.iterdir()) == [schedule]
    schedule.write_text(f'target ort(providers=["{AZURE}"])\neliminate_identity\n')
    assert main(["-q", "run", str(schedule), str(GOLDEN / "mlp.onnx"), "-o", str(out)]) == 0
    assert out.exists()


def _domains(path: Path) -> set[str]:
    return {node.domain for node in onnx.load(str(path)).graph.node}


def test_saved_artefacts_are_portable_by_default(tmp_path: Path) -> None:
    from iropt.io.load import load_model

    model = load_model(GOLDEN / "conv_bn.onnx")
    feeds = dict(np.load(GOLDEN / "conv_bn.inputs.npz"))
    expected = make_session(model, optimization_level="disable").run(None, feeds)[0]
    portable = tmp_path / "portable"
    portable.mkdir()
    out = save_model(model, portable / "m.onnx")
    written = OrtBackend(save_optimized=True, save_ort_format=True).emit(model, out)
    assert [p.name for p in written] == ["m.ort-optimized.onnx", "m.ort"]
    # The basic level keeps to standard ONNX ops; "all" on this CPU writes ORT's own fused kernels.
    assert _domains(written[0]) <= {"", "ai.onnx"}
    for path in written:
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    tied = tmp_path / "tied"
    tied.mkdir()
    out = save_model(model, tied / "m.onnx")
    (optimized,) = OrtBackend(save_optimized=True, portable=False).emit(model, out)
    assert "com.microsoft" in _domains(optimized) or "com.microsoft.nchwc" in _domains(optimized)
