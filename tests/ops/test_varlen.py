"""graphopt.varlen: pack/unpack, varlen attention against SDPA, fake impls, export, save/load."""

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt import ir
from graphopt.ops import varlen
from graphopt.testing import assert_close

# odd lengths, including 1 and one sequence without padding (the longest, S = 13)
LENGTHS = [5, 1, 13, 7, 2, 11]
# long and short sequences sharing one bucket
LONG_LENGTHS = [70, 1, 50, 9]


def _mask(lengths, seq_len=None, dtype=torch.bool):
    seq_len = max(lengths) if seq_len is None else seq_len
    return (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).to(dtype)


def _packed_qkv(total, heads=3, head_dim=8, value_dim=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return tuple(torch.randn(total, heads, d).to(dtype) for d in (head_dim, head_dim, value_dim))


def _per_sequence_sdpa(q, k, v, cu, scale=None):
    """Each sequence run alone through SDPA: [T, H, Dv]."""
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        seq = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*seq, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_pack_matches_boolean_indexing_and_unpack_inverts_it(mask_dtype):
    mask = _mask(LENGTHS, dtype=mask_dtype)
    x = torch.randn(len(LENGTHS), mask.shape[1], 3, 4)
    packed = torch.ops.graphopt.pack_tokens(x, mask)
    assert packed.shape == (sum(LENGTHS), 3, 4)
    assert_close(packed, x[mask.bool()], rtol=0, atol=0)
    unpacked = torch.ops.graphopt.unpack_tokens(packed, mask)
    assert_close(unpacked, x * mask.bool()[..., None, None], rtol=0, atol=0)


def test_cu_seqlens_of_bool_and_integer_masks():
    expected = torch.tensor([0, 5, 6, 19, 26, 28, 39])
    for dtype in (torch.bool, torch.int64, torch.int32):
        cu = varlen.cu_seqlens(_mask(LENGTHS, dtype=dtype))
        assert cu.dtype == torch.int64
        assert_close(cu, expected, rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [LENGTHS, LONG_LENGTHS], ids=["short", "long"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_varlen_attention_equals_each_sequence_alone(dtype, lengths):
    cu = varlen.cu_seqlens(_mask(lengths))
    q, k, v = _packed_qkv(int(cu[-1]), value_dim=5, dtype=dtype)
    out = torch.ops.graphopt.varlen_attention(q, k, v, cu)
    assert out.shape == (sum(lengths), 3, 5) and out.dtype == dtype
    assert_close(out, _per_sequence_sdpa(q, k, v, cu))
    # fp32 computation of the same, so half precision is checked against the exact value too
    exact = _per_sequence_sdpa(q.float(), k.float(), v.float(), cu)
    assert_close(out.float(), exact, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_varlen_attention_equals_padded_sdpa_with_key_padding_mask_on_valid_rows(dtype):
    mask = _mask(LENGTHS, seq_len=16)  # every sequence padded, including the longest
    torch.manual_seed(1)
    q, k, v = (torch.randn(len(LENGTHS), 2, 16, 8).to(dtype) for _ in range(3))
    padded = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=0.3)
    packed = [t.transpose(1, 2)[mask] for t in (q, k, v)]
    out = torch.ops.graphopt.varlen_attention(*packed, varlen.cu_seqlens(mask), 0.3)
    # SDPA over the padded keys adds their zero weights in another order: half precision rounds differently
    half = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype)
    assert_close(out, padded.transpose(1, 2)[mask], rtol=half, atol=half)


@pytest.mark.parametrize(
    "lengths",
    [[9], [1], [1, 1, 1], [4, 4, 4], [3, 0, 5, 0]],
    ids=["single", "single-token", "all-ones", "no-padding", "empty-sequences"],
)
def test_varlen_attention_edge_batches(lengths):
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    q, k, v = _packed_qkv(sum(lengths))
    out = torch.ops.graphopt.varlen_attention(q, k, v, cu)
    assert_close(out, _per_sequence_sdpa(q, k, v, cu))
    if max(lengths) == 1:  # attention to oneself alone returns one's own value
        assert_close(out, v, rtol=0, atol=0)


def test_varlen_attention_of_no_tokens():
    q, k, v = _packed_qkv(0)
    out = torch.ops.graphopt.varlen_attention(q, k, v, torch.zeros(4, dtype=torch.int64))
    assert out.shape == (0, 3, 8)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.ops.graphopt.pack_tokens(torch.randn(2, 5, 4), empty).shape == (0, 4)
    assert torch.ops.graphopt.unpack_tokens(torch.randn(0, 4), empty).abs().sum() == 0


def test_large_batch_spreads_over_buckets_and_stays_exact():
    torch.manual_seed(2)
    lengths = torch.randint(1, 90, (48,)).tolist()
    buckets = varlen._length_buckets(lengths, 3 * 16)
    assert len(buckets) > 1
    assert sorted(i for bucket in buckets for i in bucket) == list(range(48))
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    q, k, v = _packed_qkv(sum(lengths))
    assert_close(torch.ops.graphopt.varlen_attention(q, k, v, cu), _per_sequence_sdpa(q, k, v, cu))


def test_buckets_keep_equal_lengths_together_and_skip_empty_sequences():
    buckets = varlen._length_buckets([100, 3, 100, 0, 3, 50], 1_000_000)
    assert buckets == [[0, 2], [5], [1, 4]]


def test_opcheck():
    mask = _mask(LENGTHS, seq_len=14, dtype=torch.int64)
    x = torch.randn(len(LENGTHS), 14, 6)
    cu = varlen.cu_seqlens(mask)
    q, k, v = _packed_qkv(int(cu[-1]), value_dim=4)
    torch.library.opcheck(torch.ops.graphopt.pack_tokens.default, (x, mask))
    torch.library.opcheck(torch.ops.graphopt.unpack_tokens.default, (x[mask.bool()], mask))
    torch.library.opcheck(torch.ops.graphopt.varlen_attention.default, (q, k, v, cu))
    torch.library.opcheck(torch.ops.graphopt.varlen_attention.default, (q, k, v, cu, 0.5))
    torch.library.opcheck(torch.ops.graphopt.sum_tokens.default, (x[mask.bool()], mask))
    torch.library.opcheck(torch.ops.graphopt.select_token.default, (x[mask.bool()], mask, 3))


# rows: full, empty, left-padded, holes, single token at the end
POOLING_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_pooled_ops_equal_pooling_the_unpacked_tokens(dtype, mask_dtype):
    mask = POOLING_MASK.to(mask_dtype)
    packed = torch.randn(int(POOLING_MASK.sum()), 3, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    unpacked = torch.ops.graphopt.unpack_tokens(packed, mask)
    summed = torch.ops.graphopt.sum_tokens(packed, mask)
    assert summed.shape == (5, 3, 2) and summed.dtype == dtype
    assert_close(summed, unpacked.sum(1), rtol=1e-6 if dtype != torch.bfloat16 else 1e-2, atol=1e-6 if dtype != torch.bfloat16 else 1e-2)
    assert torch.all(summed[1] == 0)  # the empty sequence
    for position in range(5):
        assert torch.equal(torch.ops.graphopt.select_token(packed, mask, position), unpacked[:, position])  # a gather: bit for bit


def test_pooled_ops_of_no_tokens_and_their_references():
    mask = torch.zeros(3, 4, dtype=torch.int64)
    packed = torch.empty(0, 5)
    assert torch.equal(torch.ops.graphopt.sum_tokens(packed, mask), torch.zeros(3, 5))
    assert torch.equal(torch.ops.graphopt.select_token(packed, mask, 2), torch.zeros(3, 5))
    packed = torch.randn(int(POOLING_MASK.sum()), 4)
    assert_close(varlen.sum_tokens(packed, POOLING_MASK), varlen.reference.sum_tokens_reference(packed, POOLING_MASK), rtol=1e-6, atol=1e-6)
    assert torch.equal(varlen.select_token(packed, POOLING_MASK, 2), varlen.reference.select_token_reference(packed, POOLING_MASK, 2))


class PackedEncoderLayer(torch.nn.Module):
    """Self-attention + residual on the packed tokens of a padded batch, unpacked at the end."""

    def __init__(self, hidden=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)

    def forward(self, x, mask):
        packed = torch.ops.graphopt.pack_tokens(x, mask)
        q, k, v = self.qkv(packed).unflatten(-1, (3, self.heads, -1)).unbind(1)
        attended = torch.ops.graphopt.varlen_attention(q, k, v, varlen.cu_seqlens(mask))
        return torch.ops.graphopt.unpack_tokens(self.out(attended.flatten(1)) + packed, mask)

    def padded(self, x, mask):
        """The same layer computed on the padded batch, pads zeroed."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])
        return (self.out(attended.transpose(1, 2).flatten(2)) + x) * mask[..., None]


def _layer_inputs(lengths, seq_len):
    torch.manual_seed(3)
    return torch.randn(len(lengths), seq_len, 16), _mask(lengths, seq_len, dtype=torch.int64)


@pytest.fixture(scope="module")
def exported_layer():
    torch.manual_seed(0)
    layer = PackedEncoderLayer().eval()
    dim = torch.export.Dim.AUTO
    dynamic = ({0: dim, 1: dim}, {0: dim, 1: dim})
    return layer, torch.export.export(layer, _layer_inputs(LENGTHS, 15), dynamic_shapes=dynamic, strict=False)


def test_exported_program_runs_on_other_shapes(exported_layer):
    layer, program = exported_layer
    targets = {node.target for node in program.graph.nodes}
    assert {torch.ops.graphopt.pack_tokens.default, torch.ops.graphopt.varlen_attention.default, torch.ops.graphopt.unpack_tokens.default} <= targets
    for lengths, seq_len in ((LENGTHS, 15), ([1, 9, 4], 9), ([2], 6)):
        x, mask = _layer_inputs(lengths, seq_len)
        with torch.no_grad():
            assert_close(program.module()(x, mask), layer.padded(x, mask))


def test_save_load_round_trip(exported_layer, tmp_path):
    layer, program = exported_layer
    path = tmp_path / "varlen.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path))
    x, mask = _layer_inputs([3, 12, 1, 7], 12)
    with torch.no_grad():
        assert_close(loaded.module()(x, mask), layer.padded(x, mask))


def test_capture_propagates_unbacked_token_count():
    layer = PackedEncoderLayer().eval()
    gm = graphopt.capture(layer, _layer_inputs(LENGTHS, 15))
    ir.propagate_shapes(gm)
    (pack,) = ir.op_nodes(gm, torch.ops.graphopt.pack_tokens)
    (attention,) = ir.op_nodes(gm, torch.ops.graphopt.varlen_attention)
    total_tokens = ir.shape_of(pack)[0]
    assert isinstance(total_tokens, torch.SymInt) and not isinstance(ir.shape_of(pack)[1], torch.SymInt)
    assert ir.shape_of(attention) == (total_tokens, 4, 4)
    x, mask = _layer_inputs([6, 2], 8)
    with torch.no_grad():
        assert_close(gm(x, mask), layer.padded(x, mask))
