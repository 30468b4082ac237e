"""graphopt.flops: FLOP rules against hand-computed numbers and torch's FlopCounterMode."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim
from torch.fx import Graph, GraphModule
from torch.utils.flop_counter import FlopCounterMode

import graphopt
from graphopt import capture, ir
from graphopt.tools import zoo
from graphopt.ir.flops import UnknownSizeError, count_flops, node_flops, param_bytes, register_flop_rule
from graphopt.ops.varlen import cu_seqlens
from tests_helpers import Fn


def _flops(fn, *inputs, target):
    gm = capture(Fn(fn), inputs)
    (node,) = ir.op_nodes(gm, target)  # the op under test is really in the canonical IR
    assert count_flops(gm) == node_flops(node)
    return node_flops(node)


def test_linear():
    gm = capture(nn.Linear(8, 16), (torch.randn(2, 5, 8),))
    assert count_flops(gm) == 2 * (2 * 5) * 16 * 8


def test_matmul_bmm_mm_addmm():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    assert _flops(torch.matmul, a, b, target=ir.aten.matmul) == 2 * 3 * 4 * 6 * 5
    assert _flops(torch.bmm, a, b, target=ir.aten.bmm) == 2 * 3 * 4 * 6 * 5
    assert _flops(torch.mm, a[0], b[0], target=ir.aten.mm) == 2 * 4 * 6 * 5
    assert _flops(torch.addmm, torch.randn(6), a[0], b[0], target=ir.aten.addmm) == 2 * 4 * 6 * 5
    assert _flops(torch.matmul, a[0, 0], b[0], target=ir.aten.matmul) == 2 * 6 * 5  # vector @ matrix


def test_conv_with_groups():
    conv = nn.Conv2d(4, 8, 3, groups=2)
    gm = capture(conv, (torch.randn(1, 4, 10, 10),))
    # output [1, 8, 8, 8]; each output element reads in_channels/groups * 3 * 3 = 18 inputs
    assert count_flops(gm) == 2 * (8 * 8 * 8) * (2 * 3 * 3)
    gm = capture(nn.Conv1d(3, 5, 3, padding=1), (torch.randn(2, 3, 7),))
    assert count_flops(gm) == 2 * (2 * 5 * 7) * (3 * 3)


def test_sdpa():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 16)
    flops = _flops(F.scaled_dot_product_attention, q, k, v, target=ir.aten.scaled_dot_product_attention)
    assert flops == 2 * (2 * 4) * 6 * 10 * 8 + 2 * (2 * 4) * 6 * 10 * 16  # q @ k^T, then p @ v


def test_einsum():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    assert _flops(lambda x, y: torch.einsum("bij, bjk -> bik", x, y), a, b, target=ir.aten.einsum) == 2 * 3 * 4 * 5 * 6
    assert _flops(lambda x: torch.einsum("bij->bji", x), a, target=ir.aten.einsum) == 0  # no contraction


def test_einsum_with_ellipsis():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6)
    flops = _flops(lambda x, y: torch.einsum("...ij,...jk->...ik", x, y), a, b, target=ir.aten.einsum)
    assert flops == 2 * (2 * 3) * 4 * 5 * 6


def test_transposed_convolution():
    weight = torch.randn(4, 6, 3, 3)  # [C_in, C_out, kH, kW]
    x = torch.randn(1, 4, 5, 5)
    flops = _flops(
        lambda t: torch.ops.aten.convolution(t, weight, None, [2, 2], [1, 1], [1, 1], True, [0, 0], 1),
        x,
        target=ir.aten.convolution,
    )
    assert flops == 2 * (4 * 5 * 5) * (6 * 3 * 3)  # every input element scatters into C_out * k * k outputs


def test_count_flops_matches_torch_flop_counter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 7, 8)
    gm = capture(model, (x,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert count_flops(gm) == counter.get_total_flops() == 2 * 21 * (8 * 32 + 32 * 4)


def test_symbolic_sizes_count_at_their_example_value():
    model, x = nn.Linear(8, 16), torch.randn(3, 8)
    dynamic = capture(model, (x,), dynamic_shapes=({0: Dim.AUTO},))
    assert isinstance(ir.shape_of(ir.op_nodes(dynamic, ir.aten.linear)[0])[0], torch.SymInt)
    assert count_flops(dynamic) == count_flops(capture(model, (x,))) == 2 * 3 * 16 * 8


def test_register_flop_rule_for_a_new_target():
    def fused(x):
        return x

    graph = Graph()
    x = graph.placeholder("x")
    node = graph.call_function(fused, (x,))
    graph.output(node)
    gm = GraphModule(nn.Module(), graph)
    assert count_flops(gm) == 0  # no rule: counted as free
    register_flop_rule(fused)(lambda n: 42)
    assert count_flops(gm) == 42


class TiedLM(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(self.wte(ids))


def test_param_bytes_counts_tied_weights_once():
    ids = torch.tensor([[1, 2, 3]])
    assert param_bytes(capture(TiedLM(tie=True), (ids,))) == 10 * 4 * 4
    assert param_bytes(capture(TiedLM(tie=False), (ids,))) == 2 * 10 * 4 * 4
    half = capture(nn.Linear(8, 16).half(), (torch.randn(2, 8).half(),))
    assert param_bytes(half) == (16 * 8 + 16) * 2


class PackedAttention(nn.Module):
    """pack -> linear -> two-head varlen attention: the layout remove_padding produces."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x, mask):
        packed = torch.ops.graphopt.pack_tokens(x, mask)  # [T, 8], T data-dependent
        q, k, v = self.qkv(packed).unflatten(-1, (3, 2, 4)).unbind(1)
        return torch.ops.graphopt.varlen_attention(q, k, v, cu_seqlens(mask))


def test_unbacked_sizes_count_at_the_example_runs_values():
    lengths = [5, 1, 3]
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).long()
    x = torch.randn(3, 5, 8)
    gm = capture(PackedAttention().eval(), (x, mask))
    (pack,) = ir.op_nodes(gm, torch.ops.graphopt.pack_tokens.default)
    assert isinstance(ir.shape_of(pack)[0], torch.SymInt)  # T is unbacked: it has no hint
    with pytest.raises(UnknownSizeError, match="example inputs"):
        count_flops(gm)
    tokens, pairs = sum(lengths), sum(n * n for n in lengths)
    expected = 2 * tokens * 24 * 8 + 2 * pairs * 2 * (4 + 4)  # qkv linear on T tokens; per-sequence attention
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated size_hint
        assert count_flops(gm, (x, mask)) == expected
        assert count_flops(gm) == expected  # the example run is remembered for this graph
    other = (torch.arange(5)[None, :] < torch.tensor([5, 5, 5])[:, None]).long()
    assert count_flops(gm, (x, other)) == 2 * 15 * 24 * 8 + 2 * 75 * 2 * 8  # a new run replaces it


def test_varlen_attention_without_offsets_counts_even_lengths():
    q, k, v = torch.randn(10, 2, 4), torch.randn(10, 2, 4), torch.randn(10, 2, 6)
    offsets = torch.tensor([0, 7, 10])  # lengths 7 and 3: 58 query-key pairs
    flops = _flops(torch.ops.graphopt.varlen_attention, q, k, v, offsets, target=torch.ops.graphopt.varlen_attention)
    assert flops == 2 * (10 * 10 // 2) * 2 * (4 + 6)  # static sizes, offsets never run: T² / B pairs


def test_pack_and_unpack_are_free():
    x, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    gm = capture(Fn(lambda t, m: torch.ops.graphopt.unpack_tokens(torch.ops.graphopt.pack_tokens(t, m) * 2, m)), (x, mask))
    assert ir.count_ops(gm)["graphopt.pack_tokens.default"] == 1
    assert count_flops(gm, (x, mask)) == 0


def test_pooling_the_packed_tokens_is_free_as_aten_sum_is():
    x, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    summed = capture(Fn(lambda t, m: torch.ops.graphopt.sum_tokens(torch.ops.graphopt.pack_tokens(t, m), m)), (x, mask))
    assert ir.count_ops(summed)["graphopt.sum_tokens.default"] == 1
    assert count_flops(summed, (x, mask)) == 0 == count_flops(capture(Fn(lambda t: t.sum(1)), (x,)), (x,))  # reductions are memory-bound
    selected = capture(Fn(lambda t, m: torch.ops.graphopt.select_token(torch.ops.graphopt.pack_tokens(t, m), m, 0)), (x, mask))
    assert count_flops(selected, (x, mask)) == 0


@pytest.fixture(scope="module")
def minilm_padded_to_128():
    entry = zoo.load("minilm")
    ids, mask = zoo.tokenize(entry.tokenizer, zoo.real_sentences(8), pad_to=128)
    optimized = graphopt.optimize(entry.model, ["remove_padding"], (ids, mask), dynamic_shapes=entry.dynamic_shapes)
    return optimized, mask


def _minilm_flops(tokens: int, pairs: int) -> int:
    """6 layers of hidden 384, 12 heads of 32, FFN 1536: linears per token, attention per query-key pair."""
    per_token = 2 * (4 * 384 * 384 + 2 * 384 * 1536)
    per_pair = 2 * 12 * (32 + 32)
    return 6 * (tokens * per_token + pairs * per_pair)


def test_minilm_flops_drop_with_the_padding_removed(minilm_padded_to_128):
    optimized, mask = minilm_padded_to_128
    lengths = mask.sum(1).tolist()
    record = optimized.report.record("remove_padding")
    assert record.flops_before == _minilm_flops(8 * 128, 8 * 128 * 128)
    assert record.flops_after == _minilm_flops(sum(lengths), sum(n * n for n in lengths))  # each sentence alone
    valid = sum(lengths) / mask.numel()
    assert valid < 0.25 and record.flops_before / record.flops_after > 0.9 / valid
    assert f"{record.flops_before / 1e9:.2f}G → {record.flops_after / 1e9:.2f}G" in str(optimized.report)
