"""Generic helpers for recognising subgraphs of the canonical ATen IR.

Matchers in passes ask the same small questions again and again: is this node a no-op on values
(an eval-mode dropout, a cast to the dtype it already has)? is this a Python-level constant? is
this transpose a swap of the last two dimensions? does this tensor broadcast to that shape without
growing it? which operands does this matmul / bmm / einsum multiply, and transposed or not? The
answers here are deliberately conservative: when a question cannot be decided from the graph
(an unknown shape, a symbolic size that is not provably equal), the answer is "no".

Every helper reads shapes and dtypes from ``node.meta["val"]``; :func:`infer_val` fills it in for a
node a pass has just created, so that later matches in the same pass can read it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.ir import aten, get_tensor, is_op, normalized_args, only_user, shape_of, val_of

__all__ = [
    "MatmulOperands",
    "VIEW_OPS",
    "broadcasts_to",
    "identity_view_source",
    "infer_val",
    "is_value_identity",
    "known_true",
    "matmul_operands",
    "normalize_dim",
    "permutation",
    "same_shape",
    "scalar_constant",
    "source_through_identities",
    "swaps_last_two",
    "user_through_identities",
]

VIEW_OPS = (aten.view, aten.reshape, aten._unsafe_view)
"""Ops that only reinterpret a tensor's shape (same elements, same order)."""

_COPY_OPS = (aten.clone, aten.contiguous, aten.alias, aten.detach, aten.detach_, aten.lift_fresh_copy)
_CAST_OPS = (aten.to, aten._to_copy, aten.type_as)


# ----------------------------------------------------------------------------- dims and shapes


def normalize_dim(dim: int, rank: int) -> int:
    """``dim`` as a non-negative index into a tensor of ``rank`` dimensions (``-1`` -> ``rank - 1``)."""
    return dim + rank if dim < 0 else dim


def known_true(condition: Any) -> bool:
    """Whether ``condition`` (a bool, or a comparison of ints and symbolic sizes such as ``s == 1``
    or ``end >= size``) holds for every value the symbols may take; False when it is unknown.

    Never adds a guard to the shape environment, unlike ``bool(condition)`` on a symbolic one.
    """
    return bool(statically_known_true(condition))


def same_shape(a: Sequence | None, b: Sequence | None) -> bool:
    """Whether two shapes (ints or symbolic sizes) are provably equal; False when either is unknown."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(known_true(x == y) for x, y in zip(a, b))


def broadcasts_to(shape: Sequence | None, target: Sequence | None) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without changing ``target``.

    That is: ``shape`` has at most as many dimensions, and each of its dimensions (aligned from the
    right) is provably 1 or provably equal to ``target``'s.
    """
    if shape is None or target is None or len(shape) > len(target):
        return False
    return all(known_true(s == 1) or known_true(s == t) for s, t in zip(reversed(shape), reversed(target)))


def permutation(node: Node) -> tuple[int, ...] | None:
    """The dimension permutation a ``transpose`` / ``permute`` node applies, or None for other nodes.

    ``out.dim(i) == in.dim(perm[i])``; e.g. ``x.transpose(-2, -1)`` on a 4-D ``x`` is ``(0, 1, 3, 2)``.
    """
    if not isinstance(node, Node) or not is_op(node, aten.transpose, aten.permute):
        return None
    shape = shape_of(node.args[0])
    if shape is None:
        return None
    rank = len(shape)
    if is_op(node, aten.permute):
        return tuple(normalize_dim(d, rank) for d in node.args[1])
    a, b = (normalize_dim(d, rank) for d in node.args[1:3])
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return tuple(perm)


def swaps_last_two(node: Node) -> bool:
    """Whether ``node`` is a transpose/permute that exactly swaps the last two dimensions (rank >= 2)."""
    perm = permutation(node)
    if perm is None or len(perm) < 2:
        return False
    rank = len(perm)
    return perm == (*range(rank - 2), rank - 1, rank - 2)


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints, aten.unflatten.int)


def _same_tensor_type(a: Any, b: Any) -> bool:
    a, b = val_of(a), val_of(b)
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dtype == b.dtype
        and a.device == b.device
        and same_shape(tuple(a.shape), tuple(b.shape))
    )


def identity_view_source(node: Node) -> Node | None:
    """The tensor ``node`` is an identity view of, or None.

    ``node`` is one when it is a permutation that keeps every dimension in place, an ``expand`` to
    the shape its input has, or a reshape (``view``, ``reshape``, ``_unsafe_view``, ``flatten``,
    ``unflatten``) to the shape of its input or of the tensor a chain of reshapes started from (a
    reshape of a reshape is a reshape of the first input: the element order never changes). The
    shapes are compared symbolically, so ``reshape(x, [B, -1, S, D])`` on ``x`` of shape
    ``[B, H, S, D]`` (SDPA's output in Hugging Face's ``sdpa`` attention) is an identity for every
    ``B`` and ``S``; a shape that is not provably equal is not an identity.
    """
    if not isinstance(node, Node) or node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return None
    perm = permutation(node)
    if perm is not None:
        return node.args[0] if perm == tuple(range(len(perm))) else None
    if is_op(node, aten.expand.default):
        return node.args[0] if _same_tensor_type(node, node.args[0]) else None
    if not is_op(node, *_RESHAPES):
        return None
    source = node.args[0]
    while True:
        if _same_tensor_type(node, source):
            return source
        if not (is_op(source, *_RESHAPES) and isinstance(source.args[0], Node)):
            return None
        source = source.args[0]


# ----------------------------------------------------------------------------- value identities


def is_value_identity(node: Node) -> bool:
    """Whether ``node`` returns its first argument's values unchanged (same shape, dtype, device).

    Covers copies (``clone``, ``contiguous``, ``alias``, ``detach``, ``lift_fresh_copy``), dropout
    in eval mode (``train=False``) or with ``p=0``, and casts (``to``, ``_to_copy``, ``type_as``) to the
    dtype and device the tensor already has.
    """
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if is_op(node, aten.dropout):
        args = normalized_args(node)
        return args["train"] is False or args["p"] == 0
    if not is_op(node, *_COPY_OPS, *_CAST_OPS):
        return False
    src, out = val_of(node.args[0]) if node.args else None, val_of(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return src.dtype == out.dtype and src.device == out.device and src.layout == out.layout and same_shape(tuple(src.shape), tuple(out.shape))


def source_through_identities(node: Any) -> tuple[Any, list[Node]]:
    """Walk back from ``node`` through value identities; returns ``(source, identities_passed)``."""
    passed: list[Node] = []
    while is_value_identity(node):
        passed.append(node)
        node = node.args[0]
    return node, passed


def user_through_identities(node: Node) -> tuple[Node | None, list[Node]]:
    """Follow ``node``'s single-user edges through value identities to the first other consumer.

    Returns ``(consumer, identities_passed)``; ``consumer`` is None when ``node`` or an identity on
    the way has no user or several (the walk then stops at that node, the last entry of the list
    or ``node`` itself).
    """
    passed: list[Node] = []
    current = node
    while True:
        user = only_user(current)
        if user is None:
            return None, passed
        if not is_value_identity(user):
            return user, passed
        passed.append(user)
        current = user


def scalar_constant(value: Any) -> float | None:
    """The number ``value`` stands for when it is a compile-time constant scalar, else None.

    A Python ``int``/``float`` (not ``bool``), or a node that reads, possibly through value
    identities, a one-element ``get_attr`` tensor of the graph. Symbolic sizes, graph inputs and
    computed tensors are not constants.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, Node):
        return None
    source, _ = source_through_identities(value)
    if source.op != "get_attr":
        return None
    tensor = get_tensor(source.graph.owning_module, source)
    if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1 or tensor.dtype == torch.bool:
        return None
    return float(tensor.item())


# ----------------------------------------------------------------------------- products


@dataclass(frozen=True)
class MatmulOperands:
    """A node computing ``op(left) @ op(right)`` over identical leading (batch) dimensions.

    ``op`` transposes the last two dimensions where the matching flag is set.
    """

    left: Node
    right: Node
    left_transposed: bool = False
    right_transposed: bool = False


def _einsum_tokens(term: str) -> list[str] | None:
    """Subscripts of one einsum term, a leading ``...`` as a single token; None if unsupported."""
    ellipsis = term.startswith("...")
    letters = term[3:] if ellipsis else term
    if not letters.isalpha():
        return None
    return (["..."] if ellipsis else []) + list(letters)


def _einsum_operands(node: Node) -> MatmulOperands | None:
    equation, operands = node.args[0], node.args[1]
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    a, b, out = (_einsum_tokens(t) for t in (*terms, output))
    if a is None or b is None or out is None or not (len(a) == len(b) == len(out) >= 3):
        return None
    batch, (i, j) = out[:-2], out[-2:]
    if a[:-2] != batch or b[:-2] != batch or len(set(out)) != len(out):
        return None
    a_last, b_last = a[-2:], b[-2:]
    if j in a_last and i in b_last:  # operands written in (key, query) order
        a, b, a_last, b_last = b, a, b_last, a_last
        operands = operands[::-1]
    contracted = {*a_last, *b_last} - {i, j}
    if len(contracted) != 1 or set(a_last) != {i, *contracted} or set(b_last) != {j, *contracted}:
        return None
    (c,) = contracted
    if c in batch or i == c or j == c:
        return None
    return MatmulOperands(operands[0], operands[1], left_transposed=a_last == [c, i], right_transposed=b_last == [j, c])


def matmul_operands(node: Node) -> MatmulOperands | None:
    """How ``node`` multiplies matrices, for ``aten.matmul`` / ``aten.bmm`` / two-operand ``aten.einsum``.

    ``matmul`` counts only when both operands have at least two dimensions (no vector semantics);
    an einsum counts when it is a batched matrix product with the same batch subscripts, in the
    same order, on both operands and the output (``"bhqd,bhkd->bhqk"`` is ``q @ k^T``: right
    transposed). Batch *sizes* are not compared here (``matmul`` broadcasts them); callers that need
    them equal check the shapes.
    """
    if not isinstance(node, Node):
        return None
    if is_op(node, aten.matmul, aten.bmm):
        left, right = node.args[0], node.args[1]
        left_shape, right_shape = shape_of(left), shape_of(right)
        if left_shape is None or right_shape is None or len(left_shape) < 2 or len(right_shape) < 2:
            return None
        return MatmulOperands(left, right)
    if is_op(node, aten.einsum):
        return _einsum_operands(node)
    return None


# ----------------------------------------------------------------------------- new nodes


def infer_val(node: Node) -> None:
    """Set ``meta["val"]`` of a freshly created ``call_function`` node from its inputs' fake values.

    Runs the op under the fake mode of its inputs, so symbolic sizes stay symbolic. Leaves the node
    as it is when an input has no fake value.
    """
    from torch._guards import detect_fake_mode

    missing = []

    def fake(arg):
        val = val_of(arg)
        if val is None:
            missing.append(arg)
        return val

    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), fake)
    if missing:
        return
    fake_mode = detect_fake_mode(torch.utils._pytree.tree_leaves((args, kwargs)))
    if fake_mode is None:
        return
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)
