"""4-bit weight-only quantization of MatMul and Gemm: weights stored in blocks of 4-bit codes.

Activations stay float; only the constant weight `W [K, N]` is stored quantized (see
`iropt.compress.quant.blockwise` for the codes). Two encodings, by what the target runs:

- `matmul_nbits` (ONNX Runtime): one `com.microsoft.MatMulNBits` node per layer. B is
  `uint8 [N, blocks, block / 2]` (column n's block j, two codes per byte, low nibble first),
  `scales [N, blocks]`, zero points packed two per byte `[N, ceil(blocks / 2)]` (omitted when
  symmetric: the kernel's default zero point is 8). A Gemm's `alpha` folds into the scales and
  `beta * C` becomes MatMulNBits' bias. `accuracy_level` passes through (4: the kernel quantizes
  activations to int8 per block and multiplies in integers, faster on CPUs with int8 dot
  products, less precise).
- `blocked_dq` (TensorRT, ONNX opset >= 21): `DequantizeLinear(axis=0, block_size=block)` of an
  int4 weight (symmetric: codes - 8, zero point omitted) or a uint4 weight with uint4 zero
  points, feeding the original MatMul / Gemm.

Candidates: MatMul with a constant 2-D float weight and a computed input; Gemm without
`transA` whose C is absent or a constant of N values. New nodes are appended to the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from iropt.compress.quant.blockwise import BlockQuantized, pack_nibbles
from iropt.compress.quant.placement import node_key, node_label
from iropt.compress.quant.rewrite import names_for
from iropt.ir.graph import FreshNames, constant_value, is_op

Int4Format = Literal["matmul_nbits", "blocked_dq"]
MS_DOMAIN = "com.microsoft"
BLOCKED_DQ_MIN_OPSET = 21
WEIGHT_ONLY_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm")


@dataclass(frozen=True)
class WeightOnlyCandidate:
    node: gs.Node
    key: str
    label: str
    weight: np.ndarray  # [K, N] float32, Gemm's transB undone
    alpha: float
    bias: np.ndarray | None  # [N], beta folded in

    @property
    def activation(self) -> gs.Tensor:
        return self.node.inputs[0]


def weight_only_candidates(
    graph: gs.Graph, op_types: tuple[str, ...] | list[str], excluded: Callable[[gs.Node, str], bool]
) -> list[WeightOnlyCandidate]:
    """MatMul/Gemm nodes whose constant weight can be stored in 4-bit blocks."""
    found = []
    for index, node in enumerate(graph.nodes):
        key = node_key(index)
        if node.op not in op_types or not is_op(node, *WEIGHT_ONLY_OP_TYPES) or excluded(node, key):
            continue
        candidate = _describe(node, key, node_label(node, index))
        if candidate is not None:
            found.append(candidate)
    return found


def _describe(node: gs.Node, key: str, label: str) -> WeightOnlyCandidate | None:
    if len(node.inputs) < 2 or constant_value(node.inputs[0]) is not None:
        return None
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    if not is_op(node, "Gemm"):
        return WeightOnlyCandidate(node, key, label, weight, 1.0, None)
    if int(node.attrs.get("transA", 0)):
        return None
    if int(node.attrs.get("transB", 0)):
        weight = weight.T
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        value = constant_value(node.inputs[2])
        if value is None or value.size != weight.shape[1] or value.ndim > 2:
            return None  # a computed or row-wise bias
        bias = (value.reshape(-1) * np.float32(node.attrs.get("beta", 1.0))).astype(np.float32)
    return WeightOnlyCandidate(node, key, label, np.ascontiguousarray(weight), float(node.attrs.get("alpha", 1.0)), bias)


@dataclass(frozen=True)
class PackedRows:
    """MatMulNBits' B for a Gemm weight stored `[N, K]` (transB): one row of the constant per
    output, packed in blocks along the row, the layout of a 4-bit embedding table, so a Gather
    of the same table (tied weights) can read these bytes instead of a copy of its own."""

    data: gs.Constant  # uint8 [N, blocks, block / 2], no padding (K is a multiple of the block)
    codes: BlockQuantized  # of the `[K, N]` weight; its scales without the Gemm's alpha


def rewrite_weight_only(
    graph: gs.Graph,
    quantized: Mapping[str, tuple[WeightOnlyCandidate, BlockQuantized]],
    fmt: Int4Format,
    accuracy_level: int = 0,
) -> dict[str, PackedRows]:
    """Replace each candidate's weight by its 4-bit codes in `fmt`.

    `accuracy_level` is MatMulNBits' attribute: the least precise type the kernel may compute
    in (0 unset, 1 float32, 2 float16, 3 bfloat16, 4 int8 activations quantized per block).
    Returns, by the name of the original weight, the B of each Gemm whose transB weight is
    stored row by row (what a tied embedding table can share)."""
    name = names_for(graph)
    rows: dict[str, PackedRows] = {}
    for candidate, codes in quantized.values():
        if fmt == "matmul_nbits":
            weight = candidate.node.inputs[1].name
            transposed = is_op(candidate.node, "Gemm") and int(candidate.node.attrs.get("transB", 0))
            data = _matmul_nbits(graph, name, candidate, codes, accuracy_level)
            if transposed and candidate.weight.shape[0] % codes.block == 0:
                rows[weight] = PackedRows(data, codes)
        else:
            _blocked_dequantize(graph, name, candidate, codes)
    if fmt == "matmul_nbits" and quantized:
        import_domain(graph, MS_DOMAIN, 1)
    return rows


def _matmul_nbits(
    graph: gs.Graph, name: FreshNames, candidate: WeightOnlyCandidate, q: BlockQuantized, accuracy_level: int
) -> gs.Constant:
    """Replace the candidate by a MatMulNBits node; returns its B."""
    node = candidate.node
    k, n = candidate.weight.shape
    padded = np.zeros((q.blocks * q.block, n), dtype=np.uint8)
    padded[:k] = q.codes
    base = node.name or node.outputs[0].name
    packed = pack_nibbles(padded.T.reshape(n, q.blocks, q.block))
    scales = (q.scale.T * np.float32(candidate.alpha)).astype(np.float32)
    data = gs.Constant(name(f"{base}_weight_q4"), np.ascontiguousarray(packed))
    inputs: list[gs.Tensor] = [
        candidate.activation,
        data,
        gs.Constant(name(f"{base}_weight_scales"), np.ascontiguousarray(scales)),
    ]
    if not q.symmetric:
        zeros = q.zero.T
        if zeros.shape[1] % 2:
            zeros = np.concatenate([zeros, np.full((n, 1), 8, dtype=np.uint8)], axis=1)
        inputs.append(gs.Constant(name(f"{base}_weight_zero_points"), np.ascontiguousarray(pack_nibbles(zeros))))
    if candidate.bias is not None:
        while len(inputs) < 5:
            inputs.append(gs.Variable.empty())
        inputs.append(gs.Constant(name(f"{base}_bias"), candidate.bias))
    output = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    graph.nodes.append(gs.Node(
        "MatMulNBits", name(f"{base}_MatMulNBits"),
        {"K": k, "N": n, "bits": 4, "block_size": q.block, "accuracy_level": accuracy_level},
        inputs=inputs, outputs=[output], domain=MS_DOMAIN,
    ))
    return data


def _blocked_dequantize(graph: gs.Graph, name: FreshNames, candidate: WeightOnlyCandidate, q: BlockQuantized) -> None:
    node = candidate.node
    base = node.inputs[1].name
    transposed = is_op(node, "Gemm") and int(node.attrs.get("transB", 0))
    codes, scale, zero = (q.codes.T, q.scale.T, q.zero.T) if transposed else (q.codes, q.scale, q.zero)
    axis = 1 if transposed else 0
    if q.symmetric:
        stored = (codes.astype(np.int8) - np.int8(8)).astype(ml_dtypes.int4)
        inputs: list[gs.Tensor] = [_packed_constant(name(f"{base}_int4"), stored)]
        inputs.append(gs.Constant(name(f"{base}_scale"), np.ascontiguousarray(scale, dtype=np.float32)))
    else:
        inputs = [
            _packed_constant(name(f"{base}_uint4"), codes.astype(ml_dtypes.uint4)),
            gs.Constant(name(f"{base}_scale"), np.ascontiguousarray(scale, dtype=np.float32)),
            _packed_constant(name(f"{base}_zero_point"), zero.astype(ml_dtypes.uint4)),
        ]
    out = gs.Variable(name(f"{base}_dequantized"), dtype=np.float32, shape=list(codes.shape))
    node.inputs[1] = out
    graph.nodes.append(gs.Node(
        "DequantizeLinear", name(f"{base}_DequantizeLinear"), {"axis": axis, "block_size": q.block},
        inputs=inputs, outputs=[out],
    ))


def _packed_constant(name: str, values: np.ndarray) -> gs.Constant:
    """A 4-bit constant, stored two values per byte as ONNX packs int4/uint4 (graphsurgeon would
    write one byte per value from the array itself)."""
    proto = onnx.numpy_helper.from_array(np.ascontiguousarray(values), name)
    return gs.Constant(name, LazyValues(proto))


def import_domain(graph: gs.Graph, domain: str, version: int) -> None:
    """Declare `domain` in the model's opset imports (once)."""
    imports = list(graph.import_domains or [])
    if not any(opset.domain == domain for opset in imports):
        imports.append(onnx.helper.make_opsetid(domain, version))
        graph.import_domains = imports
