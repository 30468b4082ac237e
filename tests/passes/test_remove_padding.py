"""remove_padding (ByteTransformer): packed token-wise region, varlen attention, exact on valid tokens."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import graphopt
from graphopt.tools import zoo
from graphopt.ir import count_ops, propagate_shapes
from graphopt.passes.remove_padding import RemovePadding
from graphopt.pipeline.report import APPLIED
from graphopt.testing import assert_applies, assert_close, assert_not_applicable

SDPA = "aten.scaled_dot_product_attention.default"
VARLEN = "graphopt.varlen_attention.default"
PACK = "graphopt.pack_tokens.default"
UNPACK = "graphopt.unpack_tokens.default"
TOKEN_DIMS = ({0: Dim.AUTO, 1: Dim.AUTO},) * 2


def _one_token_row(ids: torch.Tensor, mask: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with sequence ``row`` cut to its first token (the rest padding)."""
    ids, mask = ids.clone(), mask.clone()
    mask[row, 1:] = 0
    ids[row, 1:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def minilm():
    entry = zoo.load("minilm")
    sentences = zoo.real_sentences(24)
    longest = zoo.tokenize(entry.tokenizer, sentences[8:16])
    to_128 = zoo.tokenize(entry.tokenizer, sentences[16:24], pad_to=128)
    no_padding = zoo.tokenize(entry.tokenizer, sentences[8:12], max_length=8)  # every sentence is longer
    assert bool(no_padding[1].all()) and not bool(longest[1].all())
    batches = [longest, to_128, _one_token_row(*longest, row=2), no_padding]
    optimized = assert_applies(
        RemovePadding(),
        entry.model,
        entry.example_inputs,
        gone=[SDPA],
        present=[VARLEN, PACK, UNPACK],
        other_inputs=batches,
        dynamic_shapes=entry.dynamic_shapes,
    )
    return entry, optimized, batches


def test_minilm_embeddings_equal_the_padded_models(minilm):
    entry, optimized, batches = minilm
    for ids, mask in batches:
        with torch.no_grad():
            reference, packed = entry.model(ids, mask), optimized(ids, mask)
        assert zoo.cosine_similarity_rows(packed, reference).min().item() > 0.99999
        assert_close(packed, reference, rtol=0, atol=1e-5)


def test_minilm_graph_packs_once_and_unpacks_once(minilm):
    _, optimized, _ = minilm
    ops = count_ops(optimized.graph_module)
    assert ops[SDPA] == 0 and ops[VARLEN] == 6
    assert ops[PACK] == 1 and ops[UNPACK] == 1
    record = optimized.report.record("remove_padding")
    assert record.status == APPLIED and record.stats["attentions"] == 6 and record.stats["mask_input"] == "attention_mask"
    # the pack sits after the embeddings sum (position embeddings are added before packing)
    (pack,) = [n for n in optimized.graph_module.graph.nodes if n.target is torch.ops.graphopt.pack_tokens.default]
    assert pack.args[0].target is torch.ops.aten.add.Tensor
    # the head split feeds varlen_attention directly as [T, H, D]: no transposes left in the encoder
    assert ops["aten.transpose.int"] == 0


def test_minilm_saves_loads_and_propagates_shapes(minilm, tmp_path):
    entry, optimized, batches = minilm
    gm = optimized.graph_module
    propagate_shapes(gm)
    (pack,) = [n for n in gm.graph.nodes if n.target is torch.ops.graphopt.pack_tokens.default]
    assert isinstance(pack.meta["val"].shape[0], torch.SymInt)  # T stays data-dependent
    path = str(tmp_path / "minilm_packed.pt2")
    graphopt.save(optimized, path, entry.example_inputs, dynamic_shapes=entry.dynamic_shapes)
    loaded = graphopt.load(path)
    ids, mask = batches[0]
    with torch.no_grad():
        assert_close(loaded(ids, mask), optimized(ids, mask), rtol=1e-5, atol=1e-6)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=100, attn_implementation="eager")
        return BertModel(config).eval()


def _mixed_batch(lengths: list[int], seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def test_tiny_bert_valid_tokens_equal_each_sequence_alone():
    model = _tiny_bert()
    optimized = graphopt.optimize(model, ["canonicalize", RemovePadding()], _mixed_batch([9, 1, 6], 9, seed=0), dynamic_shapes=TOKEN_DIMS)
    assert optimized.report.record("remove_padding").status == APPLIED
    for lengths, seq in [([9, 1, 6], 9), ([3, 11, 11, 7], 11), ([5, 5], 5)]:
        ids, mask = _mixed_batch(lengths, seq, seed=seq)
        with torch.no_grad():
            out = optimized(ids, mask)
            for row, n in enumerate(lengths):
                alone = model(ids[row : row + 1, :n], mask[row : row + 1, :n])
                assert_close(out.last_hidden_state[row, :n], alone.last_hidden_state[0], rtol=0, atol=1e-5)
                assert_close(out.pooler_output[row], alone.pooler_output[0], rtol=0, atol=1e-5)  # CLS pooling
                assert torch.all(out.last_hidden_state[row, n:] == 0)  # pads are zeros by design


class _Encoder(nn.Module):
    """Two-head SDPA encoder layers; ``conv`` puts a convolution over the sequence between them,
    ``mask_from_values`` builds the mask from the hidden states instead of the mask input."""

    def __init__(self, layers: int = 2, conv: bool = False, mask_from_values: bool = False):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.qkv = nn.ModuleList(nn.ModuleList(nn.Linear(16, 16) for _ in range(3)) for _ in range(layers))
        self.conv = nn.Conv1d(16, 16, 3, padding=1) if conv else None
        self.mask_from_values = mask_from_values

    def forward(self, ids, mask):
        x = self.embed(ids)
        keep = (x.sum(-1) > 0) if self.mask_from_values else mask.bool()
        for i, qkv in enumerate(self.qkv):
            if i and self.conv is not None:
                x = self.conv(x.transpose(1, 2)).transpose(1, 2)
            b, s, _ = x.shape
            q, k, v = (linear(x).view(b, s, 2, 8).transpose(1, 2) for linear in qkv)
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]).transpose(1, 2).reshape(b, s, 16)
        return x


def _encoder_inputs():
    return _mixed_batch([6, 3, 4], 6, seed=1)


def test_hand_written_encoder_applies_and_matches_on_valid_tokens():
    model, (ids, mask) = _Encoder().eval(), _encoder_inputs()
    optimized = graphopt.optimize(model, [RemovePadding()], (ids, mask), dynamic_shapes=TOKEN_DIMS, strict=True)
    assert count_ops(optimized.graph_module)[VARLEN] == 2
    other_ids, other_mask = _mixed_batch([2, 7, 1, 5], 7, seed=2)
    with torch.no_grad():
        out, ref = optimized(other_ids, other_mask), model(other_ids, other_mask)
    valid = other_mask.bool()
    assert_close(out[valid], ref[valid], rtol=0, atol=1e-5)


def test_not_applicable_to_a_causal_decoder():
    entry = zoo.load("gpt2-tiny")
    assert_not_applicable(RemovePadding(), entry.model, entry.example_inputs, reason_contains="causal")


def test_not_applicable_with_a_convolution_over_the_sequence():
    model = _Encoder(conv=True).eval()
    record = assert_not_applicable(RemovePadding(), model, _encoder_inputs(), reason_contains="aten.conv1d")
    assert "not token-wise" in record.reason


def test_not_applicable_to_a_mask_not_from_an_input():
    model = _Encoder(mask_from_values=True).eval()
    assert_not_applicable(RemovePadding(), model, _encoder_inputs(), reason_contains="not derived from a padding input")


def test_not_applicable_without_attention():
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 16)).eval()
    assert_not_applicable(RemovePadding(), model, (_encoder_inputs()[0],), reason_contains="no aten.scaled_dot_product_attention")


def test_not_applicable_when_the_output_is_pooled_over_pads():
    class MaxPooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _Encoder(layers=1)

        def forward(self, ids, mask):
            return self.encoder(ids, mask).amax(dim=1)  # reads pad positions: their zeros would change the max

    assert_not_applicable(RemovePadding(), MaxPooled().eval(), _encoder_inputs(), reason_contains="amax")


class _FusedQKV(nn.Module):
    """One projection for Q, K and V, split by ``chunk``, ``split`` or ``unflatten``, or (``flat``) run on the
    tokens flattened to ``[B*S, H]`` and viewed back; the sizes come from ``x.shape``."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Embedding(100, 16)
        self.qkv = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))
        self.out = nn.Linear(16, 16)

    def forward(self, ids, mask):
        x = self.embed(ids)
        for qkv in self.qkv:
            b, s, _ = x.shape
            if self.how == "flat":
                y = qkv(x.reshape(b * s, 16)).view(b, s, 48)
            else:
                y = qkv(x)
            if self.how == "unflatten":  # [B, S, 3, H, D] -> [3, B, H, S, D] -> q, k, v
                q, k, v = y.unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q, k, v = y.split(16, dim=2) if self.how == "split" else y.chunk(3, dim=-1)
                q, k, v = (t.reshape(b, s, 2, 8).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])
            x = x + self.out(o.transpose(1, 2).reshape(b, s, 16))
        return x


@pytest.mark.parametrize("how", ["chunk", "split", "unflatten", "flat"])
def test_fused_qkv_is_followed(how):
    model, (ids, mask) = _FusedQKV(how).eval(), _encoder_inputs()
    optimized = graphopt.optimize(model, ["canonicalize", RemovePadding()], (ids, mask), dynamic_shapes=TOKEN_DIMS, strict=True)
    assert optimized.report.record("remove_padding").status == APPLIED
    ops = count_ops(optimized.graph_module)
    assert ops[VARLEN] == 2 and ops[SDPA] == 0 and ops[PACK] == 1
    other_ids, other_mask = _mixed_batch([2, 7, 1, 5], 7, seed=2)
    with torch.no_grad():
        out, ref = optimized(other_ids, other_mask), model(other_ids, other_mask)
    valid = other_mask.bool()
    assert_close(out[valid], ref[valid])


def test_transformer_encoder_key_padding_mask_is_recognised():
    """nn.TransformerEncoder's key-padding mask (masked_fill_ on a fresh zeros_like) is a padding
    mask; what still stops the pass is nn.MultiheadAttention's in-projection, laid out
    sequence-first and reshuffled (unsqueeze, transpose, squeeze) before the heads are merged into
    the batch dimension, and the reason names the first op it cannot follow."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, ids, mask):
            return self.encoder(self.embed(ids), src_key_padding_mask=mask == 0)

    record = assert_not_applicable(
        RemovePadding(), Encoder().eval(), _encoder_inputs(), reason_contains="unsqueeze (aten.unsqueeze.default)", dynamic_shapes=TOKEN_DIMS
    )
    assert "masked_fill_" not in record.reason and "not token-wise" in record.reason
