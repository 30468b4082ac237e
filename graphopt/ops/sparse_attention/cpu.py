"""The sparse-attention ops on CPU (and any device without a kernel of its own): only visible blocks are computed.

**Window + global** (:func:`window_attention_chunked`). The window is causal when ``is_causal`` or
when the mask hides every later key (:func:`~graphopt.ops.sparse_attention.reference.window_is_causal`).
The queries are split into chunks of ``C`` rows. Query ``i`` sees keys ``i − left .. i + right`` of
its window (``left = window − 1``, ``right = 0`` causal; ``left = right = window // 2``
bidirectional), so chunk ``c`` (rows ``cC .. cC + C − 1``) needs only the band of
``W = C + left + right`` keys starting at ``cC − left``. The keys, padded by ``left`` in front, are
viewed as ``[B, H, nC, W, D]`` with ``unfold`` (a strided view, not a copy), the ``g`` global keys
are put in front of every band (a copy, only with global tokens), and one 4-D SDPA per batch element
runs all chunks as ``[nC, H, C, ·]`` strided views under one bool ``[nC, 1, C, g + W]`` mask shared
by the heads: the window's diagonal band, keys past the sequence or already counted as global,
causality. The first ``g`` (global) query rows see every key: they run as one ordinary SDPA over
``[g, S]`` and overwrite their rows. Work and memory are ``O(L · (C + window + g))``, never
``O(L · S)``; ``C = max(64, left + right + 1)`` keeps the band at most about twice the window.
Where the bands would hold more than :data:`DENSE_FRACTION` of the ``L · S`` pairs (short sequences,
wide windows), dense masked SDPA computes fewer and runs instead.

**Block-sparse** (:func:`block_sparse_attention_gathered`). Query blocks (per head when the
layout is) are grouped by how many key blocks they list; each group gathers its key blocks into
``[.., n, m · bs, D]`` and runs one batched SDPA, masked only at the sequence's ragged end and by
causality. Work is the listed blocks, ``O(Σ layout · bs²)``.

SDPA's ``attn_mask`` is taken on the fast paths when it is a key mask, the same for every query
(``[B|1, H|1, 1, S]``, or ``[.., L, S]`` expanded from one or equal along the query dim: Hugging
Face's ``sdpa`` BERT passes its padding mask so), or, under a causal window, when it is one at and
before each query (a decoder's ``tril ∧ keys``, as Hugging Face's Llama passes it:
:func:`~graphopt.ops.attention_masks.causal_key_row`); it is then gathered into the bands like the keys. Any other mask runs the dense form (:func:`dense_masked_sdpa`: SDPA over ``[L, S]`` with the
pattern and the mask combined), as do sequences one chunk covers. Everything runs
``scaled_dot_product_attention`` in the inputs' dtype, which returns zeros for a fully masked row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.ops.attention_masks import causal_key_row, key_row
from graphopt.ops.sparse_attention.reference import block_layout_keep, check_layout, window_is_causal, window_pattern_keep

__all__ = [
    "block_sparse_attention_gathered",
    "dense_masked_sdpa",
    "varlen_window_attention_chunked",
    "window_attention_chunked",
    "window_chunk",
]

MIN_CHUNK = 64
"""The smallest query chunk: SDPA's per-call overhead dominates below it."""


def window_chunk(window: int, is_causal: bool) -> int:
    """The query chunk ``C`` for a window: at least :data:`MIN_CHUNK`, at least the window's width."""
    left, right = _reach(window, is_causal)
    return max(MIN_CHUNK, left + right + 1)


def _reach(window: int, is_causal: bool) -> tuple[int, int]:
    """How far the window reaches before and after the query: ``(left, right)``."""
    return (window - 1, 0) if is_causal else (window // 2, window // 2)


def _expand_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, Hk, S, ·]`` with each head repeated for ``heads // Hk`` query heads (grouped-query attention)."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _combine(keep: Tensor, attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The pattern ``keep`` and SDPA's mask as one mask SDPA takes: bool, or additive (``-inf`` off the pattern)."""
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return keep & attn_mask
    return attn_mask.to(dtype).masked_fill(~keep, float("-inf"))


def dense_masked_sdpa(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    """SDPA over all ``[L, S]`` pairs with the pattern ``keep`` and ``attn_mask`` combined (the fallback)."""
    heads = q.shape[1]
    return F.scaled_dot_product_attention(q, _expand_heads(k, heads), _expand_heads(v, heads), attn_mask=_combine(keep, attn_mask, q.dtype), scale=scale)


def _gather_key_mask(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """A per-key mask as SDPA's: bool stays, an additive one in the query's dtype."""
    return keys if keys.dtype == torch.bool else keys.to(dtype)


DENSE_FRACTION = 0.5
"""The chunked path runs when its bands hold at most this fraction of the ``L · S`` pairs dense SDPA computes; dense SDPA otherwise."""


def window_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    global_tokens: int,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """``graphopt::window_attention`` by chunked banded SDPA, or dense masked SDPA where that computes fewer pairs (module docstring), any device."""
    batch, heads, length_q, _ = q.shape
    length_k = k.shape[2]
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    causal_window = window_is_causal(attn_mask, is_causal, length_q, length_k)
    keys_mask = key_row(attn_mask)
    if keys_mask is False and causal_window:
        keys_mask = causal_key_row(attn_mask, length_q, length_k)
    chunk = window_chunk(window, causal_window)
    left, right = _reach(window, causal_window)
    chunks = math.ceil(length_q / chunk)
    width = chunk + left + right
    glob = min(global_tokens, length_k)
    band_pairs = chunks * chunk * (glob + width)
    covers_all = window >= length_q if causal_window else window // 2 >= max(length_q, length_k) - 1
    if covers_all:  # every pair the mask allows is in the window: plain SDPA, no pattern mask to build
        return F.scaled_dot_product_attention(q, _expand_heads(k, heads), _expand_heads(v, heads), attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    if keys_mask is False or length_q <= chunk or length_k <= width or band_pairs > DENSE_FRACTION * length_q * length_k:
        keep = window_pattern_keep(length_q, length_k, window, global_tokens, is_causal, q.device, causal_window)
        return dense_masked_sdpa(q, k, v, keep, attn_mask, scale)
    padded_q = chunks * chunk
    # keys at band position t of chunk c are key j = c*C - left + t; pad so every band is in range
    total = left + padded_q + right
    back = max(0, total - left - length_k)

    def bands(x: Tensor, value: float | bool = 0.0) -> Tensor:  # [.., S, ·] -> [.., nC, W, ·], a strided view of one padded copy
        x = F.pad(x, (0, 0, left, back), value=value)[..., :total, :]
        return x.unfold(-2, width, chunk).transpose(-1, -2)

    q_chunks = F.pad(q, (0, 0, 0, padded_q - length_q)).unflatten(2, (chunks, chunk))  # [B, H, nC, C, D]
    k_band, v_band = bands(k), bands(v)  # [B, Hk, nC, W, ·]
    # the pattern inside the bands, shared by every batch and head: row r of chunk c is query i = cC + r, slot t is key j = cC - left + t
    r = torch.arange(chunk, device=q.device)[:, None]
    t = torch.arange(width, device=q.device)[None, :]
    c = torch.arange(chunks, device=q.device)[:, None, None]
    j = c * chunk - left + t  # [nC, 1, W]
    offset = t - left - r  # j - i, [C, W]
    keep = (offset >= -left) & (offset <= right) & (j >= glob) & (j < length_k)  # [nC, C, W]
    if glob:  # the global keys in front of every band (a copy of the bands)
        i = c * chunk + r  # [nC, C, 1]
        global_keep = torch.ones(chunks, chunk, glob, dtype=torch.bool, device=q.device)
        if is_causal:
            global_keep = global_keep & (torch.arange(glob, device=q.device) <= i)
        keep = torch.cat([global_keep, keep], dim=-1)
        k_band = torch.cat([k[:, :, None, :glob].expand(-1, -1, chunks, -1, -1), k_band], dim=-2)
        v_band = torch.cat([v[:, :, None, :glob].expand(-1, -1, chunks, -1, -1), v_band], dim=-2)
    keep = keep[:, None]  # [nC, 1, C, g + W]: broadcast over the heads
    band_mask = None
    if keys_mask is not None:  # [B', H', S] -> [B', H', nC, g + W], gathered like the keys
        pad_value = False if keys_mask.dtype == torch.bool else float("-inf")
        band_mask = bands(keys_mask[..., None], pad_value)[..., 0]
        if glob:
            band_mask = torch.cat([keys_mask[:, :, None, :glob].expand(-1, -1, chunks, -1), band_mask], dim=-1)
        band_mask = _gather_key_mask(band_mask, q.dtype)
    out = q.new_empty((batch, heads, length_q, v.shape[-1]))
    groups = heads // k.shape[1]
    for b in range(batch):  # one 4-D SDPA per batch element: [nC, H, C|W, ·], strided views of the chunks and bands
        kb, vb = k_band[b].transpose(0, 1), v_band[b].transpose(0, 1)
        if groups > 1:
            kb, vb = kb.repeat_interleave(groups, dim=1), vb.repeat_interleave(groups, dim=1)
        mask = keep
        if band_mask is not None:  # [H', nC, g + W] -> [nC, H', 1, g + W]
            mask = _combine(keep, band_mask[b if band_mask.shape[0] > 1 else 0].transpose(0, 1)[:, :, None], q.dtype)
        result = F.scaled_dot_product_attention(q_chunks[b].transpose(0, 1), kb, vb, attn_mask=mask, scale=scale)  # [nC, H, C, Dv]
        out[b] = result.transpose(0, 1).flatten(1, 2)[:, :length_q]
    rows = min(global_tokens, length_q)
    if rows:  # the global queries see every key
        full = torch.ones(rows, length_k, dtype=torch.bool, device=q.device)
        if is_causal:
            full = full.tril()
        row_mask = None if attn_mask is None else attn_mask[..., :rows, :] if attn_mask.dim() >= 2 and attn_mask.shape[-2] == length_q else attn_mask
        out[:, :, :rows] = dense_masked_sdpa(q[:, :, :rows], k, v, full, row_mask, scale)
    return out


def block_sparse_attention_gathered(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Tensor,
    block_size: int,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """``graphopt::block_sparse_attention`` visiting only the listed blocks (module docstring), any device."""
    batch, heads, length_q, _ = q.shape
    length_k = k.shape[2]
    check_layout(layout, block_size, heads, length_q, length_k)
    keys_mask = key_row(attn_mask)
    if keys_mask is False:
        keep = block_layout_keep(layout, block_size, length_q, length_k)
        if is_causal:
            keep = keep & torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).tril()
        return dense_masked_sdpa(q, k, v, keep, attn_mask, scale)
    k, v = _expand_heads(k, heads), _expand_heads(v, heads)
    bs = block_size
    n_q, n_k = layout.shape[-2:]
    per_head = layout.dim() == 3
    layout3 = layout.bool().reshape(-1, n_q, n_k).to(q.device)  # [Hl, nq, nk], Hl = H or 1
    # blocks of bs tokens; padding rows/keys past the end are masked (keys) or dropped (rows)
    q_blocks = F.pad(q, (0, 0, 0, n_q * bs - length_q)).unflatten(2, (n_q, bs))  # [B, H, nq, bs, D]
    k_blocks = F.pad(k, (0, 0, 0, n_k * bs - length_k)).unflatten(2, (n_k, bs))
    v_blocks = F.pad(v, (0, 0, 0, n_k * bs - length_k)).unflatten(2, (n_k, bs))
    in_sequence = (torch.arange(n_k * bs, device=q.device) < length_k).unflatten(0, (n_k, bs))  # [nk, bs]
    if keys_mask is not None:
        pad_value = False if keys_mask.dtype == torch.bool else float("-inf")
        keys_blocks = F.pad(_gather_key_mask(keys_mask, q.dtype), (0, n_k * bs - length_k), value=pad_value).unflatten(-1, (n_k, bs))  # [B', H', nk, bs]
    out = q.new_zeros((batch, heads, n_q * bs, v.shape[-1])).unflatten(2, (n_q, bs))
    counts = layout3.sum(-1)  # [Hl, nq]
    for m in counts.unique().tolist():
        if m == 0:
            continue  # rows that list no key block see no key: zeros
        head_ids, row_ids = torch.nonzero(counts == m, as_tuple=True)  # the (head, query block) pairs listing m blocks
        col_ids = torch.nonzero(layout3[head_ids, row_ids], as_tuple=True)[1].view(-1, m)  # [n, m], ascending
        keep = in_sequence[col_ids].flatten(-2)[:, None, :]  # [n, 1, m*bs]
        if is_causal:
            i = row_ids[:, None, None] * bs + torch.arange(bs, device=q.device)[None, :, None]
            j = (col_ids[:, :, None] * bs + torch.arange(bs, device=q.device)).flatten(-2)[:, None, :]
            keep = keep & (j <= i)
        if per_head:  # gather (head, block) pairs: [B, n, ...]
            qg = q_blocks[:, head_ids, row_ids]
            kg = k_blocks[:, head_ids[:, None], col_ids].flatten(2, 3)
            vg = v_blocks[:, head_ids[:, None], col_ids].flatten(2, 3)
            mask = keep
            if keys_mask is not None:  # [B', H'|1, nk, bs] -> [B', n, 1, m*bs]
                km = keys_blocks[:, head_ids[:, None] if keys_blocks.shape[1] > 1 else torch.zeros_like(head_ids)[:, None], col_ids].flatten(-2)
                mask = _combine(keep, km[:, :, None, :], q.dtype)
            out[:, head_ids, row_ids] = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
        else:  # the same blocks for every head: [B, H, n, ...]
            qg = q_blocks[:, :, row_ids]
            kg = k_blocks[:, :, col_ids].flatten(3, 4)
            vg = v_blocks[:, :, col_ids].flatten(3, 4)
            mask = keep
            if keys_mask is not None:  # [B', H', nk, bs] -> [B', H', n, 1, m*bs]
                mask = _combine(keep, keys_blocks[:, :, col_ids].flatten(-2)[:, :, :, None, :], q.dtype)
            out[:, :, row_ids] = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    return out.flatten(2, 3)[:, :, :length_q]


def varlen_window_attention_chunked(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, global_tokens: int, scale: float | None = None) -> Tensor:
    """``graphopt::varlen_window_attention``: :func:`window_attention_chunked` on each packed sequence,
    sequences of one length run together as one batch."""
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    starts, lengths = cu_seqlens[:-1].tolist(), cu_seqlens.diff().tolist()
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths):
        if length > 0:
            by_length.setdefault(length, []).append(start)
    for length, group in by_length.items():
        rows = (torch.tensor(group, device=q.device)[:, None] + torch.arange(length, device=q.device)).flatten()
        batch = [t.index_select(0, rows).unflatten(0, (len(group), length)).transpose(1, 2) for t in (q, k, v)]  # [n, H, L, ·]
        result = window_attention_chunked(*batch, window, global_tokens, scale=scale)
        out.index_copy_(0, rows, result.transpose(1, 2).flatten(0, 1))
    return out
