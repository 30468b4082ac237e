"""The FlashAttention forward kernel (one ``@triton.jit`` function, ``tl.constexpr`` variants) and its launchers.

One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the keys in blocks of
``BLOCK_N``; for each block it computes the scores ``S = (Q · scale) Kᵀ``, applies the masks, and
folds the block into an *online softmax*: a running row maximum ``m_i``, a running sum of
exponentials ``l_i`` and an fp32 accumulator of ``exp(S - m_i) V``, the older terms rescaled by
``exp(m_old - m_new)`` whenever the maximum grows. The last step divides by ``l_i``.

The variants (``tl.constexpr`` arguments; Triton compiles one specialisation per combination, so
a variant pays nothing for the lines of the others):

* ``CAUSAL``: key ``j`` is kept for query ``i`` iff ``j <= i``, aligned at the top-left corner also
  when ``Lq != Lk`` (what ``torch.ones(Lq, Lk).tril()`` keeps). Key blocks entirely above the
  diagonal are never visited (the loop stops at the query block's last row); the visited blocks
  are masked elementwise, which only changes the ones on the diagonal.
* ``MASK_KIND="bool"``: mask False means "do not attend" (score ``-inf``);
  ``MASK_KIND="additive"``: a float mask is added to the scaled scores. Masks of any shape
  broadcastable to ``[B, H, Lq, Lk]`` are read through their strides, 0 along broadcast dimensions
  (BERT's ``[B, 1, 1, Lk]`` padding mask is never expanded in memory).
* ``VARLEN``: the inputs are packed ``[T, H, D]`` (padding-free execution, ByteTransformer, Zhai et
  al. 2023; ``flash_attn_varlen``). Program ``(m, b·H + h)`` loads sequence ``b``'s first row and
  length from ``CuSeqlens``; the length replaces ``Lq`` and ``Lk`` (which then carry only the
  autotuner's key), a program whose query block starts past it returns at once (the grid covers
  the longest sequence), and the launcher passes the token stride as the "batch" stride, so
  ``seq_start * stride_b`` is the sequence's first row and rows and keys count from there. No pad
  is read or computed.
* ``INPUT_PRECISION`` of the two ``tl.dot`` on a GPU: ``"ieee"`` (full fp32, for fp32 inputs, as
  ATen with TF32 off) or ``"tf32"`` (for fp16/bf16 inputs, whose values are exact in TF32; the
  probabilities are rounded to TF32, about fp16's precision). The interpreter computes in fp32.

Query, key and value of any strides (the ``[B, L, H, D] -> [B, H, L, D]`` views of Hugging Face
models, slices of a fused QKV projection) are read in place. With grouped-query attention each
group of ``KV_GROUP`` query heads reads one key/value head. The head dims ``D`` (query/key) and
``DV`` (value) are padded to the power-of-two block widths ``BLOCK_D``/``BLOCK_DV`` (at least 16,
which ``tl.dot`` needs) with masks; ragged tails of ``Lq`` and ``Lk`` are masked too.

**Fully masked rows.** A row whose every key is masked has no softmax; ATen's CPU SDPA returns
zeros for it (not NaN, unlike the explicit ``softmax(...) @ V``), and so does this kernel: its
running maximum stays ``-inf``, exponentials are taken against 0 instead (so they are 0, not
NaN), ``l_i`` stays 0 and the row is divided by 1.

Loads are cast to fp32 at once and everything computes in fp32; outputs are stored in the
output tensor's dtype. On a GPU ``triton.autotune`` picks ``BLOCK_M``, ``BLOCK_N``, warps and
stages among :data:`~graphopt.ops.flash_attention.GPU_CONFIGS`, keyed by the lengths, head dims,
variant and dtypes; under ``TRITON_INTERPRET=1`` (set before Triton is imported) blocks are fixed
at :data:`~graphopt.ops.flash_attention.INTERPRETER_BLOCK` and the kernel runs on CPU tensors.
The launchers raise :class:`~graphopt.ops.flash_attention.NotLowerable` before launching for
inputs the kernel does not take.
"""

from __future__ import annotations

import functools
import inspect
import math
import textwrap
from typing import Any

import torch
import triton
import triton.language as tl

from graphopt.ops.flash_attention import DTYPES, GPU_CONFIGS, INTERPRETER_BLOCK, MAX_GRID_Y, NotLowerable, interpreted

__all__ = ["attention_fwd_kernel", "autotuned_kernel", "check_attention_inputs", "flash_attention", "flash_attention_varlen", "kernel_source"]


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Out, Mask, CuSeqlens,
    q_stride_b, q_stride_h, q_stride_m, q_stride_d,
    k_stride_b, k_stride_h, k_stride_n, k_stride_d,
    v_stride_b, v_stride_h, v_stride_n, v_stride_d,
    o_stride_b, o_stride_h, o_stride_m, o_stride_d,
    mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n,
    H, KV_GROUP, Lq, Lk, D, DV, scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # This program: query rows [start_m, start_m + BLOCK_M) of head h of batch (or sequence) b.
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1).to(tl.int64)  # 64-bit offsets: b * stride may exceed 2**31
    b = batch_head // H
    h = batch_head % H
    h_kv = h // KV_GROUP  # grouped-query attention: KV_GROUP query heads share a key/value head
    if VARLEN:
        # Sequence b is rows [seq_start, seq_start + its length) of the packed inputs; its length
        # replaces Lq and Lk (the longest length, rounded: only the autotuner reads those).
        seq_start = tl.load(CuSeqlens + b)
        Lq = (tl.load(CuSeqlens + b + 1) - seq_start).to(tl.int32)
        Lk = Lq
        if start_m >= Lq:  # the grid covers the longest sequence; this one ends before this block
            return
        b = seq_start  # the batch strides are the token strides: b * stride_b is the sequence's first row

    rows = start_m + tl.arange(0, BLOCK_M)
    row_in = rows < Lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # The query block, loaded once (zero-padded to BLOCK_D) and scaled once.
    q_ptrs = Q + b * q_stride_b + h * q_stride_h + rows[:, None] * q_stride_m + offs_d[None, :] * q_stride_d
    q = tl.load(q_ptrs, mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * scale
    # Kᵀ as a [BLOCK_D, BLOCK_N] tile and V as [BLOCK_N, BLOCK_DV], at key 0; the loop adds the key offset.
    kt_ptrs = K + b * k_stride_b + h_kv * k_stride_h + offs_d[:, None] * k_stride_d
    v_ptrs = V + b * v_stride_b + h_kv * v_stride_h + offs_dv[None, :] * v_stride_d
    mask_ptrs = Mask + b * mask_stride_b + h * mask_stride_h + rows[:, None] * mask_stride_m

    # Online softmax state: running row maximum, running sum of exponentials, unnormalised output.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if CAUSAL:  # keys past this block's last row are masked for all its rows: skip their blocks
        key_end = tl.minimum(start_m + BLOCK_M, Lk)
    else:
        key_end = Lk
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + offs_n
        col_in = cols < Lk
        kt = tl.load(kt_ptrs + cols[None, :] * k_stride_n, mask=(offs_d[:, None] < D) & col_in[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        keep = col_in[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])  # top-left aligned, as ATen's is_causal
        if MASK_KIND == "bool":
            mask_in = row_in[:, None] & col_in[None, :]
            keep = keep & (tl.load(mask_ptrs + cols[None, :] * mask_stride_n, mask=mask_in, other=0) != 0)
        if MASK_KIND == "additive":
            mask_in = row_in[:, None] & col_in[None, :]
            s += tl.load(mask_ptrs + cols[None, :] * mask_stride_n, mask=mask_in, other=0.0).to(tl.float32)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has no unmasked key m_new is -inf: shift by 0 instead, so exp gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)  # rescales what was accumulated against the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + cols[:, None] * v_stride_n, mask=col_in[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=INPUT_PRECISION)
        m_i = m_new

    # Rows with every key masked have l_i = 0 and acc = 0: zeros, as ATen's SDPA returns for them.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b * o_stride_b + h * o_stride_h + rows[:, None] * o_stride_m + offs_dv[None, :] * o_stride_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & (offs_dv[None, :] < DV))


_KERNEL_FUNCTION = attention_fwd_kernel.fn
"""The Python function under ``@triton.jit`` (the jit wrapper differs under the interpreter)."""

AUTOTUNE_KEY = ["Lq", "Lk", "D", "DV", "CAUSAL", "MASK_KIND", "VARLEN", "INPUT_PRECISION"]
"""What a tuning is kept for (with the tensors' dtypes, which the autotuner adds): each variant tunes apart."""


@functools.cache
def autotuned_kernel() -> Any:
    """The kernel wrapped in ``triton.autotune`` over :data:`~graphopt.ops.flash_attention.GPU_CONFIGS`
    (built on first use: GPU launches only)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages) for m, n, warps, stages in GPU_CONFIGS]
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY)(attention_fwd_kernel)


def _launch(grid_rows: int, grid_pairs: int, *args: Any, **constexprs: Any) -> None:
    """Launch the kernel over ``(cdiv(grid_rows, BLOCK_M), grid_pairs)`` programs: autotuned on a
    GPU, with the interpreter's fixed blocks under ``TRITON_INTERPRET=1``."""
    grid = lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_M"]), grid_pairs)  # noqa: E731
    if interpreted():
        attention_fwd_kernel[grid](*args, **constexprs, BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK)
    else:
        autotuned_kernel()[grid](*args, **constexprs)


def _block_width(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _input_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_source() -> str:
    """The kernel's Python source, ``@triton.jit`` line included (self-contained: it needs only
    ``triton`` and ``triton.language as tl``)."""
    source = textwrap.dedent(inspect.getsource(_KERNEL_FUNCTION))
    return source[source.index("@triton.jit") :]


# ---------------------------------------------------------------------------------------------
# Padded attention: [B, H, L, D].


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, L, ·]`` view: 3-D ``[N, L, ·]`` becomes ``[N, 1, L, ·]``."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, enable_gqa: bool = False) -> None:
    """Raise :class:`~graphopt.ops.flash_attention.NotLowerable` for inputs :func:`flash_attention`
    does not index (ATen then runs, or says what is wrong)."""
    tensors = [t for t in (q, k, v, attn_mask) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise NotLowerable("an SDPA input is not a tensor")
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise NotLowerable(f"ranks {q.dim()}, {k.dim()}, {v.dim()}: the kernel takes 3-D or 4-D query, key and value")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NotLowerable(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernel takes one of {DTYPES} for all three")
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise NotLowerable(f"attn_mask of dtype {attn_mask.dtype} for a {q.dtype} query")
    if len({t.device for t in tensors}) != 1:
        raise NotLowerable("inputs on several devices")
    if k.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2] or k.shape[:-2] != v.shape[:-2]:
        raise NotLowerable(f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} do not fit together")
    q_heads, kv_heads = _as_4d(q).shape[1], _as_4d(k).shape[1]
    grouped = enable_gqa and kv_heads > 0 and q_heads % kv_heads == 0
    if q.shape[0] != k.shape[0] or not (q_heads == kv_heads or grouped):
        raise NotLowerable(f"query {tuple(q.shape)} and key {tuple(k.shape)} differ in batch or heads (enable_gqa={enable_gqa})")
    scores = (*q.shape[:-1], k.shape[-2])
    if attn_mask is not None and (attn_mask.dim() > len(scores) or any(m not in (1, s) for m, s in zip(reversed(attn_mask.shape), reversed(scores)))):
        raise NotLowerable(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to the scores {scores}")
    if q.shape[-1] == 0:
        raise NotLowerable("head dim 0")
    if math.prod(q.shape[:-2]) > MAX_GRID_Y:
        raise NotLowerable(f"{math.prod(q.shape[:-2])} (batch, head) pairs exceed the grid's {MAX_GRID_Y}")
    if q.device.type != "cuda" and not interpreted():
        raise NotLowerable(f"{q.device.type} tensors: Triton kernels run on a GPU (or in the interpreter)")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask, is_causal=..., scale=..., enable_gqa=...)``
    (no dropout) with one launch of :func:`attention_fwd_kernel`.

    ``q`` ``[B, Hq, Lq, D]``, ``k`` ``[B, Hkv, Lk, D]``, ``v`` ``[B, Hkv, Lk, Dv]`` of any strides,
    or 3-D ``[N, L, ·]`` (run as ``[N, 1, L, ·]``); ``Hq == Hkv`` unless ``enable_gqa`` and
    ``Hkv`` divides ``Hq``. ``attn_mask``: bool (False = masked) or of ``q``'s dtype (added to the
    scores), broadcastable to ``[B, Hq, Lq, Lk]``; not together with ``is_causal`` (top-left
    aligned). ``scale`` defaults to ``1 / sqrt(D)``. The result is written to ``out`` (``q``'s
    shape with ``Dv`` last, any strides; a new contiguous tensor in ``q``'s dtype when None) and
    returned. Raises :class:`~graphopt.ops.flash_attention.NotLowerable` before launching for what
    the kernel does not take.
    """
    check_attention_inputs(q, k, v, attn_mask, enable_gqa)
    if is_causal and attn_mask is not None:
        raise NotLowerable("attn_mask together with is_causal")
    if scale is not None and not math.isfinite(scale):
        raise NotLowerable(f"scale={scale}")
    expected = (*q.shape[:-1], v.shape[-1])
    if out is None:
        out = torch.empty(expected, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != expected:
        raise ValueError(f"out has shape {tuple(out.shape)}, not {expected}")
    if out.numel() == 0:
        return out
    q4, k4, v4, out4 = _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(out)
    batch, heads, lq, d = q4.shape
    kv_heads, lk, dv = k4.shape[1], k4.shape[2], v4.shape[3]
    mask_kind, mask4, mask_strides = "none", q4, [0, 0, 0, 0]  # q4: an unread placeholder pointer
    if attn_mask is not None:
        mask_kind = "bool" if attn_mask.dtype == torch.bool else "additive"
        mask4 = _as_4d(attn_mask.expand(*q.shape[:-1], lk))  # stride 0 along broadcast dims
        mask_strides = list(mask4.stride())
    _launch(
        lq, batch * heads,
        q4, k4, v4, out4, mask4, q4,  # q4: the unread CuSeqlens pointer
        *q4.stride(), *k4.stride(), *v4.stride(), *out4.stride(), *mask_strides,
        heads, heads // kv_heads, lq, lk, d, dv, 1 / math.sqrt(d) if scale is None else scale,
        CAUSAL=bool(is_causal), MASK_KIND=mask_kind, VARLEN=False, INPUT_PRECISION=_input_precision(q.dtype),
        BLOCK_D=_block_width(d), BLOCK_DV=_block_width(dv),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Packed (varlen) attention: [T, H, D].


def _check_varlen_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Raise NotLowerable for inputs the kernel does not index (values of ``cu_seqlens`` are trusted)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise NotLowerable(f"ranks {q.dim()}, {k.dim()}, {v.dim()}: the kernel takes packed [T, H, D] query, key and value")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NotLowerable(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernel takes one of {DTYPES} for all three")
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise NotLowerable(f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} do not fit together")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int64 or len(cu_seqlens) == 0:
        raise NotLowerable(f"cu_seqlens must be int64 [B + 1], not {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if len({t.device for t in (q, k, v, cu_seqlens)}) != 1:
        raise NotLowerable("inputs on several devices")
    if q.shape[2] == 0:
        raise NotLowerable("head dim 0")
    if (len(cu_seqlens) - 1) * q.shape[1] > MAX_GRID_Y:
        raise NotLowerable(f"{(len(cu_seqlens) - 1) * q.shape[1]} (sequence, head) pairs exceed the grid's {MAX_GRID_Y}")
    if q.device.type != "cuda" and not interpreted():
        raise NotLowerable(f"{q.device.type} tensors: Triton kernels run on a GPU (or in the interpreter)")


def flash_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None, max_seqlen: int | None = None
) -> torch.Tensor:
    """``graphopt::varlen_attention`` with one launch of :func:`attention_fwd_kernel` (``VARLEN``).

    ``q``, ``k`` ``[T, H, D]`` and ``v`` ``[T, H, Dv]`` (any strides) hold the packed tokens of
    ``B`` sequences, sequence ``b`` being rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (int64
    ``[B + 1]`` from 0 to ``T``; empty sequences allowed). Returns ``[T, H, Dv]`` in ``q``'s dtype:
    each token's attention to the tokens of its sequence, ``scale`` defaulting to ``1 / sqrt(D)``.
    ``max_seqlen`` must be at least the longest length; when None it is computed from
    ``cu_seqlens`` (a device-to-host copy on a GPU). Raises
    :class:`~graphopt.ops.flash_attention.NotLowerable` before launching for inputs the kernel does not take.
    """
    _check_varlen_inputs(q, k, v, cu_seqlens)
    total_tokens, heads, d = q.shape
    dv, sequences = v.shape[2], len(cu_seqlens) - 1
    out = torch.empty((total_tokens, heads, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or sequences == 0:
        return out
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max())
    if max_seqlen <= 0:
        return out
    # The Lq/Lk arguments are only the autotuner's key: rounded so that batches whose longest
    # sequence differs a little share one tuning.
    length_key = triton.next_power_of_2(max_seqlen)
    # Each tensor's strides as the kernel's [b, h, row, d]: the token stride serves as b's and the row's.
    strides = [(t.stride(0), t.stride(1), t.stride(0), t.stride(2)) for t in (q, k, v, out)]
    _launch(
        max_seqlen, sequences * heads,
        q, k, v, out, q, cu_seqlens,  # q: the unread mask pointer
        *strides[0], *strides[1], *strides[2], *strides[3], 0, 0, 0, 0,
        heads, 1, length_key, length_key, d, dv, 1 / math.sqrt(d) if scale is None else scale,
        CAUSAL=False, MASK_KIND="none", VARLEN=True, INPUT_PRECISION=_input_precision(q.dtype),
        BLOCK_D=_block_width(d), BLOCK_DV=_block_width(dv),
    )  # fmt: skip
    return out
