"""graphopt's FLOP and parameter-size counters over the canonical ATen IR.

FLOPs are counted from ``meta["val"]`` shapes, one multiply-add as two FLOPs, for the ops that
dominate transformer and CNN inference: the ATen ops below, rules added with
:func:`register_flop_rule`, and custom ops whose :class:`~graphopt.ir.oprecord.OpRecord` has a
``flops`` rule (``graphopt::varlen_attention``). Everything else (pointwise ops, norms, reductions,
the packing ops) is memory-bound and counted as zero, the usual convention, so ratios between
graphs reflect the matrix work a rewrite saves.

**Symbolic sizes** count at the value they take on the example inputs. A backed size (a dynamic
input dimension) carries that value as its hint. An unbacked size, data-dependent like the number
of valid tokens ``T`` that ``graphopt::pack_tokens`` produces, has none: ``count_flops(gm,
example_inputs)`` then runs the graph once on the example inputs (a ``torch.fx.Interpreter``),
binds every unbacked symbol of ``meta["val"]`` to the size it took, and keeps the values of small
integer tensors (sequence offsets) for rules whose work depends on data (``varlen_attention``).
That record is kept in ``gm.meta`` for the graph as compiled (``gm.code``), so later calls without
inputs reuse it; a graph with unbound unbacked sizes and no record raises :class:`UnknownSizeError`.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, has_free_unbacked_symbols, optimization_hint
from torch.utils import _pytree as pytree

from graphopt.ir import aten, normalized_args, shape_of, val_of
from graphopt.ir.calibrate import flat_inputs
from graphopt.ir.oprecord import op_record

__all__ = ["ExampleRun", "UnknownSizeError", "count_flops", "example_value", "node_flops", "param_bytes", "record_example_run", "register_flop_rule", "size"]

_RULES: dict[object, Callable[[Node], int]] = {}
_META_KEY = "graphopt_example_run"
_SMALL_INTEGER_TENSOR = 4096  # integer results up to this many elements are kept (offsets, lengths)


class UnknownSizeError(ValueError):
    """A data-dependent size with no example value: count with ``example_inputs``."""


@dataclass
class ExampleRun:
    """What one run of a graph on its example inputs showed about its data-dependent sizes.

    Attributes:
        code: ``gm.code`` when it ran: the record belongs to that graph only.
        sizes: each unbacked symbol of the nodes' ``meta["val"]`` -> the size it took.
        values: node name -> its result, for integer tensors of at most 4096 elements.
    """

    code: str
    sizes: dict[sympy.Symbol, int] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)


_NO_RUN = ExampleRun(code="")
_current_run: contextvars.ContextVar[ExampleRun] = contextvars.ContextVar("graphopt_flops_run", default=_NO_RUN)


class _Recorder(Interpreter):
    """Runs a graph and fills an :class:`ExampleRun` from each node's real result."""

    def __init__(self, gm: GraphModule, record: ExampleRun):
        super().__init__(gm)
        self.record = record

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        fakes, reals = pytree.tree_leaves(val_of(n)), pytree.tree_leaves(result)
        if len(fakes) == len(reals):
            for fake, real in zip(fakes, reals):
                self._bind(fake, real)
        if isinstance(result, torch.Tensor) and not (result.is_floating_point() or result.is_complex()) and result.numel() <= _SMALL_INTEGER_TENSOR:
            self.record.values[n.name] = result.detach().clone()
        return result

    def _bind(self, fake: Any, real: Any) -> None:
        if isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor) and fake.dim() == real.dim():
            pairs = zip(fake.shape, real.shape)
        elif isinstance(fake, torch.SymInt) and isinstance(real, int):
            pairs = [(fake, real)]
        else:
            return
        for symbolic, concrete in pairs:
            if isinstance(symbolic, torch.SymInt) and symbolic.node.expr.is_Symbol and free_unbacked_symbols(symbolic):
                self.record.sizes[symbolic.node.expr] = int(concrete)


def record_example_run(gm: GraphModule, example_inputs: Sequence[Any] = (), example_kwargs: dict | None = None) -> ExampleRun:
    """Run ``gm`` once on the example inputs and keep what its data-dependent sizes were (in ``gm.meta``)."""
    run = ExampleRun(code=gm.code)
    with torch.no_grad():
        _Recorder(gm, run).run(*flat_inputs(gm, example_inputs, example_kwargs), enable_io_processing=False)
    gm.meta[_META_KEY] = run
    return run


def _stored_run(gm: GraphModule | None) -> ExampleRun:
    run = gm.meta.get(_META_KEY) if isinstance(gm, GraphModule) else None
    return run if run is not None and run.code == gm.code else _NO_RUN


def size(x: int | torch.SymInt) -> int:
    """The value of a size on the example inputs (for FLOP rules)."""
    if not isinstance(x, torch.SymInt):
        return int(x)
    if not has_free_unbacked_symbols(x):
        return optimization_hint(x)
    expr = sympy.sympify(x.node.expr.xreplace(_current_run.get().sizes))
    if not expr.is_number:
        raise UnknownSizeError(f"the data-dependent size {x.node.expr} has no example value: count FLOPs with example inputs (count_flops(gm, example_inputs))")
    return int(expr)


def example_value(node: Any) -> torch.Tensor | None:
    """The value ``node`` (a small integer tensor) took on the example run, when there was one."""
    return _current_run.get().values.get(node.name) if isinstance(node, Node) else None


def _numel(shape) -> int:
    return math.prod(size(s) for s in shape) if shape is not None else 0


def register_flop_rule(*targets) -> Callable:
    """Register ``fn(node) -> flops`` for op overloads or packets (later passes add their ops).

    A rule reads shapes with :func:`graphopt.ir.shape_of` and turns sizes into numbers with
    :func:`size`; :func:`example_value` gives the example run's small integer tensors.
    """

    def wrap(fn):
        for t in targets:
            _RULES[t] = fn
        return fn

    return wrap


@register_flop_rule(aten.linear)
def _linear(node: Node) -> int:
    w = shape_of(node.args[1])
    out = shape_of(node)
    return 2 * _numel(out) * size(w[-1]) if w and out is not None else 0


@register_flop_rule(aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm)
def _matmul(node: Node) -> int:
    a_arg = node.args[1] if node.target.overloadpacket in (aten.addmm, aten.baddbmm) else node.args[0]
    a, out = shape_of(a_arg), shape_of(node)
    return 2 * _numel(out) * size(a[-1]) if a and out is not None else 0


@register_flop_rule(aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d)
def _conv(node: Node) -> int:
    w, out = shape_of(node.args[1]), shape_of(node)
    if not w or out is None:
        return 0
    if node.target.overloadpacket is aten.convolution and normalized_args(node)["transposed"]:
        return _conv_transpose(node)
    # each output element: in_channels/groups * kernel volume multiply-adds = numel(w[1:])
    return 2 * _numel(out) * _numel(w[1:])


@register_flop_rule(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def _conv_transpose(node: Node) -> int:
    # the weight is [C_in, C_out/groups, k...]: each input element scatters into numel(w[1:]) outputs
    x, w = shape_of(node.args[0]), shape_of(node.args[1])
    return 2 * _numel(x) * _numel(w[1:]) if x and w else 0


@register_flop_rule(aten.scaled_dot_product_attention)
def _sdpa(node: Node) -> int:
    q, k, v = (shape_of(a) for a in node.args[:3])
    if not (q and k and v):
        return 0
    batch_heads = _numel(q[:-2])
    lq, e, lk, ev = size(q[-2]), size(q[-1]), size(k[-2]), size(v[-1])
    return 2 * batch_heads * lq * lk * (e + ev)


@register_flop_rule(aten.einsum)
def _einsum(node: Node) -> int:
    equation = normalized_args(node)["equation"].replace(" ", "")
    lhs = equation.split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, operand in zip(lhs, node.args[1]):
        shape = shape_of(operand) or ()
        if "..." in letters:  # broadcast dims get private labels, aligned from the right
            head, tail = letters.split("...")
            letters = [*head, *(f"...{i}" for i in range(len(shape) - len(head) - len(tail), 0, -1)), *tail]
        for label, dim in zip(letters, shape):
            sizes[label] = max(sizes.get(label, 1), size(dim))
    return 2 * math.prod(sizes.values()) if len(lhs) > 1 else 0


def node_flops(node: Node) -> int:
    """FLOPs of one node (0 for ops without a rule or without shape metadata).

    The rule is the one registered for the node's overload, else for its packet
    (:func:`register_flop_rule`), else its op record's ``flops``. Unbacked sizes take their values
    from the example run :func:`count_flops` recorded for the node's graph;
    :class:`UnknownSizeError` where there is none.
    """
    if node.op != "call_function":
        return 0
    rule = _RULES.get(node.target) or _RULES.get(getattr(node.target, "overloadpacket", None))
    if rule is None:
        record = op_record(node.target)
        rule = record.flops if record is not None else None
    if rule is None:
        return 0
    token = _current_run.set(_stored_run(node.graph.owning_module))
    try:
        return int(rule(node))
    finally:
        _current_run.reset(token)


def count_flops(gm: GraphModule, example_inputs: Sequence[Any] | None = None, example_kwargs: dict | None = None) -> int:
    """Total FLOPs of ``gm`` for one call on its example inputs.

    Graphs whose sizes are all static or backed need no inputs. A graph with data-dependent
    (unbacked) sizes is run once on ``example_inputs`` / ``example_kwargs`` when given (see the
    module docstring); without them, the record of an earlier run on the same graph is used.
    """
    if (example_inputs is not None or example_kwargs) and any(has_free_unbacked_symbols(val_of(n)) for n in gm.graph.nodes):
        record_example_run(gm, example_inputs or (), example_kwargs)
    return sum(node_flops(n) for n in gm.graph.nodes)


def param_bytes(gm: GraphModule) -> int:
    """Bytes of the distinct tensors the graph reads through ``get_attr`` (tied weights once)."""
    seen: dict[tuple, int] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.dtype)
            seen[key] = obj.numel() * obj.element_size()
    return sum(seen.values())
