"""Folding a per-channel affine map ``z = x * s + t`` into an adjacent linear or convolution.

Two folds, both exact up to rounding:

* **after** a linear / convolution ``y = W x + b`` (BatchNorm folding, the standard inference-time
  "conv-BN fusion" of Ioffe & Szegedy's BatchNorm): ``y * s + t = (W * s) x + (b * s + t)``, with
  ``s`` broadcast over the weight's output-channel dim (dim 0 for ``aten.linear`` and for
  non-transposed convolutions, grouped or not).
* **before** a linear ``y = W (x * s + t) + b`` (absorbing a normalisation's affine parameters into
  the next projection, as when LayerNorm is rewritten to RMSNorm or re-parameterised):
  ``= (W * s) x + (b + W t)``, with ``s`` broadcast over the weight's input dim. Linears only: before
  a padded convolution the shift ``t`` would not reach the zero padding, so the fold is not exact.

The tensor functions (:func:`affine_after`, :func:`affine_before`) compute in float64 and cast back
to the weight's (and bias's) dtype, so a fold costs one rounding. The graph functions
(:func:`fold_affine_after`, :func:`fold_affine_before`) attach the results with
:func:`graphopt.ir.set_tensor` / :func:`graphopt.ir.add_constant`: tensors the graph held are never
modified, and a weight or bias node that other nodes also read is copied for the rewritten op rather
than changed under its other readers. They check everything before editing, so a
:class:`graphopt.ir.NotApplicable` leaves the graph as it was.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from graphopt.ir import NotApplicable, add_constant, aten, get_tensor, is_op, normalized_args, op_name, set_tensor, shape_of

__all__ = [
    "CONV_OPS",
    "affine_after",
    "affine_before",
    "fold_affine_after",
    "fold_affine_before",
    "output_channel_dim",
]

CONV_OPS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
"""Convolutions :func:`fold_affine_after` accepts (``aten.convolution`` only when not transposed)."""


# ----------------------------------------------------------------------------- tensor arithmetic


def _float64_vector(v: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1)
    return v.expand(n) if v.numel() == 1 else v


def affine_after(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, out_dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``(W x + b) * scale + shift`` as one layer: ``(W * scale, b * scale + shift)``.

    Args:
        weight: the layer's weight; ``out_dim`` indexes its output channels.
        bias: the layer's bias (``[out_channels]``) or None for no bias.
        scale, shift: ``[out_channels]`` tensors (or scalars), any float dtype.
        out_dim: the weight's output-channel dim (0 for ``aten.linear`` and convolutions).

    Returns:
        ``(new_weight, new_bias)`` in the dtypes of ``weight`` and ``bias`` (``weight``'s without a bias).
    """
    channels = weight.shape[out_dim]
    s = _float64_vector(scale, channels, weight.device)
    t = _float64_vector(shift, channels, weight.device)
    if s.numel() != channels or t.numel() != channels:
        raise NotApplicable(f"the affine map has {s.numel()} channels, the weight {channels} output channels")
    broadcast = [1] * weight.dim()
    broadcast[out_dim] = channels
    new_weight = weight.detach().double() * s.reshape(broadcast)
    b = bias.detach().double() if bias is not None else torch.zeros(channels, dtype=torch.float64, device=weight.device)
    new_bias = b * s + t
    return new_weight.to(weight.dtype), new_bias.to(bias.dtype if bias is not None else weight.dtype)


def affine_before(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``linear(x * scale + shift, W, b)`` as one linear: ``(W * scale, b + W @ shift)``.

    Args:
        weight: an ``aten.linear`` weight, ``[out_features, in_features]``.
        bias: ``[out_features]`` or None for no bias.
        scale, shift: ``[in_features]`` tensors (or scalars), any float dtype.

    Returns:
        ``(new_weight, new_bias)`` in the dtypes of ``weight`` and ``bias`` (``weight``'s without a bias).
    """
    if weight.dim() != 2:
        raise NotApplicable(f"folding before a layer needs a [out, in] linear weight, got shape {tuple(weight.shape)}")
    features = weight.shape[1]
    s = _float64_vector(scale, features, weight.device)
    t = _float64_vector(shift, features, weight.device)
    if s.numel() != features or t.numel() != features:
        raise NotApplicable(f"the affine map has {s.numel()} channels, the weight {features} input features")
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    return (w * s).to(weight.dtype), (b + w @ t).to(bias.dtype if bias is not None else weight.dtype)


# ----------------------------------------------------------------------------- graph edits


def output_channel_dim(node: Node) -> int | None:
    """The dim of a linear's / convolution's output that indexes its output channels, or None.

    ``aten.linear``: the last dim. Convolutions: dim 1 for batched input, dim 0 for unbatched input
    (an output with one dim fewer than the weight). None for other ops or an unknown output shape.
    """
    out = shape_of(node)
    if out is None:
        return None
    if is_op(node, aten.linear):
        return len(out) - 1
    if is_op(node, *CONV_OPS):
        weight = shape_of(normalized_args(node)["weight"])
        if weight is None:
            return None
        return 1 if len(out) == len(weight) else 0
    return None


def _constant_operand(op: Node, name: str, *, optional: bool) -> Node | None:
    """The ``get_attr`` node passed as ``op``'s argument ``name`` (None if optional and absent)."""
    value = normalized_args(op)[name]
    if value is None and optional:
        return None
    if isinstance(value, Node) and value.op == "get_attr":
        return value
    if isinstance(value, Node):
        source = op_name(value.target) if value.op == "call_function" else f"a {value.op} node"
    else:
        source = repr(value)
    raise NotApplicable(f"the {name} of {op.name} is not a constant (it comes from {source})", node=op)


def _set_arg(node: Node, name: str, value: Node) -> None:
    """Set the argument called ``name`` (by schema) of ``node`` to ``value``."""
    if name in node.kwargs:
        node.update_kwarg(name, value)
        return
    index = [a.name for a in node.target._schema.arguments].index(name)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _attach(gm: GraphModule, op: Node, name: str, current: Node | None, value: torch.Tensor, hint: str) -> None:
    """Make ``op``'s argument ``name`` read ``value``: in place of ``current`` if ``op`` is its only reader."""
    if current is not None and set(current.users) == {op}:
        set_tensor(gm, current, value)
    else:
        _set_arg(op, name, add_constant(gm, value, hint, before=op))


def _linear_or_conv(op: Node, linear_only: bool) -> tuple[Node, Node | None]:
    """``op``'s constant weight and bias nodes; :class:`NotApplicable` saying why not."""
    accepted = (aten.linear,) if linear_only else (aten.linear, *CONV_OPS)
    if not is_op(op, *accepted):
        kinds = "a linear" if linear_only else "a linear or convolution"
        raise NotApplicable(f"{op.name} is {op_name(op.target) if op.op == 'call_function' else op.op}, not {kinds}", node=op)
    if is_op(op, aten.convolution) and normalized_args(op)["transposed"]:
        raise NotApplicable(f"{op.name} is a transposed convolution", node=op)
    return _constant_operand(op, "weight", optional=False), _constant_operand(op, "bias", optional=True)


def _bias_hint(weight_node: Node) -> str:
    path = weight_node.target.rsplit(".", 1)
    return f"{path[0]}.bias" if len(path) == 2 else f"{weight_node.target}_bias"


def fold_affine_after(gm: GraphModule, op: Node, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Rewrite ``op`` (``aten.linear`` or a non-transposed convolution) to compute ``op(x) * scale + shift``.

    ``scale`` and ``shift`` act per *output channel* of ``op`` (see :func:`output_channel_dim`; the
    caller checks that the map it folds is indexed by that dim). A missing bias is added. The graph
    is unchanged when :class:`NotApplicable` is raised (weight or bias not a constant, a transposed
    convolution, a channel-count mismatch).
    """
    weight_node, bias_node = _linear_or_conv(op, linear_only=False)
    bias = get_tensor(gm, bias_node) if bias_node is not None else None
    new_weight, new_bias = affine_after(get_tensor(gm, weight_node), bias, scale, shift, out_dim=0)
    _attach(gm, op, "bias", bias_node, new_bias, _bias_hint(weight_node))
    _attach(gm, op, "weight", weight_node, new_weight, weight_node.target)


def fold_affine_before(gm: GraphModule, op: Node, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Rewrite the ``aten.linear`` ``op`` to compute ``op(x * scale + shift)``.

    ``scale`` and ``shift`` act per *input feature* (the last dim of ``op``'s input). A missing bias
    is added. The graph is unchanged when :class:`NotApplicable` is raised.
    """
    weight_node, bias_node = _linear_or_conv(op, linear_only=True)
    bias = get_tensor(gm, bias_node) if bias_node is not None else None
    new_weight, new_bias = affine_before(get_tensor(gm, weight_node), bias, scale, shift)
    _attach(gm, op, "bias", bias_node, new_bias, _bias_hint(weight_node))
    _attach(gm, op, "weight", weight_node, new_weight, weight_node.target)


def as_parameter(gm: GraphModule, target: str, requires_grad: bool = False) -> torch.nn.Parameter:
    """Make the constant at ``target`` an ``nn.Parameter`` of ``gm`` (a buffer becomes one) and return it:
    what a rewrite whose new constants are trained afterwards (PRepBN, learned feature maps) calls."""
    *path, leaf = target.split(".")
    owner = gm.get_submodule(".".join(path))
    if leaf in owner._buffers:
        owner.register_parameter(leaf, torch.nn.Parameter(owner._buffers.pop(leaf), requires_grad=requires_grad))
    param = owner._parameters[leaf]
    param.requires_grad_(requires_grad)
    return param
