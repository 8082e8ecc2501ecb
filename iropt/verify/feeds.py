"""Model inputs from files, from Python, or generated: one protocol, an iterable of feeds.

A *feed* is `{input_name: ndarray}`, one set of inputs for one run of the model. Verification
and calibration both read feeds through this module, from a *spec*:

- `data.npz`: one feed; the archive's arrays are keyed by input name.
- a folder of `.npz` files: one feed per file, in sorted file-name order.
- a folder of `.npy` files: when the file stems are exactly the model's input names
  (`x.npy`, `mask.npy`), one feed made of them; otherwise, for a model with a single input,
  one feed per file in sorted order.
- `data.npy`: one feed, for a model with a single input.
- `package.module:function` or `path/to/file.py:function`: the function is called with no
  arguments and returns an iterable of feeds (or a single feed).
- `None`: generated from the declared input shapes and types: float inputs standard normal,
  integer inputs in [0, GENERATED_INT_HIGH), booleans uniform. A dimension that is not a fixed
  number is set from the `shapes` overrides (`--shape x:1x3x224x224`), else to 1. Generated
  data is not real data: fine for checking that a rewrite is exact, useless for calibrating
  a quantizer or judging accuracy, so a warning says so.

Every feed is checked against the model: each input present, no unknown names, the declared
rank and fixed dimensions. An array whose type differs is converted when that loses nothing
or is obviously intended (float64 data for a float32 input, int64 data for int32 indices
whose values fit), with a note; anything else is a `UserError`.

`iter_feeds` streams, so calibration over many files does not hold them all in memory;
`open_feeds` reads everything into a `FeedSet`.
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.errors import UserError
from iropt.ir.model import Model
from iropt.util.pyimport import import_location
from iropt.util.suggest import did_you_mean
from iropt.util.text import shorten

Feeds = dict[str, np.ndarray]

# --shape dimensions past this are typos (and past what numpy can index).
MAX_DIM = 2**40
# One sample of generated inputs may take at most this many bytes.
MAX_GENERATED_BYTES = 2**30
# Unnamed and symbolic dimensions of generated inputs default to this.
DEFAULT_DYNAMIC_DIM = 1
# Generated integer inputs are drawn from [0, GENERATED_INT_HIGH): small and non-negative, so
# they stay valid as indices, sizes or token ids in most models.
GENERATED_INT_HIGH = 4
GENERATED_DATA_WARNING = (
    "inputs are generated (random data from the declared shapes), not real data: good for "
    "checking exact rewrites, not for calibration or accuracy; pass real inputs to be sure"
)

_log = logging.getLogger("iropt.verify.feeds")


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared: name, numpy dtype (None when numpy has none) and shape.

    `shape` is None for an unknown rank; a dimension is an int, a symbolic name or None.
    `onnx_type` names the element type for messages (`FLOAT`, `BFLOAT16`).
    """

    name: str
    dtype: np.dtype[Any] | None
    shape: tuple[int | str | None, ...] | None
    onnx_type: str

    def shape_text(self) -> str:
        if self.shape is None:
            return "unknown rank"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def model_inputs(model: Model) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    specs = []
    for tensor in model.graph.inputs:
        if isinstance(tensor, gs.Constant):
            continue
        specs.append(_input_spec(tensor))
    return specs


def _input_spec(tensor: gs.Tensor) -> InputSpec:
    dtype: np.dtype[Any] | None
    raw = tensor.dtype
    if isinstance(raw, int):
        # graphsurgeon keeps the ONNX enum for types numpy lacks (bfloat16, float8).
        dtype = None
        onnx_type = onnx.TensorProto.DataType.Name(raw)
    elif raw is None:
        dtype, onnx_type = None, "unknown"
    else:
        dtype = np.dtype(raw)
        onnx_type = onnx.TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(dtype))
    shape = None if tensor.shape is None else tuple(_dim(d) for d in tensor.shape)
    return InputSpec(tensor.name, dtype, shape, onnx_type)


def _dim(value: object) -> int | str | None:
    if isinstance(value, (int, np.integer)):
        # ONNX writes an unknown dimension as -1 in some exporters.
        return int(value) if value >= 0 else None
    if isinstance(value, str) and value:
        return value
    return None


@dataclass
class FeedSet:
    """Feeds read into memory, with where they came from and what was adjusted on the way."""

    feeds: list[Feeds]
    description: str
    generated: bool
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Feeds]:
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


class FeedSource:
    """A re-iterable, streaming source of checked feeds.

    `notes` grows while iterating (a conversion is noted the first time it happens).
    """

    def __init__(
        self,
        description: str,
        produce: Callable[[], Iterator[tuple[str, Mapping[str, Any]]]],
        inputs: Sequence[InputSpec],
        *,
        generated: bool = False,
        notes: Sequence[str] = (),
    ) -> None:
        self.description = description
        self.generated = generated
        self.notes = list(notes)
        self._produce = produce
        self._inputs = list(inputs)

    def __iter__(self) -> Iterator[Feeds]:
        count = 0
        for where, raw in self._produce():
            count += 1
            yield check_feed(raw, self._inputs, where=where, notes=self.notes)
        if count == 0:
            raise UserError(f"{self.description}: no inputs found (it produced no feeds)")


def feed_source(
    spec: str | None,
    model: Model,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    count: int = 2,
    seed: int = 0,
) -> FeedSource:
    """A streaming source for `spec` (see the module docstring).

    `shapes` and `count` apply to generated inputs only; `seed` makes them reproducible.
    """
    inputs = model_inputs(model)
    overrides = _checked_overrides(shapes or {}, inputs)
    if spec is None:
        return _generated_source(inputs, overrides, count, seed)
    path = Path(spec)
    if path.is_dir():
        return _folder_source(path, inputs)
    if path.is_file():
        return _file_source(path, inputs)
    if ":" in spec and path.suffix.lower() not in (".npz", ".npy"):
        return _callable_source(spec, inputs)
    raise UserError(
        f"inputs '{spec}': no such file or folder (expected an .npz file, a folder of .npz/.npy "
        "files, or module:function)"
    )


def iter_feeds(
    spec: str | None,
    model: Model,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    count: int = 2,
    seed: int = 0,
) -> Iterator[Feeds]:
    """Stream the checked feeds of `spec` one at a time (memory does not grow with their number)."""
    return iter(feed_source(spec, model, shapes=shapes, count=count, seed=seed))


def open_feeds(
    spec: str | None,
    model: Model,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    count: int = 2,
    seed: int = 0,
) -> FeedSet:
    """Read every feed of `spec` into a FeedSet; `count` is the number of generated feeds."""
    source = feed_source(spec, model, shapes=shapes, count=count, seed=seed)
    feeds = list(source)
    return FeedSet(feeds, source.description, source.generated, list(source.notes))


@dataclass(frozen=True)
class ShapeRange:
    """The shapes one input may take: `opt` is the one to tune for (and to verify with).

    `ranged` tells a range given as MIN,OPT,MAX from a single shape (min = opt = max).
    """

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    ranged: bool = False

    def describe(self) -> str:
        if not self.ranged:
            return _dims_text(self.opt)
        return f"min {_dims_text(self.min)}, opt {_dims_text(self.opt)}, max {_dims_text(self.max)}"


def _dims_text(dims: Sequence[int]) -> str:
    return "x".join(str(d) for d in dims)


def parse_shape_overrides(items: Iterable[str]) -> dict[str, list[int]]:
    """Parse `--shape` values such as `x:1x3x224x224` (or `x:1,3,224,224`) into a dict.

    The name is everything before the last colon, so names with colons (`input:0`) work. A
    range `x:MIN,OPT,MAX` gives its OPT shape here (see `parse_shape_ranges`).
    """
    return {name: list(shape_range.opt) for name, shape_range in parse_shape_ranges(items).items()}


def parse_shape_ranges(items: Iterable[str]) -> dict[str, ShapeRange]:
    """Parse `--shape` values into ranges: `x:1x3x224x224` is one shape (min = opt = max);
    `x:1x3x224x224,4x3x320x320,8x3x640x640` is MIN,OPT,MAX for a TensorRT profile.

    Commas between shapes are told apart from the older comma-separated dimensions
    (`x:1,3,224,224`, one shape) by the `x`: a range is written with `x` inside its shapes.
    """
    result: dict[str, ShapeRange] = {}
    for item in items:
        name, sep, dims_text = item.rpartition(":")
        if not sep or not name or not dims_text:
            raise UserError(f"--shape '{shorten(item)}': expected NAME:DIMS such as x:1x3x224x224")
        if name in result:
            raise UserError(f"--shape: input '{shorten(name)}' is given twice")
        result[name] = _parse_shape_range(shorten(item), dims_text)
    return result


def _parse_shape_range(item: str, text: str) -> ShapeRange:
    shapes_text = text.split(",") if "x" in text else [text.replace(",", "x")]
    if len(shapes_text) not in (1, 3):
        raise UserError(
            f"--shape '{item}': give one shape (x:1x3x224x224) or three, MIN,OPT,MAX "
            f"(x:1x3x224x224,4x3x224x224,8x3x224x224), not {len(shapes_text)}"
        )
    shapes = [_parse_dims(item, part) for part in shapes_text]
    if len(shapes) == 1:
        return ShapeRange(shapes[0], shapes[0], shapes[0])
    low, opt, high = shapes
    if not len(low) == len(opt) == len(high):
        raise UserError(f"--shape '{item}': MIN, OPT and MAX must have the same rank")
    for axis, (a, b, c) in enumerate(zip(low, opt, high, strict=True)):
        if not a <= b <= c:
            raise UserError(
                f"--shape '{item}': dimension {axis} needs MIN <= OPT <= MAX, got {a}, {b}, {c}"
            )
    return ShapeRange(low, opt, high, ranged=True)


def _parse_dims(item: str, text: str) -> tuple[int, ...]:
    parts = text.split("x")
    if not all(p.strip().isdigit() for p in parts):
        raise UserError(
            f"--shape '{item}': dimensions must be non-negative integers separated by 'x' "
            "(such as 1x3x224x224)"
        )
    dims = tuple(int(p) for p in parts)
    if any(dim > MAX_DIM for dim in dims):
        raise UserError(f"--shape '{item}': a dimension is larger than {MAX_DIM}")
    return dims


def check_feed(
    raw: Mapping[str, Any], inputs: Sequence[InputSpec], *, where: str, notes: list[str] | None = None
) -> Feeds:
    """`raw` checked against the model's inputs and converted to their types.

    Raises UserError naming `where` (the file or source) for a missing or unknown input, a wrong
    rank or fixed dimension, or a type that cannot be converted without loss. Conversions made
    are appended to `notes` (once each).
    """
    if not isinstance(raw, Mapping):
        raise UserError(
            f"{where}: expected a dict of input name -> array, got {type(raw).__name__}"
        )
    by_name = {spec.name: spec for spec in inputs}
    names = ", ".join(by_name) or "none"
    for key in raw:
        if key not in by_name:
            raise UserError(
                f"{where}: unknown input '{key}'{did_you_mean(str(key), by_name)}; "
                f"the model's inputs are: {names}"
            )
    feed: Feeds = {}
    for spec in inputs:
        if spec.name not in raw:
            raise UserError(f"{where}: no array for input '{spec.name}' (the model's inputs are: {names})")
        feed[spec.name] = _check_array(np.asarray(raw[spec.name]), spec, where, notes)
    return feed


def _check_array(array: np.ndarray, spec: InputSpec, where: str, notes: list[str] | None) -> np.ndarray:
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise UserError(
                f"{where}: input '{spec.name}' expects rank {len(spec.shape)} {spec.shape_text()}, "
                f"got an array of shape {list(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise UserError(
                    f"{where}: input '{spec.name}' expects shape {spec.shape_text()}, got "
                    f"{list(array.shape)} (dimension {axis} must be {want})"
                )
    if spec.dtype is None or array.dtype == spec.dtype:
        return array
    converted = _convert(array, spec.dtype)
    if converted is None:
        raise UserError(
            f"{where}: input '{spec.name}' expects {spec.dtype} ({spec.onnx_type}), got {array.dtype} "
            "data that cannot be converted without loss; convert it before saving"
        )
    if notes is not None:
        text = f"input '{spec.name}': {array.dtype} data converted to {spec.dtype}"
        if text not in notes:
            notes.append(text)
    return converted


def _convert(array: np.ndarray, target: np.dtype[Any]) -> np.ndarray | None:
    """`array` as `target` when that is lossless or obviously intended, else None.

    Float to a narrower float is allowed: numpy makes float64 by default, so float64 data for a
    float32 input is what everyone writes. Integer and boolean conversions must round-trip.
    """
    source = array.dtype
    if source.kind == "f" and target.kind == "f":
        return array.astype(target)
    numeric = ("b", "i", "u", "f")
    if source.kind in ("b", "i", "u") and target.kind in numeric:
        with np.errstate(all="ignore"):
            converted = array.astype(target)
        if np.array_equal(converted.astype(source), array):
            return converted
        return None
    if source.kind in ("U", "S", "O") and target.kind in ("U", "S", "O"):
        return array.astype(target)
    return None


# --- sources ---------------------------------------------------------------------------


def _checked_overrides(
    shapes: Mapping[str, Sequence[int]], inputs: Sequence[InputSpec]
) -> dict[str, list[int]]:
    by_name = {spec.name: spec for spec in inputs}
    result = {}
    for name, dims in shapes.items():
        if name not in by_name:
            raise UserError(
                f"--shape: the model has no input '{name}'{did_you_mean(name, by_name)}; "
                f"its inputs are: {', '.join(by_name) or 'none'}"
            )
        spec = by_name[name]
        dims = [int(d) for d in dims]
        if spec.shape is not None:
            if len(dims) != len(spec.shape):
                raise UserError(
                    f"--shape {name}:{'x'.join(map(str, dims))}: input '{name}' has rank "
                    f"{len(spec.shape)} {spec.shape_text()}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, dims, strict=True)):
                if isinstance(want, int) and want != got:
                    raise UserError(
                        f"--shape {name}:{'x'.join(map(str, dims))}: dimension {axis} of input "
                        f"'{name}' is fixed at {want} {spec.shape_text()}"
                    )
        result[name] = dims
    return result


def _generated_source(
    inputs: Sequence[InputSpec], overrides: Mapping[str, list[int]], count: int, seed: int
) -> FeedSource:
    if count < 1:
        raise UserError(f"the number of generated inputs must be at least 1, got {count}")
    notes: list[str] = []
    shapes = {spec.name: _generated_shape(spec, overrides, notes) for spec in inputs}
    for spec in inputs:
        if spec.dtype is None or spec.dtype.kind not in ("b", "i", "u", "f"):
            raise UserError(
                f"cannot generate data for input '{spec.name}' of type {spec.onnx_type}; "
                "give real inputs (an .npz file, a folder or module:function)"
            )
    _check_generated_size(inputs, shapes)
    notes.append(GENERATED_DATA_WARNING)
    _log.warning("%s", GENERATED_DATA_WARNING)

    def produce() -> Iterator[tuple[str, Feeds]]:
        # A fresh generator per pass over the data: iterating twice gives the same feeds.
        rng = np.random.default_rng(seed)
        for index in range(count):
            feed = {spec.name: _random_array(rng, spec, shapes[spec.name]) for spec in inputs}
            yield f"generated input {index}", feed

    description = f"{count} generated input sample(s) (seed {seed})"
    return FeedSource(description, produce, inputs, generated=True, notes=notes)


def _check_generated_size(inputs: Sequence[InputSpec], shapes: Mapping[str, list[int]]) -> None:
    """UserError when one generated sample would pass MAX_GENERATED_BYTES (a typo in --shape)."""
    total = 0
    for spec in inputs:
        assert spec.dtype is not None
        total += math.prod(shapes[spec.name]) * spec.dtype.itemsize
    if total > MAX_GENERATED_BYTES:
        sizes = ", ".join(f"{spec.name}: {'x'.join(map(str, shapes[spec.name]))}" for spec in inputs)
        raise UserError(
            f"generated inputs would take {total / 2**30:.3g} GiB per sample ({shorten(sizes, 200)}); "
            f"the limit is {MAX_GENERATED_BYTES // 2**30} GiB: check --shape, or give real inputs "
            "with --inputs"
        )


def _generated_shape(spec: InputSpec, overrides: Mapping[str, list[int]], notes: list[str]) -> list[int]:
    if spec.name in overrides:
        return list(overrides[spec.name])
    if spec.shape is None:
        raise UserError(
            f"input '{spec.name}' has no declared shape; give one with --shape {spec.name}:1x3x224x224 "
            "(your dimensions) or pass real inputs"
        )
    dims = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            dims.append(dim)
            continue
        label = f"'{dim}'" if isinstance(dim, str) else f"{axis} (unnamed)"
        notes.append(
            f"input '{spec.name}': dim {label} set to {DEFAULT_DYNAMIC_DIM} "
            f"(override with --shape {spec.name}:...)"
        )
        dims.append(DEFAULT_DYNAMIC_DIM)
    return dims


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: list[int]) -> np.ndarray:
    assert spec.dtype is not None
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.integers(0, GENERATED_INT_HIGH, size=shape).astype(spec.dtype)


def _file_source(path: Path, inputs: Sequence[InputSpec]) -> FeedSource:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return FeedSource(str(path), lambda: iter([(str(path), _read_npz(path))]), inputs)
    if suffix == ".npy":
        name = _single_input(inputs, str(path))
        return FeedSource(str(path), lambda: iter([(str(path), {name: _read_npy(path)})]), inputs)
    raise UserError(
        f"inputs '{path}': unsupported file type '{path.suffix}' (expected .npz, .npy, a folder, "
        "or module:function)"
    )


def _folder_source(folder: Path, inputs: Sequence[InputSpec]) -> FeedSource:
    npz = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".npz")
    npy = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".npy")
    if npz and npy:
        raise UserError(
            f"inputs folder '{folder}' mixes .npz and .npy files; use one kind "
            "(one .npz per sample, or .npy files)"
        )
    if npz:

        def produce_npz() -> Iterator[tuple[str, Feeds]]:
            for path in npz:
                yield str(path), _read_npz(path)

        return FeedSource(f"{folder} ({len(npz)} .npz files)", produce_npz, inputs)
    if not npy:
        raise UserError(f"inputs folder '{folder}' has no .npz or .npy files")
    names = {spec.name for spec in inputs}
    if {p.stem for p in npy} == names and len(npy) == len(names):
        # One .npy per input name: a single feed.
        return FeedSource(
            f"{folder} (one .npy per input)",
            lambda: iter([(str(folder), {p.stem: _read_npy(p) for p in npy})]),
            inputs,
        )
    name = _single_input(inputs, str(folder), hint="or name the files <input_name>.npy")

    def produce_npy() -> Iterator[tuple[str, Feeds]]:
        for path in npy:
            yield str(path), {name: _read_npy(path)}

    return FeedSource(f"{folder} ({len(npy)} .npy files)", produce_npy, inputs)


def _single_input(inputs: Sequence[InputSpec], where: str, hint: str = "") -> str:
    if len(inputs) != 1:
        extra = f" ({hint})" if hint else ""
        raise UserError(
            f"{where}: .npy files hold one array, but the model has {len(inputs)} inputs "
            f"({', '.join(s.name for s in inputs)}); use .npz files keyed by input name{extra}"
        )
    return inputs[0].name


# What numpy raises for a damaged or truncated .npy/.npz (a zip archive of .npy files).
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def _read_npz(path: Path) -> Feeds:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except _UNREADABLE as error:
        raise UserError(f"{path}: not a readable .npz file ({type(error).__name__}: {shorten(str(error), 200)})") from error


def _read_npy(path: Path) -> np.ndarray:
    try:
        array: np.ndarray = np.load(path, allow_pickle=False)
    except _UNREADABLE as error:
        raise UserError(f"{path}: not a readable .npy file ({type(error).__name__}: {shorten(str(error), 200)})") from error
    return array


def _callable_source(spec: str, inputs: Sequence[InputSpec]) -> FeedSource:
    target, _, attr = spec.rpartition(":")
    function = _load_callable(spec, target, attr)

    def produce() -> Iterator[tuple[str, Mapping[str, Any]]]:
        try:
            produced = function()
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"inputs '{spec}': calling it raised {type(error).__name__}: {error}") from error
        if isinstance(produced, Mapping):
            yield spec, produced
            return
        if not isinstance(produced, Iterable):
            raise UserError(
                f"inputs '{spec}': returned {type(produced).__name__}; expected an iterable of "
                "dicts (input name -> array)"
            )
        for index, item in enumerate(produced):
            yield f"{spec} item {index}", item

    return FeedSource(spec, produce, inputs)


def _load_callable(spec: str, target: str, attr: str) -> Callable[[], Any]:
    if not target or not attr:
        raise UserError(f"inputs '{spec}': expected module:function or path/to/file.py:function")
    module = _import_target(spec, target)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"inputs '{spec}': '{target}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"inputs '{spec}': '{attr}' is not callable")
    function: Callable[[], Any] = obj
    return function


def _import_target(spec: str, target: str) -> Any:
    return import_location(target, f"inputs '{spec}'")
