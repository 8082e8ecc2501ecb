"""merge_consecutive_reshapes: `Reshape(P(x), s)` -> `Reshape(x, s)` for P in Reshape/Flatten/Squeeze/Unsqueeze,
and a Transpose that only moves size-1 axes.

Algebra: Reshape, Flatten, Squeeze and Unsqueeze only change a tensor's shape, never the order
or number of its elements. Neither does a Transpose whose axes of size other than 1 keep their
relative order (LSTM's output [seq, 1, batch, hidden] as [seq, batch, 1, hidden], say): which
axes are 1 must be known from its input's annotated shape, the others may be symbolic. `Reshape(t, s)` depends on `t` only through its elements and, for
entries `s[i] == 0` (with `allowzero=0`), through `t.shape[i]`; a `-1` entry depends only on
the element count, which P keeps. So when `s` is a constant, `Reshape(P(x), s)` equals
`Reshape(x, s')` where `s'` is `s` with each copied dimension (`0`) replaced by the size of P's
output at that axis. That size must be known: from P's output shape, or from P's own constant
target shape when P is a Reshape; otherwise the pair is left alone. A copied size of 0 is not
resolved either (a literal 0 would read as "copy" again).

Since P's input may itself come from a shape-only op, the Reshape reads the start of the whole
chain of Reshape/Flatten/Squeeze/Unsqueeze nodes (found once per tensor and remembered, so the
sweep stays linear), keeping its `allowzero`. Chain nodes are removed once nothing else reads
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.edit import GraphEdit, ModelEdit, const_ints, dims_of
from iropt.ir.graph import is_op
from iropt.ir.layout_ops import perm_of
from iropt.ir.model import Model

_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


@register_pass("merge_consecutive_reshapes")
@dataclass(kw_only=True)
class MergeConsecutiveReshapes(Pass):
    """Make a Reshape read past a preceding Reshape/Flatten/Squeeze/Unsqueeze (or a Transpose of
    size-1 axes) when that is exact.

    Stats: `merged` (Reshapes rewired to read the earlier op's input).
    """

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        edit = ModelEdit(model)
        merged = 0
        for graph in edit.graphs:
            sweep = edit.sweep(graph)
            starts = _ChainStarts(sweep)
            for node in sweep.nodes():
                if sweep.alive(node) and is_op(node, "Reshape") and len(node.inputs) == 2:
                    merged += _merge(edit, sweep, starts, node)
            sweep.finish()
        return PassResult.from_stats(merged=merged)


class _ChainStarts:
    """The tensor a chain of shape-only ops starts from, remembered per tensor."""

    def __init__(self, sweep: GraphEdit) -> None:
        self._sweep = sweep
        # id(tensor) -> (tensor, start); the tensor is kept so its id cannot be reused.
        self._memo: dict[int, tuple[gs.Tensor, gs.Tensor]] = {}

    def of(self, tensor: gs.Tensor) -> gs.Tensor:
        path = []
        while id(tensor) not in self._memo:
            node = _shape_only_producer(self._sweep, tensor)
            if node is None or not node.inputs:
                self._memo[id(tensor)] = (tensor, tensor)
                break
            path.append(tensor)
            tensor = node.inputs[0]
        start = self._memo[id(tensor)][1]
        for visited in path:
            self._memo[id(visited)] = (visited, start)
        return start


def _shape_only_producer(sweep: GraphEdit, tensor: gs.Tensor) -> gs.Node | None:
    """The producer of `tensor` when it changes only the shape of its input, else None."""
    node = sweep.producer(tensor, *_SHAPE_OPS, "Transpose")
    if node is not None and is_op(node, "Transpose") and not _keeps_element_order(node):
        return None
    return node


def _keeps_element_order(transpose: gs.Node) -> bool:
    """True when the Transpose moves only axes of size 1: the elements stay in the same order."""
    dims = dims_of(transpose.inputs[0]) if transpose.inputs else None
    perm = perm_of(transpose, None if dims is None else len(dims))
    if dims is None or perm is None or len(perm) != len(dims):
        return False
    moved = [axis for axis in perm if dims[axis] != 1]
    return moved == sorted(moved)


def _merge(edit: ModelEdit, sweep: GraphEdit, starts: _ChainStarts, reshape: gs.Node) -> bool:
    first = _shape_only_producer(sweep, reshape.inputs[0])
    if first is None or not first.inputs:
        return False
    shape = const_ints(reshape.inputs[1])
    if shape is None:
        return False
    if int(reshape.attrs.get("allowzero", 0)) == 0 and 0 in shape:
        resolved = _resolve_copies(first, shape)
        if resolved is None:
            return False
        base = f"{reshape.name or reshape.outputs[0].name}_shape"
        sweep.set_input(reshape, 1, edit.int64_constant(base, resolved))
    sweep.set_input(reshape, 0, starts.of(first.inputs[0]))
    _remove_dead_chain(sweep, first)
    return True


def _remove_dead_chain(sweep: GraphEdit, node: gs.Node | None) -> None:
    """Remove `node` and then its shape-op predecessors while nothing else reads them."""
    while node is not None:
        data = node.inputs[0]
        if not sweep.remove_if_dead(node):
            return
        node = _shape_only_producer(sweep, data)


def _resolve_copies(first: gs.Node, shape: list[int]) -> list[int] | None:
    """`shape` with each 0 ("copy this axis") replaced by the size of `first`'s output there."""
    sizes = _known_sizes(first)
    resolved = []
    for axis, size in enumerate(shape):
        if size == 0:
            known = sizes[axis] if axis < len(sizes) else None
            if known is None or known == 0:
                return None
            size = known
        resolved.append(size)
    return resolved


def _known_sizes(first: gs.Node) -> list[int | None]:
    """Per-axis sizes of `first`'s output, from its annotated shape or its constant target shape."""
    dims = dims_of(first.outputs[0])
    target = const_ints(first.inputs[1]) if is_op(first, "Reshape") and len(first.inputs) == 2 else None
    if target is None:
        return dims or []
    if dims is None or len(dims) != len(target):
        dims = [None] * len(target)
    # A positive target entry is that axis's size whatever `allowzero` says.
    return [d if d is not None else (t if t > 0 else None) for d, t in zip(dims, target, strict=True)]
