"""Triton kernels for ``graphopt::rms_norm`` and ``graphopt::crms_norm`` (GPU).

Modelled on the fused layer-norm forward of the Triton tutorials: one program normalises one row
of the input viewed as ``[rows, d]``, in two sweeps over the row in blocks of ``BLOCK_SIZE``
columns (one block when ``d`` fits): the first accumulates the sum of squares in fp32, the second
reloads the row (from cache), scales it, applies the optional gain and bias and stores it in the
input's dtype. Masks cover a ragged last block, so any hidden size works; every load is cast to
fp32 first, so fp16/bf16/fp32 inputs (and gains or biases of another dtype) all compute in fp32.

CRMSNorm (Pre-CRMSNorm, Jiang et al. 2023) is the same with one more running sum:
``x / sqrt((Σ x² + (Σ x)²) / (d + 1) + eps)`` for a row holding ``d`` of ``d + 1`` coordinates.

:mod:`graphopt.ops.norms` registers :func:`rms_norm_triton` and :func:`crms_norm_triton` as the CUDA
kernels of the ops, so graphs run them on GPU with no change. Under ``TRITON_INTERPRET=1`` (set
before this module is imported) they also run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["DTYPES", "crms_norm_triton", "rms_norm_triton"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes the kernels take (they accumulate in fp32, which would lose fp64 precision)."""

MAX_BLOCK_SIZE = 4096
"""Columns one program holds at a time; longer rows take several blocks per sweep."""


@triton.jit
def _rms_norm_kernel(X, Y, W, B, x_row_stride, y_row_stride, n_cols, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows * stride may exceed 2**31
    X += row * x_row_stride
    Y += row * y_row_stride
    # Sweep 1: mean of squares, accumulated elementwise in fp32 and reduced once.
    squares = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(X + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        squares += x * x
    inv_rms = 1 / tl.sqrt(tl.sum(squares, axis=0) / n_cols + eps)
    # Sweep 2: normalise, apply gain and bias, store in the output's dtype.
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        y = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32) * inv_rms
        if HAS_WEIGHT:
            y *= tl.load(W + cols, mask=mask).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _crms_norm_kernel(X, Y, x_row_stride, y_row_stride, n_cols, eps, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * x_row_stride
    Y += row * y_row_stride
    # Sweep 1: Σ x² and Σ x; the row's missing coordinate is -Σ x, so it contributes (Σ x)².
    squares = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    sums = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(X + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        squares += x * x
        sums += x
    total = tl.sum(sums, axis=0)
    inv_rms = 1 / tl.sqrt((tl.sum(squares, axis=0) + total * total) / (n_cols + 1) + eps)
    # Sweep 2: normalise and store in the output's dtype.
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        y = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32) * inv_rms
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as ``[rows, d]`` with unit column stride, and an empty output of that shape."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return x2d, torch.empty(x2d.shape, dtype=x.dtype, device=x.device)


def _launch_options(n_cols: int) -> dict[str, int]:
    """Block size and warps as in the tutorial: the row in one block up to MAX_BLOCK_SIZE."""
    block_size = min(MAX_BLOCK_SIZE, triton.next_power_of_2(n_cols))
    return {"BLOCK_SIZE": block_size, "num_warps": min(max(block_size // 256, 1), 8)}


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``graphopt::rms_norm`` with the Triton kernel: ``x / sqrt(mean(x²) + eps) * weight + bias``."""
    x2d, y = _rows(x)
    if y.numel():
        rows, n_cols = x2d.shape
        _rms_norm_kernel[(rows,)](
            x2d,
            y,
            x2d if weight is None else weight.contiguous(),  # an unread placeholder pointer when absent
            x2d if bias is None else bias.contiguous(),
            x2d.stride(0),
            y.stride(0),
            n_cols,
            eps,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            **_launch_options(n_cols),
        )
    return y.view(x.shape)


def crms_norm_triton(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``graphopt::crms_norm`` with the Triton kernel: ``x / sqrt((Σ x² + (Σ x)²) / (d + 1) + eps)``."""
    x2d, y = _rows(x)
    if y.numel():
        rows, n_cols = x2d.shape
        _crms_norm_kernel[(rows,)](x2d, y, x2d.stride(0), y.stride(0), n_cols, eps, **_launch_options(n_cols))
    return y.view(x.shape)
