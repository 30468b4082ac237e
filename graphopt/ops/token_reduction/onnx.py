"""ONNX translations of ``graphopt::varlen_attention_sized``, ``token_importance``, ``prune_tokens`` and ``merge_tokens``.

ONNX has no op for either, so each is a function of the custom domain ``graphopt`` (version 1) whose
body is standard ONNX ops (opset 18), called from a Python wrapper that specialises what onnxscript
functions cannot take (``scale=None``, the number of PageRank steps, the head filter switch).
``torch.onnx.export`` inlines the bodies into the graph, so the file needs no custom-op support to
run. Both work on all ``T`` packed tokens at once, as ``varlen_attention``'s translation does: the
sequence of each token is the batch column of ``NonZero(mask)`` (row-major, the pack order), and
the scores of token pairs from different sequences are ``-inf`` before the softmax (a block-diagonal
mask), so each token gets the softmax over its own sequence; ``T²`` pairs instead of ``Σ n_b²``:

* ``varlen_attention_sized(q, k, v, mask, sizes, scale)``: ``softmax(q kᵀ · scale + Log(sizes)) v``
  per head, the key bias ``Log(size_k)`` in ``q``'s dtype, as the op computes it;
* ``token_importance(q, k, mask, scale, iterations, head_filter)`` (fp32): the attention graph ``A``
  ``[H, T, T]`` (block-diagonal, row-stochastic), ``s_0 = 1/n_b`` for every token of sequence ``b``,
  then ``iterations`` steps ``s ← s A`` (``[H, 1, T]``, unrolled: ``iterations`` is static). Block
  diagonal, ``A`` keeps each sequence's scores to itself. Per-sequence sums are products with the
  ``[T, T]`` 0/1 block matrix, so each token carries its sequence's mean, variance and total. The
  head filter's medians over the ``H`` heads (``torch.quantile(0.5)``: the mean of the two middle
  values for an even ``H``, written as the ``lerp`` torch computes) come from ``TopK`` sorting the
  head axis ascending; the kept heads are averaged and each sequence normalised to sum to 1.

The script functions never call one another (a nested call stays a ``graphopt`` node the exporter
does not inline): the wrappers compose them, and their outputs are annotated ``[...]`` (a bare
``BOOL`` or ``FLOAT`` output reads as a scalar to shape inference).

``prune_tokens`` and ``merge_tokens`` work, as the ops' CPU forms (:mod:`graphopt.ops.token_reduction.cpu`)
do, on the packed rows laid out as a padded ``[B, n_max]`` index (``rows``: each sequence's offset
``CumSum(lengths) - lengths`` plus the position, clamped to a valid row at pads; ``valid``); every
count per sequence is a ``[B, 1]`` column. Ranks (largest first) are ``TopK`` (sorted) over a row,
scattered back with ``ScatterElements``: ONNX's ``TopK`` puts equal values in index order, so the
rank is the CPU form's stable sort's. ``T'`` is data-dependent: the kept rows are ``Compress``ed in
(batch, position) order, and ``mask_out`` is ``Range(S) < n'_b`` cast to ``mask``'s dtype:

* ``prune_tokens(x, importance, metric, sizes, mask, keep_ratio, protect_first, protect_last,
  similarity)``: ``n' = clamp(Ceil(keep_ratio · n), min(protected, n), n)`` with the product in
  float64 (``keep_ratio`` a ``DOUBLE`` constant, so ``ceil`` sees the op's product); the free tokens
  ranked by importance (``-inf`` elsewhere); without ``similarity`` the last ``n - n'`` of them are
  pruned; with it, the S-stage: the cosine similarities of the dense ``metric`` rows as one
  ``[B, n_max, n_max]`` ``MatMul`` (``F.normalize``'s ``1e-12`` floor), each source's ``ReduceMax`` over
  the targets and protected tokens, ranked again for the ``min(p, |source|)`` to prune, and the least
  important targets when the sources do not suffice. The kept rows are ``Gather``ed from ``x``, their
  sizes multiplied by ``Σ sizes / Σ kept sizes`` of their sequence (fp32, cast back);
* ``merge_tokens(x, metric, sizes, mask, r, protect_first, protect_last)``: ``A`` and ``B`` as padded
  ``[B, n_A]`` and ``[B, n_B]`` row indices (at least one column each; pads read a zero row appended
  to the unit ``metric``), the scores ``[B, n_A, n_B]`` ``-inf`` at pad columns, each match by
  ``ArgMax`` (the first on ties), the ``r_b`` best ``A`` tokens by their rank. ``ScatterND`` with
  ``reduction="add"`` sums ``x · size`` and the sizes at the destinations (fp32; several sources
  into one destination accumulate), the destinations get ``Σ x · size / Σ size`` cast to ``x``'s
  dtype, every other row keeps ``x`` exactly (``Where``), and the sources are dropped.

Ties: equal importances, and similarities of identical ``metric`` vectors, tie alike in both forms
and resolve alike (the earlier token first). Similarities that are equal only mathematically (of
different vectors) may round differently in onnxruntime's ``MatMul`` than in torch's, so such a tie
can resolve the other way. The cost is the CPU form's: ``B · n_max²`` similarities.

Imported only by the exporter (through the records' ``onnx`` loaders).
"""

from __future__ import annotations


import onnxscript
from onnxscript import BOOL, DOUBLE, FLOAT, INT64, ir
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat, TTensor, TTensor2

from graphopt.ops.linear_attention.onnx import static_scale
from graphopt.ops.token_reduction.reference import HEAD_FILTER_MADS, HEAD_FILTER_TOLERANCE

# The annotations are not decoration: the exporter reads a function's inputs and outputs from them.

__all__ = ["DOMAIN", "merge_tokens", "prune_tokens", "token_importance", "varlen_attention_sized"]

DOMAIN = onnxscript.values.Opset("graphopt", 1)
"""The custom domain of the functions: nodes ``graphopt::varlen_attention_sized`` etc. in the ONNX graph."""

_TINY_VARIANCE = 1e-30  # the reference's variance floor before the log


@onnxscript.script(DOMAIN)
def _same_sequence(mask: TTensor2) -> BOOL[...]:
    # the sequence of each packed token: the batch column of NonZero(mask), row-major (the pack order)
    valid = op.Cast(mask, to=9)  # BOOL: nonzero is valid
    index = op.Transpose(op.NonZero(valid), perm=[1, 0])  # [T, 2]
    sequence = op.Squeeze(op.Slice(index, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[1])), op.Constant(value_ints=[1]))
    return op.Equal(op.Unsqueeze(sequence, op.Constant(value_ints=[1])), op.Unsqueeze(sequence, op.Constant(value_ints=[0])))  # [T, T]


@onnxscript.script(DOMAIN)
def _varlen_attention_sized(q: TFloat, k: TFloat, v: TFloat, same: BOOL[...], sizes: TFloat, scale: float) -> TFloat:
    heads_q = op.Transpose(q, perm=[1, 0, 2])  # [H, T, D]
    heads_k = op.Transpose(k, perm=[1, 2, 0])  # [H, D, T]
    heads_v = op.Transpose(v, perm=[1, 0, 2])  # [H, T, Dv]
    bias = op.Log(op.CastLike(sizes, q))  # [T]: broadcast over the keys
    scores = op.Add(op.Mul(op.MatMul(heads_q, heads_k), op.CastLike(op.Constant(value_float=scale), q)), bias)
    masked = op.Where(same, scores, op.CastLike(op.Constant(value_float=float("-inf")), q))
    weights = op.Softmax(masked, axis=-1)
    return op.Transpose(op.MatMul(weights, heads_v), perm=[1, 0, 2])  # [T, H, Dv]


@onnxscript.script(DOMAIN)
def _attention_graph(q: TFloat, k: TFloat, same: BOOL[...], scale: float) -> FLOAT[...]:
    # A [H, T, T] in fp32: each token's softmax over the keys of its own sequence
    heads_q = op.Transpose(op.Cast(q, to=1), perm=[1, 0, 2])  # [H, T, D]
    heads_k = op.Transpose(op.Cast(k, to=1), perm=[1, 2, 0])  # [H, D, T]
    logits = op.MatMul(op.Mul(heads_q, op.Constant(value_float=scale)), heads_k)
    return op.Softmax(op.Where(same, logits, op.Constant(value_float=float("-inf"))), axis=-1)


@onnxscript.script(DOMAIN)
def _head_median(x: FLOAT[...]) -> FLOAT[...]:
    # torch.quantile(x, 0.5, dim=0) of x [H, T]: the middle value, or lerp of the two middle ones (weight 0.5)
    heads = op.Shape(x, start=0, end=1)  # [1]
    ascending, _ = op.TopK(x, heads, axis=0, largest=0, sorted=1)
    lower = op.Gather(ascending, op.Div(op.Sub(heads, op.Constant(value_ints=[1])), op.Constant(value_ints=[2])), axis=0)  # [1, T]
    upper = op.Gather(ascending, op.Div(heads, op.Constant(value_ints=[2])), axis=0)
    half = op.Constant(value_float=0.5)
    odd = op.Equal(op.Mod(heads, op.Constant(value_ints=[2])), op.Constant(value_ints=[1]))
    return op.Where(odd, lower, op.Sub(upper, op.Mul(op.Sub(upper, lower), half)))  # [1, T]


@onnxscript.script(DOMAIN)
def _log_variance(scores: FLOAT[...], block: FLOAT[...], count: FLOAT[...], tiny: float) -> FLOAT[...]:
    # each token's sequence's log score variance per head [H, T] (population variance, floored)
    mean = op.Div(op.MatMul(scores, block), count)  # [H, T]: the mean of the token's sequence
    deviation = op.Sub(scores, mean)
    variance = op.Div(op.MatMul(op.Mul(deviation, deviation), block), count)
    return op.Log(op.Max(variance, op.Constant(value_float=tiny)))


@onnxscript.script(DOMAIN)
def _spread(x: FLOAT[...], median: FLOAT[...]) -> FLOAT[...]:
    return op.Abs(op.Sub(x, median))


@onnxscript.script(DOMAIN)
def _within(spread: FLOAT[...], mad: FLOAT[...], mads: float, tolerance: float) -> FLOAT[...]:
    # 1/0 [H, T]: the heads whose spread is at most mads · MAD + tolerance
    threshold = op.Add(op.Mul(mad, op.Constant(value_float=mads)), op.Constant(value_float=tolerance))
    return op.Cast(op.LessOrEqual(spread, threshold), to=1)


@onnxscript.script(DOMAIN)
def _combine_heads(scores: FLOAT[...], heads: FLOAT[...], block: FLOAT[...]) -> FLOAT[...]:
    # the kept heads' mean [T], normalised to sum to 1 over each sequence
    axis = op.Constant(value_ints=[0])
    combined = op.Div(op.ReduceSum(op.Mul(scores, heads), axis, keepdims=0), op.ReduceSum(heads, axis, keepdims=0))
    return op.Div(combined, op.MatMul(combined, block))


def _kept_heads(scores, block, count):
    """The variance-based head filter, 1/0 ``[H, T]``: each token carries its sequence's choice of heads."""
    log_variance = _log_variance(scores, block, count, tiny=_TINY_VARIANCE)
    spread = _spread(log_variance, _head_median(log_variance))
    return _within(spread, _head_median(spread), mads=HEAD_FILTER_MADS * 1.4826, tolerance=HEAD_FILTER_TOLERANCE)


def varlen_attention_sized(q, k, v, mask, sizes, scale: float | None = None):
    """``graphopt::varlen_attention_sized``: all packed tokens at once, ``Log(sizes)`` as a key bias."""
    return _varlen_attention_sized(q, k, v, _same_sequence(mask), op.CastLike(sizes, q), scale=static_scale(q, scale, "varlen_attention_sized"))


def token_importance(q, k, mask, scale: float, iterations: int = 30, head_filter: bool = True):
    """``graphopt::token_importance``: the block-diagonal attention graph, ``iterations`` unrolled PageRank steps, the head filter."""
    same = _same_sequence(mask)
    attention = _attention_graph(q, k, same, scale=float(scale))  # [H, T, T]
    block = op.Cast(same, to=ir.DataType.FLOAT)  # [T, T]
    count = op.ReduceSum(block, op.Constant(value_ints=[0]), keepdims=1)  # [1, T]: n_b of each token's sequence
    scores = op.Expand(op.Reciprocal(op.Unsqueeze(count, op.Constant(value_ints=[0]))), op.Concat(op.Shape(q, start=1, end=2), op.Shape(count), axis=0))
    for _ in range(int(iterations)):
        scores = op.MatMul(scores, attention)  # s ← s A, [H, 1, T]
    scores = op.Squeeze(scores, op.Constant(value_ints=[1]))  # [H, T]
    if head_filter:
        heads = _kept_heads(scores, block, count)
    else:
        heads = op.Expand(op.Constant(value_float=1.0), op.Shape(scores))
    return _combine_heads(scores, heads, block)


# ----------------------------------------------------------------------------- pruning and merging (the padded [B, n_max] index)

_FLOAT_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny: the floor of a kept size total


@onnxscript.script(DOMAIN)
def _dense_rows(x: TTensor, mask: TTensor2) -> tuple[INT64[...], INT64[...], BOOL[...], INT64[...], INT64[...]]:
    # lengths [B, 1]; rows [B, n_max]: the packed row of each sequence's i-th token (clamped to a valid row at pads);
    # valid [B, n_max]; positions [1, n_max]; n_max [1]
    lengths = op.ReduceSum(op.Cast(op.Cast(mask, to=9), to=7), op.Constant(value_ints=[1]), keepdims=1)  # [B, 1]
    longest = op.Max(op.ReduceMax(lengths, keepdims=0), op.Constant(value_int=0))
    positions = op.Unsqueeze(op.Range(op.Constant(value_int=0), longest, op.Constant(value_int=1)), op.Constant(value_ints=[0]))
    starts = op.Sub(op.CumSum(lengths, op.Constant(value_int=0)), lengths)
    valid = op.Less(positions, lengths)
    last = op.Max(op.Sub(op.Shape(x, start=0, end=1), op.Constant(value_ints=[1])), op.Constant(value_ints=[0]))
    rows = op.Min(op.Add(starts, positions), last)
    return lengths, rows, valid, positions, op.Reshape(longest, op.Constant(value_ints=[1]))


@onnxscript.script(DOMAIN)
def _stable_rank(scores: FLOAT[...], positions: INT64[...], count: INT64[...]) -> INT64[...]:
    # each entry's rank in its row of scores [B, n], largest first, equal scores in position order
    # (TopK breaks ties by the lower index); positions [1, n], count [1] = n
    _, order = op.TopK(scores, count, axis=1, largest=1, sorted=1)
    ranks = op.Add(op.Mul(order, op.Constant(value_int=0)), positions)  # [B, n]: 0, 1, ... in each row
    return op.ScatterElements(order, order, ranks, axis=1)


@onnxscript.script(DOMAIN)
def _reduced_mask(mask: TTensor2, kept: INT64[...]) -> TTensor2:
    # ones in the first kept[b] positions of row b (kept [B, 1]), mask's dtype
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(mask, start=1, end=2)), op.Constant(value_int=1))
    return op.CastLike(op.Less(op.Unsqueeze(positions, op.Constant(value_ints=[0])), kept), mask)


@onnxscript.script(DOMAIN)
def _kept_count(lengths: INT64[...], keep_ratio: DOUBLE[...], protected: int) -> INT64[...]:
    # n' = clamp(ceil(keep_ratio * n), min(protected, n), n), the product in float64
    ceiling = op.Cast(op.Ceil(op.Mul(op.Cast(lengths, to=11), keep_ratio)), to=7)
    return op.Max(op.Min(ceiling, lengths), op.Min(lengths, op.Constant(value_int=protected)))


@onnxscript.script(DOMAIN)
def _free_tokens(
    importance: TFloat, rows: INT64[...], valid: BOOL[...], lengths: INT64[...], positions: INT64[...], protect_first: int, protect_last: int
) -> tuple[BOOL[...], BOOL[...], FLOAT[...]]:
    # protected and free (unprotected) tokens [B, n_max], and the importance scores to rank the free ones by (-inf elsewhere)
    first = op.Less(positions, op.Constant(value_int=protect_first))
    last = op.GreaterOrEqual(positions, op.Sub(lengths, op.Constant(value_int=protect_last)))
    protected = op.And(valid, op.Or(first, last))
    free = op.And(valid, op.Not(protected))
    scores = op.Where(free, op.Gather(op.Cast(importance, to=1), rows, axis=0), op.Constant(value_float=float("-inf")))
    return protected, free, scores


@onnxscript.script(DOMAIN)
def _least_important(free: BOOL[...], rank: INT64[...], lengths: INT64[...], keep: INT64[...]) -> BOOL[...]:
    # pruned without the S-stage: the n - n' least important free tokens
    free_count = op.ReduceSum(op.Cast(free, to=7), op.Constant(value_ints=[1]), keepdims=1)
    return op.And(free, op.GreaterOrEqual(rank, op.Sub(free_count, op.Sub(lengths, keep))))


@onnxscript.script(DOMAIN)
def _similarity_stage(
    metric: TFloat, rows: INT64[...], protected: BOOL[...], free: BOOL[...], rank: INT64[...], lengths: INT64[...], keep: INT64[...]
) -> tuple[BOOL[...], BOOL[...], INT64[...], FLOAT[...]]:
    # the importance groups: the pruned targets (when the sources do not suffice), the sources, how many
    # sources go, and each source's largest cosine similarity to a kept token (target or protected; -inf elsewhere)
    column = op.Constant(value_ints=[1])
    free_count = op.ReduceSum(op.Cast(free, to=7), column, keepdims=1)
    to_prune = op.Sub(lengths, keep)
    targets_count = op.Div(op.Add(free_count, op.Constant(value_int=1)), op.Constant(value_int=2))
    targets = op.And(free, op.Less(rank, targets_count))
    sources = op.And(free, op.Not(targets))
    from_sources = op.Min(to_prune, op.Sub(free_count, targets_count))
    kept_targets = op.Sub(targets_count, op.Sub(to_prune, from_sources))
    pruned_targets = op.And(targets, op.GreaterOrEqual(rank, kept_targets))
    dense = op.Gather(op.Cast(metric, to=1), rows, axis=0)  # [B, n_max, C]
    unit = op.Div(dense, op.Max(op.ReduceL2(dense, op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=1e-12)))
    similar = op.MatMul(unit, op.Transpose(unit, perm=[0, 2, 1]))  # [B, n_max, n_max]
    minus_inf = op.Constant(value_float=float("-inf"))
    anchors = op.Unsqueeze(op.Or(targets, protected), column)  # [B, 1, n_max]
    closest = op.ReduceMax(op.Where(anchors, similar, minus_inf), op.Constant(value_ints=[-1]), keepdims=0)
    return pruned_targets, sources, from_sources, op.Where(sources, closest, minus_inf)


@onnxscript.script(DOMAIN)
def _most_similar(pruned_targets: BOOL[...], sources: BOOL[...], from_sources: INT64[...], closest_rank: INT64[...]) -> BOOL[...]:
    # pruned with the S-stage: the from_sources most similar sources, and the pruned targets
    first = op.Less(closest_rank, from_sources)
    return op.Or(pruned_targets, op.And(sources, first))


@onnxscript.script(DOMAIN)
def _kept_tokens(x: TTensor, sizes: TFloat, rows: INT64[...], valid: BOOL[...], pruned: BOOL[...]) -> tuple[TTensor, TFloat]:
    # the kept rows in order, their sizes scaled by Σ sizes / Σ kept sizes of their sequence
    kept = op.And(valid, op.Not(pruned))
    dense = op.Gather(op.Cast(sizes, to=1), rows, axis=0)  # [B, n_max]
    zero = op.Constant(value_float=0.0)
    column = op.Constant(value_ints=[1])
    whole = op.ReduceSum(op.Where(valid, dense, zero), column, keepdims=1)
    left = op.Max(op.ReduceSum(op.Where(kept, dense, zero), column, keepdims=1), op.Constant(value_float=_FLOAT_TINY))
    flat_kept = op.Reshape(kept, op.Constant(value_ints=[-1]))
    kept_rows = op.Compress(op.Reshape(rows, op.Constant(value_ints=[-1])), flat_kept, axis=0)
    scaled = op.Reshape(op.Mul(dense, op.Div(whole, left)), op.Constant(value_ints=[-1]))
    return op.Gather(x, kept_rows, axis=0), op.CastLike(op.Compress(scaled, flat_kept, axis=0), sizes)


@onnxscript.script(DOMAIN)
def _bipartite_matches(
    x: TTensor, metric: TFloat, mask: TTensor2, r: int, first: int, protected: int
) -> tuple[INT64[...], INT64[...], BOOL[...], INT64[...], INT64[...], FLOAT[...], INT64[...], INT64[...], INT64[...]]:
    # ToMe's sets as padded [B, n_A] and [B, n_B] rows (at least one column; pads read an appended zero row),
    # each A token's best score (-inf at pads) and first best B token; the merge and kept counts [B, 1]
    column = op.Constant(value_ints=[1])
    zero, one, two = op.Constant(value_int=0), op.Constant(value_int=1), op.Constant(value_int=2)
    lengths = op.ReduceSum(op.Cast(op.Cast(mask, to=9), to=7), column, keepdims=1)  # [B, 1]
    free_count = op.Max(op.Sub(lengths, op.Constant(value_int=protected)), zero)
    count_a, count_b = op.Div(op.Add(free_count, one), two), op.Div(free_count, two)
    merges = op.Where(op.Greater(count_b, zero), op.Min(count_a, op.Constant(value_int=r)), zero)
    starts = op.Add(op.Sub(op.CumSum(lengths, zero), lengths), op.Constant(value_int=first))
    largest_a = op.Max(op.ReduceMax(count_a, keepdims=0), one)
    largest_b = op.Max(op.ReduceMax(count_b, keepdims=0), one)
    index_a = op.Unsqueeze(op.Range(zero, largest_a, one), op.Constant(value_ints=[0]))  # [1, n_A]
    index_b = op.Unsqueeze(op.Range(zero, largest_b, one), op.Constant(value_ints=[0]))
    valid_a, valid_b = op.Less(index_a, count_a), op.Less(index_b, count_b)
    total = op.Squeeze(op.Shape(x, start=0, end=1))
    rows_a = op.Min(op.Add(starts, op.Mul(index_a, two)), total)
    rows_b = op.Min(op.Add(op.Add(starts, op.Mul(index_b, two)), one), total)
    unit = op.Cast(metric, to=1)
    unit = op.Div(unit, op.Max(op.ReduceL2(unit, op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=1e-12)))
    zero_row = op.Expand(op.Constant(value_float=0.0), op.Concat(column, op.Shape(metric, start=1), axis=0))
    padded = op.Concat(unit, zero_row, axis=0)
    scores = op.MatMul(op.Gather(padded, rows_a, axis=0), op.Transpose(op.Gather(padded, rows_b, axis=0), perm=[0, 2, 1]))  # [B, n_A, n_B]
    minus_inf = op.Constant(value_float=float("-inf"))
    scores = op.Where(op.Unsqueeze(valid_b, column), scores, minus_inf)
    best = op.Where(valid_a, op.ReduceMax(scores, op.Constant(value_ints=[-1]), keepdims=0), minus_inf)
    match = op.ArgMax(scores, axis=-1, keepdims=0)  # the first best B token
    return merges, op.Sub(lengths, merges), valid_a, rows_a, rows_b, best, match, index_a, op.Reshape(largest_a, op.Constant(value_ints=[1]))


@onnxscript.script(DOMAIN)
def _merged(
    x: TTensor, sizes: TFloat, merges: INT64[...], valid_a: BOOL[...], rows_a: INT64[...], rows_b: INT64[...], match: INT64[...], rank: INT64[...]
) -> tuple[TTensor, TFloat]:
    # the merges[b] best A tokens go into their matches: size-weighted sums there (fp32), sizes add; other rows keep x
    column = op.Constant(value_ints=[1])
    flat = op.Constant(value_ints=[-1])
    merged = op.Reshape(op.And(valid_a, op.Less(rank, merges)), flat)
    sources = op.Unsqueeze(op.Compress(op.Reshape(rows_a, flat), merged, axis=0), column)  # [M, 1]
    destinations = op.Unsqueeze(op.Compress(op.Reshape(op.GatherElements(rows_b, match, axis=1), flat), merged, axis=0), column)
    ones = op.Compress(op.Cast(merged, to=1), merged, axis=0)  # [M]
    sizes_f = op.Cast(sizes, to=1)
    weighted = op.Mul(op.Cast(x, to=1), op.Unsqueeze(sizes_f, column))
    summed = op.ScatterND(weighted, destinations, op.GatherND(weighted, sources), reduction="add")
    totals = op.ScatterND(sizes_f, destinations, op.GatherND(sizes_f, sources), reduction="add")
    zero = op.Constant(value_float=0.0)
    zeros = op.Mul(sizes_f, zero)
    is_destination = op.Greater(op.ScatterND(zeros, destinations, ones, reduction="add"), zero)
    kept = op.Not(op.Greater(op.ScatterND(zeros, sources, ones, reduction="add"), zero))
    out = op.Where(op.Unsqueeze(is_destination, column), op.CastLike(op.Div(summed, op.Unsqueeze(totals, column)), x), x)
    return op.Compress(out, kept, axis=0), op.CastLike(op.Compress(totals, kept, axis=0), sizes)


def prune_tokens(x, importance, metric, sizes, mask, keep_ratio: float, protect_first: int = 1, protect_last: int = 0, similarity: bool = True):
    """``graphopt::prune_tokens``: the choice on the padded ``[B, n_max]`` index, the kept rows gathered."""
    lengths, rows, valid, positions, longest = _dense_rows(x, mask)
    ratio = op.Constant(value=ir.tensor(float(keep_ratio), dtype=ir.DataType.DOUBLE))  # ceil of the float64 product, as the op
    keep = _kept_count(lengths, ratio, protected=max(int(protect_first) + int(protect_last), 0))
    protected, free, scores = _free_tokens(importance, rows, valid, lengths, positions, protect_first=int(protect_first), protect_last=int(protect_last))
    rank = _stable_rank(scores, positions, longest)
    if similarity:
        pruned_targets, sources, from_sources, closest = _similarity_stage(metric, rows, protected, free, rank, lengths, keep)
        pruned = _most_similar(pruned_targets, sources, from_sources, _stable_rank(closest, positions, longest))
    else:
        pruned = _least_important(free, rank, lengths, keep)
    x_out, sizes_out = _kept_tokens(x, sizes, rows, valid, pruned)
    return x_out, sizes_out, _reduced_mask(mask, keep)


def merge_tokens(x, metric, sizes, mask, r: int, protect_first: int = 1, protect_last: int = 0):
    """``graphopt::merge_tokens``: ToMe's bipartite matching on padded ``[B, |A|]`` and ``[B, |B|]`` sets."""
    first, last = max(int(protect_first), 0), max(int(protect_last), 0)
    matches = _bipartite_matches(x, metric, mask, r=max(int(r), 0), first=first, protected=first + last)
    merges, kept, valid_a, rows_a, rows_b, best, match, index_a, largest_a = matches
    x_out, sizes_out = _merged(x, sizes, merges, valid_a, rows_a, rows_b, match, _stable_rank(best, index_a, largest_a))
    return x_out, sizes_out, _reduced_mask(mask, kept)
