"""What the sparse-attention ops compute, stated plainly (the twins every kernel is tested against).

Softmax attention with a fixed sparsity pattern: query ``i`` weighs key ``j`` by
``exp(q_i·k_j · scale + m_ij)`` only where the pattern lets it see ``j``, and by 0 elsewhere::

    out_i = Σ_{j visible from i} exp(s_ij) v_j / Σ_{j visible from i} exp(s_ij),   s_ij = q_i·k_j · scale + m_ij

(``m`` is SDPA's own ``attn_mask``: a boolean mask removes keys, an additive one is added to the
scores). A row that sees no key gives zeros, as ATen's SDPA returns for a fully masked row.

Two patterns:

* **Sliding window + global tokens** (Longformer, Beltagy et al. 2020; the "window + global" part
  of BigBird, Zaheer et al. 2020): ``j`` is visible from ``i`` iff ``j`` is in ``i``'s window, or
  ``j < global_tokens`` (every query sees the global keys, e.g. CLS), or ``i < global_tokens`` (a
  global query sees every key). The window is :func:`~graphopt.ops.linear_attention.reference.window_keep`'s:
  ``i − window < j <= i`` (causal) or ``|i − j| <= window // 2`` (bidirectional). With
  ``is_causal`` every pair also needs ``j <= i`` (top-left aligned, as SDPA's ``is_causal``).
* **Block-sparse** (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"; BigBird's
  blocked form): a boolean ``layout[qb, kb]`` (or per head, ``layout[h, qb, kb]``) over blocks of
  ``block_size`` queries and keys: ``j`` is visible from ``i`` iff ``layout[i // block_size, j // block_size]``.

A pattern sees ``O(L · window)`` pairs instead of ``L · S``; the references here build the dense
``[L, S]`` mask all the same (they are for reading, not speed: the kernels in ``cpu.py`` and
``triton.py`` never do). Grouped-query attention: ``k``/``v`` may have ``Hk`` heads, each serving
``H / Hk`` query heads. Scores compute in fp32 (fp64 for fp64 inputs); outputs in ``q``'s dtype.

The packed form (``varlen_window_attention``) applies the window pattern to each sequence
``cu_seqlens[b]:cu_seqlens[b + 1]`` of ``[T, H, D]`` tensors alone, bidirectionally, positions and
global tokens counted from the sequence's first token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graphopt.ops.attention_masks import hides_later_keys
from graphopt.ops.linear_attention.reference import compute_dtype, window_keep

__all__ = [
    "block_layout_keep",
    "block_pair_count",
    "block_sparse_attention_reference",
    "masked_attention",
    "varlen_window_attention_reference",
    "window_attention_reference",
    "window_is_causal",
    "window_pair_count",
    "window_pattern_keep",
]


def window_is_causal(attn_mask: Tensor | None, is_causal: bool, length_q: int, length_k: int) -> bool:
    """Whether the window is the causal one: ``is_causal``, or ``attn_mask`` hides every later key
    (:func:`~graphopt.ops.attention_masks.hides_later_keys`, the hybrid attention's rule)."""
    return is_causal or hides_later_keys(attn_mask, length_q, length_k)


def window_pattern_keep(
    length_q: int, length_k: int, window: int, global_tokens: int, is_causal: bool, device=None, causal_window: bool | None = None
) -> Tensor:
    """``[L, S]`` bool: True where key ``j`` is visible from query ``i`` (window, or a global query or key; ``j <= i`` when causal).

    ``causal_window``: whether the window is the causal one (:func:`window_is_causal`), ``is_causal`` by default."""
    keep = window_keep(length_q, length_k, window, is_causal or bool(causal_window), device)
    i = torch.arange(length_q, device=device)[:, None]
    j = torch.arange(length_k, device=device)[None, :]
    keep = keep | (j < global_tokens) | (i < global_tokens)
    return keep & (j <= i) if is_causal else keep


def block_layout_keep(layout: Tensor, block_size: int, length_q: int, length_k: int) -> Tensor:
    """The token-level mask of a block ``layout`` (``[nq, nk]`` or ``[H, nq, nk]``): ``[.., L, S]`` bool."""
    rows = torch.arange(length_q, device=layout.device) // block_size
    cols = torch.arange(length_k, device=layout.device) // block_size
    return layout.bool()[..., rows[:, None], cols[None, :]]


def check_layout(layout: Tensor, block_size: int, heads: int, length_q: int, length_k: int) -> None:
    """Raise ValueError unless ``layout`` is ``[ceil(L / bs), ceil(S / bs)]`` or ``[H, ..]`` of that."""
    blocks = (math.ceil(length_q / block_size), math.ceil(length_k / block_size))
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if layout.dim() not in (2, 3) or tuple(layout.shape[-2:]) != blocks or (layout.dim() == 3 and layout.shape[0] != heads):
        raise ValueError(f"layout {tuple(layout.shape)} must be {blocks} or ({heads}, *{blocks}) for L={length_q}, S={length_k}, block_size={block_size}")


def _heads(x: Tensor, heads: int) -> Tensor:
    groups = heads // x.shape[-3]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    """Dense softmax attention where ``keep`` (broadcastable to ``[B, H, L, S]``) is True, SDPA's
    ``attn_mask`` on top, fully masked rows zero; scores in fp32/fp64, output in ``q``'s dtype."""
    dtype = compute_dtype(q)
    heads = q.shape[-3]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q.to(dtype) @ _heads(k, heads).to(dtype).transpose(-2, -1) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask.to(dtype)
    scores = scores.masked_fill(~keep, float("-inf"))
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return (weights @ _heads(v, heads).to(dtype)).to(q.dtype)


def window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    global_tokens: int,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Sliding-window + global attention (module docstring): ``q`` ``[B, H, L, D]``, ``k`` ``[B, Hk, S, D]``,
    ``v`` ``[B, Hk, S, Dv]``; ``attn_mask`` broadcastable to ``[B, H, L, S]``. Returns ``[B, H, L, Dv]``."""
    length_q, length_k = q.shape[-2], k.shape[-2]
    causal_window = window_is_causal(attn_mask, is_causal, length_q, length_k)
    keep = window_pattern_keep(length_q, length_k, window, global_tokens, is_causal, q.device, causal_window)
    return masked_attention(q, k, v, keep, attn_mask, scale)


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Tensor,
    block_size: int,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Block-sparse attention (module docstring); ``layout`` ``[nq, nk]`` or ``[H, nq, nk]`` bool."""
    length_q, length_k = q.shape[-2], k.shape[-2]
    check_layout(layout, block_size, q.shape[-3], length_q, length_k)
    keep = block_layout_keep(layout, block_size, length_q, length_k)  # [L, S] or [H, L, S]: broadcasts to [B, H, L, S]
    if is_causal:
        keep = keep & torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).tril()
    return masked_attention(q, k, v, keep, attn_mask, scale)


def varlen_window_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, global_tokens: int, scale: float | None = None
) -> Tensor:
    """Bidirectional window + global attention of each packed sequence alone: ``[T, H|Hk, ·]`` -> ``[T, H, Dv]``."""
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            one = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, L, ·]
            out[start:end] = window_attention_reference(*one, window, global_tokens, scale=scale).transpose(0, 1)
    return out


def window_pair_count(length_q: int, length_k: int, window: int, global_tokens: int, is_causal: bool) -> int:
    """How many (query, key) pairs :func:`window_pattern_keep` keeps, counted row by row in ``O(L)``."""
    if length_q <= 0 or length_k <= 0:
        return 0
    i = torch.arange(length_q, dtype=torch.int64)
    g = min(global_tokens, length_k)
    if is_causal:
        lo, hi = i - window + 1, i
        global_row = torch.minimum(i + 1, torch.tensor(length_k))
    else:
        lo, hi = i - window // 2, i + window // 2
        global_row = torch.full_like(i, length_k)
    band = (torch.minimum(hi, torch.tensor(length_k - 1)) - torch.maximum(lo, torch.tensor(g)) + 1).clamp(min=0)
    other_row = band + min(g, length_k)  # for i >= g: the global keys (all j < g <= i) plus the window past them
    return int(torch.where(i < global_tokens, global_row, other_row).sum())


def block_pair_count(layout: Tensor, block_size: int, length_q: int, length_k: int, heads: int, is_causal: bool) -> int:
    """How many (query, key) pairs a block layout keeps, summed over heads (``[nq, nk]`` counts for each head)."""
    rows = (torch.clamp(length_q - torch.arange(layout.shape[-2]) * block_size, 0, block_size)).to(torch.int64)
    cols = (torch.clamp(length_k - torch.arange(layout.shape[-1]) * block_size, 0, block_size)).to(torch.int64)
    cells = rows[:, None] * cols[None, :]
    if is_causal:  # blocks above the diagonal keep nothing; one on it keeps, in its row t, min(t + 1, its columns) keys
        qb = torch.arange(layout.shape[-2])[:, None]
        kb = torch.arange(layout.shape[-1])[None, :]
        t = torch.arange(block_size)[None, :]
        diagonal = min(layout.shape[-2], layout.shape[-1])
        triangle = torch.where(t < rows[:diagonal, None], torch.minimum(t + 1, cols[:diagonal, None]), 0).sum(1)
        on_diagonal = torch.zeros_like(cells)
        on_diagonal[torch.arange(diagonal), torch.arange(diagonal)] = triangle
        cells = torch.where(kb < qb, cells, on_diagonal)
    total = int((layout.bool().to(torch.int64) * cells).sum())
    return total if layout.dim() == 3 else total * heads
