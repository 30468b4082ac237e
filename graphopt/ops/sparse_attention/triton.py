"""Block-sparse FlashAttention forward: one ``@triton.jit`` kernel for window + global and block-layout attention.

The kernel follows :mod:`graphopt.ops.flash_attention.triton` (FlashAttention, Dao et al. 2022):
one program owns ``BLOCK_M`` query rows of one (batch, head), scales them once, and folds key
blocks of ``BLOCK_N`` into an online softmax (running maximum ``m_i``, running sum ``l_i``, fp32
accumulator rescaled by ``exp(m_old − m_new)``). What is sparse (Child et al. 2019; Longformer,
Beltagy et al. 2020; BigBird, Zaheer et al. 2020) is *which* key blocks it visits: the launcher
lists, for each query block (per head when the pattern is per head), the key blocks where the
pattern keeps at least one pair, as a CSR list (``RowPtr[r] .. RowPtr[r + 1]`` index ``ColIdx``),
and the program walks that list only. Work is the listed blocks, ``O(L · window)`` for a window.

Inside a visited block the pattern is applied elementwise (``STRUCTURE``):

* ``"window"``: ``−left <= j − i <= right`` (``left = window − 1, right = 0`` causal,
  ``left = right = window // 2`` bidirectional: :func:`~graphopt.ops.linear_attention.reference.window_keep`;
  causal when ``is_causal`` or when the mask hides every later key, :func:`~graphopt.ops.sparse_attention.reference.window_is_causal`),
  or ``j < G`` or ``i < G`` (``G`` global tokens);
* ``"layout"``: ``Layout[h, i // LB, j // LB]`` read through its strides (``LB`` the layout's block
  size, any value: the kernel's blocks need not match it).

``CAUSAL``, ``MASK_KIND`` (SDPA's ``attn_mask``, bool or additive, through its strides),
``VARLEN`` (packed ``[T, H, D]`` sequences from ``cu_seqlens``, the window counted from each
sequence's first token; the list built for the longest sequence serves every one, since the
window pattern is the same from every sequence's start) and ``INPUT_PRECISION`` are the flash
kernel's. A row that keeps no key gives zeros. The CSR list depends on the kernel's block sizes,
so they are not autotuned: ``BLOCK_M = BLOCK_N =`` :data:`GPU_BLOCK` on a GPU (warps and stages
fixed too), :data:`~graphopt.ops.flash_attention.INTERPRETER_BLOCK` under ``TRITON_INTERPRET=1``.
The launchers raise :class:`~graphopt.ops.flash_attention.NotLowerable` before launching for inputs
the kernel does not take.
"""

from __future__ import annotations

import inspect
import math
import textwrap

import torch
import triton
import triton.language as tl

from graphopt.ops.flash_attention import DTYPES, INTERPRETER_BLOCK, MAX_GRID_Y, NotLowerable, interpreted
from graphopt.ops.sparse_attention.reference import check_layout, window_is_causal

__all__ = [
    "GPU_BLOCK",
    "GPU_OPTIONS",
    "block_sparse_attention_triton",
    "kernel_source",
    "sparse_attention_kernel",
    "varlen_window_attention_triton",
    "window_attention_triton",
]

GPU_BLOCK = 64
"""BLOCK_M and BLOCK_N on a GPU (the key-block lists are built for them)."""

GPU_OPTIONS = {"num_warps": 4, "num_stages": 2}
"""Launch options on a GPU."""


@triton.jit
def sparse_attention_kernel(
    Q, K, V, Out, Mask, CuSeqlens, RowPtr, ColIdx, Layout,
    q_stride_b, q_stride_h, q_stride_m, q_stride_d,
    k_stride_b, k_stride_h, k_stride_n, k_stride_d,
    v_stride_b, v_stride_h, v_stride_n, v_stride_d,
    o_stride_b, o_stride_h, o_stride_m, o_stride_d,
    mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n,
    layout_stride_h, layout_stride_m, layout_stride_n,
    H, KV_GROUP, Lq, Lk, D, DV, scale,
    window_left, window_right, global_tokens, layout_block, list_rows_per_head,
    STRUCTURE: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    query_block = tl.program_id(0)
    start_m = query_block * BLOCK_M
    batch_head = tl.program_id(1).to(tl.int64)
    b = batch_head // H
    h = batch_head % H
    h_kv = h // KV_GROUP
    if VARLEN:
        seq_start = tl.load(CuSeqlens + b)
        Lq = (tl.load(CuSeqlens + b + 1) - seq_start).to(tl.int32)
        Lk = Lq
        if start_m >= Lq:
            return
        b = seq_start  # the batch strides are the token strides

    rows = start_m + tl.arange(0, BLOCK_M)
    row_in = rows < Lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * q_stride_b + h * q_stride_h + rows[:, None] * q_stride_m + offs_d[None, :] * q_stride_d
    q = tl.load(q_ptrs, mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * scale
    kt_ptrs = K + b * k_stride_b + h_kv * k_stride_h + offs_d[:, None] * k_stride_d
    v_ptrs = V + b * v_stride_b + h_kv * v_stride_h + offs_dv[None, :] * v_stride_d
    mask_ptrs = Mask + b * mask_stride_b + h * mask_stride_h + rows[:, None] * mask_stride_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # This query block's key blocks: entries RowPtr[r] .. RowPtr[r + 1] of ColIdx (r counts per head
    # when the pattern is per head: list_rows_per_head is then the number of query blocks, else 0).
    list_row = h * list_rows_per_head + query_block
    first = tl.load(RowPtr + list_row)
    last = tl.load(RowPtr + list_row + 1)
    for entry in range(first, last):
        start_n = tl.load(ColIdx + entry) * BLOCK_N
        cols = start_n + offs_n
        col_in = cols < Lk
        kt = tl.load(kt_ptrs + cols[None, :] * k_stride_n, mask=(offs_d[:, None] < D) & col_in[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        keep = col_in[None, :] & row_in[:, None]
        if STRUCTURE == "window":
            offset = cols[None, :] - rows[:, None]
            in_window = (offset >= -window_left) & (offset <= window_right)
            keep = keep & (in_window | (cols[None, :] < global_tokens) | (rows[:, None] < global_tokens))
        if STRUCTURE == "layout":
            layout_ptrs = Layout + h * layout_stride_h + (rows // layout_block)[:, None] * layout_stride_m + (cols // layout_block)[None, :] * layout_stride_n
            keep = keep & (tl.load(layout_ptrs, mask=keep, other=0) != 0)
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        if MASK_KIND == "bool":
            mask_in = row_in[:, None] & col_in[None, :]
            keep = keep & (tl.load(mask_ptrs + cols[None, :] * mask_stride_n, mask=mask_in, other=0) != 0)
        if MASK_KIND == "additive":
            mask_in = row_in[:, None] & col_in[None, :]
            s += tl.load(mask_ptrs + cols[None, :] * mask_stride_n, mask=mask_in, other=0.0).to(tl.float32)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has no kept key m_new is -inf: shift by 0 instead, so exp gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + cols[:, None] * v_stride_n, mask=col_in[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b * o_stride_b + h * o_stride_h + rows[:, None] * o_stride_m + offs_dv[None, :] * o_stride_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & (offs_dv[None, :] < DV))


_KERNEL_FUNCTION = sparse_attention_kernel.fn


def kernel_source() -> str:
    """The kernel's Python source, ``@triton.jit`` line included."""
    source = textwrap.dedent(inspect.getsource(_KERNEL_FUNCTION))
    return source[source.index("@triton.jit") :]


def kernel_block() -> int:
    """BLOCK_M = BLOCK_N of the launches in this process."""
    return INTERPRETER_BLOCK if interpreted() else GPU_BLOCK


def _block_width(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _input_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# The key-block lists.


def window_block_layout(
    length_q: int, length_k: int, window: int, global_tokens: int, is_causal: bool, block: int, device=None, causal_window: bool | None = None
) -> torch.Tensor:
    """``[nq, nk]`` bool over kernel blocks of ``block``: True where the window pattern keeps some pair of the two blocks
    (the window causal when ``is_causal`` or ``causal_window``)."""
    left, right = (window - 1, 0) if is_causal or causal_window else (window // 2, window // 2)
    r0 = torch.arange(0, length_q, block, device=device)[:, None]
    c0 = torch.arange(0, length_k, block, device=device)[None, :]
    r1 = torch.clamp(r0 + block - 1, max=length_q - 1)
    c1 = torch.clamp(c0 + block - 1, max=length_k - 1)
    # the blocks' offsets j - i span [c0 - r1, c1 - r0]; the window keeps [-left, right]
    keep = ((c0 - r1) <= right) & ((c1 - r0) >= -left)
    keep = keep | (c0 < global_tokens) | (r0 < global_tokens)
    return keep & (c0 <= r1) if is_causal else keep


def coarse_layout(layout: torch.Tensor, layout_block: int, length_q: int, length_k: int, block: int, is_causal: bool) -> torch.Tensor:
    """A token-block ``layout`` (``[Hl, nq, nk]``, blocks of ``layout_block``) on kernel blocks of
    ``block``: True where some layout cell under the kernel block is True (2-D prefix sums)."""
    counts = torch.nn.functional.pad(layout.to(torch.int32).cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # counts[.., a, b]: cells above-left of (a, b)
    r0 = torch.arange(0, length_q, block, device=layout.device)
    c0 = torch.arange(0, length_k, block, device=layout.device)
    a0, a1 = r0 // layout_block, (torch.clamp(r0 + block, max=length_q) - 1) // layout_block + 1
    b0, b1 = c0 // layout_block, (torch.clamp(c0 + block, max=length_k) - 1) // layout_block + 1
    inside = (
        counts[..., a1[:, None], b1[None, :]]
        - counts[..., a0[:, None], b1[None, :]]
        - counts[..., a1[:, None], b0[None, :]]
        + counts[..., a0[:, None], b0[None, :]]
    )
    keep = inside > 0
    return keep & (c0[None, :] <= torch.clamp(r0 + block - 1, max=length_q - 1)[:, None]) if is_causal else keep


def block_lists(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RowPtr, ColIdx)``, int32, of a ``[.., nq, nk]`` bool block mask (rows in row-major order)."""
    rows = keep.reshape(-1, keep.shape[-1])
    row_ptr = torch.nn.functional.pad(rows.sum(-1).cumsum(0), (1, 0)).to(torch.int32)
    col_idx = torch.nonzero(rows, as_tuple=True)[1].to(torch.int32)
    return row_ptr, col_idx


# ---------------------------------------------------------------------------------------------
# Launchers.


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, rank: int) -> None:
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        raise NotLowerable(f"ranks {q.dim()}, {k.dim()}, {v.dim()}: the kernel takes {rank}-D query, key and value")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NotLowerable(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernel takes one of {DTYPES} for all three")
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise NotLowerable(f"attn_mask of dtype {attn_mask.dtype} for a {q.dtype} query")
    heads, kv_heads = q.shape[-3 if rank == 4 else 1], k.shape[-3 if rank == 4 else 1]
    if kv_heads == 0 or heads % kv_heads or k.shape[-1] != q.shape[-1] or v.shape[:-1] != k.shape[:-1] or q.shape[0] != k.shape[0]:
        raise NotLowerable(f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} do not fit together")
    if q.shape[-1] == 0:
        raise NotLowerable("head dim 0")
    if q.device.type != "cuda" and not interpreted():
        raise NotLowerable(f"{q.device.type} tensors: Triton kernels run on a GPU (or in the interpreter)")


def _launch(grid_rows: int, grid_pairs: int, *args, **constexprs) -> None:
    if grid_pairs > MAX_GRID_Y:
        raise NotLowerable(f"{grid_pairs} (batch, head) pairs exceed the grid's {MAX_GRID_Y}")
    block = kernel_block()
    grid = (triton.cdiv(grid_rows, block), grid_pairs)
    options = {} if interpreted() else GPU_OPTIONS
    sparse_attention_kernel[grid](*args, **constexprs, BLOCK_M=block, BLOCK_N=block, **options)


def _padded(q, k, v, attn_mask, keep_blocks, structure, structure_args, layout, layout_block, is_causal, scale):
    """One launch over ``[B, H, L, ·]`` tensors with the key-block lists of ``keep_blocks`` (``[Hl, nq, nk]``)."""
    batch, heads, length_q, d = q.shape
    kv_heads, length_k, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((batch, heads, length_q, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    row_ptr, col_idx = block_lists(keep_blocks)
    mask_kind, mask4, mask_strides = "none", q, [0, 0, 0, 0]
    if attn_mask is not None:
        mask_kind = "bool" if attn_mask.dtype == torch.bool else "additive"
        mask4 = attn_mask.expand(batch, heads, length_q, length_k)
        mask_strides = list(mask4.stride())
    layout_strides = [0, 0, 0] if layout is None else [layout.stride(0) if layout.shape[0] > 1 else 0, layout.stride(1), layout.stride(2)]
    _launch(
        length_q, batch * heads,
        q, k, v, out, mask4, row_ptr, row_ptr, col_idx, q if layout is None else layout,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides, *layout_strides,
        heads, heads // kv_heads, length_q, length_k, d, dv, 1 / math.sqrt(d) if scale is None else scale,
        *structure_args, layout_block, keep_blocks.shape[-2] if keep_blocks.shape[0] > 1 else 0,
        STRUCTURE=structure, CAUSAL=bool(is_causal), MASK_KIND=mask_kind, VARLEN=False, INPUT_PRECISION=_input_precision(q.dtype),
        BLOCK_D=_block_width(d), BLOCK_DV=_block_width(dv),
    )  # fmt: skip
    return out


def _check_window(window: int, global_tokens: int) -> None:
    if window < 1 or global_tokens < 0:
        raise NotLowerable(f"window={window}, global_tokens={global_tokens}")


def window_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    global_tokens: int,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """``graphopt::window_attention`` with one launch: the key-block lists of the window pattern."""
    _check(q, k, v, attn_mask, 4)
    _check_window(window, global_tokens)
    causal_window = window_is_causal(attn_mask, is_causal, q.shape[2], k.shape[2])
    left, right = (window - 1, 0) if causal_window else (window // 2, window // 2)
    keep = window_block_layout(q.shape[2], k.shape[2], window, global_tokens, is_causal, kernel_block(), q.device, causal_window)[None]
    return _padded(q, k, v, attn_mask, keep, "window", (left, right, global_tokens), None, 1, is_causal, scale)


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """``graphopt::block_sparse_attention`` with one launch: the key-block lists of ``layout``."""
    _check(q, k, v, attn_mask, 4)
    try:
        check_layout(layout, block_size, q.shape[1], q.shape[2], k.shape[2])
    except ValueError as e:
        raise NotLowerable(str(e)) from None
    layout3 = layout.to(device=q.device, dtype=torch.bool).reshape(-1, *layout.shape[-2:])
    keep = coarse_layout(layout3, block_size, q.shape[2], k.shape[2], kernel_block(), is_causal)
    return _padded(q, k, v, attn_mask, keep, "layout", (0, 0, 0), layout3.to(torch.uint8), block_size, is_causal, scale)


def varlen_window_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, window: int, global_tokens: int, scale: float | None = None
) -> torch.Tensor:
    """``graphopt::varlen_window_attention`` with one launch over packed ``[T, H, ·]`` sequences."""
    _check(q, k, v, None, 3)
    _check_window(window, global_tokens)
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int64 or len(cu_seqlens) == 0:
        raise NotLowerable(f"cu_seqlens must be int64 [B + 1], not {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    total_tokens, heads, d = q.shape
    kv_heads, dv, sequences = k.shape[1], v.shape[2], len(cu_seqlens) - 1
    out = torch.empty((total_tokens, heads, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or sequences == 0:
        return out
    longest = int(cu_seqlens.diff().max())
    if longest <= 0:
        return out
    left, right = window // 2, window // 2
    keep = window_block_layout(longest, longest, window, global_tokens, False, kernel_block(), q.device)[None]
    row_ptr, col_idx = block_lists(keep)
    strides = [(t.stride(0), t.stride(1), t.stride(0), t.stride(2)) for t in (q, k, v, out)]
    length_key = triton.next_power_of_2(longest)
    _launch(
        longest, sequences * heads,
        q, k, v, out, q, cu_seqlens, row_ptr, col_idx, q,
        *strides[0], *strides[1], *strides[2], *strides[3], 0, 0, 0, 0, 0, 0, 0,
        heads, heads // kv_heads, length_key, length_key, d, dv, 1 / math.sqrt(d) if scale is None else scale,
        left, right, global_tokens, 1, 0,
        STRUCTURE="window", CAUSAL=False, MASK_KIND="none", VARLEN=True, INPUT_PRECISION=_input_precision(q.dtype),
        BLOCK_D=_block_width(d), BLOCK_DV=_block_width(dv),
    )  # fmt: skip
    return out
