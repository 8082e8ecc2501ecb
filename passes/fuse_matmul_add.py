"""fuse_matmul_add: turn MatMul by a constant matrix followed by Add of a constant into Gemm.

Pattern: `y = Add(MatMul(a, B), c)` (either operand order) where B is a constant 2-D float
matrix [K, N], a has rank 2 (Gemm multiplies matrices only; a batched MatMul stays), c is a
constant that broadcasts to [M, N] without growing it: a scalar, [N], [1, N], [1, 1], or
[M, N] / [M, 1] when M is statically known, and the MatMul output is read only by the Add.

Algebra: Gemm(a, B, c; alpha=1, beta=1, transA=0, transB=0) = a @ B + c, with c broadcast
unidirectionally to [M, N] exactly as Add broadcasts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from iropt.infra.registry import register_pass
from iropt.rewrite import Match, RewritePass, RewriteRule, const, op, take_outputs, tensor, tensor_rank


class MatMulAdd(RewriteRule):
    """Add(MatMul(a, B), c) -> Gemm(a, B, c)."""

    name = "matmul_add"
    pattern = op(
        "Add",
        inputs=[op("MatMul", inputs=[tensor("a"), const("w")], name="matmul", one_consumer=True), const("c")],
        name="add",
        commutative=True,
    )

    def check(self, match: Match) -> str | None:
        weight, bias = match.value("w"), match.value("c")
        if weight.ndim != 2 or weight.dtype.kind != "f":
            return f"MatMul.B has shape {list(weight.shape)} and type {weight.dtype}; expected a 2-D float matrix"
        a = match.tensors["a"]
        rank = tensor_rank(a) if a is not None else None
        if rank != 2:
            return f"MatMul.A has {'unknown rank' if rank is None else f'rank {rank}'}; Gemm needs rank 2"
        if bias.dtype != weight.dtype:
            return f"Add constant is {bias.dtype}, the MatMul is {weight.dtype}"
        return self._bias_problem(bias.shape, a, int(weight.shape[1]))

    def _bias_problem(self, shape: tuple[int, ...], a: gs.Tensor | None, columns: int) -> str | None:
        if len(shape) > 2:
            return f"Add constant of shape {list(shape)} has more than 2 axes"
        rows, cols = (1, 1, *shape)[-2:]
        if cols not in (1, columns):
            return f"Add constant of shape {list(shape)} does not broadcast to [M, {columns}]"
        if rows != 1:
            # Add would broadcast a [1, K] input up to [rows, N]; Gemm only broadcasts C down.
            m = a.shape[0] if a is not None and a.shape is not None else None
            if m != rows:
                return f"Add constant has {rows} rows but MatMul.A has {m if isinstance(m, int) else 'dynamic'} rows"
        return None

    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        matmul = match.nodes["matmul"]
        c = match.tensors["c"]
        assert c is not None
        graph.nodes.append(
            gs.Node(
                "Gemm",
                name=match.fresh_name(f"{matmul.name or 'matmul'}_gemm"),
                inputs=[matmul.inputs[0], matmul.inputs[1], c],
                # The Gemm writes the Add's output tensor, so its name (maybe a graph output) is kept.
                outputs=take_outputs(match.nodes["add"]),
            )
        )


@register_pass("fuse_matmul_add")
@dataclass(kw_only=True)
class FuseMatMulAdd(RewritePass):
    """Turn MatMul by a constant 2-D matrix plus a constant bias into one Gemm."""

    def rules(self) -> list[RewriteRule]:
        return [MatMulAdd()]
