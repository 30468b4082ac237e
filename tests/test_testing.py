"""graphopt.testing: assertions compare the positions the applied passes declare, per input."""

import pytest
import torch
from torch.export import Dim

from graphopt.passes.remove_padding import RemovePadding
from graphopt.testing import assert_applies, declared_masks
from graphopt.pipeline.verify import Exact, compare


class TokenStates(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50, attn_implementation="eager")
        self.bert = BertModel(config).eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _batch(lengths, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return torch.randint(1, 50, (len(lengths), seq), generator=gen) * mask, mask


@pytest.fixture(scope="module")
def packed():
    model = TokenStates().eval()
    other = _batch([2, 9, 1, 4], 9, seed=1)
    p = RemovePadding()
    optimized = assert_applies(
        p,
        model,
        _batch([6, 3, 5], 6, seed=0),
        present=["graphopt.varlen_attention.default"],
        other_inputs=[other],
        dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},) * 2,
    )
    return model, optimized, p, other


def test_assert_applies_compares_valid_tokens_of_every_input(packed):
    model, optimized, _, (ids, mask) = packed
    with torch.no_grad():
        out, ref = optimized(ids, mask), model(ids, mask)
    assert not compare(out, ref, Exact()).ok  # all positions: the pads differ
    assert compare(out, ref, Exact(), [mask.bool()[..., None]]).ok


def test_declared_masks_follow_the_input(packed):
    model, _, p, (ids, mask) = packed
    with torch.no_grad():
        reference = model(ids, mask)
    (valid,) = declared_masks([p], reference, (ids, mask))
    assert torch.equal(valid.expand_as(reference), mask.bool()[..., None].expand_as(reference))
    assert declared_masks([], reference, (ids, mask)) is None
