"""ONNX translations of the linear, hybrid and sparse attention ops: each op alone in a module, exported
with graphopt's exporter, run by onnxruntime and compared with the op itself (fp32).

The cases cover grouped-query heads, key-padding masks (bool, and additive with ``-inf``), causal
masks, rows that see no key (left padding under a causal mask), explicit and default scales, and,
for the packed ops, an empty sequence and a second packing (other ``T``, other sequence count) run
through the same file.
"""

import pytest
import torch
from torch.export import Dim

from graphopt.testing import assert_close
from tests_helpers import export_and_compare

ort = pytest.importorskip("onnxruntime")

G = torch.ops.graphopt
FP32 = {"rtol": 1e-4, "atol": 1e-5}


def _export_and_compare(tmp_path, fn, args, dynamic_shapes=None, others=()):
    return export_and_compare(tmp_path, fn, args, dynamic_shapes, others, tolerance=FP32)


_g = torch.Generator().manual_seed(0)
B, H, HK, L, D, DV = 2, 4, 2, 6, 8, 5  # grouped-query: 2 key heads for 4 query heads
q, k, v = torch.randn(B, H, L, D, generator=_g), torch.randn(B, HK, L, D, generator=_g), torch.randn(B, HK, L, DV, generator=_g)
fq, fk = torch.rand(B, H, L, 3, generator=_g), torch.rand(B, HK, L, 3, generator=_g)
mix = torch.randn(H, generator=_g)
right_pad = torch.ones(B, 1, 1, L, dtype=torch.bool)
right_pad[0, ..., 4:] = False  # key padding: the last two keys of sequence 0
left_pad = torch.ones(B, 1, 1, L, dtype=torch.bool)
left_pad[1, ..., :2] = False  # causal rows 0 and 1 of sequence 1 see no key
additive = torch.zeros(B, 1, L, L)
additive[0, ..., 3:] = float("-inf")
additive[1] = torch.randn(L, L, generator=_g)
layout = torch.tensor([[True, False], [True, True]])  # L = 6, block 4: a partial last block
head_layout = torch.tensor([[[True, False], [False, True]], [[False, False], [True, True]]]).repeat(2, 1, 1)  # [H, 2, 2], row-blocks without keys


def test_linear_attention_translation_without_mask_with_key_padding_and_causal_and_additive(tmp_path):
    def fn(fq, fk, v, pad, add):
        return (
            G.linear_attention(fq, fk, v),
            G.linear_attention(fq, fk, v, pad, True),
            G.linear_attention(fq, fk, v, add, False, 1e-3),
        )

    _export_and_compare(tmp_path, fn, (fq, fk, v, right_pad, additive))


def test_hybrid_attention_translation_without_mask_with_key_padding_causal_and_additive(tmp_path):
    def fn(q, k, v, fq, fk, mix, pad, left, add):
        return (
            G.hybrid_attention(q, k, v, fq, fk, mix, 3),
            G.hybrid_attention(q, k, v, fq, fk, mix, 2, pad),
            G.hybrid_attention(q, k, v, fq, fk, mix, 3, left, True, 0.3),  # rows whose whole window is padding
            G.hybrid_attention(q, k, v, fq, fk, mix, 2, add, True),
        )

    _export_and_compare(tmp_path, fn, (q, k, v, fq, fk, mix, right_pad, left_pad, additive))


def test_window_attention_translation_with_global_tokens_key_padding_causal_and_additive(tmp_path):
    def fn(q, k, v, pad, left, add):
        return (
            G.window_attention(q, k, v, 3, 1),
            G.window_attention(q, k, v, 4, 0, pad),
            G.window_attention(q, k, v, 2, 0, left, True, 0.2),  # rows that see no key: zeros
            G.window_attention(q, k, v, 3, 1, add, True),
        )

    _export_and_compare(tmp_path, fn, (q, k, v, right_pad, left_pad, additive))


def test_block_sparse_attention_translation_with_shared_and_per_head_layouts(tmp_path):
    def fn(q, k, v, lay, head_lay, pad):
        return (
            G.block_sparse_attention(q, k, v, lay, 4),
            G.block_sparse_attention(q, k, v, head_lay, 4, pad, True),
        )

    _export_and_compare(tmp_path, fn, (q, k, v, layout, head_layout, right_pad))


def _packed(total: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(total, heads, dim, generator=torch.Generator().manual_seed(seed))


def _packing(total: int, cu: list[int], seed: int):
    """``q, k, v, fq, fk`` packed ``[T, ·, ·]`` (``k``/``v``/``fk`` with ``HK`` heads) and ``cu_seqlens``."""
    pq, pk, pv = _packed(total, H, D, seed), _packed(total, HK, D, seed + 1), _packed(total, HK, DV, seed + 2)
    return pq, pk, pv, pq[..., :3].abs(), pk[..., :3].abs(), torch.tensor(cu)


FIRST, SECOND = _packing(9, [0, 4, 4, 9], 1), _packing(12, [0, 1, 7, 7, 10, 12], 5)  # empty sequences; a second T and count
T = Dim.AUTO
PACKED = {"q": {0: T}, "k": {0: T}, "v": {0: T}, "fq": {0: T}, "fk": {0: T}, "cu": {0: Dim.AUTO}}


def test_varlen_linear_attention_translation_matches_the_op_at_two_packings(tmp_path):
    def fn(fq, fk, v, cu):
        return (G.varlen_linear_attention(fq, fk, v, cu),)

    def pick(p):
        return (p[3], p[4], p[2], p[5])

    dims = (PACKED["fq"], PACKED["fk"], PACKED["v"], PACKED["cu"])
    _export_and_compare(tmp_path, fn, pick(FIRST), dims, [pick(SECOND)])


def test_varlen_hybrid_attention_translation_matches_the_op_at_two_packings(tmp_path):
    def fn(q, k, v, fq, fk, mix, cu):
        return (G.varlen_hybrid_attention(q, k, v, fq, fk, mix, 3, cu),)

    def pick(p):
        return (*p[:5], mix, p[5])

    dims = (PACKED["q"], PACKED["k"], PACKED["v"], PACKED["fq"], PACKED["fk"], None, PACKED["cu"])
    _export_and_compare(tmp_path, fn, pick(FIRST), dims, [pick(SECOND)])


def test_varlen_window_attention_translation_matches_the_op_at_two_packings(tmp_path):
    def fn(q, k, v, cu):
        return (G.varlen_window_attention(q, k, v, cu, 2, 1, 0.4), G.varlen_window_attention(q, k, v, cu, 3, 0))

    def pick(p):
        return (p[0], p[1], p[2], p[5])

    dims = (PACKED["q"], PACKED["k"], PACKED["v"], PACKED["cu"])
    _export_and_compare(tmp_path, fn, pick(FIRST), dims, [pick(SECOND)])


decoder = torch.ones(L, L, dtype=torch.bool).tril() & left_pad  # [B, 1, L, L]: Hugging Face's causal mask with padding, is_causal=False
decoder_additive = torch.zeros(B, 1, L, L).masked_fill(~decoder, float("-inf"))


def test_a_mask_that_hides_later_keys_gives_the_causal_window(tmp_path):
    def fn(q, k, v, fq, fk, mix, dec, dec_add, pad):
        return (
            G.hybrid_attention(q, k, v, fq, fk, mix, 3, dec),  # causal window: the last 3 keys, not |i - j| <= 1
            G.hybrid_attention(q, k, v, fq, fk, mix, 2, dec_add, False, 0.3),
            G.hybrid_attention(q, k, v, fq, fk, mix, 3, pad),  # a key mask: bidirectional window
            G.window_attention(q, k, v, 3, 1, dec),
            G.window_attention(q, k, v, 4, 0, dec_add),
            G.window_attention(q, k, v, 3, 0, pad),
        )

    args = (q, k, v, fq, fk, mix, decoder, decoder_additive, right_pad)
    outs = fn(*args)
    assert_close(outs[0], G.hybrid_attention(q, k, v, fq, fk, mix, 3, left_pad, True), **FP32)  # as is_causal with the padding
    assert_close(outs[3], G.window_attention(q, k, v, 3, 1, left_pad, True), **FP32)
    _export_and_compare(tmp_path, fn, args)
