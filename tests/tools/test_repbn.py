"""graphopt.tools.repbn: the RepBN workflow (prepare, calibrate, distill, finalize) on the distillation engine."""

import pytest
import torch
from repbn_helpers import ThreeNorms, inputs, one_thread, randomise_repbn  # noqa: F401  (one_thread: autouse fixture)
from torch import nn

import graphopt
from graphopt import ir
from graphopt.passes.layernorm_to_repbn import prepbn_nodes
from graphopt.testing import assert_close, rel_err
from graphopt.tools import repbn, zoo


@pytest.fixture(scope="module")
def preln_tiny():
    return zoo.load("preln-tiny")


# ----------------------------------------------------------------------------- prepare


def test_prepare_preln_tiny_replaces_all_five_norms(preln_tiny):
    student = repbn.prepare(preln_tiny.model, preln_tiny.example_inputs, dynamic_shapes=preln_tiny.dynamic_shapes)
    # four nn.LayerNorm and the hand-written final norm (canonicalize makes it an aten.layer_norm first)
    assert [m.source for m in student.norms().values()] == ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "final_norm"]
    assert not ir.op_nodes(student.graph_module, ir.aten.layer_norm)
    ids, mask = preln_tiny.example_inputs
    other = (ids[:, :9], mask[:, :9])  # another sequence length: the graph stays dynamic
    with torch.no_grad():
        for x in (preln_tiny.example_inputs, other):
            assert_close(student(*x), preln_tiny.model(*x), max_rel_err=1e-6)


def test_prepared_model_is_trainable():
    model = ThreeNorms().eval()
    student = repbn.prepare(model, (inputs(2, 5, 16),))
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(model.parameters())) + 3 * 3  # + BN weight, BN bias, η per norm
    norms_only = repbn.prepare(model, (inputs(2, 5, 16),), trainable="norms")
    assert sum(p.requires_grad for p in norms_only.parameters()) == 3 * 5  # LN gain, bias, BN weight, bias, η
    frozen = repbn.prepare(model, (inputs(2, 5, 16),), frozen=r"^fc_in\.")
    assert {n for n, p in frozen.named_parameters() if not p.requires_grad} == {"graph_module.fc_in.weight", "graph_module.fc_in.bias"}


def test_select_layers_by_index(preln_tiny):
    student = repbn.prepare(preln_tiny.model, preln_tiny.example_inputs, layers=[0, -1])
    assert [m.source for m in student.norms().values()] == ["blocks.0.ln1", "final_norm"]
    assert len(ir.op_nodes(student.graph_module, ir.aten.layer_norm)) == 3
    with pytest.raises(ValueError, match=r"layers \[7\] out of range: the graph has 5 LayerNorms"):
        repbn.prepare(preln_tiny.model, preln_tiny.example_inputs, layers=[7])


def test_student_blends_layernorm_and_repbn_by_the_schedule():
    model = nn.LayerNorm(16).eval()
    x = inputs(3, 4, 16)
    student = repbn.prepare(model, (x,), schedule=lambda p: 1 - p**2)
    randomise_repbn(student.graph_module)
    ((name, module),) = student.norms().items()
    node = next(n for n in prepbn_nodes(student.graph_module) if n.name == name)
    tensors = [ir.get_tensor(student.graph_module, a) for a in node.args[3:]]
    with torch.no_grad():
        ln = model(x)
        rep = module.repbn(x, *tensors)
        student.set_progress(0.5)
        assert student.gamma == 0.75 and student.progress == 0.5
        assert_close(student(x), 0.75 * ln + 0.25 * rep)
        student.set_progress(1.0)
        w, b, mean, var, eta = tensors
        assert_close(student(x), (x - mean) / torch.sqrt(var + 1e-5) * w + b + eta * x)


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
        assert_close(student(tokens), model(tokens), max_rel_err=1e-5)


# ----------------------------------------------------------------------------- distillation


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 16)).eval()


def test_distill_reduces_the_loss():
    teacher = _mlp()
    batches = [(inputs(8, 6, 16, seed=s),) for s in range(4)]
    student = repbn.prepare(teacher, batches[0])
    # straight to RepBN alone with BatchNorm's default start: the loss starts high and must fall
    history = repbn.distill(student, teacher, batches, 80, lr=1e-2, schedule=lambda step: 1.0, calibration_batches=0)
    first, last = sum(history.loss[:4]) / 4, sum(history.loss[-4:]) / 4
    assert first > 0.02 and last < 0.1 * first, (first, last)
    assert not student.training


def test_distill_ramps_progress_from_0_to_1():
    teacher = _mlp()
    batches = [(inputs(8, 6, 16, seed=s),) for s in range(2)]
    student = repbn.prepare(teacher, batches[0])
    history = repbn.distill(student, teacher, batches, 20, lr=1e-3)
    assert history.progress[0] == 0.0 and history.loss[0] < 1e-6  # progress 0 is the teacher itself
    assert history.progress[-3:] == [1.0, 1.0, 1.0] and history.progress[-4] < 1.0  # the ramp's end, then a tenth held
    assert student.gamma == 0.0 and len(history.loss) == 20


def test_distill_leaves_batch_statistics_as_they_were_and_logs():
    teacher = _mlp()
    batches = [(inputs(4, 6, 16, seed=s),) for s in range(2)]
    student = repbn.prepare(teacher, batches[0])
    lines = []
    history = repbn.distill(student, teacher, batches, 4, lr=1e-3, log=lines.append, log_every=2)
    assert [line.split(":")[0] for line in lines] == ["step 0/4", "step 2/4", "step 3/4"]
    assert "loss" in lines[-1] and "fidelity" in lines[-1]
    assert all(m.batch_statistics for m in student.norms().values())  # frozen only while training
    assert len(history.fidelity) == 4 and history.fidelity[0] > 0.999999 and history.stopped == "steps"


def test_distill_matches_intermediate_values():
    teacher = _mlp()
    batches = [(inputs(4, 6, 16, seed=s),) for s in range(2)]
    student = repbn.prepare(teacher, batches[0])
    (norm,) = student.norms()  # the PRepBN node, matched to the LayerNorm it replaced
    history = repbn.distill(student, teacher, batches, 4, lr=1e-3, match={norm: "1"})
    assert history.loss[0] < 1e-6  # at progress 0 the PRepBN is the LayerNorm
    assert not [n for n in student.graph_module.graph.nodes if n.op == "call_module" and n.name != norm]


def test_distill_resumes_from_a_checkpoint_as_if_uninterrupted(tmp_path):
    teacher = _mlp()
    batches = [(inputs(4, 6, 16, seed=s),) for s in range(3)]
    straight = repbn.prepare(teacher, batches[0])
    full = repbn.distill(straight, teacher, batches, 10, lr=1e-2, calibration_batches=2)

    resumed = repbn.prepare(teacher, batches[0])
    path = tmp_path / "repbn.pt"
    # a zero time limit stops after the first step; each call then continues from the checkpoint
    for _ in range(3):
        part = repbn.distill(resumed, teacher, batches, 10, lr=1e-2, calibration_batches=2, max_seconds=0, checkpoint=path, resume=True)
        assert part.stopped == "time"
    fresh = repbn.prepare(teacher, batches[0])  # as a new process would: everything comes from the checkpoint
    rest = repbn.distill(fresh, teacher, batches, 10, lr=1e-2, calibration_batches=2, checkpoint=path, resume=True)
    assert rest.stopped == "steps" and rest.loss == full.loss and rest.progress == full.progress
    after, reference = fresh.state_dict(), straight.state_dict()
    assert after.keys() == reference.keys() and all(torch.equal(after[k], reference[k]) for k in reference)
    assert fresh.gamma == 0.0


# ----------------------------------------------------------------------------- finalize


def test_finalize_refuses_progress_below_1():
    student = repbn.prepare(ThreeNorms().eval(), (inputs(2, 5, 16),))
    student.set_progress(0.5)
    with pytest.raises(ValueError, match=r"finalize needs progress 1 \(gamma = 0\), the model is at progress 0.5"):
        graphopt.finalize(student)


def test_original_model_untouched():
    model = ThreeNorms().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(inputs(4, 5, 16, seed=s),) for s in range(2)]
    student = repbn.prepare(model, batches[0])
    repbn.distill(student, model, batches, 6, lr=1e-2)
    graphopt.finalize(student)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_distill_on_other_batch_sizes_and_lengths_by_default(preln_tiny):
    # prepare captures batch and sequence dims dynamic by default (Dim.AUTO), so batches need not
    # have the example's shape; captured static, the attention's head-split view failed on the
    # second batch ("shape '[2, 16, 4, 16]' is invalid").
    ids, mask = preln_tiny.example_inputs
    batches = [(ids, mask), (ids[:1].repeat(3, 1), mask[:1].repeat(3, 1)), (ids[:, :9], mask[:, :9])]
    student = repbn.prepare(preln_tiny.model, batches[0])
    history = repbn.distill(student, preln_tiny.model, batches, 6, lr=1e-3, hold_steps=2)
    assert len(history.loss) == 6 and all(loss == loss for loss in history.loss)  # no NaN
    fast = repbn.finalize(student)
    other = (ids[:1].repeat(5, 1)[:, :12], mask[:1].repeat(5, 1)[:, :12])
    assert_close(fast(*other), student(*other))


def test_finalize_reports_the_error_against_the_original_model():
    # The fold is exact, so an error measured against the RepBN student says nothing of the
    # function the user started from; the report's "error vs original" is against the model given
    # to prepare (here 2 steps of distillation leave it far from the original).
    model = ThreeNorms().eval()
    batches = [(inputs(4, 5, 16, seed=s),) for s in range(2)]
    student = repbn.prepare(model, batches[0])
    repbn.distill(student, model, batches, 2, lr=1e-2)
    fast = graphopt.finalize(student)
    with torch.no_grad():
        expected, got = model(*batches[0]), fast(*batches[0])
    error = rel_err(got, expected)
    assert error > 1e-3  # far from the student's exactness: the two measures differ
    assert fast.report.final["error vs original"].startswith(f"rel_err {error:.2e} ")
    cosine = torch.nn.functional.cosine_similarity(got.double(), expected.double(), dim=-1).mean().item()
    assert fast.report.final["cosine vs original"].startswith(f"{cosine:.5f} ")
    vs_student = float(fast.report.final["error vs RepBN student"].split()[1])
    assert vs_student <= 1e-5


def test_finalized_model_saves_and_loads_at_another_batch(preln_tiny, tmp_path):
    # finalize's module carries no capture spec: save takes the dynamic dims from its graph
    student = repbn.prepare(preln_tiny.model, preln_tiny.example_inputs)
    student.set_progress(1.0)
    fast = repbn.finalize(student)
    path = tmp_path / "final.pt2"
    graphopt.save(fast, str(path), preln_tiny.example_inputs)
    ids, mask = preln_tiny.example_inputs
    other = (ids[:1].repeat(3, 1)[:, :10], mask[:1].repeat(3, 1)[:, :10])
    assert_close(graphopt.load(str(path))(*other), fast(*other))
