"""Small models and test-only passes for the feeds, verification and ORT back-end tests.

The passes registered here (`verifytest_*`) exist only for tests: one breaks the model on
purpose (Add becomes Sub), one nudges a constant slightly, as a lossy pass would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import is_op, iter_graphs
from iropt.ir.model import Model

# y = Identity(Identity(x) + c) * d: eliminate_identity changes it, and its Add is the
# target of the breaking pass.
AFFINE_TEXT = """
<ir_version: 8, opset_import: ["": 17]>
affine (float[N, 4] x) => (float[N, 4] y) <float[4] c = {1.0, 2.0, 3.0, 4.0}, float[4] d = {0.5, 2.0, -1.0, 3.0}> {
    a = Identity(x)
    s = Add(a, c)
    t = Mul(s, d)
    y = Identity(t)
}
"""

TWO_INPUT_TEXT = """
<ir_version: 8, opset_import: ["": 17]>
two (float[N, 3] x, int64[2] k, bool[M] q, float16[2, 2] h) => (float[N, 3] y) {
    y = Identity(x)
}
"""

CUSTOM_OP_TEXT = """
<ir_version: 8, opset_import: ["": 17, "com.example.verifytest": 1]>
custom (float[2] x) => (float[2] y) {
    y = com.example.verifytest.Frobnicate(x)
}
"""


def parse(text: str) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return proto


def affine_model() -> Model:
    return Model.from_onnx(parse(AFFINE_TEXT))


def affine_numpy(x: np.ndarray) -> np.ndarray:
    """What AFFINE_TEXT computes, in numpy (float32, like the model)."""
    c = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    d = np.array([0.5, 2.0, -1.0, 3.0], dtype=np.float32)
    return ((x + c) * d).astype(np.float32)


def affine_feeds(count: int = 2, rows: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1234)
    return [{"x": rng.standard_normal((rows, 4)).astype(np.float32)} for _ in range(count)]


def custom_op_model() -> Model:
    # The checker cannot check an op of an unknown domain; build it without checking.
    return Model.from_onnx(onnx.parser.parse_model(CUSTOM_OP_TEXT))


@register_pass("verifytest_breaks_add")
@dataclass(kw_only=True)
class BreaksAdd(Pass):
    """Test only: turns every Add into a Sub, which is wrong on purpose."""

    kind = PassKind.EXACT

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        changed = 0
        for graph in iter_graphs(model.graph):
            for node in graph.nodes:
                if is_op(node, "Add"):
                    node.op = "Sub"
                    changed += 1
        return PassResult.from_stats(broken=changed)


def _nudge_constants(model: Model, factor: float) -> int:
    nudged = 0
    for graph in iter_graphs(model.graph):
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and np.asarray(tensor.values).dtype.kind == "f":
                tensor.values = (np.asarray(tensor.values) * factor).astype(tensor.values.dtype)
                nudged += 1
    return nudged


@register_pass("verifytest_lossy_nudge")
@dataclass(kw_only=True)
class LossyNudge(Pass):
    """Test only: scales every float constant by `factor`, a small loss like quantization's."""

    kind = PassKind.LOSSY
    factor: float = 1.001

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult.from_stats(nudged=_nudge_constants(model, self.factor))


@register_pass("verifytest_exact_nudge")
@dataclass(kw_only=True)
class ExactNudge(Pass):
    """Test only: the same nudge, declared exact, so it must fail exact verification."""

    kind = PassKind.EXACT
    factor: float = 1.001

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult.from_stats(nudged=_nudge_constants(model, self.factor))

