"""Pattern rewrites: the API custom passes (and every built-in fusion) are written with.

A rewrite has three parts:

- a **pattern**: a small tree of `op(...)` nodes rooted at the *last* op, whose inputs are other
  `op(...)` patterns (the producer of that input), `const(...)` (a constant, captured as numpy),
  `tensor(...)` (anything, captured) or None (anything, not captured). Ops may require attribute
  values or predicates, declare `one_consumer=True` (the intermediate output feeds only the
  parent and is not a graph output), and be `commutative` (two inputs, tried in both orders).
  Inputs marked `optional=True` match an absent input too (captured as None);
- a **check** `check(match) -> str | None` for what a pattern cannot say: it returns the
  reason it refuses, or None;
- a **rewrite** `rewrite(match, graph)` that builds the replacement. New nodes are appended to
  `graph.nodes`; replaced nodes are left in place: the engine removes them once nothing reads
  them. A rewrite never renames a graph output: the replacement node writes the very tensor the
  replaced node wrote (`take_outputs`). Matched nodes may also be edited in place.

`RewritePass` applies a list of rules to a model and all of its subgraphs, counts applications
per rule, and runs in time linear in the graph: rules are indexed by the op type of their
root, every node is visited once, and after a rewrite only the nodes around it are re-visited
(a worklist), until no rule applies. A refusal explains itself: `explain(rules, node, graph)`
says, per rule, why it does not apply at `node` (e.g. "BatchNormalization.scale is not a
constant ('s')"); `apply_rules(..., record_refusals=True)` collects every refusal, and a
`RewritePass` logs them when its logger is at DEBUG level.

Worked example: replace division by a constant with multiplication by its reciprocal.

    from dataclasses import dataclass

    import onnx
    import onnx_graphsurgeon as gs

    from iropt import Model, PassContext, register_pass
    from iropt.rewrite import Match, RewritePass, RewriteRule, const, op, take_outputs, tensor

    class DivToMul(RewriteRule):
        name = "div_to_mul"
        pattern = op("Div", inputs=[tensor("x"), const("c")], name="div")

        def check(self, match: Match) -> str | None:
            if match.values["c"].dtype.kind != "f":
                return "Div.B is not floating point"
            return None

        def rewrite(self, match: Match, graph: gs.Graph) -> None:
            inverse = match.constant("inverse", 1 / match.values["c"])
            outputs = take_outputs(match.nodes["div"])  # the Mul writes the Div's output tensor
            graph.nodes.append(gs.Node("Mul", inputs=[match.tensors["x"], inverse], outputs=outputs))

    @register_pass("example_div_to_mul")
    @dataclass(kw_only=True)
    class DivToMulPass(RewritePass):
        \"\"\"Replace division by a floating-point constant with multiplication by its reciprocal.\"\"\"

        def rules(self) -> list[RewriteRule]:
            return [DivToMul()]

    model = Model.from_onnx(onnx.parser.parse_model('''
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) {
            c = Constant <value = float[1] {4.0}> ()
            y = Div(x, c)
        }'''))
    result = DivToMulPass().run(model, PassContext())
    assert result.stats == {"div_to_mul": 1}
    assert [n.op for n in model.graph.nodes] == ["Mul"]
"""

from __future__ import annotations

import abc
import collections
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from iropt.infra.pass_base import Pass, PassContext, PassResult
from iropt.ir.graph import FreshNames, constant_value, fresh_names, is_default_domain, is_op, iter_graphs
from iropt.ir.model import Model

__all__ = [
    "ConstPattern",
    "Match",
    "OpPattern",
    "Pattern",
    "Refusal",
    "RewriteError",
    "RewritePass",
    "RewriteReport",
    "RewriteRule",
    "TensorPattern",
    "apply_rules",
    "attribute",
    "const",
    "explain",
    "input_label",
    "op",
    "take_outputs",
    "tensor",
    "tensor_rank",
]

# --------------------------------------------------------------------------------------------
# Patterns


@dataclass(frozen=True)
class TensorPattern:
    """Any tensor; captured under `name` when given."""

    name: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class ConstPattern:
    """A constant tensor (initializer or Constant node); its value is captured under `name`."""

    name: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class OpPattern:
    """A node of one of `op_types` (in `domain`), with conditions on its inputs and attributes.

    - `inputs`: None accepts any inputs; a list matches position by position (an entry of None
      accepts anything there) and refuses a node with further, non-empty inputs.
    - `attrs`: attribute name -> required value, or predicate on the value. Both see the
      schema default when the attribute is absent (None when the schema has none). The first
      line of a predicate's docstring describes it in refusals ("must be 0 (inference mode)").
    - `name`: capture the node as `match.nodes[name]`.
    - `one_consumer` (for a producer): the tensor it feeds the parent is read by the parent
      alone and is not a graph output, so the producer may be rewritten or removed.
    - `commutative`: two inputs, tried in both orders.
    - `output` (for a producer): which of its outputs feeds the parent.
    """

    op_types: tuple[str, ...]
    inputs: tuple[Pattern | None, ...] | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    domain: str = ""
    one_consumer: bool = False
    commutative: bool = False
    output: int = 0

    def depth(self) -> int:
        """Op levels in the pattern (1 for a lone op): how far a rewrite's effects can reach."""
        below = [p.depth() for p in self.inputs or () if isinstance(p, OpPattern)]
        return 1 + max(below, default=0)

    def describe(self) -> str:
        return "/".join(self.op_types)


Pattern = Union[OpPattern, ConstPattern, TensorPattern]


def op(
    op_type: str | Sequence[str],
    inputs: Sequence[Pattern | None] | None = None,
    *,
    attrs: Mapping[str, Any] | None = None,
    name: str | None = None,
    domain: str = "",
    one_consumer: bool = False,
    commutative: bool = False,
    output: int = 0,
) -> OpPattern:
    """A pattern node; see `OpPattern`. `op_type` may be one type or several alternatives."""
    types = (op_type,) if isinstance(op_type, str) else tuple(op_type)
    if commutative and (inputs is None or len(inputs) != 2):
        raise ValueError(f"op({types[0]!r}): commutative patterns need exactly two inputs")
    return OpPattern(
        op_types=types,
        inputs=None if inputs is None else tuple(inputs),
        attrs=dict(attrs or {}),
        name=name,
        domain=_normal_domain(domain),
        one_consumer=one_consumer,
        commutative=commutative,
        output=output,
    )


def const(name: str | None = None, *, optional: bool = False) -> ConstPattern:
    """A constant input; `match.values[name]` holds its numpy value."""
    return ConstPattern(name, optional)


def tensor(name: str | None = None, *, optional: bool = False) -> TensorPattern:
    """Any input; `match.tensors[name]` holds it (None when optional and absent)."""
    return TensorPattern(name, optional)


# --------------------------------------------------------------------------------------------
# Matches, rules and refusals


@dataclass
class Match:
    """A successful pattern match: the captured nodes, tensors and constant values.

    `nodes[name]` is a captured node; `tensors[name]` a captured input (None when an optional
    input is absent); `values[name]` the numpy value of a `const` capture. `root` is the node the
    pattern is anchored at, `matched_nodes` every node the pattern covered (root first).
    """

    root: gs.Node
    graph: gs.Graph
    opset: int
    nodes: dict[str, gs.Node]
    tensors: dict[str, gs.Tensor | None]
    values: dict[str, np.ndarray | None]
    matched_nodes: list[gs.Node]
    _names: FreshNames

    def value(self, name: str) -> np.ndarray:
        """The value of the `const` capture `name`; a KeyError when it is absent."""
        array = self.values.get(name)
        if array is None:
            raise KeyError(f"no constant captured as '{name}'")
        return array

    def fresh_name(self, base: str) -> str:
        """A tensor or node name not used anywhere in the model (`base`, `base_1`, ...)."""
        return self._names(base)

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        """A new initializer with a fresh name derived from `base`."""
        return gs.Constant(self.fresh_name(base), values=np.ascontiguousarray(values))

    def variable(self, base: str, like: gs.Tensor | None = None) -> gs.Variable:
        """A new intermediate tensor; dtype and shape are copied from `like` when given."""
        dtype = getattr(like, "dtype", None)
        shape = getattr(like, "shape", None)
        return gs.Variable(self.fresh_name(base), dtype=dtype, shape=shape)


@dataclass(frozen=True)
class Refusal:
    """Why `rule` did not apply at the node called `node`."""

    rule: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} at {self.node}: {self.reason}"


class RewriteRule(abc.ABC):
    """A pattern, a check and a replacement. Subclasses set `name` and `pattern`.

    `check` sees a structural match and returns the reason it refuses, or None to go ahead.
    `rewrite` replaces the match: append new nodes to `graph.nodes`, edit matched nodes in
    place, and let replaced nodes fall dead (the engine removes them). The replacement must
    write every graph output the matched nodes wrote (use `take_outputs`).
    """

    name: str = ""
    pattern: OpPattern

    def check(self, match: Match) -> str | None:
        """The reason this match must not be rewritten, or None."""
        del match
        return None

    @abc.abstractmethod
    def rewrite(self, match: Match, graph: gs.Graph) -> None:
        """Replace the matched nodes."""

    def explain(self, node: gs.Node, graph: gs.Graph, *, opset: int | None = None) -> str | None:
        """Why this rule does not apply at `node` (None when it would)."""
        scope = _Scope.standalone(graph, opset)
        result = _Matcher(scope).match(self.pattern, node)
        if isinstance(result, str):
            return result
        return self.check(result)


def take_outputs(node: gs.Node) -> list[gs.Tensor]:
    """Disconnect and return `node`'s outputs, for the replacement node to write.

    Writing the same tensor objects keeps graph output names (and every consumer) unchanged.
    """
    outputs = list(node.outputs)
    node.outputs.clear()
    return outputs


def explain(
    rules: RewriteRule | Sequence[RewriteRule],
    node: gs.Node,
    graph: gs.Graph,
    *,
    opset: int | None = None,
) -> list[str]:
    """One line per rule: `"<rule>: applies"` or `"<rule>: <reason it does not>"`."""
    lines = []
    for rule in [rules] if isinstance(rules, RewriteRule) else rules:
        if not _anchors_at(rule.pattern, node):
            lines.append(f"{rule.name}: not anchored at {node.op} (anchors at {rule.pattern.describe()})")
            continue
        reason = rule.explain(node, graph, opset=opset)
        lines.append(f"{rule.name}: {reason or 'applies'}")
    return lines


# --------------------------------------------------------------------------------------------
# Matching


def _normal_domain(domain: str | None) -> str:
    return "" if is_default_domain(domain) else str(domain)


def _anchors_at(pattern: OpPattern, node: gs.Node) -> bool:
    return node.op in pattern.op_types and _normal_domain(node.domain) == pattern.domain


@functools.lru_cache(maxsize=512)
def _schema(op_type: str, domain: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


@functools.lru_cache(maxsize=2048)
def _attr_default(op_type: str, domain: str, opset: int, attr: str) -> Any:
    schema = _schema(op_type, domain, opset)
    if schema is None or attr not in schema.attributes:
        return None
    proto = schema.attributes[attr].default_value
    if not proto.type:
        return None
    value = onnx.helper.get_attribute_value(proto)
    return value.decode() if isinstance(value, bytes) else value


def attribute(node: gs.Node, name: str, opset: int) -> Any:
    """`node.attrs[name]`, or the schema's default for it (None when there is none)."""
    if name in node.attrs:
        return node.attrs[name]
    return _attr_default(node.op, _normal_domain(node.domain), opset, name)


def input_label(node: gs.Node, index: int, opset: int) -> str:
    """`Op.input_name` from the schema (`BatchNormalization.scale`), for messages."""
    schema = _schema(node.op, _normal_domain(node.domain), opset)
    names = [p.name for p in schema.inputs] if schema is not None else []
    if index < len(names):
        return f"{node.op}.{names[index]}"
    if (
        names
        and schema is not None
        and schema.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    ):
        return f"{node.op}.{names[-1]}[{index - len(names) + 1}]"
    return f"{node.op}.input{index}"


def _present(node: gs.Node) -> list[gs.Tensor | None]:
    # graphsurgeon keeps skipped optional inputs as tensors with an empty name.
    return [t if t.name else None for t in node.inputs]


class _Scope:
    """What matching needs to know about the graph being rewritten."""

    def __init__(
        self,
        graph: gs.Graph,
        opset: int,
        protected: set[int],
        local: set[int],
        names: FreshNames,
    ) -> None:
        self.graph = graph
        self.opset = opset
        self.protected = protected  # ids of graph outputs of this graph and all others
        self.local = local  # ids of this graph's nodes: patterns never reach into another graph
        self.names = names

    @classmethod
    def standalone(cls, graph: gs.Graph, opset: int | None) -> _Scope:
        graphs = iter_graphs(graph)
        return cls(
            graph,
            int(opset if opset is not None else graph.opset),
            {id(t) for g in graphs for t in g.outputs},
            {id(n) for n in graph.nodes},
            fresh_names(graphs),
        )


@dataclass
class _State:
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    tensors: dict[str, gs.Tensor | None] = field(default_factory=dict)
    values: dict[str, np.ndarray | None] = field(default_factory=dict)
    matched: list[gs.Node] = field(default_factory=list)

    def copy(self) -> _State:
        return _State(dict(self.nodes), dict(self.tensors), dict(self.values), list(self.matched))


def _bind(table: dict[str, Any], name: str | None, obj: Any) -> str | None:
    """Capture `obj`; a name used twice must capture the same object both times."""
    if name is None:
        return None
    if name in table and table[name] is not obj:
        return f"capture '{name}' would bind two different objects"
    table[name] = obj
    return None


class _Matcher:
    def __init__(self, scope: _Scope) -> None:
        self.scope = scope

    def match(self, pattern: OpPattern, node: gs.Node) -> Match | str:
        """A Match, or the reason the pattern does not match at `node`."""
        if not _anchors_at(pattern, node):
            return f"{node.op} is not {pattern.describe()}"
        state = _State()
        reason = self._match_op(pattern, node, state)
        if reason is not None:
            return reason
        return Match(
            root=node,
            graph=self.scope.graph,
            opset=self.scope.opset,
            nodes=state.nodes,
            tensors=state.tensors,
            values=state.values,
            matched_nodes=state.matched,
            _names=self.scope.names,
        )

    def _match_op(self, pattern: OpPattern, node: gs.Node, state: _State) -> str | None:
        reason = self._match_attrs(pattern, node) or _bind(state.nodes, pattern.name, node)
        if reason is not None:
            return reason
        state.matched.append(node)
        if pattern.inputs is None:
            return None
        if not pattern.commutative:
            return self._match_inputs(pattern.inputs, node, state)
        # Two inputs: try both orders, keeping the captures of the first that matches.
        reasons = []
        for order in (pattern.inputs, pattern.inputs[::-1]):
            trial = state.copy()
            reason = self._match_inputs(order, node, trial)
            if reason is None:
                state.__dict__.update(trial.__dict__)
                return None
            reasons.append(reason)
        return reasons[0] if reasons[0] == reasons[1] else f"{reasons[0]}; swapped: {reasons[1]}"

    def _match_attrs(self, pattern: OpPattern, node: gs.Node) -> str | None:
        for attr, condition in pattern.attrs.items():
            value = attribute(node, attr, self.scope.opset)
            if callable(condition):
                if not condition(value):
                    doc = (condition.__doc__ or "").strip().splitlines()
                    what = doc[0] if doc else f"fails {getattr(condition, '__name__', 'its condition')}"
                    return f"{node.op}.{attr} is {value!r}: {what}"
            elif not _equal(value, condition):
                return f"{node.op}.{attr} is {value!r}, expected {condition!r}"
        return None

    def _match_inputs(self, patterns: Sequence[Pattern | None], node: gs.Node, state: _State) -> str | None:
        present = _present(node)
        for index in range(len(patterns), len(present)):
            extra = present[index]
            if extra is not None:
                return f"{self._label(node, index)} ('{extra.name}') is not in the pattern"
        for index, pattern in enumerate(patterns):
            value = present[index] if index < len(present) else None
            reason = self._match_input(node, index, pattern, value, state)
            if reason is not None:
                return reason
        return None

    def _match_input(
        self,
        node: gs.Node,
        index: int,
        pattern: Pattern | None,
        value: gs.Tensor | None,
        state: _State,
    ) -> str | None:
        if value is None:
            if pattern is None or isinstance(pattern, OpPattern) or not pattern.optional:
                return None if pattern is None else f"{self._label(node, index)} is missing"
            return _bind(state.tensors, pattern.name, None) or _bind(state.values, pattern.name, None)
        if pattern is None:
            return None
        if isinstance(pattern, TensorPattern):
            return _bind(state.tensors, pattern.name, value)
        if isinstance(pattern, ConstPattern):
            array = constant_value(value)
            if array is None:
                return f"{self._label(node, index)} is not a constant ('{value.name}')"
            return _bind(state.tensors, pattern.name, value) or _bind(state.values, pattern.name, array)
        return self._match_producer(node, index, pattern, value, state)

    def _label(self, node: gs.Node, index: int) -> str:
        # Only built for refusals: schema look-ups are not free.
        return input_label(node, index, self.scope.opset)

    def _match_producer(
        self, node: gs.Node, index: int, pattern: OpPattern, value: gs.Tensor, state: _State
    ) -> str | None:
        if isinstance(value, gs.Constant) or len(value.inputs) != 1:
            return f"{self._label(node, index)} ('{value.name}') is not computed by a node"
        producer = value.inputs[0]
        if id(producer) not in self.scope.local:
            return f"{self._label(node, index)} ('{value.name}') comes from an enclosing graph"
        if not _anchors_at(pattern, producer):
            return f"{self._label(node, index)} comes from {producer.op}, not {pattern.describe()}"
        if pattern.output >= len(producer.outputs) or producer.outputs[pattern.output] is not value:
            return f"{self._label(node, index)} is not output {pattern.output} of {producer.op}"
        if pattern.one_consumer:
            if id(value) in self.scope.protected:
                return f"{producer.op} output '{value.name}' is a graph output"
            if len(value.outputs) != 1:
                return f"{producer.op} output '{value.name}' has {len(value.outputs)} consumers"
        return self._match_op(pattern, producer, state)


def _equal(value: Any, expected: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(expected, (list, tuple)):
        return list(value) == list(expected)
    return bool(value == expected)


# --------------------------------------------------------------------------------------------
# The engine


class RewriteError(RuntimeError):
    """A rule broke the engine's contract (or rules never converged): a bug in the rules.

    The pass manager reports it as a PassError naming the pass.
    """


@dataclass
class RewriteReport:
    """What `apply_rules` did: applications per rule, match attempts, and refusals if asked."""

    applied: dict[str, int]
    attempts: int = 0
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.applied.values())


def apply_rules(
    graph: gs.Graph,
    rules: Sequence[RewriteRule],
    *,
    opset: int | None = None,
    subgraphs: bool = True,
    record_refusals: bool = False,
    max_applications: int | None = None,
) -> RewriteReport:
    """Apply `rules` to `graph` (and its subgraphs) until none applies; see the module docstring.

    At each node the rules anchored at its op type are tried in order and the first that
    matches and passes its check is applied. `record_refusals=True` keeps every refusal in the
    report. `max_applications` (default: 8 per node, plus 64) stops rules that undo each other.
    """
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"rules need distinct, non-empty names: {names}")
    graphs = iter_graphs(graph) if subgraphs else [graph]
    report = RewriteReport(applied=dict.fromkeys(names, 0))
    protected = {id(t) for g in graphs for t in g.outputs}
    namespace = fresh_names(graphs)
    version = int(opset if opset is not None else graph.opset)
    for current in graphs:
        limit = max_applications if max_applications is not None else 8 * len(current.nodes) + 64
        scope = _Scope(current, version, protected, {id(n) for n in current.nodes}, namespace)
        _GraphRewriter(scope, rules, report, record_refusals, limit).run()
    return report


class _GraphRewriter:
    """Applies rules within one graph with a worklist; see `apply_rules`."""

    def __init__(
        self,
        scope: _Scope,
        rules: Sequence[RewriteRule],
        report: RewriteReport,
        record_refusals: bool,
        limit: int,
    ) -> None:
        self.scope = scope
        self.graph = scope.graph
        self.report = report
        self.record_refusals = record_refusals
        self.limit = limit
        self.matcher = _Matcher(scope)
        self.by_op: dict[tuple[str, str], list[RewriteRule]] = collections.defaultdict(list)
        for rule in rules:
            for op_type in rule.pattern.op_types:
                self.by_op[(rule.pattern.domain, op_type)].append(rule)
        self.reach = max((rule.pattern.depth() for rule in rules), default=1)
        self.dead: set[int] = set()
        # New nodes are placed just before the node whose rewrite created them, which keeps
        # the order topological (their inputs come from the matched region's inputs).
        self.insert_before: dict[int, list[gs.Node]] = collections.defaultdict(list)
        self.applied = 0

    def _rules_for(self, node: gs.Node) -> list[RewriteRule]:
        return self.by_op.get((_normal_domain(node.domain), node.op), [])

    def run(self) -> None:
        original = list(self.graph.nodes)
        queue = collections.deque(n for n in original if self._rules_for(n))
        queued = {id(n) for n in queue}
        while queue:
            node = queue.popleft()
            queued.discard(id(node))
            if id(node) in self.dead:
                continue
            for touched in self._visit(node):
                if id(touched) not in queued:
                    queued.add(id(touched))
                    queue.append(touched)
        if self.applied:
            self._rebuild(original)

    def _visit(self, node: gs.Node) -> list[gs.Node]:
        """Try the rules anchored at `node`; after a rewrite, the nodes to visit again."""
        for rule in self._rules_for(node):
            self.report.attempts += 1
            result = self.matcher.match(rule.pattern, node)
            reason = result if isinstance(result, str) else rule.check(result)
            if reason is not None:
                if self.record_refusals:
                    self.report.refusals.append(Refusal(rule.name, node.name or node.op, reason))
                continue
            assert isinstance(result, Match)
            return self._apply(rule, result)
        return []

    def _apply(self, rule: RewriteRule, match: Match) -> list[gs.Node]:
        self.applied += 1
        if self.applied > self.limit:
            raise RewriteError(
                f"rewrite rules did not converge: {self.applied - 1} applications in a graph of "
                f"{len(self.graph.nodes)} nodes (last: '{rule.name}'); do two rules undo each other?"
            )
        boundary = _boundary(match.matched_nodes)
        guarded = [t for n in match.matched_nodes for t in n.outputs if id(t) in self.scope.protected]
        count = len(self.graph.nodes)
        rule.rewrite(match, self.graph)
        if len(self.graph.nodes) < count:
            raise RewriteError(
                f"rule '{rule.name}' removed nodes from graph.nodes; leave replaced nodes in place, "
                "the rewrite engine removes them once unused"
            )
        for t in guarded:
            if len(t.inputs) != 1:
                raise RewriteError(
                    f"rule '{rule.name}' left graph output '{t.name}' with {len(t.inputs)} producers; "
                    "the replacement must write it (see take_outputs)"
                )
        new_nodes = self.graph.nodes[count:]
        self.scope.local.update(id(n) for n in new_nodes)
        self.insert_before[id(match.root)].extend(new_nodes)
        for node in match.matched_nodes:
            self._remove_if_dead(node)
        self.report.applied[rule.name] += 1
        return self._neighbourhood(new_nodes, boundary)

    def _remove_if_dead(self, node: gs.Node) -> None:
        """Drop `node` when nothing reads its outputs; then Constant nodes that fed only it."""
        if id(node) in self.dead or any(id(t) in self.scope.protected or t.outputs for t in node.outputs):
            return
        inputs = list(node.inputs)
        node.inputs.clear()
        node.outputs.clear()
        self.dead.add(id(node))
        for t in inputs:
            if len(t.inputs) == 1 and is_op(t.inputs[0], "Constant") and id(t.inputs[0]) in self.scope.local:
                self._remove_if_dead(t.inputs[0])

    def _neighbourhood(self, new_nodes: Sequence[gs.Node], boundary: Sequence[gs.Tensor]) -> list[gs.Node]:
        """Nodes whose matches a rewrite may have changed, in this graph, alive, with rules.

        The new nodes, the producers and consumers of the tensors around the match (a consumer
        may have lost a competitor for `one_consumer`), and consumers below those as deep as
        the deepest pattern reaches.
        """
        frontier = list(new_nodes)
        for t in boundary:
            frontier.extend(t.inputs)
            frontier.extend(t.outputs)
        seen: set[int] = set()
        found: list[gs.Node] = []
        for level in range(self.reach):
            following: list[gs.Node] = []
            for node in frontier:
                if id(node) in seen or id(node) in self.dead or id(node) not in self.scope.local:
                    continue
                seen.add(id(node))
                if self._rules_for(node):
                    found.append(node)
                if level + 1 < self.reach:
                    following.extend(c for t in node.outputs for c in t.outputs)
            frontier = following
        return found

    def _rebuild(self, original: Sequence[gs.Node]) -> None:
        """Drop dead nodes and place new ones; fall back to a full sort if order broke."""
        order: list[gs.Node] = []
        for first in original:
            stack: list[tuple[gs.Node, bool]] = [(first, False)]
            while stack:
                node, expanded = stack.pop()
                if expanded:
                    if id(node) not in self.dead:
                        order.append(node)
                    continue
                stack.append((node, True))
                stack.extend((n, False) for n in reversed(self.insert_before.pop(id(node), [])))
        self.graph.nodes = order
        if not _is_topological(self.graph):
            self.graph.toposort(recurse_subgraphs=False)


def _boundary(nodes: Sequence[gs.Node]) -> list[gs.Tensor]:
    seen: dict[int, gs.Tensor] = {}
    for node in nodes:
        for t in (*node.inputs, *node.outputs):
            seen.setdefault(id(t), t)
    return list(seen.values())


def _is_topological(graph: gs.Graph) -> bool:
    """Every input produced by a node of this graph is produced before it is read."""
    local = {id(n) for n in graph.nodes}
    ready: set[int] = set()
    for node in graph.nodes:
        for t in node.inputs:
            if t.inputs and id(t.inputs[0]) in local and id(t) not in ready:
                return False
        ready.update(id(t) for t in node.outputs)
    return True


# --------------------------------------------------------------------------------------------
# The pass base class


class RewritePass(Pass):
    """A pass made of rewrite rules: implement `rules()`; `run` applies them to a fixpoint.

    The result's statistics count applications per rule name. With the context's logger at
    DEBUG level, every refusal is logged with its reason.
    """

    walk_subgraphs: ClassVar[bool] = True

    @abc.abstractmethod
    def rules(self) -> Sequence[RewriteRule]:
        """The rules, in the order they are tried at a node."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        debug = ctx.log.isEnabledFor(logging.DEBUG)
        report = apply_rules(
            model.graph, self.rules(), opset=model.opset, subgraphs=self.walk_subgraphs, record_refusals=debug
        )
        for refusal in report.refusals:
            ctx.log.debug("%s: %s", self.name or type(self).__name__, refusal)
        return PassResult(changed=report.total > 0, stats=report.applied)


# --------------------------------------------------------------------------------------------
# Helpers for rules

# Ops whose output has the rank of their first input.
_SAME_RANK = frozenset(
    """
    Abs BatchNormalization Cast Celu Clip Dropout Elu Erf Exp Gelu HardSigmoid HardSwish Identity
    InstanceNormalization LayerNormalization LeakyRelu Log LRN LpNormalization Mish Neg PRelu
    Reciprocal Relu Selu Sigmoid Softmax Softplus Softsign Sqrt Tanh ThresholdedRelu
    AveragePool MaxPool LpPool GlobalAveragePool GlobalMaxPool Pad
    """.split()
)


def tensor_rank(value: gs.Tensor, depth: int = 16) -> int | None:
    """The rank of `value` when it is known or follows from its producer, else None.

    Uses the recorded shape, then the producer: Conv/ConvTranspose have their weight's rank,
    Gemm rank 2, and rank-preserving ops (activations, normalizations, pools) their input's.
    """
    if value.shape is not None:
        return len(value.shape)
    array = constant_value(value)
    if array is not None:
        return array.ndim
    if depth <= 0 or len(value.inputs) != 1:
        return None
    producer = value.inputs[0]
    if is_op(producer, "Gemm"):
        return 2
    if is_op(producer, "Conv", "ConvTranspose") and len(producer.inputs) > 1:
        return tensor_rank(producer.inputs[1], depth - 1)
    if is_op(producer, *_SAME_RANK) and producer.inputs:
        return tensor_rank(producer.inputs[0], depth - 1)
    if is_op(producer, "MatMul") and len(producer.inputs) == 2:
        ranks = [tensor_rank(t, depth - 1) for t in producer.inputs]
        if None in ranks:
            return None
        a, b = (r for r in ranks if r is not None)
        # A 1-D operand is promoted to a matrix and its added axis removed afterwards.
        return max(a, b) if min(a, b) >= 2 else max(a, b) - 1
    return None
