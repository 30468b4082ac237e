"""layernorm_to_repbn and graphopt.repbn: PRepBN in place of LayerNorm, recovery, and finalize."""

import pytest
import torch
from torch import nn

import graphopt
from graphopt import ir
from graphopt.tools import repbn
from graphopt.tools import zoo
from graphopt.passes.layernorm_to_repbn import LayerNormToRepBN
from graphopt.tools.repbn import ARGUMENTS, PRepBN, Progress, prepbn_nodes
from graphopt.testing import assert_applies, assert_not_applicable

LAYER_NORM = "aten.layer_norm.default"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The training loops here are tiny: on a shared CPU, spinning OpenMP threads only slow them down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ThreeNorms(nn.Module):
    """One LayerNorm for each finalize outcome.

    ``norm_in`` reads a linear that nothing else reads (folds into ``fc_in``), its output also feeds
    a residual add; ``norm_qk`` is read by two linears only (folds into both); ``norm_out`` reads a
    residual sum and is the output (stays as a multiply and an add).
    """

    def __init__(self, d: int = 16):
        super().__init__()
        self.fc_in = nn.Linear(d, d)
        self.norm_in = nn.LayerNorm(d)
        self.fc_a = nn.Linear(d, d)
        self.norm_qk = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.norm_out = nn.LayerNorm(d)
        with torch.no_grad():
            for norm in (self.norm_in, self.norm_qk, self.norm_out):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.3)

    def forward(self, x):
        h = self.norm_in(self.fc_in(x))
        h = h + self.fc_a(h)
        n = self.norm_qk(h)
        h = h + self.q(n) * torch.sigmoid(self.k(n))
        return self.norm_out(h)


def _inputs(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * 2.0 + 0.5


def _rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _randomise_repbn(student) -> None:
    """Non-trivial BatchNorm statistics, affine parameters and η in every PRepBN of ``student``."""
    gm = student.graph_module
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for node in prepbn_nodes(gm):
            t = {role: ir.get_tensor(gm, arg) for role, arg in zip(ARGUMENTS, node.args) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr"}
            t["running_mean"].copy_(torch.randn(t["running_mean"].shape, generator=gen))
            t["running_var"].copy_(torch.rand(t["running_var"].shape, generator=gen) * 2 + 0.5)
            t["bn_weight"].copy_(torch.rand(t["bn_weight"].shape, generator=gen) + 0.5)
            t["bn_bias"].copy_(torch.randn(t["bn_bias"].shape, generator=gen) * 0.3)
            t["eta"].copy_(torch.rand(1, generator=gen) * 0.5 + 0.25)


@pytest.fixture(scope="module")
def preln_tiny():
    return zoo.load("preln-tiny")


# ----------------------------------------------------------------------------- the pass


def test_replaces_every_layernorm_and_is_exact_at_progress_0():
    torch.manual_seed(0)
    model = ThreeNorms().eval()
    x = _inputs(2, 5, 16)
    opt = assert_applies(LayerNormToRepBN(), model, (x,), gone=[LAYER_NORM], other_inputs=[(_inputs(2, 5, 16, seed=1),)])
    nodes = prepbn_nodes(opt.graph_module)
    assert [opt.graph_module.get_submodule(n.target).source for n in nodes] == ["norm_in", "norm_qk", "norm_out"]
    assert opt.report.record("layernorm_to_repbn").stats == {"replaced": 3, "left": 0}
    with torch.no_grad():
        assert _rel_err(opt(x), model(x)) < 1e-6


def test_prepare_preln_tiny_replaces_all_five_norms(preln_tiny):
    student = repbn.prepare(preln_tiny.model, preln_tiny.example_inputs, dynamic_shapes=preln_tiny.dynamic_shapes)
    # four nn.LayerNorm and the hand-written final norm (canonicalize makes it an aten.layer_norm first)
    assert [m.source for m in student.norms().values()] == ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "final_norm"]
    assert not ir.op_nodes(student.graph_module, ir.aten.layer_norm)
    ids, mask = preln_tiny.example_inputs
    other = (ids[:, :9], mask[:, :9])  # another sequence length: the graph stays dynamic
    with torch.no_grad():
        for inputs in (preln_tiny.example_inputs, other):
            assert _rel_err(student(*inputs), preln_tiny.model(*inputs)) < 1e-6


def test_prepared_model_is_trainable():
    model = ThreeNorms().eval()
    student = repbn.prepare(model, (_inputs(2, 5, 16),))
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(model.parameters())) + 3 * 3  # + BN weight, BN bias, η per norm
    norms_only = repbn.prepare(model, (_inputs(2, 5, 16),), trainable="norms")
    assert sum(p.requires_grad for p in norms_only.parameters()) == 3 * 5  # LN gain, bias, BN weight, bias, η
    frozen = repbn.prepare(model, (_inputs(2, 5, 16),), frozen=r"^fc_in\.")
    assert {n for n, p in frozen.named_parameters() if not p.requires_grad} == {"graph_module.fc_in.weight", "graph_module.fc_in.bias"}


def test_select_layers_by_index(preln_tiny):
    student = repbn.prepare(preln_tiny.model, preln_tiny.example_inputs, layers=[0, -1])
    assert [m.source for m in student.norms().values()] == ["blocks.0.ln1", "final_norm"]
    assert len(ir.op_nodes(student.graph_module, ir.aten.layer_norm)) == 3
    with pytest.raises(ValueError, match=r"layers \[7\] out of range: the graph has 5 LayerNorms"):
        repbn.prepare(preln_tiny.model, preln_tiny.example_inputs, layers=[7])


def test_select_layers_by_name_pattern():
    model = ThreeNorms().eval()
    x = _inputs(2, 5, 16)
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


def test_student_blends_layernorm_and_repbn_by_the_schedule():
    model = nn.LayerNorm(16).eval()
    x = _inputs(3, 4, 16)
    student = repbn.prepare(model, (x,), schedule=lambda p: 1 - p**2)
    _randomise_repbn(student)
    ((name, module),) = student.norms().items()
    node = next(n for n in prepbn_nodes(student.graph_module) if n.name == name)
    tensors = [ir.get_tensor(student.graph_module, a) for a in node.args[3:]]
    with torch.no_grad():
        ln = model(x)
        rep = module.repbn(x, *tensors)
        student.set_progress(0.5)
        assert student.gamma == 0.75 and student.progress == 0.5
        torch.testing.assert_close(student(x), 0.75 * ln + 0.25 * rep)
        student.set_progress(1.0)
        w, b, mean, var, eta = tensors
        torch.testing.assert_close(student(x), (x - mean) / torch.sqrt(var + 1e-5) * w + b + eta * x)


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    progress = Progress()
    progress.set(1.0)
    norm = PRepBN(8, 1e-5, 1e-5, 0.1, progress)
    x = _inputs(4, 6, 8)
    weight, bias, eta = torch.ones(8), torch.zeros(8), torch.zeros(1)
    mean, var = torch.zeros(8), torch.ones(8)
    args = (x, None, None, weight, bias, mean, var, eta)
    rows = x.reshape(-1, 8)

    norm.train()
    out = norm(*args)
    torch.testing.assert_close(out, ((rows - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + 1e-5)).reshape(x.shape))
    torch.testing.assert_close(mean, 0.1 * rows.mean(0))  # running statistics moved by momentum 0.1
    torch.testing.assert_close(var, 0.9 + 0.1 * rows.var(0))

    norm.eval()
    saved = mean.clone(), var.clone()
    torch.testing.assert_close(norm(*args), (x - saved[0]) / torch.sqrt(saved[1] + 1e-5))
    assert torch.equal(mean, saved[0]) and torch.equal(var, saved[1])

    norm.train()
    norm.batch_statistics = False  # frozen BatchNorm: running statistics, not updated
    torch.testing.assert_close(norm(*args), (x - saved[0]) / torch.sqrt(saved[1] + 1e-5))
    assert torch.equal(mean, saved[0])


def test_calibrate_fits_layernorm_exactly_when_tokens_share_their_statistics():
    # Every token is a permutation of the same values: each has the same mean and variance, so
    # LayerNorm is a per-channel affine map of x, which calibration must find.
    torch.manual_seed(0)
    model = ThreeNorms().norm_in.eval()
    base = torch.randn(16) * 3 + 1
    tokens = torch.stack([base[torch.randperm(16)] for _ in range(48)]).reshape(4, 12, 16)
    student = repbn.prepare(model, (tokens[:1],))
    repbn.calibrate(student, [(tokens,)])
    student.set_progress(1.0)
    with torch.no_grad():
        assert _rel_err(student(tokens), model(tokens)) < 1e-5


# ----------------------------------------------------------------------------- distillation


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 16)).eval()


def test_distill_reduces_the_loss():
    teacher = _mlp()
    batches = [(_inputs(8, 6, 16, seed=s),) for s in range(4)]
    student = repbn.prepare(teacher, batches[0])
    # straight to RepBN alone with BatchNorm's default start: the loss starts high and must fall
    history = repbn.distill(student, teacher, batches, 80, lr=1e-2, schedule=lambda step: 1.0, calibration_batches=0)
    first, last = sum(history.loss[:4]) / 4, sum(history.loss[-4:]) / 4
    assert first > 0.02 and last < 0.1 * first, (first, last)
    assert not student.training


def test_distill_ramps_progress_from_0_to_1():
    teacher = _mlp()
    batches = [(_inputs(8, 6, 16, seed=s),) for s in range(2)]
    student = repbn.prepare(teacher, batches[0])
    history = repbn.distill(student, teacher, batches, 20, lr=1e-3)
    assert history.progress[0] == 0.0 and history.loss[0] < 1e-6  # progress 0 is the teacher itself
    assert history.progress[-3:] == [1.0, 1.0, 1.0] and history.progress[-4] < 1.0  # the ramp's end, then a tenth held
    assert student.gamma == 0.0 and len(history.loss) == 20


# ----------------------------------------------------------------------------- finalize


def test_finalize_folds_and_is_exact():
    torch.manual_seed(0)
    model = ThreeNorms().eval()
    x = _inputs(2, 5, 16)
    student = repbn.prepare(model, (x,))
    _randomise_repbn(student)
    student.set_progress(1.0)
    student.eval()
    final = graphopt.finalize(student)

    record = final.report.record("fold_repbn")
    assert record.stats == {"folded_into_next": 1, "folded_into_previous": 1, "kept_as_scale_shift": 1}
    assert "norm_out (read by output; input add_1 is aten.add.Tensor)" in record.reason
    gm = final.graph_module
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    assert not ir.op_nodes(gm, ir.aten.layer_norm, ir.aten.batch_norm)
    assert ir.count_ops(gm)["aten.linear.default"] == 4  # no linear added; the kept norm is one mul and one add
    with torch.no_grad():
        for inputs in (x, _inputs(2, 5, 16, seed=1)):
            assert _rel_err(final(inputs), student(inputs)) < 1e-5
    assert prepbn_nodes(student.graph_module)  # the student is unchanged


def test_finalize_on_preln_tiny_folds_every_block_norm(preln_tiny):
    student = repbn.prepare(preln_tiny.model, preln_tiny.example_inputs, dynamic_shapes=preln_tiny.dynamic_shapes)
    _randomise_repbn(student)
    student.set_progress(1.0)
    final = graphopt.finalize(student)
    assert final.report.record("fold_repbn").stats == {"folded_into_next": 4, "folded_into_previous": 0, "kept_as_scale_shift": 1}
    with torch.no_grad():
        assert _rel_err(final(*preln_tiny.example_inputs), student(*preln_tiny.example_inputs)) < 1e-5


def test_finalize_refuses_progress_below_1():
    student = repbn.prepare(ThreeNorms().eval(), (_inputs(2, 5, 16),))
    student.set_progress(0.5)
    with pytest.raises(ValueError, match=r"finalize needs progress 1 \(gamma = 0\), the model is at progress 0.5"):
        graphopt.finalize(student)


def test_original_model_untouched():
    model = ThreeNorms().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(_inputs(4, 5, 16, seed=s),) for s in range(2)]
    student = repbn.prepare(model, batches[0])
    repbn.distill(student, model, batches, 6, lr=1e-2)
    graphopt.finalize(student)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
