"""Token pruning (Zero-TPrune) and token merging (ToMe) on packed tokens: ops and records.

Zero-TPrune (Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the
Attention Graph in Pre-Trained Transformers", CVPR 2024) ranks the tokens of a pre-trained
transformer's layer by a PageRank over its attention graph (the I-stage) and prunes, guided by that
ranking, the tokens most similar to ones it keeps (the S-stage). ToMe (Bolya et al., "Token Merging:
Your ViT But Faster", ICLR 2023) instead merges the most similar pairs of a bipartite split of the
tokens, and keeps track of how many original tokens each merged token stands for, so that attention
can weigh it accordingly (proportional attention). Both need no training. These ops work on the
packed tokens of :mod:`graphopt.ops.varlen` (sequence ``b`` is the rows of its valid tokens,
``mask[b] != 0``, in (batch, position) order; any position may be a pad):

* ``graphopt::token_importance(q, k, mask, scale, iterations=30, head_filter=True)``: float32 ``[T]``,
  each sequence's Weighted PageRank importance (sums to 1 per sequence);
* ``graphopt::prune_tokens(x, importance, metric, sizes, mask, keep_ratio, protect_first=1, protect_last=0, similarity=True)``:
  ``(x_out [T', *rest], sizes_out [T'], mask_out [B, S])``, each sequence's ``n'`` kept tokens;
* ``graphopt::merge_tokens(x, metric, sizes, mask, r, protect_first=1, protect_last=0)``:
  ``(x_out [T', D], sizes_out [T'], mask_out [B, S])``, ToMe's bipartite soft matching;
* ``graphopt::varlen_attention_sized(q, k, v, mask, sizes, scale=None)``: ``[T, H, Dv]``, ToMe's
  proportional attention ``softmax(q kᵀ · scale + log(size_k)) v`` per sequence (``scale`` defaults
  to ``1 / sqrt(D)``); ``graphopt::varlen_attention`` when every size is 1. A token of size ``m``
  attends and is attended like ``m`` identical tokens.

**Sizes and masks.** ``sizes [T]`` (float32) counts the original tokens each token stands for; per
sequence they sum to its original token count (all ones at first). A reduction returns a new mask
``mask_out`` (``mask``'s shape and dtype) whose row ``b`` has ones in its first ``n'_b`` positions:
the kept tokens, packed in their original order. So ``sum_tokens``, ``select_token``,
``cu_seqlens`` and the other packed ops work unchanged on the reduced tokens with ``mask_out``. The
first ``protect_first`` and last ``protect_last`` valid tokens of a sequence (CLS, SEP) are never
pruned or merged and stay first and last. Every output for sequence ``b`` depends on its tokens
alone; sequences of 0, 1 or 2 tokens are allowed.

**I-stage** (``token_importance``). Per sequence of ``n`` tokens and head ``h``, ``A_h =
softmax(q_h k_hᵀ · scale)`` (``n x n``, fp32) is the attention graph, edge ``i -> j`` weighted by
how much ``i`` attends to ``j``. The Weighted PageRank makes a token important when important tokens
attend to it: ``s_0 = 1/n``, ``s_{t+1}[j] = Σ_i A_h[i, j] s_t[i]`` for ``iterations`` steps (``A_h``
is row-stochastic, so each step keeps ``Σ s = 1``). The heads are then combined by the paper's
*variance-based head filter*: a head whose scores are nearly uniform (it attends everywhere alike,
variance near 0) or collapsed onto one token (variance near its maximum) carries no ranking
information and is dropped. The paper drops the heads whose variance lies outside a fixed range
``[v_min, v_max]`` tuned per model; with no such tuning at hand, the range here is set per sequence
from the heads' own variances: in log space, a head more than 3 robust standard deviations (``3 ·
1.4826 · MAD``, median absolute deviation over the heads) plus ``1e-3`` away from the heads' median
is dropped (the median head always stays). The kept heads' scores are averaged and normalised to
sum to 1. Without ``head_filter``, all heads are averaged. (The paper's other aggregation
refinement, emphasizing the informative region of early layers, is not implemented.)

**Pruning** (``prune_tokens``). Sequence ``b`` of ``n`` tokens keeps ``n' = clamp(ceil(keep_ratio ·
n), min(protect_first + protect_last, n), n)`` tokens (``ceil`` of the float64 product); of its
``u`` unprotected tokens, ``p = n - n'`` are pruned. With ``similarity=False``, the ``p``
least important (ties: the later token goes first). With ``similarity=True``, the S-stage: the
unprotected tokens are ranked by importance (stable) and split into two importance groups, the
``ceil(u / 2)`` most important (the *target* group) and the rest (the *source* group, the pruning
candidates, as the paper's importance-guided partition puts the less important tokens on the side
that is pruned). Each source token's score is its largest cosine similarity (of ``metric``, e.g. the
keys) to a token of the target group or a protected token, all of which are kept; the
``min(p, |source|)`` source tokens with the highest scores are pruned (ties: the earlier token
goes first). A source token that is a near-copy of a kept token thus goes before one that is
unlike all of them, whatever their importance order within the source group. If more tokens must go
than the source group holds (``keep_ratio < ~1/2``), every source token is pruned and the rest are
the least important targets (the I-stage alone). Pruned mass is redistributed: every kept size of
sequence ``b`` is multiplied by ``Σ sizes / Σ kept sizes`` of ``b``. Then the sizes still sum to
``n_b`` (unless ``n' = 0``: ``keep_ratio = 0`` without protected tokens empties the sequence), and mean pooling written as ``sum_tokens(x · size) / n_b`` (the form that is exact for
merged tokens) equals the size-weighted mean over the kept tokens, as if the pruned tokens had
been like the kept ones; proportional attention keeps the kept tokens' relative weights.

**Merging** (``merge_tokens``, ToMe's bipartite soft matching). Per sequence, ``metric`` is
normalised to unit length; the unprotected tokens ``u_0, u_1, ...`` (in order) split into ``A =
{u_0, u_2, ...}`` and ``B = {u_1, u_3, ...}``; each ``A`` token's match is its most cosine-similar
``B`` token (the first on ties) and its score that similarity. The ``r_b = min(r, |A|)`` highest
scoring ``A`` tokens (``0`` when ``B`` is empty; ties: the earlier token first) are merged into
their matches, several possibly into one ``B`` token: ``x_b = Σ x · size / Σ size`` over ``b`` and
its merged tokens (computed in fp32, cast back to ``x``'s dtype), and their sizes add. The
remaining ``n - r_b`` tokens keep their original order.

``T'`` is data-dependent: the fakes give it as an unbacked symbolic size (``new_dynamic_size``),
so graphs with these ops export and save with ``torch.export`` (import this package first).

The folder: ``reference.py`` (the definitions, one sequence at a time), ``cpu.py`` (the forms every
device runs, vectorized over sequences: bucketed padded batches for importance and attention, a
padded ``[B, n_max]`` index for pruning and merging), this module (the ops, their fakes, FLOP rules
and records).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Node

from graphopt.ir import normalized_args, shape_of
from graphopt.ir.flops import example_value, size
from graphopt.ir.oprecord import OpRecord, onnx_translation, register_op
from graphopt.ops.recompute import recomputed_backward
from graphopt.ops.token_reduction.cpu import merge_tokens_batched, prune_tokens_batched, token_importance_batched, varlen_attention_sized_bucketed
from graphopt.ops.token_reduction.reference import (
    kept_count,
    merge_tokens_reference,
    prune_tokens_reference,
    token_importance_reference,
    varlen_attention_sized_reference,
)

__all__ = [
    "kept_count",
    "merge_tokens",
    "merge_tokens_reference",
    "prune_tokens",
    "prune_tokens_reference",
    "token_importance",
    "token_importance_reference",
    "varlen_attention_sized",
    "varlen_attention_sized_reference",
]


@torch.library.custom_op("graphopt::token_importance", mutates_args=())
def token_importance(q: Tensor, k: Tensor, mask: Tensor, scale: float, iterations: int = 30, head_filter: bool = True) -> Tensor:
    """Zero-TPrune's Weighted PageRank importance of each packed token, float32 ``[T]``.

    ``q``, ``k`` ``[T, H, D]``, ``mask`` ``[B, S]``; each sequence's importances sum to 1. See the
    module docstring (I-stage).
    """
    return token_importance_batched(q, k, mask, scale, iterations, head_filter)


def _token_importance_fake(q, k, mask, scale, iterations=30, head_filter=True):
    return q.new_empty((q.shape[0],), dtype=torch.float32)


@torch.library.custom_op("graphopt::prune_tokens", mutates_args=())
def prune_tokens(
    x: Tensor,
    importance: Tensor,
    metric: Tensor,
    sizes: Tensor,
    mask: Tensor,
    keep_ratio: float,
    protect_first: int = 1,
    protect_last: int = 0,
    similarity: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep ``clamp(ceil(keep_ratio * n), protected, n)`` tokens of each sequence: ``(x_out [T', *rest], sizes_out [T'], mask_out [B, S])``.

    ``x`` ``[T, *rest]``, ``importance`` ``[T]``, ``metric`` ``[T, C]``, ``sizes`` float32 ``[T]``.
    See the module docstring (pruning) for the choice and the size redistribution.
    """
    return prune_tokens_batched(x, importance, metric, sizes, mask, keep_ratio, protect_first, protect_last, similarity)


def _reduced_fake(x, sizes, mask):
    kept_tokens = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((kept_tokens, *x.shape[1:])), sizes.new_empty((kept_tokens,)), torch.empty_like(mask)


def _prune_tokens_fake(x, importance, metric, sizes, mask, keep_ratio, protect_first=1, protect_last=0, similarity=True):
    return _reduced_fake(x, sizes, mask)


@torch.library.custom_op("graphopt::merge_tokens", mutates_args=())
def merge_tokens(
    x: Tensor, metric: Tensor, sizes: Tensor, mask: Tensor, r: int, protect_first: int = 1, protect_last: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe: merge up to ``r`` tokens of each sequence into others: ``(x_out [T', D], sizes_out [T'], mask_out [B, S])``.

    ``x`` ``[T, D]``, ``metric`` ``[T, C]``, ``sizes`` float32 ``[T]``. See the module docstring (merging).
    """
    return merge_tokens_batched(x, metric, sizes, mask, r, protect_first, protect_last)


def _merge_tokens_fake(x, metric, sizes, mask, r, protect_first=1, protect_last=0):
    return _reduced_fake(x, sizes, mask)


@torch.library.custom_op("graphopt::varlen_attention_sized", mutates_args=())
def varlen_attention_sized(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sizes: Tensor, scale: float | None = None) -> Tensor:
    """Proportional attention of each packed token to its own sequence: ``softmax(q kᵀ * scale + log(size_k)) v``, ``[T, H, Dv]``.

    ``q``, ``k`` ``[T, H, D]``, ``v`` ``[T, H, Dv]``, ``mask`` ``[B, S]``, ``sizes`` ``[T]``; computed by
    ``scaled_dot_product_attention`` in the inputs' dtype with ``scale`` defaulting to ``1 / sqrt(D)``.
    """
    return varlen_attention_sized_bucketed(q, k, v, mask, sizes, scale)


def _varlen_attention_sized_fake(q, k, v, mask, sizes, scale=None):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


# ----------------------------------------------------------------------------- autograd (graphopt.ops.recompute)

# Recovery fine-tunes a reduced model through these ops: gradients flow to the kept and merged
# tokens and to q, k, v; the choices (importance, matching) pass none, as in ToMe and Zero-TPrune.
token_importance.register_autograd(lambda ctx, grad: (None,) * 6, setup_context=lambda ctx, inputs, output: None)  # a ranking: no gradient
recomputed_backward(prune_tokens, prune_tokens_batched)
recomputed_backward(merge_tokens, merge_tokens_batched)
recomputed_backward(varlen_attention_sized, varlen_attention_sized_bucketed)


# ----------------------------------------------------------------------------- FLOP rules


def _lengths(mask: Node, tokens) -> list[int]:
    """The sequence lengths of ``mask`` on the example run; without it (a mask over 4096 entries, or
    none recorded), the ``tokens`` spread evenly over the ``B`` sequences (the fewest pairs)."""
    mask_run = example_value(mask)
    if mask_run is not None:
        return mask_run.ne(0).sum(1).tolist()
    shape = shape_of(mask)
    sequences = max(size(shape[0]), 1) if shape else 1
    return [size(tokens) // sequences] * sequences


def _token_importance_flops(node: Node) -> int:
    """Per sequence of ``n`` tokens: ``2 · n² · H · D`` (the attention logits) ``+ iterations · n² · H`` (the PageRank steps)."""
    args = normalized_args(node)
    q = shape_of(args["q"])
    if not q:
        return 0
    heads, head_dim, iterations = size(q[1]), size(q[2]), int(args["iterations"])
    return sum((2 * head_dim + iterations) * n * n * heads for n in _lengths(args["mask"], q[0]))


def _prune_tokens_flops(node: Node) -> int:
    """The S-stage's similarity products, ``2 · |source| · (|target| + protected) · C`` per sequence
    (the groups of a sequence of ``n`` tokens as the op makes them); none without ``similarity``."""
    args = normalized_args(node)
    metric = shape_of(args["metric"])
    if not metric or not args["similarity"]:
        return 0
    protected = max(int(args["protect_first"]) + int(args["protect_last"]), 0)
    flops = 0
    for n in _lengths(args["mask"], metric[0]):
        free = max(n - protected, 0)
        targets = (free + 1) // 2
        flops += 2 * (free - targets) * (n - (free - targets)) * size(metric[1])
    return flops


def _merge_tokens_flops(node: Node) -> int:
    """ToMe's similarity products, ``2 · |A| · |B| · C`` per sequence."""
    args = normalized_args(node)
    metric = shape_of(args["metric"])
    if not metric:
        return 0
    protected = max(int(args["protect_first"]), 0) + max(int(args["protect_last"]), 0)
    flops = 0
    for n in _lengths(args["mask"], metric[0]):
        free = max(n - protected, 0)
        flops += 2 * ((free + 1) // 2) * (free // 2) * size(metric[1])
    return flops


def _varlen_attention_sized_flops(node: Node) -> int:
    """As ``graphopt::varlen_attention``: ``2 · n² · H · (D + Dv)`` per sequence of ``n`` tokens."""
    args = normalized_args(node)
    q, v = shape_of(args["q"]), shape_of(args["v"])
    if not (q and v):
        return 0
    pairs = sum(n * n for n in _lengths(args["mask"], q[0]))
    return 2 * pairs * size(q[1]) * (size(q[2]) + size(v[2]))


register_op(
    OpRecord(
        op=torch.ops.graphopt.token_importance,
        reference=token_importance_reference,
        fake=_token_importance_fake,
        flops=_token_importance_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "token_importance"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.prune_tokens,
        reference=prune_tokens_reference,
        fake=_prune_tokens_fake,
        flops=_prune_tokens_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "prune_tokens"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.merge_tokens,
        reference=merge_tokens_reference,
        fake=_merge_tokens_fake,
        flops=_merge_tokens_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "merge_tokens"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.varlen_attention_sized,
        reference=varlen_attention_sized_reference,
        fake=_varlen_attention_sized_fake,
        flops=_varlen_attention_sized_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "varlen_attention_sized"),
    )
)
