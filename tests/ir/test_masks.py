"""graphopt.ir.masks: the abstract values of attention-mask derivations, and what is rejected."""

import pytest
import torch
from torch.export import Dim

import graphopt
from graphopt.ir import NotApplicable
from graphopt.ir.masks import Causal, Const, MaskAnalysis, Padded, Ramp
from tests_helpers import Fn

B, L = 2, 6


def _value(fn, *inputs, dynamic=False):
    """The abstract value of ``fn``'s output, on its captured graph."""
    shapes = (({0: Dim("b"), 1: Dim("l")},) + (None,) * (len(inputs) - 1),) if dynamic else None  # Fn takes *args
    gm = graphopt.capture(Fn(fn), inputs, dynamic_shapes=shapes)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return MaskAnalysis().value(out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0])


def _ids():
    return torch.zeros(B, L, dtype=torch.long)


def _ramps(ids):
    """Query positions along -2, key positions along -1, as Hugging Face lays them out."""
    n = ids.shape[1]
    return torch.arange(n)[None, None, :, None], torch.arange(n)[None, None, None, :]


def _positions(ids):
    """Position ids [B, L] (arange expanded over the batch) gathered by batch, query and key ramps."""
    b, n = ids.shape
    pos = torch.arange(n).unsqueeze(0).expand(b, -1)
    batch = torch.arange(b)[:, None, None, None]
    q, k = _ramps(ids)
    return pos, pos[batch, q], pos[batch, k]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize(
    ("form", "valid"),
    [
        (lambda q, k: k <= q, True),
        (lambda q, k: q >= k, True),
        (lambda q, k: k > q, False),
        (lambda q, k: q < k, False),
    ],
)
def test_key_at_most_query_is_causal(form, valid, dynamic):
    def mask(ids):
        q, k = _ramps(ids)
        return form(q, k)

    assert _value(mask, _ids(), dynamic=dynamic) == Causal(-2, -1, valid, not valid)


def test_position_ids_gathered_by_ramps_are_the_ramps():
    value = _value(lambda ids: _positions(ids)[1], _ids(), dynamic=True)
    assert value == Ramp(-2)
    assert _value(lambda ids: _positions(ids)[2], _ids(), dynamic=True) == Ramp(-1)


def test_hugging_face_causal_and_packed_sequence_mask():
    """The mask transformers builds from position ids alone: causal, and-ed with its check that
    the positions hold one sequence per row (provably all True for arange positions)."""

    def mask(ids):
        pos, q_pos, k_pos = _positions(ids)
        causal = torch.ones((), dtype=torch.bool) & (k_pos <= q_pos).to(torch.bool)
        first = pos[:, :1] - 1
        seq = torch.cumsum(torch.diff(pos, dim=-1, prepend=first) != 1, dim=-1)
        b = torch.arange(ids.shape[0])[:, None, None, None]
        q, k = _ramps(ids)
        return causal & (seq[b, q] == seq[b, k]).to(torch.bool)

    assert _value(mask, _ids(), dynamic=True) == Causal(-2, -1, True, False)


def test_position_rules():
    ids = _ids()
    assert _value(lambda x: torch.arange(x.shape[1]).unsqueeze(0).expand(B, -1)[:, :1], ids) == Const(0)
    assert _value(lambda x: torch.diff(torch.arange(x.shape[1]).expand(B, -1), dim=-1), ids) == Const(1)
    assert _value(lambda x: torch.diff(torch.arange(x.shape[1])[:, None].expand(-1, 3), dim=-1), ids) == Const(0)
    assert _value(lambda x: torch.cumsum(torch.zeros(B, L, dtype=torch.bool), -1), ids) == Const(0)
    assert _value(lambda x: torch.arange(x.shape[1]).expand(B, -1)[:1], ids) == Ramp(-1)  # fewer rows, same positions


def test_causal_combined_with_constants_and_views():
    def mask(ids):
        q, k = _ramps(ids)
        return torch.where(k <= q, 0.0, float("-inf")).expand(B, 1, -1, -1).transpose(-1, -2)

    assert _value(mask, _ids()) == Causal(-1, -2, 0.0, float("-inf"))


def _rejected(fn, *inputs, reason=None, dynamic=True):
    with pytest.raises(NotApplicable) as e:
        _value(fn, *inputs, dynamic=dynamic)
    if reason:
        assert reason in str(e.value), str(e.value)


def test_a_windowed_mask_is_not_causal():
    def window(ids):
        q, k = _ramps(ids)
        return (q - k).abs() <= 2

    _rejected(window, _ids())

    def band(ids):
        q, k = _ramps(ids)
        return (k <= q) & (k >= q - 2)

    _rejected(band, _ids())


def test_strictly_below_the_diagonal_is_the_negated_transpose():
    """``k < q`` is not ``q <= k``: True exactly where the index along -2 (as key) is not at most
    the one along -1 (as query), which no SDPA causal mask is."""

    def mask(ids):
        q, k = _ramps(ids)
        return k < q

    assert _value(mask, _ids(), dynamic=True) == Causal(-1, -2, False, True)


@pytest.mark.parametrize("form", [lambda q, k: k == q, lambda q, k: q != k])
def test_comparisons_that_are_not_the_causal_triangle(form):
    def mask(ids):
        q, k = _ramps(ids)
        return form(q, k)

    _rejected(mask, _ids(), reason="other than as a causal mask")


def test_query_and_key_of_different_lengths_are_not_causal():
    def cache(ids, past):
        q = torch.arange(ids.shape[1])[:, None]
        k = torch.arange(past.shape[1])[None, :]
        return k <= q

    shapes = (({0: Dim("b"), 1: Dim("l")}, {1: Dim("s")}),)
    gm = graphopt.capture(Fn(cache), (_ids(), torch.zeros(1, L + 3)), dynamic_shapes=shapes)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    with pytest.raises(NotApplicable, match="not provably equal"):
        MaskAnalysis().value(out.args[0][0])


def test_offset_query_positions_are_not_a_ramp():
    def cache(ids):
        q = torch.arange(ids.shape[1])[:, None] + 3
        return torch.arange(ids.shape[1])[None, :] <= q

    _rejected(cache, _ids(), reason="depend on the position")


def test_a_ramp_subtracted_from_zero_is_not_the_ramp():
    _rejected(lambda ids: torch.zeros((), dtype=torch.long) - torch.arange(ids.shape[1]), _ids())


def test_a_ramp_cast_to_bool_is_not_the_ramp():
    _rejected(lambda ids: torch.arange(ids.shape[1]).to(torch.bool), _ids(), reason="does not hold them all")


def test_causal_and_padding_together_are_rejected():
    def mask(ids, attention_mask):
        b = torch.arange(ids.shape[0])[:, None, None, None]
        q, k = _ramps(ids)
        return (k <= q) & attention_mask.bool()[b, k]

    key_padding = _value(
        lambda ids, m: m.bool()[torch.arange(B)[:, None, None, None], _ramps(ids)[1]], _ids(), torch.ones(B, L, dtype=torch.long), dynamic=False
    )
    assert key_padding.__class__ is Padded and (key_padding.batch_dim, key_padding.seq_dim) == (-4, -1)
    _rejected(mask, _ids(), torch.ones(B, L, dtype=torch.long), reason="causal mask with a padding mask", dynamic=False)
