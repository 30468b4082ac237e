"""``graphopt::varlen_attention`` on CPU (and any device without a kernel of its own): bucketed SDPA.

Sequences are sorted by length and grouped into buckets; each bucket is gathered into a
``[n, H, L, D]`` batch padded only to its own longest sequence and run through
``scaled_dot_product_attention`` with a key-padding mask, and the valid rows are scattered back.
Bucket boundaries trade padded work against the fixed cost of one more bucket (see
:func:`_length_buckets`). A batch without padding is one SDPA call on a view, with no gather.
Explicit matmul-softmax-matmul is no faster than SDPA's CPU flash kernel even on short buckets,
and torch's nested-tensor SDPA runs ~30x slower than padded SDPA on CPU: neither is used.

The pooling ops read the packed rows directly, without the padded ``[B, S, *rest]`` tensor:
``sum_tokens`` by ``torch.segment_reduce`` over the sequence lengths (~10x faster than unpacking and
summing on a MiniLM-sized batch), ``select_token`` by one row gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["select_token_gathered", "sum_tokens_segmented", "varlen_attention_bucketed"]

# Fixed cost of one more bucket (gather, mask, SDPA call, scatter), in multiply-adds of attention
# (one query-key pair times heads times head dims); ~25 us on CPU, tuned on real sentence lengths.
_BUCKET_OVERHEAD = 500_000


def _length_buckets(lengths: list[int], work_per_pair: int) -> list[list[int]]:
    """Sequence indices grouped into buckets of similar length, longest first.

    Walking the sequences from longest to shortest, a sequence joins the current bucket (padded
    to the bucket's first, longest length) unless the padded work the bucket has accumulated,
    ``sum((L_max² - L²) * work_per_pair)``, would exceed the cost of one more bucket. So equal
    lengths always share a bucket and the total padded work is bounded by the buckets' overhead.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    padded_work = 0
    for i in order:
        if buckets:
            longest = lengths[buckets[-1][0]]
            extra = (longest * longest - lengths[i] * lengths[i]) * work_per_pair
            if padded_work + extra <= _BUCKET_OVERHEAD:
                buckets[-1].append(i)
                padded_work += extra
                continue
        buckets.append([i])
        padded_work = 0
    return buckets


def _bucket_attention(q: Tensor, k: Tensor, v: Tensor, starts: list[int], lengths: list[int], scale: float | None) -> tuple[Tensor, Tensor]:
    """SDPA over sequences gathered into one padded batch: (output rows ``[N, H, Dv]``, their packed indices ``[N]``)."""
    positions = torch.arange(max(lengths), device=q.device)
    starts_t, lengths_t = (torch.tensor(values, device=q.device)[:, None] for values in (starts, lengths))
    valid = positions < lengths_t  # [n, L]
    # pad positions repeat the sequence's last token: a valid (finite) query whose row is dropped
    rows = starts_t + torch.minimum(positions, lengths_t - 1)
    flat_rows = rows.flatten()

    def gather(t: Tensor) -> Tensor:
        return t.index_select(0, flat_rows).unflatten(0, rows.shape).transpose(1, 2)

    key_mask = None if min(lengths) == max(lengths) else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), attn_mask=key_mask, scale=scale)
    out = out.transpose(1, 2).flatten(0, 1)  # [n * L, H, Dv]
    kept = valid.flatten()
    return out[kept], flat_rows[kept]


def varlen_attention_bucketed(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """``graphopt::varlen_attention`` by bucketed SDPA (see the module docstring), any device."""
    total_tokens, heads, head_dim = q.shape
    lengths = cu_seqlens.diff().tolist()
    out = q.new_empty((total_tokens, heads, v.shape[-1]))
    if total_tokens == 0:
        return out
    if len(set(lengths)) == 1:  # no padding: the packed rows are already a [B, L] batch
        as_batch = [t.unflatten(0, (len(lengths), lengths[0])).transpose(1, 2) for t in (q, k, v)]
        out.copy_(F.scaled_dot_product_attention(*as_batch, scale=scale).transpose(1, 2).flatten(0, 1))
        return out
    starts = cu_seqlens[:-1].tolist()
    for bucket in _length_buckets(lengths, heads * (head_dim + v.shape[-1])):
        rows_out, rows = _bucket_attention(q, k, v, [starts[i] for i in bucket], [lengths[i] for i in bucket], scale)
        out.index_copy_(0, rows, rows_out)
    return out


def sum_tokens_segmented(packed: Tensor, mask: Tensor) -> Tensor:
    """``graphopt::sum_tokens``: one segment sum over the packed rows; empty sequences sum to 0."""
    lengths = mask.ne(0).sum(1)
    return torch.segment_reduce(packed, "sum", lengths=lengths, axis=0, unsafe=True)


def select_token_gathered(packed: Tensor, mask: Tensor, position: int) -> Tensor:
    """``graphopt::select_token``: the packed row of token ``position`` of each sequence where it is
    valid (the sequence's offset plus its valid tokens before ``position``), zeros elsewhere."""
    valid = mask.ne(0)
    counts = valid.sum(1)
    rows = counts.cumsum(0) - counts + valid[:, :position].sum(1)
    present = valid[:, position]
    out = packed.new_zeros((mask.shape[0], *packed.shape[1:]))
    out[present] = packed.index_select(0, rows[present])
    return out
