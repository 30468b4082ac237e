"""graphopt.optimize: a new module, same calling convention, original untouched."""

import copy

import pytest
import torch

import graphopt
from graphopt import ir
from graphopt.testing import assert_close
from tests_helpers import DoubleReluPass  # noqa: F401  (see conftest: tests/ is on sys.path)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_optimize_returns_new_module_with_same_pytree_io(tiny_mlp):
    model, args = tiny_mlp
    model.train()  # optimize captures in eval mode but must give the mode back
    before = _state(model)
    fast = graphopt.optimize(model, ["double_relu_for_tests", DoubleReluPass()], args)
    assert isinstance(fast, graphopt.OptimizedModule) and fast is not model
    assert model.training, "the user's training flag was changed"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.eval()
    out, ref = fast(*args), model(*args)
    assert set(out) == {"out", "hidden"}
    assert_close(out, ref)
    assert [r.status for r in fast.report.records] == ["applied", "applied"]
    assert ir.count_ops(fast.graph_module)["aten.relu.default"] == 4  # 1 -> 2 -> 4
    assert "double_relu_for_tests" in str(fast.report)


def test_weights_of_optimized_module_are_private_copies(tiny_mlp):
    model, args = tiny_mlp
    fast = graphopt.optimize(model, [], args)
    with torch.no_grad():
        fast.graph_module.fc1.weight.mul_(0)  # vandalise the optimized copy
    assert model.fc1.weight.abs().sum() > 0


def test_kwargs_and_dynamic_shapes(tiny_mlp):
    class WithKwargs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = copy.deepcopy(tiny_mlp[0])

        def forward(self, x, *, scale=None):
            return self.inner(x)["out"] * scale

    model = WithKwargs().eval()
    x, scale = torch.randn(2, 5, 8), torch.tensor(3.0)
    dim = torch.export.Dim.AUTO
    fast = graphopt.optimize(model, [DoubleReluPass()], (x,), example_kwargs={"scale": scale}, dynamic_shapes={"x": {0: dim, 1: dim}, "scale": None})
    y = torch.randn(4, 9, 8)
    assert_close(fast(y, scale=scale), model(y, scale=scale))


def test_inductor_backend_matches(tiny_mlp):
    model, args = tiny_mlp
    fast = graphopt.optimize(model, [DoubleReluPass()], args, backend="inductor")
    assert_close(fast(*args), model(*args))
    assert "inductor vs graph" in fast.report.final


def test_bad_arguments_fail_early_with_clear_messages(tiny_mlp):
    model, args = tiny_mlp
    with pytest.raises(ValueError, match="example_inputs"):
        graphopt.optimize(model, [])
    with pytest.raises(KeyError, match="unknown backend 'tpu'"):
        graphopt.optimize(model, [], args, backend="tpu")
    with pytest.raises(graphopt.UnknownPassError, match="unknown pass"):
        graphopt.optimize(model, ["no_such_pass"], args)
    with pytest.raises(TypeError, match="a pass is a name"):
        graphopt.optimize(model, [42], args)


def test_save_and_load_round_trip(tiny_mlp, tmp_path):
    model, args = tiny_mlp
    fast = graphopt.optimize(model, [DoubleReluPass()], args)
    path = tmp_path / "mlp.pt2"
    graphopt.save(fast, str(path), args)
    loaded = graphopt.load(str(path))
    assert_close(loaded(*args), model(*args))
