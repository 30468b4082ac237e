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
SUM_TOKENS = "graphopt.sum_tokens.default"
SELECT_TOKEN = "graphopt.select_token.default"
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
        gone=[SDPA, UNPACK],
        present=[VARLEN, PACK, SUM_TOKENS],
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


def test_minilm_graph_packs_once_and_mean_pools_the_packed_tokens(minilm):
    _, optimized, _ = minilm
    ops = count_ops(optimized.graph_module)
    assert ops[SDPA] == 0 and ops[VARLEN] == 6
    # only the pooled embedding leaves the graph: the masked sum reads the packed tokens, nothing is unpacked
    assert ops[PACK] == 1 and ops[UNPACK] == 0 and ops[SUM_TOKENS] == 1 and ops["aten.mul.Tensor"] == 0
    record = optimized.report.record("remove_padding")
    assert record.status == APPLIED and record.stats["attentions"] == 6 and record.stats["mask_input"] == "attention_mask"
    assert record.stats["unpacks"] == 0 and record.stats["pooled"] == 1
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


class _Pooled(nn.Module):
    """The tiny BERT's hidden states pooled over the sequence as users write it."""

    def __init__(self, how: str):
        super().__init__()
        self.bert, self.how = _tiny_bert(), how

    def forward(self, ids, mask):
        out = self.bert(input_ids=ids, attention_mask=mask)
        hidden, gate = out.last_hidden_state, mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        if self.how == "mean":  # sentence-transformers
            return (hidden * gate).sum(dim=1) / gate.sum(dim=1).clamp(min=1e-9)
        if self.how == "mean-keepdim":
            return (hidden * gate).sum(1, keepdim=True) / gate.sum(1, keepdim=True)
        if self.how == "where":
            return torch.where(mask.bool()[..., None], hidden, 0.0).sum(-2)
        if self.how == "masked_fill":
            return hidden.masked_fill(~mask.bool()[..., None], 0.0).sum(1)
        if self.how == "cls":
            return hidden[:, 0]
        if self.how == "pooler":  # BertPooler: CLS -> dense -> tanh
            return out.pooler_output
        if self.how == "cls-and-tokens":
            return hidden[:, 0], hidden
        if self.how == "half-gate":  # pads zeroed, but valid tokens halved: not what unpacking gives
            return (hidden * (gate * 0.5)).sum(1)
        if self.how == "scaled-before-sum":  # the gated value is scaled before the sum
            return (hidden * gate * 2.0).sum(1)
        raise ValueError(self.how)


POOLED_OP = {"mean": SUM_TOKENS, "mean-keepdim": SUM_TOKENS, "where": SUM_TOKENS, "masked_fill": SUM_TOKENS, "cls": SELECT_TOKEN, "pooler": SELECT_TOKEN}


@pytest.mark.parametrize("how", list(POOLED_OP))
def test_pooling_reads_the_packed_tokens_when_only_the_pooled_output_leaves(how):
    model = _Pooled(how).eval()
    optimized = graphopt.optimize(model, ["canonicalize", RemovePadding()], _mixed_batch([9, 1, 6], 9, seed=0), dynamic_shapes=TOKEN_DIMS, strict=True)
    ops = count_ops(optimized.graph_module)
    assert ops[UNPACK] == 0 and ops[POOLED_OP[how]] == 1 and ops[VARLEN] == 1  # the padded [B, S, H] tensor is never built
    assert optimized.report.record("remove_padding").stats["pooled"] == 1
    for lengths, seq in [([9, 1, 6], 9), ([3, 11, 11, 7], 11), ([5, 5], 5), ([1], 1)]:
        ids, mask = _mixed_batch(lengths, seq, seed=seq)
        with torch.no_grad():
            out, ref = optimized(ids, mask), model(ids, mask)
            assert out.shape == ref.shape
            assert_close(out, ref, rtol=0, atol=1e-5, msg=f"{how} {lengths}")
            for row, n in enumerate(lengths):  # and each sequence pooled alone, unpadded
                alone = model(ids[row : row + 1, :n], mask[row : row + 1, :n])
                assert_close(out[row], alone[0], rtol=0, atol=1e-5)


def test_cls_of_a_left_padded_row_is_zeros_and_other_rows_exact():
    model = _Pooled("cls").eval()
    optimized = graphopt.optimize(model, ["canonicalize", RemovePadding()], _mixed_batch([9, 1, 6], 9, seed=0), dynamic_shapes=TOKEN_DIMS)
    ids, mask = _mixed_batch([7, 7, 7], 7, seed=3)
    mask[1, :2] = 0  # left padding: row 1's position 0 is a pad, whose value the original computes from a pad token
    with torch.no_grad():
        out, ref = optimized(ids, mask), model(ids, mask)
    assert_close(out[[0, 2]], ref[[0, 2]], rtol=0, atol=1e-5)
    assert torch.all(out[1] == 0)  # as unpacking gives, and the declared output mask leaves out


def test_cls_pooled_from_packed_while_the_tokens_are_also_unpacked():
    model = _Pooled("cls-and-tokens").eval()
    optimized = graphopt.optimize(model, ["canonicalize", RemovePadding()], _mixed_batch([9, 1, 6], 9, seed=0), dynamic_shapes=TOKEN_DIMS, strict=True)
    ops = count_ops(optimized.graph_module)
    assert ops[UNPACK] == 1 and ops[SELECT_TOKEN] == 1
    ids, mask = _mixed_batch([3, 11, 7], 11, seed=4)
    with torch.no_grad():
        (cls, hidden), (cls_ref, hidden_ref) = optimized(ids, mask), model(ids, mask)
    assert_close(cls, cls_ref, rtol=0, atol=1e-5)
    assert_close(hidden[mask.bool()], hidden_ref[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["half-gate", "scaled-before-sum"])
def test_sums_that_are_not_a_pooling_of_the_unpacked_tokens_keep_the_unpack(how):
    model = _Pooled(how).eval()
    optimized = graphopt.optimize(model, ["canonicalize", RemovePadding()], _mixed_batch([9, 1, 6], 9, seed=0), dynamic_shapes=TOKEN_DIMS, strict=True)
    ops = count_ops(optimized.graph_module)
    assert ops[UNPACK] == 1 and ops[SUM_TOKENS] == 0
    ids, mask = _mixed_batch([3, 11, 7], 11, seed=5)
    with torch.no_grad():
        assert_close(optimized(ids, mask), model(ids, mask), rtol=0, atol=1e-5)


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


class _TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` with a key-padding mask, as users build it: batch-first, or
    sequence-first with the model transposing its embeddings to ``[S, B, E]``."""

    def __init__(self, batch_first: bool, norm_first: bool, final_norm: bool, nested: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(100, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
        norm = nn.LayerNorm(16) if final_norm else None
        self.encoder = nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=nested)

    def forward(self, ids, mask):
        x = self.embed(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.encoder(x, src_key_padding_mask=mask == 0)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("final_norm", [False, True], ids=["", "final_norm"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_torch_transformer_encoder_valid_tokens_equal_each_sequence_alone(batch_first, norm_first, final_norm):
    """nn.MultiheadAttention's sequence-first head split (in-projection unflattened to [S, B, 3, E],
    q, k, v selected, heads moved to [B, H, S, D]) and its head merge through [S*B, E] are
    followed; the default enable_nested_tensor=True exports the same graph (no nested tensors)."""
    torch.manual_seed(0)
    model = _TorchEncoder(batch_first, norm_first, final_norm, nested=not final_norm).eval()
    optimized = graphopt.optimize(model, ["canonicalize", RemovePadding()], _encoder_inputs(), dynamic_shapes=TOKEN_DIMS, strict=True)
    record = optimized.report.record("remove_padding")
    assert record.status == APPLIED, record.reason
    ops = count_ops(optimized.graph_module)
    assert ops[VARLEN] == 2 and ops[SDPA] == 0 and ops[PACK] == 1
    assert ops["aten.unsqueeze.default"] == ops["aten.squeeze.dim"] == 0  # canonicalize's view chains

    lengths, seq = [3, 7, 1, 5], 7  # another batch and length than the capture's
    ids, mask = _mixed_batch(lengths, seq, seed=2)
    with torch.no_grad():
        out = optimized(ids, mask)
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, :n], mask[row : row + 1, :n])
            if batch_first:
                assert_close(out[row, :n], alone[0])
            else:
                assert_close(out[:n, row], alone[:, 0])
