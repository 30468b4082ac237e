"""attention_to_sparse: SDPA (and packed varlen attention) -> sliding-window + global or block-sparse attention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt import ir
from graphopt.ops.sparse_attention.reference import window_attention_reference, window_pair_count
from graphopt.passes.attention_to_sparse import AttentionToSparse
from graphopt.pipeline.report import APPLIED, ROLLED_BACK
from graphopt.testing import assert_applies, assert_close, assert_not_applicable

SDPA, WINDOW, BLOCK = "aten.scaled_dot_product_attention.default", "graphopt.window_attention.default", "graphopt.block_sparse_attention.default"


class SelfAttention(nn.Module):
    """One multi-head self-attention layer on ``[B, L, E]`` (``dropout_p`` passed to SDPA as given)."""

    def __init__(self, hidden=32, heads=4, causal=False, dropout_p=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.heads, self.causal, self.dropout_p = heads, causal, dropout_p

    def forward(self, x):
        b, length, e = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=self.dropout_p)
        return self.out(o.transpose(1, 2).reshape(b, length, e))


def tokens(batch=2, length=48, hidden=32, seed=0):
    return torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_window_covering_the_sequence_rewrites_exactly(causal):
    model = SelfAttention(causal=causal).eval()
    opt = assert_applies(
        AttentionToSparse(window=128, min_cosine=0.9999), model, (tokens(),), gone=[SDPA], present=[WINDOW], other_inputs=[(tokens(3, 20, seed=1),)]
    )
    (node,) = ir.op_nodes(opt.graph_module, torch.ops.graphopt.window_attention.default)
    assert node.args[3:5] == (128, 1) and node.kwargs["is_causal"] is causal
    stats = opt.report.record("attention_to_sparse").stats
    assert stats["converted"] == 1 and stats["exact"] and stats["visible_fraction"] == 1.0
    with torch.no_grad():
        assert_close(opt(tokens(seed=2)), model(tokens(seed=2)), rtol=1e-5, atol=1e-5)


def test_narrow_window_keeps_fewer_pairs_and_fewer_flops():
    model = SelfAttention().eval()
    x = tokens(1, 160)
    opt = graphopt.optimize(model, [AttentionToSparse(window=32, global_tokens=1, min_cosine=0.5)], (x,))
    record = opt.report.record("attention_to_sparse")
    assert record.status == APPLIED, record.reason
    assert not record.stats["exact"] and 0.1 < record.stats["visible_fraction"] < 0.3
    assert record.stats["layers"]["scaled_dot_product_attention"]["exact"] is False
    assert record.flops_after < record.flops_before
    with torch.no_grad():
        q, k, v = model.qkv(x).view(1, 160, 3, 4, 8).permute(2, 0, 3, 1, 4)
        expected = model.out(torch.ops.graphopt.window_attention(q, k, v, 32, 1).transpose(1, 2).reshape(1, 160, 32))
        assert_close(opt(x), expected, rtol=1e-5, atol=1e-5)


def test_block_pattern_builds_its_layout_from_the_length():
    model = SelfAttention().eval()
    opt = assert_applies(
        AttentionToSparse(pattern="block", window=64, block_size=16), model, (tokens(),), gone=[SDPA], present=[BLOCK], other_inputs=[(tokens(2, 37, seed=3),)]
    )
    assert opt.report.record("attention_to_sparse").stats["exact"]
    narrow = graphopt.optimize(model, [AttentionToSparse(pattern="block", window=16, global_tokens=0, block_size=16, min_cosine=0.5)], (tokens(1, 128),))
    stats = narrow.report.record("attention_to_sparse").stats
    assert stats["visible_fraction"] == pytest.approx((8 + 2 * 7) / 64, abs=1e-4)  # 8 diagonal blocks of 8x8, 7 on each side


def test_not_applicable_reasons():
    assert_not_applicable(AttentionToSparse(), nn.Linear(4, 4), (torch.randn(2, 4),), reason_contains="no aten.scaled_dot_product_attention")
    assert_not_applicable(AttentionToSparse(layers=(3,)), SelfAttention().eval(), (tokens(),), reason_contains="out of range")
    assert_not_applicable(AttentionToSparse(layer_pattern="nothing-named-so"), SelfAttention().eval(), (tokens(),), reason_contains="matches pattern")
    with pytest.raises(ValueError, match="pattern"):
        AttentionToSparse(pattern="random")


def test_static_sequence_within_the_window_is_a_no_op():
    class StaticLength(SelfAttention):
        def forward(self, x):  # the sequence length is fixed by the reshape: capture keeps it static
            return super().forward(x.reshape(2, 48, 32))

    assert_not_applicable(AttentionToSparse(window=128), StaticLength().eval(), (tokens(),), reason_contains="no-op, every key already visible")


def test_dropout_is_left_alone():
    class Training(SelfAttention):
        def forward(self, x):
            q = k = v = x.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    model = Training().eval()
    gm = graphopt.capture(model, (tokens(),))
    with pytest.raises(graphopt.NotApplicable, match="dropout"):
        AttentionToSparse().analyze(gm, graphopt.PassContext(example_inputs=(tokens(),)))


def test_rolls_back_when_a_tiny_window_breaks_the_budget():
    model = SelfAttention().eval()
    opt = graphopt.optimize(model, [AttentionToSparse(window=2, global_tokens=0, min_cosine=0.9999)], (tokens(),))
    assert opt.report.record("attention_to_sparse").status == ROLLED_BACK
    assert ir.op_nodes(opt.graph_module, torch.ops.aten.scaled_dot_product_attention.default)


def test_bert_with_a_covering_window_keeps_its_outputs(tiny_bert):
    model, ids, mask = tiny_bert
    opt = graphopt.optimize(model, ["canonicalize", AttentionToSparse(window=64)], (ids, mask))
    record = opt.report.record("attention_to_sparse")
    assert record.status == APPLIED and record.stats["converted"] == 2 and record.stats["exact"]
    assert not ir.op_nodes(opt.graph_module, torch.ops.aten.scaled_dot_product_attention.default)
    with torch.no_grad():
        ids2 = torch.randint(0, 100, (3, 33), generator=torch.Generator().manual_seed(1))  # |i - j| <= 32: still every pair
        mask2 = torch.ones(3, 33, dtype=torch.long)
        mask2[0, 30:] = 0
        for inputs in ((ids, mask), (ids2, mask2)):
            assert_close(opt(*inputs).last_hidden_state, model(*inputs).last_hidden_state, max_rel_err=1e-5)


def test_bert_after_remove_padding_gets_packed_window_attention(tiny_bert):
    model, ids, mask = tiny_bert
    opt = graphopt.optimize(model, ["canonicalize", "remove_padding", AttentionToSparse(window=64)], (ids, mask))
    record = opt.report.record("attention_to_sparse")
    assert record.status == APPLIED and record.stats["exact"], record.reason
    ops = ir.count_ops(opt.graph_module)
    assert ops["graphopt.varlen_window_attention.default"] == 2 and not ops["graphopt.varlen_attention.default"]
    valid = mask.bool()
    with torch.no_grad():
        assert_close(opt(ids, mask).last_hidden_state[valid], model(ids, mask).last_hidden_state[valid], max_rel_err=1e-5)


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama decoder (sdpa): Hugging Face passes SDPA a [B, 1, L, L] causal mask with is_causal=False."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=256,
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    return model, ids


def _llama_opt(model, ids, window, min_cosine=0.99):
    from torch.export import Dim

    return graphopt.optimize(
        model, ["canonicalize", AttentionToSparse(window=window, min_cosine=min_cosine)], (ids,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},)
    )


def test_llama_causal_mask_becomes_the_flag_and_a_causal_window(llama):
    model, ids = llama
    opt = _llama_opt(model, ids, 64)
    record = opt.report.record("attention_to_sparse")
    assert record.status == APPLIED and record.stats["converted"] == 2 and record.stats["exact"], record.reason
    (node, *_) = ir.op_nodes(opt.graph_module, torch.ops.graphopt.window_attention.default)
    # canonicalize proved transformers' [B, 1, L, L] mask causal: the flag says it, and no mask is read
    assert node.kwargs["attn_mask"] is None and node.kwargs["is_causal"] is True
    longer = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(1))  # window 64 >= length: every earlier key
    with torch.no_grad():
        for inputs in (ids, longer):
            assert_close(opt(inputs).logits, model(inputs).logits, rtol=1e-5, atol=1e-5)


def test_llama_window_is_the_last_keys_not_half_a_window_each_side(llama):
    """Window 16 on 40 tokens: each query sees its last 16 keys (i - 16 < j <= i) and the global token, as
    window attention with is_causal, where the bidirectional reading of the window would give it only 9."""
    model, ids = llama
    opt = _llama_opt(model, ids, 16, min_cosine=0.0)
    record = opt.report.record("attention_to_sparse")
    assert record.status == APPLIED and not record.stats["exact"]
    assert record.stats["visible_fraction"] == pytest.approx(window_pair_count(24, 24, 16, 1, True) / window_pair_count(24, 24, 99, 0, True), abs=1e-4)
    x = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    calls = {}

    def causal_window(q, k, v, window, global_tokens, attn_mask=None, is_causal=False, scale=None):
        calls["n"] = calls.get("n", 0) + 1
        return window_attention_reference(q, k, v, window, global_tokens, None, True, scale)  # no padding here: the mask is tril

    with torch.no_grad():
        out = opt(x).logits
        sdpa = torch.nn.functional.scaled_dot_product_attention
        try:  # the model, each attention computed by the reference with is_causal semantics
            torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: (
                causal_window(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1), 16, 1, scale=scale)
            )
            expected = model(x).logits
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
    assert calls["n"] == 2
    assert_close(out, expected, rtol=1e-4, atol=1e-5)
