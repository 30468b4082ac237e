"""graphopt.token_reduction: importance, pruning, merging, proportional attention against their references; export."""

import math

import pytest
import torch
import torch.nn.functional as F

from graphopt.ir.flops import count_flops, node_flops, record_example_run
from graphopt.ops import token_reduction as tr
from graphopt.ops import varlen
from graphopt.testing import assert_close

# rows with pads in the middle: lengths 0, 1, 7 and 5, 13, 2
MASK_A = torch.tensor(
    [
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 1, 1, 1],
    ]
)
MASK_B = torch.tensor(
    [
        [1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
    ]
)
MASKS = pytest.mark.parametrize("mask", [MASK_A, MASK_B.bool()], ids=["lengths-0-1-7", "lengths-5-13-2-bool"])
PROTECT = pytest.mark.parametrize("protect", [(1, 0), (1, 1), (0, 0), (2, 1)], ids=lambda p: f"protect{p[0]}{p[1]}")


def _inputs(mask, heads=3, head_dim=8, channels=5, hidden=6, seed=0):
    """Packed q, k, v, x (column 0 = the token's packed row), metric, sizes (positive, not all 1)."""
    g = torch.Generator().manual_seed(seed)
    total = int(mask.ne(0).sum())
    q, k, v = (torch.randn(total, heads, head_dim, generator=g) for _ in range(3))
    x = torch.randn(total, hidden, generator=g)
    x[:, 0] = torch.arange(total, dtype=torch.float32)
    metric = torch.randn(total, channels, generator=g)
    sizes = torch.rand(total, generator=g) + 0.5
    return q, k, v, x, metric, sizes


def _bounds(mask):
    lengths = mask.ne(0).sum(1).tolist()
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    return list(zip(starts, lengths, strict=True))


def _per_sequence(fn, mask, *packed, **kwargs):
    """``fn`` run on each sequence of ``mask`` alone (a one-row mask), outputs concatenated; tuple
    outputs' last element (``mask_out``) restacked."""
    outs = []
    for b, (start, n) in enumerate(_bounds(mask)):
        outs.append(fn(*(t[start : start + n] for t in packed), mask=mask[b : b + 1], **kwargs))
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


# ----------------------------------------------------------------------------- importance


@MASKS
@pytest.mark.parametrize("head_filter", [True, False])
def test_importance_matches_reference_and_sums_to_one(mask, head_filter):
    q, k, *_ = _inputs(mask)
    out = tr.token_importance(q, k, mask, 0.4, 30, head_filter)
    assert out.dtype == torch.float32 and out.shape == (q.shape[0],)
    assert_close(out, tr.token_importance_reference(q, k, mask, 0.4, 30, head_filter), rtol=1e-5, atol=1e-6)
    for start, n in _bounds(mask):
        if n:
            assert math.isclose(float(out[start : start + n].sum()), 1.0, rel_tol=1e-5)
    single = _per_sequence(lambda q, k, mask: tr.token_importance(q, k, mask, 0.4, 30, head_filter), mask, q, k)
    assert_close(out, single, rtol=1e-5, atol=1e-6)


def test_importance_of_a_token_every_query_attends_to():
    mask = torch.ones(1, 7, dtype=torch.int64)
    q = torch.zeros(7, 2, 4)
    k = torch.zeros(7, 2, 4)
    q[..., 0] = 1.0
    k[4, :, 0] = 10.0  # every query's logit to token 4 is 10 above the others
    out = tr.token_importance(q, k, mask, 1.0)
    assert int(out.argmax()) == 4 and out[4] > 0.9
    assert_close(out, tr.token_importance_reference(q, k, mask, 1.0), rtol=1e-5, atol=1e-6)


def test_head_filter_drops_a_uniform_head():
    """Four identical informative heads and one that attends uniformly (q = 0): the filter drops the
    uniform head, so the importance is the informative head's alone; the plain mean is not."""
    torch.manual_seed(4)
    mask = torch.ones(1, 9, dtype=torch.bool)
    q1, k1 = torch.randn(9, 1, 8) * 2, torch.randn(9, 1, 8)
    q = torch.cat([q1.expand(9, 4, 8), torch.zeros(9, 1, 8)], 1)
    k = torch.cat([k1.expand(9, 4, 8), k1], 1)
    informative = tr.token_importance(q1, k1, mask, 0.5, head_filter=False)
    assert_close(tr.token_importance(q, k, mask, 0.5, head_filter=True), informative, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tr.token_importance(q, k, mask, 0.5, head_filter=False), informative, rtol=1e-3, atol=1e-4)


def test_importance_chunks_and_buckets_a_larger_batch():
    torch.manual_seed(5)
    lengths = torch.randint(0, 90, (20,))
    mask = torch.arange(90) < lengths[:, None]
    q, k = torch.randn(int(lengths.sum()), 4, 16), torch.randn(int(lengths.sum()), 4, 16)
    assert_close(tr.token_importance(q, k, mask, 0.25, 10), tr.token_importance_reference(q, k, mask, 0.25, 10), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- pruning


def _check_reduction(mask, x, sizes, x_out, sizes_out, mask_out, expected_kept, protect_first, protect_last):
    """The invariants of a reduction; ``x[:, 0]`` holds each input token's packed row."""
    assert mask_out.shape == mask.shape and mask_out.dtype == mask.dtype
    kept = mask_out.ne(0).sum(1).tolist()
    assert kept == expected_kept
    assert torch.equal(mask_out.ne(0), torch.arange(mask.shape[1]) < torch.tensor(kept)[:, None])
    assert x_out.shape == (sum(kept), *x.shape[1:]) and sizes_out.shape == (sum(kept),)
    out_start = 0
    for (start, n), n_kept in zip(_bounds(mask), kept, strict=True):
        if n == 0:
            continue
        rows = x_out[out_start : out_start + n_kept, 0].long().tolist()
        assert all(start <= r < start + n for r in rows) and rows == sorted(set(rows))  # its own tokens, in order
        protected = [start + i for i in range(n) if i < protect_first or i >= n - protect_last]
        head = [start + i for i in range(min(protect_first, n))]
        tail = [start + i for i in range(max(n - protect_last, 0), n)] if protect_last else []
        assert set(protected) <= set(rows) and rows[: len(head)] == head and (not tail or rows[-len(tail) :] == tail)
        total = float(sizes_out[out_start : out_start + n_kept].sum())
        assert n_kept == 0 or math.isclose(total, float(sizes[start : start + n].sum()), rel_tol=1e-5)
        out_start += n_kept


@MASKS
@PROTECT
@pytest.mark.parametrize("similarity", [True, False], ids=["S-stage", "importance-only"])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.3, 0.5, 0.71, 1.0])
def test_prune_matches_reference_and_keeps_the_invariants(mask, protect, similarity, keep_ratio):
    q, k, _, x, metric, sizes = _inputs(mask)
    importance = tr.token_importance(q, k, mask, 0.4)
    args = (keep_ratio, *protect, similarity)
    out = tr.prune_tokens(x, importance, metric, sizes, mask, *args)
    assert_close(out, tr.prune_tokens_reference(x, importance, metric, sizes, mask, *args), rtol=1e-6, atol=1e-6)
    expected = [max(min(math.ceil(keep_ratio * n), n), min(sum(protect), n)) for n in mask.ne(0).sum(1).tolist()]
    _check_reduction(mask, x, sizes, *out, expected, *protect)
    single = _per_sequence(lambda *t, mask: tr.prune_tokens(*t, mask, *args), mask, x, importance, metric, sizes)
    assert_close(out[:2], single[:2], rtol=1e-6, atol=1e-6)
    assert torch.equal(out[2], single[2])


def test_prune_without_similarity_keeps_the_most_important():
    mask = torch.ones(1, 6, dtype=torch.int64)
    x = torch.arange(6.0)[:, None]
    importance = torch.tensor([0.01, 0.3, 0.05, 0.4, 0.04, 0.2])
    x_out, sizes_out, mask_out = tr.prune_tokens(x, importance, torch.randn(6, 3), torch.ones(6), mask, 0.5, 1, 0, False)
    assert x_out.flatten().tolist() == [0.0, 1.0, 3.0]  # CLS + the two most important, in order
    assert_close(sizes_out, torch.full((3,), 2.0), rtol=0, atol=0)
    assert mask_out.tolist() == [[1, 1, 1, 0, 0, 0]]


def test_s_stage_prunes_the_source_token_that_copies_a_kept_one():
    """Tokens 1-4 unprotected: importance makes 3 and 4 the targets, 1 and 2 the sources; token 2
    (more important than 1) is a copy of target 4, so it goes first; by importance alone 1 goes."""
    mask = torch.ones(1, 5, dtype=torch.bool)
    x = torch.arange(5.0)[:, None]
    importance = torch.tensor([0.2, 0.1, 0.15, 0.3, 0.25])
    metric = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    metric[2] = metric[4]
    pruned_similar = tr.prune_tokens(x, importance, metric, torch.ones(5), mask, 0.8, 1, 0, True)[0]
    pruned_important = tr.prune_tokens(x, importance, metric, torch.ones(5), mask, 0.8, 1, 0, False)[0]
    assert pruned_similar.flatten().tolist() == [0.0, 1.0, 3.0, 4.0]
    assert pruned_important.flatten().tolist() == [0.0, 2.0, 3.0, 4.0]


def test_redistributed_sizes_make_mean_pooling_the_weighted_mean_of_kept_tokens():
    mask = MASK_B
    q, k, _, x, metric, sizes = _inputs(mask)
    importance = tr.token_importance(q, k, mask, 0.4)
    x_out, sizes_out, mask_out = tr.prune_tokens(x, importance, metric, sizes, mask, 0.5)
    kept_rows = x_out[:, 0].long()
    pooled = varlen.sum_tokens(x_out * sizes_out[:, None], mask_out) / varlen.sum_tokens(sizes[:, None], mask)
    kept_sizes = sizes[kept_rows][:, None]
    weighted_mean = varlen.sum_tokens(x_out * kept_sizes, mask_out) / varlen.sum_tokens(kept_sizes, mask_out)
    assert_close(pooled, weighted_mean, rtol=1e-5, atol=1e-5)
    assert_close(varlen.sum_tokens(sizes_out[:, None], mask_out), varlen.sum_tokens(sizes[:, None], mask), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- merging


@MASKS
@PROTECT
@pytest.mark.parametrize("r", [0, 1, 2, 3, 10])
def test_merge_matches_reference_and_keeps_the_invariants(mask, protect, r):
    *_, x, metric, sizes = _inputs(mask)
    x_out, sizes_out, mask_out = tr.merge_tokens(x, metric, sizes, mask, r, *protect)
    assert_close((x_out, sizes_out, mask_out), tr.merge_tokens_reference(x, metric, sizes, mask, r, *protect), rtol=1e-6, atol=1e-6)
    expected = []
    for n in mask.ne(0).sum(1).tolist():
        free = max(n - min(protect[0], n) - protect[1], 0)
        expected.append(n - (min(r, (free + 1) // 2) if free >= 2 else 0))
    kept = mask_out.ne(0).sum(1).tolist()
    assert kept == expected
    assert torch.equal(mask_out.ne(0), torch.arange(mask.shape[1]) < torch.tensor(kept)[:, None])
    out_start = 0
    for (start, n), n_kept in zip(_bounds(mask), kept, strict=True):
        assert math.isclose(float(sizes_out[out_start : out_start + n_kept].sum()), float(sizes[start : start + n].sum()), rel_tol=1e-5)
        head = min(protect[0], n)
        assert torch.equal(x_out[out_start : out_start + head], x[start : start + head])  # protected: unchanged, first
        if protect[1] and n > head:
            tail = min(protect[1], n - head)
            assert torch.equal(x_out[out_start + n_kept - tail : out_start + n_kept], x[start + n - tail : start + n])
        out_start += n_kept
    single = _per_sequence(lambda *t, mask: tr.merge_tokens(*t, mask, r, *protect), mask, x, metric, sizes)
    assert_close((x_out, sizes_out), single[:2], rtol=1e-6, atol=1e-6)
    assert torch.equal(mask_out, single[2])


def test_merge_with_unit_sizes_and_r_zero_is_the_identity():
    mask = MASK_B
    *_, x, metric, _ = _inputs(mask)
    ones = torch.ones(x.shape[0])
    x_out, sizes_out, mask_out = tr.merge_tokens(x, metric, ones, mask, 0)
    assert torch.equal(x_out, x) and torch.equal(sizes_out, ones)
    assert torch.equal(mask_out.sum(1), mask.sum(1))


def test_merging_two_identical_tokens_averages_to_the_same_vector():
    mask = torch.ones(1, 4, dtype=torch.int64)
    x = torch.tensor([[9.0, 9.0], [1.0, 2.0], [1.0, 2.0], [5.0, -3.0]])
    metric = torch.tensor([[1.0, 0.0], [0.3, 1.0], [0.3, 1.0], [1.0, -1.0]])  # A = {1, 3}, B = {2}: token 1 matches 2 exactly
    x_out, sizes_out, mask_out = tr.merge_tokens(x, metric, torch.ones(4), mask, 1)
    assert torch.equal(x_out, torch.tensor([[9.0, 9.0], [1.0, 2.0], [5.0, -3.0]]))
    assert sizes_out.tolist() == [1.0, 2.0, 1.0]
    assert mask_out.tolist() == [[1, 1, 1, 0]]
    # a size-weighted average otherwise
    x_out, sizes_out, _ = tr.merge_tokens(x, metric, torch.tensor([1.0, 3.0, 1.0, 1.0]), mask, 1)
    assert sizes_out.tolist() == [1.0, 4.0, 1.0]


# ----------------------------------------------------------------------------- proportional attention


@MASKS
def test_sized_attention_with_unit_sizes_is_varlen_attention(mask):
    q, k, v, *_ = _inputs(mask)
    out = tr.varlen_attention_sized(q, k, v, mask, torch.ones(q.shape[0]), 0.3)
    assert_close(out, torch.ops.graphopt.varlen_attention(q, k, v, varlen.cu_seqlens(mask), 0.3))
    sizes = _inputs(mask)[-1]
    assert_close(tr.varlen_attention_sized(q, k, v, mask, sizes), tr.varlen_attention_sized_reference(q, k, v, mask, sizes))
    assert_close(
        tr.varlen_attention_sized(q, k, v, mask, sizes),
        _per_sequence(lambda q, k, v, s, mask: tr.varlen_attention_sized(q, k, v, mask, s), mask, q, k, v, sizes),
    )


def test_a_token_of_size_m_attends_like_m_identical_tokens():
    mask = MASK_B
    q, k, v, *_ = _inputs(mask)
    sizes = torch.randint(1, 4, (q.shape[0],))
    out = tr.varlen_attention_sized(q, k, v, mask, sizes.float())
    for start, n in _bounds(mask):
        if n == 0:
            continue
        repeats = sizes[start : start + n]
        expanded = [t[start : start + n].repeat_interleave(repeats, 0).transpose(0, 1) for t in (k, v)]
        expected = F.scaled_dot_product_attention(q[start : start + n].transpose(0, 1), *expanded).transpose(0, 1)
        assert_close(out[start : start + n], expected)


# ----------------------------------------------------------------------------- graphs


def test_opcheck():
    mask = MASK_B
    q, k, v, x, metric, sizes = _inputs(mask)
    importance = tr.token_importance(q, k, mask, 0.4)
    torch.library.opcheck(torch.ops.graphopt.token_importance.default, (q, k, mask, 0.4, 5, True))
    torch.library.opcheck(torch.ops.graphopt.prune_tokens.default, (x, importance, metric, sizes, mask, 0.5, 1, 1, True))
    torch.library.opcheck(torch.ops.graphopt.merge_tokens.default, (x, metric, sizes, mask, 2, 1, 0))
    torch.library.opcheck(torch.ops.graphopt.varlen_attention_sized.default, (q, k, v, mask, sizes, None))


class ReducingEncoder(torch.nn.Module):
    """Pack, attend, prune (Zero-TPrune), attend with sizes, merge (ToMe), attend, mean-pool."""

    def __init__(self, hidden=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)

    def attend(self, x, mask, sizes):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(1)
        return x + torch.ops.graphopt.varlen_attention_sized(q, k, v, mask, sizes).flatten(1), k

    def forward(self, x, mask):
        packed = torch.ops.graphopt.pack_tokens(x, mask)
        sizes = torch.ones(packed.shape[0], device=packed.device)
        q, k, _ = self.qkv(packed).unflatten(-1, (3, self.heads, -1)).unbind(1)
        importance = torch.ops.graphopt.token_importance(q, k, mask, 0.5, 10)
        packed, sizes, mask = torch.ops.graphopt.prune_tokens(packed, importance, k.flatten(1), sizes, mask, 0.6, 1, 0, True)
        packed, k = self.attend(packed, mask, sizes)
        packed, sizes, mask = torch.ops.graphopt.merge_tokens(packed, k.flatten(1), sizes, mask, 2, 1, 0)
        packed, _ = self.attend(packed, mask, sizes)
        return torch.ops.graphopt.sum_tokens(packed * sizes[:, None], mask), mask


def _encoder_inputs(lengths, seq_len):
    torch.manual_seed(3)
    return torch.randn(len(lengths), seq_len, 16), (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).to(torch.int64)


def test_export_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ReducingEncoder().eval()
    dim = torch.export.Dim.AUTO
    program = torch.export.export(model, _encoder_inputs([5, 9, 1, 7], 11), dynamic_shapes=({0: dim, 1: dim}, {0: dim, 1: dim}), strict=False)
    targets = {node.target for node in program.graph.nodes}
    assert {torch.ops.graphopt.prune_tokens.default, torch.ops.graphopt.merge_tokens.default, torch.ops.graphopt.token_importance.default} <= targets
    path = tmp_path / "token_reduction.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path))
    for lengths, seq_len in (([5, 9, 1, 7], 11), ([3, 0, 12], 14), ([2], 6)):
        inputs = _encoder_inputs(lengths, seq_len)
        with torch.no_grad():
            expected = model(*inputs)
            assert_close(program.module()(*inputs), expected)
            assert_close(loaded.module()(*inputs), expected)


def test_flop_rules_count_the_example_lengths():
    model = ReducingEncoder().eval()
    lengths = [5, 9, 1, 7]
    inputs = _encoder_inputs(lengths, 11)
    gm = torch.export.export(model, inputs, strict=False).module()
    record_example_run(gm, inputs)
    flops = {node.target: node_flops(node) for node in gm.graph.nodes if node.op == "call_function"}
    # importance: 2·n²·H·D + iterations·n²·H (H = 4, D = 4, 10 iterations)
    assert flops[torch.ops.graphopt.token_importance.default] == sum((2 * 4 + 10) * n * n * 4 for n in lengths)
    # merge after pruning to ceil(0.6 n) tokens: 2·|A|·|B|·C with the CLS protected (C = 16)
    kept = [math.ceil(0.6 * n) for n in lengths]
    assert flops[torch.ops.graphopt.merge_tokens.default] == sum(2 * (n // 2) * ((n - 1) // 2) * 16 for n in kept)
    assert flops[torch.ops.graphopt.prune_tokens.default] > 0
    sized = [f for target, f in flops.items() if target == torch.ops.graphopt.varlen_attention_sized.default]
    assert sized and sized[0] > 0
    assert count_flops(gm) > 0
