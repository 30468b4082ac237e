"""ONNX translations of ``graphopt::linear_attention``, ``hybrid_attention``, ``varlen_linear_attention``
and ``varlen_hybrid_attention``.

ONNX has no op for any of them, so each is a function of the custom domain ``graphopt`` (version 1)
whose body is standard ONNX ops (opset 18), called from a Python wrapper that specialises what
onnxscript functions cannot take (an optional ``attn_mask``, ``is_causal``, grouped-query heads,
``scale=None``) into the function's plain tensor inputs. ``torch.onnx.export`` inlines the bodies
into the graph, so the file needs no custom-op support to run. Every one is the quadratic
definition of :mod:`graphopt.ops.linear_attention.reference`, not the op's sub-quadratic kernels:

* ``linear_attention(fq, fk, v, attn_mask, is_causal, eps)``: ``a = (φq φkᵀ) · w`` with ``w`` the
  mask's weight (a bool mask as 1/0, an additive mask ``m`` as ``Exp(m)``, 1 without one), set to 0
  above the diagonal when causal (``Where`` on a ``Range`` comparison, top-left aligned), then
  ``(a v) / (Σ_j a + eps)``;
* ``hybrid_attention(q, k, v, fq, fk, mix, window, attn_mask, is_causal, scale, eps)``: the window
  logits ``s = q kᵀ · scale + Log(w)`` (``-inf`` outside the window and, causal, above the diagonal; the
  window causal when ``is_causal`` or when the mask hides every later key, checked at run time:
  ``ReduceMax(w · (j > i)) == 0`` picks between the two windows),
  ``c`` their row max (0 where not finite), ``a = g · Exp(s − c)`` in the window and
  ``(1 − g) · (φq φkᵀ) · w`` outside it (where kept), ``g = Sigmoid(mix)`` per head;
* ``varlen_linear_attention(fq, fk, v, cu_seqlens, eps)`` and ``varlen_hybrid_attention(q, k, v, fq,
  fk, mix, window, cu_seqlens, scale, eps)``: the same on all ``T`` packed tokens at once, heads
  first, with the block-diagonal mask built from ``cu_seqlens`` as ``varlen_attention``'s
  translation builds it (tokens of different sequences get weight 0 and lie outside every window),
  so each sequence computes alone, bidirectionally; ``T²`` pairs instead of ``Σ L_b²``.

Scores compute in fp32 (fp64 for fp64 inputs), outputs in ``v``'s dtype, as the reference.
Grouped-query attention (``fk``/``k``/``v`` with ``Hk`` heads dividing ``H``) repeats each key head
for its ``H / Hk`` query heads (``Unsqueeze`` + ``Expand`` + ``Reshape``, head counts read at run
time). ``scale=None`` is ``1 / sqrt(D)`` and needs a static head dim ``D`` to export.

:mod:`graphopt.ops.sparse_attention.onnx` uses the helpers here (heads, windows, packed sequences).
Imported only by the exporter (through the records' ``onnx`` loaders).
"""

from __future__ import annotations

import math

import onnxscript
from onnxscript import BOOL, ir
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat

# The annotations are not decoration: the exporter reads a function's inputs and outputs from them.

__all__ = ["DOMAIN", "hybrid_attention", "linear_attention", "varlen_hybrid_attention", "varlen_linear_attention"]

DOMAIN = onnxscript.values.Opset("graphopt", 1)
"""The custom domain of the functions: nodes ``graphopt::linear_attention`` etc. in the ONNX graph."""


@onnxscript.script(DOMAIN)
def _linear_attention(q: TFloat, kt: TFloat, val: TFloat, w: TFloat, keep: BOOL, eps: float) -> TFloat:
    # q [.., L, F], kt [.., F, S], val [.., S, Dv]; w and keep broadcast to [.., L, S]
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    a = op.Where(keep, op.Mul(op.MatMul(q, kt), w), zero)
    den = op.Add(op.ReduceSum(a, op.Constant(value_ints=[-1]), keepdims=1), op.CastLike(op.Constant(value_float=eps), q))
    return op.Div(op.MatMul(a, val), den)


@onnxscript.script(DOMAIN)
def _hybrid_attention(
    q: TFloat, kt: TFloat, val: TFloat, fq: TFloat, fkt: TFloat, g: TFloat, w: TFloat, inside: BOOL, keep: BOOL, scale: float, eps: float
) -> TFloat:
    # q [.., L, D], kt [.., D, S], fq [.., L, F], fkt [.., F, S], val [.., S, Dv]; g [H, 1, 1]; w, inside, keep broadcast to [.., L, S]
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    one = op.CastLike(op.Constant(value_float=1.0), q)
    last = op.Constant(value_ints=[-1])
    logits = op.Add(op.Mul(op.MatMul(q, kt), op.CastLike(op.Constant(value_float=scale), q)), op.Log(w))
    s = op.Where(op.And(inside, keep), logits, op.CastLike(op.Constant(value_float=float("-inf")), q))
    c = op.ReduceMax(s, last, keepdims=1)
    c = op.Where(op.Or(op.IsInf(c), op.IsNaN(c)), zero, c)
    a_window = op.Mul(g, op.Exp(op.Sub(s, c)))
    linear = op.Mul(op.Mul(op.Sub(one, g), op.MatMul(fq, fkt)), w)
    a_linear = op.Where(op.And(keep, op.Not(inside)), linear, zero)
    a = op.Add(a_window, a_linear)
    den = op.Add(op.ReduceSum(a, last, keepdims=1), op.CastLike(op.Constant(value_float=eps), q))
    return op.Div(op.MatMul(a, val), den)


# ----------------------------------------------------------------------------- helpers (traced Python, shared with sparse_attention)


def compute_type(x) -> ir.DataType:
    """fp32, or fp64 for fp64 ``x`` (the reference's ``compute_dtype``)."""
    return ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def rank(x, name: str) -> int:
    """``x``'s static rank (the exporter knows every rank)."""
    if x.shape is None:
        raise ValueError(f"{name} needs a known rank to export to ONNX")
    return len(x.shape)


def static_scale(q, scale: float | None, op_name: str) -> float:
    """``scale``, or ``1 / sqrt(D)`` for ``None`` (``D`` must be static)."""
    if scale is not None:
        return float(scale)
    head_dim = q.shape[-1] if q.shape is not None else None
    if not isinstance(head_dim, int):
        raise ValueError(f"{op_name} without a scale needs a static head dim to export, got {head_dim}")
    return 1.0 / math.sqrt(head_dim)


def ints(*values: int):
    """An int64 ``[len(values)]`` constant."""
    return op.Constant(value_ints=list(values))


def int_scalar(value: int):
    """An int64 scalar constant."""
    return op.Constant(value_int=int(value))


def heads(x, like, axis: int = -3):
    """``x`` with each of its ``Hk`` heads (dim ``axis``, negative) repeated for the ``H / Hk`` query heads of
    ``like`` (GQA, ``repeat_interleave``); ``x`` itself where both head counts are static and equal."""
    hx, hq = x.shape[axis], like.shape[axis]
    if isinstance(hx, int) and isinstance(hq, int) and hx == hq:
        return x
    groups = op.Div(op.Shape(like, start=axis, end=axis + 1), op.Shape(x, start=axis, end=axis + 1))  # [1]
    repeated = op.Expand(op.Unsqueeze(x, ints(axis)), op.Concat(groups, ints(*[1] * (-axis - 1)), axis=0))  # [.., Hk, g, ..]
    return op.Reshape(repeated, op.Concat(op.Shape(x, end=axis), ints(-1), op.Shape(x, start=axis + 1), axis=0))


def transposed(x, n: int):
    """``x`` of rank ``n`` with its last two dims swapped (``n`` from an input: traced values may have no shape)."""
    return op.Transpose(x, perm=[*range(n - 2), n - 1, n - 2])


def positions(x, axis: int):
    """``Range(0, x.shape[axis])``, int64 (``axis`` not the last)."""
    length = op.Squeeze(op.Shape(x, start=axis, end=axis + 1))
    return op.Range(int_scalar(0), length, int_scalar(1))


def row_col(q, k):
    """Query positions ``[L, 1]`` and key positions ``[1, S]`` of ``[.., L, ·]`` / ``[.., S, ·]`` tensors."""
    return op.Unsqueeze(positions(q, -2), ints(1)), op.Unsqueeze(positions(k, -2), ints(0))


def causal_keep(i, j):
    """SDPA's ``is_causal``: ``j <= i``, top-left aligned."""
    return op.LessOrEqual(j, i)


def window_keep(i, j, window: int, is_causal: bool):
    """``i − window < j <= i`` (causal) or ``|i − j| <= window // 2``, the reference's ``window_keep``."""
    if is_causal:
        return op.And(op.LessOrEqual(j, i), op.Greater(j, op.Sub(i, int_scalar(window))))
    return op.LessOrEqual(op.Abs(op.Sub(i, j)), int_scalar(int(window) // 2))


def window_keep_for(i, j, window: int, is_causal: bool, attn_mask, q, k):
    """The reference's window rule: causal when ``is_causal`` or when ``attn_mask`` hides every later key
    (``hides_later_keys``: ``L == S`` and ``ReduceMax(w · (j > i)) == 0``, decided at run time between
    the two windows), else bidirectional."""
    if is_causal or attn_mask is None:
        return window_keep(i, j, window, is_causal)
    to = compute_type(q)
    later = op.Cast(op.Greater(j, i), to=to)
    top = op.ReduceMax(op.Mul(mask_weights(attn_mask, to), later), keepdims=0)  # every axis: the largest weight of a later key
    square = op.Equal(op.Shape(q, start=-2, end=-1), op.Shape(k, start=-2, end=-1))
    hides = op.And(square, op.Equal(top, op.Cast(op.Constant(value_float=0.0), to=to)))
    # Where(hides, causal, bidirectional) as And/Or: onnxruntime has no Where for bool operands
    return op.Or(op.And(hides, window_keep(i, j, window, True)), op.And(op.Not(hides), window_keep(i, j, window, False)))


def mask_weights(attn_mask, to: ir.DataType):
    """SDPA's ``attn_mask`` as a weight: bool as 1/0, additive ``m`` as ``Exp(m)``; ``None``: a scalar 1."""
    if attn_mask is None:
        return op.Cast(op.Constant(value_float=1.0), to=to)
    if attn_mask.dtype == ir.DataType.BOOL:
        return op.Cast(attn_mask, to=to)
    return op.Exp(op.Cast(attn_mask, to=to))


def packed_sequences(cu_seqlens, packed):
    """Of packed ``[T, ..]`` tokens: each one's position ``[T]`` and sequence index ``[T]`` (int64): how many
    sequence ends ``cu_seqlens[1:]`` are at or before it, as ``varlen_attention``'s translation counts."""
    position = positions(packed, 0)
    ends = op.Slice(cu_seqlens, ints(1), ints(9223372036854775807))
    after_end = op.GreaterOrEqual(op.Unsqueeze(position, ints(1)), op.Unsqueeze(ends, ints(0)))
    sequence = op.ReduceSum(op.Cast(after_end, to=ir.DataType.INT64), ints(1), keepdims=0)
    return position, sequence


def same_sequence(sequence):
    """The block-diagonal ``[T, T]`` mask: True where two packed tokens belong to one sequence."""
    return op.Equal(op.Unsqueeze(sequence, ints(1)), op.Unsqueeze(sequence, ints(0)))


def heads_first(x, to: ir.DataType):
    """Packed ``[T, H, ·]`` as ``[H, T, ·]`` in the compute type."""
    return op.Transpose(op.Cast(x, to=to), perm=[1, 0, 2])


def _mix_gate(mix, to: ir.DataType):
    """``Sigmoid(mix)`` ``[H]`` as ``[H, 1, 1]``."""
    return op.Reshape(op.Sigmoid(op.Cast(mix, to=to)), ints(-1, 1, 1))


# ----------------------------------------------------------------------------- the translations


def linear_attention(fq, fk, v, attn_mask=None, is_causal: bool = False, eps: float = 1e-6):
    """``graphopt::linear_attention``: the quadratic form, the mask as weights, causal as a ``Where``."""
    to = compute_type(v)
    q, kt, val = op.Cast(fq, to=to), transposed(op.Cast(heads(fk, fq), to=to), rank(fk, "linear_attention")), op.Cast(heads(v, fq), to=to)
    w = mask_weights(attn_mask, to)
    keep = causal_keep(*row_col(fq, fk)) if is_causal else op.Constant(value=ir.tensor(True))
    return op.CastLike(_linear_attention(q, kt, val, w, keep, eps=float(eps)), v)


def hybrid_attention(q, k, v, fq, fk, mix, window: int, attn_mask=None, is_causal: bool = False, scale: float | None = None, eps: float = 1e-6):
    """``graphopt::hybrid_attention``: window softmax and linear attention outside it, one normalizer."""
    to = compute_type(v)
    scale = static_scale(q, scale, "hybrid_attention")
    i, j = row_col(q, k)
    inside = window_keep_for(i, j, window, is_causal, attn_mask, q, k)
    keep = causal_keep(i, j) if is_causal else op.Constant(value=ir.tensor(True))
    out = _hybrid_attention(
        op.Cast(q, to=to),
        transposed(op.Cast(heads(k, q), to=to), rank(k, "hybrid_attention")),
        op.Cast(heads(v, q), to=to),
        op.Cast(fq, to=to),
        transposed(op.Cast(heads(fk, q), to=to), rank(fk, "hybrid_attention")),
        _mix_gate(mix, to),
        mask_weights(attn_mask, to),
        inside,
        keep,
        scale=scale,
        eps=float(eps),
    )
    return op.CastLike(out, v)


def varlen_linear_attention(fq, fk, v, cu_seqlens, eps: float = 1e-6):
    """``graphopt::varlen_linear_attention``: all packed tokens at once, weight 0 across sequences."""
    to = compute_type(v)
    _, sequence = packed_sequences(cu_seqlens, fq)
    q = heads_first(fq, to)  # [H, T, F]
    kt = transposed(heads_first(heads(fk, fq, -2), to), 3)
    val = heads_first(heads(v, fq, -2), to)
    w = op.Cast(op.Constant(value_float=1.0), to=to)
    out = _linear_attention(q, kt, val, w, same_sequence(sequence), eps=float(eps))
    return op.CastLike(op.Transpose(out, perm=[1, 0, 2]), v)  # [T, H, Dv]


def varlen_hybrid_attention(q, k, v, fq, fk, mix, window: int, cu_seqlens, scale: float | None = None, eps: float = 1e-6):
    """``graphopt::varlen_hybrid_attention``: all packed tokens at once, the window and the keys inside each sequence."""
    to = compute_type(v)
    scale = static_scale(q, scale, "varlen_hybrid_attention")
    position, sequence = packed_sequences(cu_seqlens, q)
    same = same_sequence(sequence)
    inside = op.And(same, window_keep(op.Unsqueeze(position, ints(1)), op.Unsqueeze(position, ints(0)), window, False))
    qh = heads_first(q, to)  # [H, T, D]
    out = _hybrid_attention(
        qh,
        transposed(heads_first(heads(k, q, -2), to), 3),
        heads_first(heads(v, q, -2), to),
        heads_first(fq, to),
        transposed(heads_first(heads(fk, q, -2), to), 3),
        _mix_gate(mix, to),
        op.Cast(op.Constant(value_float=1.0), to=to),
        inside,
        same,
        scale=scale,
        eps=float(eps),
    )
    return op.CastLike(op.Transpose(out, perm=[1, 0, 2]), v)  # [T, H, Dv]
