"""Sparse softmax attention: sliding window + global tokens, and block layouts: ops and records.

Longformer (Beltagy et al., "Longformer: The Long-Document Transformer", 2020) lets each token
attend to a sliding window of its neighbours plus a few global tokens (CLS) that attend to and
are attended by all; BigBird (Zaheer et al., "Big Bird: Transformers for Longer Sequences",
NeurIPS 2020) computes the same pattern on blocks; Sparse Transformers (Child et al. 2019) attend
through a fixed block layout. For visible pairs ``V(i)`` the output is
``out_i = Σ_{j ∈ V(i)} softmax_j(q_i·k_j · scale + m_ij) v_j`` (``reference.py`` states ``V``
exactly), ``O(L · window)`` pairs instead of ``L · S``. The ops:

* ``graphopt::window_attention(q, k, v, window, global_tokens, attn_mask=None, is_causal=False, scale=None)``:
  ``[B, H, L, D]`` queries, ``[B, Hk, S, D|Dv]`` keys/values (grouped-query allowed), SDPA's own
  ``attn_mask`` (bool or additive, broadcastable to ``[B, H, L, S]``) on top of the pattern;
* ``graphopt::block_sparse_attention(q, k, v, layout, block_size, attn_mask=None, is_causal=False, scale=None)``:
  ``layout`` bool ``[ceil(L / bs), ceil(S / bs)]`` or ``[H, ..]`` of that;
* ``graphopt::varlen_window_attention(q, k, v, cu_seqlens, window, global_tokens, scale=None)``:
  the window pattern on each packed ``[T, H, D]`` sequence alone (bidirectional), for graphs
  ``remove_padding`` has made padding-free.

Every device runs ``cpu.py``'s kernels (chunked banded SDPA, gathered blocks), which compute only
the visible blocks; CUDA runs the block-sparse FlashAttention kernel of ``triton.py`` (falling back
to ``cpu.py`` where Triton is missing or refuses the inputs). The FLOP rules count the visible
pairs alone, ``2 · pairs · H · (D + Dv)`` per batch element.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.fx import Node

from graphopt.ir import normalized_args, shape_of
from graphopt.ir.flops import example_value, size
from graphopt.ir.oprecord import OpRecord, onnx_translation, register_op
from graphopt.ops.sparse_attention.cpu import block_sparse_attention_gathered, varlen_window_attention_chunked, window_attention_chunked
from graphopt.ops.sparse_attention.reference import (
    block_pair_count,
    block_sparse_attention_reference,
    varlen_window_attention_reference,
    window_attention_reference,
    window_pair_count,
)

__all__ = ["block_sparse_attention", "varlen_window_attention", "window_attention"]


@torch.library.custom_op("graphopt::window_attention", mutates_args=())
def window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, global_tokens: int, attn_mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None
) -> Tensor:
    """Sliding-window + global-token softmax attention (Longformer); ``[B, H, L, Dv]``. See the module docstring."""
    return window_attention_chunked(q, k, v, window, global_tokens, attn_mask, is_causal, scale)


def _window_attention_fake(q, k, v, window, global_tokens, attn_mask=None, is_causal=False, scale=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("graphopt::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: Tensor, block_size: int, attn_mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None
) -> Tensor:
    """Softmax attention over the key blocks ``layout`` lists for each query block; ``[B, H, L, Dv]``."""
    return block_sparse_attention_gathered(q, k, v, layout, block_size, attn_mask, is_causal, scale)


def _block_sparse_attention_fake(q, k, v, layout, block_size, attn_mask=None, is_causal=False, scale=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("graphopt::varlen_window_attention", mutates_args=())
def varlen_window_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, global_tokens: int, scale: float | None = None) -> Tensor:
    """Window + global attention of each packed sequence ``cu_seqlens[b]:cu_seqlens[b + 1]`` alone; ``[T, H, Dv]``."""
    return varlen_window_attention_chunked(q, k, v, cu_seqlens, window, global_tokens, scale)


def _varlen_window_attention_fake(q, k, v, cu_seqlens, window, global_tokens, scale=None):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


# ----------------------------------------------------------------------------- FLOP rules


def _window_flops(node: Node) -> int:
    """``2 · B · H · pairs · (D + Dv)``, ``pairs`` the window pattern's visible (query, key) pairs."""
    args = normalized_args(node)
    q, v = shape_of(args["q"]), shape_of(args["v"])
    k = shape_of(args["k"])
    if not (q and k and v):
        return 0
    pairs = window_pair_count(size(q[-2]), size(k[-2]), args["window"], args["global_tokens"], bool(args["is_causal"]))
    return 2 * size(q[0]) * size(q[1]) * pairs * (size(q[-1]) + size(v[-1]))


def _layout_value(node: Node) -> Tensor | None:
    """The layout's value: a constant of the graph, or the example run's."""
    if isinstance(node, Node) and node.op == "get_attr":
        return getattr(node.graph.owning_module, node.target, None)
    return example_value(node)


def _block_flops(node: Node) -> int:
    """``2 · B · pairs · (D + Dv)`` over the layout's visible pairs (all heads). Without the layout's
    value (computed in the graph and not recorded), every pair counts, as dense SDPA."""
    args = normalized_args(node)
    q, k, v = shape_of(args["q"]), shape_of(args["k"]), shape_of(args["v"])
    if not (q and k and v):
        return 0
    heads, length_q, length_k = size(q[1]), size(q[-2]), size(k[-2])
    layout = _layout_value(args["layout"])
    if isinstance(layout, Tensor):
        pairs = block_pair_count(layout.cpu(), args["block_size"], length_q, length_k, heads, bool(args["is_causal"]))
    else:
        pairs = heads * length_q * length_k
    return 2 * size(q[0]) * pairs * (size(q[-1]) + size(v[-1]))


def _varlen_window_flops(node: Node) -> int:
    """Per packed sequence of length ``L_b``: its window pattern's pairs; lengths from the example run's
    ``cu_seqlens``, else the ``T`` tokens spread evenly over the ``B`` sequences."""
    args = normalized_args(node)
    q, v, offsets = shape_of(args["q"]), shape_of(args["v"]), shape_of(args["cu_seqlens"])
    if not (q and v and offsets):
        return 0
    offsets_run = example_value(args["cu_seqlens"])
    if offsets_run is not None:
        lengths = offsets_run.diff().tolist()
    else:
        sequences = max(size(offsets[0]) - 1, 1)
        lengths = [size(q[0]) // sequences] * sequences
    pairs = sum(window_pair_count(n, n, args["window"], args["global_tokens"], False) for n in lengths)
    return 2 * pairs * size(q[1]) * (size(q[2]) + size(v[2]))


register_op(
    OpRecord(
        op=torch.ops.graphopt.window_attention,
        reference=window_attention_reference,
        fake=_window_attention_fake,
        flops=_window_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "window_attention"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.block_sparse_attention,
        reference=block_sparse_attention_reference,
        fake=_block_sparse_attention_fake,
        flops=_block_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "block_sparse_attention"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.varlen_window_attention,
        reference=varlen_window_attention_reference,
        fake=_varlen_window_attention_fake,
        flops=_varlen_window_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "varlen_window_attention"),
    )
)


# ----------------------------------------------------------------------------- CUDA kernels


@functools.cache
def _triton_sparse():
    """:mod:`graphopt.ops.sparse_attention.triton`, or None where Triton is not installed."""
    try:
        from graphopt.ops.sparse_attention import triton as sparse
    except ImportError:
        return None
    return sparse


@window_attention.register_kernel("cuda")
def _window_attention_cuda(q, k, v, window, global_tokens, attn_mask=None, is_causal=False, scale=None):
    """The block-sparse FlashAttention kernel; ``cpu.py``'s chunked SDPA where it refuses the inputs (fp64)."""
    kernels = _triton_sparse()
    if kernels is not None:
        try:
            return kernels.window_attention_triton(q, k, v, window, global_tokens, attn_mask, is_causal, scale)
        except kernels.NotLowerable:
            pass
    return window_attention_chunked(q, k, v, window, global_tokens, attn_mask, is_causal, scale)


@block_sparse_attention.register_kernel("cuda")
def _block_sparse_attention_cuda(q, k, v, layout, block_size, attn_mask=None, is_causal=False, scale=None):
    """The block-sparse FlashAttention kernel; ``cpu.py``'s gathered blocks where it refuses the inputs."""
    kernels = _triton_sparse()
    if kernels is not None:
        try:
            return kernels.block_sparse_attention_triton(q, k, v, layout, block_size, attn_mask, is_causal, scale)
        except kernels.NotLowerable:
            pass
    return block_sparse_attention_gathered(q, k, v, layout, block_size, attn_mask, is_causal, scale)


@varlen_window_attention.register_kernel("cuda")
def _varlen_window_attention_cuda(q, k, v, cu_seqlens, window, global_tokens, scale=None):
    """The block-sparse FlashAttention kernel (``VARLEN``); ``cpu.py``'s where it refuses the inputs."""
    kernels = _triton_sparse()
    if kernels is not None:
        try:
            return kernels.varlen_window_attention_triton(q, k, v, cu_seqlens, window, global_tokens, scale)
        except kernels.NotLowerable:
            pass
    return varlen_window_attention_chunked(q, k, v, cu_seqlens, window, global_tokens, scale)
