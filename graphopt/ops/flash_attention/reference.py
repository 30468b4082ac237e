"""Naive twins of the flash-attention launchers: the scores materialised, an explicit softmax.

What :func:`~graphopt.ops.flash_attention.triton.flash_attention` and
:func:`~graphopt.ops.flash_attention.triton.flash_attention_varlen` must reproduce, written for
reading, not speed: ``[Lq, Lk]`` scores per (batch, head) in fp64, masked, softmaxed, times ``V``.
Rows whose every key is masked give zeros, as ATen's CPU SDPA (and the kernel) return for them.
The result is rounded to the query's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_reference", "varlen_attention_reference"]


def _softmax_or_zeros(scores: Tensor) -> Tensor:
    """Softmax over the last dim; rows that are all ``-inf`` give zeros instead of NaN."""
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False
) -> Tensor:
    """``scaled_dot_product_attention`` without dropout, as :func:`~graphopt.ops.flash_attention.triton.flash_attention` takes it."""
    dtype = q.dtype
    q, k, v = (t.double() for t in (q, k, v))
    if enable_gqa and q.shape[-3] != k.shape[-3]:  # each key/value head serves Hq / Hkv query heads
        group = q.shape[-3] // k.shape[-3]
        k, v = (t.repeat_interleave(group, dim=-3) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    lq, lk = scores.shape[-2:]
    if is_causal:  # top-left aligned: key j is kept for query i iff j <= i
        scores = scores.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask.double()
    return (_softmax_or_zeros(scores) @ v).to(dtype)


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """``graphopt::varlen_attention``: each packed sequence ``cu_seqlens[b]:cu_seqlens[b + 1]`` of
    ``[T, H, ·]`` tensors attends to itself alone, bidirectionally. Returns ``[T, H, Dv]``."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            sequence = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, ·]
            out[start:end] = attention_reference(*sequence, scale=scale).transpose(0, 1)
    return out
