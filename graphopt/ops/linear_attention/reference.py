"""What the linear-attention ops compute, stated plainly (the twins every kernel is tested against).

Softmax attention weighs key ``j`` for query ``i`` by ``exp(q_i·k_j · scale + m_ij)``. Linear
attention (Katharopoulos et al., "Transformers are RNNs", ICML 2020) replaces the exponential by a
product of feature maps, ``φ(q_i)·φ(k_j)``, which makes the sum over keys associative::

    out_i = Σ_j w_ij (φq_i·φk_j) v_j / (Σ_j w_ij (φq_i·φk_j) + eps)
          = φq_i (Σ_j w_j φk_jᵀ v_j) / (φq_i · Σ_j w_j φk_j + eps)      (w query-independent)

so that a bidirectional layer is two GEMMs, ``O(S·F·Dv)`` instead of ``O(L·S·(F + Dv))``, and a
causal one is a prefix sum (a recurrent state for decoding). The ops take the features ``φq``,
``φk`` already mapped (the map is ordinary graph ops, learned or not) and SDPA's own ``attn_mask``
and ``is_causal``: the mask's weight ``w_ij`` is the factor softmax would give the key, 1/0 for a
boolean mask and ``exp(m_ij)`` for an additive one (1 at 0, 0 at ``-inf`` or a large negative), so
a key-padding mask makes pads contribute nothing, exactly. ``is_causal`` keeps ``j <= i`` aligned at
the top-left corner (SDPA's ``tril``). ``eps`` keeps a row whose weights are all zero at 0.

The hybrid of LoLCATs (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models",
2024) keeps softmax on a sliding window of nearby keys and linear attention on the others, under
one normalizer and a learned per-head mix ``g = sigmoid(mix)``::

    a_ij = g · w_ij exp(s_ij − c_i)       for j in the window of i   (s = q·k · scale, c_i the max of s + log w there)
    a_ij = (1 − g) · w_ij (φq_i·φk_j)     for the other keys
    out_i = Σ_j a_ij v_j / (Σ_j a_ij + eps)

The window is causal, ``i − window < j <= i``, when the attention is: ``is_causal``, or a mask that
hides every later key (a decoder's mask built into the tensor, as Hugging Face passes it with
padding); otherwise it is ``|i − j| <= window // 2``.

Everything computes in fp32 (fp64 inputs in fp64), outputs in the inputs' dtype. Grouped-query
attention: ``k``/``v`` (and ``φk``) may have fewer heads, each serving ``H / Hk`` query heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphopt.ops.attention_masks import causal_keep, hides_later_keys, mask_weights  # noqa: F401  (re-exported: the ops' reference names)

__all__ = [
    "causal_keep",
    "hides_later_keys",
    "hybrid_attention_reference",
    "linear_attention_recurrent",
    "linear_attention_reference",
    "mask_weights",
    "varlen_hybrid_attention_reference",
    "varlen_linear_attention_reference",
    "window_keep",
]


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def window_keep(length_q: int, length_k: int, window: int, is_causal: bool, device=None) -> Tensor:
    """True where key ``j`` is in query ``i``'s window: ``i − window < j <= i`` (causal) or ``|i − j| <= window // 2``."""
    i = torch.arange(length_q, device=device)[:, None]
    j = torch.arange(length_k, device=device)[None, :]
    if is_causal:
        return (j <= i) & (j > i - window)
    return (i - j).abs() <= window // 2


def _heads(x: Tensor, heads: int) -> Tensor:
    """``x`` ``[..., Hk, S, D]`` with each of its heads repeated for ``heads // Hk`` query heads (GQA)."""
    groups = heads // x.shape[-3]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def linear_attention_reference(fq: Tensor, fk: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, eps: float = 1e-6) -> Tensor:
    """``out_i = Σ_j w_ij (φq_i·φk_j) v_j / (Σ_j w_ij (φq_i·φk_j) + eps)``, the quadratic form.

    ``fq`` ``[B, H, L, F]``, ``fk`` ``[B, Hk, S, F]``, ``v`` ``[B, Hk, S, Dv]`` (``Hk`` divides
    ``H``); ``attn_mask`` broadcastable to ``[B, H, L, S]`` (see :func:`mask_weights`). Returns
    ``[B, H, L, Dv]`` in ``v``'s dtype.
    """
    dtype = compute_dtype(v)
    heads = fq.shape[-3]
    q, k, val = fq.to(dtype), _heads(fk, heads).to(dtype), _heads(v, heads).to(dtype)
    a = q @ k.transpose(-2, -1)
    w = mask_weights(attn_mask, dtype)
    if w is not None:
        a = a * w
    if is_causal:
        a = a.masked_fill(~causal_keep(a.shape[-2], a.shape[-1], a.device), 0)
    return ((a @ val) / (a.sum(-1, keepdim=True) + eps)).to(v.dtype)


def hybrid_attention_reference(
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
    """LoLCATs' sliding-window softmax + linear attention under one normalizer (module docstring).

    ``q`` ``[B, H, L, D]``, ``k`` ``[B, Hk, S, D]``, ``v`` ``[B, Hk, S, Dv]``, ``fq``/``fk`` their
    features ``[B, H|Hk, ·, F]``, ``mix`` ``[H]`` (logits of the softmax share ``g``), ``scale``
    defaulting to ``1 / sqrt(D)``.
    """
    dtype = compute_dtype(v)
    heads = q.shape[-3]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qq, kk, val = q.to(dtype), _heads(k, heads).to(dtype), _heads(v, heads).to(dtype)
    fqq, fkk = fq.to(dtype), _heads(fk, heads).to(dtype)
    length_q, length_k = q.shape[-2], k.shape[-2]
    inside = window_keep(length_q, length_k, window, is_causal or hides_later_keys(attn_mask, length_q, length_k), q.device)
    keep = causal_keep(length_q, length_k, q.device) if is_causal else torch.ones_like(inside)
    s = qq @ kk.transpose(-2, -1) * scale
    w = torch.ones((), dtype=dtype, device=q.device)
    if attn_mask is not None:
        w = mask_weights(attn_mask, dtype)
        s = s + torch.log(w)  # the additive mask itself, but -inf where its weight is 0 (a pad is out even when all its window is)
    s = s.masked_fill(~(inside & keep), float("-inf"))
    c = s.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    g = torch.sigmoid(mix.to(dtype)).view(-1, 1, 1)
    a_window = g * torch.exp(s - c)
    a_linear = ((1 - g) * (fqq @ fkk.transpose(-2, -1)) * w).masked_fill(~(keep & ~inside), 0)
    a = a_window + a_linear
    return ((a @ val) / (a.sum(-1, keepdim=True) + eps)).to(v.dtype)


def _per_sequence(fn, packed: tuple[Tensor, ...], cu_seqlens: Tensor, out: Tensor) -> Tensor:
    """Run ``fn`` on each sequence of packed ``[T, H, ·]`` tensors as ``[1, H, L, ·]`` batches."""
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            one = [t[start:end].transpose(0, 1).unsqueeze(0) for t in packed]
            out[start:end] = fn(*one)[0].transpose(0, 1)
    return out


def varlen_linear_attention_reference(fq: Tensor, fk: Tensor, v: Tensor, cu_seqlens: Tensor, eps: float = 1e-6) -> Tensor:
    """Bidirectional linear attention of each packed sequence ``cu_seqlens[b]:cu_seqlens[b + 1]`` alone.

    ``fq`` ``[T, H, F]``, ``fk`` ``[T, Hk, F]``, ``v`` ``[T, Hk, Dv]``; returns ``[T, H, Dv]``.
    """
    out = v.new_zeros((fq.shape[0], fq.shape[1], v.shape[-1]))
    return _per_sequence(lambda a, b, c: linear_attention_reference(a, b, c, eps=eps), (fq, fk, v), cu_seqlens, out)


def varlen_hybrid_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, mix: Tensor, window: int, cu_seqlens: Tensor, scale: float | None = None, eps: float = 1e-6
) -> Tensor:
    """Bidirectional hybrid attention of each packed sequence alone (packed ``[T, H, ·]`` operands)."""
    out = v.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))

    def one(q1, k1, v1, fq1, fk1):
        return hybrid_attention_reference(q1, k1, v1, fq1, fk1, mix, window, scale=scale, eps=eps)

    return _per_sequence(one, (q, k, v, fq, fk), cu_seqlens, out)


def linear_attention_recurrent(
    fq: Tensor, fk: Tensor, v: Tensor, state: tuple[Tensor, Tensor] | None = None, eps: float = 1e-6
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal linear attention as a recurrence, for one-token decoding.

    The state after tokens ``1..t`` is ``(Σ φk_jᵀ v_j, Σ φk_j)``, ``[B, H, F, Dv]`` and ``[B, H, F]``
    (fp32); each new token adds its term and reads ``φq_t`` against it, ``O(F·Dv)`` per token
    whatever the context length. ``fq`` ``[B, H, n, F]``, ``fk`` ``[B, Hk, n, F]``, ``v``
    ``[B, Hk, n, Dv]`` for ``n`` new tokens (processed in order); returns their outputs
    ``[B, H, n, Dv]`` and the new state. Equal to the causal :func:`linear_attention_reference`
    of the whole sequence, token by token.
    """
    dtype = compute_dtype(v)
    heads = fq.shape[-3]
    q, k, val = fq.to(dtype), _heads(fk, heads).to(dtype), _heads(v, heads).to(dtype)
    if state is None:
        kv = q.new_zeros((*q.shape[:-2], q.shape[-1], val.shape[-1]))
        ksum = q.new_zeros((*q.shape[:-2], q.shape[-1]))
    else:
        kv, ksum = state
    outs = []
    for t in range(q.shape[-2]):
        kv = kv + k[..., t, :, None] * val[..., t, None, :]
        ksum = ksum + k[..., t, :]
        qt = q[..., t, :]
        outs.append((qt.unsqueeze(-2) @ kv).squeeze(-2) / ((qt * ksum).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, dim=-2).to(v.dtype), (kv, ksum)
