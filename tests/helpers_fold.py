"""Shared tools for the fold_constants, eliminate_common_subexpressions and dedupe_initializers tests.

Models are written in the ONNX text format, checked with the ONNX checker, run through ONNX
Runtime with its graph optimizations off (so the runtime does not fold anything itself), and
compared at explicit tolerances.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx.parser
from helpers_ort import run_ort

from iropt.infra.pass_base import PassContext, PassResult
from iropt.infra.registry import create_pass
from iropt.ir.model import Model

# float32 tolerances for exact passes.
RTOL = 1e-5
ATOL = 1e-6


def parse(text: str, *, check: bool = True) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    return proto


def model_of(text: str, *, check: bool = True) -> Model:
    return Model.from_onnx(parse(text, check=check))


def run_pass(name: str, model: Model, **options: object) -> PassResult:
    return create_pass(name, dict(options)).run(model, PassContext())



def assert_same_outputs(
    before: onnx.ModelProto, after: Model, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """`after` passes the checker and matches `before` on `feeds`: same names, dtypes, shapes, values."""
    proto = after.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    expected = run_ort(before, feeds)
    actual = run_ort(proto, feeds)
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    return actual


def ops(model: Model) -> list[str]:
    """The op types of the main graph, in order."""
    return [node.op for node in model.graph.nodes]


def initializer_names(model: Model) -> set[str]:
    return {t.name for t in model.to_onnx().graph.initializer}


def random_feeds(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 normal values for the named inputs, with the given shapes."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
