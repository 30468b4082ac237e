"""``fold_batchnorm``: fold inference-mode BatchNorm into the convolution or linear before it.

In eval mode BatchNorm (Ioffe & Szegedy, 2015) is a fixed per-channel affine map,
``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so when ``x`` is the output of a convolution or
linear whose output channels are BatchNorm's channel dim (dim 1), the map folds into that layer:
``W' = W * s`` and ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` (``b = 0``
without a bias), computed in float64 by :func:`graphopt.ir.weights.fold_affine_after`. The BatchNorm
node disappears; the layer keeps its shape and cost.

Matched forms: ``aten.batch_norm`` (what the canonical IR holds) and the tuple-returning
``aten.native_batch_norm`` / ``aten._native_batch_norm_legit*`` (read through ``getitem(., 0)``) of
decomposed graphs. A BatchNorm is left alone, with its reason in the pass's message, when it
normalises with batch statistics (training mode, ``track_running_stats=False``), when its parameters
or statistics are not constants, when its input is not a convolution / linear, is also read by
another node, or has its channels elsewhere than dim 1 (a linear on ``[N, C, L]``), or when the
layer's weight or bias is not a constant. A weight that other layers share is copied, not changed.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from graphopt.ir import aten, get_tensor, is_op, normalized_args, op_name, op_nodes, replace_node, shape_of
from graphopt.ir.weights import CONV_OPS, fold_affine_after, output_channel_dim
from graphopt.pipeline.pass_base import NotApplicable, Pass, PassContext, PassResult, register_pass

BATCH_NORM_OPS = (
    aten.batch_norm,
    aten.native_batch_norm,
    aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training,
    aten._native_batch_norm_legit_functional,
)
_BATCH_NORM_CHANNEL_DIM = 1


def _normalized_output(bn: Node) -> Node | None:
    """The node holding the normalised tensor: ``bn`` itself, or its ``getitem(bn, 0)``."""
    if is_op(bn, aten.batch_norm):
        return bn
    return next((u for u in bn.users if u.target is operator.getitem and u.args[1] == 0), None)


def _why_not_foldable(bn: Node) -> str | None:
    """Why ``bn`` cannot be folded into its input's layer, or None when it can."""
    args = normalized_args(bn)
    if args.get("training", False) or args.get("running_mean") is None:
        return "normalises with batch statistics (training mode or track_running_stats=False)"
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = args[name]
        if value is not None and not (isinstance(value, Node) and value.op == "get_attr"):
            return f"its {name} is not a constant"
    output = _normalized_output(bn)
    if output is None:
        return "its normalised output is unused"
    if output is not bn and any(u is not output and (u.target is not operator.getitem or u.users) for u in bn.users):
        return "its saved batch statistics are used"
    layer = args["input"]
    if layer.op != "call_function":
        kind = "a graph input" if layer.op == "placeholder" else f"a {layer.op} node"
        return f"its input {layer.name} is {kind}, not a convolution or linear"
    if not is_op(layer, aten.linear, *CONV_OPS):
        return f"it follows {op_name(layer.target)}, not a convolution or linear"
    if len(layer.users) > 1:
        others = ", ".join(u.name for u in layer.users if u is not bn)
        return f"the output of {layer.name} is also read by {others}"
    channel_dim = output_channel_dim(layer)
    if channel_dim is None:
        return f"the shape of {layer.name}'s output is unknown"
    if channel_dim != _BATCH_NORM_CHANNEL_DIM:
        return (
            f"it normalises dim {_BATCH_NORM_CHANNEL_DIM} of {layer.name}'s output {list(shape_of(layer) or [])}, "
            f"but {layer.name}'s output channels are dim {channel_dim}"
        )
    return None


def _scale_shift(gm: GraphModule, bn: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm as ``x * scale + shift`` (float64): ``scale = gamma / sqrt(var + eps)``."""
    args = normalized_args(bn)
    mean = get_tensor(gm, args["running_mean"]).double()
    var = get_tensor(gm, args["running_var"]).double()
    gamma = get_tensor(gm, args["weight"]).double() if args["weight"] is not None else torch.ones_like(mean)
    beta = get_tensor(gm, args["bias"]).double() if args["bias"] is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + args["eps"])
    return scale, beta - mean * scale


def _fold(gm: GraphModule, bn: Node) -> str | None:
    """Fold ``bn`` into the layer before it and remove it; why not, when the layer refuses."""
    layer = normalized_args(bn)["input"]
    try:
        fold_affine_after(gm, layer, *_scale_shift(gm, bn))
    except NotApplicable as e:
        return e.reason
    replace_node(_normalized_output(bn), layer, erase=False)
    for user in list(bn.users):  # getitems, now unused, of the tuple-returning forms
        gm.graph.erase_node(user)
    gm.graph.erase_node(bn)
    return None


@register_pass
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding convolution / linear (exact)."""

    name = "fold_batchnorm"
    exact = True

    def analyze(self, gm: GraphModule, ctx: PassContext) -> list[Node]:
        """The BatchNorm nodes; whether each folds is decided as the rewrite reaches it, since
        folding one can make the next foldable (``conv -> bn -> bn``: the second then follows the conv)."""
        norms = op_nodes(gm, *BATCH_NORM_OPS)
        if not norms:
            raise NotApplicable("no BatchNorm in the graph")
        return norms

    def rewrite(self, gm: GraphModule, norms: list[Node], ctx: PassContext) -> PassResult:
        folded, left = 0, []
        for bn in norms:
            reason = _why_not_foldable(bn) or _fold(gm, bn)
            if reason:
                left.append(f"{bn.name}: {reason}")
            else:
                folded += 1
        message = f"left {len(left)} BatchNorm(s): " + "; ".join(left) if left else ""
        return PassResult(changed=folded > 0, stats={"folded": folded, "left": len(left)}, message=message)
