"""layernorm_to_repbn: PRepBN in place of LayerNorm (the pass, the PRepBN module and its progress)."""

import pytest
import torch
from repbn_helpers import LAYER_NORM, ThreeNorms, inputs, one_thread  # noqa: F401  (one_thread: autouse fixture)
from torch import nn

from graphopt import ir
from graphopt.passes.layernorm_to_repbn import LayerNormToRepBN, PRepBN, Progress, prepbn_nodes
from graphopt.testing import assert_applies, assert_close, assert_not_applicable
from graphopt.tools import repbn

# ----------------------------------------------------------------------------- the pass


def test_replaces_every_layernorm_and_is_exact_at_progress_0():
    torch.manual_seed(0)
    model = ThreeNorms().eval()
    x = inputs(2, 5, 16)
    opt = assert_applies(LayerNormToRepBN(), model, (x,), gone=[LAYER_NORM], other_inputs=[(inputs(2, 5, 16, seed=1),)])
    nodes = prepbn_nodes(opt.graph_module)
    assert [opt.graph_module.get_submodule(n.target).source for n in nodes] == ["norm_in", "norm_qk", "norm_out"]
    assert opt.report.record("layernorm_to_repbn").stats == {"replaced": 3, "left": 0}
    with torch.no_grad():
        assert_close(opt(x), model(x), max_rel_err=1e-6)


def test_select_layers_by_name_pattern():
    model = ThreeNorms().eval()
    x = inputs(2, 5, 16)
    opt = assert_applies(LayerNormToRepBN(pattern=r"norm_(in|out)"), model, (x,))
    assert [opt.graph_module.get_submodule(n.target).source for n in prepbn_nodes(opt.graph_module)] == ["norm_in", "norm_out"]
    assert len(ir.op_nodes(opt.graph_module, ir.aten.layer_norm)) == 1
    assert_not_applicable(LayerNormToRepBN(pattern="attention"), model, (x,), reason_contains="no LayerNorm matches pattern 'attention'")


def test_not_applicable_without_layernorm():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    assert_not_applicable(LayerNormToRepBN(), mlp, (torch.randn(3, 8),), reason_contains="no LayerNorm (aten.layer_norm) in the graph")
    with pytest.raises(ValueError, match="no LayerNorm was replaced"):
        repbn.prepare(mlp, (torch.randn(3, 8),))


def test_layernorm_over_two_dims_is_left_alone():
    model = nn.LayerNorm([4, 8]).eval()
    assert_not_applicable(LayerNormToRepBN(), model, (torch.randn(2, 4, 8),), reason_contains="normalises the last 2 dims")


def test_options_are_a_frozen_config():
    p = LayerNormToRepBN(layers=[0, -1], eta=0.5)
    assert p.config == LayerNormToRepBN.Config(layers=(0, -1), eta=0.5)
    assert p.options()["layers"] == (0, -1)
    with pytest.raises(ValueError, match="gamma=1 at progress 0"):
        LayerNormToRepBN(schedule=lambda p: 0.5)


# ----------------------------------------------------------------------------- progress and BatchNorm


def test_progress_schedules():
    linear = Progress()
    for p, gamma in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0)):
        linear.set(p)
        assert linear.gamma == gamma
    squared = Progress(lambda p: (1 - p) ** 2)
    squared.set(0.5)
    assert squared.gamma == 0.25
    with pytest.raises(ValueError, match="gamma=1 at progress 0"):
        Progress(lambda p: 0.5)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
        linear.set(1.5)


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    progress = Progress()
    progress.set(1.0)
    norm = PRepBN(8, 1e-5, 1e-5, 0.1, progress)
    x = inputs(4, 6, 8)
    weight, bias, eta = torch.ones(8), torch.zeros(8), torch.zeros(1)
    mean, var = torch.zeros(8), torch.ones(8)
    args = (x, None, None, weight, bias, mean, var, eta)
    rows = x.reshape(-1, 8)

    norm.train()
    out = norm(*args)
    assert_close(out, ((rows - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + 1e-5)).reshape(x.shape))
    assert_close(mean, 0.1 * rows.mean(0))  # running statistics moved by momentum 0.1
    assert_close(var, 0.9 + 0.1 * rows.var(0))

    norm.eval()
    saved = mean.clone(), var.clone()
    assert_close(norm(*args), (x - saved[0]) / torch.sqrt(saved[1] + 1e-5))
    assert torch.equal(mean, saved[0]) and torch.equal(var, saved[1])

    norm.train()
    norm.batch_statistics = False  # frozen BatchNorm: running statistics, not updated
    assert_close(norm(*args), (x - saved[0]) / torch.sqrt(saved[1] + 1e-5))
    assert torch.equal(mean, saved[0])
