"""ONNX translations of ``graphopt::window_attention``, ``block_sparse_attention`` and ``varlen_window_attention``.

ONNX has no op for any of them, so each is a call of one function of the custom domain ``graphopt``
(version 1), masked softmax attention, whose body is standard ONNX ops (opset 18); a Python wrapper
builds the function's tensor inputs from what onnxscript functions cannot take (an optional
``attn_mask``, ``is_causal``, grouped-query heads, ``scale=None``). ``torch.onnx.export`` inlines
the body into the graph, so the file needs no custom-op support to run. Each computes the dense
``[L, S]`` definition of :mod:`graphopt.ops.sparse_attention.reference` (all ``L · S`` scores, the
invisible ones set to ``-inf``), not the op's kernels that compute the visible blocks alone:

* the function: ``scores = q kᵀ · scale + bias``, ``-inf`` where ``keep`` is False, ``Softmax``; a
  row whose every score is ``-inf`` gives zeros (as ATen's SDPA and the reference). ``bias`` is
  SDPA's ``attn_mask``: an additive mask as it is, a bool one as 0 / ``-inf``, 0 without one;
* ``window_attention(q, k, v, window, global_tokens, attn_mask, is_causal, scale)``: ``keep`` is the
  window (``i − window < j <= i`` causal, by ``is_causal`` or a mask that hides every later key,
  ``|i − j| <= window // 2`` otherwise) or ``j <
  global_tokens`` or ``i < global_tokens``, and ``j <= i`` when causal, from ``Range`` comparisons;
* ``block_sparse_attention(q, k, v, layout, block_size, attn_mask, is_causal, scale)``: ``keep`` is
  ``layout[.., i // block_size, j // block_size]`` (two ``Gather``), and ``j <= i`` when causal; the
  layout's shape is not checked in the graph (the op checks it);
* ``varlen_window_attention(q, k, v, cu_seqlens, window, global_tokens, scale)``: all ``T`` packed
  tokens at once, heads first, ``keep`` the block-diagonal mask of ``cu_seqlens`` (as
  ``varlen_attention``'s translation builds it) and the bidirectional window pattern with positions
  counted from each sequence's first token; ``T²`` scores instead of ``Σ L_b²``.

Scores compute in fp32 (fp64 for fp64 inputs), outputs in ``q``'s dtype; grouped-query ``k``/``v``
repeat their heads; ``scale=None`` is ``1 / sqrt(D)`` (``D`` static). The helpers are those of
:mod:`graphopt.ops.linear_attention.onnx`. Imported only by the exporter (through the records' ``onnx`` loaders).
"""

from __future__ import annotations

import onnxscript
from onnxscript import BOOL, ir
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat

from graphopt.ops.linear_attention.onnx import (
    DOMAIN,
    causal_keep,
    compute_type,
    heads,
    heads_first,
    int_scalar,
    ints,
    packed_sequences,
    rank,
    row_col,
    same_sequence,
    static_scale,
    transposed,
    window_keep,
    window_keep_for,
)

# The annotations are not decoration: the exporter reads a function's inputs and outputs from them.

__all__ = ["DOMAIN", "block_sparse_attention", "varlen_window_attention", "window_attention"]


@onnxscript.script(DOMAIN)
def _masked_attention(q: TFloat, kt: TFloat, val: TFloat, bias: TFloat, keep: BOOL, scale: float) -> TFloat:
    # q [.., L, D], kt [.., D, S], val [.., S, Dv]; bias and keep broadcast to [.., L, S]
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    scores = op.Add(op.Mul(op.MatMul(q, kt), op.CastLike(op.Constant(value_float=scale), q)), bias)
    scores = op.Where(keep, scores, op.CastLike(op.Constant(value_float=float("-inf")), q))
    empty = op.IsInf(op.ReduceMax(scores, op.Constant(value_ints=[-1]), keepdims=1), detect_positive=0)  # every key masked
    weights = op.Where(empty, zero, op.Softmax(op.Where(empty, zero, scores), axis=-1))
    return op.MatMul(weights, val)


def _mask_bias(attn_mask, to: ir.DataType):
    """SDPA's ``attn_mask`` as an additive bias: bool as 0 / ``-inf``, a float mask as it is; ``None``: a scalar 0."""
    zero = op.Cast(op.Constant(value_float=0.0), to=to)
    if attn_mask is None:
        return zero
    if attn_mask.dtype == ir.DataType.BOOL:
        return op.Where(attn_mask, zero, op.Cast(op.Constant(value_float=float("-inf")), to=to))
    return op.Cast(attn_mask, to=to)


def _dense(q, k, v, keep, attn_mask, scale: float | None, name: str):
    """The function on ``[.., H, L, ·]`` operands: heads repeated, cast, keys transposed; output in ``q``'s dtype."""
    to = compute_type(q)
    out = _masked_attention(
        op.Cast(q, to=to),
        transposed(op.Cast(heads(k, q), to=to), rank(k, name)),
        op.Cast(heads(v, q), to=to),
        _mask_bias(attn_mask, to),
        keep,
        scale=static_scale(q, scale, name),
    )
    return op.CastLike(out, q)


def _window_pattern(i, j, window: int, global_tokens: int, is_causal: bool, inside=None):
    """The reference's ``window_pattern_keep`` of positions ``i`` ``[L, 1]`` and ``j`` ``[1, S]`` (``inside``: the window, if not ``window_keep``'s)."""
    g = int_scalar(global_tokens)
    inside = window_keep(i, j, window, is_causal) if inside is None else inside
    keep = op.Or(op.Or(inside, op.Less(j, g)), op.Less(i, g))
    return op.And(keep, causal_keep(i, j)) if is_causal else keep


def window_attention(q, k, v, window: int, global_tokens: int, attn_mask=None, is_causal: bool = False, scale: float | None = None):
    """``graphopt::window_attention``: dense masked softmax over the window + global pattern (the window causal
    when ``is_causal`` or when the mask hides every later key, decided at run time)."""
    i, j = row_col(q, k)
    inside = window_keep_for(i, j, window, is_causal, attn_mask, q, k)
    return _dense(q, k, v, _window_pattern(i, j, window, global_tokens, is_causal, inside), attn_mask, scale, "window_attention")


def block_sparse_attention(q, k, v, layout, block_size: int, attn_mask=None, is_causal: bool = False, scale: float | None = None):
    """``graphopt::block_sparse_attention``: dense masked softmax over the token mask of the block layout."""
    i, j = row_col(q, k)
    size = int_scalar(block_size)
    rows = op.Squeeze(op.Div(i, size), ints(1))  # [L]: each query's block
    cols = op.Squeeze(op.Div(j, size), ints(0))  # [S]
    keep = op.Gather(op.Gather(op.Cast(layout, to=ir.DataType.BOOL), rows, axis=-2), cols, axis=-1)  # [.., L, S]
    if is_causal:
        keep = op.And(keep, causal_keep(i, j))
    return _dense(q, k, v, keep, attn_mask, scale, "block_sparse_attention")


def varlen_window_attention(q, k, v, cu_seqlens, window: int, global_tokens: int, scale: float | None = None):
    """``graphopt::varlen_window_attention``: all packed tokens at once, the pattern inside each sequence."""
    to = compute_type(q)
    position, sequence = packed_sequences(cu_seqlens, q)
    relative = op.Sub(position, op.Gather(cu_seqlens, sequence, axis=0))  # position in its sequence
    i, j = op.Unsqueeze(relative, ints(1)), op.Unsqueeze(relative, ints(0))
    keep = op.And(same_sequence(sequence), _window_pattern(i, j, window, global_tokens, False))
    qh = heads_first(q, to)  # [H, T, D]
    out = _masked_attention(
        qh,
        transposed(heads_first(heads(k, q, -2), to), 3),
        heads_first(heads(v, q, -2), to),
        op.Cast(op.Constant(value_float=0.0), to=to),
        keep,
        scale=static_scale(q, scale, "varlen_window_attention"),
    )
    return op.CastLike(op.Transpose(out, perm=[1, 0, 2]), q)  # [T, H, Dv]
