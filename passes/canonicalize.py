"""Canonicalize hand-written attention and normalization formulas into ATen's fused ops.

**Attention.** ``softmax(Q Kᵀ · scale + mask) V`` written out with ``matmul`` / ``@`` / ``bmm`` /
``einsum`` becomes one ``aten.scaled_dot_product_attention`` node. SDPA's semantics (PyTorch's
reference implementation) are::

    attn = softmax(Q @ K.transpose(-2, -1) * scale + bias, dim=-1) @ V

where ``bias`` is a float ``attn_mask`` itself, or, for a boolean ``attn_mask``, 0 where it is True
(attend) and -inf where it is False. The matcher starts from every softmax and accepts, in order:

* a query-key product ``Q @ X`` where ``X`` is ``K`` transposed in its last two dimensions
  (``transpose(-2, -1)``, ``transpose(2, 3)`` on 4-D, ``permute(0, 1, 3, 2)``) or a key tensor already
  laid out ``[..., d, S]``; ``bmm``; an einsum such as ``"bhqd,bhkd->bhqk"``;
* constant scalar scales (``*`` or ``/``) on the scores, the query and/or the key, multiplied into
  SDPA's explicit ``scale=``;
* at most one mask, applied after the scaling: an additive float mask (``scores + mask``), a
  ``masked_fill(mask, -inf)`` (True = blocked, so SDPA gets ``logical_not(mask)``) or
  ``where(mask, scores, -inf)`` (True = attend); the mask must broadcast to the scores unchanged;
* value no-ops anywhere on the way (dropout with ``train=False``, casts to the dtype a tensor already
  has, copies), and for 3-D ``bmm`` attention the ``view`` to ``[B, H, L, S]`` and back around a
  4-D mask (SDPA then runs on ``unflatten``-ed ``[B, H, ·, ·]`` inputs);
* the probabilities as the left operand of the product with ``V``.

It leaves a candidate alone, and says why, when anything is off: the softmax is not over the last
dimension, an intermediate (scores, scaled or masked scores, probabilities) has another user, the
key is permuted other than by swapping its last two dimensions, a scale is a non-scalar tensor or
not a compile-time constant (or not positive: SDPA scales Q and K by its square root), a mask does
not broadcast to the scores, tensors are of rank < 3 or have different batch sizes, dropout is in
training mode. One difference is by design: a row whose every key is masked with -inf is NaN in the
written form and zeros in SDPA.

**Normalization.** ``(x - mean(x)) * rsqrt(var(x) + eps) [* w] [+ b]`` over the last dimension, with
the variance as ``aten.var`` (no correction) or as the mean of the squared centred value and
``rsqrt`` or ``sqrt`` then divide, becomes ``aten.layer_norm``; ``x * rsqrt(mean(x²) + eps) [* w]``
becomes ``aten.rms_norm``. A cast to the dtype the value already has (Llama's ``.to(float32)`` on a
float32 model) is absorbed; any real cast ends the replaced region, so it stays in the graph.

**Views.** Identity views go: a ``view`` / ``reshape`` / ``flatten`` / ``unflatten`` to the shape its
input (or the start of a chain of reshapes) already has, an ``expand`` to its input's shape, a
permutation that moves nothing; the shapes are compared symbolically (``reshape(x, [B, -1, S, D])``
of an ``[B, H, S, D]`` SDPA output is one for every ``B`` and ``S``). A ``contiguous`` copy read
only by reshapes goes too, the reshapes reading its input (``reshape`` copies where it must). So
the heads are merged in one form, ``transpose(1, 2)`` then ``reshape``, whether the model called
SDPA or wrote attention out, and Hugging Face's two attention implementations canonicalize to the
same attention, head split and head merge.

**Chains of views.** A chain of ``view`` / ``reshape`` / ``flatten`` / ``unflatten`` / ``squeeze`` /
``unsqueeze`` / ``transpose`` / ``permute`` (and ``contiguous``) whose composite moves dimensions is
written in one form, at most three ops: a view that only splits dimensions into factors (and drops
size-1 ones; an ``unflatten`` when it splits one dimension), one ``permute``, a ``reshape`` that only
merges (and inserts size-1 dimensions), each left out when it is an identity. The composite is
derived from the symbolic sizes (``graphopt.ir.match.view_chain``: ``4*s0`` splits into ``s0`` and
``4``), so nn.MultiheadAttention's ``view [S, B*H, D] -> transpose(0, 1) -> view [B, H, S, D]``
becomes ``unflatten(-1, [H, D]) -> permute(1, 2, 0, 3)`` and its ``unflatten -> unsqueeze(0) ->
transpose(0, -2) -> squeeze(-2)`` becomes ``unflatten -> permute``. A chain runs back through
single-user nodes only, and is rewritten only when the form takes fewer ops or as many arranged
otherwise; a chain that does not move dimensions (left to the identity-view removal), that an
in-place op writes through, whose sizes cannot be proved to factor, or whose result would not have
provably the same strides (a ``contiguous`` is kept last when the chain's result was contiguous, so
``view`` readers stay valid) stays as written.

**Attention masks.** An ``aten.scaled_dot_product_attention`` with ``is_causal=False`` whose
``attn_mask`` is computed from positions alone drops the mask. Hugging Face decoders captured with
``torch.export`` build an explicit boolean ``[B, 1, L, L]`` mask from ``arange``-s, position ids
and their packed-sequence check even when the model takes only ``input_ids`` (eager PyTorch passes
no mask and ``is_causal=True``); SDPA then cannot take its causal kernels and reads an ``L x L``
mask per layer. :class:`graphopt.ir.masks.MaskAnalysis` evaluates the mask's derivation; a mask
proved :class:`~graphopt.ir.masks.Causal` over its last two dims (query positions along -2, key
positions along -1, broadcast over batch and heads, both of the mask's full size) with True where
the key position is at most the query position and False elsewhere (or, additive, 0 and -inf),
and with query and key of provably the same length, becomes ``attn_mask=None, is_causal=True``:
SDPA's causal mask is exactly that lower triangle. A mask proved all True (or additive all 0)
goes. The mask's derivation, now read by nothing, is erased. A mask that also depends on another
input (an ``attention_mask`` of padding), that offsets the query positions (a KV cache), compares
positions otherwise (a sliding window) or is not provably causal for any other reason stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.ir import aten, external_user, is_op, normalized_args, only_user, op_name, replace_node, shape_of, val_of
from graphopt.ir.match import (
    VIEW_CHAIN_OPS,
    VIEW_OPS,
    broadcasts_to,
    identity_view_source,
    infer_val,
    is_value_identity,
    known_true,
    matmul_operands,
    normalize_dim,
    permutation,
    same_shape,
    scalar_constant,
    source_through_identities,
    swaps_last_two,
    user_through_identities,
    view_chain,
)
from graphopt.ir.masks import Causal, Const, MaskAnalysis
from graphopt.pipeline.pass_base import NotApplicable, Pass, PassContext, PassResult, register_pass, summarize_reasons

_SOFTMAX_OPS = (aten.softmax.int, aten._softmax.default)
_SCALE_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)


# ----------------------------------------------------------------------------- small predicates


def _users_text(node: Node) -> str:
    return f"{len(node.users)} users: " + ", ".join(u.name for u in node.users) if node.users else "no user"


def _leak(region: list[Node], output: Node) -> str | None:
    """Why replacing ``region`` by one node computing ``output`` would change another reader, if it would."""
    inside = {*region, output}
    leak = external_user(inside, keep=[output])
    if leak is None:
        return None
    return f"{leak.name} is also used by " + ", ".join(u.name for u in leak.users if u not in inside)


def _keeps_shape_and_dtype(node: Node, operand: Node) -> bool:
    out, src = val_of(node), val_of(operand)
    return out is not None and src is not None and out.dtype == src.dtype and same_shape(tuple(out.shape), tuple(src.shape))


def _reduces_last_dim(dims: Any, rank: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and normalize_dim(dims[0], rank) == rank - 1


def _scale_factor(node: Node) -> tuple[Node, float] | str | None:
    """``(operand, factor)`` when ``node`` is ``operand * c`` or ``operand / c`` for a constant scalar ``c``.

    None when ``node`` is no multiplication or division; a reason when it is one, but not by a
    constant scalar (so it cannot be folded into SDPA's ``scale``).
    """
    if not is_op(node, *_SCALE_OPS):
        return None
    a, b = node.args[0], node.args[1]
    if is_op(node, aten.div):
        if not isinstance(a, Node):
            return None  # c / x is not a scaling of x
        operand, constant = a, b
    elif scalar_constant(a) is not None and isinstance(b, Node):
        operand, constant = b, a
    elif isinstance(a, Node) and isinstance(b, Node) and not same_shape(shape_of(a), shape_of(node)):
        operand, constant = b, a  # neither is a constant: blame the operand that is not the full tensor
    else:
        operand, constant = a, b
    value = scalar_constant(constant)
    if value is None:
        shape = shape_of(constant) if isinstance(constant, Node) else None
        if shape is not None and math.prod(shape) != 1:
            return f"{node.name} multiplies by {constant.name} of shape {tuple(shape)}, not a scalar"
        name = constant.name if isinstance(constant, Node) else repr(constant)
        return f"the scale {name} in {node.name} is not a compile-time constant"
    if is_op(node, aten.div):
        if value == 0:
            return f"{node.name} divides by zero"
        value = 1.0 / value
    if not _keeps_shape_and_dtype(node, operand):
        return f"the scale in {node.name} changes the shape or dtype of {operand.name}"
    return operand, value


def _peel_scales(node: Any) -> tuple[Any, list[Node], float]:
    """Walk back through single-user constant scalings of ``node``: ``(source, nodes, factor)``."""
    nodes, factor = [], 1.0
    while isinstance(node, Node) and len(node.users) == 1:
        step = _scale_factor(node)
        if not isinstance(step, tuple):
            break
        nodes.append(node)
        node, f = step
        factor *= f
    return node, nodes, factor


def _leads_to_product(node: Any) -> bool:
    """Whether ``node`` is a matrix product, up to value no-ops, views and constant scalings."""
    while isinstance(node, Node):
        if matmul_operands(node) is not None:
            return True
        if is_value_identity(node) or is_op(node, *VIEW_OPS):
            node = node.args[0]
            continue
        step = _scale_factor(node)
        if not isinstance(step, tuple):
            return False
        node = step[0]
    return False


# ----------------------------------------------------------------------------- attention


@dataclass
class _AttentionMatch:
    """One explicit attention, ready to become an SDPA node."""

    output: Node  # the probabilities-values product; SDPA takes over its users
    query: Node
    key: Node
    key_is_transposed: bool  # ``key`` is laid out [..., d, S]; SDPA needs [..., S, d]
    value: Node
    scale: float
    mask: Node | None = None
    mask_blocks: bool = False  # a True entry blocks (masked_fill polarity): SDPA needs the negation
    batch_sizes: list | None = None  # sizes of the 4-D view around a 3-D bmm product
    region: list[Node] = field(default_factory=list)  # nodes that die once ``output`` is replaced


def _mask_step(node: Node) -> tuple[Node, Node, bool] | None:
    """``(scores, mask, mask_blocks)`` when ``node`` applies a mask to ``scores``, else None.

    Raises :class:`NotApplicable` for a masking SDPA cannot express.
    """
    if is_op(node, aten.add.Tensor):
        a, b = node.args[0], node.args[1]
        if normalized_args(node)["alpha"] != 1 or not (isinstance(a, Node) and isinstance(b, Node)):
            return None
        scores, mask = (a, b) if _leads_to_product(a) else (b, a)
        if not _leads_to_product(scores):
            raise NotApplicable(f"neither operand of {node.name} comes from a query-key product")
        mask_val, scores_val = val_of(mask), val_of(scores)
        if mask_val is None or scores_val is None or mask_val.dtype != scores_val.dtype:
            raise NotApplicable(f"the additive mask {mask.name} does not have the scores' dtype")
        blocks = False
    elif is_op(node, aten.masked_fill.Scalar):
        scores, mask, fill = node.args[0], node.args[1], node.args[2]
        if fill != -math.inf:
            raise NotApplicable(f"{node.name} fills with {fill}, not -inf")
        blocks = True
    elif is_op(node, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        mask, a, b = node.args[0], node.args[1], node.args[2]
        if scalar_constant(b) == -math.inf and isinstance(a, Node):
            scores, blocks = a, False
        elif scalar_constant(a) == -math.inf and isinstance(b, Node):
            scores, blocks = b, True
        else:
            raise NotApplicable(f"{node.name} selects between the scores and something other than -inf")
    else:
        return None
    if not isinstance(mask, Node) or not broadcasts_to(shape_of(mask), shape_of(scores)):
        shape = shape_of(mask) if isinstance(mask, Node) else None
        raise NotApplicable(f"mask of shape {shape} does not broadcast to the scores {shape_of(scores)}")
    if not _keeps_shape_and_dtype(node, scores):
        raise NotApplicable(f"{node.name} changes the shape or dtype of the scores")
    return scores, mask, blocks


def _unfold_sizes(views: list[Node], mask_inside: bool) -> list | None:
    """The leading sizes of the view in ``bmm -> view [B, H, L, S] -> mask -> view back``.

    None when SDPA can run on the 3-D product's operands as they are: no views, or views around
    nothing but scalings (the mask, if any, applies to the 3-D scores).
    """
    if not views:
        return None
    if len(views) != 2:
        raise NotApplicable("the scores are reshaped between the query-key product and the softmax")
    refold, unfold = views  # backward order: the view nearest the softmax comes first
    flat, unfolded = shape_of(unfold.args[0]), shape_of(unfold)
    if (
        flat is None
        or unfolded is None
        or len(flat) != 3
        or len(unfolded) < 4
        or not same_shape(unfolded[-2:], flat[-2:])
        or not same_shape(shape_of(refold), flat)
    ):
        raise NotApplicable("the scores are reshaped other than by splitting and re-merging their batch dimension")
    return list(unfold.args[1][:-2]) if mask_inside else None


def _match_attention(softmax: Node) -> _AttentionMatch:
    args = normalized_args(softmax)
    scores = args["self"]
    shape = shape_of(scores)
    if shape is None:
        raise NotApplicable("the softmax input has no shape information")
    rank = len(shape)
    if rank < 3:
        raise NotApplicable(f"the scores are {rank}-D; only batched attention (rank >= 3) is matched")
    if normalize_dim(args["dim"], rank) != rank - 1:
        raise NotApplicable(f"softmax over dim {args['dim']}, not the last dimension")
    if val_of(softmax).dtype != val_of(scores).dtype:
        raise NotApplicable("the softmax changes the dtype")

    # forward: probabilities -> (no-ops) -> product with V
    region = [softmax]
    output, passed = user_through_identities(softmax)
    region += passed
    probs = region[-1]
    if output is None:
        raise NotApplicable(f"the attention probabilities ({probs.name}) have {_users_text(probs)}")
    if is_op(output, aten.dropout):
        raise NotApplicable(f"{output.name} is a dropout in training mode")
    pv = matmul_operands(output)
    if pv is None:
        raise NotApplicable(f"the probabilities feed {op_name(output.target)}, not a product with the values")
    if pv.left is not probs or pv.left_transposed or pv.right_transposed or pv.right is probs:
        raise NotApplicable(f"{output.name} is not probabilities @ values")

    # backward: softmax input -> (mask) -> (scales) -> query-key product
    node, scale, scaled, mask, blocks, views, mask_inside = scores, 1.0, False, None, False, [], False
    while True:
        if len(node.users) != 1:
            raise NotApplicable(f"the attention scores ({node.name}) have {_users_text(node)}")
        region.append(node)
        if is_value_identity(node):
            node = node.args[0]
            continue
        if is_op(node, *VIEW_OPS):
            views.append(node)
            node = node.args[0]
            continue
        masked = _mask_step(node)
        if masked is not None:
            if mask is not None:
                raise NotApplicable("more than one mask is applied to the scores")
            if scaled:
                raise NotApplicable("the scores are scaled after the mask, SDPA scales before it")
            node, mask, blocks = masked
            mask_inside = len(views) == 1
            continue
        step = _scale_factor(node)
        if isinstance(step, str):
            raise NotApplicable(step)
        if step is None:
            break
        node, factor = step
        scale, scaled = scale * factor, True
    product = node
    qk = matmul_operands(product)
    if qk is None:
        raise NotApplicable(f"the softmax input comes from {op_name(product.target)} ({product.name}), not a query-key product")
    if qk.left_transposed:
        raise NotApplicable(f"the query is transposed in {product.name}")
    batch_sizes = _unfold_sizes(views, mask_inside)

    query, nodes, factor = _peel_scales(qk.left)
    region += nodes
    scale *= factor
    key, nodes, factor = _peel_scales(qk.right)
    region += nodes
    scale *= factor
    key_is_transposed = not qk.right_transposed
    if key_is_transposed and permutation(key) is not None:
        if not swaps_last_two(key):
            raise NotApplicable(f"the key ({key.name}) is permuted {permutation(key)}, not transposed in its last two dimensions")
        if len(key.users) == 1:
            region.append(key)
            key, nodes, factor = _peel_scales(key.args[0])
            region += nodes
            scale *= factor
        else:
            key = key.args[0]
        key_is_transposed = False

    value = pv.right
    _check_operands(query, key, key_is_transposed, value, mask, region)
    if not (math.isfinite(scale) and scale > 0):
        raise NotApplicable(f"the combined scale {scale:g} is not a positive finite number")
    leak = _leak(region, output)
    if leak is not None:
        raise NotApplicable(leak)
    return _AttentionMatch(output, query, key, key_is_transposed, value, scale, mask, blocks, batch_sizes, region)


def _check_operands(query, key, key_is_transposed, value, mask, region) -> None:
    shapes = [shape_of(t) if isinstance(t, Node) else None for t in (query, key, value)]
    if any(s is None for s in shapes):
        raise NotApplicable("query, key or value has no shape information")
    q_shape, k_shape, v_shape = shapes
    if key_is_transposed:
        k_shape = (*k_shape[:-2], k_shape[-1], k_shape[-2])
    if not len(q_shape) == len(k_shape) == len(v_shape):
        raise NotApplicable("query, key and value have different ranks")
    if not (same_shape(q_shape[:-2], k_shape[:-2]) and same_shape(q_shape[:-2], v_shape[:-2])):
        raise NotApplicable("query, key and value have different batch sizes (a broadcast product)")
    dtypes = {val_of(t).dtype for t in (query, key, value)}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise NotApplicable(f"query, key and value dtypes are {sorted(map(str, dtypes))}")
    if value in region or (mask is not None and mask in region):
        raise NotApplicable("the values or the mask are computed from the attention itself")


def _rewrite_attention(gm: GraphModule, m: _AttentionMatch) -> None:
    graph = gm.graph

    def new(target, args, kwargs=None) -> Node:
        node = graph.call_function(target, args, kwargs or {})
        infer_val(node)
        return node

    with graph.inserting_before(m.output):
        key = new(aten.transpose.int, (m.key, -2, -1)) if m.key_is_transposed else m.key
        mask = new(aten.logical_not.default, (m.mask,)) if m.mask is not None and m.mask_blocks else m.mask
        q, k, v = m.query, key, m.value
        if m.batch_sizes is not None:
            q, k, v = (new(aten.unflatten.int, (t, 0, m.batch_sizes)) for t in (q, k, v))
        args = (q, k, v) if mask is None else (q, k, v, mask)
        out = new(aten.scaled_dot_product_attention.default, args, {"scale": m.scale})
        if m.batch_sizes is not None:
            out = new(aten.flatten.using_ints, (out, 0, len(m.batch_sizes) - 1))
    replace_node(m.output, out)
    _erase_dead(gm, m.region)


def _erase_dead(gm: GraphModule, region: list[Node]) -> None:
    doomed = set(region)
    for node in reversed(list(gm.graph.nodes)):
        if node in doomed and not node.users:
            gm.graph.erase_node(node)


# ----------------------------------------------------------------------------- normalization


@dataclass
class _NormMatch:
    """One explicit LayerNorm / RMSNorm, ready to become ``aten.layer_norm`` / ``aten.rms_norm``."""

    kind: str  # "layer_norm" or "rms_norm"
    x: Node
    eps: float
    output: Node
    weight: Node | None = None
    bias: Node | None = None
    region: list[Node] = field(default_factory=list)


def _same_value(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same tensor up to value no-ops (casts to its own dtype, copies)."""
    return source_through_identities(a)[0] is source_through_identities(b)[0]


def _is_mean_last(node: Any, of: Any = None) -> bool:
    """``mean(t, [-1], keepdim=True)`` (of ``of`` up to value no-ops, when given), without a dtype change."""
    if not is_op(node, aten.mean.dim):
        return False
    args = normalized_args(node)
    shape = shape_of(args["self"])
    return (
        shape is not None
        and _reduces_last_dim(args["dim"], len(shape))
        and args["keepdim"] is True
        and args["dtype"] is None
        and (of is None or _same_value(args["self"], of))
    )


def _centred(node: Any) -> Node | None:
    """``x`` when ``node`` is ``x - mean(x, -1, keepdim=True)``, else None."""
    if not is_op(node, aten.sub.Tensor) or normalized_args(node)["alpha"] != 1:
        return None
    x, mean = node.args[0], node.args[1]
    return x if _is_mean_last(mean, of=x) else None


def _squared(node: Any) -> Node | None:
    """``t`` when ``node`` is ``t ** 2`` or ``t * t``, else None."""
    if is_op(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if is_op(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _is_norm_candidate(node: Node) -> bool:
    """``rsqrt`` / ``sqrt`` of ``statistic + something``, the statistic a ``mean`` or ``var``."""
    if not is_op(node, aten.rsqrt, aten.sqrt):
        return False
    total, _ = source_through_identities(node.args[0])
    if not is_op(total, aten.add.Tensor):
        return False
    return any(is_op(a, aten.mean, aten.var) for a in total.args[:2] if isinstance(a, Node))


def _variance_of(stat: Node, region: list[Node]) -> tuple[str, Node]:
    """``("layer_norm", x)`` for a biased variance of ``x``, ``("rms_norm", x)`` for a mean square."""
    shape = shape_of(stat.args[0])
    if shape is None:
        raise NotApplicable(f"{stat.name} has no shape information")
    if is_op(stat, aten.var):
        if not is_op(stat, aten.var.correction, aten.var.dim):
            raise NotApplicable(f"{stat.name} is not a variance over given dimensions")
        args = normalized_args(stat)
        biased = args.get("correction", None) == 0 or args.get("unbiased", None) is False
        if not (_reduces_last_dim(args["dim"], len(shape)) and args["keepdim"] is True and biased):
            raise NotApplicable(f"{stat.name} is not a biased variance over the last dimension with keepdim")
        return "layer_norm", stat.args[0]
    if not _is_mean_last(stat):
        raise NotApplicable(f"{stat.name} is not a mean over the last dimension with keepdim")
    square, passed = source_through_identities(stat.args[0])
    base = _squared(square)
    if base is None:
        raise NotApplicable(f"{stat.name} averages {square.name}, not a square")
    region += [*passed, square]
    x = _centred(base)
    if x is None:
        return "rms_norm", base
    region += [base, base.args[1]]
    return "layer_norm", x


def _normalized_value(kind: str, x: Node, anchor: Node, region: list[Node]) -> Node:
    """The node computing ``centred(x) * rsqrt(...)`` (or ``x * rsqrt(...)`` for RMSNorm)."""
    user, passed = user_through_identities(anchor)
    region += passed
    inverse = passed[-1] if passed else anchor
    if user is None:
        raise NotApplicable(f"{inverse.name} has {_users_text(inverse)}")
    if is_op(anchor, aten.rsqrt) and is_op(user, aten.mul.Tensor):
        operands = [a for a in user.args[:2] if a is not inverse]
    elif is_op(anchor, aten.sqrt) and is_op(user, aten.div.Tensor) and user.args[1] is inverse:
        operands = [user.args[0]]
    else:
        raise NotApplicable(f"{user.name} does not normalize by {anchor.name}")
    if len(operands) != 1:
        raise NotApplicable(f"{user.name} does not normalize by {anchor.name}")
    scaled = operands[0]
    if kind == "rms_norm" and not _same_value(scaled, x):
        raise NotApplicable(f"{user.name} normalizes {scaled.name}, not {x.name}")
    if kind == "layer_norm":
        if not _same_value(_centred(scaled), x):
            raise NotApplicable(f"{user.name} normalizes {scaled.name}, not the centred {x.name}")
        region += [scaled, scaled.args[1]]
    return user


def _affine_step(node: Node, ops: tuple, size: int) -> tuple[Node, Node, list[Node]] | None:
    """``(result, p, identities)`` when ``node`` feeds, through no-ops, ``op(node, p)`` with ``p`` of shape ``[size]``."""
    user, passed = user_through_identities(node)
    if user is None or not is_op(user, *ops):
        return None
    if is_op(user, aten.add.Tensor) and normalized_args(user)["alpha"] != 1:
        return None
    last = passed[-1] if passed else node
    others = [a for a in user.args[:2] if a is not last]
    if len(others) != 1 or not isinstance(others[0], Node):
        return None
    param = others[0]
    if not same_shape(shape_of(param), (size,)) or not _keeps_shape_and_dtype(user, last):
        return None
    return user, param, passed


def _match_norm(anchor: Node) -> _NormMatch:
    region = [anchor]
    total, passed = source_through_identities(anchor.args[0])
    region += [*passed, total]
    if normalized_args(total)["alpha"] != 1:
        raise NotApplicable(f"{total.name} adds with alpha != 1")
    a, b = total.args[0], total.args[1]
    stat, eps = (a, scalar_constant(b)) if is_op(a, aten.mean, aten.var) else (b, scalar_constant(a))
    if eps is None or not (math.isfinite(eps) and eps >= 0):
        raise NotApplicable(f"{total.name} does not add a constant epsilon >= 0 to the statistic")
    region.append(stat)
    kind, x = _variance_of(stat, region)
    shape, x_val = shape_of(x), val_of(x)
    if shape is None or not isinstance(shape[-1], int) or not x_val.is_floating_point():
        raise NotApplicable(f"{x.name} needs a floating-point tensor with a static last dimension")
    size = shape[-1]

    output = _normalized_value(kind, x, anchor, region)
    weight = bias = None
    step = _affine_step(output, (aten.mul.Tensor,), size)
    if step is not None:
        region += [output, *step[2]]
        output, weight = step[0], step[1]
    step = _affine_step(output, (aten.add.Tensor,), size) if kind == "layer_norm" else None
    if step is not None:
        region += [output, *step[2]]
        output, bias = step[0], step[1]
    if not _keeps_shape_and_dtype(output, x):
        raise NotApplicable(f"{output.name} does not have the shape and dtype of {x.name}")
    leak = _leak(region, output)
    if leak is not None:
        raise NotApplicable(leak)
    return _NormMatch(kind, x, eps, output, weight, bias, region)


def _rewrite_norm(gm: GraphModule, m: _NormMatch) -> None:
    size = [shape_of(m.x)[-1]]
    if m.kind == "layer_norm":
        target, args = aten.layer_norm.default, (m.x, size, m.weight, m.bias, m.eps)
    else:
        target, args = aten.rms_norm.default, (m.x, size, m.weight, m.eps)
    with gm.graph.inserting_before(m.output):
        node = gm.graph.call_function(target, args)
    infer_val(node)
    replace_node(m.output, node)
    _erase_dead(gm, m.region)


# ----------------------------------------------------------------------------- the pass


def _is_copy_before_reshapes(node: Node) -> bool:
    """A ``contiguous`` copy read only by reshapes: ``x.contiguous().view(s)`` is ``x.reshape(s)``
    (``reshape`` copies when it must), the head merge written as Hugging Face's SDPA path writes it."""
    return (
        is_op(node, aten.contiguous.default)
        and normalized_args(node).get("memory_format") in (None, 0, torch.contiguous_format)  # 0: the schema's default, as an enum value
        and bool(node.users)
        and all(is_op(u, *VIEW_OPS) and u.args[0] is node for u in node.users)
    )


def _identity_view_candidates(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if identity_view_source(n) is not None or _is_copy_before_reshapes(n)]


def _remove_identity_views(gm: GraphModule) -> int:
    """Make the users of every identity view read its source, and reshape a tensor instead of its
    ``contiguous`` copy; returns how many views and copies were bypassed.

    Each node is judged in graph order on the graph the previous removals left. What only fed the
    removed views (the first reshape of a chain, the sizes it was given) is dead code afterwards and
    erased here, so that later matches see the true user counts."""
    removed = 0
    for node in list(gm.graph.nodes):
        if _is_copy_before_reshapes(node):
            for user in list(node.users):
                user.target = aten.reshape.default
                user.args = (node.args[0], *user.args[1:])
            gm.graph.erase_node(node)
            removed += 1
            continue
        source = identity_view_source(node)
        if source is None:
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.graph.eliminate_dead_code()
    return removed


# ----------------------------------------------------------------------------- chains of views


def _is_chain_op(node: Any) -> bool:
    return isinstance(node, Node) and is_op(node, *VIEW_CHAIN_OPS) and isinstance(node.args[0], Node)


def _mutated(node: Node) -> bool:
    """Whether an in-place op writes to ``node``: a view of it must then stay a view, not a copy."""
    return any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable for u in node.users)


def _view_chain_ends(gm: GraphModule) -> list[Node]:
    """The last node of every maximal chain of views and permutes with at least two nodes; the
    chain runs back through nodes with a single user only, so its replacement duplicates nothing."""
    ends = []
    for node in gm.graph.nodes:
        user = only_user(node)
        if not _is_chain_op(node) or (_is_chain_op(user) and user.args[0] is node):
            continue
        source = node.args[0]
        if _is_chain_op(source) and len(source.users) == 1:
            ends.append(node)
    return ends


def _chain_of(end: Node) -> list[Node]:
    chain = [end]
    while _is_chain_op(chain[0].args[0]) and len(chain[0].args[0].users) == 1:
        chain.insert(0, chain[0].args[0])
    return chain


def _role(node: Node) -> tuple | None:
    """What one node of a chain does in the ``split -> permute -> merge`` form, None if several."""
    if is_op(node, aten.contiguous.default):
        return ("contiguous",)
    form = view_chain([node])
    if form is None:
        return None
    if form.permutes:
        return None if form.splits or form.merges else ("permute", form.perm)
    if form.splits and form.merges:
        return None
    return ("split",) if form.splits else ("merge",)


def _size_args(sizes: tuple, source: Node, call: Any) -> list | None:
    """Sizes for a view of ``source``: numbers, the size of a dimension of ``source`` it provably
    has (read with ``call(aten.sym_size.int, ...)``), or -1 for at most one other size."""
    src_shape = shape_of(source)
    args: list = []
    for size in sizes:
        if size.is_Integer:
            args.append(int(size))
            continue
        dims = [d for d, s in enumerate(src_shape) if isinstance(s, torch.SymInt) and (_expr_of(s) - size).expand() == 0]
        if dims:
            args.append(call(aten.sym_size.int, (source, dims[0])))
        elif -1 in args:
            return None
        else:
            args.append(-1)
    return args


def _expr_of(size: Any) -> Any:
    import sympy

    return sympy.expand(size.node.expr) if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _strides_match(node: Node, strides: Any) -> bool:
    """Whether ``node`` provably has ``strides`` (a tensor: its strides), size-1 dimensions aside."""
    val = val_of(node)
    if isinstance(strides, torch.Tensor):
        if not same_shape(tuple(val.shape), tuple(strides.shape)):
            return False
        strides = strides.stride()
    return all(known_true(size == 1) or known_true(x == y) for size, x, y in zip(val.shape, val.stride(), strides))


def _emit_view_chain(end: Node, source: Node, form: Any) -> list[Node] | None:
    """Insert ``split -> permute -> merge`` of ``source`` before ``end``: the new nodes, the last
    computing ``end``'s values with its strides (so the views reading ``end`` stay valid), or None,
    nothing left inserted, when it cannot be proved."""
    graph = end.graph
    new: list[Node] = []

    def call(target, args) -> Node:
        node = graph.call_function(target, args)
        new.append(node)
        infer_val(node)
        return node

    x: Node | None = source
    try:
        with graph.inserting_before(end):
            if form.splits:
                split = [d for d, n in enumerate(form.input_blocks) if n != 1]
                if len(split) == 1 and form.input_blocks[split[0]] > 1:  # one dim split, none dropped
                    d = split[0]
                    start = sum(form.input_blocks[:d])
                    sizes = _size_args(form.blocks[start : start + form.input_blocks[d]], source, call)
                    x = None if sizes is None else call(aten.unflatten.int, (x, d, sizes))
                else:
                    sizes = _size_args(form.blocks, source, call)
                    x = None if sizes is None else call(aten.view.default, (x, sizes))
            if x is not None and form.permutes:
                x = call(aten.permute.default, (x, list(form.perm)))
            if x is not None and form.merges:
                sizes = _size_args(tuple(_expr_of(v) for v in shape_of(end)), source, call)
                x = None if sizes is None else call(aten.reshape.default, (x, sizes))
            ref = val_of(end)
            if x is not None and not _strides_match(x, ref):
                contiguous = _strides_match(end, torch._prims_common.make_contiguous_strides_for(ref.shape))
                x = call(aten.contiguous.default, (x,)) if contiguous else None
            if x is not None and not _strides_match(x, ref):
                x = None
    except Exception:  # noqa: BLE001  (a fake op that cannot decide on symbolic sizes: leave the chain alone)
        x = None
    if x is None:
        for node in reversed(new):
            graph.erase_node(node)
        return None
    return new


def _view_chain_form(chain: list[Node]) -> Any:
    """The :class:`ViewChain` to rewrite ``chain`` with, or None when it stays as written."""
    source, end = chain[0].args[0], chain[-1]
    form = view_chain(chain)
    if form is None or not form.permutes or _mutated(source) or _mutated(end):
        return None
    planned = [("split",)] * form.splits + [("permute", form.perm)] + [("merge",)] * form.merges
    roles = [_role(n) for n in chain]
    if roles[-1] == ("contiguous",):
        planned.append(("contiguous",))
    return None if len(planned) > len(chain) or roles == planned else form


def _canonical_view_chains(gm: GraphModule) -> int:
    """Rewrite chains of views and permutes whose composite permutes into ``split -> permute ->
    merge`` (see :class:`graphopt.ir.match.ViewChain`); returns how many chains were rewritten.

    A chain is rewritten when that form takes fewer ops, or as many in another arrangement; a
    chain already in the form, one whose composite does not permute (left to the identity-view
    removal), one an in-place op writes through, and one whose result would not be provably the
    same values with the same strides stay as written (a ``contiguous`` is kept last when the
    chain's result was contiguous)."""
    rewritten = 0
    for end in _view_chain_ends(gm):
        chain = _chain_of(end)
        source, form = chain[0].args[0], _view_chain_form(chain)
        if form is None:
            continue
        roles = [_role(n) for n in chain]
        new = _emit_view_chain(end, source, form)
        if new is None:
            continue
        tensor_ops = [n for n in new if n.target is not aten.sym_size.int]
        if len(tensor_ops) > len(chain) or (len(tensor_ops) == len(chain) and roles == [_role(n) for n in tensor_ops]):
            for node in reversed(new):
                gm.graph.erase_node(node)
            continue
        end.replace_all_uses_with(new[-1])
        for node in reversed(chain):
            gm.graph.erase_node(node)
        rewritten += 1
    return rewritten


# ----------------------------------------------------------------------------- attention masks


def _mask_rewrite(sdpa: Node, masks: MaskAnalysis) -> str | None:
    """``"causal"`` when ``sdpa``'s mask provably is SDPA's own causal mask, ``"none"`` when it
    provably masks nothing, else None (no mask, already causal, or not provable)."""
    args = normalized_args(sdpa)
    mask = args["attn_mask"]
    if args["is_causal"] or not isinstance(mask, Node):
        return None
    value = masks.try_value(mask)
    mask_val = val_of(mask)
    if value is None or mask_val is None:
        return None
    boolean = mask_val.dtype == torch.bool
    if isinstance(value, Const):
        return "none" if (bool(value.value) if boolean else value.value == 0) else None  # a bool Const may hold 1 (ones)
    if not isinstance(value, Causal) or (value.query_dim, value.key_dim) != (-2, -1):
        return None
    if boolean:
        polarity = bool(value.valid) and not bool(value.masked)
    else:
        polarity = value.valid == 0 and value.masked == -math.inf
    query, key, mask_shape = shape_of(args["query"]), shape_of(args["key"]), shape_of(mask)
    if not polarity or query is None or key is None or mask_shape is None or len(mask_shape) < 2:
        return None
    # the mask indexes queries along -2 and keys along -1 at their full sizes: L == S, unbroadcast
    sizes = known_true(query[-2] == key[-2]) and known_true(mask_shape[-2] == query[-2]) and known_true(mask_shape[-1] == key[-2])
    return "causal" if sizes else None


def _erase_dead_cone(gm: GraphModule, node: Node) -> None:
    """Erase ``node`` and what it was computed from once nothing reads them (pure ops only)."""
    stack, erased = [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n.op != "call_function" or n.users or n.is_impure():
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


def _simplify_attention_masks(gm: GraphModule) -> dict[str, int]:
    """Causal masks -> ``is_causal=True``, all-True masks -> none (see the module docstring)."""
    masks = MaskAnalysis()
    counts = {"causal_masks": 0, "true_masks": 0}
    plans = [(s, _mask_rewrite(s, masks)) for s in gm.graph.nodes if is_op(s, aten.scaled_dot_product_attention.default)]
    for sdpa, kind in plans:
        if kind is None:
            continue
        args = normalized_args(sdpa)
        mask = args["attn_mask"]
        defaults = {"dropout_p": 0.0, "scale": None, "enable_gqa": False}
        kwargs = {k: args[k] for k, default in defaults.items() if args.get(k, default) != default}
        if kind == "causal":
            kwargs["is_causal"] = True
        sdpa.args, sdpa.kwargs = (args["query"], args["key"], args["value"]), kwargs
        counts["causal_masks" if kind == "causal" else "true_masks"] += 1
        if not mask.users:
            _erase_dead_cone(gm, mask)
    return counts


def _mask_candidates(gm: GraphModule) -> list[Node]:
    masks = MaskAnalysis()
    return [n for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention.default) and _mask_rewrite(n, masks) is not None]


def _attention_candidates(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if is_op(n, *_SOFTMAX_OPS)]


def _norm_candidates(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if _is_norm_candidate(n)]


@register_pass
class Canonicalize(Pass):
    """Explicit attention -> ``aten.scaled_dot_product_attention``; explicit LayerNorm / RMSNorm -> ATen ops;
    identity views removed.

    See the module docstring for the accepted forms and the rejections. Stats: how many of each
    were rewritten (``identity_views``: views bypassed; ``view_chains``: chains of views and
    permutes rewritten in the split, permute, merge form; ``causal_masks``: attention masks proved
    causal, now ``is_causal=True``; ``true_masks``: masks proved all True, dropped); a candidate left alone is reported with its reason in the result message.
    """

    name = "canonicalize"
    exact = True

    def analyze(self, gm: GraphModule, ctx: PassContext) -> tuple[list[Node], list[Node]]:
        """The candidates: ``rsqrt`` / ``sqrt`` of a statistic, and softmaxes; not applicable when
        there are none and no identity view either. Each is matched as the rewrite reaches it, on
        the graph the previous rewrites left (a rewritten norm may be an attention's query or key;
        the identity views, found again by the rewrite, go first; the chains of views, found again,
        after the attentions, whose matcher reads the views around a ``bmm`` as written); a rewrite
        never removes another candidate."""
        views, norms, softmaxes = _identity_view_candidates(gm), _norm_candidates(gm), _attention_candidates(gm)
        chains = [end for end in _view_chain_ends(gm) if _view_chain_form(_chain_of(end)) is not None]
        if not (views or norms or softmaxes or chains or _mask_candidates(gm)):
            raise NotApplicable("no explicit attention or normalization formula, no identity view and no chain of views to rewrite in the graph")
        return norms, softmaxes

    def rewrite(self, gm: GraphModule, candidates: tuple[list[Node], list[Node]], ctx: PassContext) -> PassResult:
        norms, softmaxes = candidates
        stats = {"attention": 0, "layer_norm": 0, "rms_norm": 0, "identity_views": 0}
        reasons: list[str] = []
        # Identity views first: one between a query-key product and its softmax would hide the
        # attention; and again last, for the views the attention rewrite leaves identities.
        stats["identity_views"] += _remove_identity_views(gm)
        # Norms first: a normalized value may be an attention's query or key, and each match is made
        # on the graph as the previous rewrites left it.
        for anchor in norms:
            try:
                match = _match_norm(anchor)
            except NotApplicable as why:
                reasons.append(f"{anchor.name}: {why.reason}")
                continue
            _rewrite_norm(gm, match)
            stats[match.kind] += 1
        for softmax in softmaxes:
            try:
                match = _match_attention(softmax)
            except NotApplicable as why:
                reasons.append(f"{softmax.name}: {why.reason}")
                continue
            _rewrite_attention(gm, match)
            stats["attention"] += 1
        # after the attention rewrite, which may have made an SDPA of a written-out masked attention
        stats.update(_simplify_attention_masks(gm))
        stats["view_chains"] = _canonical_view_chains(gm)
        stats["identity_views"] += _remove_identity_views(gm)
        changed = any(stats.values())
        message = summarize_reasons(reasons)
        if changed and message:
            message = "left alone: " + message
        return PassResult(changed=changed, stats=stats, message=message)
