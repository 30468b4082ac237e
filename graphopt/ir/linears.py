"""Finding a graph's linear layers with constant weights, in every form the canonical IR writes them.

``aten.linear(x, W, b)`` (``nn.Linear``), ``aten.addmm(b, x, Wᵀ)`` and ``aten.mm(x, Wᵀ)`` (GPT-2's
``Conv1D`` stores ``Wᵀ``): :func:`find_linears` returns each as a :class:`Linear` that names its
input, its weight in ``[N, K]`` orientation and its bias node, so quantization and SmoothQuant are
written once for all three. :func:`linear_input_scale` sees through an ``x * c`` with a constant
per-channel ``c`` in front of a linear (SmoothQuant's migration left unfolded), and
:func:`pointwise_after` finds a pointwise activation a linear's epilogue can absorb.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import optimization_hint

from graphopt.ir import NotApplicable, aten, get_tensor, is_op, normalized_args, only_user, val_of
from graphopt.ir.match import select_layers

__all__ = ["Linear", "chosen_linears", "find_linears", "linear_input_scale", "pointwise_after"]


@dataclass
class Linear:
    """One linear layer ``y = x Wᵀ + b`` of a graph.

    Attributes:
        node: the ``aten.linear`` / ``addmm`` / ``mm`` node.
        x: its input node.
        weight_node: the ``get_attr`` node of the weight as stored (``[N, K]`` for ``linear``,
            ``[K, N]`` for ``addmm``/``mm``).
        bias: the bias node, or None.
        transposed: whether the stored weight is ``Wᵀ``.
    """

    node: Node
    x: Node
    weight_node: Node
    bias: Node | None
    transposed: bool

    def weight(self, gm: GraphModule) -> Tensor:
        """The weight as ``[N, K]`` (output, input)."""
        w = get_tensor(gm, self.weight_node)
        return w.t() if self.transposed else w

    @property
    def name(self) -> str:
        return self.weight_node.target

    def tokens(self) -> int | None:
        """Rows the layer multiplies on the example shapes (the product of the input's leading
        dims), None where the input has no shape. Symbolic dims count at their hint, read without
        a guard (``int()`` of a ``SymInt`` would specialize the captured graph to the example)."""
        val = val_of(self.x)
        if not isinstance(val, torch.Tensor):
            return None
        rows = 1
        for d in val.shape[:-1]:
            rows *= int(optimization_hint(d)) if isinstance(d, torch.SymInt) else int(d)
        return rows


def _constant(node) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def find_linears(gm: GraphModule) -> list[Linear]:
    """The graph's linears with a constant 2-D weight (and constant or no bias), in graph order."""
    found = []
    for node in gm.graph.nodes:
        if is_op(node, aten.linear):
            args = normalized_args(node)
            x, w, b = args["input"], args["weight"], args.get("bias")
            if _constant(w) and get_tensor(gm, w).dim() == 2 and (b is None or _constant(b)):
                found.append(Linear(node, x, w, b, transposed=False))
        elif is_op(node, aten.addmm, aten.mm):
            b, x, w = (node.args[0], node.args[1], node.args[2]) if is_op(node, aten.addmm) else (None, node.args[0], node.args[1])
            beta_alpha_default = all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha"))
            if _constant(w) and beta_alpha_default and (b is None or (_constant(b) and get_tensor(gm, b).dim() == 1)):
                found.append(Linear(node, x, w, b, transposed=True))
    return found


def chosen_linears(gm: GraphModule, layers: Sequence[int] | None, pattern: str | None) -> list[Linear]:
    """The graph's linears (:func:`find_linears`) chosen by index and name (:func:`graphopt.ir.match.select_layers`);
    :class:`NotApplicable` when there is none, or none matches."""
    linears = find_linears(gm)
    if not linears:
        raise NotApplicable("no linear with a constant weight (aten.linear, addmm or mm) in the graph")
    chosen = set(select_layers([lin.node for lin in linears], layers, pattern, "linear"))
    return [lin for lin in linears if lin.node in chosen]


def linear_input_scale(gm: GraphModule, x: Node) -> tuple[Node, Tensor] | None:
    """``(source, c)`` when ``x = source * c`` with ``c`` a constant over the last dim only (``[K]``
    or ``[1, ..., K]``), else None."""
    if not is_op(x, aten.mul) or len(x.args) != 2:
        return None
    for source, factor in (x.args, x.args[::-1]):
        if _constant(factor) and isinstance(source, Node) and not _constant(source):
            c = get_tensor(gm, factor)
            val = val_of(source)
            if isinstance(val, torch.Tensor) and c.dim() >= 1 and c.shape[-1] == val.shape[-1] and c.numel() == c.shape[-1] and c.dim() <= val.dim():
                return source, c.reshape(-1)
    return None


_ACTIVATIONS = {aten.relu: "relu"}


def pointwise_after(node: Node) -> tuple[Node, str] | None:
    """``(activation node, name)`` when ``node``'s only user is a ReLU or GELU of it, else None."""
    user = only_user(node)
    if user is None or not user.args or user.args[0] is not node:
        return None
    if is_op(user, aten.relu):
        return user, "relu"
    if is_op(user, aten.gelu):
        approximate = normalized_args(user).get("approximate", "none")
        return user, "gelu_tanh" if approximate == "tanh" else "gelu"
    return None
