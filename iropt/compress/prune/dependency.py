"""Channel dependency analysis: which channels of a graph must be removed together.

Every output channel of a producer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) is
an *atom*. Each tensor downstream carries a channel map: its channel axis and, per position on that
axis, the atom it holds. Walking the graph in order, every op either

- passes the map through (activations, BatchNormalization, pooling, Resize, Pad, a Transpose that
  moves the axis, a Reshape or Flatten that keeps it or merges it with trailing axes),
- *joins* maps: Add/Sub/Mul/Max/... of two mapped tensors ties their atoms position by position
  (residual streams, SE gates); Concat appends maps; Split and Slice cut them,
- *consumes* the map (the input channels of a weighted op, whose weight columns follow),
- or cannot say where channels go: then every atom it reads is frozen, with the reason.

Tied atoms form a union-find component, a *unit*: the channels removed together. Units whose
channels share producers form a *group* (a residual stream is one group of many units). Units
reaching a graph output, an unknown op, LayerNormalization over the channel axis and the like are
frozen, and their reasons go to the report.

Per-channel constants met on the way (BatchNormalization parameters, a per-channel Mul/Add
constant, a depthwise Conv's weight, PRelu slopes) are *holders*: sliced with the map. Shape
constants that count channels (Split sizes, Slice bounds, a Reshape or Resize target) are *edits*.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.compress.prune.layout import WeightedNode, weighted_node
from iropt.ir.graph import constant_value, is_op
from iropt.ir.model import Model

UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Mish", "Identity", "Dropout", "Neg", "Abs", "Sqrt", "Exp",
    "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Cast", "Sin", "Cos", "ThresholdedRelu",
})
SPATIAL_OPS = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Upsample",
})
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"})
# Ops whose input 0 is normalized per channel, with per-channel parameters at these inputs.
CHANNEL_PARAM_OPS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}

Shape = tuple[int | None, ...]


class UnionFind:
    """Atoms (int ids) merged into components; a component may carry the reason it is frozen."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, atom: int) -> int:
        root = atom
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[atom] != root:
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))

    def freeze(self, atoms: Iterable[int], reason: str) -> None:
        for atom in atoms:
            self.frozen.setdefault(self.find(int(atom)), reason)

    def reason(self, atom: int) -> str | None:
        return self.frozen.get(self.find(atom))


@dataclass
class ChannelMap:
    """The channel axis of a tensor (non-negative, in a tensor of `rank`) and the atom per position."""

    axis: int
    rank: int
    atoms: np.ndarray


@dataclass
class Producer:
    """A weighted node whose output channels are atoms."""

    layout: WeightedNode
    atoms: np.ndarray


@dataclass
class Consumer:
    """A weighted node whose input channels (weight columns along `in_axis`) follow `atoms`."""

    layout: WeightedNode
    atoms: np.ndarray


@dataclass
class Holder:
    """A per-channel constant at `node.inputs[input_index]`, sliced along `axis` with `atoms`."""

    node: gs.Node
    input_index: int
    axis: int
    atoms: np.ndarray


@dataclass
class Edit:
    """A shape constant that counts channels.

    kind `dim`: entry `entry` of `node.inputs[input_index]` becomes the kept count of `pieces[0]`;
    kind `split`: the split sizes become the kept counts of each piece;
    kind `slice`: `pieces` = (the input map, the sliced range as a 2-element array);
    kind `group`: a depthwise Conv's `group` attribute becomes the kept count of `pieces[0]`.
    """

    kind: str
    node: gs.Node
    input_index: int
    entry: int
    pieces: list[np.ndarray]


@dataclass
class Unit:
    """Channels removed together: a component of tied atoms."""

    root: int
    atoms: list[int]
    producers: list[tuple[gs.Node, int]] = field(default_factory=list)  # (node, output channel)
    reason: str | None = None


@dataclass
class Group:
    """Units that share producers (a layer's channels, or a whole residual stream)."""

    name: str
    units: list[Unit]
    producers: list[gs.Node]

    @property
    def prunable(self) -> list[Unit]:
        return [unit for unit in self.units if unit.reason is None]

    @property
    def reasons(self) -> list[str]:
        return sorted({unit.reason for unit in self.units if unit.reason is not None})


@dataclass
class Analysis:
    """Everything the rewrite, the importance criteria and the reconstruction need."""

    uf: UnionFind
    maps: dict[str, ChannelMap]
    producers: list[Producer]
    consumers: list[Consumer]
    holders: list[Holder]
    edits: list[Edit]
    groups: list[Group]
    # Ops a channel map flows through unchanged (activations, pools, joins), with the map's atoms.
    passes: list[tuple[gs.Node, np.ndarray]] = field(default_factory=list)

    def keep_mask(self, atoms: np.ndarray, removed: set[int]) -> np.ndarray:
        return np.array([self.uf.find(int(a)) not in removed for a in atoms], dtype=bool)


def analyze(
    model: Model,
    *,
    shapes: dict[str, Shape] | None = None,
    exclude_nodes: Sequence[str] = (),
    exclude_op_types: Sequence[str] = (),
) -> Analysis:
    """The channel groups of `model`'s main graph."""
    walker = _Walker(model.graph, shapes if shapes is not None else static_shapes(model))
    walker.excluded = lambda node: node.op in exclude_op_types or any(
        fnmatch.fnmatchcase(node.name or "", pattern) for pattern in exclude_nodes
    )
    for node in model.graph.nodes:
        walker.visit(node)
    for tensor in model.graph.outputs:
        if tensor.name in walker.maps:
            walker.uf.freeze(walker.maps[tensor.name].atoms, f"reaches the graph output '{tensor.name}'")
    return Analysis(
        walker.uf, walker.maps, walker.producers, walker.consumers, walker.holders, walker.edits,
        _groups(walker.uf, walker.producers), walker.passes,
    )


def static_shapes(model: Model) -> dict[str, Shape]:
    """Tensor shapes from ONNX shape inference; unknown dimensions are None."""
    proto = model.to_onnx()
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:
        pass
    shapes: dict[str, Shape] = {}
    graph = proto.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type" or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _groups(uf: UnionFind, producers: list[Producer]) -> list[Group]:
    units: dict[int, Unit] = {}
    for atom in range(len(uf.parent)):
        root = uf.find(atom)
        unit = units.setdefault(root, Unit(root, []))
        unit.atoms.append(atom)
    for unit in units.values():
        unit.reason = uf.frozen.get(unit.root)
    linked = UnionFind()
    linked.new(len(producers))
    owner: dict[int, int] = {}
    for index, producer in enumerate(producers):
        for channel, atom in enumerate(producer.atoms):
            root = uf.find(int(atom))
            units[root].producers.append((producer.layout.node, channel))
            if root in owner:
                linked.union(owner[root], index)
            else:
                owner[root] = index
    members: dict[int, list[int]] = {}
    for index in range(len(producers)):
        members.setdefault(linked.find(index), []).append(index)
    groups = []
    for indices in members.values():
        nodes = [producers[i].layout.node for i in indices]
        roots = sorted({uf.find(int(a)) for i in indices for a in producers[i].atoms})
        groups.append(Group(nodes[0].name or nodes[0].op, [units[r] for r in roots], nodes))
    return groups


def _rank(shape: Shape | None) -> int | None:
    return None if shape is None else len(shape)


def _is_head_split(inner: Shape, heads: int | None, trailing: Shape, channels: int) -> bool:
    """[.., C] -> [.., H, C / H]: the last axis split into heads of equal width."""
    return not inner and len(trailing) == 1 and bool(heads) and bool(trailing[0]) and \
        (heads or 0) * (trailing[0] or 0) == channels


def _ints(tensor: gs.Tensor) -> list[int] | None:
    value = constant_value(tensor)
    return None if value is None else [int(v) for v in np.asarray(value).ravel()]


class _Walker:
    """Visits nodes in graph order and applies the rule of each op."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, Shape]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.uf = UnionFind()
        self.maps: dict[str, ChannelMap] = {}
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.holders: list[Holder] = []
        self.edits: list[Edit] = []
        self.passes: list[tuple[gs.Node, np.ndarray]] = []
        self.excluded = lambda node: False

    # --- helpers -----------------------------------------------------------------------------

    def shape(self, tensor: gs.Tensor) -> Shape | None:
        value = constant_value(tensor)
        if value is not None:
            return tuple(value.shape)
        if tensor.name in self.shapes:
            return self.shapes[tensor.name]
        return tuple(tensor.shape) if tensor.shape is not None and all(
            isinstance(d, int) or d is None for d in tensor.shape) else None

    def refuse(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            if tensor.name in self.maps:
                self.uf.freeze(self.maps[tensor.name].atoms, f"{node.op} '{node.name}': {reason}")

    def pass_through(self, node: gs.Node, cmap: ChannelMap, outputs: Sequence[gs.Tensor] | None = None) -> None:
        self.passes.append((node, cmap.atoms))
        for tensor in outputs if outputs is not None else node.outputs:
            if tensor.name:
                self.maps[tensor.name] = cmap

    # --- dispatch ----------------------------------------------------------------------------

    def visit(self, node: gs.Node) -> None:
        mapped = [t for t in node.inputs if t.name in self.maps]
        layout = weighted_node(node)
        if layout is not None:
            self.weighted(node, layout)
            return
        if not mapped:
            return
        if node.domain not in (None, "", "ai.onnx"):
            self.refuse(node, "custom op: its channel mapping is unknown")
            return
        rule = _RULES.get(node.op)
        if rule is None:
            self.refuse(node, "its channel mapping is unknown")
            return
        rule(self, node)

    # --- producers and consumers -------------------------------------------------------------

    def weighted(self, node: gs.Node, layout: WeightedNode) -> None:
        source = self.maps.get(node.inputs[0].name)
        weight = layout.weight
        if is_op(node, "Conv") and layout.groups > 1:
            self.grouped_conv(node, layout, source)
            return
        if layout.groups > 1:
            self.refuse(node, f"grouped {node.op} (group={layout.groups}) is not pruned")
            self.new_space(node, layout, frozen=f"grouped {node.op} '{node.name}'")
            return
        if source is not None:
            expected = source.rank - 1 if is_op(node, "MatMul") else 1
            if source.axis != expected or len(source.atoms) != weight.shape[layout.in_axis]:
                self.refuse(node, "its input channels are not on the axis its weight reads")
            else:
                self.consumers.append(Consumer(layout, source.atoms))
        self.new_space(node, layout, frozen=f"excluded: '{node.name}'" if self.excluded(node) else None)

    def new_space(self, node: gs.Node, layout: WeightedNode, frozen: str | None) -> None:
        output = node.outputs[0]
        if is_op(node, "Gemm"):
            rank: int | None = 2
        elif is_op(node, "MatMul"):
            rank = _rank(self.shape(node.inputs[0]))
        else:
            rank = len(layout.weight.shape)
        if rank is None:
            return
        atoms = self.uf.new(layout.weight.shape[layout.out_axis])
        if frozen is not None:
            self.uf.freeze(atoms, frozen)
        axis = rank - 1 if is_op(node, "MatMul", "Gemm") else 1
        self.producers.append(Producer(layout, atoms))
        self.maps[output.name] = ChannelMap(axis, rank, atoms)

    def grouped_conv(self, node: gs.Node, layout: WeightedNode, source: ChannelMap | None) -> None:
        weight = layout.weight
        depthwise = weight.shape[1] == 1 and weight.shape[0] == layout.groups
        if source is not None and depthwise and source.axis == 1 and len(source.atoms) == layout.groups:
            # Depthwise: output channel c reads only input channel c; its weight and bias follow.
            self.holders.append(Holder(node, 1, 0, source.atoms))
            if layout.bias is not None:
                self.holders.append(Holder(node, 2, 0, source.atoms))
            self.edits.append(Edit("group", node, -1, 0, [source.atoms]))
            self.pass_through(node, source)
            return
        self.refuse(node, f"grouped Conv (group={layout.groups}) is not pruned")
        self.new_space(node, layout, frozen=f"output of grouped Conv '{node.name}' (group={layout.groups})")

    # --- pass-through ------------------------------------------------------------------------

    def unary(self, node: gs.Node) -> None:
        self.pass_through(node, self.maps[node.inputs[0].name])

    def spatial(self, node: gs.Node) -> None:
        if node.inputs[0].name not in self.maps:
            self.refuse(node, "a mapped tensor on a parameter input")
            return
        cmap = self.maps[node.inputs[0].name]
        if cmap.axis != 1:
            self.refuse(node, "pools over the channel axis")
            return
        self.pass_through(node, cmap, node.outputs[:1])

    def channel_params(self, node: gs.Node) -> None:
        cmap = self.maps.get(node.inputs[0].name)
        if cmap is None or cmap.axis != 1 or any(t.name in self.maps for t in node.inputs[1:]):
            self.refuse(node, "channels on an unexpected axis")
            return
        for index in CHANNEL_PARAM_OPS[node.op]:
            if index < len(node.inputs) and constant_value(node.inputs[index]) is None:
                self.refuse(node, f"parameter input {index} is not a constant")
                return
        for index in CHANNEL_PARAM_OPS[node.op]:
            if index < len(node.inputs):
                self.holders.append(Holder(node, index, 0, cmap.atoms))
        self.pass_through(node, cmap, node.outputs[:1])

    def layer_norm(self, node: gs.Node) -> None:
        cmap = self.maps.get(node.inputs[0].name)
        axis = int(node.attrs.get("axis", -1))
        if cmap is None or (axis % cmap.rank) <= cmap.axis:
            self.refuse(node, "LayerNormalization over the channel axis (its statistics would change)")
            return
        self.pass_through(node, cmap, node.outputs[:1])

    def softmax(self, node: gs.Node) -> None:
        cmap = self.maps[node.inputs[0].name]
        if int(node.attrs.get("axis", -1)) % cmap.rank == cmap.axis:
            self.refuse(node, "normalizes over the channel axis")
            return
        self.pass_through(node, cmap)

    def pad(self, node: gs.Node) -> None:
        cmap = self.maps.get(node.inputs[0].name)
        pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        if cmap is None or pads is None or axes is not None:
            self.refuse(node, "pads that are not a constant over all axes")
            return
        half = len(pads) // 2
        if pads[cmap.axis] != 0 or pads[cmap.axis + half] != 0:
            self.refuse(node, "pads the channel axis")
            return
        self.pass_through(node, cmap)

    def resize(self, node: gs.Node) -> None:
        cmap = self.maps.get(node.inputs[0].name)
        if cmap is None:
            self.refuse(node, "a mapped tensor on a parameter input")
            return
        sizes = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        if sizes is not None:
            if _ints(sizes) is None:
                self.refuse(node, "run-time sizes")
                return
            self.edits.append(Edit("dim", node, 3, cmap.axis, [cmap.atoms]))
        self.pass_through(node, cmap)

    def transpose(self, node: gs.Node) -> None:
        cmap = self.maps[node.inputs[0].name]
        perm = [int(p) for p in node.attrs.get("perm", range(cmap.rank - 1, -1, -1))]
        self.pass_through(node, ChannelMap(perm.index(cmap.axis), cmap.rank, cmap.atoms))

    # --- joins -------------------------------------------------------------------------------

    def binary(self, node: gs.Node) -> None:
        ranks = [self.maps[t.name].rank if t.name in self.maps else _rank(self.shape(t)) for t in node.inputs]
        if any(r is None for r in ranks):
            self.refuse(node, "an input of unknown rank")
            return
        out_rank = max(r for r in ranks if r is not None)
        first = next(self.maps[t.name] for t in node.inputs if t.name in self.maps)
        axis = first.axis + out_rank - first.rank
        size = len(first.atoms)
        for index, tensor in enumerate(node.inputs):
            rank = ranks[index]
            assert rank is not None
            dim = axis - (out_rank - rank)
            if tensor.name in self.maps:
                other = self.maps[tensor.name]
                if other.axis != dim or len(other.atoms) != size:
                    self.refuse(node, "joins tensors whose channels do not line up")
                    return
                for a, b in zip(first.atoms, other.atoms, strict=False):
                    self.uf.union(int(a), int(b))
                continue
            if dim < 0:
                continue  # broadcast over the channel axis
            shape = self.shape(tensor)
            extent = None if shape is None else shape[dim]
            if extent == 1:
                continue
            if extent == size and constant_value(tensor) is not None:
                self.holders.append(Holder(node, index, dim, first.atoms))
                continue
            self.refuse(node, "joined with a tensor whose channels are unknown")
            return
        self.pass_through(node, ChannelMap(axis, out_rank, first.atoms))

    def concat(self, node: gs.Node) -> None:
        first = next(self.maps[t.name] for t in node.inputs if t.name in self.maps)
        axis = int(node.attrs["axis"]) % first.rank
        if axis != first.axis:
            # Along another axis every input carries the same channels.
            if not all(t.name in self.maps for t in node.inputs):
                self.refuse(node, "concatenates mapped and unmapped tensors along a non-channel axis")
                return
            for tensor in node.inputs:
                for a, b in zip(first.atoms, self.maps[tensor.name].atoms, strict=False):
                    self.uf.union(int(a), int(b))
            self.pass_through(node, first)
            return
        parts = []
        for tensor in node.inputs:
            if tensor.name in self.maps and self.maps[tensor.name].axis == axis:
                parts.append(self.maps[tensor.name].atoms)
                continue
            shape = self.shape(tensor)
            if shape is None or shape[axis] is None or tensor.name in self.maps:
                self.refuse(node, "concatenates a tensor of unknown channel count")
                return
            fresh = self.uf.new(int(shape[axis]))  # type: ignore[arg-type]
            self.uf.freeze(fresh, f"Concat '{node.name}': channels from '{tensor.name}', not a producer")
            parts.append(fresh)
        self.pass_through(node, ChannelMap(axis, first.rank, np.concatenate(parts)))

    def split(self, node: gs.Node) -> None:
        cmap = self.maps[node.inputs[0].name]
        if node.inputs[0].name != next(t.name for t in node.inputs if t.name in self.maps):
            self.refuse(node, "a mapped tensor on a parameter input")
            return
        axis = int(node.attrs.get("axis", 0)) % cmap.rank
        if axis != cmap.axis:
            self.pass_through(node, cmap)
            return
        sizes = _ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        if sizes is None:
            self.refuse(node, "split sizes are not a constant input (an equal split or opset < 13)")
            return
        bounds = np.cumsum([0, *sizes])
        pieces = [cmap.atoms[bounds[i]:bounds[i + 1]] for i in range(len(node.outputs))]
        self.edits.append(Edit("split", node, 1, 0, pieces))
        for tensor, piece in zip(node.outputs, pieces, strict=False):
            self.maps[tensor.name] = ChannelMap(axis, cmap.rank, piece)

    def slice(self, node: gs.Node) -> None:
        cmap = self.maps.get(node.inputs[0].name)
        values = [_ints(t) if t.name else None for t in node.inputs[1:5]]
        if cmap is None or any(v is None for v in values[:2]):
            self.refuse(node, "run-time slice bounds")
            return
        starts, ends = values[0], values[1]
        assert starts is not None and ends is not None
        axes = values[2] if len(values) > 2 and values[2] is not None else list(range(len(starts)))
        steps = values[3] if len(values) > 3 and values[3] is not None else [1] * len(starts)
        axes = [a % cmap.rank for a in axes]
        if cmap.axis not in axes:
            self.pass_through(node, cmap)
            return
        entry = axes.index(cmap.axis)
        if steps[entry] != 1:
            self.refuse(node, "strided slice of the channel axis")
            return
        size = len(cmap.atoms)
        start, stop, _ = slice(starts[entry], ends[entry]).indices(size)
        self.edits.append(Edit("slice", node, 1, entry, [cmap.atoms, np.array([start, stop])]))
        self.pass_through(node, ChannelMap(cmap.axis, cmap.rank, cmap.atoms[start:stop]))

    # --- shape ops ---------------------------------------------------------------------------

    def flatten(self, node: gs.Node) -> None:
        cmap = self.maps[node.inputs[0].name]
        axis = int(node.attrs.get("axis", 1)) % max(cmap.rank, 1)
        shape = self.shape(node.inputs[0])
        if shape is None or axis > cmap.axis or any(d is None for d in shape[axis:]):
            self.refuse(node, "flattens the channel axis into the batch, or unknown dimensions")
            return
        outer = int(np.prod([d or 1 for d in shape[axis:cmap.axis]], dtype=np.int64))
        inner = int(np.prod([d or 1 for d in shape[cmap.axis + 1:]], dtype=np.int64))
        atoms = np.tile(np.repeat(cmap.atoms, inner), outer)
        self.pass_through(node, ChannelMap(1, 2, atoms))

    def reshape(self, node: gs.Node) -> None:
        cmap = self.maps.get(node.inputs[0].name)
        target = _ints(node.inputs[1])
        source, result = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if cmap is None or target is None or source is None or result is None:
            self.refuse(node, "Reshape with unknown shapes")
            return
        lead = source[:cmap.axis]
        inner = source[cmap.axis + 1:]
        if any(d is None for d in inner) or len(result) < cmap.axis + 1 or tuple(result[:cmap.axis]) != lead:
            self.refuse(node, "Reshape mixes channels with other axes")
            return
        inner_size = int(np.prod(inner, dtype=np.int64))  # type: ignore[arg-type]
        trailing = result[cmap.axis + 1:]
        if result[cmap.axis] == len(cmap.atoms) * inner_size and not trailing:
            atoms = np.repeat(cmap.atoms, inner_size)  # channel axis merged with trailing axes
        elif result[cmap.axis] == len(cmap.atoms) and None not in trailing and int(
                np.prod(trailing, dtype=np.int64)) == inner_size:  # type: ignore[arg-type]
            atoms = cmap.atoms  # the channel axis kept, trailing axes regrouped
        elif _is_head_split(inner, result[cmap.axis], trailing, len(cmap.atoms)):
            atoms = self.split_heads(cmap.atoms, int(result[cmap.axis] or 0))
        else:
            self.refuse(node, "Reshape splits or mixes the channel axis")
            return
        if target[cmap.axis] not in (0, -1):
            self.edits.append(Edit("dim", node, 1, cmap.axis, [atoms]))
        elif target[cmap.axis] == 0 and len(atoms) != len(cmap.atoms):
            self.refuse(node, "Reshape copies a dimension that changes")
            return
        self.pass_through(node, ChannelMap(cmap.axis, len(result), atoms))

    def split_heads(self, atoms: np.ndarray, heads: int) -> np.ndarray:
        """[.., H * Dh] -> [.., H, Dh]: the channels of one head become one unit, on the head axis."""
        blocks = atoms.reshape(heads, -1)
        for row in blocks:
            for atom in row[1:]:
                self.uf.union(int(row[0]), int(atom))
        return blocks[:, 0].copy()

    def squeeze_like(self, node: gs.Node) -> None:
        cmap = self.maps[node.inputs[0].name]
        source, result = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if source is None or result is None:
            self.refuse(node, "unknown shapes")
            return
        # The channel axis keeps its place among the non-unit axes before it.
        before = sum(1 for d in source[:cmap.axis] if d != 1)
        seen, axis = 0, None
        for index, dim in enumerate(result):
            if dim == len(cmap.atoms) and seen == before:
                axis = index
                break
            seen += dim != 1
        if axis is None:
            self.refuse(node, "removes or moves the channel axis")
            return
        self.pass_through(node, ChannelMap(axis, len(result), cmap.atoms))

    def reduce(self, node: gs.Node) -> None:
        cmap = self.maps[node.inputs[0].name]
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            axes = _ints(node.inputs[1])
        if axes is None:
            self.refuse(node, "reduces every axis")
            return
        axes = [int(a) % cmap.rank for a in axes]
        if cmap.axis in axes:
            self.refuse(node, "reduces over the channel axis")
            return
        keep = int(node.attrs.get("keepdims", 1))
        axis = cmap.axis if keep else cmap.axis - sum(1 for a in axes if a < cmap.axis)
        self.pass_through(node, ChannelMap(axis, cmap.rank if keep else cmap.rank - len(axes), cmap.atoms))

    def mapped_matmul(self, node: gs.Node) -> None:
        """A MatMul of two activations (attention): heads on a batch axis of both line up."""
        maps = [self.maps.get(t.name) for t in node.inputs[:2]]
        first, second = maps
        if first is None or second is None or first.rank != second.rank or first.axis != second.axis \
                or first.axis >= first.rank - 2 or len(first.atoms) != len(second.atoms):
            self.refuse(node, "MatMul between two activations on a non-batch axis")
            return
        for a, b in zip(first.atoms, second.atoms, strict=True):
            self.uf.union(int(a), int(b))
        self.pass_through(node, first)


_RULES = {
    **{op: _Walker.unary for op in UNARY_OPS},
    **{op: _Walker.spatial for op in SPATIAL_OPS},
    **{op: _Walker.binary for op in BINARY_OPS},
    **{op: _Walker.channel_params for op in CHANNEL_PARAM_OPS},
    **{op: _Walker.reduce for op in REDUCE_OPS},
    "LayerNormalization": _Walker.layer_norm,
    "Softmax": _Walker.softmax,
    "LogSoftmax": _Walker.softmax,
    "Pad": _Walker.pad,
    "Resize": _Walker.resize,
    "Transpose": _Walker.transpose,
    "Concat": _Walker.concat,
    "Split": _Walker.split,
    "Slice": _Walker.slice,
    "Flatten": _Walker.flatten,
    "Reshape": _Walker.reshape,
    "Squeeze": _Walker.squeeze_like,
    "Unsqueeze": _Walker.squeeze_like,
    "MatMul": _Walker.mapped_matmul,
}
