"""What ``graphopt::rms_norm`` and ``graphopt::crms_norm`` compute, in ATen ops (any device).

* :func:`rms_norm_reference`, :func:`crms_norm_reference`: the definitions (the naive twins every
  kernel is tested against, and the inductor decompositions): a few full-size temporaries, written
  for clarity;
* :func:`rms_norm_torch`, :func:`crms_norm_torch`: the same in as few ATen kernels and allocations
  as ATen allows, the fallback of the CPU and CUDA kernels for inputs those do not take.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["crms_norm_reference", "crms_norm_torch", "rms_norm_reference", "rms_norm_torch"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64: never less precise than the input."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """The definition of ``graphopt::rms_norm``: ``x / sqrt(mean(x²) + eps) * weight + bias``."""
    xf = x.to(_compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


def crms_norm_reference(x: Tensor, eps: float) -> Tensor:
    """The definition of ``graphopt::crms_norm``: ``x / sqrt((Σ x² + (Σ x)²) / (d + 1) + eps)``."""
    xf = x.to(_compute_dtype(x))
    d = x.shape[-1] + 1
    mean_square = (xf.pow(2).sum(dim=-1, keepdim=True) + xf.sum(dim=-1, keepdim=True).pow(2)) / d
    return (xf * torch.rsqrt(mean_square + eps)).to(x.dtype)


def _inverse_rms(sum_of_squares: Tensor, count: int, eps: float) -> Tensor:
    """``rsqrt(sum_of_squares / count + eps)``, in place on the small per-row tensor."""
    return sum_of_squares.div_(count).add_(eps).rsqrt_()


def rms_norm_torch(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``rms_norm`` in ATen ops with one reduction kernel and one full-size allocation (any device).

    ``vector_norm`` reads ``x`` once and accumulates in the compute dtype without materialising
    ``x²``; the product with the per-row scale is the only new full-size tensor, and the affine
    map is written into it (``addcmul`` with ``out=`` its own input, one pass for gain and bias).
    """
    dtype = _compute_dtype(x)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)
    y = x * _inverse_rms(norm.square_(), x.shape[-1], eps)  # x is promoted to dtype here
    if weight is not None and bias is not None:
        torch.addcmul(bias.to(dtype), y, weight.to(dtype), out=y)
    elif weight is not None:
        y.mul_(weight.to(dtype))
    elif bias is not None:
        y.add_(bias.to(dtype))
    return y.to(x.dtype)


def crms_norm_torch(x: Tensor, eps: float) -> Tensor:
    """``crms_norm`` in ATen ops with two reduction kernels and one full-size allocation (any device)."""
    dtype = _compute_dtype(x)
    sum_of_squares = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype).square_()
    total = x.sum(dim=-1, keepdim=True, dtype=dtype)
    y = x * _inverse_rms(sum_of_squares.addcmul_(total, total), x.shape[-1] + 1, eps)
    return y.to(x.dtype)
