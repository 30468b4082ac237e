"""What ``graphopt::pack_tokens``, ``unpack_tokens`` and ``varlen_attention`` compute, stated plainly.

These are the definitions the kernels are tested against: :func:`varlen_attention_reference` runs
``scaled_dot_product_attention`` on each sequence alone, one call per sequence (the bucketed
implementation of :mod:`graphopt.ops.varlen.cpu` computes the same in a few calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cu_seqlens",
    "pack_tokens_reference",
    "select_token_reference",
    "sum_tokens_reference",
    "unpack_tokens_reference",
    "varlen_attention_reference",
]


def cu_seqlens(mask: Tensor) -> Tensor:
    """Cumulative sequence offsets ``[0, len_0, len_0 + len_1, ...]`` (int64 ``[B + 1]``) of a ``[B, S]`` mask.

    ``mask`` is bool or integer, nonzero at valid tokens; sequence ``b``'s packed tokens are rows
    ``cu[b]:cu[b + 1]`` of ``pack_tokens``'s output.
    """
    return F.pad(mask.ne(0).sum(1, dtype=torch.int64).cumsum(0), (1, 0))


def pack_tokens_reference(x: Tensor, mask: Tensor) -> Tensor:
    """The valid tokens of ``x`` ``[B, S, *rest]``, ``[T, *rest]`` in (batch, position) order."""
    return x[mask.ne(0)]


def unpack_tokens_reference(packed: Tensor, mask: Tensor) -> Tensor:
    """The inverse of :func:`pack_tokens_reference`: ``[T, *rest] -> [B, S, *rest]``, zeros at pad positions."""
    out = packed.new_zeros((*mask.shape, *packed.shape[1:]))
    out[mask.ne(0)] = packed
    return out


def sum_tokens_reference(packed: Tensor, mask: Tensor) -> Tensor:
    """The sum of each sequence's packed tokens, ``[B, *rest]``: ``unpack_tokens(packed, mask).sum(1)``."""
    return unpack_tokens_reference(packed, mask).sum(1)


def select_token_reference(packed: Tensor, mask: Tensor, position: int) -> Tensor:
    """Each sequence's token at ``position``, ``[B, *rest]``, zeros where it is a pad:
    ``unpack_tokens(packed, mask)[:, position]``."""
    return unpack_tokens_reference(packed, mask).select(1, position)


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """SDPA of each sequence ``cu_seqlens[b]:cu_seqlens[b + 1]`` of the packed ``[T, H, D]`` rows alone, ``[T, H, Dv]``."""
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            heads_first = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, L, D]
            out[start:end] = F.scaled_dot_product_attention(*heads_first, scale=scale).transpose(0, 1)
    return out
