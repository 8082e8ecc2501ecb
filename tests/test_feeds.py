"""Input feeds: generated data, .npz/.npy files and folders, module:function, and their checks."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers_verify import TWO_INPUT_TEXT, affine_model, parse

from iropt.errors import UserError
from iropt.ir.model import Model
from iropt.verify.feeds import (
    DEFAULT_DYNAMIC_DIM,
    GENERATED_DATA_WARNING,
    GENERATED_INT_HIGH,
    iter_feeds,
    model_inputs,
    open_feeds,
    parse_shape_overrides,
)


def two_input_model() -> Model:
    return Model.from_onnx(parse(TWO_INPUT_TEXT))


def two_input_arrays(rows: int = 2) -> dict[str, np.ndarray]:
    return {
        "x": np.ones((rows, 3), np.float32),
        "k": np.array([1, 2], np.int64),
        "q": np.array([True, False, True]),
        "h": np.zeros((2, 2), np.float16),
    }


# --- generated -----------------------------------------------------------------------------


def test_generated_feeds_follow_declared_types_and_shapes() -> None:
    model = two_input_model()
    feeds = open_feeds(None, model, count=3)
    assert feeds.generated
    assert len(feeds.feeds) == 3
    for feed in feeds.feeds:
        assert set(feed) == {"x", "k", "q", "h"}
        assert feed["x"].dtype == np.float32 and feed["x"].shape == (DEFAULT_DYNAMIC_DIM, 3)
        assert feed["k"].dtype == np.int64 and feed["k"].shape == (2,)
        assert feed["q"].dtype == np.bool_ and feed["q"].shape == (DEFAULT_DYNAMIC_DIM,)
        assert feed["h"].dtype == np.float16 and feed["h"].shape == (2, 2)
        assert feed["k"].min() >= 0 and feed["k"].max() < GENERATED_INT_HIGH
    # Samples differ from each other (random, not a repeated constant).
    assert not np.array_equal(feeds.feeds[0]["h"], feeds.feeds[1]["h"])


def test_generated_feeds_run_in_onnx_runtime() -> None:
    from iropt.verify.runtime import reference_runner

    model = two_input_model()
    feeds = open_feeds(None, model, shapes={"x": [3, 3]})
    runner = reference_runner(model)
    for feed in feeds.feeds:
        np.testing.assert_array_equal(runner.run(feed)["y"], feed["x"])


def test_generated_feeds_note_dynamic_dims_and_warn_they_are_not_real(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="iropt.verify.feeds"):
        feeds = open_feeds(None, two_input_model())
    assert GENERATED_DATA_WARNING in feeds.notes
    assert any("'x'" in n and "'N'" in n and "--shape x:" in n for n in feeds.notes)
    assert any("'q'" in n and "'M'" in n for n in feeds.notes)
    assert GENERATED_DATA_WARNING in caplog.text


def test_generated_feeds_are_reproducible_per_seed() -> None:
    model = two_input_model()
    first = open_feeds(None, model, seed=7).feeds
    again = open_feeds(None, model, seed=7).feeds
    other = open_feeds(None, model, seed=8).feeds
    for a, b in zip(first, again, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(first[0]["x"], other[0]["x"])


def test_shape_overrides_set_dynamic_dims() -> None:
    feeds = open_feeds(None, two_input_model(), shapes={"x": [5, 3], "q": [4]})
    assert feeds.feeds[0]["x"].shape == (5, 3)
    assert feeds.feeds[0]["q"].shape == (4,)
    assert not any("'x'" in n and "set to" in n for n in feeds.notes)


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({"y": [1, 3]}, "no input 'y'"),
        ({"x": [1, 3, 1]}, "rank 2"),
        ({"x": [2, 4]}, "fixed at 3"),
    ],
)
def test_bad_shape_overrides_are_user_errors(shapes: dict[str, list[int]], expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        open_feeds(None, two_input_model(), shapes=shapes)


def test_input_without_declared_shape_needs_an_override() -> None:
    proto = parse(TWO_INPUT_TEXT)
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    model = Model.from_onnx(proto)
    with pytest.raises(UserError, match=r"no declared shape.*--shape x:"):
        open_feeds(None, model)
    feeds = open_feeds(None, model, shapes={"x": [2, 3, 5]})
    assert feeds.feeds[0]["x"].shape == (2, 3, 5)


def test_unsupported_input_type_cannot_be_generated() -> None:
    text = TWO_INPUT_TEXT.replace("float16[2, 2] h", "bfloat16[2, 2] h")
    model = Model.from_onnx(parse(text))
    with pytest.raises(UserError, match="input 'h' of type BFLOAT16"):
        open_feeds(None, model)


def test_model_inputs_skip_initializers_listed_as_inputs() -> None:
    proto = parse(
        """
        <ir_version: 3, opset_import: ["": 9]>
        g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Add(x, w) }
        """
    )
    assert [spec.name for spec in model_inputs(Model.from_onnx(proto))] == ["x"]


# --- shape overrides ------------------------------------------------------------------------


def test_parse_shape_overrides() -> None:
    parsed = parse_shape_overrides(["x:1x3x224x224", "input:0:2,5", "s:7"])
    assert parsed == {"x": [1, 3, 224, 224], "input:0": [2, 5], "s": [7]}


@pytest.mark.parametrize("bad", ["x", ":1x2", "x:", "x:1xa", "x:-1x3", "x:1x x"])
def test_parse_shape_overrides_rejects_bad_syntax(bad: str) -> None:
    with pytest.raises(UserError, match="--shape"):
        parse_shape_overrides([bad])


def test_parse_shape_overrides_rejects_duplicates() -> None:
    with pytest.raises(UserError, match="given twice"):
        parse_shape_overrides(["x:1", "x:2"])


# --- files and folders ----------------------------------------------------------------------


def test_single_npz_is_one_feed(tmp_path: Path) -> None:
    arrays = two_input_arrays()
    np.savez(tmp_path / "in.npz", **arrays)
    feeds = open_feeds(str(tmp_path / "in.npz"), two_input_model())
    assert not feeds.generated
    assert len(feeds.feeds) == 1
    for name, array in arrays.items():
        np.testing.assert_array_equal(feeds.feeds[0][name], array)
        assert feeds.feeds[0][name].dtype == array.dtype
    assert feeds.notes == []


def test_float64_and_wider_int_data_is_converted_with_a_note(tmp_path: Path) -> None:
    arrays = two_input_arrays()
    arrays["x"] = np.full((2, 3), 0.25, np.float64)
    arrays["k"] = np.array([3, 4], np.int32)
    np.savez(tmp_path / "in.npz", **arrays)
    feeds = open_feeds(str(tmp_path / "in.npz"), two_input_model())
    feed = feeds.feeds[0]
    assert feed["x"].dtype == np.float32 and feed["k"].dtype == np.int64
    np.testing.assert_array_equal(feed["x"], arrays["x"].astype(np.float32))
    np.testing.assert_array_equal(feed["k"], arrays["k"])
    assert "input 'x': float64 data converted to float32" in feeds.notes
    assert "input 'k': int32 data converted to int64" in feeds.notes


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("k", np.array([0.5, 1.0]), r"input 'k' expects int64 .* float64"),
        ("q", np.array([0, 2, 1]), r"input 'q' expects bool"),
        ("x", np.ones((2, 3, 1), np.float32), r"input 'x' expects rank 2"),
        ("x", np.ones((2, 4), np.float32), r"dimension 1 must be 3"),
    ],
)
def test_bad_arrays_are_user_errors(tmp_path: Path, name: str, value: np.ndarray, expected: str) -> None:
    arrays = two_input_arrays()
    arrays[name] = value
    np.savez(tmp_path / "in.npz", **arrays)
    with pytest.raises(UserError, match=expected):
        open_feeds(str(tmp_path / "in.npz"), two_input_model())


def test_missing_and_unknown_inputs_are_user_errors(tmp_path: Path) -> None:
    arrays = two_input_arrays()
    del arrays["k"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(UserError, match=r"missing.npz: no array for input 'k'"):
        open_feeds(str(tmp_path / "missing.npz"), two_input_model())
    arrays = {**two_input_arrays(), "kk": np.zeros(2)}
    np.savez(tmp_path / "extra.npz", **arrays)
    with pytest.raises(UserError, match=r"unknown input 'kk' \(did you mean 'k'\?\)"):
        open_feeds(str(tmp_path / "extra.npz"), two_input_model())


def test_folder_of_npz_gives_one_feed_per_file_in_name_order(tmp_path: Path) -> None:
    for index, name in enumerate(["b.npz", "a.npz", "c.npz"]):
        np.savez(tmp_path / name, x=np.full((1, 4), index, np.float32))
    feeds = open_feeds(str(tmp_path), affine_model())
    assert [float(f["x"][0, 0]) for f in feeds.feeds] == [1.0, 0.0, 2.0]  # a, b, c
    assert "3 .npz files" in feeds.description


def test_folder_of_npy_for_a_single_input_model(tmp_path: Path) -> None:
    for index in range(2):
        np.save(tmp_path / f"sample_{index}.npy", np.full((2, 4), index, np.float32))
    feeds = open_feeds(str(tmp_path), affine_model())
    assert len(feeds.feeds) == 2
    assert [float(f["x"].sum()) for f in feeds.feeds] == [0.0, 8.0]


def test_folder_of_npy_named_after_inputs_is_one_feed(tmp_path: Path) -> None:
    arrays = two_input_arrays()
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    feeds = open_feeds(str(tmp_path), two_input_model())
    assert len(feeds.feeds) == 1
    for name, array in arrays.items():
        np.testing.assert_array_equal(feeds.feeds[0][name], array)


def test_npy_files_for_a_multi_input_model_must_be_named_after_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "sample.npy", np.ones((2, 3), np.float32))
    with pytest.raises(UserError, match=r"the model has 4 inputs .*<input_name>.npy"):
        open_feeds(str(tmp_path), two_input_model())


def test_single_npy_file_feeds_a_single_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((3, 4), np.float32))
    feeds = open_feeds(str(tmp_path / "x.npy"), affine_model())
    assert feeds.feeds[0]["x"].shape == (3, 4)


def test_bad_paths_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or folder"):
        open_feeds(str(tmp_path / "absent.npz"), affine_model())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no \.npz or \.npy files"):
        open_feeds(str(tmp_path / "empty"), affine_model())
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.ones((1, 4), np.float32))
    np.savez(mixed / "b.npz", x=np.ones((1, 4), np.float32))
    with pytest.raises(UserError, match=r"mixes \.npz and \.npy"):
        open_feeds(str(mixed), affine_model())
    (tmp_path / "data.txt").write_text("1 2 3")
    with pytest.raises(UserError, match=r"unsupported file type '\.txt'"):
        open_feeds(str(tmp_path / "data.txt"), affine_model())
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"not a readable \.npz file"):
        open_feeds(str(tmp_path / "broken.npz"), affine_model())


# --- module:function ------------------------------------------------------------------------


def _write_module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


def test_module_function_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        "verifytest_feeds_mod",
        """
        import numpy as np

        def samples():
            for i in range(3):
                yield {"x": np.full((2, 4), i, dtype=np.float32)}

        def one():
            return {"x": np.zeros((1, 4), dtype=np.float32)}
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    feeds = open_feeds("verifytest_feeds_mod:samples", affine_model())
    assert [float(f["x"][0, 0]) for f in feeds.feeds] == [0.0, 1.0, 2.0]
    single = open_feeds("verifytest_feeds_mod:one", affine_model())
    assert len(single.feeds) == 1 and single.feeds[0]["x"].shape == (1, 4)


def test_python_file_function_source(tmp_path: Path) -> None:
    _write_module(
        tmp_path,
        "calib",
        """
        import numpy as np

        def data():
            return [{"x": np.ones((2, 4))}]
        """,
    )
    feeds = open_feeds(f"{tmp_path / 'calib.py'}:data", affine_model())
    assert feeds.feeds[0]["x"].dtype == np.float32  # float64 from Python, converted
    np.testing.assert_array_equal(feeds.feeds[0]["x"], np.ones((2, 4), np.float32))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("verifytest_no_such_module_xyz:data", "cannot import module 'verifytest_no_such_module_xyz'"),
        ("verifytest_feeds_bad:absent", "has no attribute 'absent'"),
        ("verifytest_feeds_bad:NOT_CALLABLE", "is not callable"),
        ("verifytest_feeds_bad:raises", "calling it raised ValueError: no data today"),
        ("verifytest_feeds_bad:number", "returned int; expected an iterable of dicts"),
        ("verifytest_feeds_bad:not_dicts", r"item 0: expected a dict of input name -> array, got list"),
        ("verifytest_feeds_bad:empty", "produced no feeds"),
        ("verifytest_feeds_bad:wrong_name", r"unknown input 'z'"),
    ],
)
def test_bad_module_function_sources_are_user_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, expected: str
) -> None:
    _write_module(
        tmp_path,
        "verifytest_feeds_bad",
        """
        NOT_CALLABLE = 3

        def raises():
            raise ValueError("no data today")

        def number():
            return 5

        def not_dicts():
            return [[1, 2]]

        def empty():
            return []

        def wrong_name():
            return [{"z": [1.0]}]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=expected):
        open_feeds(spec, affine_model())


def test_iter_feeds_streams_one_sample_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        "verifytest_feeds_stream",
        """
        import numpy as np

        produced = []

        def samples():
            for i in range(1000):
                produced.append(i)
                yield {"x": np.full((1, 4), i, dtype=np.float32)}
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import verifytest_feeds_stream  # type: ignore[import-not-found]

    stream = iter_feeds("verifytest_feeds_stream:samples", affine_model())
    first = next(stream)
    second = next(stream)
    assert float(first["x"][0, 0]) == 0.0 and float(second["x"][0, 0]) == 1.0
    # Only what was consumed has been produced: nothing is read ahead or held.
    assert verifytest_feeds_stream.produced == [0, 1]
