"""Renaming, on load, of subgraph names that shadow a name of an enclosing graph.

ONNX lets a subgraph (an If branch, a Loop or Scan body) declare a name that an enclosing graph
declares too: an If whose output is `y` and whose branches compute their own `y` is valid, and
ONNX Runtime runs it, resolving every use inside the subgraph to the subgraph's own value.
onnx-graphsurgeon keeps one tensor per name across scopes, so it would merge the two values and
change what the model computes. Giving the inner value a fresh name first removes the clash
without changing the model: a subgraph's inputs and outputs are matched by position, never by
name, so only names private to the subgraph change.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import onnx

from iropt.ir.graph import FreshNames


def unshadow(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with shadowing subgraph names renamed, and how many were renamed.

    The model is returned as it is when nothing shadows; otherwise a renamed copy is returned and
    `model` is left untouched.
    """
    if not _shadows(model.graph, frozenset()):
        return model, 0
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    fresh = FreshNames(_all_names(renamed.graph))
    return renamed, _unshadow(renamed.graph, frozenset(), fresh)


def _declared(graph: onnx.GraphProto) -> set[str]:
    """The names `graph` itself gives a value: inputs, initializers, node outputs."""
    names = {value.name for value in graph.input}
    names |= {tensor.name for tensor in graph.initializer}
    names |= {sparse.values.name for sparse in graph.sparse_initializer}
    names |= {name for node in graph.node for name in node.output}
    names.discard("")
    return names


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by `graph`'s nodes' attributes (one level down)."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield attribute.g
            yield from attribute.graphs


def _shadows(graph: onnx.GraphProto, outer: frozenset[str]) -> bool:
    subgraphs = list(_subgraphs(graph))
    if not outer and not subgraphs:  # a graph without subgraphs: nothing to collect names for
        return False
    declared = _declared(graph)
    if declared & outer:
        return True
    visible = outer | declared
    return any(_shadows(subgraph, visible) for subgraph in subgraphs)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name used anywhere in `graph` and its subgraphs (fresh names avoid them all)."""
    names = _declared(graph)
    names |= {value.name for value in (*graph.output, *graph.value_info)}
    names |= {name for node in graph.node for name in node.input}
    for subgraph in _subgraphs(graph):
        names |= _all_names(subgraph)
    return names


def _unshadow(graph: onnx.GraphProto, outer: frozenset[str], fresh: FreshNames) -> int:
    declared = _declared(graph)
    renames = {name: fresh(name) for name in sorted(declared & outer)}
    if renames:
        _rename(graph, renames)
        declared = _declared(graph)
    visible = outer | declared
    return len(renames) + sum(_unshadow(subgraph, visible, fresh) for subgraph in _subgraphs(graph))


def _rename(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Rename in `graph` every declaration and use of the keys of `renames`, and the uses in
    subgraphs that see them (a subgraph declaring the same name again has its own value)."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = renames.get(sparse.values.name, sparse.values.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for subgraph in _subgraphs(graph):
        redeclared = _declared(subgraph)
        seen = {old: new for old, new in renames.items() if old not in redeclared}
        if seen:
            _rename(subgraph, seen)
