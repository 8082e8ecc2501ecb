"""The ONNX package's own backend test models, run through the `default` schedule.

The `onnx` wheel ships model test cases under `onnx/backend/test/data`:

- `simple/`, `pytorch-converted/`, `pytorch-operator/`: one folder per case with `model.onnx`
  and `test_data_set_N/{input,output}_K.pb` (inputs in graph-input order, outputs in
  graph-output order), read by `onnx.backend.test.loader.load_model_tests`.
- `real/`: the zoo models (AlexNet, ResNet-50, ...). The full models are downloaded; their
  "light" versions ship in `light/light_NAME.onnx` (weights built by ConstantOfShape) with the
  expected output in `light/light_NAME_output_0.pb`. onnx's runner derives the input itself
  (`Runner.generate_dummy_data(..., seed=0, random=False)`: `arange(n) / n` in the input's
  shape), and so do we.

Tolerances are onnx's own per case (`TestCase.rtol`/`atol`: 1e-3 and 1e-7 unless the case's
`data.json` says otherwise, 2e-3 for DenseNet-121), compared like onnx's runner
(`np.testing.assert_allclose`, exact for strings).

`evaluate(case)` runs one case: the original through ONNX Runtime (graph optimizations off),
then the `default` schedule, then the result. When ORT cannot run the original, or the
original's outputs in ORT do not match the expected ones, the case is *skipped*: it says
nothing about iropt. Otherwise it *passes* when the optimized model still matches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.test.loader import load_model_tests
from onnx.backend.test.runner import Runner

from iropt.dsl import load_schedule
from iropt.errors import UserError
from iropt.infra.pass_base import PassContext
from iropt.infra.pass_manager import PassManager
from iropt.io.load import load_proto
from iropt.ir.model import Model
from iropt.verify.runtime import OrtRunner, make_session

DATA_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data"
KINDS = ("light", "simple", "pytorch-converted", "pytorch-operator")

Status = Literal["passed", "skipped", "failed"]


@dataclass(frozen=True)
class Case:
    """One model with its data sets and onnx's tolerance for it."""

    id: str
    kind: str
    model_path: Path
    rtol: float
    atol: float
    data_dirs: tuple[Path, ...] = ()  # empty for light models: input derived, output beside

    @property
    def light(self) -> bool:
        return self.kind == "light"


@dataclass
class Outcome:
    status: Status
    reason: str = ""
    seconds: float = 0.0
    nodes: tuple[int, int] | None = None


def cases() -> list[Case]:
    """Every case with a local model, light ones first, each kind sorted by name."""
    found = []
    for test in sorted(load_model_tests(kind="real"), key=lambda t: t.name):
        path = DATA_DIR / "light" / f"light_{test.model_name}.onnx"
        if path.is_file():
            found.append(Case(f"light/{test.model_name}", "light", path, test.rtol, test.atol))
    for kind in KINDS[1:]:
        for test in sorted(load_model_tests(kind=kind), key=lambda t: t.name):
            assert test.model_dir is not None
            folder = Path(test.model_dir)
            data = tuple(sorted(folder.glob("test_data_set_*")))
            found.append(Case(f"{kind}/{test.name}", kind, folder / "model.onnx", test.rtol, test.atol, data))
    return found


# --- data ------------------------------------------------------------------------------


def _read_value(path: Path, type_proto: onnx.TypeProto) -> Any:
    """A stored input or output, read as the graph declares it (tensor, sequence, optional)."""
    content = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        sequence = onnx.SequenceProto()
        sequence.ParseFromString(content)
        return numpy_helper.to_list(sequence)
    if type_proto.HasField("optional_type"):
        optional = onnx.OptionalProto()
        optional.ParseFromString(content)
        return numpy_helper.to_optional(optional)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(content)
    return numpy_helper.to_array(tensor)


def _real_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (IR < 4 lists initializers as inputs too)."""
    initializers = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


def data_sets(case: Case, proto: onnx.ModelProto) -> list[tuple[dict[str, Any], list[Any]]]:
    """(feeds by input name, expected outputs in graph-output order) for every data set."""
    if case.light:
        feeds = {
            i.name: Runner.generate_dummy_data(i, seed=0, name=case.id, random=False)
            for i in _real_inputs(proto)
        }
        stem = case.model_path.with_suffix("")
        expected = [
            _read_value(Path(f"{stem}_output_{k}.pb"), out.type) for k, out in enumerate(proto.graph.output)
        ]
        return [(feeds, expected)]
    sets = []
    for folder in case.data_dirs:
        inputs = sorted(folder.glob("input_*.pb"), key=_index)
        outputs = sorted(folder.glob("output_*.pb"), key=_index)
        # onnx's runner pairs input_K with graph input K, output_K with graph output K.
        feeds = {proto.graph.input[k].name: _read_value(p, proto.graph.input[k].type) for k, p in enumerate(inputs)}
        expected = [_read_value(p, proto.graph.output[k].type) for k, p in enumerate(outputs)]
        sets.append((feeds, expected))
    return sets


def _index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


# --- comparison --------------------------------------------------------------------------


def mismatch(expected: Sequence[Any], got: Sequence[Any], rtol: float, atol: float) -> str | None:
    """Why `got` differs from `expected` under onnx's runner's rules, or None when it matches."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        problem = _value_mismatch(want, have, rtol, atol)
        if problem:
            return f"output {index}: {problem}"
    return None


def _value_mismatch(want: Any, have: Any, rtol: float, atol: float) -> str | None:
    if isinstance(want, list):
        if not isinstance(have, list):
            return f"{type(have).__name__}, expected a sequence"
        if len(have) != len(want):
            return f"sequence of {len(have)} items, expected {len(want)}"
        for k, (w, h) in enumerate(zip(want, have, strict=True)):
            problem = _value_mismatch(w, h, rtol, atol)
            if problem:
                return f"item {k}: {problem}"
        return None
    want, have = np.asarray(want), np.asarray(have)
    if want.shape != have.shape:
        return f"shape {list(have.shape)}, expected {list(want.shape)}"
    if want.dtype == object or want.dtype.kind in "SU":
        return None if np.array_equal(want, have) else "values differ (compared exactly)"
    if want.dtype != have.dtype:
        return f"dtype {have.dtype}, expected {want.dtype}"
    try:
        np.testing.assert_allclose(have, want, rtol=rtol, atol=atol)
    except AssertionError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return " ".join(lines[:4])
    return None


# --- running -----------------------------------------------------------------------------


def _run(proto: onnx.ModelProto, feeds_list: list[dict[str, Any]]) -> list[list[Any]]:
    """Outputs (in graph-output order) for every feed; UserError if ORT refuses."""
    runner = OrtRunner(make_session(proto, optimization_level="disable", intra_op_threads=1))
    results = []
    for feeds in feeds_list:
        outputs = runner.run(feeds)
        results.append([_unwrap(outputs[o.name]) for o in proto.graph.output])
    return results


def _unwrap(value: np.ndarray) -> Any:
    """OrtRunner wraps sequence outputs in a one-element object array; unwrap them."""
    if value.dtype == object and value.shape == (1,) and isinstance(value[0], list):
        return value[0]
    return value


def _checker_error(proto: onnx.ModelProto) -> str | None:
    """What onnx.checker says is wrong with `proto`, or None when it accepts it."""
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return _first_line(error)
    return None


def evaluate(case: Case) -> Outcome:
    """Run `case` through ORT, the default schedule and ORT again; see the module docstring."""
    start = time.perf_counter()
    outcome = _evaluate(case)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _evaluate(case: Case) -> Outcome:
    proto = load_proto(case.model_path)
    sets = data_sets(case, proto)
    feeds = [f for f, _ in sets]
    try:
        reference = _run(proto, feeds)
    except UserError as error:
        return Outcome("skipped", f"ONNX Runtime cannot run the original: {_first_line(error)}")
    for (_, expected), got in zip(sets, reference, strict=True):
        problem = mismatch(expected, got, case.rtol, case.atol)
        if problem:
            return Outcome("skipped", f"ONNX Runtime's outputs for the original differ from the expected: {problem}")

    model = Model.from_onnx(proto)
    before = len(model.graph.nodes)
    try:
        PassManager().run(model, load_schedule("default"), PassContext())
    except Exception as error:  # any failure of a pass is a failed case, with its message
        return Outcome("failed", f"the default schedule raised {type(error).__name__}: {_first_line(error)}")
    optimized = model.to_onnx()
    nodes = (before, len(model.graph.nodes))
    if [o.name for o in optimized.graph.output] != [o.name for o in proto.graph.output]:
        return Outcome("failed", "the graph outputs changed names or order", nodes=nodes)
    rejection = _checker_error(optimized)
    if rejection and _checker_error(proto) is None:
        return Outcome(
            "failed", f"onnx.checker accepts the original but not the optimized model: {rejection}", nodes=nodes
        )
    try:
        results = _run(optimized, feeds)
    except UserError as error:
        return Outcome("failed", f"ONNX Runtime cannot run the optimized model: {_first_line(error)}", nodes=nodes)
    for (_, expected), got in zip(sets, results, strict=True):
        problem = mismatch(expected, got, case.rtol, case.atol)
        if problem:
            return Outcome("failed", f"optimized outputs differ from the expected: {problem}", nodes=nodes)
    return Outcome("passed", nodes=nodes)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
