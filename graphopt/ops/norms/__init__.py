"""``graphopt::rms_norm`` and ``graphopt::crms_norm``: the ops and their records.

Passes introduce computations that ATen has no single op for. Each becomes a
``torch.library.custom_op`` whose facts (reference, fake, kernels, fusion kind, packed-token rule,
lowerings) are declared here in one :class:`~graphopt.ir.oprecord.OpRecord` that analyses, passes
and backends consult. Import this package (any ``import graphopt`` does) before loading a saved
graph that uses these ops.

The folder, one file per implementation:

* ``reference.py``: the definitions (:func:`rms_norm_reference`, :func:`crms_norm_reference`) and
  their leanest ATen formulations (:func:`rms_norm_torch`, :func:`crms_norm_torch`), on any device;
* ``cpu.c`` and ``cpu.py``: the CPU kernels, C compiled on first use and called through ``ctypes``
  for contiguous fp32 inputs, the ATen formulation otherwise;
* ``triton.py``: the CUDA kernels (Triton, one program per row, fp32 accumulation);
* this module: the ops, their CUDA dispatch, the eager fast paths, the Triton row-template
  lowering and the records.

How the norms run on each backend:

* **eager** (CPU kernels, ``register_kernel("cpu")``; the eager backend calls them without the
  dispatcher through the records' ``eager_fast_path``);
* **inductor**: the reference is the inductor decomposition, so ``torch.compile`` sees through the
  op and fuses the norm with its neighbours (a residual add, casts) instead of calling it as an
  opaque extern kernel;
* **CUDA** (``register_kernel("cuda")``): the Triton kernels of :mod:`graphopt.ops.norms.triton`,
  the ATen formulation for fp64 or where Triton is not installed;
* **triton backend**: ``rms_norm`` is a ``"norm"`` anchor of the generated row template.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from graphopt.ir.oprecord import OpRecord, onnx_translation, register_op
from graphopt.ops.norms.cpu import c_kernels, crms_norm_cpu, rms_norm_cpu
from graphopt.ops.norms.reference import crms_norm_reference, crms_norm_torch, rms_norm_reference, rms_norm_torch

__all__ = [
    "CRMS_NORM",
    "EAGER_FAST_PATHS",
    "RMS_NORM",
    "c_kernels",
    "crms_norm",
    "crms_norm_reference",
    "crms_norm_torch",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_torch",
]


@torch.library.custom_op("graphopt::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dimension with optional gain and bias (``y = x / rms(x) * w + b``).

    Unlike ``aten.rms_norm`` it takes a bias, which exact LayerNorm -> RMSNorm conversion needs
    (the LayerNorm's bias survives). Computed in fp32 for fp16/bf16 inputs (in the input's dtype
    for fp32/fp64), returned in the input's dtype.
    """
    return rms_norm_reference(x, weight, bias, eps)


@torch.library.custom_op("graphopt::crms_norm", mutates_args=())
def crms_norm(x: Tensor, eps: float) -> Tensor:
    """Compressed RMSNorm (Pre-CRMSNorm, Jiang et al. 2023) over the last dimension, no affine.

    ``x`` holds the first ``d - 1`` coordinates of a zero-mean ``d``-vector ``v`` (the last one is
    ``-sum(x)``), so ``rms(v)^2 = (sum(x^2) + sum(x)^2) / d``. Returns ``x / sqrt(rms(v)^2 + eps)``,
    still ``d - 1`` wide; gain, bias and the missing coordinate are folded into the readers.
    Computed in fp32 for fp16/bf16 inputs.
    """
    return crms_norm_reference(x, eps)


def _rms_norm_fake(x, weight, bias, eps):
    return torch.empty_like(x)


def _crms_norm_fake(x, eps):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- CUDA


@functools.cache
def _triton_norm():
    """:mod:`graphopt.ops.norms.triton`, or None where Triton is not installed."""
    try:
        from graphopt.ops.norms import triton as triton_norm
    except ImportError:
        return None
    return triton_norm


def _rms_norm_cuda(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    kernels = _triton_norm()
    if kernels is None or x.dtype not in kernels.DTYPES:
        return rms_norm_torch(x, weight, bias, eps)
    return kernels.rms_norm_triton(x, weight, bias, eps)


def _crms_norm_cuda(x: Tensor, eps: float) -> Tensor:
    kernels = _triton_norm()
    if kernels is None or x.dtype not in kernels.DTYPES:
        return crms_norm_torch(x, eps)
    return kernels.crms_norm_triton(x, eps)


# ----------------------------------------------------------------------------- eager fast paths
# What the eager backend calls in place of these ops: the same kernels without the custom-op
# dispatcher, which costs ~7 us a call (as much as the whole norm of a small model's activations).


def _direct(name: str, kernel, *args) -> Tensor:
    if torch.autograd.profiler._is_profiler_enabled:  # keep the norm visible to torch.profiler by its op name
        with torch.profiler.record_function(name):
            return kernel(*args)
    return kernel(*args)


def _rms_norm_eager(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    if x.device.type == "cpu" and not x.requires_grad:
        return _direct("graphopt::rms_norm", rms_norm_cpu, x, weight, bias, eps)
    return torch.ops.graphopt.rms_norm.default(x, weight, bias, eps)


def _crms_norm_eager(x: Tensor, eps: float) -> Tensor:
    if x.device.type == "cpu" and not x.requires_grad:
        return _direct("graphopt::crms_norm", crms_norm_cpu, x, eps)
    return torch.ops.graphopt.crms_norm.default(x, eps)


# ----------------------------------------------------------------------------- Triton row template


def _rms_norm_row_lowering(out: str, args: dict, fresh, row) -> list[str]:
    """``rms_norm`` as a ``"norm"`` anchor of the row template: ``x * rsqrt(mean(x²) + eps) * w + b``."""
    return row.rms(out, row.tensor(args, "x"), args["eps"], args, "weight", "bias", fresh)


# ----------------------------------------------------------------------------- records


RMS_NORM = register_op(
    OpRecord(
        op=torch.ops.graphopt.rms_norm,
        reference=rms_norm_reference,
        fake=_rms_norm_fake,
        kernels={"cpu": rms_norm_cpu, "cuda": _rms_norm_cuda},
        partition_kind="norm",
        tokenwise=1,
        is_norm=True,
        inductor_decomposition=rms_norm_reference,
        eager_fast_path=_rms_norm_eager,
        triton_lowering=_rms_norm_row_lowering,
        onnx=onnx_translation(f"{__name__}.onnx", "rms_norm"),
    )
)

# No partition kind: the row template has no crms_norm anchor, so it stays an ATen call there.
CRMS_NORM = register_op(
    OpRecord(
        op=torch.ops.graphopt.crms_norm,
        reference=crms_norm_reference,
        fake=_crms_norm_fake,
        kernels={"cpu": crms_norm_cpu, "cuda": _crms_norm_cuda},
        tokenwise=1,
        is_norm=True,
        inductor_decomposition=crms_norm_reference,
        eager_fast_path=_crms_norm_eager,
        onnx=onnx_translation(f"{__name__}.onnx", "crms_norm"),
    )
)

EAGER_FAST_PATHS = {getattr(record.op, overload): record.eager_fast_path for record in (RMS_NORM, CRMS_NORM) for overload in record.op.overloads()}
"""Overload -> what the eager backend calls in its place: the records' ``eager_fast_path``, by overload."""
