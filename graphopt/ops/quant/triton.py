"""Triton kernels of graphopt's quantized linears (GPU): dynamic W8A8 and weight-only group-wise int4.

What they compute is stated in :mod:`graphopt.ops.quant.reference`; here is how. Three kernels,
each a ``@triton.jit`` function with ``tl.constexpr`` variants, and four launchers.

**1. Per-row activation quantization** (:func:`quantize_rows_kernel`, :func:`quantize_rows_triton`).
One program owns one row of ``x [M, K]`` and sweeps it twice in blocks of ``BLOCK_SIZE`` columns,
as the layer-norm tutorial does: the first sweep finds ``max |x|`` (in fp32, exact), which gives
``scale = max / 127`` (1 for an all-zero row); the second reloads the row, divides it by the scale
and rounds half to even, and stores the codes as int8 next to the scale. The codes must be the
reference's bit for bit (``torch.round(x.float() / scale)``), so both divisions are IEEE
(``tl.math.div_rn``: a plain ``/`` compiles to an approximate division on NVIDIA GPUs), and the
rounding is the fp32 "magic number" one: adding ``1.5 · 2²³`` moves a value of magnitude below
``2²²`` into the binade whose spacing is 1, where the hardware's round-to-nearest-even rounds it to
an integer, and subtracting it back is exact. It is one code path under the interpreter (which has
no ``libdevice.rint``) and on a GPU; the quotients here are at most 127 in magnitude.

**2. The int8 GEMM** (:func:`int8_gemm_kernel`, :func:`int8_gemm_triton`), after the
matrix-multiplication tutorial. Each program computes one ``[BLOCK_M, BLOCK_N]`` tile of
``xq [M, K] · qweightᵀ``:

* *Which tile*: tiles are walked in groups of ``GROUP_M`` tile rows, column by column, so that
  programs running together share rows of ``xq`` and of ``qweight`` in L2.
* *K loop*: a ``[BLOCK_M, BLOCK_K]`` block of ``xq`` and a ``[BLOCK_K, BLOCK_N]`` block of
  ``qweightᵀ`` (the ``[N, K]`` weight read transposed through its strides, as it is stored) are
  loaded as int8, masked at the ragged edges (``other=0`` adds nothing to a dot product), and
  multiplied by ``tl.dot(..., out_dtype=tl.int32)`` into an int32 accumulator: the tensor cores'
  int8 MMA on sm_80 and later, exact for any ``K < 2³¹ / 127²`` (133 144). ``BLOCK_K`` is at
  least 32, the K of one int8 MMA instruction.
* *Epilogue*, once per tile, on fp32 values: ``acc · x_scale[m] · weight_scale[n] + bias[n]``, then
  the ``ACTIVATION`` (``"none"``, ``"relu"``, ``"gelu"`` by ``erf``, ``"gelu_tanh"``, the tanh
  written as ``2σ(2x) - 1``), stored in the output's dtype. The reference computes the epilogue in
  fp64 from the same integers, so the two differ by fp32 rounding only.

:func:`int8_linear_triton` chains the two launchers: ``x [..., K]`` quantized per row, then the GEMM.

**3. The weight-only int4 GEMM** (:func:`int4_gemm_kernel`, :func:`int4_linear_triton`). Same
tiling and K loop, with ``x`` in floating point and the weight dequantized inside the loop, so it
is never materialised: a ``[BLOCK_K/2, BLOCK_N]`` block of the packed ``[N, K/2]`` bytes is
loaded once and split into the codes of the even ``k`` (low nibbles) and of the odd ``k`` (high
nibbles), each becoming ``(q - z) · s`` in fp32 with the scale and zero point of its group; they
meet the even and the odd columns of ``x`` in two ``tl.dot`` of ``BLOCK_K/2`` (interleaving the
nibbles back into one block would cost a layout shuffle and, byte by byte, twice the pointers and
registers: the first version spilled kilobytes per thread on sm_80). ``BLOCK_K`` and
``GROUP_SIZE`` are powers of two, so one divides the other: when ``BLOCK_K <= GROUP_SIZE`` the
block lies in one group and the scales and zeros are one ``[BLOCK_N]`` vector per block; otherwise
each ``k`` reads those of its own group (``k // GROUP_SIZE``). The product goes to ``tl.dot`` with
an fp32 accumulator: fp16/bf16 activations meet the weights rounded to their dtype (tensor cores,
as GPTQ/AWQ kernels do); fp32 activations meet fp32 weights, as IEEE fp32 or TF32 as torch allows
(``torch.set_float32_matmul_precision``); under the interpreter everything is fp32 (``DOT_IN_FP32``).
The bias is added in fp32 and the result stored in ``x``'s dtype.

On a GPU ``triton.autotune`` picks the GEMMs' block sizes, warps and stages among
:data:`INT8_GPU_CONFIGS` and :data:`INT4_GPU_CONFIGS`; under ``TRITON_INTERPRET=1`` (set before
Triton is imported) the blocks are fixed (:data:`INT8_INTERPRETER_BLOCKS`,
:data:`INT4_INTERPRETER_BLOCKS`) and the kernels run on CPU tensors, which is how the tests check
them. Every launcher raises :class:`~graphopt.ops.triton_runtime.NotLowerable` before launching for
inputs its kernel does not take (wrong dtypes or shapes, a group size or ``K`` that do not fit,
CPU tensors outside the interpreter).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from graphopt.ops.quant.reference import ACTIVATIONS
from graphopt.ops.triton_runtime import NotLowerable, interpreted

__all__ = [
    "DTYPES",
    "GROUP_SIZES",
    "INT4_GPU_CONFIGS",
    "INT4_INTERPRETER_BLOCKS",
    "INT8_GPU_CONFIGS",
    "INT8_INTERPRETER_BLOCKS",
    "autotuned_int4_kernel",
    "autotuned_int8_kernel",
    "int4_gemm_kernel",
    "int4_linear_triton",
    "int8_gemm_kernel",
    "int8_gemm_triton",
    "int8_linear_triton",
    "quantize_rows_kernel",
    "quantize_rows_triton",
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Activation and output dtypes the kernels take (they compute in fp32, which would lose fp64 precision)."""

GROUP_SIZES = (32, 64, 128)
"""Int4 group sizes the int4 kernel takes (those of the format, :mod:`graphopt.ops.quant.reference`)."""

QMAX = 127
"""Largest int8 code of the symmetric per-row activation quantization."""

MAX_BLOCK_SIZE = 4096
"""Columns one quantization program holds at a time; longer rows take several blocks per sweep."""

INT8_GPU_CONFIGS = (  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 128, 128, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 64, 128, 2, 5),
)
"""Tiles and launch options the int8 GEMM's autotuner times on a GPU: the matmul tutorial's, with
``BLOCK_K`` doubled (int8 takes a quarter of fp32's bytes), and 16-row tiles for decoding (small
``M``). No 128 x 256 tile and no 128 x 128 one on 4 warps: their int32 accumulator and epilogue
spill registers on sm_80 (the GPU compile test prints registers and spills)."""

INT4_GPU_CONFIGS = (  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 128, 64, 8, 3),
    (64, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 64, 64, 2, 5),
)
"""Tiles and launch options the int4 GEMM's autotuner times on a GPU (every ``BLOCK_K`` divides or
is a multiple of every group size). Tiles stay at 128 x 128: the dequantized weight blocks are
computed in registers and staged in shared memory in the dot's dtype, fp32 for fp32 activations."""

INT8_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
"""The int8 GEMM's blocks under the interpreter: the smallest ``tl.dot`` takes (K 32 for int8)."""

INT4_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}
"""The int4 GEMM's blocks under the interpreter. ``BLOCK_K`` 64 runs both group layouts of the K
loop: several groups per block (groups of 32) and one group over several blocks (64 and 128)."""

GPU_GROUP_M = 8
"""Tile rows per group of the grouped tile ordering on a GPU (the matmul tutorial's)."""

ROUNDING_MAGIC = tl.constexpr(12582912.0)
"""``1.5 · 2²³``: ``(v + ROUNDING_MAGIC) - ROUNDING_MAGIC`` rounds an fp32 ``|v| < 2²²`` half to even."""


# ---------------------------------------------------------------------------------------------
# The kernels.


@triton.jit
def quantize_rows_kernel(X, Q, Scale, x_row_stride, q_row_stride, n_cols, QMAX: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows * stride may exceed 2**31
    X += row * x_row_stride
    Q += row * q_row_stride
    # Sweep 1: max |x| of the row (exact in fp32), then its scale; an all-zero row gets 1.
    row_max = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(X + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        row_max = tl.maximum(row_max, tl.abs(x))
    scale = tl.math.div_rn(tl.max(row_max, axis=0), QMAX * 1.0)  # IEEE division, as torch's
    scale = tl.where(scale > 0.0, scale, 1.0)
    tl.store(Scale + row, scale)
    # Sweep 2: x / scale rounded half to even, clamped, stored as int8.
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        v = (v + ROUNDING_MAGIC) - ROUNDING_MAGIC  # round half to even (|v| <= 127 here)
        v = tl.minimum(tl.maximum(v, -QMAX * 1.0), QMAX * 1.0)
        tl.store(Q + cols, v.to(tl.int8), mask=mask)


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    """``y`` (fp32) through one of the reference's ``ACTIVATIONS``, chosen at compile time."""
    if ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(t) = 2σ(2t) - 1: no tanh in tl.math
    return y


@triton.jit
def _tile_of_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile ``(tile_m, tile_n)``: GROUP_M tile rows walked column by column
    (the matmul tutorial's grouped ordering), so that programs running together share operands in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_tile_m = group * GROUP_M
    group_size_m = tl.minimum(tiles_m - first_tile_m, GROUP_M)
    tile_m = first_tile_m + (pid % (GROUP_M * tiles_n)) % group_size_m
    tile_n = (pid % (GROUP_M * tiles_n)) // group_size_m
    return tile_m, tile_n


@triton.jit
def int8_gemm_kernel(
    A, B, AScale, BScale, Bias, C,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    tile_m, tile_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets: operands may exceed 2**31 elements
    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_in = rows < M
    col_in = cols < N
    ks = tl.arange(0, BLOCK_K)
    # K loop: int8 blocks of A [BLOCK_M, BLOCK_K] and of Bᵀ [BLOCK_K, BLOCK_N] (B is [N, K], read
    # transposed through its strides), zero-padded at the edges, multiplied into an int32 accumulator.
    a_ptrs = A + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = B + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_in[:, None] & (ks[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(ks[:, None] < k_left) & col_in[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    # Epilogue in fp32: per-row and per-column scales, bias, activation; stored in C's dtype.
    a_scale = tl.load(AScale + rows, mask=row_in, other=0.0)
    b_scale = tl.load(BScale + cols, mask=col_in, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        y += tl.load(Bias + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    y = _activation(y, ACTIVATION)
    c_ptrs = C + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def int4_gemm_kernel(
    X, W, Scale, Zero, Bias, Out,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    tile_m, tile_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_in = rows < M
    col_in = cols < N
    # Code k of row n is a nibble of byte k // 2 of the packed [N, K/2] weight: the low one for an
    # even k. Each byte is loaded once and split in two [BLOCK_K/2, BLOCK_N] blocks of codes (even
    # and odd k), which meet the even and odd columns of x in two dots.
    js = tl.arange(0, BLOCK_K // 2)
    x_ptrs = X + rows[:, None] * stride_xm + (2 * js)[None, :] * stride_xk  # x[:, 2j]; x[:, 2j + 1] is stride_xk further
    w_ptrs = W + js[:, None] * stride_wk + cols[None, :] * stride_wn
    s_ptrs = Scale + cols * stride_sn
    z_ptrs = Zero + cols * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        j_in = js < (K - k * BLOCK_K) // 2  # K is even: byte j holds codes 2j and 2j + 1, both in or both out
        x_mask = row_in[:, None] & j_in[None, :]
        x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptrs + stride_xk, mask=x_mask, other=0.0)
        packed = tl.load(w_ptrs, mask=j_in[:, None] & col_in[None, :], other=0).to(tl.int32)
        if BLOCK_K <= GROUP_SIZE:  # the block lies in one group: one scale and zero per column
            group = (k * BLOCK_K) // GROUP_SIZE
            s = tl.load(s_ptrs + group * stride_sg, mask=col_in, other=0.0)[None, :]
            z = tl.load(z_ptrs + group * stride_sg, mask=col_in, other=0.0)[None, :]
        else:  # several groups per block: codes 2j and 2j + 1 read those of their (common) group
            groups = ((k * BLOCK_K + 2 * js) // GROUP_SIZE)[:, None]
            sz_mask = j_in[:, None] & col_in[None, :]
            s = tl.load(s_ptrs[None, :] + groups * stride_sg, mask=sz_mask, other=0.0)
            z = tl.load(z_ptrs[None, :] + groups * stride_sg, mask=sz_mask, other=0.0)
        # The dequantized blocks of Wᵀ, (q - z) · s in fp32 as the reference computes them.
        w_even = ((packed & 0xF).to(tl.float32) - z) * s
        w_odd = ((packed >> 4).to(tl.float32) - z) * s
        if DOT_IN_FP32:
            x_even = x_even.to(tl.float32)
            x_odd = x_odd.to(tl.float32)
        else:  # fp16/bf16 activations: the tensor cores' dtype
            w_even = w_even.to(X.dtype.element_ty)
            w_odd = w_odd.to(X.dtype.element_ty)
        acc = tl.dot(x_even, w_even, acc, input_precision=INPUT_PRECISION)
        acc = tl.dot(x_odd, w_odd, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // 2) * stride_wk
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    out_ptrs = Out + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


# ---------------------------------------------------------------------------------------------
# Autotuning and launching.

INT8_AUTOTUNE_KEY = ["M", "N", "K", "HAS_BIAS", "ACTIVATION"]
"""What an int8 GEMM tuning is kept for (with the tensors' dtypes, which the autotuner adds)."""

INT4_AUTOTUNE_KEY = ["M", "N", "K", "GROUP_SIZE", "HAS_BIAS", "DOT_IN_FP32", "INPUT_PRECISION"]
"""What an int4 GEMM tuning is kept for (with the tensors' dtypes, which the autotuner adds)."""


def _gpu_configs(table: tuple[tuple[int, ...], ...]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GPU_GROUP_M}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in table
    ]


@functools.cache
def autotuned_int8_kernel() -> Any:
    """:func:`int8_gemm_kernel` wrapped in ``triton.autotune`` over :data:`INT8_GPU_CONFIGS` (built on first use: GPU launches only)."""
    return triton.autotune(configs=_gpu_configs(INT8_GPU_CONFIGS), key=INT8_AUTOTUNE_KEY)(int8_gemm_kernel)


@functools.cache
def autotuned_int4_kernel() -> Any:
    """:func:`int4_gemm_kernel` wrapped in ``triton.autotune`` over :data:`INT4_GPU_CONFIGS` (built on first use: GPU launches only)."""
    return triton.autotune(configs=_gpu_configs(INT4_GPU_CONFIGS), key=INT4_AUTOTUNE_KEY)(int4_gemm_kernel)


def _launch_gemm(kernel: Any, autotuned: Any, interpreter_blocks: dict[str, int], m: int, n: int, *args: Any, **constexprs: Any) -> None:
    """Launch a GEMM kernel over its output tiles: autotuned on a GPU, with the interpreter's fixed
    blocks under ``TRITON_INTERPRET=1``. The kernels are looked up here, at call time, so that a
    test can stand in for them."""
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if interpreted():
        kernel[grid](*args, **constexprs, **interpreter_blocks)
    else:
        autotuned()[grid](*args, **constexprs)


def _check_device(*tensors: Tensor | None) -> None:
    present = [t for t in tensors if t is not None]
    if len({t.device for t in present}) != 1:
        raise NotLowerable("inputs on several devices")
    if present[0].device.type != "cuda" and not interpreted():
        raise NotLowerable(f"{present[0].device.type} tensors: Triton kernels run on a GPU (or in the interpreter)")


def _check_vector(name: str, t: Tensor | None, length: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != length:
        raise NotLowerable(f"{name} must be a 1-D tensor of {length}, not {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if t.dtype not in dtypes:
        raise NotLowerable(f"{name} of dtype {t.dtype}: the kernel takes {', '.join(map(str, dtypes))}")


# ---------------------------------------------------------------------------------------------
# Launchers.


def quantize_rows_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization of ``x [M, K]`` (fp32, fp16 or bf16) with one launch of
    :func:`quantize_rows_kernel`: ``(q [M, K] int8, scale [M] fp32)``, ``x ≈ q · scale[:, None]``.

    Bit for bit :func:`~graphopt.ops.quant.reference.quantize_per_token` (``scale = max|x| / 127``,
    1 for an all-zero row; codes rounded half to even). Rows of any stride are read in place.
    Raises :class:`~graphopt.ops.triton_runtime.NotLowerable` before launching for inputs the kernel
    does not take.
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise NotLowerable(f"x of shape {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}: the kernel quantizes the rows of a 2-D tensor")
    if x.dtype not in DTYPES:
        raise NotLowerable(f"x of dtype {x.dtype}: the kernel takes one of {DTYPES}")
    rows, n_cols = x.shape
    if n_cols == 0 and rows:
        raise NotLowerable("rows of 0 columns have no maximum")
    _check_device(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((rows, n_cols), dtype=torch.int8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block_size = min(MAX_BLOCK_SIZE, triton.next_power_of_2(n_cols))
        num_warps = min(max(block_size // 256, 1), 8)
        quantize_rows_kernel[(rows,)](x, q, scale, x.stride(0), q.stride(0), n_cols, QMAX=QMAX, BLOCK_SIZE=block_size, num_warps=num_warps)
    return q, scale


def int8_gemm_triton(
    xq: Tensor,
    x_scale: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``activation(x_scale[:, None] · weight_scale · (xq · qweightᵀ) + bias)`` with one launch of
    :func:`int8_gemm_kernel`: the int8 product accumulated exactly in int32, the epilogue in fp32.

    ``xq [M, K]`` and ``qweight [N, K]`` int8 (any strides; the weight as stored, not transposed),
    ``x_scale [M]`` and ``weight_scale [N]`` fp32, ``bias [N]`` (fp32, fp16 or bf16) or None,
    ``activation`` one of :data:`~graphopt.ops.quant.reference.ACTIVATIONS`. Returns a new ``[M, N]``
    tensor of ``out_dtype`` (fp32, fp16 or bf16). Raises
    :class:`~graphopt.ops.triton_runtime.NotLowerable` before launching for inputs the kernel does not take.
    """
    for name, t in (("xq", xq), ("qweight", qweight)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype != torch.int8:
            raise NotLowerable(f"{name} must be a 2-D int8 tensor, not {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    (m, k), (n, k_w) = xq.shape, qweight.shape
    if k_w != k:
        raise NotLowerable(f"xq {tuple(xq.shape)} and qweight {tuple(qweight.shape)} differ in K")
    _check_vector("x_scale", x_scale, m, (torch.float32,))
    _check_vector("weight_scale", weight_scale, n, (torch.float32,))
    _check_vector("bias", bias, n, DTYPES)
    if activation not in ACTIVATIONS:
        raise NotLowerable(f"activation {activation!r}: the epilogue applies one of {', '.join(ACTIVATIONS)}")
    if out_dtype not in DTYPES:
        raise NotLowerable(f"out_dtype {out_dtype}: the kernel stores one of {DTYPES}")
    _check_device(xq, x_scale, qweight, weight_scale, bias)
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if out.numel() == 0:
        return out
    x_scale, weight_scale = x_scale.contiguous(), weight_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    _launch_gemm(
        int8_gemm_kernel, autotuned_int8_kernel, INT8_INTERPRETER_BLOCKS, m, n,
        xq, qweight, x_scale, weight_scale, x_scale if bias is None else bias, out,  # x_scale: an unread bias pointer
        m, n, k, *xq.stride(), *qweight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, ACTIVATION=activation,
    )  # fmt: skip
    return out


def int8_linear_triton(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None = None, activation: str = "none") -> Tensor:
    """Dynamic W8A8 linear ``x [..., K] -> [..., N]`` in ``x``'s dtype:
    :func:`~graphopt.ops.quant.reference.int8_linear_reference` without ``smooth`` or outliers.

    Two launches: :func:`quantize_rows_triton` on ``x`` viewed as ``[rows, K]``, then
    :func:`int8_gemm_triton` (``qweight [N, K]`` int8, ``weight_scale [N]`` fp32, ``bias [N]`` or
    None). The codes are the reference's, so the outputs differ from it by fp32 rounding of the
    epilogue only. Raises :class:`~graphopt.ops.triton_runtime.NotLowerable` before launching for
    inputs the kernels do not take.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise NotLowerable("x must be a tensor of at least one dimension")
    if not isinstance(qweight, Tensor) or qweight.dim() != 2 or qweight.shape[1] != x.shape[-1]:
        raise NotLowerable(f"x {tuple(x.shape)} and qweight {tuple(getattr(qweight, 'shape', ()))}: the weight must be [N, {x.shape[-1]}]")
    if qweight.dtype != torch.int8:  # refused before quantizing x, so nothing launches
        raise NotLowerable(f"qweight must be int8, not {qweight.dtype}")
    x2d = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_rows_triton(x2d)
    out = int8_gemm_triton(xq, x_scale, qweight, weight_scale, bias, activation, out_dtype=x.dtype)
    return out.view(*x.shape[:-1], qweight.shape[0])


def int4_linear_triton(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Tensor | None = None) -> Tensor:
    """Weight-only group-wise int4 linear ``x [..., K] -> [..., N]`` in ``x``'s dtype with one launch
    of :func:`int4_gemm_kernel`: :func:`~graphopt.ops.quant.reference.weight_only_linear_reference`
    with ``bits=4``.

    ``x`` fp32, fp16 or bf16 (any leading dims, merged into rows); ``packed [N, K/2]`` uint8 (the
    even ``k`` in the low nibble, :func:`~graphopt.ops.quant.reference.pack_int4`); ``scale`` and
    ``zero [N, K/group_size]`` fp32; ``group_size`` one of :data:`GROUP_SIZES`, dividing ``K``;
    ``bias [N]`` or None. Raises :class:`~graphopt.ops.triton_runtime.NotLowerable` before
    launching for inputs the kernel does not take.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise NotLowerable("x must be a tensor of at least one dimension")
    if x.dtype not in DTYPES:
        raise NotLowerable(f"x of dtype {x.dtype}: the kernel takes one of {DTYPES}")
    if group_size not in GROUP_SIZES:
        raise NotLowerable(f"group size {group_size}: the kernel takes {', '.join(map(str, GROUP_SIZES))}")
    k = x.shape[-1]
    if k % group_size:
        raise NotLowerable(f"int4 groups of {group_size} do not divide the input size {k}")
    if not isinstance(packed, Tensor) or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise NotLowerable(f"packed must be a 2-D uint8 tensor, not {getattr(packed, 'dtype', type(packed).__name__)} {tuple(getattr(packed, 'shape', ()))}")
    n = packed.shape[0]
    if packed.shape[1] * 2 != k:
        raise NotLowerable(f"packed {tuple(packed.shape)} holds {packed.shape[1] * 2} codes per row, not K={k}")
    for name, t in (("scale", scale), ("zero", zero)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (n, k // group_size) or t.dtype != torch.float32:
            raise NotLowerable(f"{name} must be fp32 [{n}, {k // group_size}], not {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    _check_vector("bias", bias, n, DTYPES)
    _check_device(x, packed, scale, zero, bias)
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if out.numel():
        if scale.stride() != zero.stride():  # the kernel reads both through one pair of strides
            scale, zero = scale.contiguous(), zero.contiguous()
        bias = None if bias is None else bias.contiguous()
        dot_in_fp32 = interpreted() or x.dtype == torch.float32
        precision = "ieee" if interpreted() or torch.get_float32_matmul_precision() == "highest" else "tf32"
        _launch_gemm(
            int4_gemm_kernel, autotuned_int4_kernel, INT4_INTERPRETER_BLOCKS, m, n,
            x2d, packed, scale, zero, scale if bias is None else bias, out,  # scale: an unread bias pointer
            m, n, k, *x2d.stride(), *packed.stride(), *scale.stride(), *out.stride(),
            GROUP_SIZE=group_size, HAS_BIAS=bias is not None, DOT_IN_FP32=dot_in_fp32, INPUT_PRECISION=precision,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
