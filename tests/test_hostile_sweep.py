"""A generated sweep of damaged inputs: truncations, byte flips and structural mutations of a real
model file (the golden MLP), and truncations and mutations of a schedule. Every case must keep the
command line's contract: exit 0, 1 or 2 only; no traceback and no internal error; nothing written
when the command fails; the input never modified. The commands run in this process
(`iropt.app.cli.main`), so a case costs what the command costs, not an interpreter start.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from helpers_hostile import Outcome, Sandbox, add_model, run_cli, save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

# capsys is read and reset around every command, so sharing it between examples is safe. Each
# model example runs three commands (a run verifies through ONNX Runtime), so the model sweeps
# draw fewer examples than the profile's default to stay within seconds.
_SHARED_FIXTURE = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
_MODEL_CASES = settings(_SHARED_FIXTURE, max_examples=15)

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
MODEL_BYTES = (GOLDEN / "mlp.onnx").read_bytes()
INPUTS = GOLDEN / "mlp.inputs.npz"
SCHEDULE = """# exact passes, then a check
target ort(providers=["CPUExecutionProvider"], intra_op_threads=1)
fixpoint(max=4) {
  fold_constants(max_bytes=1MiB, fold_shapes=true)
  eliminate_identity
  eliminate_dead_code
}
repeat(2) { eliminate_common_subexpressions }
verify(rtol=1e-4, atol=1e-5, samples=2)
"""


def _contract(outcome: Outcome, sandbox: Sandbox, inputs: dict[Path, str]) -> None:
    assert outcome.code in (0, 1, 2), (outcome.code, outcome.err[-2000:])
    assert "Traceback" not in outcome.err and "internal error" not in outcome.err, outcome.err[-2000:]
    if outcome.code != 0:
        sandbox.assert_unchanged()
    for path, digest in inputs.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} was modified"


def _run_model(data: bytes, capsys: object, extra: Callable[[Path], None] | None = None) -> None:
    """`inspect`, `run` and `compare` on a model file holding `data`; the contract after each."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "w.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
        model = folder / "m.onnx"
        model.write_bytes(data)
        if extra is not None:
            extra(folder)
        inputs = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}
        out = folder / "out" / "o.onnx"
        out.parent.mkdir()
        commands = [["inspect", str(model)], ["run", "cleanup", str(model), "-o", str(out), "-q"],
                    ["compare", str(GOLDEN / "mlp.onnx"), str(model), "-q", "--samples", "1"]]
        for command in commands:
            sandbox = Sandbox(folder)
            _contract(run_cli(command, capsys), sandbox, inputs)  # type: ignore[arg-type]
            if out.exists():
                out.unlink()


# --- model files: bytes -------------------------------------------------------------------------


@_MODEL_CASES
@given(cut=st.integers(min_value=0, max_value=len(MODEL_BYTES) - 1))
def test_truncated_model_files_keep_the_contract(cut: int, capsys: object) -> None:
    _run_model(MODEL_BYTES[:cut], capsys)


@_MODEL_CASES
@given(flips=st.lists(st.tuples(st.integers(0, len(MODEL_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_model_files_with_flipped_bytes_keep_the_contract(flips: list[tuple[int, int]], capsys: object) -> None:
    data = bytearray(MODEL_BYTES)
    for position, value in flips:
        data[position] = value
    _run_model(bytes(data), capsys)


# --- model files: structure ----------------------------------------------------------------------

LOCATIONS = ["w.bin", "../w.bin", "/etc/hostname", "", "sub/../w.bin", "missing.bin", ".", "w.bin/x", "link.bin"]
NAMES = ["input", "logits", "nope", "", "x" * 300]


def _mutate(proto: onnx.ModelProto, kind: int, draw: st.DataObject) -> None:
    graph = proto.graph
    pick = draw.draw(st.integers(0, 10**6))
    tensor = graph.initializer[pick % len(graph.initializer)]
    node = graph.node[pick % len(graph.node)]
    if kind == 0:
        proto.ir_version = draw.draw(st.integers(-5, 200))
    elif kind == 1:
        proto.opset_import[0].version = draw.draw(st.integers(-1, 200))
    elif kind == 2:
        del tensor.dims[:]
        tensor.dims.extend(draw.draw(st.lists(st.integers(-3, 2**40), max_size=4)))
    elif kind == 3:
        tensor.data_type = draw.draw(st.integers(0, 30))
    elif kind == 4:
        graph.initializer.add().CopyFrom(tensor)
    elif kind == 5:
        node.input[pick % len(node.input)] = draw.draw(st.sampled_from(NAMES))
    elif kind == 6:
        graph.node.remove(node)
    elif kind == 7:
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", draw.draw(st.sampled_from(LOCATIONS))),
                           ("offset", str(draw.draw(st.integers(-8, 300)))),
                           ("length", str(draw.draw(st.integers(-8, 300))))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    elif kind == 8:
        graph.output.append(helper.make_tensor_value_info(draw.draw(st.sampled_from(NAMES)), TensorProto.FLOAT, [1]))
    elif kind == 9:
        graph.input[0].type.tensor_type.elem_type = draw.draw(st.integers(0, 30))
    elif kind == 10:
        node.op_type = draw.draw(st.sampled_from(["Add", "Relu", "Frobnicate", "If", "Loop", "", "Constant"]))
    elif kind == 11:
        node.domain = draw.draw(st.sampled_from(["", "ai.onnx.ml", "com.microsoft", "nope"]))
    elif kind == 12:
        node.output[0] = draw.draw(st.sampled_from(NAMES))
    else:
        graph.node.extend(list(graph.node)[:1])  # a node twice: its output defined twice


def _link_outside(folder: Path) -> None:
    (folder / "link.bin").symlink_to(folder.parent)


@_MODEL_CASES
@given(kinds=st.lists(st.integers(0, 13), min_size=1, max_size=3), draw=st.data())
def test_structurally_damaged_models_keep_the_contract(kinds: list[int], draw: st.DataObject, capsys: object) -> None:
    proto = onnx.load_from_string(MODEL_BYTES)
    for kind in kinds:
        _mutate(proto, kind, draw)
    _run_model(proto.SerializeToString(), capsys, extra=_link_outside)


# --- schedules -------------------------------------------------------------------------------------

FRAGMENTS = ["{", "}", "(", ")", "[", "]", ",", "=", ";", "\n", "\"", "#", "-1", "1e999", "99999999999999999999",
             "0", "1MiB", "true", "none", "repeat(1000000)", "fixpoint", "verify", "target", "x" * 500, "\u2028",
             "\x00", "max=", "rtol=-1", "samples=0", "max_bytes=-5"]


@_SHARED_FIXTURE
@given(
    cut=st.integers(0, len(SCHEDULE)),
    edits=st.lists(st.tuples(st.integers(0, len(SCHEDULE)), st.sampled_from(FRAGMENTS)), max_size=4),
)
def test_damaged_schedules_keep_the_contract(cut: int, edits: list[tuple[int, str]], capsys: object) -> None:
    text = SCHEDULE[:cut] if not edits else SCHEDULE
    for position, fragment in sorted(edits, reverse=True):
        text = text[:position] + fragment + text[position:]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        schedule = folder / "s.opt"
        schedule.write_text(text, encoding="utf-8")
        model = save(add_model(), folder / "m.onnx")
        inputs = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (schedule, model)}
        sandbox = Sandbox(folder)
        checked = run_cli(["check", str(schedule)], capsys)  # type: ignore[arg-type]
        assert checked.code in (0, 2)
        _contract(checked, sandbox, inputs)
        ran = run_cli(["run", str(schedule), str(model), "-o", str(folder / "o.onnx"), "-q"], capsys)  # type: ignore[arg-type]
        _contract(ran, sandbox, inputs)
        assert (ran.code == 2) == (checked.code == 2), (checked.err, ran.err)


# --- input files ------------------------------------------------------------------------------------

INPUT_BYTES = INPUTS.read_bytes()


@settings(_SHARED_FIXTURE, max_examples=10)
@given(cut=st.integers(0, len(INPUT_BYTES)), flips=st.lists(st.tuples(st.integers(0, len(INPUT_BYTES) - 1),
                                                                     st.integers(0, 255)), max_size=4))
def test_damaged_input_files_keep_the_contract(cut: int, flips: list[tuple[int, int]], capsys: object) -> None:
    data = bytearray(INPUT_BYTES[:cut] if not flips else INPUT_BYTES)
    for position, value in flips:
        data[position] = value
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = folder / "x.npz"
        inputs.write_bytes(bytes(data))
        model = folder / "m.onnx"
        model.write_bytes(MODEL_BYTES)
        digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (inputs, model)}
        sandbox = Sandbox(folder)
        outcome = run_cli(["run", "cleanup", str(model), "-o", str(folder / "o.onnx"), "--inputs", str(inputs), "-q"],
                          capsys)  # type: ignore[arg-type]
        _contract(outcome, sandbox, digests)
