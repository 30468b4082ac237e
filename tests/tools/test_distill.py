"""graphopt.tools.distill: the self-distillation engine (objectives, seeds, limits, checkpoints) on tiny models."""

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import graphopt
from graphopt.tools.distill import (
    DistillConfig,
    DistillHooks,
    Distiller,
    constant_schedule,
    distillation_loss,
    linear_ramp,
    tap_points,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(n=3, rows=6, d=8):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(rows, d, generator=gen),) for _ in range(n)]


def _teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


def _noisy_copy(model, seed=1, scale=0.3):
    """``model`` with every parameter perturbed: a student that starts away from its teacher."""
    with warnings.catch_warnings():  # deep-copying export's pytree specs warns about a deprecated check
        warnings.simplefilter("ignore", FutureWarning)
        student = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return student.requires_grad_(True)


class _DropoutStudent(nn.Module):
    """Uses random numbers while training (dropout), so seeds and checkpointed random state matter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 16), nn.Dropout(0.25), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------- objectives


def test_output_objective_is_the_distillation_loss_and_falls():
    teacher = _teacher()
    student = _noisy_copy(teacher)
    batches = _batches()
    with torch.no_grad():
        expected_first = distillation_loss(student(*batches[0]), teacher(*batches[0])).item()
    history = Distiller(student, teacher, batches, DistillConfig(steps=60, lr=1e-2)).run()
    assert history.loss[0] == pytest.approx(expected_first, rel=1e-6)
    assert sum(history.loss[-3:]) / 3 < 0.2 * sum(history.loss[:3]) / 3
    assert history.fidelity[-1] > history.fidelity[0] and len(history.fidelity) == 60
    assert history.stopped == "steps" and not student.training


def test_mse_objective():
    teacher = _teacher()
    student = _noisy_copy(teacher)
    batches = _batches(1)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(student(*batches[0]), teacher(*batches[0])).item()
    history = Distiller(student, teacher, batches, DistillConfig(steps=1, loss="mse")).run()
    assert history.loss[0] == pytest.approx(expected, rel=1e-6)


def test_intermediate_objective_on_matched_graph_nodes_and_modules():
    teacher = _teacher()
    batches = _batches()
    # the student is the captured graph (module paths from nn_module_stack), the teacher the nn.Module (a forward hook)
    student = _noisy_copy(graphopt.capture(teacher, batches[0]))
    code = student.code
    assert tap_points(student, ["0"])["0"][0] == "node" and tap_points(teacher, ["0"])["0"][0] == "module"
    assert tap_points(student, ["relu"])["relu"][1][1].name == "relu"
    with pytest.raises(KeyError, match="'attention' is not a node or module path"):
        tap_points(student, ["attention"])
    (x,) = batches[0]
    with torch.no_grad():
        first_linear = nn.functional.linear(x, student.get_parameter("0.weight"), student.get_parameter("0.bias"))
        expected = distillation_loss(student(x), teacher(x)) + distillation_loss(first_linear, teacher[0](x))
    config = DistillConfig(steps=40, lr=1e-2, match={"0": "0"}, match_weight=1.0)
    history = Distiller(student, teacher, batches, config).run()
    assert history.loss[0] == pytest.approx(expected.item(), rel=1e-6)
    assert student.code == code and not [n for n in student.graph.nodes if n.op == "call_module"]  # taps removed

    # intermediate values alone: the first linear learns the teacher's, the second is left as it was
    student = _noisy_copy(graphopt.capture(teacher, batches[0]))
    second = student.get_parameter("2.weight").detach().clone()
    history = Distiller(student, teacher, batches, DistillConfig(steps=60, lr=1e-2, output_weight=0.0, match={"linear": "0"})).run()
    assert sum(history.loss[-3:]) < 0.2 * sum(history.loss[:3])
    assert torch.equal(student.get_parameter("2.weight"), second)


def test_teacher_graph_with_node_names():
    model = _teacher()
    batches = _batches()
    teacher = graphopt.capture(model, batches[0])
    student = _noisy_copy(teacher)
    history = Distiller(student, teacher, batches, DistillConfig(steps=3, match=["relu"])).run()
    assert len(history.loss) == 3
    assert not [n for n in teacher.graph.nodes if n.op == "call_module"]


def test_a_module_that_never_runs_is_reported():
    teacher, batches = _teacher(), _batches()
    student = _DropoutStudent()
    student.unused = nn.Linear(8, 8)
    with pytest.raises(RuntimeError, match=r"did not compute.*\['unused'\]"):
        Distiller(student, teacher, batches, DistillConfig(steps=2, match={"unused": "0"})).run()


# ----------------------------------------------------------------------------- config, schedules, hooks


def test_config_is_frozen_and_checked():
    config = DistillConfig(steps=4, match={"a": "b"})
    assert config.match == (("a", "b"),) and DistillConfig(steps=4, match=["a"]).match == (("a", "a"),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 5
    with pytest.raises(ValueError, match="loss must be 'cosine' or 'mse'"):
        DistillConfig(steps=1, loss="kl")
    with pytest.raises(ValueError, match="objective is empty"):
        DistillConfig(steps=1, output_weight=0.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        DistillConfig(steps=0)


def test_schedules():
    ramp = linear_ramp(10, hold=2)
    assert [ramp(s) for s in (0, 7, 8, 9)] == [0.0, 1.0, 1.0, 1.0] and ramp(1) == pytest.approx(1 / 7)
    assert linear_ramp(1)(0) == 1.0 and constant_schedule(0.25)(7) == 0.25


class _Recording(DistillHooks):
    def __init__(self, steps):
        self.calls, self.seen, self.schedule = [], [], linear_ramp(steps)

    def calibrate(self, student, calls):
        self.calls.append(("calibrate", len(calls)))

    def progress(self, step):
        return self.schedule(step)

    def set_progress(self, p):
        self.seen.append(p)

    def begin_training(self, student):
        self.calls.append(("begin", student.training))

    def end_training(self, student):
        self.calls.append(("end", student.training))


def test_hooks_are_called_in_order():
    teacher, batches = _teacher(), _batches()
    hooks = _Recording(5)
    history = Distiller(_noisy_copy(teacher), teacher, batches, DistillConfig(steps=5, calibration_batches=2), hooks=hooks).run()
    assert hooks.calls == [("calibrate", 2), ("begin", True), ("end", True)]
    assert hooks.seen == history.progress == [0.0, 0.25, 0.5, 0.75, 1.0]


# ----------------------------------------------------------------------------- seeds and limits


def test_seed_makes_runs_repeatable_and_leaves_the_global_random_state_alone():
    teacher, batches = _teacher(), _batches()
    runs = []
    for seed in (1, 1, 2):
        student = _DropoutStudent()
        state = torch.get_rng_state()
        history = Distiller(student, teacher, batches, DistillConfig(steps=5, lr=1e-2, seed=seed)).run()
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((history.loss, _params(student)))
    assert runs[0][0] == runs[1][0]
    _assert_same_state(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_step_and_time_limits():
    teacher, batches = _teacher(), _batches()
    engine = Distiller(_noisy_copy(teacher), teacher, batches, DistillConfig(steps=4, max_seconds=0.0))
    for done in (1, 2, 3):
        history = engine.run()  # at least one step per call, then the time limit stops it
        assert history.stopped == "time" and engine.step == done and len(history.loss) == done
    assert engine.run().stopped == "steps" and engine.step == 4
    assert engine.run().stopped == "steps" and len(engine.history.loss) == 4  # nothing left to do


def test_progress_bar_and_log(capsys):
    teacher, batches = _teacher(), _batches()
    lines = []
    Distiller(_noisy_copy(teacher), teacher, batches, DistillConfig(steps=3, log_every=2), log=lines.append).run()
    assert [line.split(":")[0] for line in lines] == ["step 0/3", "step 2/3"]
    assert capsys.readouterr().err == ""  # quiet unless asked
    Distiller(_noisy_copy(teacher), teacher, batches, DistillConfig(steps=3, progress_bar=True)).run()
    err = capsys.readouterr().err
    assert err.count("\r") == 3 and "3/3" in err and "fidelity" in err and err.endswith("\n")


# ----------------------------------------------------------------------------- checkpoints


class _CrashAt(DistillHooks):
    def __init__(self, step):
        self.step = step

    def progress(self, step):
        if step == self.step:
            raise KeyboardInterrupt
        return None


@pytest.mark.parametrize("seed", [0, None], ids=["own random state", "global random state"])
def test_checkpoint_and_resume_equal_the_uninterrupted_run(tmp_path, seed):
    teacher, batches = _teacher(), _batches()
    config = DistillConfig(steps=8, lr=1e-2, seed=seed)
    straight = _DropoutStudent()
    full = Distiller(straight, teacher, batches, config).run()

    path = tmp_path / "run.pt"
    crashing = dataclasses.replace(config, checkpoint=str(path), checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        Distiller(_DropoutStudent(), teacher, batches, crashing, hooks=_CrashAt(6)).run()  # checkpointed at step 4

    fresh = Distiller(_DropoutStudent(), teacher, batches, crashing)
    fresh.load_checkpoint(path)
    assert fresh.step == 4 and len(fresh.history.loss) == 4
    history = fresh.run()
    assert history.loss == full.loss and history.fidelity == full.fidelity
    _assert_same_state(_params(fresh.student), _params(straight))
    assert torch.load(path, weights_only=True)["step"] == 8  # the final checkpoint


def test_checkpoint_of_another_version_is_refused(tmp_path):
    teacher, batches = _teacher(), _batches()
    engine = Distiller(_noisy_copy(teacher), teacher, batches, DistillConfig(steps=1))
    state = engine.state_dict()
    state["version"] = 0
    with pytest.raises(ValueError, match="checkpoint version 0"):
        engine.load_state_dict(state)
