"""The inductor backend's shape mode (``backend_options={"dynamic": ...}``)."""

import pytest
import torch

import graphopt
from graphopt.backends import get_backend
from graphopt.testing import assert_close


@pytest.mark.parametrize("options, expected", [({}, None), ({"dynamic": False}, False), ({"dynamic": True, "mode": "default"}, True)])
def test_dynamic_option_reaches_torch_compile(tiny_mlp, monkeypatch, options, expected):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    seen = {}

    def fake_compile(fn, **kwargs):
        seen.update(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = get_backend("inductor")(gm, args, None, **options)
    assert seen["backend"] == "inductor" and seen["dynamic"] is expected
    assert seen.get("mode") == options.get("mode")
    assert compiled.backend == "inductor"


def test_static_inductor_runs_other_shapes_of_a_dynamic_graph(tiny_mlp):
    # dynamic=False compiles again for a new shape; the graph captured with dynamic batch and
    # sequence (the default) must give the model's outputs at each.
    model, args = tiny_mlp
    fast = graphopt.optimize(model, [], args, backend="inductor", backend_options={"dynamic": False})
    for x in (args[0], torch.randn(3, 7, args[0].shape[-1])):
        assert_close(fast(x), model(x))
