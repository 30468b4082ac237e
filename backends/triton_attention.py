"""Fused attention forward for ``aten.scaled_dot_product_attention``: one generated Triton kernel.

The method is FlashAttention's (Dao et al. 2022; the fused-attention tutorial of Triton, forward
only): ``softmax(Q Kᵀ · scale + bias) V`` is computed without ever holding the ``[Lq, Lk]`` score
matrix. One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the keys in blocks
of ``BLOCK_N``; for each block it computes the scores ``S = (Q · scale) Kᵀ``, applies the masks,
and folds the block into an *online softmax*: a running row maximum ``m_i``, a running sum of
exponentials ``l_i`` and an fp32 accumulator of ``exp(S - m_i) V``, the older terms rescaled by
``exp(m_old - m_new)`` whenever the maximum grows. The last step divides by ``l_i``.

Variants, generated into the source by :func:`attention_source` (only the lines a variant needs):

* ``causal``: ATen's ``is_causal=True`` keeps key ``j`` for query ``i`` iff ``j <= i``, aligned at
  the top-left corner also when ``Lq != Lk`` (what ``torch.ones(Lq, Lk).tril()`` keeps). Key blocks
  entirely above the diagonal are never visited (the loop stops at the query block's last row);
  the visited blocks are masked elementwise, which only changes the ones on the diagonal.
* ``mask="bool"``: ``attn_mask`` False means "do not attend" (score ``-inf``).
* ``mask="additive"``: a float ``attn_mask`` is added to the scaled scores.

Masks may be of any shape broadcastable to ``[B, H, Lq, Lk]`` and are read through their strides,
0 along broadcast dimensions (BERT's ``[B, 1, 1, Lk]`` padding mask is never expanded in memory).
Query, key and value of any strides (the ``[B, L, H, D] -> [B, H, L, D]`` transposed views of Hugging
Face models) are also read in place. 3-D inputs ``[N, L, D]`` run as ``[N, 1, L, D]``; with
``enable_gqa`` each group of ``Hq / Hkv`` query heads reads one key/value head. The head dims ``D``
(query/key) and ``Dv`` (value) are padded to powers of two (at least 16, which ``tl.dot`` needs)
as ``tl.constexpr`` block widths, with masks; ragged tails of ``Lq`` and ``Lk`` are masked too.

**Fully masked rows.** A row whose every key is masked (all False, or all ``-inf``) has no softmax;
ATen's CPU SDPA returns zeros for it (not NaN, unlike the explicit ``softmax(...) @ V``), and so
does this kernel: its running maximum stays ``-inf``, exponentials are taken against 0 instead
(so they are 0, not NaN), ``l_i`` stays 0 and the row is divided by 1.

Loads are cast to fp32 at once and everything computes in fp32; the output is stored in the
query's dtype with the strides ATen's meta kernel gives it (the layout the captured graph was
traced with). On a GPU the products run on tensor cores in TF32 for fp16/bf16 inputs (their values
are exact in TF32; the probabilities are rounded to TF32, about fp16's precision) and in full fp32
("ieee") for fp32 inputs, as ATen does with TF32 off; ``triton.autotune`` picks ``BLOCK_M``,
``BLOCK_N``, warps and stages. Under the interpreter blocks are fixed at 16.

:func:`compile_attention_region` turns a region holding one SDPA call into a launcher,
:func:`attention_region` cuts such a region out of a larger graph, and :class:`NotLowerable` is
raised (at generation, or at a call before anything launches) for what the kernel does not do:
dropout, a mask together with ``is_causal``, mismatched batch or head counts, ranks other than 3
or 4, dtypes other than fp16/bf16/fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import triton
from torch.fx import Graph, GraphModule, Node

from graphopt.backends.triton_codegen import NotLowerable, interpreted, load_kernel
from graphopt.ir import aten, normalized_args

__all__ = ["attention_inputs", "attention_region", "attention_region_source", "attention_source", "compile_attention_region"]

SDPA = aten.scaled_dot_product_attention.default
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Query/key/value dtypes the kernel takes (it computes in fp32, which would lose fp64 precision)."""

MASK_KINDS = (None, "bool", "additive")

INTERPRETER_BLOCK = 16
"""BLOCK_M and BLOCK_N under the interpreter: the smallest ``tl.dot`` takes."""

GPU_CONFIGS = ((64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2))
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner times on a GPU."""

MAX_GRID_Y = 65535
"""CUDA's limit on the grid's second axis, which counts (batch, head) pairs."""

_TENSOR_ARGS = ("query", "key", "value", "attn_mask")


# ---------------------------------------------------------------------------------------------
# Source generation.


def attention_source(causal: bool, mask: str | None, input_precision: str = "ieee", varlen: bool = False) -> str:
    """The ``@triton.jit`` kernel ``attention_fwd_kernel`` for one variant, as Python source.

    ``causal``: ATen's top-left aligned ``is_causal``; ``mask``: None, ``"bool"`` (False = masked)
    or ``"additive"`` (added to the scores); ``input_precision``: of the two ``tl.dot`` on a GPU
    (``"ieee"`` or ``"tf32"``; the interpreter computes in fp32 either way). ``varlen``: the
    packed variant ``varlen_attention_fwd_kernel`` of :mod:`~graphopt.backends.triton_varlen_attention`
    (an extra ``CuSeqlens`` argument; "batch" ``b`` is a sequence of the packed rows).
    """
    if mask not in MASK_KINDS:
        raise ValueError(f"mask must be one of {MASK_KINDS}, not {mask!r}")
    if causal and mask is not None:
        raise NotLowerable("attn_mask together with is_causal")
    if varlen and mask is not None:
        raise NotLowerable("a mask on packed sequences (its strides are per batch)")
    if input_precision not in ("ieee", "tf32"):
        raise ValueError(f"input_precision must be 'ieee' or 'tf32', not {input_precision!r}")
    dot = f'input_precision="{input_precision}"'
    lines = [
        "@triton.jit",
        f"def {'varlen_' if varlen else ''}attention_fwd_kernel(",
        f"    Q, K, V, Out, Mask,{' CuSeqlens,' if varlen else ''}",
        "    q_stride_b, q_stride_h, q_stride_m, q_stride_d,",
        "    k_stride_b, k_stride_h, k_stride_n, k_stride_d,",
        "    v_stride_b, v_stride_h, v_stride_n, v_stride_d,",
        "    o_stride_b, o_stride_h, o_stride_m, o_stride_d,",
        "    mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n,",
        "    H, KV_GROUP, Lq, Lk, D, DV, scale,",
        "    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,",
        "):",
        "    # This program: query rows [start_m, start_m + BLOCK_M) of head h of batch b.",
        "    start_m = tl.program_id(0) * BLOCK_M",
        "    batch_head = tl.program_id(1).to(tl.int64)  # 64-bit offsets: b * stride may exceed 2**31",
        "    b = batch_head // H",
        "    h = batch_head % H",
        "    h_kv = h // KV_GROUP  # grouped-query attention: KV_GROUP query heads share a key/value head",
    ]
    if varlen:
        lines += [
            "    # Varlen: sequence b is rows [seq_start, seq_start + its length) of the packed inputs; its length",
            "    # replaces the Lq and Lk arguments (the longest length, rounded: only the autotuner reads those).",
            "    seq_start = tl.load(CuSeqlens + b)",
            "    Lq = (tl.load(CuSeqlens + b + 1) - seq_start).to(tl.int32)",
            "    Lk = Lq",
            "    if start_m >= Lq:  # the grid covers the longest sequence; this one ends before this block",
            "        return",
            "    b = seq_start  # the batch strides are the token strides: b * stride_b is the sequence's first row",
        ]
    lines += [
        "    rows = start_m + tl.arange(0, BLOCK_M)",
        "    row_in = rows < Lq",
        "    offs_n = tl.arange(0, BLOCK_N)",
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    offs_dv = tl.arange(0, BLOCK_DV)",
        "    # The query block, loaded once (zero-padded to BLOCK_D) and scaled once.",
        "    q_ptrs = Q + b * q_stride_b + h * q_stride_h + rows[:, None] * q_stride_m + offs_d[None, :] * q_stride_d",
        "    q = tl.load(q_ptrs, mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * scale",
        "    # Kᵀ as a [BLOCK_D, BLOCK_N] tile and V as [BLOCK_N, BLOCK_DV], at key 0; the loop adds the key offset.",
        "    kt_ptrs = K + b * k_stride_b + h_kv * k_stride_h + offs_d[:, None] * k_stride_d",
        "    v_ptrs = V + b * v_stride_b + h_kv * v_stride_h + offs_dv[None, :] * v_stride_d",
    ]
    if mask is not None:
        lines.append("    mask_ptrs = Mask + b * mask_stride_b + h * mask_stride_h + rows[:, None] * mask_stride_m")
    lines += [
        "    # Online softmax state: running row maximum, running sum of exponentials, unnormalised output.",
        '    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)',
        "    l_i = tl.zeros([BLOCK_M], tl.float32)",
        "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)",
    ]
    if causal:
        lines.append("    # Causal: keys past this block's last row are masked for all its rows; skip their blocks.")
        lines.append("    key_end = tl.minimum(start_m + BLOCK_M, Lk)")
    else:
        lines.append("    key_end = Lk")
    lines += [
        "    for start_n in range(0, key_end, BLOCK_N):",
        "        cols = start_n + offs_n",
        "        col_in = cols < Lk",
        "        kt = tl.load(kt_ptrs + cols[None, :] * k_stride_n, mask=(offs_d[:, None] < D) & col_in[None, :], other=0.0).to(tl.float32)",
        f"        s = tl.dot(q, kt, {dot})",
        "        keep = col_in[None, :]",
    ]
    if causal:
        lines.append("        keep = keep & (cols[None, :] <= rows[:, None])  # top-left aligned, as ATen's is_causal")
    if mask is not None:
        lines.append("        mask_in = row_in[:, None] & col_in[None, :]")
    if mask == "bool":
        lines.append("        keep = keep & (tl.load(mask_ptrs + cols[None, :] * mask_stride_n, mask=mask_in, other=0) != 0)")
    if mask == "additive":
        lines.append("        s += tl.load(mask_ptrs + cols[None, :] * mask_stride_n, mask=mask_in, other=0.0).to(tl.float32)")
    lines += [
        '        s = tl.where(keep, s, float("-inf"))',
        "        m_new = tl.maximum(m_i, tl.max(s, 1))",
        "        # While a row has no unmasked key m_new is -inf: shift by 0 instead, so exp gives 0, not NaN.",
        '        shift = tl.where(m_new == float("-inf"), 0.0, m_new)',
        "        p = tl.exp(s - shift[:, None])",
        "        alpha = tl.exp(m_i - shift)  # rescales what was accumulated against the old maximum",
        "        l_i = l_i * alpha + tl.sum(p, 1)",
        "        v = tl.load(v_ptrs + cols[:, None] * v_stride_n, mask=col_in[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)",
        f"        acc = acc * alpha[:, None] + tl.dot(p, v, {dot})",
        "        m_i = m_new",
        "    # Rows with every key masked have l_i = 0 and acc = 0: zeros, as ATen's SDPA returns for them.",
        "    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]",
        "    o_ptrs = Out + b * o_stride_b + h * o_stride_h + rows[:, None] * o_stride_m + offs_dv[None, :] * o_stride_d",
        "    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & (offs_dv[None, :] < DV))",
    ]
    return "\n".join(lines) + "\n"


def _load_attention_kernel(causal: bool, mask: str | None, input_precision: str) -> Any:
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages) for m, n, warps, stages in GPU_CONFIGS]
    return load_kernel(attention_source(causal, mask, input_precision), "attention_fwd_kernel", configs, ["Lq", "Lk", "D", "DV"])


# ---------------------------------------------------------------------------------------------
# Regions.


def _sdpa_args(node: Node) -> dict[str, Any]:
    if node.op != "call_function" or node.target != SDPA:
        raise ValueError(f"{node.name} is not a call of {SDPA}")
    return normalized_args(node)


def attention_inputs(node: Node) -> list[Node]:
    """The tensor arguments of SDPA ``node``: query, key, value and ``attn_mask`` when it has one,
    one entry per argument (a node passed twice, e.g. as query and key, appears twice)."""
    args = _sdpa_args(node)
    return [args[name] for name in _TENSOR_ARGS if isinstance(args[name], Node)]


def attention_region(node: Node) -> GraphModule:
    """A region computing SDPA ``node`` alone: one placeholder per :func:`attention_inputs` entry,
    in that order (named query, key, value, attn_mask), and the node's other arguments as
    constants. Call it, or the launcher of :func:`compile_attention_region`, with the values of
    ``attention_inputs(node)``."""
    args = _sdpa_args(node)
    graph = Graph()
    tensors = {}
    for name in _TENSOR_ARGS:
        if isinstance(args[name], Node):
            tensors[name] = graph.placeholder(name)
            if "val" in args[name].meta:
                tensors[name].meta["val"] = args[name].meta["val"]
    constants = {name: value for name, value in args.items() if name not in _TENSOR_ARGS}
    query_key_value = tuple(tensors[name] for name in _TENSOR_ARGS[:3])
    call = graph.call_function(SDPA, query_key_value, {"attn_mask": tensors.get("attn_mask"), **constants})
    if "val" in node.meta:
        call.meta["val"] = node.meta["val"]
    graph.output(call)
    return GraphModule(torch.nn.Module(), graph)


def _region_call(region: GraphModule) -> tuple[dict[str, Any], list[Node]]:
    """The SDPA call's normalized arguments and the region's placeholders (raises NotLowerable)."""
    nodes = list(region.graph.nodes)
    calls = [node for node in nodes if node.op == "call_function"]
    if len(calls) != 1 or calls[0].target != SDPA:
        raise NotLowerable(f"the region is not one {SDPA} call: {[str(node.target) for node in calls]}")
    if any(node.op not in ("placeholder", "call_function", "output") for node in nodes):
        raise NotLowerable("the region holds nodes other than placeholders and the call")
    call, output = calls[0], region.graph.output_node()
    if output.args[0] is not call:
        raise NotLowerable("the region does not return the SDPA result itself")
    args = normalized_args(call)
    for name, value in args.items():
        is_tensor_arg = name in _TENSOR_ARGS and value is not None
        if is_tensor_arg and not (isinstance(value, Node) and value.op == "placeholder"):
            raise NotLowerable(f"SDPA's {name} is not a region input")
        if not is_tensor_arg and isinstance(value, Node):
            raise NotLowerable(f"SDPA's {name} is a graph value, not a constant")
    return args, [node for node in nodes if node.op == "placeholder"]


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, L, ·]`` view: 3-D ``[N, L, ·]`` becomes ``[N, 1, L, ·]``."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, enable_gqa: bool) -> None:
    """Raise NotLowerable for inputs the kernel does not index (ATen then runs, or says what is wrong)."""
    tensors = [t for t in (q, k, v, attn_mask) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise NotLowerable("an SDPA input is not a tensor")
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise NotLowerable(f"ranks {q.dim()}, {k.dim()}, {v.dim()}: the kernel takes 3-D or 4-D query, key and value")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NotLowerable(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernel takes one of {DTYPES} for all three")
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise NotLowerable(f"attn_mask of dtype {attn_mask.dtype} for a {q.dtype} query")
    if len({t.device for t in tensors}) != 1:
        raise NotLowerable("inputs on several devices")
    if k.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2] or k.shape[:-2] != v.shape[:-2]:
        raise NotLowerable(f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} do not fit together")
    q_heads, kv_heads = _as_4d(q).shape[1], _as_4d(k).shape[1]
    grouped = enable_gqa and kv_heads > 0 and q_heads % kv_heads == 0
    if q.shape[0] != k.shape[0] or not (q_heads == kv_heads or grouped):
        raise NotLowerable(f"query {tuple(q.shape)} and key {tuple(k.shape)} differ in batch or heads (enable_gqa={enable_gqa})")
    scores = (*q.shape[:-1], k.shape[-2])
    if attn_mask is not None and (attn_mask.dim() > len(scores) or any(m not in (1, s) for m, s in zip(reversed(attn_mask.shape), reversed(scores)))):
        raise NotLowerable(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to the scores {scores}")
    if q.shape[-1] == 0:
        raise NotLowerable("head dim 0")
    if math.prod(q.shape[:-2]) > MAX_GRID_Y:
        raise NotLowerable(f"{math.prod(q.shape[:-2])} (batch, head) pairs exceed the grid's {MAX_GRID_Y}")
    if q.device.type != "cuda" and not interpreted():
        raise NotLowerable(f"{q.device.type} tensors: Triton kernels run on a GPU (or in the interpreter)")


def attention_region_source(region: GraphModule) -> str:
    """The kernel source :func:`compile_attention_region` launches for ``region``'s traced inputs
    (the mask variant follows the mask's dtype in ``meta["val"]``; fp32 precision)."""
    args, _ = _region_call(region)
    mask = args["attn_mask"]
    kind = None if mask is None else "bool" if mask.meta.get("val") is not None and mask.meta["val"].dtype == torch.bool else "additive"
    return attention_source(bool(args["is_causal"]), kind)


def compile_attention_region(region: GraphModule) -> Callable[..., torch.Tensor]:
    """A function computing ``region(*inputs)`` with one launch of the fused attention kernel.

    ``region`` holds one ``aten.scaled_dot_product_attention.default`` call whose tensor arguments
    are its placeholders and whose other arguments are constants (see :func:`attention_region`).
    Unsupported constants raise :class:`NotLowerable` here; unsupported inputs raise it at the
    call, before anything launches. The kernel variant is picked by the mask's dtype at the call.
    """
    args, placeholders = _region_call(region)
    if args["dropout_p"] != 0:
        raise NotLowerable(f"dropout_p={args['dropout_p']}: the kernel has no dropout")
    causal, scale, enable_gqa = bool(args["is_causal"]), args["scale"], bool(args["enable_gqa"])
    if causal and args["attn_mask"] is not None:
        raise NotLowerable("attn_mask together with is_causal")
    if scale is not None and not math.isfinite(scale):
        raise NotLowerable(f"scale={scale}")
    position = {name: placeholders.index(args[name]) for name in _TENSOR_ARGS if args[name] is not None}

    def launch(*inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(placeholders):
            raise TypeError(f"the region takes {len(placeholders)} tensors, not {len(inputs)}")
        q, k, v = (inputs[position[name]] for name in _TENSOR_ARGS[:3])
        attn_mask = inputs[position["attn_mask"]] if "attn_mask" in position else None
        _check_shapes(q, k, v, attn_mask, enable_gqa)
        # ATen's shape rules and output layout, from its meta kernel: no data is touched.
        metas = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in inputs]
        try:
            out_meta = region(*metas)
        except RuntimeError as exc:
            raise NotLowerable(f"ATen rejects these inputs: {exc}") from exc
        out = torch.empty_strided(out_meta.shape, out_meta.stride(), dtype=out_meta.dtype, device=q.device)
        if out.numel() == 0:
            return out
        q4, k4, v4, out4 = _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(out)
        batch, heads, lq, d = q4.shape
        kv_heads, lk, dv = k4.shape[1], k4.shape[2], v4.shape[3]
        mask_kind, mask4, mask_strides = None, q4, [0, 0, 0, 0]  # q4: an unread placeholder pointer
        if attn_mask is not None:
            mask_kind = "bool" if attn_mask.dtype == torch.bool else "additive"
            mask4 = _as_4d(attn_mask.expand(*q.shape[:-1], lk))  # stride 0 along broadcast dims
            mask_strides = list(mask4.stride())
        kernel = _load_attention_kernel(causal, mask_kind, "ieee" if q.dtype == torch.float32 else "tf32")
        block_d, block_dv = (max(16, triton.next_power_of_2(n)) for n in (d, dv))
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        options = {"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK} if interpreted() else {}
        kernel[grid](
            q4, k4, v4, out4, mask4,
            *q4.stride(), *k4.stride(), *v4.stride(), *out4.stride(), *mask_strides,
            heads, heads // kv_heads, lq, lk, d, dv, 1 / math.sqrt(d) if scale is None else scale,
            BLOCK_D=block_d, BLOCK_DV=block_dv, **options,
        )  # fmt: skip
        return out

    return launch
