"""FlashAttention forward: one static Triton kernel for padded SDPA and packed (varlen) attention.

The method is FlashAttention's (Dao et al. 2022; forward only, as in the fused-attention tutorial
of Triton): ``softmax(Q Kᵀ · scale + bias) V`` computed without ever holding the ``[Lq, Lk]``
score matrix, by an online softmax over blocks of keys. One ``@triton.jit`` kernel,
:func:`~graphopt.ops.flash_attention.triton.attention_fwd_kernel`, serves every variant; its
``tl.constexpr`` switches pick the lines each variant compiles:

* ``CAUSAL``: ATen's ``is_causal`` (top-left aligned, also when ``Lq != Lk``);
* ``MASK_KIND``: ``"none"``, ``"bool"`` (False = do not attend) or ``"additive"`` (added to the
  scores), the mask read through its strides (0 along broadcast dimensions);
* ``VARLEN``: packed ``[T, H, D]`` sequences whose extents come from ``cu_seqlens``;
* ``INPUT_PRECISION``: of the two ``tl.dot`` on a GPU (``"ieee"`` for fp32, ``"tf32"`` for fp16/bf16);
* ``BLOCK_M``, ``BLOCK_N`` (autotuned on a GPU, :data:`INTERPRETER_BLOCK` under the interpreter),
  ``BLOCK_D``, ``BLOCK_DV`` (head dims padded to powers of two, at least 16).

Grouped-query attention is a run-time head ratio (``KV_GROUP`` query heads per key/value head).

Files, as an op folder keeps them: ``triton.py`` holds the kernel and its two launchers,
:func:`~graphopt.ops.flash_attention.triton.flash_attention` (``[B, H, L, D]``, what the triton
backend's attention template launches) and
:func:`~graphopt.ops.flash_attention.triton.flash_attention_varlen` (``[T, H, D]``, the CUDA kernel
of ``graphopt::varlen_attention``); ``reference.py`` the naive twins they must reproduce. This
module holds what both launchers and their callers share, and imports neither Triton nor the
backends, so it is safe to import anywhere.
"""

from __future__ import annotations

import torch

from graphopt.ops.triton_runtime import NotLowerable, interpreted  # noqa: F401  (shared by every kernel)

__all__ = ["DTYPES", "GPU_CONFIGS", "INTERPRETER_BLOCK", "MASK_KINDS", "MAX_GRID_Y", "NotLowerable", "interpreted"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Query/key/value dtypes the kernel takes (it computes in fp32, which would lose fp64 precision)."""

MASK_KINDS = ("none", "bool", "additive")
"""Values of the kernel's ``MASK_KIND`` switch."""

INTERPRETER_BLOCK = 16
"""BLOCK_M and BLOCK_N under the interpreter: the smallest ``tl.dot`` takes."""

GPU_CONFIGS = ((64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2))
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner times on a GPU."""

MAX_GRID_Y = 65535
"""CUDA's limit on the grid's second axis, which counts (batch, head) or (sequence, head) pairs."""
