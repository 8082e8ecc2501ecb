"""infer_shapes: annotate every tensor with the dtype and shape that ONNX shape inference derives.

Runs `onnx.shape_inference` (not strict, with data propagation, so shapes computed by
Shape/Gather/Concat chains become concrete) on the exported model and copies what it learned
back onto the graphsurgeon tensors of the graph and every subgraph. Nothing is computed
differently; later passes and back ends just see more static shapes.

Only knowledge is added: an unknown dtype or shape is filled in, and an unknown or symbolic
dimension becomes a number (or an unknown one a symbol of the model's own, never one that
inference invented: see `_INVENTED_SYMBOL`); a known dimension is never replaced,
and a shape whose rank disagrees with the inferred one is left as declared. A second run
therefore learns nothing and reports `changed=False`, so the pass can sit in a fixpoint block.

Inference reads element types and dims, never weights: the model is exported with its large
tensors as type and dims only (`iropt.io.stream.export_without_data`), so a run costs about
the same for a model of 500 MB of weights as for one of 5 MB. What is still past the 2 GB
protobuf limit is inferred through a temporary file (`infer_shapes_path`, with the tensors as
external data). When ONNX shape inference raises, the
model is left as it was, a warning is logged and the `failed` statistic is 1; in non-strict
mode that is rare (an op it has no schema for, such as a custom op, merely stays unannotated).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.infra.registry import register_pass
from iropt.io.save import spilled_model_file
from iropt.io.stream import export_without_data
from iropt.ir.graph import iter_graphs
from iropt.ir.model import EXTERNAL_DATA_THRESHOLD, Model

# ONNX shape inference names a dimension it cannot name from the model `unk__N`. Such names are
# not written: they are not part of the model's interface, and ONNX Runtime reads two equal
# names as equal sizes and then fuses Add + LayerNormalization into SkipLayerNormalization,
# which its CPU kernels run slower (bench/RESULTS.md, "ort_latency"). The dimension stays unknown.
_INVENTED_SYMBOL = "unk__"

# Above this many bytes of tensor data the model cannot be serialized in memory for inference.
IN_MEMORY_LIMIT = EXTERNAL_DATA_THRESHOLD

Shape = list[Any] | None


@register_pass("infer_shapes")
@dataclass(kw_only=True)
class InferShapes(Pass):
    """Fill in tensor dtypes and shapes from ONNX shape inference (with data propagation)."""

    data_prop: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if _fully_annotated(model.graph):
            return PassResult.from_stats(inferred=0, refined=0)
        try:
            inferred = _infer(export_without_data(model), self.data_prop, ctx.work_dir)
        except Exception as error:  # onnx raises several unrelated types (InferenceError, ValueError...)
            ctx.log.warning(
                "infer_shapes: ONNX shape inference failed, the model is left unannotated: %s: %s",
                type(error).__name__,
                error,
            )
            return PassResult(changed=False, stats={"failed": 1})
        learned = _Learned()
        _apply(model.graph, inferred.graph, learned)
        return PassResult.from_stats(inferred=learned.inferred, refined=learned.refined)


@dataclass
class _Learned:
    """Tensors whose dtype/shape went from unknown to known, and shapes that got more concrete."""

    inferred: int = 0
    refined: int = 0


def _infer(proto: onnx.ModelProto, data_prop: bool, work_dir: Path | None) -> onnx.ModelProto:
    if proto.ByteSize() <= IN_MEMORY_LIMIT:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=data_prop)
    return _infer_via_file(proto, data_prop, work_dir)


def _infer_via_file(proto: onnx.ModelProto, data_prop: bool, work_dir: Path | None) -> onnx.ModelProto:
    """Shape inference for models over the protobuf limit: tensors go to an external file."""
    with spilled_model_file(proto, work_dir) as source:
        target = source.with_name("inferred.onnx")
        onnx.shape_inference.infer_shapes_path(
            str(source), str(target), strict_mode=False, data_prop=data_prop
        )
        # Only the annotations are needed: leave the (large) tensor data on disk.
        return onnx.load_model(str(target), load_external_data=False)


def _apply(graph: gs.Graph, proto: onnx.GraphProto, learned: _Learned) -> None:
    """Copy inferred annotations of `proto` onto the tensors that `graph` defines, recursively.

    graphsurgeon exports nodes in list order, so the n-th node of `graph` is the n-th of `proto`
    and subgraphs pair up by attribute name.
    """
    infos: dict[str, onnx.ValueInfoProto] = {}
    for info in [*proto.value_info, *proto.input, *proto.output]:
        infos[info.name] = info
    for tensor in _defined_tensors(graph):
        info = infos.get(tensor.name)
        if info is not None and info.type.ByteSize() > 0:
            _merge(tensor, OnnxImporter.import_tensor(info), learned)
    for node, node_proto in zip(graph.nodes, proto.node, strict=True):
        for attr in node_proto.attribute:
            value = node.attrs.get(attr.name)
            if attr.type == onnx.AttributeProto.GRAPH and isinstance(value, gs.Graph):
                _apply(value, attr.g, learned)
            elif attr.type == onnx.AttributeProto.GRAPHS and isinstance(value, list):
                for sub, sub_proto in zip(value, attr.graphs, strict=True):
                    _apply(sub, sub_proto, learned)


def _fully_annotated(graph: gs.Graph) -> bool:
    """True when every tensor of every graph has a dtype and a shape of known sizes: inference
    could add nothing, and is skipped (in a fixpoint round on a statically shaped model, say)."""
    for subgraph in iter_graphs(graph):
        for tensor in _defined_tensors(subgraph):
            shape = tensor.shape
            if tensor.dtype is None or shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
                return False
    return True


def _defined_tensors(graph: gs.Graph) -> Iterator[gs.Variable]:
    """The variables this graph owns: its inputs, its nodes' outputs and its outputs."""
    for tensor in [*graph.inputs, *(t for node in graph.nodes for t in node.outputs), *graph.outputs]:
        # Outer-scope tensors a subgraph merely returns are annotated in their own scope.
        if isinstance(tensor, gs.Variable) and tensor.name:
            yield tensor


def _merge(tensor: gs.Variable, found: gs.Tensor, learned: _Learned) -> None:
    """Add what `found` knows and `tensor` does not; never overwrite known facts."""
    new_dtype = getattr(found, "dtype", None)
    new_shape = getattr(found, "shape", None)
    if new_shape is not None:
        new_shape = [None if _invented(d) else d for d in new_shape]
    gained = refined = False
    if tensor.dtype is None and new_dtype is not None:
        tensor.dtype = new_dtype
        tensor.type = found.type
        gained = True
    if new_shape is not None and tensor.shape is None:
        tensor.shape = list(new_shape)
        gained = True
    elif new_shape is not None:
        merged = _merge_dims(list(tensor.shape), list(new_shape))
        if merged is not None and merged != list(tensor.shape):
            tensor.shape = merged
            refined = True
    if gained:
        learned.inferred += 1
    elif refined:
        learned.refined += 1


def _merge_dims(old: list[Any], new: list[Any]) -> Shape:
    """Per dimension: a number beats a symbol, a symbol beats unknown; None on a rank mismatch."""
    if len(old) != len(new):
        return None
    return [_better_dim(a, b) for a, b in zip(old, new, strict=True)]


def _better_dim(old: Any, new: Any) -> Any:
    if isinstance(old, int):
        return old
    if isinstance(new, int):
        return new
    return old if old is not None else new


def _invented(dim: Any) -> bool:
    return isinstance(dim, str) and dim.startswith(_INVENTED_SYMBOL)
