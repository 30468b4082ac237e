"""What the token-reduction ops compute, stated plainly: one sequence at a time.

These are the definitions the fast forms of :mod:`graphopt.ops.token_reduction.cpu` are tested
against. Every function walks the sequences of the packed ``[T, ...]`` tokens one by one (sequence
``b`` is the rows of its valid tokens, ``mask[b] != 0``, in order) and computes that sequence alone,
in fp32, with the per-sequence rules of :mod:`graphopt.ops.token_reduction` (its docstring states
them and the choices made where the papers leave freedom). The helpers prefixed ``sequence_`` are the
rules for one sequence; the ``*_reference`` functions apply them to a packed batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HEAD_FILTER_MADS",
    "HEAD_FILTER_TOLERANCE",
    "kept_count",
    "merge_tokens_reference",
    "prune_tokens_reference",
    "sequence_bounds",
    "sequence_head_filter",
    "token_importance_reference",
    "varlen_attention_sized_reference",
]

# Variance-based head filter: a head is an outlier when its log score variance lies more than this
# many robust standard deviations (1.4826 · median absolute deviation) from the heads' median ...
HEAD_FILTER_MADS = 3.0
# ... plus this absolute margin (in log variance), so that heads equal up to rounding are never outliers.
HEAD_FILTER_TOLERANCE = 1e-3
_TINY_VARIANCE = 1e-30  # variance floor before the log (a uniform head's scores have variance 0)


def sequence_bounds(mask: Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` packed rows of each sequence of ``mask`` ``[B, S]`` (nonzero = valid)."""
    lengths = mask.ne(0).sum(1).tolist()
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    return bounds


def kept_count(n: int, keep_ratio: float, protected: int) -> int:
    """``n'`` for a sequence of ``n`` tokens: ``clamp(ceil(keep_ratio * n), min(protected, n), n)``."""
    return max(min(math.ceil(keep_ratio * n), n), min(protected, n))


def _protected_positions(n: int, protect_first: int, protect_last: int) -> list[bool]:
    return [i < protect_first or i >= n - protect_last for i in range(n)]


def _reduced_mask(mask: Tensor, kept: list[int]) -> Tensor:
    """``mask_out``: row ``b`` has ones in its first ``kept[b]`` positions, ``mask``'s shape and dtype."""
    out = torch.zeros_like(mask)
    for b, n in enumerate(kept):
        out[b, :n] = 1
    return out


# ----------------------------------------------------------------------------- importance (I-stage)


def sequence_head_filter(scores: Tensor) -> Tensor:
    """The heads kept by the variance-based head filter, bool ``[H]``, for one sequence's ``[H, n]`` scores.

    A head's score variance over the tokens measures how peaked its PageRank distribution is. In
    log space the heads' variances are compared with their median: a head more than
    ``HEAD_FILTER_MADS`` robust standard deviations (``1.4826 * MAD``) plus ``HEAD_FILTER_TOLERANCE``
    away is dropped (near-uniform heads below, heads collapsed on one token above). At least one
    head is always kept (the median one lies within any margin).
    """
    variance = scores.var(dim=1, unbiased=False).clamp_min(_TINY_VARIANCE).log()
    median = variance.quantile(0.5)
    spread = (variance - median).abs()
    mad = spread.quantile(0.5)
    return spread <= HEAD_FILTER_MADS * 1.4826 * mad + HEAD_FILTER_TOLERANCE


def token_importance_reference(q: Tensor, k: Tensor, mask: Tensor, scale: float, iterations: int = 30, head_filter: bool = True) -> Tensor:
    """Zero-TPrune's Weighted PageRank importance of each packed token, float32 ``[T]``.

    Per sequence of ``n`` tokens and head ``h``: ``A = softmax(q kᵀ * scale)`` (``n x n``, fp32),
    ``s_0 = 1/n``, ``s_{t+1}[j] = Σ_i A[i, j] s_t[i]`` for ``iterations`` steps; the heads kept by
    :func:`sequence_head_filter` (all heads without ``head_filter``) are averaged, and the result is
    normalised to sum to 1.
    """
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    for start, end in sequence_bounds(mask):
        n = end - start
        if n == 0:
            continue
        qs, ks = (t[start:end].float().transpose(0, 1) for t in (q, k))  # [H, n, D]
        attention = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)  # [H, n, n]
        scores = torch.full((qs.shape[0], n), 1.0 / n, dtype=torch.float32, device=q.device)
        for _ in range(iterations):
            scores = torch.einsum("hij,hi->hj", attention, scores)
        heads = sequence_head_filter(scores) if head_filter else torch.ones(scores.shape[0], dtype=torch.bool, device=q.device)
        combined = scores[heads].mean(0)
        out[start:end] = combined / combined.sum()
    return out


# ----------------------------------------------------------------------------- pruning (I-stage + S-stage)


def _stable_descending(values: Tensor) -> list[int]:
    """Indices of ``values`` from largest to smallest, equal values in index order."""
    return torch.sort(values, descending=True, stable=True).indices.tolist()


def sequence_pruned(importance: Tensor, metric: Tensor, keep: int, protect_first: int, protect_last: int, similarity: bool) -> list[bool]:
    """Which of one sequence's ``n`` tokens are pruned (``n - keep`` of them), for :func:`prune_tokens_reference`."""
    n = importance.shape[0]
    protected = _protected_positions(n, protect_first, protect_last)
    free = [i for i in range(n) if not protected[i]]
    to_prune = n - keep
    pruned = [False] * n
    if to_prune == 0:
        return pruned
    by_importance = [free[i] for i in _stable_descending(importance[free])]  # unprotected, most important first
    if not similarity:
        for i in by_importance[len(free) - to_prune :]:
            pruned[i] = True
        return pruned
    targets_count = (len(free) + 1) // 2
    targets, sources = by_importance[:targets_count], by_importance[targets_count:]
    from_sources = min(to_prune, len(sources))
    # the rest, when more must go than the source group holds: the least important targets
    for i in targets[targets_count - (to_prune - from_sources) :] if to_prune > from_sources else []:
        pruned[i] = True
    if from_sources:
        unit = F.normalize(metric.float(), dim=-1)
        anchors = sorted(targets + [i for i in range(n) if protected[i]])
        sources_in_order = sorted(sources)
        closest = (unit[sources_in_order] @ unit[anchors].T).amax(1)
        for j in _stable_descending(closest)[:from_sources]:
            pruned[sources_in_order[j]] = True
    return pruned


def prune_tokens_reference(
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
    """Zero-TPrune pruning, one sequence at a time: ``(x_out [T', *rest], sizes_out [T'], mask_out [B, S])``.

    Each sequence keeps :func:`kept_count` tokens chosen by :func:`sequence_pruned`, in their order;
    the kept sizes are scaled by ``Σ sizes / Σ kept sizes`` of the sequence.
    """
    rows, factors, kept = [], [], []
    for start, end in sequence_bounds(mask):
        n = end - start
        keep = kept_count(n, keep_ratio, protect_first + protect_last)
        kept.append(keep)
        if n == 0:
            continue
        pruned = sequence_pruned(importance[start:end], metric[start:end], keep, protect_first, protect_last, similarity)
        sequence_rows = [start + i for i in range(n) if not pruned[i]]
        seq_sizes = sizes[start:end].float()
        factor = seq_sizes.sum() / sizes[sequence_rows].float().sum()
        rows += sequence_rows
        factors += [factor] * len(sequence_rows)
    index = torch.tensor(rows, dtype=torch.int64, device=x.device)
    factor_t = torch.stack(factors) if factors else sizes.new_zeros(0, dtype=torch.float32)
    sizes_out = (sizes[index].float() * factor_t).to(sizes.dtype)
    return x[index], sizes_out, _reduced_mask(mask, kept)


# ----------------------------------------------------------------------------- merging (ToMe)


def merge_tokens_reference(
    x: Tensor, metric: Tensor, sizes: Tensor, mask: Tensor, r: int, protect_first: int = 1, protect_last: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe bipartite soft matching, one sequence at a time: ``(x_out [T', D], sizes_out [T'], mask_out [B, S])``.

    The unprotected tokens ``u`` of a sequence (in order) split into ``A = u[0::2]`` and
    ``B = u[1::2]``; each ``A`` token's match is its most cosine-similar ``B`` token (the first on
    ties); the ``min(r, |A|)`` ``A`` tokens with the highest match scores (``0`` when ``B`` is empty)
    are merged into their matches: ``x_b = Σ x·size / Σ size`` over ``b`` and the tokens merged into
    it (fp32, cast back), sizes add. The remaining tokens keep their order.
    """
    out_x, out_sizes, kept = [], [], []
    for start, end in sequence_bounds(mask):
        n = end - start
        free = [i for i in range(n) if not _protected_positions(n, protect_first, protect_last)[i]]
        set_a, set_b = free[0::2], free[1::2]
        merges = min(r, len(set_a)) if set_b else 0
        kept.append(n - merges)
        if n == 0:
            continue
        seq_x, seq_sizes = x[start:end], sizes[start:end].float()
        weighted = seq_x.float() * seq_sizes[:, None]
        totals = seq_sizes.clone()
        merged_into: dict[int, list[int]] = {}
        removed: set[int] = set()
        if merges:
            unit = F.normalize(metric[start:end].float(), dim=-1)
            best, match = (unit[set_a] @ unit[set_b].T).max(1)
            for i in _stable_descending(best)[:merges]:
                merged_into.setdefault(set_b[int(match[i])], []).append(set_a[i])
                removed.add(set_a[i])
        for i in range(n):
            if i in removed:
                continue
            if i in merged_into:
                sources = merged_into[i]
                total = totals[i] + totals[sources].sum()
                out_x.append((weighted[i] + weighted[sources].sum(0)) / total)
                out_sizes.append(total)
            else:
                out_x.append(seq_x[i].float())
                out_sizes.append(seq_sizes[i])
    if not out_x:
        return x.new_empty((0, *x.shape[1:])), sizes.new_empty(0), _reduced_mask(mask, kept)
    return torch.stack(out_x).to(x.dtype), torch.stack(out_sizes).to(sizes.dtype), _reduced_mask(mask, kept)


# ----------------------------------------------------------------------------- proportional attention


def varlen_attention_sized_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sizes: Tensor, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ * scale + log(size_k)) v`` of each sequence alone, by SDPA with a float key bias, ``[T, H, Dv]``."""
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    for start, end in sequence_bounds(mask):
        if end > start:
            heads_first = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, L, D]
            bias = sizes[start:end].float().log().to(q.dtype)[None, :]
            out[start:end] = F.scaled_dot_product_attention(*heads_first, attn_mask=bias, scale=scale).transpose(0, 1)
    return out
