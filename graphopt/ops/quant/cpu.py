"""CPU kernels of ``graphopt::int8_linear`` and ``graphopt::weight_only_linear``, chosen per CPU by measurement.

**Dynamic W8A8** has four paths; :func:`int8_path` times them once per shape on this machine
(:func:`graphopt.ops.platform.fastest`, cached on disk) and picks the fastest:

* ``"onednn"``: the C kernel :c:func:`quantize_rows_u8` writes each token's uint8 codes on a fixed
  grid (the token divided by its max |x|, times 127.5, plus 128) and its max in one sweep; oneDNN's
  ``qlinear_pointwise`` multiplies them with the prepacked int8 weights (per-channel scales inside
  the GEMM) into fp32; the C epilogue multiplies each row by its max, adds the bias and applies the
  activation in place. Two sweeps besides the GEMM, none of them a full fp32 temporary.
* ``"fbgemm"``: the same grid through fbgemm's fixed-scale dynamic linear
  (``quantized.linear_with_input_q_dq_qweight_dq_output_fp32``), the fastest for a few tokens.
* ``"int_mm"``: symmetric int8 codes, ``torch._int_mm`` into int32, the C epilogue; offered only on
  CPUs with an int8 dot-product instruction (VNNI/AMX), where it is fast. Elsewhere ATen runs it
  as a reference loop 30x slower than fp32, so it is never even timed there.
* ``"fp32"``: the same quantized function computed with an fp32 GEMM on dequantized weights,
  the fallback where no int8 library is present.

The grid of the first two paths is the per-token symmetric grid of the reference up to a half-step
offset (codes ``round(127.5 v) + 128`` instead of ``round(127 v)``), so their results differ from
:func:`~graphopt.ops.quant.reference.int8_linear_reference` by less than one activation step per
term; tests hold them to :func:`~graphopt.ops.quant.reference.int8_linear_error_bound`.

**Saturation.** Without VNNI, int8 GEMMs multiply uint8 by int8 with ``vpmaddubsw``, which adds
pairs of products in int16 and saturates above 32767 (255 · 127 · 2 = 64770 does): measured here,
a row of ones times a row of ones gives 2 instead of 256. ``quantize_int8`` therefore stores
weights at ±63 on such CPUs (255 · 63 · 2 < 32767); weights stored at ±127 (quantized on a VNNI
machine) run there with 7-bit activation codes instead (grid 63.5, zero point 64).

**Weight-only** linears run the C kernels :c:func:`wo_int8_gemv` / :c:func:`wo_int4_gemv` for a few
rows (decoding, memory-bound: a quarter or an eighth of fp32's weight bytes), and dequantize the
weights into an fp32 GEMM for many rows, again chosen by measurement. ATen's own weight-only
kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are 30-80x slower than fp32 on
AVX2 CPUs and are not candidates.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import warnings
import weakref
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.ops.cbuild import build_c_library
from graphopt.ops.platform import cpu_capabilities, fastest
from graphopt.ops.quant.reference import apply_activation, dequantize_int4, quantize_per_token, weight_only_linear_reference

__all__ = [
    "ACTIVATION_CODES",
    "C_SOURCE",
    "INT8_PATHS",
    "WEIGHT_ONLY_PATHS",
    "c_kernels",
    "force_path",
    "int8_linear_cpu",
    "int8_path",
    "int8_pays_off",
    "int8_paths_available",
    "int8_timings",
    "weight_only_linear_cpu",
    "weight_only_path",
    "weight_only_pays_off",
    "weight_only_timings",
]

C_SOURCE = Path(__file__).with_name("cpu.c")
"""The kernels' C source, shipped beside this module (package data)."""

ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}
INT8_PATHS = ("onednn", "fbgemm", "int_mm", "fp32")
WEIGHT_ONLY_PATHS = ("gemv", "dequant")


@functools.cache
def c_kernels() -> ctypes.CDLL | None:
    """The C kernels of ``cpu.c``, built on first use (:func:`graphopt.ops.cbuild.build_c_library`); None where they cannot be."""
    lib = build_c_library(C_SOURCE, "quant_kernels")
    if lib is None:
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.quantize_rows_u8.argtypes = [p, p, i64, i64, f32, i32, p, p, i32]
    lib.quantize_rows_s8.argtypes = [p, p, i64, i64, p, p, i32]
    lib.prescale_rows_f32.argtypes = [p, p, i64, i64, p, p, i32]
    lib.epilogue_f32.argtypes = [p, p, p, p, i64, i64, i32, i32]
    lib.epilogue_i32.argtypes = [p, p, p, p, p, i64, i64, i32, i32]
    lib.wo_int8_gemv.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    lib.wo_int4_gemv.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i32]
    return lib


def _kernels_version() -> str:
    """Names the C kernels' build (their cached library's name hashes the source) so timings
    measured with an earlier build are not reused."""
    lib = c_kernels()
    return Path(lib._name).stem if lib is not None else "aten"


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@functools.lru_cache(maxsize=64)
def _filled(n: int, value: float) -> Tensor:
    """A constant fp32 vector: what the C kernels read for an absent smooth, scale or bias (no branch in their loops)."""
    return torch.full((n,), value)


def _or_ones(t: Tensor | None, n: int) -> Tensor:
    return _filled(n, 1.0) if t is None else t


def _or_zeros(t: Tensor | None, n: int) -> Tensor:
    return _filled(n, 0.0) if t is None else t


# ----------------------------------------------------------------------------- forced paths (tests, benches)

_forced: dict[str, str] = {}


@contextlib.contextmanager
def force_path(op: str, path: str) -> Iterator[None]:
    """Run every ``op`` (``"int8_linear"`` or ``"weight_only_linear"``) call on ``path`` inside the block."""
    known = INT8_PATHS if op == "int8_linear" else WEIGHT_ONLY_PATHS
    if path not in known:
        raise ValueError(f"unknown {op} path {path!r}; one of {', '.join(known)}")
    before = _forced.get(op)
    _forced[op] = path
    try:
        yield
    finally:
        if before is None:
            _forced.pop(op, None)
        else:
            _forced[op] = before


# ----------------------------------------------------------------------------- prepacked weights

_packs: dict[int, dict] = {}
"""id(qweight) -> its packed forms; an entry leaves with its tensor (``weakref.finalize``)."""


def _held(tensor: Tensor) -> dict:
    """What is derived from ``tensor`` (a graph constant) and kept while it lives."""
    held = _packs.get(id(tensor))
    if held is None:
        held = _packs[id(tensor)] = {}
        weakref.finalize(tensor, _packs.pop, id(tensor), None)
    return held


def _pack(qweight: Tensor, weight_scale: Tensor, path: str):
    """The prepacked form of ``qweight`` for ``path``, made once per weight tensor."""
    held = _held(qweight)
    key = (path, weight_scale.data_ptr())
    if key not in held:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated; fbgemm still takes only them
            if path == "onednn":
                held[key] = torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None)
            elif path == "fbgemm":
                zeros = torch.zeros(qweight.shape[0], dtype=torch.long)
                qtensor = torch._make_per_channel_quantized_tensor(qweight.contiguous(), weight_scale.double(), zeros, 0)
                engine = torch.backends.quantized.engine
                torch.backends.quantized.engine = "fbgemm"
                try:
                    held[key] = torch.ops.quantized.linear_prepack(qtensor, None)
                finally:
                    torch.backends.quantized.engine = engine
            elif path == "fp32":
                held[key] = qweight.float() * weight_scale.float()[:, None]
            elif path == "int_mm":
                held[key] = qweight.t()  # [K, N], column-major
            elif path == "zeros":
                held[key] = torch.zeros(qweight.shape[0], dtype=torch.long)
            elif path == "max":
                held[key] = int(qweight.abs().max()) if qweight.numel() else 0
    return held[key]


def _grid(qweight: Tensor, weight_scale: Tensor) -> tuple[float, int]:
    """(half the levels, zero point) of the uint8 activation grid: 8-bit, or 7-bit where weights
    beyond ±64 would saturate a CPU without VNNI."""
    if not cpu_capabilities().vnni and _pack(qweight, weight_scale, "max") > 64:
        return 63.5, 64
    return 127.5, 128


# ----------------------------------------------------------------------------- W8A8 paths


def _quantize_u8(x: Tensor, smooth: Tensor | None, half: float, zero_point: int) -> tuple[Tensor, Tensor]:
    lib = c_kernels()
    m, k = x.shape
    if lib is not None:
        q, row_max = torch.empty((m, k), dtype=torch.uint8), torch.empty(m)
        lib.quantize_rows_u8(x.data_ptr(), _or_ones(smooth, k).data_ptr(), m, k, half, zero_point, q.data_ptr(), row_max.data_ptr(), torch.get_num_threads())
        return q, row_max
    xs = x if smooth is None else x * smooth
    row_max = xs.abs().amax(1)
    inv = torch.where(row_max > 0, half / row_max, torch.zeros_like(row_max))
    q = (xs * inv[:, None]).round_().add_(zero_point).clamp_(0, 2 * zero_point - 1).to(torch.uint8)
    return q, row_max


def _epilogue(y: Tensor, row_scale: Tensor, col_scale: Tensor | None, bias: Tensor | None, activation: str) -> Tensor:
    lib = c_kernels()
    if lib is not None and y.dtype == torch.float32:
        n = y.shape[1]
        lib.epilogue_f32(y.data_ptr(), row_scale.data_ptr(), _or_ones(col_scale, n).data_ptr(), _or_zeros(bias, n).data_ptr(), y.shape[0], n, ACTIVATION_CODES[activation], torch.get_num_threads())
        return y
    y = y * row_scale[:, None].to(y.dtype)
    if col_scale is not None:
        y = y * col_scale
    if bias is not None:
        y = y + bias
    return apply_activation(y, activation)


def _onednn(x, qweight, weight_scale, bias, smooth, activation):
    half, zero_point = _grid(qweight, weight_scale)
    q, row_max = _quantize_u8(x, smooth, half, zero_point)
    y = torch.ops.onednn.qlinear_pointwise(q, 1.0 / half, zero_point, _pack(qweight, weight_scale, "onednn"), weight_scale, _pack(qweight, weight_scale, "zeros"), None, 1.0, 0, torch.float32, "none", [], "")
    return _epilogue(y, row_max, None, bias, activation)


def _fbgemm(x, qweight, weight_scale, bias, smooth, activation):
    half, zero_point = _grid(qweight, weight_scale)
    lib = c_kernels()
    if lib is not None:
        scaled, row_max = torch.empty_like(x), torch.empty(x.shape[0])
        lib.prescale_rows_f32(x.data_ptr(), _or_ones(smooth, x.shape[1]).data_ptr(), x.shape[0], x.shape[1], scaled.data_ptr(), row_max.data_ptr(), torch.get_num_threads())
    else:
        xs = x if smooth is None else x * smooth
        row_max = xs.abs().amax(1)
        scaled = xs * torch.where(row_max > 0, 1.0 / row_max, torch.zeros_like(row_max))[:, None]
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(scaled, 1.0 / half, zero_point, _pack(qweight, weight_scale, "fbgemm"))
    return _epilogue(y, row_max, None, bias, activation)


def _int_mm(x, qweight, weight_scale, bias, smooth, activation):
    lib = c_kernels()
    m, k = x.shape
    if lib is not None:
        q, row_scale = torch.empty((m, k), dtype=torch.int8), torch.empty(m)
        lib.quantize_rows_s8(x.data_ptr(), _or_ones(smooth, k).data_ptr(), m, k, q.data_ptr(), row_scale.data_ptr(), torch.get_num_threads())
    else:
        q, row_scale = quantize_per_token(x if smooth is None else x * smooth)
    acc = torch._int_mm(q, _pack(qweight, weight_scale, "int_mm"))
    if lib is not None:
        y = torch.empty(acc.shape)
        lib.epilogue_i32(acc.data_ptr(), y.data_ptr(), row_scale.data_ptr(), weight_scale.data_ptr(), _or_zeros(bias, acc.shape[1]).data_ptr(), m, acc.shape[1], ACTIVATION_CODES[activation], torch.get_num_threads())
        return y
    return _epilogue(acc.float(), row_scale, weight_scale, bias, activation)


def _fp32(x, qweight, weight_scale, bias, smooth, activation):
    q, row_scale = quantize_per_token(x if smooth is None else x * smooth)
    y = F.linear(q.float() * row_scale[:, None], _pack(qweight, weight_scale, "fp32"), bias)
    return apply_activation(y, activation)


_INT8_KERNELS = {"onednn": _onednn, "fbgemm": _fbgemm, "int_mm": _int_mm, "fp32": _fp32}


@functools.cache
def _has_onednn() -> bool:
    return hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()


@functools.cache
def _has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines  # a property that rebuilds a list per read


def int8_paths_available(m: int, n: int, k: int) -> list[str]:
    """The W8A8 paths this CPU can run at ``[m, k] x [n, k]ᵀ``, fastest-first candidates before ``"fp32"``."""
    paths = []
    if _has_onednn():
        paths.append("onednn")
    if _has_fbgemm():
        paths.append("fbgemm")
    if cpu_capabilities().vnni and m > 16 and k % 8 == 0 and n % 8 == 0:
        paths.append("int_mm")
    return [*paths, "fp32"]


def _bucket(m: int) -> int:
    """Token counts are timed at powers of two (1, 2, 4, ..., 4096): a cached choice serves a range of ``m``."""
    return min(4096, 1 << max(0, math.ceil(math.log2(max(m, 1)))))


def int8_path(m: int, n: int, k: int) -> tuple[str, dict[str, float]]:
    """The fastest W8A8 path at ``m`` tokens (its power-of-two bucket) for an ``n x k`` weight, and the timings (s).

    Timed once on random data of that shape (:func:`graphopt.ops.platform.fastest`), cached.
    """
    if "int8_linear" in _forced:
        return _forced["int8_linear"], {}
    mb = _bucket(m)
    paths = int8_paths_available(mb, n, k)
    if len(paths) == 1:
        return paths[0], {}
    seconds = int8_timings(m, n, k)
    return min(paths, key=lambda p: seconds.get(p, float("inf"))), seconds


def int8_timings(m: int, n: int, k: int) -> dict[str, float]:
    """Seconds of each W8A8 path at ``m``'s bucket, and of the fp32 ``F.linear`` it would replace
    (``"aten_fp32"``), raced together on random data of that shape and cached
    (:func:`graphopt.ops.platform.fastest`): the pass keeps fp32 where that wins."""
    mb = _bucket(m)
    memo_key = (mb, n, k, torch.get_num_threads())
    if memo_key in _timings_memo:
        return _timings_memo[memo_key]
    paths = [p for p in int8_paths_available(mb, n, k) if p != "fp32"] or ["fp32"]
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(mb, k, generator=generator), torch.randn(n, k, generator=generator)
    qweight = torch.randint(-63, 64, (n, k), dtype=torch.int8, generator=generator)
    scale, bias = torch.full((n,), 1e-3), torch.zeros(n)
    candidates = {path: functools.partial(_INT8_KERNELS[path], x, qweight, scale, bias, None, "none") for path in paths}
    candidates["aten_fp32"] = functools.partial(F.linear, x, weight, bias)
    _timings_memo[memo_key] = fastest(f"int8_linear/{_kernels_version()}", (mb, n, k), candidates)[1]
    return _timings_memo[memo_key]


def int8_pays_off(m: int, n: int, k: int) -> bool:
    """Whether the fastest W8A8 path beats the fp32 GEMM at ``m`` tokens on this CPU (measured, cached)."""
    path, seconds = int8_path(m, n, k)
    return not seconds or seconds.get(path, float("inf")) < seconds["aten_fp32"]


_timings_memo: dict[tuple, dict[str, float]] = {}
_resolved: dict[tuple, str] = {}
"""(bucket, n, k, threads, forced path) -> the path :func:`int8_linear_cpu` runs."""
"""(bucket, n, k, threads) -> timings: a call after the first looks its path up without building test data."""


def _without_outliers(smooth: Tensor | None, outlier_index: Tensor, k: int) -> Tensor:
    """The smoothing vector with zeros at the outlier columns (they leave the int8 product there),
    made once per op's constants."""
    key = ("without_outliers", None if smooth is None else smooth.data_ptr(), k)
    held = _held(outlier_index)
    if key not in held:
        held[key] = _or_ones(None if smooth is None else smooth.float(), k).index_fill(0, outlier_index, 0.0).contiguous()
    return held[key]


def int8_linear_cpu(
    x: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    smooth: Tensor | None = None,
    outlier_index: Tensor | None = None,
    outlier_weight: Tensor | None = None,
    activation: str = "none",
    path: str | None = None,
) -> Tensor:
    """``graphopt::int8_linear`` on CPU (see the module docstring); ``path`` forces one of :data:`INT8_PATHS`."""
    shape, k = x.shape, x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k).float().contiguous()
    extra = None
    if outlier_index is not None:
        # LLM.int8(): the outlier columns leave the int8 product through a zero in the smoothing
        # vector (the quantization sweep multiplies by it anyway) and meet their fp32 weights here
        picked = x2.index_select(1, outlier_index)
        if smooth is not None:
            picked = picked * smooth.float()[outlier_index]
        extra = (picked, outlier_weight.float().t())
        smooth = _without_outliers(smooth, outlier_index, k)
    smooth = None if smooth is None else smooth.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_zeros((*shape[:-1], n))
    if path is None:
        key = (_bucket(m), n, k, torch.get_num_threads(), _forced.get("int8_linear"))
        path = _resolved.get(key)
        if path is None:  # once per shape bucket: the calls after it skip the lookups (~30 us a call)
            path = _resolved[key] = int8_path(m, n, k)[0]
    if path == "int_mm" and not (m > 16 and "int_mm" in int8_paths_available(m, n, k)):
        path = "fp32"
    if extra is None:
        y = _INT8_KERNELS[path](x2, qweight, weight_scale.float().contiguous(), bias, smooth, activation)
    else:
        y = _INT8_KERNELS[path](x2, qweight, weight_scale.float().contiguous(), bias, smooth, "none")
        y = apply_activation(y.addmm_(*extra), activation)  # the outlier columns' fp32 product, added in place
    return y.reshape(*shape[:-1], n).to(x.dtype)


# ----------------------------------------------------------------------------- weight-only


def _gemv(x, qweight, scale, zero, group_size, bias):
    lib = c_kernels()
    if lib is None:
        return None
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n)
    if group_size == 0:
        lib.wo_int8_gemv(x.data_ptr(), qweight.data_ptr(), scale.data_ptr(), _or_zeros(bias, n).data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
    else:
        pairs = x.view(m, k // 2, 2)
        even, odd = pairs[..., 0].contiguous(), pairs[..., 1].contiguous()
        lib.wo_int4_gemv(
            even.data_ptr(), odd.data_ptr(), None, qweight.data_ptr(), scale.data_ptr(), zero.data_ptr(), _or_zeros(bias, n).data_ptr(),
            y.data_ptr(), m, n, k, group_size, torch.get_num_threads(),
        )
    return y


def _dequant(x, qweight, scale, zero, group_size, bias):
    w = qweight.float() * scale[:, None] if group_size == 0 else dequantize_int4(qweight, scale, zero, group_size)
    return F.linear(x, w, bias)


_WEIGHT_ONLY_KERNELS = {"gemv": _gemv, "dequant": _dequant}


def weight_only_path(m: int, n: int, k: int, group_size: int) -> tuple[str, dict[str, float]]:
    """The faster weight-only path at ``m`` tokens (bucketed) for an ``n x k`` weight, and the
    timings (s) of both paths and of the fp32 ``F.linear`` they replace (``"aten_fp32"``), raced
    together once and cached."""
    if "weight_only_linear" in _forced:
        return _forced["weight_only_linear"], {}
    if c_kernels() is None:
        return "dequant", {}
    seconds = weight_only_timings(m, n, k, group_size)
    return min(WEIGHT_ONLY_PATHS, key=lambda p: seconds.get(p, float("inf"))), seconds


def weight_only_timings(m: int, n: int, k: int, group_size: int) -> dict[str, float]:
    """Seconds of each weight-only path and of ``"aten_fp32"`` at ``m``'s bucket (see :func:`weight_only_path`)."""
    mb = _bucket(m)
    memo_key = (mb, n, k, group_size, torch.get_num_threads())
    if memo_key in _timings_memo:
        return _timings_memo[memo_key]
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(mb, k, generator=generator), torch.randn(n, k, generator=generator)
    if group_size == 0:
        qweight, scale, zero = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator), torch.full((n,), 1e-3), None
    else:
        qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
        scale, zero = torch.full((n, k // group_size), 1e-3), torch.full((n, k // group_size), 8.0)
    # the matrix-vector loops only race where they can win: past a few dozen rows a GEMM wins by far
    paths = WEIGHT_ONLY_PATHS if mb <= 64 else ("dequant",)
    candidates = {path: functools.partial(_WEIGHT_ONLY_KERNELS[path], x, qweight, scale, zero, group_size, None) for path in paths}
    candidates["aten_fp32"] = functools.partial(F.linear, x, weight, None)
    _timings_memo[memo_key] = fastest(f"weight_only_linear/{_kernels_version()}", (mb, n, k, group_size), candidates)[1]
    return _timings_memo[memo_key]


def weight_only_pays_off(m: int, n: int, k: int, group_size: int) -> bool:
    """Whether the faster weight-only path beats the fp32 GEMM at ``m`` tokens on this CPU (measured, cached)."""
    path, seconds = weight_only_path(m, n, k, group_size)
    return not seconds or seconds.get(path, float("inf")) < seconds["aten_fp32"]


def weight_only_linear_cpu(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, bias: Tensor | None = None, path: str | None = None) -> Tensor:
    """``graphopt::weight_only_linear`` on CPU: the C matrix-vector kernels for a few rows, a dequantized GEMM otherwise."""
    if x.dtype == torch.float64:
        return weight_only_linear_reference(x, qweight, scale, zero, group_size, bias)
    shape, k = x.shape, x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k).float().contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_zeros((*shape[:-1], n))
    scale = scale.float().contiguous()
    zero = None if zero is None else zero.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    if path is None:
        path, _ = weight_only_path(m, n, k, group_size)
    if k > 65536:  # the int4 kernel converts a row into a stack buffer of k floats
        path = "dequant"
    y = _gemv(x2, qweight.contiguous(), scale, zero, group_size, bias) if path == "gemv" else None
    if y is None:  # the dequantizing path, or no C kernels
        y = _dequant(x2, qweight, scale, zero, group_size, bias)
    return y.reshape(*shape[:-1], n).to(x.dtype)
