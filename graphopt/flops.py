"""graphopt's FLOP and parameter-size counters over the canonical ATen IR.

FLOPs are counted from ``meta["val"]`` shapes, one multiply-add as two FLOPs, for the ops that
dominate transformer and CNN inference. Everything else (pointwise ops, norms, reductions) is
memory-bound and counted as zero, the usual convention, so ratios between graphs reflect the
matrix work a rewrite saves. Symbolic sizes count at their example value (their hint).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from graphopt.ir import aten, normalized_args, shape_of

__all__ = ["count_flops", "node_flops", "param_bytes", "register_flop_rule"]

_RULES: dict[object, Callable[[Node], int]] = {}


def _size(x) -> int:
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        if hint is None:  # unbacked size (data-dependent): use the graph's upper bound if any
            return int(x.node.shape_env.size_hint(x.node.expr, allow_none=True) or 0)
        return int(hint)
    return int(x)


def _numel(shape) -> int:
    return math.prod(_size(s) for s in shape) if shape is not None else 0


def register_flop_rule(*targets) -> Callable:
    """Register ``fn(node) -> flops`` for op overloads or packets (later passes add their ops)."""

    def wrap(fn):
        for t in targets:
            _RULES[t] = fn
        return fn

    return wrap


@register_flop_rule(aten.linear)
def _linear(node: Node) -> int:
    w = shape_of(node.args[1])
    out = shape_of(node)
    return 2 * _numel(out) * _size(w[-1]) if w and out is not None else 0


@register_flop_rule(aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm)
def _matmul(node: Node) -> int:
    a_arg = node.args[1] if node.target.overloadpacket in (aten.addmm, aten.baddbmm) else node.args[0]
    a, out = shape_of(a_arg), shape_of(node)
    return 2 * _numel(out) * _size(a[-1]) if a and out is not None else 0


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
    lq, e, lk, ev = _size(q[-2]), _size(q[-1]), _size(k[-2]), _size(v[-1])
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
        for label, size in zip(letters, shape):
            sizes[label] = max(sizes.get(label, 1), _size(size))
    return 2 * math.prod(sizes.values()) if len(lhs) > 1 else 0


def node_flops(node: Node) -> int:
    """FLOPs of one node (0 for ops without a rule or without shape metadata)."""
    if node.op != "call_function":
        return 0
    rule = _RULES.get(node.target) or _RULES.get(getattr(node.target, "overloadpacket", None))
    return int(rule(node)) if rule else 0


def count_flops(gm: GraphModule) -> int:
    """Total FLOPs of ``gm`` for one call on inputs shaped like its ``meta["val"]`` examples."""
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
