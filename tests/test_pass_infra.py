"""The pass infrastructure: registry, typed options, the PassManager and its instruments, model I/O."""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import pytest

from iropt.errors import (
    IroptError,
    ModelLoadError,
    ModelSaveError,
    OptionError,
    PassError,
    UnknownPassError,
    UserError,
)
from iropt.infra.instruments import CheckerInstrument, IRDumpInstrument, SizeInstrument, TimingInstrument
from iropt.infra.options import REQUIRED, bind_options, option_specs, type_label
from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult
from iropt.infra.pass_manager import Instrument, PassManager, PassRecord, RunReport
from iropt.infra.pipeline import FixpointBlock, PassStep, Pipeline, RepeatBlock, VerifyStep
from iropt.infra.registry import PASSES, Registry, create_pass, get_pass, register_pass
from iropt.io.load import load_model
from iropt.io.save import save_model, save_proto
from iropt.ir.model import Model, graph_stats
from iropt.verify.criteria import Criterion

# ----------------------------------------------------------------------------------------------
# Small models and passes used throughout


def small_proto(weight_elements: int = 6) -> onnx.ModelProto:
    """y = Relu(x + w) with a dead Neg branch: a model with something for passes to do."""
    weight = np.arange(weight_elements, dtype=np.float32).reshape(-1, weight_elements // 2)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Add", ["x", "w"], ["a"], name="add"),
            onnx.helper.make_node("Relu", ["a"], ["y"], name="relu"),
            onnx.helper.make_node("Neg", ["x"], ["unused"], name="neg"),
        ],
        "small",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(weight.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(weight.shape))],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.helper.set_model_props(proto, {"origin": "test"})
    onnx.checker.check_model(proto)
    return proto


def small_model() -> Model:
    return Model.from_onnx(small_proto())


class CountDown(Pass):
    """Reports a change `times` times, then none: a stand-in for a pass that converges."""

    name = "count_down"

    def __init__(self, *, times: int) -> None:
        self.times = times
        self.calls = 0

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        self.calls += 1
        if self.times > 0:
            self.times -= 1
            return PassResult(changed=True, stats={"left": self.times})
        return PassResult(changed=False)


class Named(Pass):
    """A pass that does nothing, under a chosen name."""

    def __init__(self, *, label: str) -> None:
        self.label = label
        # The registry normally sets the class's name; these instances are not registered.
        self.name = label  # type: ignore[misc]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(changed=False)


class Failing(Pass):
    """Raises the exception it was given."""

    name = "failing"

    def __init__(self, *, error: BaseException) -> None:
        self.error = error

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise self.error


class DropNeg(Pass):
    """Removes the dead Neg node of `small_model` (a real, valid change)."""

    name = "drop_neg"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        negs = [n for n in model.graph.nodes if n.op == "Neg"]
        for node in negs:
            node.inputs.clear()
            node.outputs.clear()
            model.graph.nodes.remove(node)
        return PassResult.from_stats(removed=len(negs))


class DropWeight(Pass):
    """Replaces `x + w` by `x`: removes a node and the only initializer."""

    name = "drop_weight"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        add = next(n for n in model.graph.nodes if n.op == "Add")
        relu = next(n for n in model.graph.nodes if n.op == "Relu")
        relu.inputs[0] = add.inputs[0]
        add.inputs.clear()
        add.outputs.clear()
        model.graph.nodes.remove(add)
        return PassResult.from_stats(removed=1)


class BreakGraph(Pass):
    """Deletes the producer of the graph output: the checker must object."""

    name = "break_graph"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        relu = next(n for n in model.graph.nodes if n.op == "Relu")
        relu.inputs.clear()
        relu.outputs.clear()
        model.graph.nodes.remove(relu)
        return PassResult.from_stats(broken=1)


# ----------------------------------------------------------------------------------------------
# Registry


def test_builtin_passes_are_registered_with_their_kind() -> None:
    entry = get_pass("eliminate_dead_code")
    assert entry.name == "eliminate_dead_code"
    assert entry.kind is PassKind.EXACT
    assert entry.summary
    assert entry.cls.name == "eliminate_dead_code"
    assert {"eliminate_identity", "eliminate_dead_code", "toposort", "infer_shapes"} <= set(PASSES.names())


def test_duplicate_name_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    get_pass("toposort")  # the built-ins are loaded
    # Should the check ever fail to fire, the impostor must not outlive this test.
    monkeypatch.setattr(PASSES, "_entries", dict(PASSES._entries))

    @dataclass(kw_only=True)
    class Impostor(Pass):
        def run(self, model: Model, ctx: PassContext) -> PassResult:
            return PassResult(changed=False)

    with pytest.raises(
        ValueError, match=r"'toposort' is already registered by iropt\.passes\.toposort\.Toposort"
    ):
        register_pass("toposort")(Impostor)
    assert get_pass("toposort").cls is not Impostor


@pytest.mark.parametrize("bad", ["FuseBn", "fuse-bn", "1st_pass", "", "fuse bn"])
def test_names_must_be_snake_case(bad: str) -> None:
    registry = Registry("pass", "iropt.tests.none", (), "iropt passes")

    with pytest.raises(ValueError, match="must be snake_case"):
        registry.add(bad, CountDown)
    assert registry._entries == {}


def test_unknown_name_suggests_the_nearest() -> None:
    with pytest.raises(UnknownPassError) as caught:
        create_pass("eliminate_identiy")
    message = str(caught.value)
    assert "unknown pass 'eliminate_identiy'" in message
    assert "did you mean 'eliminate_identity'" in message
    assert "iropt passes" in message
    assert isinstance(caught.value, UserError)


def test_unknown_name_without_near_match_lists_no_guess() -> None:
    with pytest.raises(UnknownPassError) as caught:
        get_pass("zzzzzzzz")
    assert "did you mean" not in str(caught.value)


PLUGIN_SOURCE = '''
from dataclasses import dataclass

from iropt.infra.pass_base import Pass, PassResult


@dataclass(kw_only=True)
class MyPass(Pass):
    """A pass that arrives through an entry point."""

    strength: int = 2

    def run(self, model, ctx):
        return PassResult.from_stats(strength=self.strength)
'''


def test_entry_point_plugin_is_loaded_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = "iropt_testplugin_pkg"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(PLUGIN_SOURCE)
    dist = tmp_path / "iropt_testplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: iropt-testplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[iropt.passes]\nmy_plugin_pass = {package}:MyPass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Work on a copy of the registry's state so the plugin does not outlive this test.
    monkeypatch.setattr(PASSES, "_entries", dict(PASSES._entries))
    monkeypatch.setattr(PASSES, "_plugins_loaded", False)
    monkeypatch.delitem(sys.modules, package, raising=False)

    found = [
        ep for ep in importlib.metadata.entry_points(group="iropt.passes") if ep.name == "my_plugin_pass"
    ]
    assert [ep.value for ep in found] == [f"{package}:MyPass"]
    PASSES.get("toposort")
    assert package not in sys.modules, "plugins must not be imported before they are needed"

    created = create_pass("my_plugin_pass", {"strength": 5})

    assert package in sys.modules
    assert type(created).__name__ == "MyPass"
    assert created.name == "my_plugin_pass"
    assert created.run(small_model(), PassContext()).stats == {"strength": 5}
    entry = get_pass("my_plugin_pass")
    assert entry.origin == f"entry point {package}:MyPass"
    assert [s.name for s in entry.options] == ["strength"]
    assert "my_plugin_pass" in PASSES.names()
    with pytest.raises(OptionError, match="expects int"):
        create_pass("my_plugin_pass", {"strength": "high"})
    monkeypatch.delitem(sys.modules, package)


# ----------------------------------------------------------------------------------------------
# Options


@dataclass(kw_only=True)
class Configurable(Pass):
    """Every kind of option the DSL can pass."""

    ratio: float
    count: int = 3
    enabled: bool = True
    label: str = "x"
    importance: Literal["l1", "l2"] = "l1"
    axes: list[int] | None = None
    limit: float | None = None
    table: dict[str, int] | None = None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(changed=False)


SPECS = option_specs(Configurable)


def bind(**given: Any) -> dict[str, Any]:
    return bind_options("pass 'configurable'", SPECS, given)


def test_option_specs_follow_the_constructor() -> None:
    assert [s.name for s in SPECS] == [
        "ratio", "count", "enabled", "label", "importance", "axes", "limit", "table"
    ]  # fmt: skip
    by_name = {s.name: s for s in SPECS}
    assert by_name["ratio"].default is REQUIRED and by_name["ratio"].required
    assert by_name["count"].default == 3 and not by_name["count"].required
    assert by_name["importance"].type_name == "'l1' | 'l2'"
    assert by_name["axes"].type_name == "list[int] | None"
    assert type_label(dict[str, int]) == "dict[str, int]"


def test_values_are_checked_and_coerced() -> None:
    values = bind(ratio=1, count=4, enabled=False, label="y", importance="l2", axes=(0, 1), limit=None)
    assert values == {
        "ratio": 1.0, "count": 4, "enabled": False, "label": "y", "importance": "l2",
        "axes": [0, 1], "limit": None,
    }  # fmt: skip
    assert isinstance(values["ratio"], float)
    assert bind(ratio=0.5, limit=2)["limit"] == 2.0
    assert bind(ratio=0.5, table={"a": 1})["table"] == {"a": 1}
    # Defaults are not filled in: the constructor does that.
    assert Configurable(**bind(ratio=0.5)).count == 3


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"count": 2.5}, "option 'count' expects int, got 2.5 (float)"),
        ({"count": True}, "option 'count' expects int, got True (bool)"),
        ({"enabled": 1}, "option 'enabled' expects bool, got 1 (int)"),
        ({"label": 3}, "option 'label' expects str"),
        ({"importance": "l3"}, "option 'importance' expects 'l1' | 'l2', got 'l3'"),
        ({"axes": [1, "a"]}, "option 'axes' expects list[int] | None"),
        ({"axes": 1}, "option 'axes' expects list[int] | None"),
        ({"limit": "high"}, "option 'limit' expects float | None"),
        ({"table": {"a": "b"}}, "option 'table' expects dict[str, int] | None"),
    ],
)
def test_wrong_types_are_refused_with_the_expected_type(given: dict[str, Any], expected: str) -> None:
    with pytest.raises(OptionError) as caught:
        bind(ratio=0.5, **given)
    assert expected in str(caught.value)
    assert "pass 'configurable'" in str(caught.value)


def test_missing_required_and_unknown_options() -> None:
    with pytest.raises(OptionError, match=r"pass 'configurable' needs option\(s\) ratio"):
        bind(count=1)
    with pytest.raises(OptionError) as caught:
        bind(ratio=0.5, cuont=2)
    message = str(caught.value)
    assert "has no option 'cuont'" in message and "did you mean 'count'" in message
    assert "its options are: ratio, count" in message


def test_options_must_be_keyword_only_and_annotated() -> None:
    class Positional(Pass):
        def __init__(self, ratio: float) -> None:
            self.ratio = ratio

        def run(self, model: Model, ctx: PassContext) -> PassResult:
            return PassResult(changed=False)

    class Unannotated(Pass):
        def __init__(self, *, ratio) -> None:  # type: ignore[no-untyped-def]
            self.ratio = ratio

        def run(self, model: Model, ctx: PassContext) -> PassResult:
            return PassResult(changed=False)

    with pytest.raises(TypeError, match="option 'ratio' must be keyword-only"):
        option_specs(Positional)
    with pytest.raises(TypeError, match="option 'ratio' needs a type annotation"):
        option_specs(Unannotated)
    registry = Registry("pass", "iropt.tests.none", (), "iropt passes")
    with pytest.raises(TypeError, match="keyword-only"):
        registry.add("positional", Positional)


def test_pass_reports_its_options() -> None:
    created = create_pass("eliminate_identity", {"dropout": False})
    assert created.options() == {"dropout": False}
    # @dataclass writes its own __repr__ (ClassName(...)) over Pass.__repr__ (name(...)).
    assert "(dropout=False)" in repr(created)


# ----------------------------------------------------------------------------------------------
# PassManager


def test_fixpoint_stops_when_nothing_changes() -> None:
    body = CountDown(times=3)
    pipeline = Pipeline([FixpointBlock([PassStep(body)], max_iterations=8)])

    report = PassManager().run(small_model(), pipeline)

    # Three changing rounds, then one that proves nothing is left.
    assert body.calls == 4
    assert [r.changed for r in report.records] == [True, True, True, False]
    assert [r.block for r in report.records] == [f"fixpoint[{i}]" for i in range(1, 5)]
    assert [r.index for r in report.records] == [1, 2, 3, 4]


def test_fixpoint_stops_at_its_maximum() -> None:
    body = CountDown(times=100)
    report = PassManager().run(small_model(), Pipeline([FixpointBlock([PassStep(body)], max_iterations=5)]))

    assert body.calls == 5
    assert all(r.changed for r in report.records)


def test_fixpoint_reruns_the_whole_body_while_any_pass_changes() -> None:
    first, second = CountDown(times=0), CountDown(times=2)
    pipeline = Pipeline([FixpointBlock([PassStep(first), PassStep(second)], max_iterations=8)])

    PassManager().run(small_model(), pipeline)

    assert (first.calls, second.calls) == (3, 3)


def test_repeat_runs_its_body_n_times_even_without_changes() -> None:
    body = CountDown(times=0)
    nested = CountDown(times=0)
    pipeline = Pipeline([RepeatBlock([PassStep(body), RepeatBlock([PassStep(nested)], count=2)], count=3)])

    report = PassManager().run(small_model(), pipeline)

    assert body.calls == 3
    assert nested.calls == 6
    assert report.records[0].block == "repeat[1/3]"
    assert report.records[1].block == "repeat[1/3] repeat[1/2]"
    assert report.records[-1].block == "repeat[3/3] repeat[2/2]"


def test_pass_error_names_the_pass_and_its_predecessors() -> None:
    cause = ValueError("bad weights")
    passes = [Named(label=f"step_{i}") for i in range(7)]
    pipeline = Pipeline.of(*passes, Failing(error=cause))

    with pytest.raises(PassError) as caught:
        PassManager().run(small_model(), pipeline)

    error = caught.value
    assert error.__cause__ is cause
    assert error.pass_name == "failing"
    assert error.previous == [f"step_{i}" for i in range(7)]
    message = str(error)
    assert message.startswith("pass 'failing' failed: ValueError: bad weights")
    # The last five predecessors, with an ellipsis for the rest.
    assert "passes before it: ..., step_2, step_3, step_4, step_5, step_6" in message


def test_iropt_errors_from_a_pass_pass_through_unchanged() -> None:
    cause = OptionError("ratio must be below 1")
    with pytest.raises(OptionError) as caught:
        PassManager().run(small_model(), Pipeline.of(Failing(error=cause)))
    assert caught.value is cause


def test_a_pass_must_return_a_pass_result() -> None:
    class Sloppy(Pass):
        name = "sloppy"

        def run(self, model: Model, ctx: PassContext) -> PassResult:
            return True  # type: ignore[return-value]

    with pytest.raises(PassError, match="pass 'sloppy' failed: TypeError: run\\(\\) returned bool"):
        PassManager().run(small_model(), Pipeline.of(Sloppy()))


def test_verify_steps_reach_the_checkpoint_in_order() -> None:
    seen: list[tuple[float, list[str]]] = []

    def checkpoint(step: VerifyStep, model: Model, report: RunReport) -> str:
        seen.append((step.criterion.rtol, report.pass_names()))
        return f"checked after {len(report.records)}"

    pipeline = Pipeline(
        [
            PassStep(DropNeg()),
            VerifyStep(Criterion(rtol=1e-3)),
            PassStep(CountDown(times=0)),
            VerifyStep(Criterion(rtol=1e-2)),
        ]
    )

    report = PassManager(checkpoint=checkpoint).run(small_model(), pipeline)

    assert seen == [(1e-3, ["drop_neg"]), (1e-2, ["drop_neg", "count_down"])]
    assert report.checkpoints == ["checked after 1", "checked after 2"]
    # Without a checkpoint handler verify statements are skipped, not errors.
    assert PassManager().run(small_model(), pipeline).checkpoints == []


class Recorder(Instrument):
    """Appends (tag, hook, pass name) for every hook call to a shared log."""

    def __init__(self, tag: str, log: list[tuple[str, ...]]) -> None:
        self.tag = tag
        self.log = log

    def before_run(self, model: Model) -> None:
        self.log.append((self.tag, "before_run"))

    def before_pass(self, record: PassRecord, model: Model) -> None:
        self.log.append((self.tag, "before_pass", record.name))

    def after_pass(self, record: PassRecord, model: Model, result: PassResult) -> None:
        self.log.append((self.tag, "after_pass", record.name, str(result.changed)))

    def after_pass_failed(self, record: PassRecord, model: Model, error: BaseException) -> None:
        self.log.append((self.tag, "after_pass_failed", record.name, type(error).__name__))

    def after_run(self, model: Model, report: RunReport) -> None:
        self.log.append((self.tag, "after_run", str(len(report.records))))


def test_instruments_are_called_in_order() -> None:
    log: list[tuple[str, ...]] = []
    manager = PassManager([Recorder("A", log), Recorder("B", log)])

    manager.run(small_model(), Pipeline.of(DropNeg(), CountDown(times=0)))

    assert log == [
        ("A", "before_run"),
        ("B", "before_run"),
        ("A", "before_pass", "drop_neg"),
        ("B", "before_pass", "drop_neg"),
        ("A", "after_pass", "drop_neg", "True"),
        ("B", "after_pass", "drop_neg", "True"),
        ("A", "before_pass", "count_down"),
        ("B", "before_pass", "count_down"),
        ("A", "after_pass", "count_down", "False"),
        ("B", "after_pass", "count_down", "False"),
        ("A", "after_run", "2"),
        ("B", "after_run", "2"),
    ]


def test_failed_pass_notifies_instruments_and_skips_after_run() -> None:
    log: list[tuple[str, ...]] = []
    manager = PassManager([Recorder("A", log)])

    with pytest.raises(PassError):
        manager.run(small_model(), Pipeline.of(DropNeg(), Failing(error=RuntimeError("boom"))))

    assert log[-1] == ("A", "after_pass_failed", "failing", "RuntimeError")
    assert not any(entry[1] == "after_run" for entry in log)


def test_ir_dump_writes_numbered_models(tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    model = small_model()

    PassManager([IRDumpInstrument(folder)]).run(model, Pipeline.of(DropNeg(), CountDown(times=0)))

    assert sorted(p.name for p in folder.iterdir()) == [
        "000_input.onnx",
        "001_drop_neg.onnx",
        "002_count_down.onnx",
    ]
    dumped = [onnx.load(str(folder / name)) for name in ("000_input.onnx", "001_drop_neg.onnx")]
    assert [n.op_type for n in dumped[0].graph.node] == ["Add", "Relu", "Neg"]
    assert [n.op_type for n in dumped[1].graph.node] == ["Add", "Relu"]
    for proto in dumped:
        onnx.checker.check_model(proto)


def test_ir_dump_of_a_loaded_model_does_not_trip_the_overwrite_guard(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(small_proto(), str(source))
    model = load_model(source)

    PassManager([IRDumpInstrument(tmp_path / "dumps")]).run(model, Pipeline.of(DropNeg()))

    assert (tmp_path / "dumps" / "001_drop_neg.onnx").is_file()


def test_size_instrument_records_deltas() -> None:
    model = small_model()
    start = graph_stats(model)
    sizes = SizeInstrument()

    report = PassManager([sizes]).run(model, Pipeline.of(DropNeg(), CountDown(times=0), DropWeight()))

    neg, idle, weight = report.records
    assert start.nodes == 3 and start.parameters == 6 and start.parameter_bytes == 24
    assert neg.nodes == (3, 2)
    assert neg.parameters == (6, 6)
    assert idle.nodes == (2, 2)
    assert weight.nodes == (2, 1)
    assert weight.parameters == (6, 0)
    assert weight.parameter_bytes == (24, 0)
    assert sizes.initial == start
    assert sizes.final == graph_stats(model)


def test_timing_instrument_fills_in_seconds() -> None:
    report = PassManager([TimingInstrument()]).run(small_model(), Pipeline.of(DropNeg()))
    seconds = report.records[0].seconds
    assert seconds is not None and seconds >= 0.0


def test_checker_instrument_catches_an_invalid_graph() -> None:
    pipeline = Pipeline.of(DropNeg(), BreakGraph())

    with pytest.raises(PassError) as caught:
        PassManager([CheckerInstrument()]).run(small_model(), pipeline)

    message = str(caught.value)
    assert message.startswith("pass 'break_graph' failed: ValidationError")
    assert "passes before it: drop_neg" in message
    assert isinstance(caught.value.__cause__, onnx.checker.ValidationError)


def test_checker_instrument_accepts_valid_passes() -> None:
    report = PassManager([CheckerInstrument(full_check=True)]).run(small_model(), Pipeline.of(DropNeg()))
    assert report.records[0].changed


# ----------------------------------------------------------------------------------------------
# Model I/O


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = small_model()
    model.doc_string = "a test model"
    model.model_version = 7
    path = tmp_path / "model.onnx"

    written = save_model(model, path)

    assert written == path
    loaded = load_model(path)
    assert loaded.source_path == path.resolve()
    assert loaded.metadata == {"origin": "test"}
    assert (loaded.doc_string, loaded.model_version, loaded.opset) == ("a test model", 7, 17)
    assert [n.op for n in loaded.graph.nodes] == ["Add", "Relu", "Neg"]
    np.testing.assert_array_equal(loaded.graph.tensors()["w"].values, model.graph.tensors()["w"].values)
    assert loaded.to_onnx().graph == model.to_onnx().graph
    # Nothing but the model itself is left in the folder (no temporary files).
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "absent.onnx")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="the file is empty"):
        load_model(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    data = small_proto(weight_elements=64).SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message
    assert "not a readable ONNX model" in message or "not an ONNX model" in message


def test_text_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is a shopping list, not a neural network\n" * 3)

    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, UserError)


def test_save_refuses_to_overwrite_the_input(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(small_proto(), str(path))
    original = path.read_bytes()
    model = load_model(path)
    model.graph.nodes.pop()

    with pytest.raises(ModelSaveError, match="refusing to write over the input model"):
        save_model(model, tmp_path / "." / "model.onnx")
    assert path.read_bytes() == original


def _model_with_data_file(tmp_path: Path, data_name: str) -> tuple[Path, Path]:
    """in.onnx whose weight lives in external data file `data_name`."""
    path = tmp_path / "in.onnx"
    onnx.save_model(
        small_proto(weight_elements=1024), str(path), save_as_external_data=True,
        location=data_name, size_threshold=0,
    )
    return path, tmp_path / data_name


@pytest.mark.parametrize(
    ("data_name", "output", "message"),
    [
        # The output's own data file would be the input's.
        ("out.onnx.data", "out.onnx", "the input model's own external data"),
        # The output is the input's data file.
        ("weights.bin", "weights.bin", "refusing to write over the input model's external data"),
    ],
)
def test_save_refuses_to_overwrite_the_input_data(
    tmp_path: Path, data_name: str, output: str, message: str
) -> None:
    path, data = _model_with_data_file(tmp_path, data_name)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = load_model(path)
    assert model.input_files() == (path.resolve(), data.resolve())

    for external_data in (True, False, None):
        with pytest.raises(ModelSaveError, match=message):
            save_model(model, tmp_path / output, external_data=external_data)
    with pytest.raises(ModelSaveError, match=message):
        save_proto(model.to_onnx(), tmp_path / output, protected=model.input_files())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_copy_keeps_the_input_files(tmp_path: Path) -> None:
    path, data = _model_with_data_file(tmp_path, "w.bin")
    assert load_model(path).copy().input_files() == (path.resolve(), data.resolve())


def test_save_makes_missing_directories(tmp_path: Path) -> None:
    out = save_model(small_model(), tmp_path / "no" / "such" / "model.onnx")
    assert onnx.load(str(out)).graph.node
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no staging litter


def test_save_refuses_a_file_where_a_directory_must_go(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelSaveError, match="not a directory"):
        save_model(small_model(), tmp_path / "file" / "sub" / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_failed_save_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous contents")
    # The external-data file cannot be moved into place over a directory: the save fails after
    # the model was already written to its staging folder.
    (tmp_path / "model.onnx.data").mkdir()

    with pytest.raises((OSError, IroptError)):
        save_model(Model.from_onnx(small_proto(weight_elements=1024)), out, external_data=True)

    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert list((tmp_path / "model.onnx.data").iterdir()) == []


def test_external_data_round_trip(tmp_path: Path) -> None:
    model = Model.from_onnx(small_proto(weight_elements=1024))
    path = tmp_path / "big.onnx"

    save_model(model, path, external_data=True)

    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size == 1024 * 4
    on_disk = onnx.load(str(path), load_external_data=False)
    assert on_disk.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.graph.tensors()["w"].values, model.graph.tensors()["w"].values)


def test_external_data_may_not_escape_the_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    weight = np.ones((2, 3), dtype=np.float32)
    # The file exists: only its location is wrong.
    (tmp_path / "outside.bin").write_bytes(weight.tobytes())
    proto = small_proto()
    tensor = proto.graph.initializer[0]
    onnx.external_data_helper.set_external_data(tensor, "../outside.bin", offset=0, length=weight.nbytes)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    path = folder / "escape.onnx"
    path.write_bytes(proto.SerializeToString())

    with pytest.raises(ModelLoadError, match=r"outside the model's folder \(\.\./outside\.bin\); refusing"):
        load_model(path)


def test_missing_external_data_file(tmp_path: Path) -> None:
    model = Model.from_onnx(small_proto(weight_elements=1024))
    path = tmp_path / "big.onnx"
    save_model(model, path, external_data=True)
    (tmp_path / "big.onnx.data").unlink()

    with pytest.raises(
        ModelLoadError, match=r"external data file 'big\.onnx\.data' of tensor 'w' is missing"
    ):
        load_model(path)


def test_graphsurgeon_constant_survives_copy() -> None:
    model = small_model()
    copy = model.copy()
    copy.graph.tensors()["w"].values[...] = 0
    original = model.graph.tensors()["w"]
    assert isinstance(original, gs.Constant)
    assert np.asarray(original.values).any()
