"""graphopt.streams: residual streams found in real graphs, writers traced to their parameters."""

import re

import pytest
import torch
from torch import nn

from graphopt import capture, ir
from graphopt.tools import zoo
from graphopt.pipeline.manager import PassManager
from graphopt.ir import NotApplicable, describe
from graphopt.ir.streams import find_residual_streams, trace_writer


def _names(nodes):
    return [n.name for n in nodes]


def _op(node):
    return ir.op_name(node.target) if node.op == "call_function" else node.op


@pytest.fixture(scope="module")
def gpt2():
    entry = zoo.load("gpt2-tiny")
    return capture(entry.model, entry.example_inputs)


def test_gpt2_has_one_stream_from_the_embeddings_to_the_final_norm(gpt2):
    (stream,) = find_residual_streams(gpt2)
    assert stream.hidden_size == 128 and not stream.norms
    assert len(stream.adds) == 5  # token + position, then 2 layers x (attention, MLP)
    assert stream.head is stream.adds[0] and ir.is_op(stream.head, ir.aten.add)
    assert [_op(r) for r in stream.readers] == ["aten.layer_norm.default"] * 5
    assert stream.readers[-1].args[1] == [128]
    assert [_op(w) for w in stream.writers] == ["aten.embedding.default", "aten.to.dtype_layout"] + ["aten.dropout.default"] * 4


def test_gpt2_writers_trace_to_embeddings_and_addmm_projections(gpt2):
    (stream,) = find_residual_streams(gpt2)
    traces = [trace_writer(w) for w in stream.writers]
    leaves = [(_op(leaf.node), leaf.dim) for t in traces for leaf in t.leaves]
    assert leaves == [("aten.embedding.default", 2)] * 2 + [("aten.addmm.default", 1)] * 4
    # attention output: dropout <- view [32, 128] -> [2, 16, 128] <- addmm (Conv1D)
    assert [(_op(n), dim) for n, dim in traces[2].path] == [("aten.dropout.default", 2), ("aten.view.default", 2)]
    # the token table is the tied LM head's weight: one constant, two readers
    table = traces[0].leaves[0].node.args[0]
    assert {_op(u) for u in table.users} == {"aten.embedding.default", "aten.linear.default"}


def test_vit_patch_embedding_traces_through_flatten_transpose_and_cat():
    entry = zoo.load("vit-s", image_size=32, num_hidden_layers=2)
    gm = capture(entry.model, entry.example_inputs)
    (stream,) = find_residual_streams(gm)
    assert stream.hidden_size == 384 and len(stream.readers) == 5
    cat = next(w for w in stream.writers if ir.is_op(w, ir.aten.cat))
    trace = trace_writer(cat)
    leaves = {(_op(leaf.node), leaf.dim) for leaf in trace.leaves}
    assert leaves == {("aten.conv2d.default", 1), ("get_attr", 2)}  # conv out-channels; class token's last dim
    assert {_op(n) for n, _ in trace.path} == {"aten.cat.default", "aten.transpose.int", "aten.flatten.using_ints", "aten.expand.default"}
    position = next(w for w in stream.writers if w.op == "get_attr")
    assert trace_writer(position).leaves[0].dim == 2


def test_post_ln_norms_sit_on_the_stream():
    class PostLN(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.emb = nn.Embedding(50, d)
            self.fc = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
            self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))

        def forward(self, ids):
            h = self.emb(ids)
            for fc, ln in zip(self.fc, self.ln):
                h = ln(h + fc(h))
            return h

    gm = capture(PostLN().eval(), (torch.randint(0, 50, (2, 5)),))
    (stream,) = find_residual_streams(gm)
    assert [_op(n) for n in stream.norms] == ["aten.layer_norm.default"]  # between the two adds
    assert len(stream.adds) == 2
    assert {_op(r) for r in stream.readers} == {"aten.linear.default", "aten.layer_norm.default"}


def test_llama_stream_is_read_by_rms_norms_through_same_dtype_casts():
    entry = zoo.load("llama-tiny")
    gm, _ = PassManager(["canonicalize"]).run(capture(entry.model, entry.example_inputs), entry.example_inputs)
    (stream,) = find_residual_streams(gm)
    assert ir.is_op(stream.head, ir.aten.embedding)
    assert {_op(r) for r in stream.readers} == {"aten.rms_norm.default"}
    assert any(ir.is_op(n, ir.aten.to) for n in stream.nodes)


def test_elementwise_adds_without_a_weighted_branch_are_not_streams():
    class TanhGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return 0.5 * y * (1 + torch.tanh(0.79 * (y + 0.044715 * y**3)))

    gm = capture(TanhGelu().eval(), (torch.randn(2, 8),))
    assert find_residual_streams(gm) == []


def test_two_independent_streams_are_found_separately():
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, y):
            return x + self.a(x), y + self.b(torch.relu(y))

    gm = capture(TwoTowers().eval(), (torch.randn(2, 8), torch.randn(2, 8)))
    streams = find_residual_streams(gm)
    assert [_names(s.writers) for s in streams] == [["x", "linear"], ["y", "linear_1"]]
    assert [[describe(r) for r in s.readers] for s in streams] == [
        ["linear (aten.linear.default)", "output (the graph output)"],
        ["relu (aten.relu.default)", "output (the graph output)"],
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: nn.Conv1d(8, 8, 1, groups=2), "is a grouped or transposed convolution"),
        (lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU()), "cannot follow the hidden dim through relu (aten.relu.default)"),
    ],
    ids=["grouped-conv", "relu"],
)
def test_untraceable_writers_name_the_node(make, message):
    class Writer(nn.Module):
        def __init__(self):
            super().__init__()
            self.write = make()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            h = self.write(x).transpose(-1, -2) if isinstance(self.write, nn.Conv1d) else self.write(x)
            return h + self.fc(h)

    gm = capture(Writer().eval(), (torch.randn(2, 8, 8),))
    (stream,) = find_residual_streams(gm)
    with pytest.raises(NotApplicable, match=re.escape(message)):
        trace_writer(stream.writers[0])
