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

import re

from graphopt.ir import NotApplicable, aten, get_tensor, is_op, normalized_args, only_user, shape_of, val_of

__all__ = [
    "module_path",
    "node_names",
    "select_layers",
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
    "ViewChain",
    "VIEW_CHAIN_OPS",
    "view_chain",
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


# ----------------------------------------------------------------------------- chains of views

VIEW_CHAIN_OPS = (
    *_RESHAPES,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
)
"""Ops that :func:`view_chain` composes: reshapes (``squeeze`` / ``unsqueeze`` included: they keep
the element order), permutations, and ``contiguous`` (the same values)."""


@dataclass(frozen=True)
class ViewChain:
    """The composite of a chain of views and permutes, written as ``split -> permute -> merge``.

    The chain's input ``x`` computes the chain's output as
    ``x.view(blocks).permute(perm).reshape(output_shape)``, where

    * ``blocks`` are the sizes (``sympy`` expressions) of the intermediate dimensions, in the
      input's order: input dimension ``d`` splits into the next ``input_blocks[d]`` of them, row
      major (0: a size-1 dimension that is dropped), so the first view only splits and squeezes;
    * ``perm`` orders the blocks as the output reads them (``permute`` semantics);
    * output dimension ``j`` merges the next ``output_blocks[j]`` permuted blocks (0: a size-1
      dimension), so the last reshape only merges and unsqueezes.

    Blocks are as coarse as that allows: two pieces of one input dimension stay one block when they
    stay adjacent, in order, within one output dimension.
    """

    blocks: tuple
    input_blocks: tuple[int, ...]
    perm: tuple[int, ...]
    output_blocks: tuple[int, ...]

    @property
    def splits(self) -> bool:
        """Whether the first view is not an identity."""
        return any(n != 1 for n in self.input_blocks)

    @property
    def permutes(self) -> bool:
        return self.perm != tuple(range(len(self.perm)))

    @property
    def merges(self) -> bool:
        """Whether the last reshape is not an identity."""
        return any(n != 1 for n in self.output_blocks)


def _size_expr(size: Any) -> Any:
    import sympy

    if isinstance(size, torch.SymInt):
        return sympy.expand(size.node.expr)
    return sympy.Integer(int(size))


def _quotient(a: Any, b: Any) -> Any:
    """``a / b`` when it is provably a whole number (an integer polynomial in the size symbols), else None."""
    import sympy

    q = sympy.cancel(a / b)
    if sympy.fraction(q)[1] != 1:  # s0 / 2 and 3 / 2 both keep a denominator
        return None
    return sympy.expand(q)


def _chain_steps(nodes: Sequence[Node]) -> list[tuple[str, Any]] | None:
    steps: list[tuple[str, Any]] = []
    for node in nodes:
        if not is_op(node, *VIEW_CHAIN_OPS):
            return None
        if is_op(node, aten.contiguous.default):
            if normalized_args(node).get("memory_format") not in (None, 0, torch.contiguous_format):
                return None
            continue
        perm = permutation(node)
        if perm is not None:
            steps.append(("permute", perm))
            continue
        shape = shape_of(node)
        if shape is None:
            return None
        steps.append(("reshape", tuple(_size_expr(s) for s in shape)))
    return steps


def view_chain(nodes: Sequence[Node]) -> ViewChain | None:
    """The composite of ``nodes``, a chain of :data:`VIEW_CHAIN_OPS` each reading the one before
    (``nodes[0]`` reads the chain's input), as a :class:`ViewChain`; None when it cannot be proved.

    Sizes come from ``meta["val"]``; a reshape is followed only where each of its output sizes is
    provably a product of consecutive (pieces of) the sizes it reads, symbolic sizes included
    (``4*s0`` read as ``s0`` then ``4``), so the composite holds for every value of the symbols.
    """
    import sympy

    if not nodes or not isinstance(nodes[0].args[0], Node):
        return None
    in_shape = shape_of(nodes[0].args[0])
    steps = _chain_steps(nodes)
    if in_shape is None or steps is None:
        return None
    sizes: list[Any] = []  # atom id -> size; an atom is a factor of the input no step splits further
    refined: dict[int, list[int]] = {}  # atom -> the two atoms it was split into

    def new_atom(size: Any) -> int:
        sizes.append(size)
        return len(sizes) - 1

    def expand(atom: int) -> list[int]:
        return [a for part in refined[atom] for a in expand(part)] if atom in refined else [atom]

    inputs = [[] if s == 1 else [new_atom(s)] for s in (_size_expr(x) for x in in_shape)]
    dims = [list(group) for group in inputs]
    for kind, arg in steps:
        if kind == "permute":
            if len(arg) != len(dims):
                return None
            dims = [dims[p] for p in arg]
            continue
        seq = [a for group in dims for a in group for a in expand(a)]
        i, new_dims = 0, []
        for target in arg:
            group, rest = [], target
            while rest != 1:
                if i >= len(seq):
                    return None
                atom = seq[i]
                q = _quotient(rest, sizes[atom])
                if q is not None:
                    group.append(atom)
                    rest, i = q, i + 1
                    continue
                q = _quotient(sizes[atom], rest)
                if q is None:
                    return None
                first, second = new_atom(rest), new_atom(q)
                refined[atom] = [first, second]
                group.append(first)
                seq[i], rest = second, sympy.Integer(1)
            new_dims.append(group)
        if i != len(seq):
            return None
        dims = new_dims
    ins = [[a for x in group for a in expand(x)] for group in inputs]
    outs = [[a for x in group for a in expand(x)] for group in dims]
    in_order = [a for g in ins for a in g]
    out_order = [a for g in outs for a in g]
    if sorted(in_order) != sorted(out_order):
        return None
    out_pos = {a: k for k, a in enumerate(out_order)}
    out_dim = {a: j for j, g in enumerate(outs) for a in g}
    blocks: list[list[int]] = []
    input_blocks = []
    for group in ins:
        count = 0
        for a in group:
            if count and out_pos[a] == out_pos[blocks[-1][-1]] + 1 and out_dim[a] == out_dim[blocks[-1][-1]]:
                blocks[-1].append(a)
            else:
                blocks.append([a])
                count += 1
        input_blocks.append(count)
    perm = tuple(sorted(range(len(blocks)), key=lambda b: out_pos[blocks[b][0]]))
    first_atoms = {blocks[b][0] for b in range(len(blocks))}
    output_blocks = tuple(sum(a in first_atoms for a in g) for g in outs)
    block_sizes = tuple(sympy.expand(sympy.Mul(*(sizes[a] for a in b))) for b in blocks)
    return ViewChain(block_sizes, tuple(input_blocks), perm, output_blocks)


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


# ----------------------------------------------------------------------------- choosing layers


def module_path(node: Node, operand: str = "weight") -> str:
    """The module a node came from (its ``nn_module_stack``), else its ``operand`` constant's owner
    (``encoder.0.fc1`` for ``encoder.0.fc1.weight``; nodes a pass created lack the stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return list(stack.values())[-1][0]
    weight = normalized_args(node).get(operand)
    if isinstance(weight, Node) and weight.op == "get_attr" and weight.target.endswith(".weight"):
        return weight.target.removesuffix(".weight")
    return ""


def node_names(node: Node, operand: str = "weight") -> list[str]:
    """What a layer ``pattern`` is matched against: the ``operand`` constant's attribute name, the
    module path, the node name."""
    weight = normalized_args(node).get(operand)
    names = [weight.target] if isinstance(weight, Node) and weight.op == "get_attr" else []
    return [*names, module_path(node, operand), node.name]


def select_layers(nodes: Sequence[Node], layers: Sequence[int] | None, pattern: str | None, what: str, operand: str = "weight", op: str = "") -> list[Node]:
    """The ``nodes`` (candidate layers, in graph order) chosen by index and by name.

    ``layers``: indices into ``nodes`` (negative ones count from the end), None for all;
    ``pattern``: a regular expression searched (``re.search``) in :func:`node_names`. ``what`` names
    the layers in the :class:`NotApplicable` reasons ("linear", "LayerNorm"), ``op`` the ATen op
    they are (``"aten.layer_norm"``) when an empty graph's reason should say it.
    """
    if not nodes:
        raise NotApplicable(f"no {what}{f' ({op})' if op else ''} in the graph")
    chosen = list(nodes)
    if layers is not None:
        outside = [i for i in layers if not -len(nodes) <= i < len(nodes)]
        if outside:
            raise NotApplicable(f"layers {outside} out of range: the graph has {len(nodes)} {what}s")
        wanted = {i % len(nodes) for i in layers}
        chosen = [n for i, n in enumerate(nodes) if i in wanted]
    if pattern is not None:
        regex = re.compile(pattern)
        chosen = [n for n in chosen if any(regex.search(name) for name in node_names(n, operand))]
        if not chosen:
            raise NotApplicable(f"no {what} matches pattern {pattern!r} (first: {', '.join(node_names(nodes[0], operand))})")
    return chosen
