"""`iropt bench`: real ONNX Runtime runs in worker processes, the table, JSON, plot and refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
from helpers_verify import CUSTOM_OP_TEXT

from iropt.app import bench
from iropt.app.cli import main
from iropt.errors import UserError
from iropt.verify.feeds import InputSpec

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
QUICK = ["--runs", "6", "--rounds", "3", "--warmup", "1", "--threads", "1"]


def test_two_models_side_by_side_with_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", str(GOLDEN / "mlp.onnx"), str(GOLDEN / "conv_bn.onnx"), *QUICK,
                 "--json", str(report), "--plot", str(plot)])
    assert code == 0
    table = capsys.readouterr().out
    assert "mlp.onnx" in table and "conv_bn.onnx" in table and "x)" in table  # ratios after the first
    data = json.loads(report.read_text())
    assert [m["model"] for m in data["models"]] == [str(GOLDEN / "mlp.onnx"), str(GOLDEN / "conv_bn.onnx")]
    for model in data["models"]:
        latency = model["latency_ms"]
        assert model["runs"] == 6 and len(model["latencies_ms"]) == 6
        assert 0 < latency["min"] <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert model["session_start_ms"] > 0 and model["throughput_per_s"] > 0
        assert model["providers"] == ["CPUExecutionProvider"]
        assert model["peak_memory_mib"] is None or model["peak_memory_mib"] >= 0
    first = data["ratios_to_first"][0]
    assert first["p50"] == pytest.approx(1.0) and first["throughput"] == pytest.approx(1.0)
    second = data["models"][1]["latency_ms"]["p50"] / data["models"][0]["latency_ms"]["p50"]
    assert data["ratios_to_first"][1]["p50"] == pytest.approx(second)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_and_shape_set_the_generated_inputs(tmp_path: Path) -> None:
    # The golden transformer's batch is dynamic: --batch 3 feeds three rows.
    report = tmp_path / "b.json"
    code = main(["-q", "bench", str(GOLDEN / "transformer.onnx"), *QUICK, "--batch", "3", "--json", str(report)])
    assert code == 0
    (model,) = json.loads(report.read_text())["models"]
    assert model["batch"] == 3
    assert model["throughput_per_s"] == pytest.approx(3 / (model["latency_ms"]["p50"] / 1e3))


def test_batch_shapes_only_fill_dynamic_leading_dims() -> None:
    dynamic = InputSpec("x", None, ("N", 3, "H"), "FLOAT")
    fixed = InputSpec("y", None, (1, 4), "FLOAT")
    assert bench.batch_shapes([dynamic, fixed], 1, {}) == {"x": [1, 3, 1]}
    assert bench.batch_shapes([dynamic], 8, {"x": [2, 3, 5]}) == {"x": [2, 3, 5]}  # --shape wins
    with pytest.raises(UserError, match="fixed batch of 1"):
        bench.batch_shapes([fixed], 4, {})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--runs", "0"], "--runs must be at least 1"),
        (["--threads", "-1"], "--threads must be at least 0"),
        (["--batch", "2", "--inputs", "x.npz"], "not both"),
        (["--plot", "out.jpg"], "ending in .png"),
        (["--json", "no/such/folder/b.json"], "folder does not exist"),
        (["--providers", "NoSuchExecutionProvider"], "not available"),
        (["--shape", "x"], "expected NAME:DIMS"),
    ],
)
def test_bad_options_exit_2(extra: list[str], message: str, capsys: pytest.CaptureFixture[str],
                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["bench", str(GOLDEN / "mlp.onnx"), *QUICK, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_models_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    assert "no such model file" in capsys.readouterr().err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    assert main(["bench", str(garbage)]) == 2
    assert "garbage.onnx" in capsys.readouterr().err
    fixed = tmp_path / "fixed.onnx"
    proto = onnx.load(str(GOLDEN / "mlp.onnx"))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a fixed batch of 1
    onnx.save(proto, str(fixed))
    assert main(["bench", str(fixed), "--batch", "4"]) == 2
    assert "fixed batch of 1" in capsys.readouterr().err


def test_a_model_ort_cannot_run_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    custom = tmp_path / "custom.onnx"
    onnx.save(onnx.parser.parse_model(CUSTOM_OP_TEXT), str(custom))
    assert main(["-q", "bench", str(custom), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "custom.onnx" in err and "Frobnicate" in err and "Traceback" not in err


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"iropt\[plot\]"):
        bench.check_plot_available()
