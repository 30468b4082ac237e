"""prune_tokens (Zero-TPrune): Weighted-PageRank importance and similarity pruning on the packed tokens."""

import math

import pytest
import torch

import graphopt
from graphopt.ir import count_ops
from graphopt.passes.prune_tokens import PruneTokens
from graphopt.pipeline.report import APPLIED
from graphopt.testing import assert_close, assert_not_applicable
from graphopt.tools import zoo
from token_models import padded_batch, tiny_embedder

pytest.importorskip("transformers")

PRUNE = "graphopt.prune_tokens.default"


def _optimize(model, inputs, **options):
    options.setdefault("min_cosine", 0.0)
    return graphopt.optimize(model, ["canonicalize", PruneTokens(**options)], inputs)


def test_prunes_after_the_chosen_layers_keeping_ceil_ratio_of_real_tokens():
    model, (ids, mask) = tiny_embedder(layers=4), padded_batch()
    opt = _optimize(model, (ids, mask), keep_ratio=(0.8, 0.5), layers=(1, 2))
    record = opt.report.record("prune_tokens")
    assert record.status == APPLIED, record.reason
    ops = count_ops(opt.graph_module)
    assert ops[PRUNE] == 2 and ops["graphopt.token_importance.default"] == 2
    assert ops["graphopt.varlen_attention_sized.default"] == 0  # pruning keeps every size equal within a sequence
    # per sequence ceil(ratio * n) of its own real tokens, never counting pads: (24, 17, 9)
    after_first = [math.ceil(0.8 * n) for n in (24, 17, 9)]
    after_second = [math.ceil(0.5 * n) for n in after_first]
    assert record.stats["tokens"] == [50, sum(after_first), sum(after_second)]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(opt(ids, mask), model(ids, mask))
    assert cos.min() > 0.8 and cos.max() < 1 - 1e-6


def test_keeping_every_token_is_exact():
    """keep_ratio 1 runs the whole machinery (importance, pruning op, new layout, size-weighted
    pooling) and must give the original embedding."""
    model, (ids, mask) = tiny_embedder(), padded_batch()
    opt = _optimize(model, (ids, mask), keep_ratio=1.0, layers=(0, 1))
    assert count_ops(opt.graph_module)[PRUNE] == 2
    with torch.no_grad():
        assert_close(opt(ids, mask), model(ids, mask), rtol=1e-5, atol=1e-5)


def test_no_cross_talk_a_padded_batch_equals_each_sequence_alone():
    model, (ids, mask) = tiny_embedder(), padded_batch()
    opt = _optimize(model, (ids, mask), keep_ratio=0.6, layers=(0,))
    with torch.no_grad():
        batched = opt(ids, mask)
        for b, n in enumerate(mask.sum(1).tolist()):
            assert_close(batched[b : b + 1], opt(ids[b : b + 1, :n], mask[b : b + 1, :n]), rtol=1e-5, atol=1e-5)


def test_protected_tokens_survive_any_ratio():
    """With CLS and SEP protected and every other token pruned, the embedding is the mean of CLS and
    SEP as the pruned layers compute them: each row keeps exactly 2 tokens."""
    model, (ids, mask) = tiny_embedder(), padded_batch()
    opt = _optimize(model, (ids, mask), keep_ratio=0.01, layers=(0,))
    assert opt.report.record("prune_tokens").stats["tokens"] == [50, 6]


def test_budget_failure_rolls_back():
    model, (ids, mask) = tiny_embedder(), padded_batch()
    opt = graphopt.optimize(model, ["canonicalize", PruneTokens(keep_ratio=0.3, min_cosine=0.9999)], (ids, mask))
    assert opt.report.record("prune_tokens").status != APPLIED
    assert PRUNE not in count_ops(opt.graph_module)


def test_not_applicable_to_per_token_outputs(tiny_bert):
    model, ids, mask = tiny_bert
    assert_not_applicable(PruneTokens(min_cosine=0.0), model, (ids, mask), reason_contains="per-token")


def test_not_applicable_names_the_layers_out_of_range():
    model, (ids, mask) = tiny_embedder(), padded_batch()
    assert_not_applicable(PruneTokens(layers=(7,), min_cosine=0.0), model, (ids, mask), reason_contains="out of range")


def test_options_are_checked():
    with pytest.raises(ValueError, match="keep_ratio"):
        PruneTokens(keep_ratio=1.5)
    with pytest.raises(ValueError, match="per layer"):
        PruneTokens(keep_ratio=(0.5, 0.5))


def test_vit_without_a_padding_mask_is_packed_and_pruned():
    """A ViT has no padding mask: the pass packs its tokens (all valid) and prunes patches, keeping CLS."""
    entry = zoo.load("vit-s", image_size=64, num_hidden_layers=2)
    model = _ClsHead(entry.model)
    (pixels,) = entry.example_inputs
    opt = _optimize(model, (pixels,), keep_ratio=0.5, layers=(0,))
    record = opt.report.record("prune_tokens")
    assert record.status == APPLIED and record.stats["packed_here"], record.reason
    tokens = record.stats["tokens"]
    assert tokens[1] == pixels.shape[0] * math.ceil(0.5 * tokens[0] / pixels.shape[0])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(opt(pixels), model(pixels))
    assert cos.min() > 0.5


class _ClsHead(torch.nn.Module):
    """A ViT's CLS token, what a classifier reads."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values):
        return self.vit(pixel_values).last_hidden_state[:, 0]


@pytest.mark.slow
def test_minilm_on_real_sentences_one_layer():
    entry = zoo.load("minilm")
    ids, mask = zoo.tokenize(entry.tokenizer, zoo.real_sentences(32))
    opt = _optimize(entry.model, (ids, mask), keep_ratio=0.9, layers=(3,))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(opt(ids, mask), entry.model(ids, mask))
    assert cos.mean() > 0.97 and cos.min() > 0.85, (cos.mean(), cos.min())
