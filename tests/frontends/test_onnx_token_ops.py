"""ONNX translations of the token-reduction ops: each op alone in a module, exported with graphopt's
exporter, run by onnxruntime and compared with the op itself (fp32) at two packings of the same file
(other ``T``, other sequence count, pads inside the rows, a sequence of one token and an empty one).
"""

import pytest
import torch
from torch.export import Dim

import graphopt.ops.token_reduction  # noqa: F401  (the ops and their records)
from graphopt.ops.token_reduction.reference import sequence_bounds, sequence_head_filter
from tests_helpers import export_and_compare

ort = pytest.importorskip("onnxruntime")

G = torch.ops.graphopt
FP32 = {"rtol": 1e-4, "atol": 1e-5}
H, D, DV = 4, 8, 5


def _export_and_compare(tmp_path, fn, args, dynamic_shapes=None, others=()):
    return export_and_compare(tmp_path, fn, args, dynamic_shapes, others, tolerance=FP32)


def _mask(lengths: list[int], width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, width]``, row ``b`` valid at ``lengths[b]`` random positions (pads anywhere in the row)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), width, dtype=dtype)
    for b, n in enumerate(lengths):
        mask[b, torch.randperm(width, generator=g)[:n]] = 1
    return mask


def _packing(lengths: list[int], width: int, seed: int, dtype: torch.dtype):
    """``q, k, v`` packed ``[T, H, ·]``, ``mask`` ``[B, width]`` and ``sizes`` ``[T]`` (positive, not all ones)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = torch.randn(total, H, D, generator=g), torch.randn(total, H, D, generator=g), torch.randn(total, H, DV, generator=g)
    q[:, 0] = 0.0  # head 0 attends uniformly: a near-uniform head, which the head filter drops
    q[:, 1] *= 6.0  # head 1 is sharp
    sizes = 1.0 + 3.0 * torch.rand(total, generator=g)
    return q, k, v, _mask(lengths, width, seed, dtype), sizes


FIRST = (5, 3)
SECOND = (2, 7, 1, 0, 4)  # a sequence of one token and an empty one
T = Dim.AUTO
PACKED = {"q": {0: T}, "k": {0: T}, "v": {0: T}, "mask": {0: Dim.AUTO, 1: Dim.AUTO}, "sizes": {0: T}}


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_varlen_attention_sized_translation_matches_the_op_at_two_packings(tmp_path, dtype):
    def fn(q, k, v, mask, sizes):
        return (G.varlen_attention_sized(q, k, v, mask, sizes), G.varlen_attention_sized(q, k, v, mask, sizes, 0.3))

    first, second = _packing(list(FIRST), 7, 0, dtype), _packing(list(SECOND), 9, 1, dtype)
    dims = (PACKED["q"], PACKED["k"], PACKED["v"], PACKED["mask"], PACKED["sizes"])
    _export_and_compare(tmp_path, fn, first, dims, [second])


def test_token_importance_translation_matches_the_op_at_two_packings(tmp_path):
    def fn(q, k, mask):
        return (G.token_importance(q, k, mask, 0.35), G.token_importance(q, k, mask, 0.35, 7, False))

    first, second = _packing(list(FIRST), 7, 2, torch.bool), _packing(list(SECOND), 9, 3, torch.bool)
    dropped = 0
    for q, k, _, mask, _ in (first, second):  # the filter has work to do: some head of some sequence is dropped
        for start, end in sequence_bounds(mask):
            if end > start:
                qs, ks = (t[start:end].transpose(0, 1) for t in (q, k))
                a = torch.softmax(qs @ ks.transpose(1, 2) * 0.35, dim=-1)
                s = torch.full((H, end - start), 1.0 / (end - start))
                for _ in range(30):
                    s = torch.einsum("hij,hi->hj", a, s)
                dropped += int((~sequence_head_filter(s)).sum())
    assert dropped > 0

    def pick(p):
        return (p[0], p[1], p[3])

    dims = (PACKED["q"], PACKED["k"], PACKED["mask"])
    _export_and_compare(tmp_path, fn, pick(first), dims, [pick(second)])


# ----------------------------------------------------------------------------- prune_tokens and merge_tokens

TOKENS = {"x": {0: T}, "importance": {0: T}, "metric": {0: T}, "sizes": {0: T}, "mask": {0: Dim.AUTO, 1: Dim.AUTO}, "x2": {0: T}}
REDUCTION = {"rtol": 1e-5, "atol": 1e-5}


def _tokens(lengths: list[int], width: int, seed: int, dtype: torch.dtype, levels: int = 0):
    """``x`` ``[T, 3, 2]``, ``importance`` ``[T]`` (rounded to ``levels`` values when given: exact ties), ``metric``
    ``[T, 4]``, ``sizes`` ``[T]`` (positive, not all ones), ``mask`` ``[B, width]`` and ``x2`` ``[T, 5]``."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x, importance, metric = torch.randn(total, 3, 2, generator=g), torch.rand(total, generator=g), torch.randn(total, 4, generator=g)
    if levels:
        importance = (importance * levels).floor() / levels
    sizes = 1.0 + 3.0 * torch.rand(total, generator=g)
    return x, importance, metric, sizes, _mask(lengths, width, seed, dtype), torch.randn(total, 5, generator=g)


def _compare_reductions(tmp_path, fn, packings):
    """``fn`` returns ``(x_out, sizes_out, mask_out)`` triples: all compared at each packing, within 1e-5."""
    dims = tuple(TOKENS[name] for name in ("x", "importance", "metric", "sizes", "mask", "x2"))
    export_and_compare(tmp_path, fn, packings[0], dims, packings[1:], tolerance=REDUCTION)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_prune_tokens_translation_matches_the_op_at_two_packings(tmp_path, dtype):
    def fn(x, importance, metric, sizes, mask, x2):
        return (
            *G.prune_tokens(x, importance, metric, sizes, mask, 0.5),
            *G.prune_tokens(x2, importance, metric, sizes, mask, 0.2, 1, 1),  # more to prune than the sources: targets go too
            *G.prune_tokens(x, importance, metric, sizes, mask, 0.6, 0, 2, False),
            *G.prune_tokens(x2, importance, metric, sizes, mask, 0.0, 0, 0, False),  # sequences emptied
        )

    packings = [_tokens([5, 3], 7, 0, dtype), _tokens([2, 7, 4], 9, 1, dtype), _tokens(list(SECOND), 9, 2, dtype)]
    _compare_reductions(tmp_path, fn, packings)


def test_prune_tokens_translation_breaks_importance_ties_as_the_op(tmp_path):
    def fn(x, importance, metric, sizes, mask, x2):
        return (*G.prune_tokens(x, importance, metric, sizes, mask, 0.4, 1, 1), *G.prune_tokens(x, importance, metric, sizes, mask, 0.5, 1, 0, False))

    packings = [_tokens([9, 6], 10, 3, torch.bool, levels=3), _tokens([12, 7, 10], 13, 4, torch.bool, levels=2)]
    assert all(len(p[1].unique()) < len(p[1]) for p in packings)
    _compare_reductions(tmp_path, fn, packings)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_merge_tokens_translation_matches_the_op_at_two_packings(tmp_path, dtype):
    def fn(x, importance, metric, sizes, mask, x2):
        return (
            *G.merge_tokens(x2, metric, sizes, mask, 2),
            *G.merge_tokens(x2, metric, sizes, mask, 100, 0, 1),  # every A token merges; several into one B token
            *G.merge_tokens(x2, metric, sizes, mask, 1, 2, 1),
            *G.merge_tokens(x2, metric, sizes, mask, 0),
        )

    packings = [_tokens([5, 3], 7, 5, dtype), _tokens([2, 7, 4], 9, 6, dtype), _tokens(list(SECOND), 9, 7, dtype)]
    _compare_reductions(tmp_path, fn, packings)
