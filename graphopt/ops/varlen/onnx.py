"""ONNX translations of ``graphopt::pack_tokens``, ``unpack_tokens``, ``varlen_attention``, ``sum_tokens`` and ``select_token``.

ONNX has no op for any of them, so each is a function of the custom domain ``graphopt`` (version 1)
whose body is standard ONNX ops (opset 18). ``torch.onnx.export`` inlines the bodies into the graph
(its opset conversion needs inlined models), so the file needs no custom-op support to run:

* ``pack_tokens(x, mask)``: ``GatherND`` of ``x`` at ``NonZero(mask)``: the valid tokens in
  row-major (batch, position) order, as ``x[mask != 0]``;
* ``unpack_tokens(packed, mask)``: ``ScatterND`` of the packed rows into zeros of ``[B, S, *rest]``
  at the same indices;
* ``varlen_attention(q, k, v, cu_seqlens, scale)``: attention of all ``T`` packed tokens to all,
  with the scores of token pairs from different sequences set to ``-inf`` before the softmax (a
  block-diagonal mask built from ``cu_seqlens``). The masked pairs contribute exactly zero, so
  each token gets the softmax over its own sequence, as the op computes it; the cost is ``T²``
  scores instead of ``Σ L_b²``, the price of one dense kernel without loops;
* ``sum_tokens(packed, mask)``: ``ScatterND`` with ``reduction="add"`` of the packed rows into zeros
  of ``[B, *rest]`` at each token's sequence (the batch column of ``NonZero(mask)``);
* ``select_token(packed, mask, position)``: ``Gather`` of each sequence's row (its offset plus its
  valid tokens before ``position``) from the packed rows with one zero row appended, which the
  sequences whose ``position`` is a pad read.

Imported only by the exporter (through the records' ``onnx`` loaders).
"""

from __future__ import annotations

import math

import onnxscript
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import INT64, TFloat, TTensor, TTensor2

# The annotations are not decoration: the exporter reads a function's inputs and outputs from them.

__all__ = ["DOMAIN", "pack_tokens", "select_token", "sum_tokens", "unpack_tokens", "varlen_attention"]

DOMAIN = onnxscript.values.Opset("graphopt", 1)
"""The custom domain of the functions: nodes ``graphopt::pack_tokens`` etc. in the ONNX graph."""


@onnxscript.script(DOMAIN)
def _pack_tokens(x: TTensor, mask: TTensor2) -> TTensor:
    valid = op.Cast(mask, to=9)  # BOOL: nonzero is valid
    index = op.Transpose(op.NonZero(valid), perm=[1, 0])  # [T, 2], row-major
    return op.GatherND(x, index)


@onnxscript.script(DOMAIN)
def _unpack_tokens(packed: TTensor, mask: TTensor2) -> TTensor:
    valid = op.Cast(mask, to=9)
    index = op.Transpose(op.NonZero(valid), perm=[1, 0])
    shape = op.Concat(op.Shape(mask), op.Shape(packed, start=1), axis=0)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), packed), shape)
    return op.ScatterND(zeros, index, packed)


@onnxscript.script(DOMAIN)
def _varlen_attention(q: TFloat, k: TFloat, v: TFloat, cu_seqlens: INT64, scale: float) -> TFloat:
    # sequence of each packed token: how many sequence ends (cu_seqlens[1:]) are at or before it
    total = op.Shape(q, start=0, end=1)
    position = op.Range(op.Constant(value_int=0), op.Squeeze(total), op.Constant(value_int=1))
    ends = op.Slice(cu_seqlens, op.Constant(value_ints=[1]), op.Constant(value_ints=[9223372036854775807]))
    after_end = op.GreaterOrEqual(op.Unsqueeze(position, op.Constant(value_ints=[1])), op.Unsqueeze(ends, op.Constant(value_ints=[0])))
    sequence = op.ReduceSum(op.Cast(after_end, to=7), op.Constant(value_ints=[1]), keepdims=0)  # INT64 [T]
    same = op.Equal(op.Unsqueeze(sequence, op.Constant(value_ints=[1])), op.Unsqueeze(sequence, op.Constant(value_ints=[0])))  # [T, T]
    heads_q = op.Transpose(q, perm=[1, 0, 2])  # [H, T, D]
    heads_k = op.Transpose(k, perm=[1, 2, 0])  # [H, D, T]
    heads_v = op.Transpose(v, perm=[1, 0, 2])  # [H, T, Dv]
    scores = op.Mul(op.MatMul(heads_q, heads_k), op.CastLike(op.Constant(value_float=scale), q))
    masked = op.Where(same, scores, op.CastLike(op.Constant(value_float=float("-inf")), q))
    weights = op.Softmax(masked, axis=-1)
    return op.Transpose(op.MatMul(weights, heads_v), perm=[1, 0, 2])  # [T, H, Dv]


@onnxscript.script(DOMAIN)
def _sum_tokens(packed: TTensor, mask: TTensor2) -> TTensor:
    valid = op.Cast(mask, to=9)
    index = op.Transpose(op.NonZero(valid), perm=[1, 0])  # [T, 2], row-major: the pack order
    sequence = op.Slice(index, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[1]))  # [T, 1]
    shape = op.Concat(op.Shape(mask, start=0, end=1), op.Shape(packed, start=1), axis=0)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), packed), shape)
    return op.ScatterND(zeros, sequence, packed, reduction="add")


@onnxscript.script(DOMAIN)
def _select_token(packed: TTensor, mask: TTensor2, position: int) -> TTensor:
    valid = op.Cast(mask, to=9)
    counts = op.Cast(valid, to=7)  # INT64 [B, S]
    lengths = op.ReduceSum(counts, op.Constant(value_ints=[1]), keepdims=0)
    starts = op.Sub(op.CumSum(lengths, op.Constant(value_int=0)), lengths)
    at = op.Reshape(op.Constant(value_int=position), op.Constant(value_ints=[1]))
    before = op.ReduceSum(op.Slice(counts, op.Constant(value_ints=[0]), at, op.Constant(value_ints=[1])), op.Constant(value_ints=[1]), keepdims=0)
    present = op.Squeeze(op.Gather(valid, at, axis=1), op.Constant(value_ints=[1]))  # [B]
    total = op.Squeeze(op.Shape(packed, start=0, end=1))
    rows = op.Where(present, op.Add(starts, before), total)  # a pad reads the appended zero row
    zero_row = op.Expand(op.CastLike(op.Constant(value_float=0.0), packed), op.Concat(op.Constant(value_ints=[1]), op.Shape(packed, start=1), axis=0))
    return op.Gather(op.Concat(packed, zero_row, axis=0), rows, axis=0)


def pack_tokens(x, mask):
    """``graphopt::pack_tokens``: a call of the domain's function."""
    return _pack_tokens(x, mask)


def unpack_tokens(packed, mask):
    """``graphopt::unpack_tokens``: a call of the domain's function."""
    return _unpack_tokens(packed, mask)


def varlen_attention(q, k, v, cu_seqlens, scale: float | None = None):
    """``graphopt::varlen_attention``; ``scale`` defaults to ``1 / sqrt(D)`` as in the op (``D`` must be static)."""
    if scale is None:
        head_dim = q.shape[-1] if q.shape is not None else None
        if not isinstance(head_dim, int):
            raise ValueError(f"varlen_attention without a scale needs a static head dim to export, got {head_dim}")
        scale = 1.0 / math.sqrt(head_dim)
    return _varlen_attention(q, k, v, cu_seqlens, scale=float(scale))


def sum_tokens(packed, mask):
    """``graphopt::sum_tokens``: a call of the domain's function."""
    return _sum_tokens(packed, mask)


def select_token(packed, mask, position: int):
    """``graphopt::select_token``: a call of the domain's function."""
    return _select_token(packed, mask, position=int(position))
