"""Embedding tables stored in int8, one scale per row: Gather over a large constant table.

`y = Gather(table, ids)` with a constant float `table [V, D]` becomes

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

A table qualifies when every consumer is a Gather on axis 0 (a table tied to an output
projection stays float) and it has at least `min_elements` values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.compress.quant.params import weight_params
from iropt.compress.quant.placement import node_key, node_label
from iropt.compress.quant.rewrite import names_for
from iropt.ir.graph import FreshNames, constant_value, is_op

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


def quantize_embeddings(graph: gs.Graph, candidates: list[EmbeddingCandidate]) -> int:
    """Rewrite `candidates` in place; returns the number of tables stored in int8."""
    name = names_for(graph)
    tables: dict[int, tuple[gs.Constant, gs.Constant]] = {}
    for candidate in candidates:
        table = candidate.node.inputs[0]
        if id(table) not in tables:
            tables[id(table)] = _int8_table(name, table)
        _rewrite(graph, name, candidate.node, *tables[id(table)])
    return len(tables)


def _int8_table(name: FreshNames, table: gs.Tensor) -> tuple[gs.Constant, gs.Constant]:
    value = constant_value(table)
    assert value is not None
    codes, params = weight_params(value, 0)
    scales = params.scale.reshape(-1, 1).astype(np.float32)
    return gs.Constant(name(f"{table.name}_int8"), codes), gs.Constant(name(f"{table.name}_row_scale"), scales)


def _rewrite(graph: gs.Graph, name: FreshNames, node: gs.Node, codes: gs.Constant, scales: gs.Constant) -> None:
    ids, output = node.inputs[1], node.outputs[0]
    base = node.name or output.name
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    rows = gs.Variable(name(f"{base}_rows_int8"), dtype=np.int8)
    row_scale = gs.Variable(name(f"{base}_row_scale"), dtype=np.float32)
    rows_float = gs.Variable(name(f"{base}_rows_float"), dtype=np.float32)
    graph.nodes.extend([
        gs.Node("Gather", name(f"{base}_Gather_int8"), {"axis": 0}, inputs=[codes, ids], outputs=[rows]),
        gs.Node("Gather", name(f"{base}_Gather_scale"), {"axis": 0}, inputs=[scales, ids], outputs=[row_scale]),
        gs.Node("Cast", name(f"{base}_Cast"), {"to": onnx.TensorProto.FLOAT}, inputs=[rows], outputs=[rows_float]),
        gs.Node("Mul", name(f"{base}_Mul"), inputs=[rows_float, row_scale], outputs=[output]),
    ])
