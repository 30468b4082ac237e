"""CPU kernels of ``graphopt::rms_norm`` and ``graphopt::crms_norm``: the C kernels of ``cpu.c``.

For contiguous fp32 inputs, the C kernels (about 40 lines) are compiled on first use with the
machine's C compiler in ~0.2 s, cached, and called through ``ctypes``: per row, one sweep for the
sum of squares and one that writes ``x * inv_rms * w + b``, rows split over torch's own OpenMP
threads. That is the memory traffic of LayerNorm's fused kernel with one reduction instead of two.
Otherwise (other dtypes, strided inputs, no compiler, no OpenMP runtime found) the ATen
formulations of :mod:`graphopt.ops.norms.reference` (:func:`rms_norm_torch`), which need one
reduction kernel and one output allocation updated in place. The reference makes ~4 full-size
temporaries, and ``aten.rms_norm`` has no fused CPU kernel (it decomposes into ~6 ATen ops): both
are slower than ``aten.layer_norm``.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from graphopt.ops.cbuild import build_c_library
from graphopt.ops.norms.reference import crms_norm_torch, rms_norm_torch

__all__ = ["C_SOURCE", "c_kernels", "crms_norm_cpu", "rms_norm_cpu"]

C_SOURCE = Path(__file__).with_name("cpu.c")
"""The kernels' C source, shipped beside this module (package data)."""


@functools.cache
def c_kernels() -> ctypes.CDLL | None:
    """The C norm kernels, compiled on first use and cached; None where they cannot be built
    (:func:`graphopt.ops.cbuild.build_c_library`: the ATen formulation then stays in place)."""
    kernels = build_c_library(C_SOURCE, "norm_kernels")
    if kernels is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    kernels.rms_norm_f32.argtypes = [pointer, pointer, pointer, pointer, size, size, ctypes.c_float, ctypes.c_int]
    kernels.crms_norm_f32.argtypes = [pointer, pointer, size, size, ctypes.c_float, ctypes.c_int]
    return kernels


def _c_kernels_for(x: Tensor, *affine: Tensor | None) -> ctypes.CDLL | None:
    """The C kernels if they take these tensors (contiguous fp32 rows, gain and bias of ``d``), else None."""
    takes = x.dim() > 0 and x.numel() > 0 and x.dtype == torch.float32 and x.is_contiguous()
    takes = takes and all(t is None or (t.dtype == torch.float32 and t.is_contiguous() and t.shape == x.shape[-1:]) for t in affine)
    return c_kernels() if takes else None


def rms_norm_cpu(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``graphopt::rms_norm`` on CPU: the C kernel where it takes the inputs, else :func:`rms_norm_torch`."""
    kernels = _c_kernels_for(x, weight, bias)
    if kernels is None:
        return rms_norm_torch(x, weight, bias, eps)
    y, d = torch.empty_like(x), x.shape[-1]
    weight_data, bias_data = (None if t is None else t.data_ptr() for t in (weight, bias))
    kernels.rms_norm_f32(x.data_ptr(), weight_data, bias_data, y.data_ptr(), x.numel() // d, d, eps, torch.get_num_threads())
    return y


def crms_norm_cpu(x: Tensor, eps: float) -> Tensor:
    """``graphopt::crms_norm`` on CPU: the C kernel where it takes the input, else :func:`crms_norm_torch`."""
    kernels = _c_kernels_for(x)
    if kernels is None:
        return crms_norm_torch(x, eps)
    y, d = torch.empty_like(x), x.shape[-1]
    kernels.crms_norm_f32(x.data_ptr(), y.data_ptr(), x.numel() // d, d, eps, torch.get_num_threads())
    return y
