"""Embedding tables stored in int8 rows or 4-bit blocks: Gather over a large constant table.

`y = Gather(table, ids)` with a constant float `table [V, D]` becomes, in int8 (any runtime),

```
rows  = Gather(table_q, ids)            # int8 [..., D], table_q = round(table / s[v]) per row
scale = Gather(s, ids)                  # float [..., 1]
y     = Cast(rows, float) * scale
```

Only the rows looked up are converted, so the float table never exists at run time and the
stored table is a quarter of its float size (plus one float per row). Each row has its own
symmetric scale `max|row| / 127`: rows of an embedding differ in norm by orders of magnitude
(frequent and rare tokens), which one scale per table would crush. The activations are plain
integer lookups, so no int8 dot product and no saturation is involved.

In 4 bits (ONNX Runtime), each row is cut into blocks of `block` values along D with a scale
(and a zero point) per block, the codes of `iropt.compress.quant.blockwise`, and the lookup is
one `com.microsoft.GatherBlockQuantized` node (`bits=4`, `gather_axis=0`, `quantize_axis=1`):
data `uint8 [V, D / 2]` (two codes per byte, low nibble first), scales `[V, blocks]`, zero
points packed the same way `[V, ceil(blocks / 2)]`, omitted when symmetric (the kernel's
default for uint8 data is 8, the symmetric zero point). The table is an eighth of its float
size plus its scales. A table with an odd D (the codes cannot be packed in pairs) stays int8.

A table qualifies when every consumer is a Gather on axis 0 and it has at least `min_elements`
values. A table also read by another node (tied to an output projection) stays float, unless
that node was quantized first (a Gemm/MatMul reading the table as its constant weight gets its
own quantized copy), after which only Gathers read it. Where that node became a MatMulNBits
whose B holds the table's own 4-bit codes (a Gemm with transB, rounded to nearest in the same
blocks), the Gathers read those bytes instead of a second copy: B is `[V, blocks, block / 2]`,
so the lookup is GatherBlockQuantized with `quantize_axis=2` (scales `[V, blocks, 1]`)
followed by a Reshape of `[..., blocks, block]` to `[..., D]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.compress.quant.blockwise import pack_nibbles, quantize_rtn
from iropt.compress.quant.params import weight_params
from iropt.compress.quant.placement import node_key, node_label
from iropt.compress.quant.rewrite import names_for
from iropt.compress.quant.weight_only import MS_DOMAIN, PackedRows, import_domain
from iropt.ir.graph import FreshNames, constant_value, is_op

EmbeddingBits = Literal[8, 4]

# Below this a table is small enough that its float size does not matter (64Ki values = 256 KiB).
MIN_EMBEDDING_ELEMENTS = 64 * 1024


@dataclass(frozen=True)
class EmbeddingCandidate:
    node: gs.Node
    key: str
    label: str


def embedding_candidates(
    graph: gs.Graph, excluded: Callable[[gs.Node, str], bool], min_elements: int = MIN_EMBEDDING_ELEMENTS
) -> list[EmbeddingCandidate]:
    """Gather nodes reading rows of a large constant float table that only Gathers read."""
    found = []
    for index, node in enumerate(graph.nodes):
        key = node_key(index)
        if not is_op(node, "Gather") or excluded(node, key) or int(node.attrs.get("axis", 0)) != 0:
            continue
        table = node.inputs[0]
        value = constant_value(table)
        if value is None or value.dtype != np.float32 or value.ndim != 2 or value.size < min_elements:
            continue
        if constant_value(node.inputs[1]) is not None:
            continue  # constant indices: folding handles it
        if all(is_op(c, "Gather") and int(c.attrs.get("axis", 0)) == 0 and c.inputs[0] is table for c in table.outputs):
            found.append(EmbeddingCandidate(node, key, node_label(node, index)))
    return found


@dataclass(frozen=True)
class EmbeddingFormat:
    """How tables are stored: int8 rows, or 4-bit blocks of `block` values (symmetric or not)."""

    bits: EmbeddingBits = 8
    block: int = 32
    symmetric: bool = True


def quantize_embeddings(
    graph: gs.Graph,
    candidates: list[EmbeddingCandidate],
    fmt: EmbeddingFormat,
    shared: Mapping[str, PackedRows] | None = None,
) -> int:
    """Rewrite `candidates` in place; returns the number of tables stored quantized. `shared`:
    4-bit codes of tables already stored for a MatMulNBits (by table name), read in place."""
    name = names_for(graph)
    tables: dict[int, Callable[[gs.Node], None]] = {}
    for candidate in candidates:
        table = candidate.node.inputs[0]
        if id(table) not in tables:
            tables[id(table)] = _table_rewriter(graph, name, table, fmt, (shared or {}).get(table.name))
        tables[id(table)](candidate.node)
    if any(is_op(node, "GatherBlockQuantized") for node in graph.nodes):
        import_domain(graph, MS_DOMAIN, 1)
    return len(tables)


def _table_rewriter(
    graph: gs.Graph, name: FreshNames, table: gs.Tensor, fmt: EmbeddingFormat, shared: PackedRows | None
) -> Callable[[gs.Node], None]:
    """Quantize `table` once; the function returned rewrites one Gather of it."""
    value = constant_value(table)
    assert value is not None
    if fmt.bits == 4 and shared is not None and _can_share(table, shared, fmt):
        inputs = _shared_inputs(name, table.name, shared)
        return lambda node: _rewrite_shared(graph, name, node, inputs, fmt.block, value.shape[1])
    if fmt.bits == 4 and value.shape[1] % 2 == 0:
        inputs = _4bit_table(name, table.name, value, fmt)
        return lambda node: _rewrite_4bit(graph, name, node, inputs, fmt.block)
    codes, scales = _int8_table(name, table.name, value)
    return lambda node: _rewrite_int8(graph, name, node, codes, scales)


def _int8_table(name: FreshNames, table: str, value: np.ndarray) -> tuple[gs.Constant, gs.Constant]:
    codes, params = weight_params(value, 0)
    scales = params.scale.reshape(-1, 1).astype(np.float32)
    return gs.Constant(name(f"{table}_int8"), codes), gs.Constant(name(f"{table}_row_scale"), scales)


def _4bit_table(name: FreshNames, table: str, value: np.ndarray, fmt: EmbeddingFormat) -> list[gs.Constant]:
    """GatherBlockQuantized's data, scales and (with zero points) zero points for `value [V, D]`."""
    q = quantize_rtn(value.T, fmt.block, fmt.symmetric)  # blocks along D, one column per row of the table
    inputs = [
        gs.Constant(name(f"{table}_q4"), np.ascontiguousarray(pack_nibbles(q.codes.T))),
        gs.Constant(name(f"{table}_block_scales"), np.ascontiguousarray(q.scale.T, dtype=np.float32)),
    ]
    if not fmt.symmetric:
        zeros = q.zero.T
        if zeros.shape[1] % 2:
            zeros = np.concatenate([zeros, np.zeros((zeros.shape[0], 1), dtype=np.uint8)], axis=1)
        inputs.append(gs.Constant(name(f"{table}_block_zero_points"), np.ascontiguousarray(pack_nibbles(zeros))))
    return inputs


def _can_share(table: gs.Tensor, shared: PackedRows, fmt: EmbeddingFormat) -> bool:
    """Whether the Gathers of `table` can read `shared`: the same codes as the table's own (same
    blocks), and indices of known rank (the Reshape after the lookup keeps their dimensions)."""
    same_codes = shared.codes.block == fmt.block and shared.codes.symmetric == fmt.symmetric
    return same_codes and all(gather.inputs[1].shape is not None for gather in table.outputs)


def _shared_inputs(name: FreshNames, table: str, shared: PackedRows) -> list[gs.Constant]:
    """GatherBlockQuantized's inputs over MatMulNBits' B: scales and zero points `[V, blocks, 1]`
    (one block along the last axis of each `[blocks, block / 2]` row)."""
    q = shared.codes
    inputs = [shared.data, gs.Constant(name(f"{table}_block_scales"), np.ascontiguousarray(q.scale.T[:, :, None]))]
    if not q.symmetric:
        inputs.append(gs.Constant(name(f"{table}_block_zero_points"), np.ascontiguousarray(q.zero.T[:, :, None])))
    return inputs


def _rewrite_shared(
    graph: gs.Graph, name: FreshNames, node: gs.Node, inputs: list[gs.Constant], block: int, width: int
) -> None:
    ids, output, base = _detach(graph, node)
    blocks = gs.Variable(name(f"{base}_blocks"), dtype=np.float32)
    # Reshape's 0 keeps a dimension of its input: the indices' dimensions, then the row width.
    shape = gs.Constant(name(f"{base}_row_shape"), np.array([0] * len(ids.shape) + [width], dtype=np.int64))
    graph.nodes.extend([
        gs.Node(
            "GatherBlockQuantized", name(f"{base}_GatherBlockQuantized"),
            {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 2},
            inputs=[inputs[0], ids, *inputs[1:]], outputs=[blocks], domain=MS_DOMAIN,
        ),
        gs.Node("Reshape", name(f"{base}_Reshape"), inputs=[blocks, shape], outputs=[output]),
    ])


def _detach(graph: gs.Graph, node: gs.Node) -> tuple[gs.Tensor, gs.Tensor, str]:
    """Remove `node` from the graph; returns its indices, its output and a base for new names."""
    ids, output = node.inputs[1], node.outputs[0]
    base = node.name or output.name
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    return ids, output, base


def _rewrite_4bit(graph: gs.Graph, name: FreshNames, node: gs.Node, inputs: list[gs.Constant], block: int) -> None:
    ids, output, base = _detach(graph, node)
    graph.nodes.append(gs.Node(
        "GatherBlockQuantized", name(f"{base}_GatherBlockQuantized"),
        {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
        inputs=[inputs[0], ids, *inputs[1:]], outputs=[output], domain=MS_DOMAIN,
    ))


def _rewrite_int8(graph: gs.Graph, name: FreshNames, node: gs.Node, codes: gs.Constant, scales: gs.Constant) -> None:
    ids, output, base = _detach(graph, node)
    rows = gs.Variable(name(f"{base}_rows_int8"), dtype=np.int8)
    row_scale = gs.Variable(name(f"{base}_row_scale"), dtype=np.float32)
    rows_float = gs.Variable(name(f"{base}_rows_float"), dtype=np.float32)
    graph.nodes.extend([
        gs.Node("Gather", name(f"{base}_Gather_int8"), {"axis": 0}, inputs=[codes, ids], outputs=[rows]),
        gs.Node("Gather", name(f"{base}_Gather_scale"), {"axis": 0}, inputs=[scales, ids], outputs=[row_scale]),
        gs.Node("Cast", name(f"{base}_Cast"), {"to": onnx.TensorProto.FLOAT}, inputs=[rows], outputs=[rows_float]),
        gs.Node("Mul", name(f"{base}_Mul"), inputs=[rows_float, row_scale], outputs=[output]),
    ])
