"""Linear attention and LoLCATs' sliding-window hybrid as custom ops: definitions, records, autograd.

* ``graphopt::linear_attention(fq, fk, v, attn_mask=None, is_causal=False, eps=1e-6)``: attention
  with the softmax kernel ``exp(q·k)`` replaced by ``φ(q)·φ(k)`` on features already mapped
  (:func:`~graphopt.ops.linear_attention.reference.linear_attention_reference` states it);
* ``graphopt::hybrid_attention(q, k, v, fq, fk, mix, window, attn_mask=None, is_causal=False,
  scale=None, eps=1e-6)``: softmax on a sliding window of keys, linear attention on the others,
  one normalizer, a learned per-head mix (``hybrid_attention_reference``);
* ``graphopt::varlen_linear_attention(fq, fk, v, cu_seqlens, eps)`` and
  ``graphopt::varlen_hybrid_attention(q, k, v, fq, fk, mix, window, cu_seqlens, scale, eps)``: the
  same, bidirectional, on packed ``[T, H, ·]`` tokens (after ``remove_padding``), each sequence
  alone.

The op bodies are the sub-quadratic torch forms of :mod:`graphopt.ops.linear_attention.cpu`
(bidirectional: two GEMMs; causal: chunked prefix sums; hybrid: bands), which run on every device;
``reference.py`` holds the quadratic definitions and the recurrent form for one-token decoding
(:func:`~graphopt.ops.linear_attention.reference.linear_attention_recurrent`). The ops are
differentiable (attention transfer trains the feature maps through them): the backward recomputes
the forward in torch ops under autograd, so no ``[L, S]`` tensor is kept between the passes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.fx import Node

from graphopt.ir import normalized_args, shape_of
from graphopt.ir.flops import example_value, size
from graphopt.ir.oprecord import OpRecord, onnx_translation, register_op
from graphopt.ops.recompute import recomputed_backward
from graphopt.ops.linear_attention.cpu import CHUNK, hybrid_attention_fast, key_weights, linear_attention_fast, linear_sums
from graphopt.ops.linear_attention.reference import (
    compute_dtype,
    hybrid_attention_reference,
    linear_attention_recurrent,
    linear_attention_reference,
    varlen_hybrid_attention_reference,
    varlen_linear_attention_reference,
)

__all__ = [
    "hybrid_attention",
    "linear_attention",
    "linear_attention_recurrent",
    "varlen_hybrid_attention",
    "varlen_linear_attention",
]


@torch.library.custom_op("graphopt::linear_attention", mutates_args=())
def linear_attention(fq: Tensor, fk: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, eps: float = 1e-6) -> Tensor:
    """Linear attention of the features ``fq`` ``[B, H, L, F]`` to ``fk`` ``[B, Hk, S, F]``, values ``v`` ``[B, Hk, S, Dv]``."""
    return linear_attention_fast(fq, fk, v, attn_mask, is_causal, eps)


@torch.library.custom_op("graphopt::hybrid_attention", mutates_args=())
def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    mix: Tensor,
    window: int,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Sliding-window softmax plus linear attention (LoLCATs), ``[B, H, L, Dv]``."""
    return hybrid_attention_fast(q, k, v, fq, fk, mix, window, attn_mask, is_causal, scale, eps)


def _varlen_linear(fq: Tensor, fk: Tensor, v: Tensor, cu_seqlens: Tensor, eps: float = 1e-6) -> Tensor:
    dtype = compute_dtype(v)
    out = v.new_zeros((fq.shape[0], fq.shape[1], v.shape[-1]))
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            q1, k1, v1 = (t[start:end].transpose(0, 1).unsqueeze(0).to(dtype) for t in (fq, fk, v))
            num, den = linear_sums(q1, k1, v1, causal=False)
            out[start:end] = (num / (den.unsqueeze(-1) + eps))[0].transpose(0, 1).to(v.dtype)
    return out


@torch.library.custom_op("graphopt::varlen_linear_attention", mutates_args=())
def varlen_linear_attention(fq: Tensor, fk: Tensor, v: Tensor, cu_seqlens: Tensor, eps: float = 1e-6) -> Tensor:
    """Bidirectional linear attention of each packed sequence alone: ``[T, H, F]``, ``[T, Hk, F]``, ``[T, Hk, Dv]`` -> ``[T, H, Dv]``."""
    return _varlen_linear(fq, fk, v, cu_seqlens, eps)


def _varlen_hybrid(q, k, v, fq, fk, mix, window, cu_seqlens, scale=None, eps=1e-6):
    out = v.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            one = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v, fq, fk)]
            out[start:end] = hybrid_attention_fast(*one, mix, window, scale=scale, eps=eps)[0].transpose(0, 1)
    return out


@torch.library.custom_op("graphopt::varlen_hybrid_attention", mutates_args=())
def varlen_hybrid_attention(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, mix: Tensor, window: int, cu_seqlens: Tensor, scale: float | None = None, eps: float = 1e-6
) -> Tensor:
    """Bidirectional hybrid attention of each packed sequence alone (packed ``[T, H, ·]`` operands)."""
    return _varlen_hybrid(q, k, v, fq, fk, mix, window, cu_seqlens, scale, eps)


# ----------------------------------------------------------------------------- autograd (graphopt.ops.recompute)


recomputed_backward(linear_attention, linear_attention_fast)
recomputed_backward(hybrid_attention, hybrid_attention_fast)
recomputed_backward(varlen_linear_attention, _varlen_linear)
recomputed_backward(varlen_hybrid_attention, _varlen_hybrid)


# ----------------------------------------------------------------------------- fakes and FLOP rules


def _attention_fake(*args, **kwargs):
    q, v = args[0], args[2]
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


def _linear_pairs_flops(heads: int, length_q: int, length_k: int, f: int, dv: int, causal: bool) -> int:
    """What :func:`~graphopt.ops.linear_attention.cpu.linear_sums` computes: the cheaper of the quadratic
    and the two-GEMM form (bidirectional), or chunks of ``C`` plus the running state (causal)."""
    if causal:
        return 2 * heads * (length_q * min(CHUNK, length_k) * (f + dv) + 2 * length_q * f * dv)
    return 2 * heads * min(length_q * length_k * (f + dv), (length_q + length_k) * f * dv)


def _linear_attention_flops(node: Node) -> int:
    args = normalized_args(node)
    fq, v = shape_of(args["fq"]), shape_of(args["v"])
    if not (fq and v):
        return 0
    fk = shape_of(args["fk"])
    return size(fq[0]) * _linear_pairs_flops(size(fq[1]), size(fq[2]), size(fk[2]), size(fq[3]), size(v[3]), bool(args["is_causal"]))


def _hybrid_attention_flops(node: Node) -> int:
    """The linear part over all keys plus the window's softmax: ``2·H·L·window·(D + Dv)`` per sequence."""
    args = normalized_args(node)
    q, fq, v = shape_of(args["q"]), shape_of(args["fq"]), shape_of(args["v"])
    if not (q and fq and v):
        return 0
    heads, length, d, dv = size(q[1]), size(q[2]), size(q[3]), size(v[3])
    window = min(int(args["window"]), length)
    return size(q[0]) * (_linear_pairs_flops(heads, length, length, size(fq[3]), dv, bool(args["is_causal"])) + 2 * heads * length * window * (d + dv))


def _sequence_lengths(node: Node, cu_seqlens: Node, tokens: int) -> list[int]:
    offsets = example_value(cu_seqlens)
    if offsets is not None:
        return offsets.diff().tolist()
    count = max(size(shape_of(cu_seqlens)[0]) - 1, 1)
    return [tokens // count] * count


def _varlen_linear_flops(node: Node) -> int:
    args = normalized_args(node)
    fq, v = shape_of(args["fq"]), shape_of(args["v"])
    if not (fq and v):
        return 0
    lengths = _sequence_lengths(node, args["cu_seqlens"], size(fq[0]))
    return sum(_linear_pairs_flops(size(fq[1]), n, n, size(fq[2]), size(v[2]), False) for n in lengths)


def _varlen_hybrid_flops(node: Node) -> int:
    args = normalized_args(node)
    q, fq, v = shape_of(args["q"]), shape_of(args["fq"]), shape_of(args["v"])
    if not (q and fq and v):
        return 0
    heads, d, dv = size(q[1]), size(q[2]), size(v[2])
    total = 0
    for n in _sequence_lengths(node, args["cu_seqlens"], size(q[0])):
        total += _linear_pairs_flops(heads, n, n, size(fq[2]), dv, False) + 2 * heads * n * min(int(args["window"]), n) * (d + dv)
    return total


register_op(
    OpRecord(
        op=torch.ops.graphopt.linear_attention,
        reference=linear_attention_reference,
        fake=_attention_fake,
        flops=_linear_attention_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "linear_attention"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.hybrid_attention,
        reference=hybrid_attention_reference,
        fake=_attention_fake,
        flops=_hybrid_attention_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "hybrid_attention"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.varlen_linear_attention,
        reference=varlen_linear_attention_reference,
        fake=_attention_fake,
        flops=_varlen_linear_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "varlen_linear_attention"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.varlen_hybrid_attention,
        reference=varlen_hybrid_attention_reference,
        fake=_attention_fake,
        flops=_varlen_hybrid_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "varlen_hybrid_attention"),
    )
)


@functools.cache
def _triton_kernels():
    """:mod:`graphopt.ops.linear_attention.triton`, or None where Triton is not installed."""
    try:
        from graphopt.ops.linear_attention import triton as kernels
    except ImportError:
        return None
    return kernels


@linear_attention.register_kernel("cuda")
def _linear_attention_cuda(fq: Tensor, fk: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, eps: float = 1e-6) -> Tensor:
    """The Triton kernels of :mod:`graphopt.ops.linear_attention.triton` where the mask weighs keys
    alone (a key-padding mask, or causal times one); the torch forms otherwise, or without Triton."""
    kernels = _triton_kernels()
    kind, w = key_weights(attn_mask, is_causal, fq.shape[-2], fk.shape[-2], compute_dtype(v))
    if kernels is not None and kind != "general" and (w is None or w.shape[1] == 1):
        weights = None if w is None else w[:, 0].expand(fq.shape[0], fk.shape[-2])
        try:
            return kernels.linear_attention_triton(fq, fk, v, weights, is_causal or kind == "causal_keys", eps)
        except kernels.NotLowerable:
            pass
    return linear_attention_fast(fq, fk, v, attn_mask, is_causal, eps)
