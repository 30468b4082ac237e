"""Variable-length (packed) attention forward for ``graphopt::varlen_attention``: one Triton kernel.

Padding-free execution (ByteTransformer, Zhai et al. 2023) packs the valid tokens of ``B``
sequences into ``[T, H, D]`` tensors; ``cu_seqlens`` (int64 ``[B + 1]``, ``cu_seqlens[0] = 0``)
gives their offsets, sequence ``b`` being rows ``cu_seqlens[b]:cu_seqlens[b + 1]``. Every token
attends to the tokens of its own sequence, bidirectionally: ``softmax(q kᵀ · scale) v`` per
sequence and head. This is FlashAttention's varlen forward (Dao et al. 2022; ``flash_attn_varlen``):
the same online-softmax kernel as the padded SDPA template of
:mod:`graphopt.backends.triton_attention`, with the sequence's extent read from ``cu_seqlens``.

The kernel is that template's generated source (:func:`~graphopt.backends.triton_attention.attention_source`,
no mask, not causal), renamed ``varlen_attention_fwd_kernel``, with three additions spliced in by
:func:`varlen_attention_source` (which raises AssertionError if the template loses a line it
splices at):

* a ``CuSeqlens`` pointer argument;
* after the program finds its ``(b, h)``, it loads the sequence's first row ``seq_start`` and its
  length, which replaces the ``Lq`` and ``Lk`` arguments (those carry only the autotuner's key);
* a program whose query block starts at or past the sequence's length returns at once (the grid's
  first axis covers the longest sequence), and ``b`` becomes ``seq_start``: the launcher passes
  the token stride as the "batch" stride, so the template's ``b * stride_b`` is the sequence's
  first row, and its row and key indices count from there.

So a program ``(m, b·H + h)`` of the grid ``(cdiv(max_seqlen, BLOCK_M), B·H)`` computes query
rows ``[m·BLOCK_M, (m+1)·BLOCK_M)`` of sequence ``b``, head ``h``, walking that sequence's keys
only; the ragged tails of each sequence are masked as the template masks ``Lq`` and ``Lk``. No
pad is ever read or computed. ``q``, ``k``, ``v`` of any strides (slices of a fused ``[T, 3, H, D]``
QKV projection) are read in place; the output is a new contiguous ``[T, H, Dv]`` in ``q``'s dtype.
Precision, block sizes (autotuned on a GPU, 16 under the interpreter) and the handling of odd
head dims are the template's.

:func:`varlen_attention` is the launcher, and the CUDA kernel of ``graphopt::varlen_attention``
(:mod:`graphopt.ops.varlen` calls it; inputs it refuses run the op's bucketed SDPA).
"""

from __future__ import annotations

import math

import torch
import triton

from graphopt.backends.triton_attention import DTYPES, GPU_CONFIGS, INTERPRETER_BLOCK, MAX_GRID_Y, attention_source
from graphopt.backends.triton_codegen import NotLowerable, interpreted, load_kernel

__all__ = ["DTYPES", "varlen_attention", "varlen_attention_source"]

KERNEL_NAME = "varlen_attention_fwd_kernel"


def varlen_attention_source(input_precision: str = "ieee") -> str:
    """The ``@triton.jit`` kernel ``varlen_attention_fwd_kernel`` as Python source: the attention
    template's packed variant (no mask, not causal), the sequence's extent read from ``CuSeqlens``.

    ``input_precision``: of the two ``tl.dot`` on a GPU (``"ieee"`` or ``"tf32"``).
    """
    return attention_source(False, None, input_precision, varlen=True)


def _load_varlen_kernel(input_precision: str):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages) for m, n, warps, stages in GPU_CONFIGS]
    return load_kernel(varlen_attention_source(input_precision), KERNEL_NAME, configs, ["Lq", "Lk", "D", "DV"])


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
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


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None, max_seqlen: int | None = None
) -> torch.Tensor:
    """``graphopt::varlen_attention`` with one launch of the varlen kernel.

    ``q``, ``k`` ``[T, H, D]`` and ``v`` ``[T, H, Dv]`` (any strides) hold the packed tokens of
    ``B`` sequences, sequence ``b`` being rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (int64
    ``[B + 1]`` from 0 to ``T``; empty sequences allowed). Returns ``[T, H, Dv]`` in ``q``'s dtype:
    each token's attention to the tokens of its sequence, ``scale`` defaulting to ``1 / sqrt(D)``.
    ``max_seqlen`` must be at least the longest length; when None it is computed from
    ``cu_seqlens`` (a device-to-host copy on a GPU). Raises :class:`NotLowerable` before launching
    for inputs the kernel does not take.
    """
    _check_inputs(q, k, v, cu_seqlens)
    total_tokens, heads, d = q.shape
    dv, sequences = v.shape[2], len(cu_seqlens) - 1
    out = torch.empty((total_tokens, heads, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or sequences == 0:
        return out
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max())
    if max_seqlen <= 0:
        return out
    kernel = _load_varlen_kernel("ieee" if q.dtype == torch.float32 else "tf32")
    # The Lq/Lk arguments are only the autotuner's key: rounded so that batches whose longest
    # sequence differs a little share one tuning.
    length_key = triton.next_power_of_2(max_seqlen)
    block_d, block_dv = (max(16, triton.next_power_of_2(n)) for n in (d, dv))
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), sequences * heads)  # noqa: E731
    options = {"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK} if interpreted() else {}
    # Each tensor's strides as the template's [b, h, row, d]: the token stride serves as b's and the row's.
    strides = [(t.stride(0), t.stride(1), t.stride(0), t.stride(2)) for t in (q, k, v, out)]
    kernel[grid](
        q, k, v, out, q, cu_seqlens,  # q: the unread mask pointer
        *strides[0], *strides[1], *strides[2], *strides[3], 0, 0, 0, 0,
        heads, 1, length_key, length_key, d, dv, 1 / math.sqrt(d) if scale is None else scale,
        BLOCK_D=block_d, BLOCK_DV=block_dv, **options,
    )  # fmt: skip
    return out
