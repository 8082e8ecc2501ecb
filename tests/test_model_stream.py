"""The streaming model writer: files identical in content to graphsurgeon's export, checked first."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import pytest
from helpers_ort import run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx_graphsurgeon.ir.tensor import LazyValues

import iropt.io.save
from iropt.errors import IroptError, ModelLoadError, ModelSaveError
from iropt.io import stream as model_stream
from iropt.io.load import load_model
from iropt.io.save import save_model
from iropt.io.stream import STREAM_MIN_BYTES, ExternalPayload, StreamedModel, export_streamed, model_bytes
from iropt.ir.model import Model

_FLOATS = STREAM_MIN_BYTES // 4 * 2  # a float32 weight twice the streaming threshold


def _canonical(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString(deterministic=True)


def _written(model: Model) -> onnx.ModelProto:
    return onnx.load_from_string(model_bytes(model))


def _weighted_model(rng: np.random.Generator) -> Model:
    """x @ W + b, then a branch on a constant condition whose body has a constant of its own."""
    x = gs.Variable("x", np.float32, (2, 64))
    weight = gs.Constant("W", rng.standard_normal((64, _FLOATS // 64)).astype(np.float32))
    bias = gs.Constant("b", rng.standard_normal(_FLOATS // 64).astype(np.float32))
    mask = gs.Constant("mask", rng.integers(0, 2, STREAM_MIN_BYTES * 2).astype(bool))
    codes = gs.Constant("codes", rng.integers(-128, 127, STREAM_MIN_BYTES * 3, dtype=np.int8))
    half = gs.Constant("half", rng.standard_normal(STREAM_MIN_BYTES).astype(np.float16))
    product = gs.Variable("product", np.float32, (2, _FLOATS // 64))
    y = gs.Variable("y", np.float32, (2, _FLOATS // 64))
    nodes = [
        gs.Node("MatMul", "matmul", inputs=[x, weight], outputs=[product]),
        gs.Node("Add", "add", inputs=[product, bias], outputs=[y]),
    ]
    extras = [(mask, "mask_out", np.bool_), (codes, "codes_out", np.int8), (half, "half_out", np.float16)]
    outputs = [y]
    for constant, name, dtype in extras:
        out = gs.Variable(name, dtype, constant.shape)
        nodes.append(gs.Node("Identity", f"copy_{name}", inputs=[constant], outputs=[out]))
        outputs.append(out)
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=17, name="weighted")
    return Model(graph, metadata={"origin": "stream test"}, doc_string="streamed")


def test_written_file_has_the_same_content_as_the_export() -> None:
    model = _weighted_model(np.random.default_rng(0))

    written = _written(model)

    assert _canonical(written) == _canonical(model.to_onnx())
    onnx.checker.check_model(written, full_check=True)
    assert [t.name for t in written.graph.initializer] == ["W", "b", "mask", "codes", "half"]


def test_weights_read_from_a_file_are_written_without_decoding(tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(_weighted_model(np.random.default_rng(1)).to_onnx(), str(source))
    model = load_model(source)
    weight = model.graph.tensors()["W"]
    assert isinstance(weight._values, LazyValues)

    written = _written(model)

    assert isinstance(weight._values, LazyValues)  # still undecoded after the write
    assert _canonical(written) == _canonical(onnx.load(str(source)))


def test_the_model_keeps_its_arrays() -> None:
    model = _weighted_model(np.random.default_rng(2))
    arrays = {name: t.values for name, t in model.graph.tensors().items() if isinstance(t, gs.Constant)}

    streamed = export_streamed(model)

    after = {name: t.values for name, t in model.graph.tensors().items() if isinstance(t, gs.Constant)}
    assert all(after[name] is array for name, array in arrays.items())
    # The skeleton carries empty placeholders for the streamed tensors, and passes the checker.
    placeholders = {t.name: list(t.dims) for t in streamed.skeleton.graph.initializer}
    assert placeholders == {"W": [0], "b": [_FLOATS // 64], "mask": [0], "codes": [0], "half": [0]}
    onnx.checker.check_model(streamed.skeleton)
    assert streamed.skeleton.ByteSize() < STREAM_MIN_BYTES


@pytest.mark.parametrize("onnx_type", [onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN], ids=["bfloat16", "float8"])
def test_byte_sized_extension_types_are_streamed(onnx_type: int) -> None:
    values = np.random.default_rng(3).uniform(-7, 7, 2 * STREAM_MIN_BYTES).astype(np.float32)
    model = _identity_model([values.astype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))])

    assert export_streamed(model).skeleton.graph.initializer[0].dims == [0]  # a placeholder
    written = _written(model)
    assert written.graph.initializer[0].data_type == onnx_type
    assert _canonical(written) == _canonical(model.to_onnx())


def test_packed_and_string_types_are_not_raw_array_bytes() -> None:
    # ONNX packs 4-bit types two to a byte; ml_dtypes keeps one per byte.
    for onnx_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        assert not model_stream._raw_is_array_bytes(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type)))
    assert not model_stream._raw_is_array_bytes(np.dtype(object))
    assert model_stream._raw_is_array_bytes(np.dtype(np.float16))


def _large_model_from(graph: onnx.GraphProto, tmp_path: Path | None = None) -> Model:
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    if tmp_path is None:
        return Model.from_onnx(proto)
    onnx.save(proto, str(tmp_path / "in.onnx"))
    return load_model(tmp_path / "in.onnx")


def test_constants_exported_twice_are_not_streamed() -> None:
    # A constant that is a graph output (its value_info comes from its shape) or that a branch
    # reads (graphsurgeon copies it into the branch) would be written as its placeholder.
    shared = gs.Constant("shared", np.full(STREAM_MIN_BYTES, 3.0, np.float32))
    out_then = gs.Variable("then_out", np.float32, (STREAM_MIN_BYTES,))
    then_graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[shared], outputs=[out_then])], outputs=[out_then])
    x = gs.Variable("x", np.float32, (STREAM_MIN_BYTES,))
    out_else = gs.Variable("else_out", np.float32, (STREAM_MIN_BYTES,))
    else_graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[x], outputs=[out_else])], outputs=[out_else])
    flag = gs.Variable("flag", np.bool_, ())
    y, total = gs.Variable("y", np.float32, (STREAM_MIN_BYTES,)), gs.Variable("total", np.float32, (STREAM_MIN_BYTES,))
    returned = gs.Constant("returned", np.full(STREAM_MIN_BYTES, 5.0, np.float32))
    nodes = [
        gs.Node("Add", inputs=[x, shared], outputs=[total]),
        gs.Node("If", inputs=[flag], outputs=[y], attrs={"then_branch": then_graph, "else_branch": else_graph}),
    ]
    model = Model(gs.Graph(nodes=nodes, inputs=[x, flag], outputs=[total, y, returned], opset=17))

    written = _written(model)

    assert _canonical(written) == _canonical(model.to_onnx())
    onnx.checker.check_model(written, full_check=True)
    outputs = run_ort(written, {"x": np.zeros(STREAM_MIN_BYTES, np.float32), "flag": np.array(True)})
    assert outputs["y"].shape == (STREAM_MIN_BYTES,) and np.all(outputs["y"] == 3.0)
    assert np.all(outputs["returned"] == 5.0)


def test_sparse_initializers_are_left_to_graphsurgeon(tmp_path: Path) -> None:
    values = onnx.numpy_helper.from_array(np.ones(10, np.float32), "S")
    indices = onnx.numpy_helper.from_array(np.arange(0, 1000, 100, dtype=np.int64), "S_indices")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "S"], ["y"])],
        "sparse",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [STREAM_MIN_BYTES])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [STREAM_MIN_BYTES])],
        sparse_initializer=[onnx.helper.make_sparse_tensor(values, indices, [STREAM_MIN_BYTES])],
    )
    model = _large_model_from(graph, tmp_path)

    save_model(model, tmp_path / "out.onnx")

    written = onnx.load(str(tmp_path / "out.onnx"))
    assert [t.values.name for t in written.graph.sparse_initializer] == ["S"]
    assert _canonical(written) == _canonical(model.to_onnx())


def test_stored_tensor_keeps_its_fields_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    good = onnx.numpy_helper.from_array(np.ones(STREAM_MIN_BYTES, np.float32), "good")
    good.doc_string = "kept"
    entry = good.metadata_props.add()
    entry.key, entry.value = "origin", "test"
    broken = onnx.numpy_helper.from_array(np.ones(STREAM_MIN_BYTES, np.float32), "broken")
    broken.raw_data = broken.raw_data[:-4]  # one element short of its dims
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["good", "broken"], ["y"])],
        "stored",
        [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [STREAM_MIN_BYTES])],
        [good, broken],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(proto, str(tmp_path / "in.onnx"))
    with pytest.raises(ModelLoadError, match="'broken' holds 262140 bytes"):
        load_model(tmp_path / "in.onnx")  # refused on load; the writer checks it again
    model = Model.from_onnx(proto, tmp_path / "in.onnx")

    streamed = export_streamed(model)

    stored = {t.name: list(t.dims) for t in streamed.skeleton.graph.initializer}
    assert stored == {"good": [0], "broken": [0]}
    # The raw data's length is checked as it is written (measuring it before would copy it).
    with pytest.raises(ModelSaveError, match="'broken' holds 262140 bytes of raw data where its type and dims call for 262144"):
        save_model(model, tmp_path / "out.onnx", check=onnx.checker.check_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    del model.graph.nodes[0].inputs[1]
    model.graph.nodes[0].inputs.append(model.graph.tensors()["good"])
    model.graph.cleanup()
    written = onnx.load_from_string(export_streamed(model).to_bytes())
    assert _canonical(written) == _canonical(model.to_onnx())
    assert written.graph.initializer[0].doc_string == "kept"


def test_a_stored_tensor_header_has_every_field_but_the_data() -> None:
    tensor = onnx.numpy_helper.from_array(np.arange(6, dtype=np.int32).reshape(2, 3), "t")
    tensor.doc_string = "d"
    entry = tensor.metadata_props.add()
    entry.key, entry.value = "k", "v"
    header = model_stream._header_of(tensor)
    assert not header.HasField("raw_data")
    header.raw_data = tensor.raw_data
    assert header == tensor


def test_export_without_data_keeps_types_and_dims_for_shape_inference() -> None:
    model = _weighted_model(np.random.default_rng(2))
    proto = model_stream.export_without_data(model)
    full = model.to_onnx()
    assert [(t.name, t.data_type, list(t.dims)) for t in proto.graph.initializer] == [
        (t.name, t.data_type, list(t.dims)) for t in full.graph.initializer
    ]
    kept = {t.name for t in proto.graph.initializer if t.raw_data}
    assert kept == {"b"}  # the one tensor under STREAM_MIN_BYTES
    def inferred(m: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
        return list(onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True).graph.value_info)
    assert inferred(proto) == inferred(full)
    # The model itself is untouched.
    assert _canonical(model.to_onnx()) == _canonical(full)


def test_a_model_past_the_protobuf_limit_goes_to_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limit is lowered instead of building a 2 GiB model: the size checks are the same.
    monkeypatch.setattr(iropt.io.save, "PROTOBUF_LIMIT", 100_000)
    model = _weighted_model(np.random.default_rng(9))

    save_model(model, tmp_path / "auto.onnx")
    with pytest.raises(ModelSaveError, match="past protobuf's 2 GiB limit"):
        save_model(model, tmp_path / "inline.onnx", external_data=False)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx", "auto.onnx.data"]
    loaded = _without_default_locations(onnx.load(str(tmp_path / "auto.onnx")))
    assert _canonical(loaded) == _canonical(model.to_onnx())
    # What the streaming writer keeps inline (here: a graph output) still counts against the
    # limit; past it, onnx's own converter writes the model and moves every tensor out.
    model.graph.outputs.append(model.graph.tensors()["W"])
    save_model(model, tmp_path / "pinned.onnx")
    on_disk = onnx.load(str(tmp_path / "pinned.onnx"), load_external_data=False)
    assert on_disk.ByteSize() < 100_000
    pinned = _without_default_locations(onnx.load(str(tmp_path / "pinned.onnx")))
    assert _canonical(pinned) == _canonical(model.to_onnx())


def test_subgraph_constants_stay_in_their_subgraph(tmp_path: Path) -> None:
    inner = gs.Constant("inner", np.full(STREAM_MIN_BYTES, 2.0, np.float32))
    out_then = gs.Variable("then_out", np.float32, (STREAM_MIN_BYTES,))
    then_graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[inner], outputs=[out_then])], outputs=[out_then])
    out_else = gs.Variable("else_out", np.float32, (STREAM_MIN_BYTES,))
    zeros = gs.Constant("zeros", np.zeros(STREAM_MIN_BYTES, np.float32))
    else_graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[zeros], outputs=[out_else])], outputs=[out_else])
    flag = gs.Variable("flag", np.bool_, ())
    y = gs.Variable("y", np.float32, (STREAM_MIN_BYTES,))
    node = gs.Node("If", inputs=[flag], outputs=[y], attrs={"then_branch": then_graph, "else_branch": else_graph})
    model = Model(gs.Graph(nodes=[node], inputs=[flag], outputs=[y], opset=17))
    path = tmp_path / "if.onnx"

    save_model(model, path)

    loaded = onnx.load(str(path))
    assert _canonical(loaded) == _canonical(model.to_onnx())
    result = run_ort(loaded, {"flag": np.array(True)})["y"]
    np.testing.assert_array_equal(result, inner.values)


def test_a_failed_check_writes_nothing_and_restores_the_model(tmp_path: Path) -> None:
    model = _weighted_model(np.random.default_rng(4))
    weight = model.graph.tensors()["W"].values
    out = tmp_path / "model.onnx"
    seen: list[object] = []

    def refuse(target: onnx.ModelProto | Path) -> None:
        seen.append(target)
        raise IroptError("refused")

    with pytest.raises(IroptError, match="refused"):
        save_model(model, out, check=refuse)

    assert isinstance(seen[0], onnx.ModelProto)  # the in-memory skeleton, before any writing
    assert list(tmp_path.iterdir()) == []
    assert model.graph.tensors()["W"].values is weight


def test_saved_model_runs_in_onnx_runtime(tmp_path: Path) -> None:
    model = _weighted_model(np.random.default_rng(5))
    path = tmp_path / "model.onnx"
    x = np.random.default_rng(6).standard_normal((2, 64)).astype(np.float32)

    save_model(model, path, check=lambda target: onnx.checker.check_model(target))

    outputs = run_ort(onnx.load(str(path)), {"x": x})
    tensors = model.graph.tensors()
    expected = x @ tensors["W"].values + tensors["b"].values
    np.testing.assert_allclose(outputs["y"], expected, rtol=1e-5, atol=1e-5)
    for name in ("mask", "codes", "half"):
        np.testing.assert_array_equal(outputs[f"{name}_out"], tensors[name].values)


_STREAMED_DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.uint8, np.int32, np.int64, np.bool_])


def _identity_model(arrays: list[np.ndarray]) -> Model:
    """One Identity per array, each reading the array as an initializer."""
    constants = [gs.Constant(f"c{i}", array) for i, array in enumerate(arrays)]
    outputs = [gs.Variable(f"o{i}", a.dtype, a.shape) for i, a in enumerate(arrays)]
    nodes = [gs.Node("Identity", inputs=[c], outputs=[o]) for c, o in zip(constants, outputs, strict=True)]
    return Model(gs.Graph(nodes=nodes, outputs=outputs, opset=17))


def _written_external(streamed: StreamedModel, folder: Path) -> onnx.ModelProto:
    """Write with external data into `folder`, then load it back with the data."""
    with_data, payloads = streamed.with_external_data("model.onnx.data")
    with open(folder / "model.onnx", "wb") as out:
        with_data.write(out)
    with open(folder / "model.onnx.data", "wb") as out:
        ExternalPayload.write_all(payloads, out)
    on_disk = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in on_disk.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            assert not tensor.HasField("raw_data")
    return _without_default_locations(onnx.load(str(folder / "model.onnx")))


def _without_default_locations(proto: onnx.ModelProto) -> onnx.ModelProto:
    # onnx's loader leaves data_location=DEFAULT set on every tensor it read from a data file.
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return proto


@settings(max_examples=40, deadline=None)
@given(
    arrays=st.lists(
        _STREAMED_DTYPES.flatmap(
            lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_array_streams_to_the_same_tensor(arrays: list[np.ndarray]) -> None:
    # Every constant is streamed here, whatever its size: varint lengths of 1 to 3 bytes, empty
    # and scalar tensors, every element type; inline and as external data.
    model = _identity_model(arrays)
    streamed = export_streamed(model, min_bytes=0)
    buffer = io.BytesIO()
    streamed.write(buffer)
    assert streamed.byte_size() == len(buffer.getvalue())
    with tempfile.TemporaryDirectory() as folder:
        external = _written_external(streamed, Path(folder))

    expected = _canonical(model.to_onnx())
    for written in (onnx.load_from_string(buffer.getvalue()), external):
        assert _canonical(written) == expected
        for tensor, array in zip(written.graph.initializer, arrays, strict=True):
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), array)


def test_external_data_is_streamed_to_an_aligned_data_file(tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(_weighted_model(np.random.default_rng(7)).to_onnx(), str(source))
    model = load_model(source)  # W stays the file's TensorProto; b is small
    model.graph.tensors()["codes"].values = np.arange(3000, dtype=np.int8)  # a decoded array too
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()

    save_model(model, out, external_data=True)

    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    on_disk = onnx.load(str(out), load_external_data=False)
    locations = {
        t.name: {e.key: e.value for e in t.external_data}
        for t in on_disk.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert set(locations) == {"W", "b", "mask", "codes", "half"}  # all of 1 KiB and more
    assert all(entry["location"] == "model.onnx.data" for entry in locations.values())
    large = [entry for entry in locations.values() if int(entry["length"]) >= STREAM_MIN_BYTES]
    assert large and all(int(entry["offset"]) % 4096 == 0 for entry in large)
    loaded = _without_default_locations(onnx.load(str(out)))
    assert _canonical(loaded) == _canonical(model.to_onnx())
    x = np.random.default_rng(8).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run_ort(loaded, {"x": x})["y"], run_ort(model.to_onnx(), {"x": x})["y"])


