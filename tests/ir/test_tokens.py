"""graphopt.ir.tokens: the packed token stream, where it is cut, and what blocks a cut."""

import pytest
import torch
from torch import nn

import graphopt
from graphopt.ir import NotApplicable, aten, is_op
from graphopt.ir.tokens import residual_fork, shrink, token_stream
from graphopt.passes.remove_padding import apply_packing, packing_plan
from token_models import padded_batch, tiny_embedder

pytest.importorskip("transformers")


def _packed(model, inputs):
    gm = graphopt.optimize(model, ["canonicalize"], inputs).graph_module
    apply_packing(gm, packing_plan(gm, unmasked=True))
    return gm


def test_bert_is_cut_at_the_layernorm_after_the_attention_sum():
    """Post-LN: the residual stream after attention l is LayerNorm(x + attn), read by the MLP and its residual."""
    gm = _packed(tiny_embedder(layers=2), padded_batch())
    stream = token_stream(gm)
    assert len(stream.attentions) == 2
    for layer in (0, 1):
        cut = residual_fork(gm, stream, layer)
        assert is_op(cut, aten.layer_norm.default), cut
        assert is_op(cut.args[0], aten.add.Tensor)
        assert len(cut.users) == 2


class PreLN(nn.Module):
    """nn.TransformerEncoder with norm_first (pre-LN, as ViTs), CLS pooling, and optionally a skip
    connection from the embeddings to the output around every layer."""

    def __init__(self, skip: bool = False):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        self.skip = skip

    def forward(self, x):
        h = self.encoder(x)
        return (h + x)[:, 0] if self.skip else h[:, 0]


def test_pre_ln_is_cut_at_the_residual_sum():
    gm = _packed(PreLN(), (torch.randn(2, 10, 32),))
    stream = token_stream(gm)
    cut = residual_fork(gm, stream, 0)
    assert is_op(cut, aten.add.Tensor), cut  # x + attn(norm(x)): read by norm2 and the second residual
    assert sum(1 for u in cut.users if is_op(u, aten.layer_norm.default)) == 1


def test_a_skip_connection_around_the_cut_blocks_it():
    gm = _packed(PreLN(skip=True), (torch.randn(2, 10, 32),))
    stream = token_stream(gm)
    cut = residual_fork(gm, stream, 0)
    with pytest.raises(NotApplicable, match="from before the cut"):
        shrink(gm, stream, cut, stream.layout, lambda graph, x, layout: (x, x, layout.mask), protected=1, proportional=False)


def test_an_unpacked_graph_has_no_stream():
    gm = graphopt.optimize(tiny_embedder(layers=1), ["canonicalize"], padded_batch()).graph_module
    with pytest.raises(NotApplicable, match="remove_padding"):
        token_stream(gm)
