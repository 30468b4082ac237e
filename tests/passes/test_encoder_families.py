"""canonicalize + remove_padding on every encoder family transformers ships that takes an attention
mask, in both attention implementations, as users build them (tiny configs, random init).

For each: the pass applies, the graph runs ``graphopt.varlen_attention`` and no SDPA, and every
sequence's valid tokens (and the CLS pooler, where the model has one) equal a run of the original
model on that sequence alone, unpadded. A family that cannot be exported or rewritten is an xfail
that says why (strict: when it starts working, the test says so)."""

import pytest
import torch
from torch.export import Dim

import graphopt
from graphopt.ir import count_ops
from graphopt.pipeline.report import APPLIED
from graphopt.testing import assert_close

transformers = pytest.importorskip("transformers")

SDPA = "aten.scaled_dot_product_attention.default"
VARLEN = "graphopt.varlen_attention.default"
TOKEN_DIMS = ({0: Dim.AUTO, 1: Dim.AUTO},) * 2
LENGTHS, SEQ = [9, 4, 1], 9  # one full row, one half padded, one single token


def _bert_like(**extra):
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, **extra)


# family -> (config class, model class, config fields); DistilBERT names its fields differently
FAMILIES = {
    "bert": ("BertConfig", "BertModel", _bert_like()),
    "roberta": ("RobertaConfig", "RobertaModel", _bert_like()),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", _bert_like()),
    "camembert": ("CamembertConfig", "CamembertModel", _bert_like()),
    "xlm-roberta-xl": ("XLMRobertaXLConfig", "XLMRobertaXLModel", _bert_like()),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextModel", _bert_like()),
    "ernie": ("ErnieConfig", "ErnieModel", _bert_like()),
    "electra": ("ElectraConfig", "ElectraModel", _bert_like(embedding_size=16)),
    "albert": ("AlbertConfig", "AlbertModel", _bert_like(embedding_size=16)),
    "megatron-bert": ("MegatronBertConfig", "MegatronBertModel", _bert_like()),
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100)),
    "mpnet": ("MPNetConfig", "MPNetModel", _bert_like()),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", _bert_like()),
    "roformer": ("RoFormerConfig", "RoFormerModel", _bert_like()),
}

_NO_SDPA = "transformers implements no SDPA attention for this family (ValueError at construction)"
EXPECTED_FAILURES = {
    ("megatron-bert", "sdpa"): (ValueError, _NO_SDPA),
    ("mpnet", "sdpa"): (ValueError, _NO_SDPA),
    ("deberta-v2", "sdpa"): (ValueError, _NO_SDPA),
    ("roformer", "sdpa"): (ValueError, _NO_SDPA),
    # The scores get a learned relative-position bias: not a padding mask, so not SDPA with one.
    ("mpnet", "eager"): (AssertionError, "relative position bias added to the scores: the attention is not softmax(QK^T)+padding mask"),
    # Disentangled attention (content-to-position and position-to-content scores).
    ("deberta-v2", "eager"): (AssertionError, "disentangled attention: the scores mix relative-position terms, not a padding mask"),
    # Rotary position embeddings rotate Q and K by each token's position inside the attention.
    ("roformer", "eager"): (AssertionError, "rotary position embeddings depend on each token's position, which the packed layout drops"),
}


def _cases() -> list:
    return list(_case_iter())


def _case_iter():
    for family in FAMILIES:
        for impl in ("sdpa", "eager"):
            failure = EXPECTED_FAILURES.get((family, impl))
            marks = [pytest.mark.xfail(raises=failure[0], reason=failure[1], strict=True)] if failure else []
            yield pytest.param(family, impl, id=f"{family}-{impl}", marks=marks)


def _build(family: str, impl: str) -> torch.nn.Module:
    config_name, model_name, fields = FAMILIES[family]
    config = getattr(transformers, config_name)(**fields, attn_implementation=impl)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, model_name)(config).eval()


def _batch(lengths: list[int], seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), seq), generator=gen)  # no special-token ids
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask + (1 - mask), mask  # pads hold id 1, RoBERTa's padding_idx (any id works for BERT)


@pytest.mark.parametrize(("family", "impl"), _cases())
def test_remove_padding_is_exact_on_each_family(family, impl):
    model = _build(family, impl)
    optimized = graphopt.optimize(model, ["canonicalize", "remove_padding"], _batch(LENGTHS, SEQ, seed=0), dynamic_shapes=TOKEN_DIMS)
    record = optimized.report.record("remove_padding")
    assert record.status == APPLIED, f"{family}/{impl}: remove_padding {record.status}: {record.reason}"
    ops = count_ops(optimized.graph_module)
    assert ops[VARLEN] == 2 and ops[SDPA] == 0

    lengths, seq = [3, 11, 6, 11], 11  # another batch and length than the capture's
    ids, mask = _batch(lengths, seq, seed=1)
    with torch.no_grad():
        out = optimized(ids, mask)
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, :n], mask[row : row + 1, :n])
            assert_close(out.last_hidden_state[row, :n], alone.last_hidden_state[0])
            if getattr(alone, "pooler_output", None) is not None:
                assert_close(out.pooler_output[row], alone.pooler_output[0])
