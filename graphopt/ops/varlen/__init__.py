"""Custom ops for padding-free execution of variable-length batches (ByteTransformer).

ByteTransformer (Zhai et al., "ByteTransformer: A High-Performance Transformer Boosted for
Variable-Length Inputs", IPDPS 2023) packs the valid tokens of a padded batch into one
``[total_tokens, hidden]`` tensor, runs every token-wise op on it, and replaces attention with a
variable-length attention that only ever sees the tokens of each sequence. These ops are the
building blocks of the ``remove_padding`` pass:

* ``graphopt::pack_tokens(x, mask)``: ``[B, S, *rest] -> [T, *rest]``, the valid tokens in
  row-major (batch, position) order (``x[mask != 0]``);
* ``graphopt::unpack_tokens(packed, mask)``: the inverse, ``[T, *rest] -> [B, S, *rest]`` with
  zeros at pad positions;
* ``graphopt::varlen_attention(q, k, v, cu_seqlens, scale=None)``: bidirectional (encoder)
  attention of each packed token to the tokens of its own sequence only.

``T`` is data-dependent: the fake implementations give it as an unbacked symbolic size
(``new_dynamic_size``), so graphs holding these ops export, propagate shapes and save with
``torch.export``. Import this module before loading a saved graph that uses them.

In an ATen graph, the pass computes the offsets of :func:`cu_seqlens` from the ``[B, S]`` mask as

    valid = aten.ne.Scalar(mask, 0)                                    # bool [B, S]
    lengths = aten.sum.dim_IntList(valid, [1], dtype=torch.int64)      # int64 [B]
    offsets = aten.cumsum.default(lengths, 0)                          # int64 [B]
    cu_seqlens = aten.pad.default(offsets, [1, 0])                     # int64 [B + 1], leading 0

which is what :func:`cu_seqlens` captures to.

CPU (and any device) implementation of ``varlen_attention``: sequences are sorted by length and
grouped into buckets; each bucket is gathered into a ``[n, H, L, D]`` batch padded only to its own
longest sequence and run through ``scaled_dot_product_attention`` with a key-padding mask, and
the valid rows are scattered back. Bucket boundaries trade padded work against the fixed cost of
one more bucket (see :func:`_length_buckets`). A batch without padding is one SDPA call on a view,
with no gather. Explicit matmul-softmax-matmul is no faster than SDPA's CPU flash kernel even on
short buckets, and torch's nested-tensor SDPA runs ~30x slower than padded SDPA on CPU: neither is
used.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cu_seqlens", "pack_tokens", "unpack_tokens", "varlen_attention"]

# Fixed cost of one more bucket (gather, mask, SDPA call, scatter), in multiply-adds of attention
# (one query-key pair times heads times head dims); ~25 us on CPU, tuned on real sentence lengths.
_BUCKET_OVERHEAD = 500_000


def cu_seqlens(mask: Tensor) -> Tensor:
    """Cumulative sequence offsets ``[0, len_0, len_0 + len_1, ...]`` (int64 ``[B + 1]``) of a ``[B, S]`` mask.

    ``mask`` is bool or integer, nonzero at valid tokens; sequence ``b``'s packed tokens are rows
    ``cu[b]:cu[b + 1]`` of :func:`pack_tokens`'s output.
    """
    return F.pad(mask.ne(0).sum(1, dtype=torch.int64).cumsum(0), (1, 0))


@torch.library.custom_op("graphopt::pack_tokens", mutates_args=())
def pack_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """The valid tokens of ``x`` ``[B, S, *rest]``, ``[T, *rest]`` in (batch, position) order.

    ``mask`` ``[B, S]`` is bool or integer, nonzero at valid tokens; ``T`` is their number.
    """
    return x[mask.ne(0)]


@pack_tokens.register_fake
def _pack_tokens_fake(x, mask):
    total_tokens = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((total_tokens, *x.shape[2:]))


@torch.library.custom_op("graphopt::unpack_tokens", mutates_args=())
def unpack_tokens(packed: Tensor, mask: Tensor) -> Tensor:
    """The inverse of :func:`pack_tokens`: ``[T, *rest] -> [B, S, *rest]``, zeros at pad positions."""
    out = packed.new_zeros((*mask.shape, *packed.shape[1:]))
    out[mask.ne(0)] = packed
    return out


@unpack_tokens.register_fake
def _unpack_tokens_fake(packed, mask):
    return packed.new_empty((*mask.shape, *packed.shape[1:]))


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


@torch.library.custom_op("graphopt::varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """Bidirectional attention of each packed token to the tokens of its own sequence.

    ``q``, ``k`` ``[T, H, D]``, ``v`` ``[T, H, Dv]``, ``cu_seqlens`` int64 ``[B + 1]`` with
    ``cu_seqlens[0] = 0`` and ``cu_seqlens[-1] = T``: sequence ``b`` is rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]``. Returns ``softmax(q kᵀ * scale) v`` per sequence and
    head, ``[T, H, Dv]``, with ``scale`` defaulting to ``1 / sqrt(D)``; computed by
    ``scaled_dot_product_attention`` in the inputs' dtype, as SDPA on each sequence alone would.
    Empty sequences are allowed.
    """
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


@varlen_attention.register_fake
def _varlen_attention_fake(q, k, v, cu_seqlens, scale=None):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


@functools.cache
def _triton_varlen():
    """:mod:`graphopt.backends.triton_varlen_attention`, or None where Triton is not installed."""
    try:
        from graphopt.backends import triton_varlen_attention
    except ImportError:
        return None
    return triton_varlen_attention


@varlen_attention.register_kernel("cuda")
def _varlen_attention_cuda(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """The FlashAttention-style Triton kernel of :mod:`graphopt.backends.triton_varlen_attention`;
    the bucketed SDPA above where Triton is not installed or the kernel refuses the inputs (fp64)."""
    kernels = _triton_varlen()
    if kernels is not None:
        try:
            return kernels.varlen_attention(q, k, v, cu_seqlens, scale)
        except kernels.NotLowerable:
            pass
    with varlen_attention.set_kernel_enabled("cuda", False):
        return varlen_attention(q, k, v, cu_seqlens, scale)
