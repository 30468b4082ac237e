"""graphopt.testing: assertions compare the positions the applied passes declare, per input."""

import pytest
import torch
from torch.export import Dim

from graphopt.passes.remove_padding import RemovePadding
from graphopt.testing import assert_applies, declared_masks
from graphopt.pipeline.verify import Exact, compare, relative_error


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
    return model, optimized, optimized.report.record(p.name), other  # the run's record holds its output masks


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


# the numerics kit


def test_assert_close_takes_the_tolerance_of_the_dtype():
    from graphopt.testing import TOLERANCES, assert_close

    x = torch.ones(4)
    tol = TOLERANCES[torch.float32]
    assert_close(x + 0.9 * (tol.atol + tol.rtol), x)
    with pytest.raises(AssertionError, match=r"output\[1\]\['b'\]"):
        assert_close((x, {"b": x + 2 * tol.atol}), (x, {"b": x}))
    # compared in fp32 but computed in fp16: fp16's tolerance applies
    assert_close(x + 5e-4, x, dtype=torch.float16)
    with pytest.raises(AssertionError):
        assert_close(x + 5e-4, x)


def test_assert_close_is_exact_on_integers_and_plain_values():
    from graphopt.testing import assert_close

    assert_close({"ids": torch.arange(3), "n": 2}, {"ids": torch.arange(3), "n": 2})
    with pytest.raises(AssertionError):
        assert_close(torch.arange(3), torch.arange(3) + 1, rtol=1.0, atol=1.0)
    with pytest.raises(AssertionError, match="3 != 2"):
        assert_close((torch.ones(1), 3), (torch.ones(1), 2))
    with pytest.raises(AssertionError, match="structures differ"):
        assert_close((torch.ones(1),), [torch.ones(1)])


def test_assert_close_max_rel_err_is_relative_to_the_output_scale():
    from graphopt.testing import assert_close, rel_err

    assert rel_err is relative_error  # the budget's definition, not a copy
    ref = torch.tensor([100.0, 0.0])
    out = torch.tensor([100.0, 0.01])  # elementwise far off at the zero, 1e-4 of the scale
    assert_close(out, ref, max_rel_err=1e-4)
    with pytest.raises(AssertionError, match="relative error 0.0001 > 1e-05"):
        assert_close(out, ref, max_rel_err=1e-5)
    with pytest.raises(AssertionError):
        assert_close(out, ref)
    with pytest.raises(ValueError):
        assert_close(out, ref, max_rel_err=1e-4, rtol=0, atol=0)
