"""The shipped int8 schedules on opset 11/12 exports, and what quantize puts in the report."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from iropt.app.cli import main

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
CALIBRATION = GOLDEN / "digits_cnn.calib.npz"


def _digits_at_opset(opset: int, path: Path) -> Path:
    """digits_cnn as an older exporter writes it: same ops, older opset (BatchNormalization
    without the opset-14 `training_mode` attribute)."""
    model = onnx.load(str(GOLDEN / "digits_cnn.onnx"))
    model.opset_import[0].version = opset
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name != "training_mode"]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _quantize_record(report: Path) -> dict[str, object]:
    data = json.loads(report.read_text())
    (record,) = [p for p in data["passes"] if p["pass"] == "quantize"]
    return record


@pytest.mark.parametrize(
    ("schedule", "opset"),
    [("int8_ort.opt", 11), ("int8_ort.opt", 12), ("int8_tensorrt.opt", 11)],
)
def test_shipped_int8_schedules_upgrade_old_opsets(
    schedule: str, opset: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = _digits_at_opset(opset, tmp_path / f"digits_{opset}.onnx")
    out, report = tmp_path / "int8.onnx", tmp_path / "r.json"
    args = ["run", str(GOLDEN / schedule), str(source), "-o", str(out), "--calibration", str(CALIBRATION),
            "--report", str(report), "--no-emit"]
    assert main(args) == 0
    written = onnx.load(str(out))
    assert written.opset_import[0].version == 13
    stats = _quantize_record(report)["stats"]
    # For ORT, measured placement keeps the layers float that do not run faster in int8 on this
    # machine (possibly all of them); TensorRT gets every layer quantized.
    quantized = stats["quantized_nodes"] > 0 if "kept_float_measured" in stats else True
    assert ("QuantizeLinear" in {n.op_type for n in written.graph.node}) == quantized
    assert stats["upgraded_from_opset"] == opset
    assert any(f"from opset {opset} to 13" in r.getMessage() for r in caplog.records)


def test_quantize_names_its_float_layers_in_the_report(tmp_path: Path) -> None:
    schedule = tmp_path / "q.opt"
    schedule.write_text('quantize(exclude_op_types=["Gemm"], placement="rules")\n')
    report = tmp_path / "r.json"
    args = ["-q", "run", str(schedule), str(GOLDEN / "digits_cnn.onnx"), "-o", str(tmp_path / "q.onnx"),
            "--calibration", str(CALIBRATION), "--report", str(report)]
    assert main(args) == 0
    info = _quantize_record(report)["info"]
    # The first Conv reads one channel of an 8x8 image: kept float as slow in int8, with the reason.
    (slow,) = info["skipped_slow"]
    assert slow["layer"].endswith("(Conv)") and "input channel" in slow["reason"]
    assert [label.endswith("(Gemm)") for label in info["excluded"]] == [True]
