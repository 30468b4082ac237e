"""``graphopt::int8_linear`` and ``graphopt::weight_only_linear``: quantized linears and their records.

The quantization passes replace ``aten.linear`` with these ops, the weights stored as int8 or
packed int4 constants (so a saved graph holds a quarter or an eighth of the fp32 bytes).

The folder, one file per implementation:

* ``reference.py``: the definitions (:func:`int8_linear_reference`,
  :func:`weight_only_linear_reference`), the quantizers the passes use, and the analytic error bound;
* ``cpu.c`` and ``cpu.py``: the CPU kernels, one path per int8 library chosen per CPU by
  measurement (:func:`graphopt.ops.quant.cpu.int8_path`), with C kernels for the quantization
  sweep, the fused epilogue and the weight-only matrix-vector products;
* ``triton.py``: the CUDA templates (an int8 ``tl.dot`` GEMM with the per-token x per-channel
  dequantization in its epilogue, and a group-wise int4 weight-only GEMM);
* this module: the ops, the inductor decompositions and the records.

How they run on each backend:

* **eager**: the CPU kernels (the eager backend calls them without the dispatcher);
* **inductor**: on CPUs with an int8 dot-product instruction (VNNI/AMX) ``int8_linear``
  decomposes into the per-token quantization, ``torch._int_mm`` and the epilogue, which inductor
  fuses with the neighbouring norm and pointwise ops; elsewhere the decomposition declines
  (``_int_mm`` is a slow reference loop there) and inductor calls the CPU kernels as an extern
  kernel. ``weight_only_linear`` decomposes into a GEMM on the weights converted in registers;
* **CUDA**: the Triton templates where Triton is installed, the reference otherwise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node

from graphopt.ir import normalized_args, shape_of
from graphopt.ir.flops import size
from graphopt.ir.oprecord import OpRecord, onnx_translation, register_op
from graphopt.ops.platform import cpu_capabilities
from graphopt.ops.quant.cpu import int8_linear_cpu, weight_only_linear_cpu
from graphopt.ops.quant.reference import (
    ACTIVATIONS,
    apply_activation,
    dequantize_int4,
    int8_linear_error_bound,
    int8_linear_reference,
    quantize_int4_groupwise,
    quantize_per_channel,
    quantize_per_token,
    take_out_outliers,
    weight_only_linear_reference,
)

__all__ = [
    "ACTIVATIONS",
    "EAGER_FAST_PATHS",
    "INT8_LINEAR",
    "WEIGHT_ONLY_LINEAR",
    "dequantize_int4",
    "int8_linear",
    "int8_linear_decomposition",
    "int8_linear_error_bound",
    "int8_linear_reference",
    "quantize_int4_groupwise",
    "quantize_per_channel",
    "quantize_per_token",
    "weight_only_linear",
    "weight_only_linear_reference",
]


@torch.library.custom_op("graphopt::int8_linear", mutates_args=())
def int8_linear(
    x: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    smooth: Tensor | None,
    outlier_index: Tensor | None,
    outlier_weight: Tensor | None,
    activation: str,
) -> Tensor:
    """Dynamic W8A8 linear ``[..., K] -> [..., N]``: per-token int8 activations, per-channel int8
    weights ``qweight [N, K]`` with scales ``weight_scale [N]``, int32 accumulation, then bias and
    ``activation`` (:data:`ACTIVATIONS`). ``smooth [K]`` multiplies the activation before
    quantization (SmoothQuant); ``outlier_index`` columns are taken out and multiplied in floating
    point by ``outlier_weight [N, len(index)]`` (LLM.int8()). See :mod:`graphopt.ops.quant.reference`."""
    return int8_linear_reference(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation)


@torch.library.custom_op("graphopt::weight_only_linear", mutates_args=())
def weight_only_linear(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, bias: Tensor | None) -> Tensor:
    """Weight-only quantized linear ``[..., K] -> [..., N]``: int8 per-channel weights
    (``group_size == 0``) or packed group-wise asymmetric int4 (``group_size`` 32, 64 or 128),
    floating activations."""
    return weight_only_linear_reference(x, qweight, scale, zero, group_size, bias)


def _int8_linear_fake(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _weight_only_linear_fake(x, qweight, scale, zero, group_size, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _linear_flops(node: Node) -> int:
    """``2 · tokens · N · K``, as ``aten.linear`` (int8 multiply-adds count as operations too)."""
    args = normalized_args(node)
    x, w = shape_of(args["x"]), shape_of(args["qweight"])
    if not (x and w):
        return 0
    tokens = 1
    for d in x[:-1]:
        tokens *= size(d)
    return 2 * tokens * size(w[0]) * size(x[-1])


# ----------------------------------------------------------------------------- CUDA


@functools.cache
def _triton_quant():
    """:mod:`graphopt.ops.quant.triton`, or None where Triton (or the module) is not available."""
    try:
        from graphopt.ops.quant import triton as triton_quant
    except ImportError:
        return None
    return triton_quant


def _int8_linear_cuda(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation):
    kernels = _triton_quant()
    if kernels is None or x.dtype == torch.float64:
        return int8_linear_reference(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation)
    if smooth is None and outlier_index is None:
        return kernels.int8_linear_triton(x, qweight, weight_scale, bias, activation)
    # smoothing and outlier columns: one pointwise pass in front of the template, the outliers' fp32 product after it
    xs, extra = take_out_outliers(x.float(), smooth, outlier_index, outlier_weight)
    y = kernels.int8_linear_triton(xs, qweight, weight_scale, None, "none").float()
    if extra is not None:
        y = y + extra
    if bias is not None:
        y = y + bias
    return apply_activation(y, activation).to(x.dtype)


def _weight_only_linear_cuda(x, qweight, scale, zero, group_size, bias):
    kernels = _triton_quant()
    if kernels is None or group_size == 0 or x.dtype == torch.float64:
        return weight_only_linear_reference(x, qweight, scale, zero, group_size, bias)
    return kernels.int4_linear_triton(x, qweight, scale, zero, group_size, bias)


# ----------------------------------------------------------------------------- inductor


def int8_linear_decomposition(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation):
    """Quantize, ``_int_mm``, epilogue in ATen ops, which inductor fuses with their neighbours (the
    quantization with the norm before it, the epilogue with what follows). Registered only on CPUs
    with VNNI (see the record): elsewhere ``_int_mm`` is a slow reference loop and inductor calls the
    op's CPU kernels instead (a decomposition cannot decline per call: inductor then refuses the op's
    fallback)."""
    k, n = x.shape[-1], qweight.shape[0]
    xs, extra = take_out_outliers(x.float(), smooth, outlier_index, outlier_weight)
    scale = (xs.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    q = torch.round(xs / scale).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(q.reshape(-1, k), qweight.t())
    y = acc.float().reshape(*x.shape[:-1], n) * scale * weight_scale
    if extra is not None:
        y = y + extra
    if bias is not None:
        y = y + bias
    return apply_activation(y, activation).to(x.dtype)


def _weight_only_linear_decomposition(x, qweight, scale, zero, group_size, bias):
    if group_size == 0:  # the per-channel scale commutes with the GEMM: no dequantized weight in memory
        y = F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)
    return F.linear(x, dequantize_int4(qweight, scale, zero, group_size).to(x.dtype), None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------- eager fast paths


def _int8_linear_eager(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation):
    if x.device.type == "cpu" and not x.requires_grad:
        return int8_linear_cpu(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation)
    return torch.ops.graphopt.int8_linear.default(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation)


def _weight_only_linear_eager(x, qweight, scale, zero, group_size, bias):
    if x.device.type == "cpu" and not x.requires_grad:
        return weight_only_linear_cpu(x, qweight, scale, zero, group_size, bias)
    return torch.ops.graphopt.weight_only_linear.default(x, qweight, scale, zero, group_size, bias)


def _int8_linear_cpu_kernel(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation):
    return int8_linear_cpu(x, qweight, weight_scale, bias, smooth, outlier_index, outlier_weight, activation)


# ----------------------------------------------------------------------------- records


INT8_LINEAR = register_op(
    OpRecord(
        op=torch.ops.graphopt.int8_linear,
        reference=int8_linear_reference,
        fake=_int8_linear_fake,
        kernels={"cpu": _int8_linear_cpu_kernel, "cuda": _int8_linear_cuda},
        flops=_linear_flops,
        tokenwise=1,  # per-token quantization: each output row reads its own input row only
        inductor_decomposition=int8_linear_decomposition if cpu_capabilities().vnni else None,
        eager_fast_path=_int8_linear_eager,
        onnx=onnx_translation(f"{__name__}.onnx", "int8_linear"),
        quantizes=True,
    )
)

WEIGHT_ONLY_LINEAR = register_op(
    OpRecord(
        op=torch.ops.graphopt.weight_only_linear,
        reference=weight_only_linear_reference,
        fake=_weight_only_linear_fake,
        kernels={"cpu": weight_only_linear_cpu, "cuda": _weight_only_linear_cuda},
        flops=_linear_flops,
        tokenwise=1,
        inductor_decomposition=_weight_only_linear_decomposition,
        eager_fast_path=_weight_only_linear_eager,
        onnx=onnx_translation(f"{__name__}.onnx", "weight_only_linear"),
    )
)

EAGER_FAST_PATHS = {getattr(r.op, o): r.eager_fast_path for r in (INT8_LINEAR, WEIGHT_ONLY_LINEAR) for o in r.op.overloads()}
"""Overload -> what the eager backend calls in its place."""
