"""Rollback is real: in-place writes by a pass are undone (or a clear error), end-to-end drift is a
warning, and the registry and the manager refuse ambiguous passes."""

import math
import warnings

import pytest
import torch

import graphopt
from graphopt import ir
from graphopt.pipeline import pass_base
from graphopt.pipeline.manager import PassFailedError, PassManager
from graphopt.pipeline.pass_base import PassNameClashError
from graphopt.pipeline.report import APPLIED, ROLLED_BACK, BudgetWarning
from graphopt.pipeline.verify import MinCosine
from graphopt.testing import assert_close
from tests_helpers import DoubleReluPass


def _first_constant(gm):
    return next(n for n in gm.graph.nodes if n.op == "get_attr")


class DoubleAWeightInPlace(graphopt.Pass):
    """Wrong on purpose: doubles a weight shared with the graph before the pass."""

    name = "double_a_weight_in_place"

    def run(self, gm, ctx):
        ir.get_tensor(gm, _first_constant(gm)).mul_(2)
        return True


class DoubleThroughData(graphopt.Pass):
    """Wrong on purpose: the same through ``.data`` (no version counter is bumped on the tensor)."""

    name = "double_through_data"

    def run(self, gm, ctx):
        ir.get_tensor(gm, _first_constant(gm)).data.mul_(2)
        return True


class CompensatedInPlace(graphopt.Pass):
    """Wrong on purpose, though the outputs stay right: doubles a weight in place and halves its use."""

    name = "compensated_in_place"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "get_attr" and ir.get_tensor(gm, n).dim() == 2)
        ir.get_tensor(gm, node).mul_(2)
        with gm.graph.inserting_after(node):
            half = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 0.5))
        node.replace_all_uses_with(half, delete_user_cb=lambda user: user is not half)
        return True


class WritesTheExampleInput(graphopt.Pass):
    name = "writes_the_example_input"

    def run(self, gm, ctx):
        ctx.example_inputs[0].add_(1)
        return False


class HiddenWrite(graphopt.Pass):
    """Writes with the dispatch modes switched off: the manager sees it only by the version counter."""

    name = "hidden_write"

    def run(self, gm, ctx):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            ir.get_tensor(gm, _first_constant(gm)).mul_(2)
        return True


def _snapshot(gm):
    return {n.target: ir.get_tensor(gm, n).clone() for n in gm.graph.nodes if n.op == "get_attr"}


def _unchanged(gm, snapshot):
    return all(torch.equal(ir.get_tensor(gm, t), v) for t, v in snapshot.items())


@pytest.mark.parametrize("bad", [DoubleAWeightInPlace, DoubleThroughData, CompensatedInPlace])
def test_an_in_place_write_is_undone_and_the_next_pass_applies(tiny_mlp, bad):
    model, args = tiny_mlp
    expected = model(*args)
    gm = graphopt.capture(model, args)
    before = _snapshot(gm)
    new, report = PassManager([bad(), DoubleReluPass()]).run(gm, args)
    first, second = report.records
    assert first.status == ROLLED_BACK and "wrote in place to graph tensor" in first.reason and "restored" in first.reason
    assert second.status == APPLIED and second.error <= 1e-5  # not blamed for the first pass's write
    assert _unchanged(gm, before)
    assert_close(new(*args), expected)
    assert report.final["error vs original"].startswith("rel_err 0.00e+00")


def test_the_finding_through_optimize_returns_the_original_function(tiny_mlp):
    model, args = tiny_mlp
    expected = model(*args)
    opt = graphopt.optimize(model, [DoubleAWeightInPlace(), "double_relu_for_tests"], args)
    assert opt.report.applied == ["double_relu_for_tests"]
    assert_close(opt(*args), expected)
    assert_close(model(*args), expected)


def test_strict_restores_then_raises_naming_the_pass_and_the_tensor(tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    before = _snapshot(gm)
    name = _first_constant(gm).target
    with pytest.raises(PassFailedError, match=f"double_a_weight_in_place.*wrote in place to graph tensor '{name}'"):
        PassManager([DoubleAWeightInPlace()], strict=True).run(gm, args)
    assert _unchanged(gm, before)


def test_a_write_to_an_example_input_is_undone(tiny_mlp):
    model, args = tiny_mlp
    saved = args[0].clone()
    _, report = PassManager([WritesTheExampleInput(), DoubleReluPass()]).run(graphopt.capture(model, args), args)
    assert torch.equal(args[0], saved)
    assert report.records[0].status == ROLLED_BACK and "example input 0" in report.records[0].reason
    assert report.records[1].status == APPLIED
    with pytest.raises(PassFailedError, match="writes_the_example_input.*example input 0"):
        PassManager([WritesTheExampleInput()], strict=True).run(graphopt.capture(model, args), args)
    assert torch.equal(args[0], saved)


def test_a_write_that_cannot_be_undone_is_a_clear_error(tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    name = _first_constant(gm).target
    with pytest.raises(PassFailedError, match=f"hidden_write.*graph tensor '{name}'.*cannot be undone"):
        PassManager([HiddenWrite()]).run(gm, args)


def test_correct_passes_are_not_flagged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    model[1].running_mean.normal_()
    args = (torch.randn(2, 3, 8, 8),)
    opt = graphopt.optimize(model, ["fold_batchnorm"], args)
    assert opt.report.applied == ["fold_batchnorm"] and not opt.report.warnings
    assert_close(opt(*args), model(*args))


# ----------------------------------------------------------------------------- end-to-end budget


def _rotation(theta):
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def _rotating_pass(name, theta):
    """Approximate: rotates every output row of a [N, 2] linear by ``theta`` (row cosine cos(theta))."""

    def run(self, gm, ctx):
        weight, bias = (n for n in gm.graph.nodes if n.op == "get_attr")
        rot = _rotation(theta)
        ir.set_tensor(gm, weight, rot @ ir.get_tensor(gm, weight))
        ir.set_tensor(gm, bias, rot @ ir.get_tensor(gm, bias))
        return True

    return type(name, (graphopt.Pass,), {"name": name, "exact": False, "budget": MinCosine(0.99), "run": run})()


def test_drift_over_the_combined_budget_is_a_warning_in_the_report():
    torch.manual_seed(0)
    model, args = torch.nn.Linear(4, 2).eval(), (torch.randn(6, 4),)
    theta = math.acos(0.992)  # each pass: cosine 0.992 >= 0.99; both: cos(2 theta) = 0.968 < 0.98
    with pytest.warns(BudgetWarning, match="over the combined budget"):
        opt = graphopt.optimize(model, [_rotating_pass("rotate_a", theta), _rotating_pass("rotate_b", theta)], args)
    assert opt.report.applied == ["rotate_a", "rotate_b"]
    (warning,) = opt.report.warnings
    assert "rotate_a, rotate_b" in warning and "cosine >= 0.98" in warning
    assert "warning: " + warning in str(opt.report)
    assert warning in opt.report.to_markdown() and opt.report.to_dict()["warnings"] == [warning]


def test_no_warning_within_the_combined_budget():
    torch.manual_seed(0)
    model, args = torch.nn.Linear(4, 2).eval(), (torch.randn(6, 4),)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        opt = graphopt.optimize(model, [_rotating_pass("rotate_a", 0.05), _rotating_pass("rotate_b", 0.05)], args)
    assert opt.report.applied == ["rotate_a", "rotate_b"] and opt.report.warnings == []


# ----------------------------------------------------------------------------- registry and manager


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(pass_base, "_REGISTRY", dict(pass_base._REGISTRY))
    return pass_base._REGISTRY


def test_a_name_clash_is_refused_unless_override(registry):
    builtin = registry["fold_batchnorm"]
    with pytest.raises(PassNameClashError, match="'fold_batchnorm' is already registered.*override=True"):

        @graphopt.register_pass
        class Impostor(graphopt.Pass):
            name = "fold_batchnorm"

    assert registry["fold_batchnorm"] is builtin

    @graphopt.register_pass(override=True)
    class Replacement(graphopt.Pass):
        name = "fold_batchnorm"

    assert registry["fold_batchnorm"] is Replacement

    class Again(graphopt.Pass):
        name = "fold_batchnorm"

    assert graphopt.register_pass(Again, override=True) is Again and registry["fold_batchnorm"] is Again


def test_registering_the_same_class_again_is_a_no_op(registry):
    assert graphopt.register_pass(DoubleReluPass) is DoubleReluPass
    assert registry["double_relu_for_tests"] is DoubleReluPass


class _Approximate(graphopt.Pass):
    exact = False
    name = "approximate_without_budget"


class _Nameless(graphopt.Pass):
    pass


def test_the_manager_refuses_an_unbudgeted_approximate_instance_and_a_nameless_pass():
    with pytest.raises(TypeError, match="approximate pass 'approximate_without_budget'.*no fidelity budget"):
        PassManager([_Approximate()])
    with pytest.raises(TypeError, match="_Nameless has no name"):
        PassManager([_Nameless()])
    with pytest.raises(TypeError, match="_Nameless has no name"):
        PassManager([_Nameless])


def test_a_string_is_one_pass(tiny_mlp):
    assert [p.name for p in PassManager("double_relu_for_tests").passes] == ["double_relu_for_tests"]
    model, args = tiny_mlp
    opt = graphopt.optimize(model, passes="double_relu_for_tests", example_inputs=args)
    assert opt.report.applied == ["double_relu_for_tests"]
    assert [p.name for p in PassManager(DoubleReluPass()).passes] == ["double_relu_for_tests"]
    assert graphopt.compile_backend(passes="double_relu_for_tests").passes == ["double_relu_for_tests"]


# ----------------------------------------------------------------------------- shape errors, once


class WrongShape(graphopt.Pass):
    """Wrong on purpose: gives the first linear a weight of the wrong shape (shape propagation fails)."""

    name = "wrong_shape"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "get_attr" and ir.get_tensor(gm, n).dim() == 2)
        ir.set_tensor(gm, node, ir.get_tensor(gm, node)[:, :3].clone())
        return True


def test_a_shape_error_is_one_clean_reason_without_a_logged_traceback(tiny_mlp, capfd):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    capfd.readouterr()
    _, report = PassManager([WrongShape()]).run(gm, args)
    assert report.records[0].status == ROLLED_BACK and "raised RuntimeError" in report.records[0].reason
    err = capfd.readouterr().err
    assert "failed while attempting to run meta" not in err and "Traceback" not in err


def test_capture_with_mismatched_shapes_raises_without_a_logged_traceback(capfd):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    capfd.readouterr()
    with pytest.raises(graphopt.CaptureError, match="torch.export failed"):
        graphopt.capture(model, (torch.randn(2, 5),))
    err = capfd.readouterr().err
    assert "failed while attempting to run meta" not in err and "Traceback" not in err


def test_buffers_a_module_in_training_mode_updates_are_not_flagged():
    # a call_module BatchNorm in training mode writes its running statistics on every run, the
    # graph before the pass included: that is the graph's doing, not the pass's
    class ReluThenBatchNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(torch.ops.aten.relu.default(x))

    gm = torch.fx.symbolic_trace(ReluThenBatchNorm().train())
    args = (torch.randn(6, 4),)
    ir.propagate_shapes(gm, list(args))
    _, report = PassManager([DoubleReluPass()]).run(gm, args)
    assert report.records[0].status == APPLIED
