"""What a graph in graphopt's canonical IR guarantees, checked (docs/ir.md states it in prose).

:func:`check_ir` runs every rule of :data:`RULES` for a stage on a ``GraphModule`` and raises one
:class:`IRSpecError` listing every violation as ``rule: node: what``, so a broken pass is caught
at the pass that broke the graph rather than at the pass that trips over it. The pass manager runs
it after capture and after every pass when ``GRAPHOPT_CHECK_IR=1`` is set or
``PassManager(check_ir=True)`` is given.

Stages: ``"captured"`` (what :func:`graphopt.capture` returns) and ``"canonicalized"`` (after
``canonicalize``, and after every pass since: passes keep the IR's guarantees). The built-in rules
hold at both; a higher layer adds its own post-conditions with :func:`register_rule` (the lowest
layer cannot import the passes whose results it checks).
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch.fx import GraphModule, Node

from graphopt.ir import describe_value, in_place_writes, op_name
from graphopt.ir.match import identity_view_source

__all__ = ["IRSpecError", "RULES", "Rule", "STAGES", "Violation", "allow_module_calls", "check_ir", "check_ir_enabled", "register_rule", "violations"]

STAGES = ("captured", "canonicalized")

ENV_FLAG = "GRAPHOPT_CHECK_IR"


@dataclass(frozen=True)
class Violation:
    """One broken guarantee: the rule, the node (None for the graph as a whole) and what is wrong."""

    rule: str
    node: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.node + ': ' if self.node else ''}{self.message}"


class IRSpecError(AssertionError):
    """A graph breaks the canonical IR's guarantees; ``violations`` lists every one found."""

    def __init__(self, stage: str, violations: list[Violation], where: str = ""):
        self.stage, self.violations = stage, violations
        head = f"graph {where + ' ' if where else ''}breaks the canonical IR ({stage}), {len(violations)} violation(s):"
        super().__init__("\n  ".join([head, *map(str, violations)]))


Check = Callable[[GraphModule], Iterable[tuple[Node | None, str]]]


@dataclass(frozen=True)
class Rule:
    """A guarantee: ``check(gm)`` yields ``(node or None, what is wrong)`` for each violation."""

    name: str
    doc: str
    check: Check
    stages: tuple[str, ...] = STAGES


RULES: dict[str, Rule] = {}


def register_rule(name: str, check: Check, *, doc: str, stages: Iterable[str] = STAGES) -> Rule:
    """Add (or replace) the rule ``name``, checked at ``stages``; returns it."""
    stages = tuple(stages)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {STAGES}")
    RULES[name] = rule = Rule(name, doc, check, stages)
    return rule


def violations(gm: GraphModule, stage: str = "captured") -> list[Violation]:
    """Every violation of the rules for ``stage`` in ``gm`` (empty: the graph meets the spec)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    found = []
    for rule in RULES.values():
        if stage not in rule.stages:
            continue
        try:
            found += [Violation(rule.name, node.name if node is not None else None, msg) for node, msg in rule.check(gm)]
        except Exception as e:  # noqa: BLE001 - a rule that cannot even look at the graph is a finding too
            found.append(Violation(rule.name, None, f"check raised {type(e).__name__}: {e}"))
    return found


def check_ir(gm: GraphModule, stage: str = "captured", *, where: str = "") -> None:
    """Raise :class:`IRSpecError` listing every violation of the spec for ``stage`` in ``gm``.

    ``where`` names the graph in the message (e.g. ``"after canonicalize"``).
    """
    found = violations(gm, stage)
    if found:
        raise IRSpecError(stage, found, where)


def check_ir_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given, else whether the ``GRAPHOPT_CHECK_IR`` environment variable is set (not 0)."""
    if flag is not None:
        return flag
    return os.environ.get(ENV_FLAG, "").strip().lower() not in ("", "0", "false", "no")


# ----------------------------------------------------------------------------- the built-in rules


def _rule(name: str, doc: str):
    def decorate(check: Check) -> Check:
        register_rule(name, check, doc=doc)
        return check

    return decorate


@_rule("well-formed", "torch.fx's lint passes: nodes in topological order, every argument defined before use, targets exist")
def _well_formed(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises RuntimeError or AssertionError
        yield None, str(e).splitlines()[0] if str(e) else type(e).__name__


@_rule("one-output", "exactly one output node, the last node of the graph")
def _one_output(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        yield None, f"{len(outputs)} output nodes"
    elif next(iter(reversed(gm.graph.nodes))) is not outputs[0]:
        yield outputs[0], "is not the last node"


_NODE_KINDS = ("placeholder", "get_attr", "call_function", "output")


# Module classes whose call_module nodes flat-graph lets through: trainable stand-ins that a pass
# inserts on purpose and a later pass removes before inference (layernorm_to_repbn's PRepBN, which
# fold_repbn folds away). Filled by the layer that defines them (see allow_module_calls).
_ALLOWED_MODULES: dict[type, str] = {}


def allow_module_calls(cls: type, why: str) -> None:
    """Let ``call_module`` nodes of instances of ``cls`` through the ``flat-graph`` rule; ``why`` says what removes them."""
    _ALLOWED_MODULES[cls] = why


@_rule("flat-graph", "only placeholder, get_attr, call_function and output nodes: no submodule or method calls (except allow_module_calls)")
def _flat_graph(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), tuple(_ALLOWED_MODULES)):
            continue
        if node.op not in _NODE_KINDS:
            yield node, f"is a {node.op} node ({node.target})"


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
_SIZE_FUNCTIONS = {f for f in vars(operator).values() if callable(f)} | {f for f in vars(math).values() if callable(f)}


def _size_function(target) -> bool:
    return target in _SIZE_FUNCTIONS or (
        getattr(target, "__name__", "").startswith("sym_") and getattr(target, "__module__", "") in ("torch", "torch.fx.experimental.sym_node")
    )


@_rule(
    "op-overloads",
    "every call is a specific op overload (aten.add.Tensor, graphopt.rms_norm.default): not a packet, a Python "
    "function or a higher-order op; except operator.getitem on a multi-output op and Python arithmetic on symbolic sizes",
)
def _op_overloads(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    for node in gm.graph.nodes:
        if node.op != "call_function" or isinstance(node.target, torch._ops.OpOverload):
            continue
        target = node.target
        if target is operator.getitem:
            source = node.args[0]
            if isinstance(source, Node) and source.op == "call_function" and isinstance(source.meta.get("val"), (tuple, list)):
                continue
            yield node, f"getitem of {getattr(source, 'name', source)}, which is not a multi-output op"
        elif _size_function(target) and isinstance(node.meta.get("val"), _SYMBOLIC):
            continue
        elif isinstance(target, torch._ops.OpOverloadPacket):
            yield node, f"calls the packet {target}, not one of its overloads"
        elif isinstance(target, torch._ops.HigherOrderOperator):
            yield node, f"calls the higher-order op {target.name()}"
        else:
            yield node, f"calls {getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}, not an op overload"


def _attr(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@_rule("constants", "get_attr nodes read tensors (the model's parameters, buffers and constants) that some node uses")
def _constants(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            yield node, f"reads {node.target!r}, a {type(value).__name__}, not a tensor"
        elif not node.users:
            yield node, "is unused"


def _val_ok(val) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (tuple, list)):
        return all(v is None or _val_ok(v) for v in val)
    return isinstance(val, _SYMBOLIC)


@_rule(
    "meta-val",
    'every node but the output carries meta["val"] (a fake tensor, a symbolic or plain number, or a tuple of them); a constant\'s agrees with the tensor',
)
def _meta_val(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if "val" not in node.meta:
            yield node, 'has no meta["val"]'
            continue
        val = node.meta["val"]
        if not _val_ok(val) and not (val is None and node.op == "call_function" and not node.users):
            yield node, f'meta["val"] is a {type(val).__name__}'
        elif node.op == "get_attr":
            tensor = _attr(gm, node.target)
            if isinstance(tensor, torch.Tensor) and isinstance(val, torch.Tensor):
                if tensor.dtype != val.dtype or tuple(tensor.shape) != tuple(val.shape):
                    yield node, f'meta["val"] says {describe_value(val)}, the tensor is {describe_value(tensor)}'


@_rule("no-dead-code", "every op's result is used, unless the op has a side effect (an in-place write, an assertion)")
def _no_dead_code(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    for node in gm.graph.nodes:
        if node.op == "call_function" and not node.users and not node.is_impure():
            yield node, f"{_target_name(node)} is computed but never used"


@_rule(
    "writes-recorded",
    'no op writes a constant or a graph input in place unless capture recorded it (gm.meta["graphopt_mutations"]): passes never add such writes',
)
def _writes_recorded(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    recorded = gm.meta.get("graphopt_mutations") or {}
    for kind, names in in_place_writes(gm).items():
        extra = sorted(set(names) - set(recorded.get(kind, ())))
        if extra:
            yield None, f"writes {kind} {extra} in place, which capture did not record"


# The fused ops stay whole in the training IR; their lower spellings (what a decomposition or an
# inference-IR export produces) would hide them from the passes and backends matching the fused op.
_LOWER_FORMS = {
    "aten.native_layer_norm": "aten.layer_norm",
    "aten._fused_rms_norm": "aten.rms_norm",
    "aten.native_group_norm": "aten.group_norm",
    "aten._scaled_dot_product_flash_attention": "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu": "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_efficient_attention": "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_cudnn_attention": "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_attention_math": "aten.scaled_dot_product_attention",
}


def _target_name(node: Node) -> str:
    return op_name(node.target) if isinstance(node.target, torch._ops.OpOverload) else getattr(node.target, "__name__", str(node.target))


@_rule("fused-forms", "attention and normalization keep their one fused spelling: aten.scaled_dot_product_attention, aten.layer_norm, aten.rms_norm, ...")
def _fused_forms(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            packet = op_name(node.target).rsplit(".", 1)[0]
            if packet in _LOWER_FORMS:
                yield node, f"is {packet}, a lower form of {_LOWER_FORMS[packet]}"


def _no_identity_views(gm: GraphModule) -> Iterator[tuple[Node | None, str]]:
    for node in gm.graph.nodes:
        source = identity_view_source(node)
        if source is not None:
            yield node, f"{_target_name(node)} returns {source.name} in the shape it already has (an identity view)"


register_rule(
    "no-identity-views",
    _no_identity_views,
    doc="no view, reshape, flatten, unflatten, expand or permutation returns its input (or its chain of reshapes' input) in the shape it already has",
    stages=("canonicalized",),
)
