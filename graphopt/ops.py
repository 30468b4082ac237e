"""graphopt's custom operators, in the ``graphopt`` namespace of ``torch.library``.

Passes introduce computations that ATen has no single op for (linear attention, token pruning,
quantized linear, ...). Each becomes a ``torch.library.custom_op`` with

* an eager reference implementation (the definition of what the op computes), and
* a fake implementation (``register_fake``) giving output shapes and dtypes from input shapes, so
  that rewritten graphs still propagate ``meta["val"]``, re-export, save and load.

Backends may register faster kernels for the same op (``op.register_kernel("cpu")`` or a Triton
lowering); the reference stays the definition the tests compare against. Import this module (any
``import graphopt`` does) before loading a saved graph that uses these ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["crms_norm", "rms_norm"]


@torch.library.custom_op("graphopt::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dimension with optional gain and bias (``y = x / rms(x) * w + b``).

    Unlike ``aten.rms_norm`` it takes a bias, which exact LayerNorm -> RMSNorm conversion needs
    (the LayerNorm's bias survives). Computed in fp32 for fp16/bf16 inputs.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("graphopt::crms_norm", mutates_args=())
def crms_norm(x: Tensor, eps: float) -> Tensor:
    """Compressed RMSNorm (Pre-CRMSNorm, Jiang et al. 2023) over the last dimension, no affine.

    ``x`` holds the first ``d - 1`` coordinates of a zero-mean ``d``-vector ``v`` (the last one is
    ``-sum(x)``), so ``rms(v)^2 = (sum(x^2) + sum(x)^2) / d``. Returns ``x / sqrt(rms(v)^2 + eps)``,
    still ``d - 1`` wide; gain, bias and the missing coordinate are folded into the readers.
    Computed in fp32 for fp16/bf16 inputs.
    """
    xf = x.float()
    d = x.shape[-1] + 1
    mean_square = (xf.pow(2).sum(dim=-1, keepdim=True) + xf.sum(dim=-1, keepdim=True).pow(2)) / d
    return (xf * torch.rsqrt(mean_square + eps)).to(x.dtype)


@crms_norm.register_fake
def _crms_norm_fake(x, eps):
    return torch.empty_like(x)
