"""Sub-quadratic forms of the linear-attention ops, in plain torch ops (so autograd runs through them).

What makes linear attention cheap is that the mask's weight factors per key, ``w_ij = w_j``: then

* **bidirectional**: ``KV = Σ_j w_j φk_jᵀ v_j`` (``[F, Dv]``) and ``z = Σ_j w_j φk_j`` once per head,
  and every query reads them: two GEMMs, ``O((L + S)·F·Dv)``. Where the sequence is short the
  quadratic form ``(φq φkᵀ) v`` costs less; :func:`linear_sums` picks the cheaper by counting.
* **causal**: the chunked form of flash-linear-attention (chunk ``C = 64``): within a chunk the
  masked quadratic form, across chunks the running state (an exclusive prefix sum of the chunks'
  ``KV``), ``O(L·C·F + L·F·Dv)``.

:func:`key_weights` decides whether a mask factors that way: a key-padding mask ``[B, 1, 1, S]``
does by its shape; a mask materialized to ``[B, 1, L, S]`` does when all its rows are equal
(checked on the values, ``O(L·S)``, negligible beside attention), and so does a causal mask built
into the tensor (a decoder with padding: ``tril ∧ keys``), which is then run as causal. Anything
else (a mask that differs by query) runs the quadratic reference, which is what the op means.

The hybrid (softmax on a window, linear elsewhere) is computed on bands: the queries in chunks of
``C``, each chunk against the whole key chunks its window touches (the padded keys ``unfold``-ed
into ``[..., chunks, band, F]``, a view), which gives the window's softmax terms and the linear
terms of the band's keys outside the window; the key chunks beyond the band enter as prefix and
reversed-prefix sums of the chunks' states. Nothing is computed as a difference of sums, which
would cancel where the window holds most keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.ops.attention_masks import causal_key_row, hides_later_keys, key_row
from graphopt.ops.linear_attention.reference import (
    _heads,
    causal_keep,
    compute_dtype,
    hybrid_attention_reference,
    linear_attention_reference,
    mask_weights,
)

CHUNK = 64
"""Queries per chunk of the causal and banded forms (flash-linear-attention's chunk)."""


def key_weights(attn_mask: Tensor | None, is_causal: bool, length_q: int, length_k: int, dtype: torch.dtype) -> tuple[str, Tensor | None]:
    """How ``attn_mask`` weighs the keys: ``("keys", w)`` with ``w`` ``[B|1, H|1, S]`` query-independent,
    ``("causal_keys", w)`` when the mask is a causal mask times such ``w`` (so the op runs causal),
    or ``("general", None)``. No mask is ``("keys", None)``. Decided by
    :mod:`graphopt.ops.attention_masks` on the mask in its own dtype; only the row ``w`` is converted."""
    if attn_mask is None:
        return "keys", None
    row = key_row(attn_mask)
    if row is not False:
        return "keys", mask_weights(row, dtype)
    if length_q == length_k and (is_causal or hides_later_keys(attn_mask, length_q, length_k)):
        row = causal_key_row(attn_mask, length_q, length_k)
        if row is not False:
            return "causal_keys", mask_weights(row, dtype)
    return "general", None


def _weighted(fk: Tensor, w: Tensor | None) -> Tensor:
    return fk if w is None else fk * w.unsqueeze(-1)


def _grouped(fq: Tensor, kv_heads: int) -> Tensor:
    """``[B, H, L, F]`` as ``[B, Hk, (H/Hk)·L, F]``: each key head's query heads side by side (GQA without copying keys)."""
    b, h, length, f = fq.shape
    return fq.reshape(b, kv_heads, (h // kv_heads) * length, f)


def running_sums(x: Tensor, reverse: bool = False) -> Tensor:
    """``S[m] = Σ_{c < m} x[:, :, c]`` for ``m = 0 .. n`` (``[B, H, n + 1, ...]``), or with ``reverse``
    ``S[m] = Σ_{c >= m} x[:, :, c]``. A loop of whole-chunk adds: ``torch.cumsum`` over a middle dim of
    ``[B, H, n, F, Dv]`` runs ~7x slower on CPU, and a difference of sums would cancel."""
    chunks = x.unbind(2)
    parts = [torch.zeros_like(chunks[0])]
    for chunk in reversed(chunks) if reverse else chunks:
        parts.append(parts[-1] + chunk)
    return torch.stack(parts[::-1] if reverse else parts, dim=2)


def linear_sums(fq: Tensor, fk: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """The numerator ``Σ_j (φq_i·φk_j) v_j`` ``[B, H, L, Dv]`` and denominator ``Σ_j φq_i·φk_j`` ``[B, H, L]``.

    ``fk`` carries the key weights already; all operands in the compute dtype. Causal needs ``L == S``.
    """
    b, h, length, f = fq.shape
    kv_heads, keys, dv = fk.shape[1], fk.shape[2], v.shape[-1]
    if not causal:
        if length * keys * (f + dv) <= (length + keys) * f * dv:
            fkh, vh = _heads(fk, h), _heads(v, h)
            a = fq @ fkh.transpose(-2, -1)
            return a @ vh, a.sum(-1)
        kv = fk.transpose(-2, -1) @ v  # [B, Hk, F, Dv]
        z = fk.sum(-2)  # [B, Hk, F]
        q = _grouped(fq, kv_heads)
        num = (q @ kv).reshape(b, h, length, dv)
        den = (q @ z.unsqueeze(-1)).reshape(b, h, length)
        return num, den
    fk, v = _heads(fk, h), _heads(v, h)
    chunks = math.ceil(length / CHUNK)
    pad = chunks * CHUNK - length
    q, k, val = (F.pad(t, (0, 0, 0, pad)).reshape(b, h, chunks, CHUNK, t.shape[-1]) for t in (fq, fk, v))
    a = (q @ k.transpose(-2, -1)).masked_fill(~causal_keep(CHUNK, CHUNK, fq.device), 0)  # [B, H, n, C, C]
    kv = k.transpose(-2, -1) @ val  # [B, H, n, F, Dv]
    z = k.sum(-2)  # [B, H, n, F]
    kv_before = running_sums(kv)[:, :, :-1]  # the chunks before each chunk
    z_before = running_sums(z)[:, :, :-1]
    num = a @ val + q @ kv_before
    den = a.sum(-1) + (q @ z_before.unsqueeze(-1)).squeeze(-1)
    return num.reshape(b, h, chunks * CHUNK, dv)[:, :, :length], den.reshape(b, h, chunks * CHUNK)[:, :, :length]


def linear_attention_fast(fq: Tensor, fk: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, eps: float = 1e-6) -> Tensor:
    """:func:`~graphopt.ops.linear_attention.reference.linear_attention_reference`, sub-quadratic where the mask allows."""
    dtype = compute_dtype(v)
    length_q, length_k = fq.shape[-2], fk.shape[-2]
    kind, w = key_weights(attn_mask, is_causal, length_q, length_k, dtype)
    causal = is_causal or kind == "causal_keys"
    if kind == "general" or (causal and length_q != length_k) or (w is not None and w.shape[1] not in (1, fk.shape[1])):
        return linear_attention_reference(fq, fk, v, attn_mask, is_causal, eps)
    num, den = linear_sums(fq.to(dtype), _weighted(fk.to(dtype), w), v.to(dtype), causal)
    return (num / (den.unsqueeze(-1) + eps)).to(v.dtype)


def _chunk_bands(x: Tensor, chunks: int, before: int, after: int) -> Tensor:
    """``x`` ``[B, H, S, E]`` in chunks of ``C``, as bands ``[B, H, chunks, (before + 1 + after)·C, E]``:
    band ``c`` holds key chunks ``c − before .. c + after``, zeros beyond the ends (a view of one padded copy)."""
    padded = F.pad(x, (0, 0, before * CHUNK, (chunks + after) * CHUNK - x.shape[-2]))
    return padded.unfold(-2, (before + 1 + after) * CHUNK, CHUNK).transpose(-2, -1)


def _outer_states(fk: Tensor, v: Tensor, chunks: int, before: int, after: int) -> tuple[Tensor, Tensor]:
    """Per query chunk ``c``, ``Σ φk_jᵀ v_j`` and ``Σ φk_j`` over the key chunks outside its band
    (``< c − before`` and ``> c + after``): a prefix and a reversed prefix sum of the chunks' states,
    never a difference of sums (which would cancel where the band holds most keys)."""
    b, h = fk.shape[:2]
    k = F.pad(fk, (0, 0, 0, chunks * CHUNK - fk.shape[-2])).reshape(b, h, chunks, CHUNK, -1)
    val = F.pad(v, (0, 0, 0, chunks * CHUNK - v.shape[-2])).reshape(b, h, chunks, CHUNK, -1)
    kv = torch.cat([k.transpose(-2, -1) @ val, k.sum(-2).unsqueeze(-1)], dim=-1)  # [B, H, n, F, Dv + 1]
    below, above = running_sums(kv), running_sums(kv, reverse=True)  # chunks < m, chunks >= m
    index = torch.arange(chunks, device=fk.device)
    outer = below[:, :, (index - before).clamp(min=0)] + above[:, :, (index + after + 1).clamp(max=chunks)]
    return outer[..., :-1], outer[..., -1]


def hybrid_attention_fast(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    mix: Tensor,
    window: int,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """:func:`~graphopt.ops.linear_attention.reference.hybrid_attention_reference` on bands (module docstring)."""
    dtype = compute_dtype(v)
    b, h, length, d = q.shape
    kind, w = key_weights(attn_mask, is_causal, length, k.shape[-2], dtype)
    causal = is_causal or kind == "causal_keys"
    if kind == "general" or length != k.shape[-2] or length <= 2 * CHUNK or (w is not None and w.shape[1] != 1):
        return hybrid_attention_reference(q, k, v, fq, fk, mix, window, attn_mask, is_causal, scale, eps)
    scale = d**-0.5 if scale is None else scale
    q, k, v, fq, fk = (t.to(dtype) for t in (q, k, v, fq, fk))
    k, v, fk = (_heads(t, h) for t in (k, v, fk))
    w = torch.ones((b, 1, length), dtype=dtype, device=q.device) if w is None else w.expand(b, 1, length)
    # the window reaches `reach_before` keys back and `reach_after` ahead (causal: by is_causal or by the mask)
    reach_before, reach_after = (window - 1, 0) if causal else (window // 2, window // 2)
    before, after = math.ceil(reach_before / CHUNK), math.ceil(reach_after / CHUNK)  # whole key chunks
    chunks = math.ceil(length / CHUNK)
    rows = chunks * CHUNK

    def chunked(t):
        return F.pad(t, (0, 0, 0, rows - length)).reshape(b, h, chunks, CHUNK, t.shape[-1])

    k_band, v_band, fk_band = (_chunk_bands(t, chunks, before, after) for t in (k, v, fk))
    w_band = _chunk_bands(w.unsqueeze(-1), chunks, before, after).squeeze(-1).unsqueeze(-2)  # [B, 1, n, 1, band]: 0 beyond the ends
    delta = torch.arange(CHUNK, device=q.device)[:, None] + before * CHUNK - torch.arange((before + 1 + after) * CHUNK, device=q.device)[None, :]  # i − j
    inside = (delta <= reach_before) & (-delta <= reach_after)
    seen = (delta >= 0) if causal else torch.ones_like(inside)
    s = (chunked(q) @ k_band.transpose(-2, -1)) * scale + torch.log(w_band)
    s = s.masked_fill(~(inside & seen), float("-inf"))
    c = s.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    a_window = torch.exp(s - c)
    a_outside = ((chunked(fq) @ fk_band.transpose(-2, -1)) * w_band).masked_fill(~(seen & ~inside), 0)
    kv_outer, z_outer = _outer_states(_weighted(fk, w), v, chunks, before, chunks if causal else after)  # causal: no chunk after the band
    g = torch.sigmoid(mix.to(dtype)).view(1, -1, 1, 1, 1)
    fq_chunks = chunked(fq)
    num = g * (a_window @ v_band) + (1 - g) * (a_outside @ v_band + fq_chunks @ kv_outer)
    den = g[..., 0] * a_window.sum(-1) + (1 - g[..., 0]) * (a_outside.sum(-1) + (fq_chunks @ z_outer.unsqueeze(-1)).squeeze(-1))
    out = num / (den.unsqueeze(-1) + eps)
    return out.reshape(b, h, rows, -1)[:, :, :length].to(v.dtype)
