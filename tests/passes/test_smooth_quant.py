"""smooth_quant: SmoothQuant's migration (exact), folded into norms or absorbed by quantize_int8."""

import pytest
import torch
from quant_models import block, tokens
from torch import nn

import graphopt
from graphopt import ir, zoo
from graphopt.passes.smooth_quant import ALPHA_GRID, SmoothQuant, smoothing_factors
from graphopt.testing import assert_applies, assert_close, assert_not_applicable

MUL = "aten.mul.Tensor"


def test_factors_follow_the_paper():
    act, weight = torch.tensor([8.0, 1.0, 0.0, 4.0]), torch.tensor([2.0, 1.0, 3.0, 0.0])
    s = smoothing_factors(act, weight, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 1.0], dtype=torch.float64)) and (s[2:] == 1).all()  # zeros stay 1
    assert torch.allclose(smoothing_factors(act[:2], weight[:2], 1.0), act[:2].double())


def test_pre_ln_block_folds_into_the_norm_and_is_exact():
    model, x = block(outlier=50.0), tokens()
    opt = assert_applies(SmoothQuant(where_int8_pays=False), model, (x,), other_inputs=[(tokens(seed=1),)])
    stats = opt.report.record("smooth_quant").stats
    assert stats == {"groups": 3, "linears": 3, "folded_into_norms": 1, "scales_inserted": 2, "alpha": 0.5}
    with torch.no_grad():
        assert_close(opt(x), model(x), max_rel_err=1e-5)
    norm = ir.op_nodes(opt.graph_module, ir.aten.layer_norm)[0]
    gain = ir.get_tensor(opt.graph_module, norm.args[2])
    assert gain[7] < model.norm.weight[7] / 3  # the outlier channel's gain moved into fc1's weights
    assert model.norm.weight[7].item() == 50.0  # the original is untouched


def test_alpha_search_picks_from_the_grid():
    model, x = block(outlier=50.0), tokens()
    opt = assert_applies(SmoothQuant(alpha="search", where_int8_pays=False), model, (x,))
    alpha = opt.report.record("smooth_quant").stats["alpha"]  # the mean over the groups of each group's choice
    assert min(ALPHA_GRID) <= alpha <= max(ALPHA_GRID)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant(alpha=1.5)


def test_not_applicable_without_linears_or_where_int8_does_not_pay(int8_pays):
    assert_not_applicable(SmoothQuant(), nn.Sequential(nn.LayerNorm(8)).eval(), (torch.randn(2, 8),), reason_contains="no linear with a constant weight")
    int8_pays(False)
    assert_not_applicable(SmoothQuant(), block(), (tokens(),), reason_contains="int8 is no faster than fp32 here")


def test_stacks_with_layernorm_to_rmsnorm_folding_into_the_rms_norms_through_gpt2_views():
    entry = zoo.load("gpt2-tiny")
    passes = ["canonicalize", "layernorm_to_rmsnorm", SmoothQuant(where_int8_pays=False)]
    opt = graphopt.optimize(entry.model, passes, entry.example_inputs, strict=True)
    stats = opt.report.record("smooth_quant").stats
    blocks = entry.model.config.n_layer
    assert opt.report.record("layernorm_to_rmsnorm").status == "applied"
    # ln_1 -> c_attn and ln_2 -> c_fc through the token-flattening views, and ln_f -> lm_head
    assert stats["folded_into_norms"] == 2 * blocks + 1
    with torch.no_grad():
        assert_close(opt(*entry.example_inputs).logits, entry.model(*entry.example_inputs).logits, max_rel_err=1e-5)
