"""graphopt::linear_attention / hybrid_attention and their packed forms against the quadratic references."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import graphopt  # noqa: F401  (registers the ops)
from graphopt.ir import oprecord
from graphopt.ops.linear_attention.cpu import hybrid_attention_fast, key_weights, linear_attention_fast
from graphopt.ops.linear_attention.reference import (
    causal_keep,
    hybrid_attention_reference,
    linear_attention_recurrent,
    linear_attention_reference,
    varlen_linear_attention_reference,
)

ops = torch.ops.graphopt


def operands(batch=2, heads=4, kv_heads=2, length=150, dim=8, dv=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dv, generator=g)
    return q, k, v, F.elu(q) + 1, F.elu(k) + 1


def masks(batch, length):
    """No mask, key padding as an additive and a bool mask, the same materialized per query, and causal ∧ padding."""
    additive = torch.zeros(batch, 1, 1, length)
    additive[0, ..., length // 2 :] = torch.finfo(torch.float32).min
    keys = additive == 0
    return {
        "none": None,
        "additive": additive,
        "bool": keys,
        "materialized": additive.expand(batch, 1, length, length).contiguous(),
        "causal-and-keys": causal_keep(length, length) & keys,  # a decoder mask with padding: the hybrid window is causal
    }


def fp64(mask):
    return mask if mask is None or mask.dtype == torch.bool else mask.double()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 150, 8, 12), (1, 2, 2, 7, 16, 16), (1, 3, 3, 260, 24, 40)], ids=["gqa-150", "short", "odd-260"])
def test_fast_forms_equal_the_references(shape, causal):
    b, h, hk, length, d, dv = shape
    q, k, v, fq, fk = operands(b, h, hk, length, d, dv)
    mix = torch.randn(h, generator=torch.Generator().manual_seed(1))
    for name, mask in masks(b, length).items():
        expected = linear_attention_reference(fq.double(), fk.double(), v.double(), fp64(mask), causal)
        torch.testing.assert_close(linear_attention_fast(fq, fk, v, mask, causal), expected.float(), rtol=1e-4, atol=1e-5, msg=name)
        for window in (1, 64, 200):
            expected = hybrid_attention_reference(*(t.double() for t in (q, k, v, fq, fk, mix)), window, fp64(mask), causal)
            got = hybrid_attention_fast(q, k, v, fq, fk, mix, window, mask, causal)
            torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4, msg=f"{name}, window {window}")


def test_masks_are_classified_by_what_they_weigh():
    length = 6
    m = masks(2, length)
    assert key_weights(None, False, length, length, torch.float32) == ("keys", None)
    assert key_weights(m["additive"], False, length, length, torch.float32)[0] == "keys"
    assert key_weights(m["materialized"], False, length, length, torch.float32)[0] == "keys"
    assert key_weights(m["causal-and-keys"], False, length, length, torch.float32)[0] == "causal_keys"
    band = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).abs() <= 1
    assert key_weights(band, False, length, length, torch.float32) == ("general", None)


def test_a_mask_that_differs_by_query_runs_the_definition():
    q, k, v, fq, fk = operands(length=20)
    band = (torch.arange(20)[:, None] - torch.arange(20)[None, :]).abs() <= 3
    torch.testing.assert_close(ops.linear_attention(fq, fk, v, band), linear_attention_reference(fq, fk, v, band))


def test_pads_contribute_nothing_and_a_padded_batch_equals_each_sequence_alone():
    q, k, v, fq, fk = operands(batch=2, length=150)
    lengths = [150, 97]
    keys = torch.arange(150)[None, :] < torch.tensor(lengths)[:, None]
    garbage = fk.clone()
    garbage[1, :, 97:] = 1e4  # what sits at pads must not matter
    for op, args in ((ops.linear_attention, ()), (ops.hybrid_attention, None)):
        for b, n in enumerate(lengths):
            if args is None:
                mix = torch.zeros(4)
                batch = ops.hybrid_attention(q, k, v, fq, garbage, mix, 16, keys[:, None, None, :])
                alone = ops.hybrid_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], fq[b : b + 1, :, :n], fk[b : b + 1, :, :n], mix, 16)
            else:
                batch = op(fq, garbage, v, keys[:, None, None, :])
                alone = op(fq[b : b + 1, :, :n], fk[b : b + 1, :, :n], v[b : b + 1, :, :n])
            torch.testing.assert_close(batch[b : b + 1, :, :n], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["linear", "hybrid"])
def test_causal_outputs_do_not_see_later_tokens(op):
    q, k, v, fq, fk = operands(length=200)
    changed = [t.clone() for t in (q, k, v, fq, fk)]
    for t in changed:
        t[:, :, 120:] += 3.0
    mix = torch.zeros(4)

    def run(q, k, v, fq, fk):
        return ops.linear_attention(fq, fk, v, is_causal=True) if op == "linear" else ops.hybrid_attention(q, k, v, fq, fk, mix, 32, is_causal=True)

    before, after = run(q, k, v, fq, fk), run(*changed)
    torch.testing.assert_close(before[:, :, :120], after[:, :, :120])
    assert not torch.allclose(before[:, :, 120:], after[:, :, 120:])


def test_the_recurrent_form_decodes_as_the_causal_op():
    _, _, v, fq, fk = operands(length=40)
    whole = ops.linear_attention(fq, fk, v, is_causal=True)
    prefix, state = linear_attention_recurrent(fq[:, :, :25], fk[:, :, :25], v[:, :, :25])
    steps = [linear_attention_recurrent(fq[:, :, t : t + 1], fk[:, :, t : t + 1], v[:, :, t : t + 1], state)[0] for t in range(25, 26)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=2), whole[:, :, :26], rtol=1e-5, atol=1e-6)


def test_a_hybrid_whose_window_covers_everything_is_softmax_attention():
    q, k, v, fq, fk = operands(length=150)
    keys = masks(2, 150)["additive"]
    out = ops.hybrid_attention(q, k, v, fq, fk, torch.zeros(4), 400, keys)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keys, enable_gqa=True), rtol=1e-4, atol=1e-5)


def test_packed_forms_equal_each_sequence_alone():
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 150, 150, 301])  # an empty sequence in the middle
    q, k, v = (torch.randn(301, 2, 8, generator=g) for _ in range(3))
    fq, fk = q.relu(), k.relu()
    torch.testing.assert_close(ops.varlen_linear_attention(fq, fk, v, cu), varlen_linear_attention_reference(fq, fk, v, cu), rtol=1e-4, atol=1e-5)
    mix = torch.zeros(2)
    got = ops.varlen_hybrid_attention(q, k, v, fq, fk, mix, 16, cu)
    for start, end in ((0, 150), (150, 301)):
        one = [t[start:end].transpose(0, 1)[None] for t in (q, k, v, fq, fk)]
        torch.testing.assert_close(got[start:end], hybrid_attention_reference(*one, mix, 16)[0].transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_gradients_equal_the_references():
    q, k, v, fq, fk = operands(length=150)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    mix = torch.zeros(4, requires_grad=True)

    def grads(fn):
        out = fn(q, k, v, F.elu(q) + 1, F.elu(k) + 1)
        return torch.autograd.grad(out.square().sum(), [*leaves, mix], allow_unused=True)

    for fast, reference in (
        (lambda *a: ops.linear_attention(*a[3:], a[2], is_causal=True), lambda *a: linear_attention_reference(*a[3:], a[2], is_causal=True)),
        (lambda *a: ops.hybrid_attention(*a, mix, 16), lambda *a: hybrid_attention_reference(*a, mix, 16)),
    ):
        for got, expected in zip(grads(fast), grads(reference)):
            if expected is not None:
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_long_sequences_never_build_a_length_by_length_tensor(causal):
    length = 2048
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, 16, generator=g) for _ in range(3))
    for run in (
        lambda: ops.linear_attention(q.relu(), k.relu(), v, is_causal=causal),
        lambda: ops.hybrid_attention(q, k, v, q.relu(), k.relu(), torch.zeros(2), 64, is_causal=causal),
    ):
        with _LargestTensor() as watch:
            run()
        assert watch.largest < length * length // 4, watch.largest


def test_flop_rules_count_less_than_softmax_at_long_lengths():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return ops.linear_attention(q.relu(), k.relu(), v), F.scaled_dot_product_attention(q, k, v)

    x = torch.randn(1, 2, 4096, 32)
    gm = torch.export.export(Layer(), (x, x, x)).graph_module
    from graphopt.ir.flops import node_flops

    counts = {str(n.target): node_flops(n) for n in gm.graph.nodes if n.op == "call_function" and "attention" in str(n.target)}
    assert 0 < counts["graphopt.linear_attention.default"] < counts["aten.scaled_dot_product_attention.default"] / 30
    assert oprecord.op_record(ops.linear_attention).reference is linear_attention_reference
