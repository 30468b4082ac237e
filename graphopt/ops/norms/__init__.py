"""graphopt's custom operators, in the ``graphopt`` namespace of ``torch.library``.

Passes introduce computations that ATen has no single op for (linear attention, token pruning,
quantized linear, ...). Each becomes a ``torch.library.custom_op`` with

* an eager reference implementation (the definition of what the op computes), and
* a fake implementation (``register_fake``) giving output shapes and dtypes from input shapes, so
  that rewritten graphs still propagate ``meta["val"]``, re-export, save and load.

Backends may register faster kernels for the same op; the reference stays the definition the
tests compare against. Import this module (any ``import graphopt`` does) before loading a saved
graph that uses these ops.

The norms (``rms_norm``, ``crms_norm``) are lowered to a fast kernel on every backend:

* **eager CPU** (``register_kernel("cpu")``): for contiguous fp32 inputs, a C kernel (below, about
  40 lines) compiled on first use with the machine's C compiler in ~0.2 s, cached, and called
  through ``ctypes``: per row, one sweep for the sum of squares and one that writes
  ``x * inv_rms * w + b``, rows split over torch's own OpenMP threads. That is the memory traffic
  of LayerNorm's fused kernel with one reduction instead of two. Otherwise (other dtypes, strided
  inputs, no compiler, no OpenMP runtime found) :func:`rms_norm_torch`, which needs one reduction
  kernel (``linalg.vector_norm``) and one output allocation updated in place. The reference makes
  ~4 full-size temporaries, and ``aten.rms_norm`` has no fused CPU kernel (it decomposes into ~6
  ATen ops): both are slower than ``aten.layer_norm``;
* **inductor**: the reference is registered as an inductor decomposition, so ``torch.compile``
  sees through the op and fuses the norm with its neighbours (a residual add, casts) instead of
  calling it as an opaque extern kernel;
* **CUDA** (``register_kernel("cuda")``): the Triton kernels of :mod:`graphopt.ops.norms.triton`
  (one program per row, fp32 accumulation).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["c_kernels", "crms_norm", "crms_norm_reference", "crms_norm_torch", "rms_norm", "rms_norm_reference", "rms_norm_torch"]

log = logging.getLogger(__name__)


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


@torch.library.custom_op("graphopt::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dimension with optional gain and bias (``y = x / rms(x) * w + b``).

    Unlike ``aten.rms_norm`` it takes a bias, which exact LayerNorm -> RMSNorm conversion needs
    (the LayerNorm's bias survives). Computed in fp32 for fp16/bf16 inputs (in the input's dtype
    for fp32/fp64), returned in the input's dtype.
    """
    return rms_norm_reference(x, weight, bias, eps)


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
    return crms_norm_reference(x, eps)


@crms_norm.register_fake
def _crms_norm_fake(x, eps):
    return torch.empty_like(x)


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


_C_KERNELS = r"""
#include <math.h>
#include <stdint.h>

/* Rows of d floats, split over threads; each row is read twice, the second time from cache. */
#define PARALLEL_MIN_ELEMENTS 16384

void rms_norm_f32(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t d, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float sum_of_squares = 0.0f;
        #pragma omp simd reduction(+ : sum_of_squares)
        for (int64_t i = 0; i < d; i++) sum_of_squares += xr[i] * xr[i];
        const float inv_rms = 1.0f / sqrtf(sum_of_squares / (float)d + eps);
        if (w && b) {
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms * w[i] + b[i];
        } else if (w) {
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms * w[i];
        } else if (b) {
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms + b[i];
        } else {
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms;
        }
    }
}

/* The row holds d of d + 1 coordinates of a zero-mean vector; the missing one is -sum(row). */
void crms_norm_f32(const float *x, float *y, int64_t rows, int64_t d, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float sum = 0.0f, sum_of_squares = 0.0f;
        #pragma omp simd reduction(+ : sum, sum_of_squares)
        for (int64_t i = 0; i < d; i++) {
            sum += xr[i];
            sum_of_squares += xr[i] * xr[i];
        }
        const float inv_rms = 1.0f / sqrtf((sum_of_squares + sum * sum) / (float)(d + 1) + eps);
        #pragma omp simd
        for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms;
    }
}
"""


def _openmp_runtime() -> str | None:
    """The OpenMP library torch runs its threads on (Linux), so the C kernels share its thread pool."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = re.search(r"(/\S*/lib(?:gomp|iomp5|omp)\b[^/\s]*\.so[^/\s]*)$", maps, re.MULTILINE)
    return found.group(1) if found else None


def _cpu_flags() -> str:
    """The CPU's feature flags: the kernels are built for this CPU (``-march=native``)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


@functools.cache
def c_kernels() -> ctypes.CDLL | None:
    """The C norm kernels, compiled on first use and cached; None where they cannot be built.

    Built with ``$CC`` (default ``cc``) into ``$XDG_CACHE_HOME/graphopt`` (``~/.cache/graphopt``),
    linked against the OpenMP runtime torch has loaded (one thread pool, not two), under a name
    that hashes the source, the runtime and the CPU's flags. A missing compiler, runtime or
    writable cache, or a failed build, leaves the ATen formulation in place (logged at INFO).
    """
    compiler, runtime = shutil.which(os.environ.get("CC", "cc")), _openmp_runtime()
    if compiler is None or runtime is None:
        log.info("graphopt C norm kernels off: %s", "no C compiler" if compiler is None else "no OpenMP runtime found")
        return None
    key = hashlib.sha256("\0".join([_C_KERNELS, compiler, runtime, _cpu_flags()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt"
    library = cache / f"norm_kernels_{key}.so"
    try:
        if not library.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as build:
                source, built = Path(build) / "norms.c", Path(build) / "norms.so"
                source.write_text(_C_KERNELS)
                # compile with OpenMP, link against torch's runtime instead of the compiler's own
                subprocess.run([compiler, "-O3", "-march=native", "-fPIC", "-fopenmp", "-c", str(source), "-o", f"{built}.o"], check=True, capture_output=True)
                subprocess.run([compiler, "-shared", f"{built}.o", runtime, "-o", str(built)], check=True, capture_output=True)
                os.replace(built, library)  # atomic: concurrent first uses never load a partial file
        kernels = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace") if isinstance(exc, subprocess.CalledProcessError) else exc
        log.info("graphopt C norm kernels off: %s", detail)
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


@rms_norm.register_kernel("cpu")
def _rms_norm_cpu(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    kernels = _c_kernels_for(x, weight, bias)
    if kernels is None:
        return rms_norm_torch(x, weight, bias, eps)
    y, d = torch.empty_like(x), x.shape[-1]
    weight_data, bias_data = (None if t is None else t.data_ptr() for t in (weight, bias))
    kernels.rms_norm_f32(x.data_ptr(), weight_data, bias_data, y.data_ptr(), x.numel() // d, d, eps, torch.get_num_threads())
    return y


@crms_norm.register_kernel("cpu")
def _crms_norm_cpu(x: Tensor, eps: float) -> Tensor:
    kernels = _c_kernels_for(x)
    if kernels is None:
        return crms_norm_torch(x, eps)
    y, d = torch.empty_like(x), x.shape[-1]
    kernels.crms_norm_f32(x.data_ptr(), y.data_ptr(), x.numel() // d, d, eps, torch.get_num_threads())
    return y


def _direct(name: str, kernel, *args) -> Tensor:
    if torch.autograd.profiler._is_profiler_enabled:  # keep the norm visible to torch.profiler by its op name
        with torch.profiler.record_function(name):
            return kernel(*args)
    return kernel(*args)


def _rms_norm_eager(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    if x.device.type == "cpu" and not x.requires_grad:
        return _direct("graphopt::rms_norm", _rms_norm_cpu, x, weight, bias, eps)
    return torch.ops.graphopt.rms_norm.default(x, weight, bias, eps)


def _crms_norm_eager(x: Tensor, eps: float) -> Tensor:
    if x.device.type == "cpu" and not x.requires_grad:
        return _direct("graphopt::crms_norm", _crms_norm_cpu, x, eps)
    return torch.ops.graphopt.crms_norm.default(x, eps)


# What the eager backend calls in place of these ops: the same kernels without the custom-op
# dispatcher, which costs ~7 us a call (as much as the whole norm of a small model's activations).
EAGER_FAST_PATHS = {
    torch.ops.graphopt.rms_norm.default: _rms_norm_eager,
    torch.ops.graphopt.crms_norm.default: _crms_norm_eager,
}


@functools.cache
def _triton_norm():
    """:mod:`graphopt.ops.norms.triton`, or None where Triton is not installed."""
    try:
        from graphopt.ops.norms import triton as triton_norm
    except ImportError:
        return None
    return triton_norm


@rms_norm.register_kernel("cuda")
def _rms_norm_cuda(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    kernels = _triton_norm()
    if kernels is None or x.dtype not in kernels.DTYPES:
        return rms_norm_torch(x, weight, bias, eps)
    return kernels.rms_norm_triton(x, weight, bias, eps)


@crms_norm.register_kernel("cuda")
def _crms_norm_cuda(x: Tensor, eps: float) -> Tensor:
    kernels = _triton_norm()
    if kernels is None or x.dtype not in kernels.DTYPES:
        return crms_norm_torch(x, eps)
    return kernels.crms_norm_triton(x, eps)


def _register_inductor_decompositions() -> None:
    """Make inductor trace the references instead of calling the ops as opaque extern kernels.

    Inductor decomposes an op only if its own decomposition table has an entry for it; the table
    is inductor's alone, so export, capture and the eager backends keep the ops as they are.
    Importing it costs ~0.1 s once torch.export is loaded (any capture loads it), ~0.7 s before.
    """
    from torch._inductor import decomposition

    decomposition.register_decomposition(torch.ops.graphopt.rms_norm.default)(rms_norm_reference)
    decomposition.register_decomposition(torch.ops.graphopt.crms_norm.default)(crms_norm_reference)
    decomposition.fast_random_decomps.cache_clear()  # inductor's copy of the table, cached at its first compile


_register_inductor_decompositions()
