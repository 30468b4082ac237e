"""The token-reduction ops on CPU (and any device without a kernel of its own): vectorized over sequences.

No Python loop runs per sequence or per token:

* ``token_importance`` groups the sequences into length buckets (:func:`graphopt.ops.varlen.cpu._length_buckets`),
  and runs each bucket, split into chunks of at most ``_IMPORTANCE_CHUNK`` attention entries (so
  the ``[n, H, L, L]`` attention of a chunk stays in cache across the PageRank steps), as one
  padded batch: masked softmax, ``iterations`` batched vector-matrix products, the head filter with
  masked variances and ``quantile`` over the heads;
* ``prune_tokens`` and ``merge_tokens`` lay the packed rows out as a padded ``[B, n_max]`` index
  (:func:`_dense_rows`) and make every choice (protected positions, importance groups, similarity
  maxima, stable sorts, merge destinations) with batched tensor ops on it; the kept rows are then
  gathered in one ``index_select``;
* ``varlen_attention_sized`` is :mod:`graphopt.ops.varlen.cpu`'s bucketed SDPA with a float key
  bias ``log(size)`` (``-inf`` at pads) instead of the boolean key-padding mask.

Each computes exactly what :mod:`graphopt.ops.token_reduction.reference` computes (up to float
rounding): pads are excluded by ``-inf`` scores or zero weights, and every sort is stable, so ties
are broken by position as the reference breaks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.ops.token_reduction.reference import _TINY_VARIANCE, HEAD_FILTER_MADS, HEAD_FILTER_TOLERANCE
from graphopt.ops.varlen.cpu import _length_buckets

__all__ = ["merge_tokens_batched", "prune_tokens_batched", "token_importance_batched", "varlen_attention_sized_bucketed"]

_IMPORTANCE_CHUNK = 1 << 21  # attention entries (fp32) per padded chunk of token_importance: 8 MiB


def _dense_rows(mask: Tensor, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """The packed rows as a padded batch: (``lengths [B]``, ``rows [B, n_max]`` packed row of each
    sequence's ``i``-th token, clamped to a valid row at pads, ``valid [B, n_max]``)."""
    lengths = mask.ne(0).sum(1)
    n_max = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(n_max, device=mask.device)
    starts = lengths.cumsum(0) - lengths
    valid = positions < lengths[:, None]
    rows = (starts[:, None] + positions).clamp(max=max(total - 1, 0))
    return lengths, rows, valid


def _reduced_mask(mask: Tensor, kept: Tensor) -> Tensor:
    """``mask_out``: ones in the first ``kept[b]`` positions of row ``b``, ``mask``'s dtype."""
    return (torch.arange(mask.shape[1], device=mask.device) < kept[:, None]).to(mask.dtype)


def _stable_rank(scores: Tensor) -> Tensor:
    """Each entry's rank in its row, largest first, equal scores in position order (``[B, n]`` -> ``[B, n]``)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank


# ----------------------------------------------------------------------------- importance


def _head_filter(scores: Tensor, valid: Tensor, lengths: Tensor) -> Tensor:
    """Bool ``[n, H]``: the heads :func:`~graphopt.ops.token_reduction.reference.sequence_head_filter` keeps, per sequence."""
    weights = valid[:, None, :].float()
    mean = (scores * weights).sum(-1, keepdim=True) / lengths[:, None, None]
    variance = (((scores - mean) * weights) ** 2).sum(-1) / lengths[:, None]
    log_variance = variance.clamp_min(_TINY_VARIANCE).log()  # [n, H]
    median = log_variance.quantile(0.5, dim=1, keepdim=True)
    spread = (log_variance - median).abs()
    mad = spread.quantile(0.5, dim=1, keepdim=True)
    return spread <= HEAD_FILTER_MADS * 1.4826 * mad + HEAD_FILTER_TOLERANCE


def _chunk_importance(q: Tensor, k: Tensor, rows: Tensor, valid: Tensor, scale: float, iterations: int, head_filter: bool) -> Tensor:
    """Importance ``[n, L]`` (zeros at pads) of ``n`` sequences gathered at ``rows`` ``[n, L]``."""
    qs, ks = (t.index_select(0, rows.flatten()).unflatten(0, rows.shape).transpose(1, 2).float() for t in (q, k))  # [n, H, L, D]
    # Each pass over the [n, H, L, L] probabilities costs more than the product that makes them:
    # the scale goes on q, the key mask only where there are pads, and pad queries need no zeroing
    # (their score starts at 0 and stays 0, as no query attends to a pad key).
    logits = (qs * scale) @ ks.transpose(-1, -2)
    if not bool(valid.all()):
        logits.masked_fill_(~valid[:, None, None, :], float("-inf"))
    attention = torch.softmax(logits, dim=-1)
    del logits
    lengths = valid.sum(1).float()
    scores = (valid.float() / lengths[:, None])[:, None, None, :].expand(-1, qs.shape[1], 1, -1)  # [n, H, 1, L]
    for _ in range(iterations):
        scores = scores @ attention
    scores = scores.squeeze(2)  # [n, H, L]
    if head_filter:
        heads = _head_filter(scores, valid, lengths).float()
    else:
        heads = scores.new_ones(scores.shape[:2])
    combined = (scores * heads[..., None]).sum(1) / heads.sum(1, keepdim=True)
    return combined / combined.sum(1, keepdim=True)


def token_importance_batched(q: Tensor, k: Tensor, mask: Tensor, scale: float, iterations: int = 30, head_filter: bool = True) -> Tensor:
    """``graphopt::token_importance`` by bucketed, chunked padded batches (see the module docstring)."""
    total, heads, head_dim = q.shape
    out = torch.zeros(total, dtype=torch.float32, device=q.device)
    if total == 0:
        return out
    lengths_t = mask.ne(0).sum(1)
    lengths = lengths_t.tolist()
    starts = (lengths_t.cumsum(0) - lengths_t).tolist()
    for bucket in _length_buckets(lengths, heads * (head_dim + iterations)):
        longest = lengths[bucket[0]]
        per_chunk = max(1, _IMPORTANCE_CHUNK // (heads * longest * longest))
        for first in range(0, len(bucket), per_chunk):
            chunk = bucket[first : first + per_chunk]
            starts_t = torch.tensor([starts[i] for i in chunk], device=q.device)[:, None]
            chunk_lengths = torch.tensor([lengths[i] for i in chunk], device=q.device)[:, None]
            positions = torch.arange(longest, device=q.device)
            valid = positions < chunk_lengths
            rows = starts_t + torch.minimum(positions, chunk_lengths - 1)
            importance = _chunk_importance(q, k, rows, valid, scale, iterations, head_filter)
            out.index_copy_(0, rows[valid], importance[valid])
    return out


# ----------------------------------------------------------------------------- pruning


def _pruned(
    importance: Tensor, metric: Tensor, rows: Tensor, valid: Tensor, lengths: Tensor, keep: Tensor, protect_first: int, protect_last: int, similarity: bool
) -> Tensor:
    """Bool ``[B, n_max]``: the pruned tokens, as :func:`~graphopt.ops.token_reduction.reference.sequence_pruned` chooses them."""
    positions = torch.arange(rows.shape[1], device=rows.device)
    protected = valid & ((positions < protect_first) | (positions >= (lengths - protect_last)[:, None]))
    free = valid & ~protected
    free_count = free.sum(1)
    to_prune = lengths - keep
    # rank among the unprotected tokens by importance, most important first (others ranked last)
    scores = importance.float()[rows].masked_fill(~free, float("-inf"))
    importance_rank = _stable_rank(scores)
    if not similarity:
        return free & (importance_rank >= (free_count - to_prune)[:, None])
    targets_count = (free_count + 1) // 2
    targets = free & (importance_rank < targets_count[:, None])
    sources = free & ~targets
    from_sources = torch.minimum(to_prune, free_count - targets_count)
    pruned = targets & (importance_rank >= (targets_count - (to_prune - from_sources))[:, None])
    unit = F.normalize(metric.float()[rows], dim=-1)  # [B, n_max, C]
    similar = unit @ unit.transpose(1, 2)
    similar.masked_fill_(~(targets | protected)[:, None, :], float("-inf"))
    closest = similar.amax(-1).masked_fill(~sources, float("-inf"))
    return pruned | (sources & (_stable_rank(closest) < from_sources[:, None]))


def prune_tokens_batched(
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
    """``graphopt::prune_tokens`` on the padded ``[B, n_max]`` index (see the module docstring)."""
    lengths, rows, valid = _dense_rows(mask, x.shape[0])
    protected_count = lengths.clamp(max=max(protect_first + protect_last, 0))
    keep = torch.maximum(torch.minimum(torch.ceil(keep_ratio * lengths.double()).long(), lengths), protected_count)
    if x.shape[0] == 0:
        return x.new_empty((0, *x.shape[1:])), sizes.new_empty(0), _reduced_mask(mask, keep)
    kept = valid & ~_pruned(importance, metric, rows, valid, lengths, keep, protect_first, protect_last, similarity)
    dense_sizes = sizes.float()[rows]
    factor = (dense_sizes * valid).sum(1) / (dense_sizes * kept).sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    kept_rows = rows[kept]
    sizes_out = (dense_sizes * factor[:, None])[kept].to(sizes.dtype)
    return x.index_select(0, kept_rows), sizes_out, _reduced_mask(mask, keep)


# ----------------------------------------------------------------------------- merging


def merge_tokens_batched(
    x: Tensor, metric: Tensor, sizes: Tensor, mask: Tensor, r: int, protect_first: int = 1, protect_last: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """``graphopt::merge_tokens`` on padded ``[B, |A|]`` and ``[B, |B|]`` sets (see the module docstring)."""
    total = x.shape[0]
    lengths, rows, _ = _dense_rows(mask, total)
    first = max(protect_first, 0)
    free_count = (lengths - first - max(protect_last, 0)).clamp_min(0)
    count_a, count_b = (free_count + 1) // 2, free_count // 2
    merges = torch.where(count_b > 0, count_a.clamp(max=max(r, 0)), 0)
    mask_out = _reduced_mask(mask, lengths - merges)
    if total == 0 or int(merges.max()) == 0:
        return x.clone(), sizes.clone(), mask_out
    starts = lengths.cumsum(0) - lengths
    index_a = torch.arange(int(count_a.max()), device=x.device)
    index_b = torch.arange(int(count_b.max()), device=x.device)
    valid_a, valid_b = index_a < count_a[:, None], index_b < count_b[:, None]
    rows_a = (starts[:, None] + first + 2 * index_a).clamp(max=total - 1)
    rows_b = (starts[:, None] + first + 2 * index_b + 1).clamp(max=total - 1)
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[rows_a] @ unit[rows_b].transpose(1, 2)  # [B, |A|, |B|]
    scores.masked_fill_(~valid_b[:, None, :], float("-inf"))
    best, match = scores.max(-1)
    merged = valid_a & (_stable_rank(best.masked_fill(~valid_a, float("-inf"))) < merges[:, None])
    sources = rows_a[merged]
    destinations = rows_b.gather(1, match)[merged]
    weighted = x.float() * sizes.float()[:, None]
    summed = weighted.index_add(0, destinations, weighted[sources])
    totals = sizes.float().index_add(0, destinations, sizes.float()[sources])
    out = x.clone()
    out[destinations] = (summed[destinations] / totals[destinations, None]).to(x.dtype)
    kept = torch.ones(total, dtype=torch.bool, device=x.device)
    kept[sources] = False
    return out[kept], totals[kept].to(sizes.dtype), mask_out


# ----------------------------------------------------------------------------- proportional attention


def varlen_attention_sized_bucketed(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sizes: Tensor, scale: float | None = None) -> Tensor:
    """``graphopt::varlen_attention_sized`` by bucketed SDPA with a float key bias (see the module docstring)."""
    total, heads, head_dim = q.shape
    out = q.new_empty((total, heads, v.shape[-1]))
    if total == 0:
        return out
    lengths_t = mask.ne(0).sum(1)
    lengths = lengths_t.tolist()
    starts = (lengths_t.cumsum(0) - lengths_t).tolist()
    bias = sizes.float().log().to(q.dtype)
    for bucket in _length_buckets(lengths, heads * (head_dim + v.shape[-1])):
        longest = lengths[bucket[0]]
        starts_t = torch.tensor([starts[i] for i in bucket], device=q.device)[:, None]
        bucket_lengths = torch.tensor([lengths[i] for i in bucket], device=q.device)[:, None]
        positions = torch.arange(longest, device=q.device)
        valid = positions < bucket_lengths
        rows = starts_t + torch.minimum(positions, bucket_lengths - 1)  # pads repeat the last token: finite, dropped
        flat = rows.flatten()
        gathered = [t.index_select(0, flat).unflatten(0, rows.shape).transpose(1, 2) for t in (q, k, v)]
        key_bias = bias[rows].masked_fill(~valid, float("-inf"))[:, None, None, :]
        attended = F.scaled_dot_product_attention(*gathered, attn_mask=key_bias, scale=scale).transpose(1, 2).flatten(0, 1)
        kept = valid.flatten()
        out.index_copy_(0, flat[kept], attended[kept])
    return out
