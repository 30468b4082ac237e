"""attention_to_linear: SDPA (and packed varlen attention) -> linear attention (relu / elu / hedgehog) or the LoLCATs hybrid."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt import ir
from graphopt.passes.attention_to_linear import AttentionToLinear
from graphopt.pipeline.report import APPLIED, ROLLED_BACK
from graphopt.testing import assert_applies, assert_close, assert_not_applicable
from graphopt.tools.attention_transfer import recover

SDPA, LINEAR, HYBRID = "aten.scaled_dot_product_attention.default", "graphopt.linear_attention.default", "graphopt.hybrid_attention.default"


class SelfAttention(nn.Module):
    """One multi-head self-attention layer on ``[B, L, E]``, optionally causal or grouped-query."""

    def __init__(self, hidden=32, heads=4, kv_heads=4, causal=False, dropout_p=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.dim = hidden // heads
        self.q, self.kv = nn.Linear(hidden, hidden), nn.Linear(hidden, 2 * kv_heads * self.dim)
        self.out = nn.Linear(hidden, hidden)
        self.heads, self.kv_heads, self.causal, self.dropout_p = heads, kv_heads, causal, dropout_p

    def forward(self, x):
        b, length, e = x.shape
        q = self.q(x).view(b, length, self.heads, self.dim).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2, self.kv_heads, self.dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=self.dropout_p, enable_gqa=self.heads != self.kv_heads)
        return self.out(o.transpose(1, 2).reshape(b, length, e))


def tokens(batch=2, length=24, hidden=32, seed=0):
    return torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("feature_map", ["relu", "elu", "hedgehog"])
def test_replaces_attention_and_keeps_the_outputs_close(feature_map):
    model = SelfAttention(kv_heads=2).eval()
    opt = assert_applies(
        AttentionToLinear(feature_map=feature_map, min_cosine=0.5, transfer_steps=30),
        model,
        (tokens(),),
        gone=[SDPA],
        present=[LINEAR],
        other_inputs=[(tokens(3, 40, seed=1),)],
    )
    record = opt.report.record("attention_to_linear")
    assert record.stats["converted"] == 1 and record.stats["feature_map"] == feature_map
    if feature_map == "hedgehog":  # the fitted map is a trainable constant of the graph
        assert any(name.endswith("q_map") for name, _ in opt.graph_module.named_parameters())
        assert record.stats["transfer_loss"] < 0.5


def test_attention_transfer_fits_hedgehog_closer_than_its_start():
    model, x = SelfAttention().eval(), tokens()
    with torch.no_grad():
        expected = model(x)
    errors = {}
    for steps in (0, 60):
        opt = graphopt.optimize(model, [AttentionToLinear(feature_map="hedgehog", min_cosine=0.0, transfer_steps=steps)], (x,))
        with torch.no_grad():
            errors[steps] = float((opt(x) - expected).square().mean())
    assert errors[60] < 0.5 * errors[0], errors


def test_causal_layers_stay_causal():
    model = SelfAttention(causal=True).eval()
    opt = graphopt.optimize(model, [AttentionToLinear(feature_map="elu", min_cosine=0.0)], (tokens(),))
    node = ir.op_nodes(opt.graph_module, torch.ops.graphopt.linear_attention.default)[0]
    assert ir.normalized_args(node)["is_causal"]
    x = tokens(1, 30)
    later = x.clone()
    later[:, 20:] += 1.0
    with torch.no_grad():
        assert_close(opt(x)[:, :20], opt(later)[:, :20], max_rel_err=1e-6)


def test_a_hybrid_window_covering_the_sequence_is_softmax_attention():
    model = SelfAttention(kv_heads=2).eval()
    assert_applies(AttentionToLinear(feature_map="hybrid", window=128, transfer_steps=0, min_cosine=0.99999), model, (tokens(),), gone=[SDPA], present=[HYBRID])


class TwoLayers(nn.Module):
    """Two residual attention layers; the first one's output is scaled down, so converting it changes little."""

    def __init__(self):
        super().__init__()
        self.quiet, self.loud = SelfAttention(), SelfAttention()
        with torch.no_grad():
            self.quiet.out.weight.mul_(0.01)
            self.quiet.out.bias.zero_()

    def forward(self, x):
        x = x + self.quiet(x)
        return x + self.loud(x)


def test_fallback_keeps_softmax_in_the_most_sensitive_layer():
    model, x = TwoLayers().eval(), tokens()
    opt = graphopt.optimize(model, [AttentionToLinear(feature_map="relu", min_cosine=0.999, fallback=True)], (x,))
    record = opt.report.record("attention_to_linear")
    assert record.status == APPLIED and record.stats["converted"] == 1, record.reason
    assert len(record.stats["softmax_kept"]) == 1
    ops = ir.count_ops(opt.graph_module)
    assert ops[SDPA] == 1 and ops[LINEAR] == 1
    with torch.no_grad():  # the converted one is the quiet layer: the output barely moves
        assert F.cosine_similarity(opt(x).flatten(1), model(x).flatten(1)).min() > 0.999


def test_value_conv_on_a_vision_grid_starts_at_zero_and_learns():
    model = SelfAttention().eval()
    x = tokens(2, 1 + 16)  # a class token and a 4x4 patch grid
    plain = graphopt.optimize(model, [AttentionToLinear(feature_map="relu", min_cosine=0.0)], (x,), dynamic_shapes=None)
    conv = graphopt.optimize(model, [AttentionToLinear(feature_map="relu", min_cosine=0.0, value_conv=True)], (x,), dynamic_shapes=None)
    assert ir.count_ops(conv.graph_module)["aten.conv2d.default"] == 1
    with torch.no_grad():
        assert_close(conv(x), plain(x), max_rel_err=1e-6)
    history = recover(conv.graph_module, model, [(x,)], 10, train="maps", lr=1e-2)
    weight = next(p for name, p in conv.graph_module.named_parameters() if name.endswith("value_conv"))
    assert weight.abs().sum() > 0 and history.fidelity[-1] > history.fidelity[0]
    assert_not_applicable(AttentionToLinear(value_conv=True), model, (tokens(2, 12),), reason_contains="square patch grid", dynamic_shapes=None)


def test_not_applicable_reasons():
    assert_not_applicable(AttentionToLinear(), nn.Linear(8, 8), (torch.randn(2, 8),), reason_contains="no attention")
    assert_not_applicable(AttentionToLinear(layers=[3]), SelfAttention().eval(), (tokens(),), reason_contains="out of range")
    assert_not_applicable(AttentionToLinear(), SelfAttention(dropout_p=0.1).eval(), (tokens(),), reason_contains="dropout")
    with pytest.raises(ValueError, match="feature_map"):
        AttentionToLinear(feature_map="cosine")


def test_rolls_back_when_the_budget_fails():
    opt = graphopt.optimize(SelfAttention().eval(), [AttentionToLinear(feature_map="relu", min_cosine=0.9999)], (tokens(),))
    assert opt.report.record("attention_to_linear").status == ROLLED_BACK
    assert ir.op_nodes(opt.graph_module, torch.ops.aten.scaled_dot_product_attention.default)


def test_bert_pads_contribute_nothing(tiny_bert):
    """Linear attention with BERT's key-padding mask: a padded sequence's valid tokens equal the sequence run alone."""
    model, ids, mask = tiny_bert
    opt = graphopt.optimize(model, ["canonicalize", AttentionToLinear(feature_map="elu", min_cosine=0.0)], (ids, mask))
    assert opt.report.record("attention_to_linear").status == APPLIED
    with torch.no_grad():
        padded = opt(ids, mask).last_hidden_state[1, :17]
        alone = opt(ids[1:, :17], mask[1:, :17]).last_hidden_state[0]
    assert_close(padded, alone, max_rel_err=1e-5)


def test_bert_after_remove_padding_gets_packed_linear_attention(tiny_bert):
    model, ids, mask = tiny_bert
    passes = lambda first: ["canonicalize", *first, AttentionToLinear(feature_map="hybrid", window=8, transfer_steps=0, min_cosine=0.0)]  # noqa: E731
    packed = graphopt.optimize(model, passes(["remove_padding"]), (ids, mask))
    padded = graphopt.optimize(model, passes([]), (ids, mask))
    ops = ir.count_ops(packed.graph_module)
    assert ops["graphopt.varlen_hybrid_attention.default"] == 2 and not ops["graphopt.varlen_attention.default"]
    valid = mask.bool()
    with torch.no_grad():
        assert_close(packed(ids, mask).last_hidden_state[valid], padded(ids, mask).last_hidden_state[valid], max_rel_err=1e-4)


def test_recovery_raises_fidelity_and_leaves_the_graph_as_it_was():
    model = SelfAttention(kv_heads=2).eval()
    batches = [(tokens(4, 24, seed=s),) for s in range(4)]
    opt = graphopt.optimize(model, [AttentionToLinear(feature_map="relu", min_cosine=0.0)], batches[0])
    code = opt.graph_module.code
    history = recover(opt.graph_module, model, batches, 40, lr=3e-3)
    assert history.fidelity[-1] > history.fidelity[0] + 0.01, (history.fidelity[0], history.fidelity[-1])
    assert opt.graph_module.code == code and not any(p.requires_grad for p in opt.graph_module.parameters())
    with torch.no_grad():
        assert_close(opt(*batches[0]), opt.graph_module(*batches[0]), max_rel_err=0)
    assert all(p.requires_grad for p in model.parameters())  # the user's model is not frozen or changed
