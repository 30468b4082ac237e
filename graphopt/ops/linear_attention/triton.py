"""Linear-attention Triton kernels (one ``@triton.jit`` function per kernel, ``tl.constexpr`` variants) and their launcher.

What they compute is :func:`~graphopt.ops.linear_attention.reference.linear_attention_reference`
with a per-key weight ``w_j`` (1 without ``key_weights``, 0 at a pad)::

    out_i = Σ_j w_j (φq_i·φk_j) v_j / (Σ_j w_j (φq_i·φk_j) + eps)

over the keys ``j`` that query ``i`` sees: all of them, or ``j <= i`` when causal (top-left
aligned, as SDPA's ``is_causal``). The features ``φq``, ``φk`` come already mapped (non-negative).
The sum over keys is associative, so neither form builds the ``[L, S]`` score matrix.

**Bidirectional: two launches.**

1. :func:`linear_attention_state_kernel` reduces, per (batch, key head), the *state*
   ``KV = Σ_j w_j φk_jᵀ v_j`` ``[F, Dv]`` and ``z = Σ_j w_j φk_j`` ``[F]``, in fp32. One program
   owns a ``[BLOCK_F, BLOCK_DV]`` tile of ``KV`` and walks the keys in blocks of ``BLOCK_S``:
   the block of ``φkᵀ`` ``[BLOCK_F, BLOCK_S]`` (read transposed through its strides), its
   columns scaled by the keys' weights, meets the ``[BLOCK_S, BLOCK_DV]`` block of ``v`` in one
   ``tl.dot`` accumulated in fp32, a GEMM whose reduction runs along the sequence. Each program
   also sums the weighted keys into its slice of ``z`` (a row sum of the tile it already holds);
   those of the first ``Dv`` tile store it. The state is
   computed once per *key* head: with grouped-query attention the ``H / Hk`` query heads of a
   group read the same state.
2. :func:`linear_attention_output_kernel` gives each program ``BLOCK_L`` query rows and a
   ``BLOCK_DV`` slice of the output of one (batch, query head), and walks ``F`` in slices of
   ``BLOCK_F``: ``numerator += φq[:, f] @ KV[f, dv]`` (``tl.dot``) and
   ``denominator += φq[:, f] · z[f]``; then ``out = numerator / (denominator + eps)``.

**Causal: one launch, the chunked form** (:func:`causal_linear_attention_kernel`), as
flash-linear-attention's ``chunk`` linear attention (Yang et al., "Gated Linear Attention
Transformers with Hardware-Efficient Training", 2024) computes it. The sequence is cut into chunks
of ``CHUNK`` positions; for chunk ``c`` with the running state ``(S_prev, z_prev)`` of the chunks
before it::

    A   = (φq_c φk_cᵀ ⊙ w) ⊙ tril          [CHUNK, CHUNK], the diagonal kept (j <= i)
    out = (A v_c + φq_c S_prev) / (rowsum(A) + φq_c · z_prev + eps)
    S_prev += (w φk_c)ᵀ v_c,  z_prev += Σ_j w_j φk_j

so that the work is ``O(L · CHUNK · (F + Dv) + L · F · Dv)``, all of it ``tl.dot`` on tiles,
instead of a token-by-token recurrence. One program owns one (batch, query head) and a
``BLOCK_DV`` slice of ``Dv``, and walks the chunks in order with the state ``[F, BLOCK_DV]`` in
fp32 registers: chunks depend on each other only through the state, and carrying it in registers
writes nothing to memory between chunks, at the price of parallelism over (batch, head, Dv tile)
only (fla's alternative, materialising each chunk's state with a second kernel and computing the
chunks' outputs in parallel, pays that back on long sequences of few heads). ``F`` is held in
one block (``φq_c φk_cᵀ`` and ``φq_c S_prev`` reduce over it); the programs of a head's other
``Dv`` slices recompute ``A``. Rows past ``L`` are not stored and keys past ``S`` are zero, so
``L != S`` is the top-left aligned mask: a query past the last key sees them all.

**Common to the kernels.** ``tl.constexpr`` switches: ``HAS_WEIGHTS`` (``key_weights`` ``[B, S]``
read through its strides, applied to ``φk`` as it is loaded; without it nothing is read) and
``INPUT_PRECISION`` of the ``tl.dot`` on a GPU, ``"ieee"`` for fp32 inputs, ``"tf32"`` for
fp16/bf16 ones (the state is then rounded to TF32 when it meets ``φq``: about fp16's precision;
the interpreter computes in fp32). Inputs of any strides (the ``[B, L, H, D] -> [B, H, L, D]``
views of Hugging Face models) are read in place, cast to fp32 as they are loaded; the output is
stored in ``v``'s dtype. ``F`` and ``Dv`` are padded with masks to power-of-two blocks of at least
16 (what ``tl.dot`` takes) and of at most :data:`MAX_TILE` where the kernel tiles them; the ragged
tails of ``L`` and ``S`` are masked too (a masked key is a zero key: it adds nothing).

On a GPU ``triton.autotune`` picks each kernel's sequence block, warps and stages among
:data:`STATE_GPU_CONFIGS`, :data:`OUTPUT_GPU_CONFIGS` and :data:`CAUSAL_GPU_CONFIGS`; under
``TRITON_INTERPRET=1`` (set before Triton is imported) those blocks are
:data:`~graphopt.ops.flash_attention.INTERPRETER_BLOCK` and the kernels run on CPU tensors. The
launcher raises :class:`~graphopt.ops.triton_runtime.NotLowerable` before launching for inputs
the kernels do not take (fp64, ``F`` or ``Dv`` over :data:`MAX_HEAD_DIM`, shapes that do not fit).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from graphopt.ops.flash_attention import DTYPES, INTERPRETER_BLOCK, MAX_GRID_Y
from graphopt.ops.triton_runtime import NotLowerable, interpreted

__all__ = [
    "CAUSAL_GPU_CONFIGS",
    "MAX_HEAD_DIM",
    "MAX_TILE",
    "OUTPUT_GPU_CONFIGS",
    "STATE_GPU_CONFIGS",
    "autotuned_causal_kernel",
    "autotuned_output_kernel",
    "autotuned_state_kernel",
    "causal_linear_attention_kernel",
    "check_linear_attention_inputs",
    "linear_attention_output_kernel",
    "linear_attention_state_kernel",
    "linear_attention_triton",
]

MAX_HEAD_DIM = 256
"""Largest feature dim ``F`` and value dim ``Dv`` the kernels take (the causal kernel holds a
``[CHUNK, F]`` block of queries and of keys and an ``[F, BLOCK_DV]`` state in registers)."""

MAX_TILE = 64
"""Widest block of ``F`` (state and output kernels) and of ``Dv`` (all three) one program takes;
wider dims are split in tiles (``Dv``, over programs) or slices (``F``, over loop steps)."""

STATE_GPU_CONFIGS = ((32, 4, 3), (64, 4, 3), (64, 8, 4), (128, 8, 2))
"""(BLOCK_S, num_warps, num_stages) the state kernel's autotuner times on a GPU."""

OUTPUT_GPU_CONFIGS = ((32, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3))
"""(BLOCK_L, num_warps, num_stages) the output kernel's autotuner times on a GPU."""

CAUSAL_GPU_CONFIGS = ((64, 4, 2), (64, 8, 2), (32, 4, 2), (32, 8, 2))
"""(CHUNK, num_warps, num_stages) the causal kernel's autotuner times on a GPU: fla's chunk of 64,
and 32 for wide features (fewer registers for the ``[CHUNK, F]`` blocks). With ``F = Dv = 64`` in
fp16, chunks of 32 on 8 warps compile without spills (the GPU compile test prints registers and
spills); at ``F = 256`` every config spills some, chunks of 64 on 4 warps most."""


# ---------------------------------------------------------------------------------------------
# The kernels.


@triton.jit
def linear_attention_state_kernel(
    FK, V, Weights, KV, Z,
    k_stride_b, k_stride_h, k_stride_s, k_stride_f,
    v_stride_b, v_stride_h, v_stride_s, v_stride_d,
    w_stride_b, w_stride_s,
    HK, S, F, DV,
    HAS_WEIGHTS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # This program: the [BLOCK_F, BLOCK_DV] tile at (start_f, start_dv) of the state of key head h of batch b.
    start_f = tl.program_id(0) * BLOCK_F
    start_dv = tl.program_id(1) * BLOCK_DV
    batch_head = tl.program_id(2).to(tl.int64)  # 64-bit offsets: b * stride may exceed 2**31
    b = batch_head // HK
    h = batch_head % HK
    offs_f = start_f + tl.arange(0, BLOCK_F)
    offs_dv = start_dv + tl.arange(0, BLOCK_DV)
    offs_s = tl.arange(0, BLOCK_S)
    f_in = offs_f < F
    dv_in = offs_dv < DV
    # φkᵀ as a [BLOCK_F, BLOCK_S] tile and v as [BLOCK_S, BLOCK_DV], at key 0; the loop adds the key offset.
    kt_ptrs = FK + b * k_stride_b + h * k_stride_h + offs_f[:, None] * k_stride_f
    v_ptrs = V + b * v_stride_b + h * v_stride_h + offs_dv[None, :] * v_stride_d
    w_ptrs = Weights + b * w_stride_b

    kv = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_F], tl.float32)
    for start_s in range(0, S, BLOCK_S):
        keys = start_s + offs_s
        key_in = keys < S
        kt = tl.load(kt_ptrs + keys[None, :] * k_stride_s, mask=f_in[:, None] & key_in[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            kt = kt * tl.load(w_ptrs + keys * w_stride_s, mask=key_in, other=0.0).to(tl.float32)[None, :]
        v = tl.load(v_ptrs + keys[:, None] * v_stride_s, mask=key_in[:, None] & dv_in[None, :], other=0.0).to(tl.float32)
        kv = tl.dot(kt, v, kv, input_precision=INPUT_PRECISION)
        z += tl.sum(kt, 1)

    # The state is a contiguous fp32 [B, HK, F, DV] (z: [B, HK, F]) that the launcher allocates.
    kv_ptrs = KV + batch_head * F * DV + offs_f[:, None] * DV + offs_dv[None, :]
    tl.store(kv_ptrs, kv, mask=f_in[:, None] & dv_in[None, :])
    if start_dv == 0:  # every Dv tile summed the same z: the first stores it
        tl.store(Z + batch_head * F + offs_f, z, mask=f_in)


@triton.jit
def linear_attention_output_kernel(
    FQ, KV, Z, Out,
    q_stride_b, q_stride_h, q_stride_l, q_stride_f,
    o_stride_b, o_stride_h, o_stride_l, o_stride_d,
    H, KV_GROUP, L, F, DV, eps,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # This program: query rows [start_l, start_l + BLOCK_L), outputs [start_dv, start_dv + BLOCK_DV), of head h of batch b.
    start_l = tl.program_id(0) * BLOCK_L
    start_dv = tl.program_id(1) * BLOCK_DV
    batch_head = tl.program_id(2).to(tl.int64)
    b = batch_head // H
    h = batch_head % H
    state = b * (H // KV_GROUP) + h // KV_GROUP  # grouped-query attention: KV_GROUP query heads share a key head's state
    rows = start_l + tl.arange(0, BLOCK_L)
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = start_dv + tl.arange(0, BLOCK_DV)
    row_in = rows < L
    dv_in = offs_dv < DV
    q_ptrs = FQ + b * q_stride_b + h * q_stride_h + rows[:, None] * q_stride_l + offs_f[None, :] * q_stride_f
    kv_ptrs = KV + state * F * DV + offs_f[:, None] * DV + offs_dv[None, :]
    z_ptrs = Z + state * F + offs_f

    numerator = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    denominator = tl.zeros([BLOCK_L], tl.float32)
    for start_f in range(0, F, BLOCK_F):
        f_in = start_f + offs_f < F
        q = tl.load(q_ptrs + start_f * q_stride_f, mask=row_in[:, None] & f_in[None, :], other=0.0).to(tl.float32)
        kv = tl.load(kv_ptrs + start_f * DV, mask=f_in[:, None] & dv_in[None, :], other=0.0)
        z = tl.load(z_ptrs + start_f, mask=f_in, other=0.0)
        numerator = tl.dot(q, kv, numerator, input_precision=INPUT_PRECISION)
        denominator += tl.sum(q * z[None, :], 1)

    out = numerator / (denominator + eps)[:, None]
    o_ptrs = Out + b * o_stride_b + h * o_stride_h + rows[:, None] * o_stride_l + offs_dv[None, :] * o_stride_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & dv_in[None, :])


@triton.jit
def causal_linear_attention_kernel(
    FQ, FK, V, Weights, Out,
    q_stride_b, q_stride_h, q_stride_l, q_stride_f,
    k_stride_b, k_stride_h, k_stride_s, k_stride_f,
    v_stride_b, v_stride_h, v_stride_s, v_stride_d,
    w_stride_b, w_stride_s,
    o_stride_b, o_stride_h, o_stride_l, o_stride_d,
    H, KV_GROUP, L, S, F, DV, eps,
    HAS_WEIGHTS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # This program: outputs [start_dv, start_dv + BLOCK_DV) of every row of head h of batch b, chunk after chunk.
    start_dv = tl.program_id(0) * BLOCK_DV
    batch_head = tl.program_id(1).to(tl.int64)
    b = batch_head // H
    h = batch_head % H
    h_kv = h // KV_GROUP
    offs_c = tl.arange(0, CHUNK)
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = start_dv + tl.arange(0, BLOCK_DV)
    f_in = offs_f < F
    dv_in = offs_dv < DV
    # Chunk tiles at position 0: φq and φk [CHUNK, BLOCK_F], v and the output [CHUNK, BLOCK_DV]; the loop adds the position.
    q_ptrs = FQ + b * q_stride_b + h * q_stride_h + offs_f[None, :] * q_stride_f
    k_ptrs = FK + b * k_stride_b + h_kv * k_stride_h + offs_f[None, :] * k_stride_f
    v_ptrs = V + b * v_stride_b + h_kv * v_stride_h + offs_dv[None, :] * v_stride_d
    o_ptrs = Out + b * o_stride_b + h * o_stride_h + offs_dv[None, :] * o_stride_d
    w_ptrs = Weights + b * w_stride_b
    lower = offs_c[:, None] >= offs_c[None, :]  # inside a chunk, query i sees key j iff j <= i

    # The running state of the chunks already walked: Σ w_j φk_jᵀ v_j and Σ w_j φk_j, in fp32.
    kv = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_F], tl.float32)
    for start in range(0, L, CHUNK):  # keys at L or later are seen by no query
        pos = start + offs_c
        row_in = pos < L
        key_in = pos < S  # keys past S are zero: rows past S see every key through the state
        q = tl.load(q_ptrs + pos[:, None] * q_stride_l, mask=row_in[:, None] & f_in[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptrs + pos[:, None] * k_stride_s, mask=key_in[:, None] & f_in[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            k = k * tl.load(w_ptrs + pos * w_stride_s, mask=key_in, other=0.0).to(tl.float32)[:, None]
        v = tl.load(v_ptrs + pos[:, None] * v_stride_s, mask=key_in[:, None] & dv_in[None, :], other=0.0).to(tl.float32)
        # Intra-chunk: the weighted scores, causal inside the chunk; inter-chunk: the earlier chunks' state.
        a = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        a = tl.where(lower, a, 0.0)
        numerator = tl.dot(q, kv, input_precision=INPUT_PRECISION)
        numerator = tl.dot(a, v, numerator, input_precision=INPUT_PRECISION)
        denominator = tl.sum(a, 1) + tl.sum(q * z[None, :], 1)
        out = numerator / (denominator + eps)[:, None]
        tl.store(o_ptrs + pos[:, None] * o_stride_l, out.to(Out.dtype.element_ty), mask=row_in[:, None] & dv_in[None, :])
        # Fold this chunk's keys into the state for the chunks after it.
        kv = tl.dot(tl.trans(k), v, kv, input_precision=INPUT_PRECISION)
        z += tl.sum(k, 0)


# ---------------------------------------------------------------------------------------------
# Autotuning and launching.

STATE_AUTOTUNE_KEY = ["S", "F", "DV", "HAS_WEIGHTS", "INPUT_PRECISION"]
OUTPUT_AUTOTUNE_KEY = ["L", "F", "DV", "INPUT_PRECISION"]
CAUSAL_AUTOTUNE_KEY = ["L", "S", "F", "DV", "HAS_WEIGHTS", "INPUT_PRECISION"]
"""What a tuning is kept for, per kernel (with the tensors' dtypes, which the autotuner adds)."""


def _gpu_configs(block: str, table: tuple[tuple[int, int, int], ...]) -> list[triton.Config]:
    return [triton.Config({block: size}, num_warps=warps, num_stages=stages) for size, warps, stages in table]


@functools.cache
def autotuned_state_kernel() -> Any:
    """:func:`linear_attention_state_kernel` wrapped in ``triton.autotune`` over :data:`STATE_GPU_CONFIGS` (built on first use: GPU launches only)."""
    return triton.autotune(configs=_gpu_configs("BLOCK_S", STATE_GPU_CONFIGS), key=STATE_AUTOTUNE_KEY)(linear_attention_state_kernel)


@functools.cache
def autotuned_output_kernel() -> Any:
    """:func:`linear_attention_output_kernel` wrapped in ``triton.autotune`` over :data:`OUTPUT_GPU_CONFIGS`."""
    return triton.autotune(configs=_gpu_configs("BLOCK_L", OUTPUT_GPU_CONFIGS), key=OUTPUT_AUTOTUNE_KEY)(linear_attention_output_kernel)


@functools.cache
def autotuned_causal_kernel() -> Any:
    """:func:`causal_linear_attention_kernel` wrapped in ``triton.autotune`` over :data:`CAUSAL_GPU_CONFIGS`."""
    return triton.autotune(configs=_gpu_configs("CHUNK", CAUSAL_GPU_CONFIGS), key=CAUSAL_AUTOTUNE_KEY)(causal_linear_attention_kernel)


def _launch(kernel: Any, autotuned: Any, interpreter_blocks: dict[str, int], grid: Any, *args: Any, **constexprs: Any) -> None:
    """Launch a kernel: autotuned on a GPU, with the interpreter's fixed blocks under
    ``TRITON_INTERPRET=1``. The launcher passes the kernel as it finds it at call time, so that a
    test can stand in for it."""
    if interpreted():
        kernel[grid](*args, **constexprs, **interpreter_blocks)
    else:
        autotuned()[grid](*args, **constexprs)


def _block_width(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _describe(t: Any) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def check_linear_attention_inputs(fq: Tensor, fk: Tensor, v: Tensor, key_weights: Tensor | None = None, eps: float = 1e-6) -> None:
    """Raise :class:`~graphopt.ops.triton_runtime.NotLowerable` for inputs :func:`linear_attention_triton` does not take."""
    for name, t in (("fq", fq), ("fk", fk), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise NotLowerable(f"{name} is {_describe(t)}: the kernels take 4-D [B, H, L, ·] features and values")
        if t.dtype not in DTYPES:
            raise NotLowerable(f"{name} of dtype {t.dtype}: the kernels take one of {DTYPES} (they compute in fp32)")
    (batch, heads, _, features), (_, kv_heads, length_k, _) = fq.shape, fk.shape
    if fk.shape[0] != batch or fk.shape[3] != features or tuple(v.shape[:3]) != tuple(fk.shape[:3]):
        raise NotLowerable(f"fq {tuple(fq.shape)}, fk {tuple(fk.shape)}, v {tuple(v.shape)} do not fit together")
    if kv_heads == 0 or heads % kv_heads:
        raise NotLowerable(f"{kv_heads} key heads do not divide {heads} query heads")
    if key_weights is not None:
        if not isinstance(key_weights, Tensor) or tuple(key_weights.shape) != (batch, length_k) or key_weights.dtype not in DTYPES:
            raise NotLowerable(f"key_weights is {_describe(key_weights)}: the kernels take a [{batch}, {length_k}] tensor of one of {DTYPES}")
    if features == 0:
        raise NotLowerable("feature dim 0")
    if features > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        raise NotLowerable(f"feature dim {features}, value dim {v.shape[3]}: the kernels take at most {MAX_HEAD_DIM}")
    if not math.isfinite(eps):
        raise NotLowerable(f"eps={eps}")
    if batch * heads > MAX_GRID_Y:
        raise NotLowerable(f"{batch * heads} (batch, head) pairs exceed the grid's {MAX_GRID_Y}")
    tensors = [t for t in (fq, fk, v, key_weights) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise NotLowerable("inputs on several devices")
    if fq.device.type != "cuda" and not interpreted():
        raise NotLowerable(f"{fq.device.type} tensors: Triton kernels run on a GPU (or in the interpreter)")


def linear_attention_triton(fq: Tensor, fk: Tensor, v: Tensor, key_weights: Tensor | None = None, is_causal: bool = False, eps: float = 1e-6) -> Tensor:
    """``out_i = Σ_j w_j (φq_i·φk_j) v_j / (Σ_j w_j (φq_i·φk_j) + eps)`` with Triton kernels: two
    launches bidirectional (:func:`linear_attention_state_kernel`, then
    :func:`linear_attention_output_kernel`), one causal (:func:`causal_linear_attention_kernel`).

    ``fq`` ``[B, H, L, F]``, ``fk`` ``[B, Hk, S, F]``, ``v`` ``[B, Hk, S, Dv]`` (fp32, fp16 or
    bf16, any strides; ``Hk`` divides ``H``; ``F``, ``Dv`` at most :data:`MAX_HEAD_DIM`).
    ``key_weights``: None (every weight 1) or ``[B, S]`` (any strides), the factor of key ``j``
    in every head, e.g. 0 at a pad; the result equals
    :func:`~graphopt.ops.linear_attention.reference.linear_attention_reference` with
    ``attn_mask = key_weights.log()[:, None, None, :]``. ``is_causal``: query ``i`` sees keys
    ``j <= i`` (top-left aligned). Returns a new contiguous ``[B, H, L, Dv]`` tensor in ``v``'s
    dtype. Raises :class:`~graphopt.ops.triton_runtime.NotLowerable` before launching for inputs
    the kernels do not take.
    """
    check_linear_attention_inputs(fq, fk, v, key_weights, eps)
    batch, heads, length_q, features = fq.shape
    _, kv_heads, length_k, dv = v.shape
    out = torch.empty((batch, heads, length_q, dv), dtype=v.dtype, device=v.device)
    if out.numel() == 0:
        return out
    has_weights = key_weights is not None
    weights, weight_strides = (key_weights, key_weights.stride()) if has_weights else (fq, (0, 0))  # fq: an unread placeholder pointer
    precision = "ieee" if fq.dtype == fk.dtype == v.dtype == torch.float32 else "tf32"
    block_dv = min(_block_width(dv), MAX_TILE)
    dv_tiles = triton.cdiv(dv, block_dv)
    if is_causal:
        _launch(
            causal_linear_attention_kernel, autotuned_causal_kernel, {"CHUNK": INTERPRETER_BLOCK}, (dv_tiles, batch * heads),
            fq, fk, v, weights, out,
            *fq.stride(), *fk.stride(), *v.stride(), *weight_strides, *out.stride(),
            heads, heads // kv_heads, length_q, length_k, features, dv, float(eps),
            HAS_WEIGHTS=has_weights, INPUT_PRECISION=precision, BLOCK_F=_block_width(features), BLOCK_DV=block_dv,
        )  # fmt: skip
        return out
    block_f = min(_block_width(features), MAX_TILE)
    kv = torch.empty((batch, kv_heads, features, dv), dtype=torch.float32, device=v.device)
    z = torch.empty((batch, kv_heads, features), dtype=torch.float32, device=v.device)
    _launch(
        linear_attention_state_kernel, autotuned_state_kernel, {"BLOCK_S": INTERPRETER_BLOCK},
        (triton.cdiv(features, block_f), dv_tiles, batch * kv_heads),
        fk, v, weights, kv, z,
        *fk.stride(), *v.stride(), *weight_strides,
        kv_heads, length_k, features, dv,
        HAS_WEIGHTS=has_weights, INPUT_PRECISION=precision, BLOCK_F=block_f, BLOCK_DV=block_dv,
    )  # fmt: skip
    _launch(
        linear_attention_output_kernel, autotuned_output_kernel, {"BLOCK_L": INTERPRETER_BLOCK},
        lambda meta: (triton.cdiv(length_q, meta["BLOCK_L"]), dv_tiles, batch * heads),
        fq, kv, z, out,
        *fq.stride(), *out.stride(),
        heads, heads // kv_heads, length_q, features, dv, float(eps),
        INPUT_PRECISION=precision, BLOCK_F=block_f, BLOCK_DV=block_dv,
    )  # fmt: skip
    return out
