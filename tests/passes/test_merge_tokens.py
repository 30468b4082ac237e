"""merge_tokens (ToMe): bipartite soft matching on the packed tokens, proportional attention, size-weighted pooling."""

import pytest
import torch

import graphopt
from graphopt.ir import count_ops
from graphopt.passes.merge_tokens import MergeTokens
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE
from graphopt.testing import assert_close, assert_not_applicable
from graphopt.tools import zoo
from token_models import padded_batch, tiny_embedder

pytest.importorskip("transformers")

MERGE = "graphopt.merge_tokens.default"


def _optimize(model, inputs, **options):
    options.setdefault("min_cosine", 0.0)
    return graphopt.optimize(model, ["canonicalize", MergeTokens(**options)], inputs)


def test_merges_in_every_block_with_proportional_attention_and_weighted_pooling():
    model, (ids, mask) = tiny_embedder(), padded_batch()
    opt = _optimize(model, (ids, mask), r=3)
    record = opt.report.record("merge_tokens")
    assert record.status == APPLIED, record.reason
    ops = count_ops(opt.graph_module)
    assert ops[MERGE] == 3 and ops["graphopt.varlen_attention_sized.default"] == 2  # the first attention sees every token
    assert ops["graphopt.varlen_attention.default"] == 1
    # each sequence merges min(r, |A|) of its tokens between [CLS] and [SEP], |A| = ceil(free / 2):
    # 24 -> 21 -> 18 -> 15, 17 -> 14 -> 11 -> 8, and 9 -> 6 -> 4 (|A| = 2) -> 3 (|A| = 1)
    assert record.stats["tokens"] == [50, 41, 33, 26]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(opt(ids, mask), model(ids, mask)).min()
    assert 0.9 < cos < 1 - 1e-6  # approximate, and close


def test_duplicate_tokens_merge_exactly():
    """With no position information, equal ids stay equal tokens in every layer; ToMe pairs each with
    its twin (cosine 1), and proportional attention plus size-weighted pooling then give the same
    embedding as the full sequence: the sizes, the attention bias and the pooling weights are all right."""
    model = tiny_embedder(positions=False)
    ids = torch.tensor([[1, 7, 7, 9, 9, 11, 11, 2, 0, 0], [1, 5, 5, 8, 8, 2, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    opt = _optimize(model, (ids, mask), r=3, layers=(0,))
    assert opt.report.record("merge_tokens").stats["tokens"] == [14, 9]  # 3 pairs, then the 2 of the shorter row
    with torch.no_grad():
        assert_close(opt(ids, mask), model(ids, mask), rtol=1e-5, atol=1e-5)


def test_without_proportional_attention_duplicates_are_not_exact():
    model = tiny_embedder(positions=False)
    ids = torch.tensor([[1, 7, 7, 9, 9, 11, 11, 2]])
    mask = torch.ones_like(ids)
    opt = _optimize(model, (ids, mask), r=3, layers=(0,), proportional=False)
    assert count_ops(opt.graph_module)["graphopt.varlen_attention_sized.default"] == 0
    with torch.no_grad():
        assert not torch.allclose(opt(ids, mask), model(ids, mask), atol=1e-4)


def test_no_cross_talk_a_padded_batch_equals_each_sequence_alone():
    model, (ids, mask) = tiny_embedder(), padded_batch()
    opt = _optimize(model, (ids, mask), r=2)
    with torch.no_grad():
        batched = opt(ids, mask)
        for b, n in enumerate(mask.sum(1).tolist()):
            alone = opt(ids[b : b + 1, :n], mask[b : b + 1, :n])
            assert_close(batched[b : b + 1], alone, rtol=1e-5, atol=1e-5)


def test_budget_failure_rolls_back_to_the_unmerged_graph():
    model, (ids, mask) = tiny_embedder(), padded_batch()
    opt = graphopt.optimize(model, ["canonicalize", MergeTokens(r=8, min_cosine=0.9999)], (ids, mask))
    record = opt.report.record("merge_tokens")
    assert record.status != APPLIED and "cosine" in record.reason
    assert MERGE not in count_ops(opt.graph_module)
    with torch.no_grad():
        assert_close(opt(ids, mask), model(ids, mask), rtol=1e-5, atol=1e-5)


def test_not_applicable_to_per_token_outputs(tiny_bert):
    model, ids, mask = tiny_bert  # BertModel: last_hidden_state is one row per position
    assert_not_applicable(MergeTokens(min_cosine=0.0), model, (ids, mask), reason_contains="per-token")


def test_not_applicable_to_a_causal_decoder():
    entry = zoo.load("gpt2-tiny")
    record = assert_not_applicable(MergeTokens(min_cosine=0.0), entry.model, entry.example_inputs, reason_contains="causal")
    assert record.status == NOT_APPLICABLE


def test_an_r_per_layer():
    model, (ids, mask) = tiny_embedder(), padded_batch()
    record = _optimize(model, (ids, mask), r=[3, 1], layers=[0, 2]).report.record("merge_tokens")
    assert record.status == APPLIED, record.reason
    # 24 -> 21 (r 3) -> 21 -> 20 (r 1); 17 -> 14 -> 14 -> 13; 9 -> 6 -> 6 -> 5
    assert record.stats["r"] == [3, 1] and record.stats["tokens"] == [50, 41, 38]


def test_options_are_checked():
    with pytest.raises(ValueError, match="r must be"):
        MergeTokens(r=0)
    with pytest.raises(ValueError, match="an r per layer"):
        MergeTokens(r=(2, 3), layers=(1,))


def test_merged_graph_exports_saves_and_loads(tmp_path):
    model, (ids, mask) = tiny_embedder(), padded_batch()
    opt = _optimize(model, (ids, mask), r=2)
    path = str(tmp_path / "merged.pt2")
    graphopt.save(opt, path, (ids, mask))
    loaded = graphopt.load(path)
    other_ids, other_mask = padded_batch(lengths=(11, 20), seq=20, seed=3)
    with torch.no_grad():
        assert_close(loaded(other_ids, other_mask), opt(other_ids, other_mask), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_minilm_on_real_sentences_one_block():
    entry = zoo.load("minilm")
    ids, mask = zoo.tokenize(entry.tokenizer, zoo.real_sentences(32))
    opt = _optimize(entry.model, (ids, mask), r=2, layers=(3,))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(opt(ids, mask), entry.model(ids, mask))
    assert cos.mean() > 0.97 and cos.min() > 0.88, (cos.mean(), cos.min())  # measured 0.978 / 0.907: short text merges poorly
    assert opt.report.record("merge_tokens").stats["kept"] < 0.95
