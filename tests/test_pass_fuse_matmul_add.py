"""fuse_matmul_add: MatMul by a constant matrix plus a constant bias becomes Gemm."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers_fusion import build, fused, histogram, rand, unchanged

from iropt.ir.model import Model
from iropt.passes.fuse_matmul_add import FuseMatMulAdd
from iropt.rewrite import explain


def matmul_add(
    c_shape: tuple[int, ...], *, a: str = "3,4", y: str = "3,5", swapped: bool = False
) -> onnx.ModelProto:
    """y = Add(MatMul(a, w[4, 5]), c) with the given declared shapes."""
    rng = np.random.default_rng(0)
    return build(
        f"""
        g (float[{a}] a) => (float[{y}] y) {{
            t = MatMul (a, w)
            y = Add ({"c, t" if swapped else "t, c"})
        }}""",
        {"w": rand(rng, 4, 5), "c": rand(rng, *c_shape)},
    )


@pytest.mark.parametrize(
    ("c_shape", "a", "y", "swapped"),
    [
        ((5,), "3,4", "3,5", False),
        ((1, 5), "N,4", "N,5", True),
        ((3, 5), "3,4", "3,5", False),
        ((3, 1), "3,4", "3,5", True),
        ((), "N,4", "N,5", False),
    ],
)
def test_matmul_add_becomes_gemm(c_shape: tuple[int, ...], a: str, y: str, swapped: bool) -> None:
    after, result = fused(matmul_add(c_shape, a=a, y=y, swapped=swapped), "fuse_matmul_add")
    assert result.stats == {"matmul_add": 1}
    assert histogram(after) == {"Gemm": 1}
    assert after.graph.node[0].output[0] == "y"


@pytest.mark.parametrize(
    ("c_shape", "a", "y", "reason"),
    [
        ((3, 5), "N,4", "3,5", "Add constant has 3 rows but MatMul.A has dynamic rows"),
        ((3, 5), "1,4", "3,5", "Add constant has 3 rows but MatMul.A has 1 rows"),
        ((5,), "3,2,4", "3,2,5", "MatMul.A has rank 3; Gemm needs rank 2"),
        ((2, 1, 5), "3,4", "2,3,5", "Add constant of shape [2, 1, 5] has more than 2 axes"),
    ],
    ids=["dynamic-rows", "broadcast-rows", "batched", "rank3-bias"],
)
def test_refusals(c_shape: tuple[int, ...], a: str, y: str, reason: str) -> None:
    proto = matmul_add(c_shape, a=a, y=y)
    model = Model.from_onnx(proto)
    add = next(n for n in model.graph.nodes if n.op == "Add")
    assert explain(FuseMatMulAdd().rules(), add, model.graph) == [f"matmul_add: {reason}"]
    unchanged(proto, "fuse_matmul_add")


def test_non_constant_weight_is_refused() -> None:
    proto = build(
        """
        g (float[3,4] a, float[4,5] w) => (float[3,5] y) {
            t = MatMul (a, w)
            y = Add (t, c)
        }""",
        {"c": np.ones(5, np.float32)},
    )
    model = Model.from_onnx(proto)
    add = next(n for n in model.graph.nodes if n.op == "Add")
    assert explain(FuseMatMulAdd().rules(), add, model.graph)[0].startswith(
        "matmul_add: MatMul.B is not a constant ('w')"
    )
    unchanged(proto, "fuse_matmul_add")
