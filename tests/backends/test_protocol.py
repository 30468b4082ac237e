"""The backend protocol: every backend returns a ``CompiledGraph``; and the one in-place-writes analysis."""

import dataclasses
import json
import operator

import pytest
import torch
from torch.fx import Graph, GraphModule

import graphopt
from graphopt import ir
from graphopt.backends import CompiledGraph, as_compiled, available_backends, get_backend, register_backend
from graphopt.frontends.api import OptimizedModule
from graphopt.pipeline.report import Report
from graphopt.testing import assert_close

aten = torch.ops.aten

FIELDS = {"runner", "backend", "kernels", "left_to_aten", "regions", "generates_code"}

_EVERY_BACKEND = """
import json, sys, torch
import graphopt
from graphopt.backends import CompiledGraph, available_backends, get_backend
from torch.fx import GraphModule

class Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = x * torch.sigmoid(x) + 1.0
        return torch.nn.functional.gelu(self.fc(h)) + h

torch.manual_seed(0)
x = torch.randn(4, 16)
gm = graphopt.capture(Gated().eval(), (x,))
seen = {}
for name in available_backends():
    compiled = get_backend(name)(gm, (x,), {})
    entry = {
        "type": type(compiled).__name__,
        "backend": compiled.backend,
        "kernels": sorted(compiled.kernels),
        "sources": all(isinstance(s, str) and "@triton.jit" in s for s in compiled.kernels.values()),
        "left_to_aten": compiled.left_to_aten,
        "regions": compiled.regions,
        "generates_code": compiled.generates_code,
        "runner_is_graph": compiled.runner is gm,
    }
    if compiled.generates_code:
        runner = compiled.runner
        entry["runner_type"] = type(runner).__name__
        entry["submodules"] = {n: type(runner.get_submodule(n)).__name__ for n in compiled.regions}
        entry["region_graphs"] = all(isinstance(getattr(runner.get_submodule(n), "region", runner.get_submodule(n)), GraphModule) for n in compiled.regions)
    if name != "inductor":  # inductor compiles on its first call: minutes of C++ for nothing here
        with torch.no_grad():
            entry["error"] = (compiled(x) - gm(x)).abs().max().item()
    seen[name] = entry
print(json.dumps(seen))
"""


def test_every_registered_backend_returns_a_compiled_graph(interpreted_python):
    # In the Triton interpreter so that ``triton`` compiles too; the fields are those documented.
    assert {f.name for f in dataclasses.fields(CompiledGraph)} == FIELDS
    done = interpreted_python("-c", _EVERY_BACKEND)
    seen = json.loads(done.stdout.splitlines()[-1])
    assert set(seen) == set(available_backends()) >= {"eager", "inductor", "triton"}
    for name, entry in seen.items():
        assert entry["type"] == "CompiledGraph" and entry["backend"] == name, entry
        assert entry.get("error", 0.0) < 1e-5, (name, entry)
    for name in ("eager", "inductor"):
        assert seen[name]["kernels"] == [] and seen[name]["left_to_aten"] == {} and seen[name]["regions"] == {}
        assert seen[name]["generates_code"] is False
    assert seen["eager"]["runner_is_graph"] is True  # no graphopt op to swap for its kernel
    triton = seen["triton"]
    assert triton["generates_code"] is True and triton["runner_type"] == "GraphModule" and not triton["runner_is_graph"]
    assert triton["regions"] == {"fused_0": "pointwise", "fused_1": "matmul_epilogue"}
    assert set(triton["kernels"]) | set(triton["left_to_aten"]) == set(triton["regions"])
    assert not set(triton["kernels"]) & set(triton["left_to_aten"])
    assert triton["kernels"] and triton["sources"] and triton["region_graphs"]
    assert all(triton["submodules"][n] == "TritonKernel" for n in triton["kernels"])


def test_eager_backend_returns_a_compiled_graph_in_process(tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    compiled = get_backend("eager")(gm, args, {})
    assert isinstance(compiled, CompiledGraph) and compiled.backend == "eager"
    assert compiled.runner is gm and compiled.kernels == {} and not compiled.generates_code
    assert_close(compiled(*args), gm(*args), rtol=0, atol=0)


@pytest.fixture
def user_backend(monkeypatch):
    """Registers ``user-callable``: a backend returning a plain callable (the graph's forward), as a user might."""
    import graphopt.backends

    monkeypatch.setattr(graphopt.backends, "_BACKENDS", dict(graphopt.backends._BACKENDS))
    calls = []

    @register_backend("user-callable")
    def user_callable(gm, example_inputs, example_kwargs, **options):
        calls.append(options)
        return lambda *args, **kwargs: gm(*args, **kwargs)

    return calls


def test_a_user_backend_returning_a_callable_is_wrapped(user_backend, tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    compiled = get_backend("user-callable")(gm, args, {}, level=2)
    assert isinstance(compiled, CompiledGraph) and compiled.backend == "user-callable"
    assert compiled.kernels == {} and compiled.left_to_aten == {} and compiled.regions == {} and not compiled.generates_code
    assert user_backend == [{"level": 2}]
    opt = graphopt.optimize(model, [], args, backend="user-callable")
    assert opt.compiled.backend == "user-callable" and opt.kernels == {}
    assert "user-callable vs graph" in opt.report.final  # not the graph itself: checked against it
    with torch.no_grad():
        assert_close(opt(*args), model(*args))


def test_a_backend_returning_neither_is_a_clear_error(monkeypatch, tiny_mlp):
    import graphopt.backends

    monkeypatch.setitem(graphopt.backends._BACKENDS, "broken", lambda gm, inputs, kwargs, **options: 42)
    model, args = tiny_mlp
    with pytest.raises(TypeError, match="backend 'broken' returned a int, neither a CompiledGraph nor a callable"):
        get_backend("broken")(graphopt.capture(model, args), args, {})


def test_as_compiled_keeps_a_compiled_graph_and_fills_in_its_name():
    compiled = CompiledGraph(abs, kernels={"fused_0": "src"}, generates_code=True)
    named = as_compiled(compiled, "mine")
    assert named.backend == "mine" and named.kernels == {"fused_0": "src"} and named.generates_code
    assert as_compiled(named, "other") is named


def test_optimized_module_takes_a_plain_runner(tiny_mlp):
    # graphopt.repbn.finalize builds its result this way.
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    opt = OptimizedModule(gm, gm, Report(model="m"), "eager")
    assert opt.compiled.runner is gm and opt.compiled.backend == "eager" and opt.kernels == {}
    assert_close(opt(*args), gm(*args), rtol=0, atol=0)


# ----------------------------------------------------------------------------- ir.in_place_writes
# Cases where the two analyses that existed before (graphopt.ir's and the torch.compile backend's)
# disagreed, or were both wrong; the one left serves capture's ``graphopt_mutations`` and the
# torch.compile backend's fallback.


def _graph(build, **buffers) -> GraphModule:
    root = torch.nn.Module()
    for name, tensor in buffers.items():
        owner, _, attr = name.rpartition(".")
        if owner and not hasattr(root, owner):
            root.add_module(owner, torch.nn.Module())
        (root.get_submodule(owner) if owner else root).register_buffer(attr, tensor)
    graph = Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    return GraphModule(root, graph)


def _call(graph, op, *args, **kwargs):
    return graph.call_function(op, args, kwargs)


def test_a_write_through_an_unbind_element_is_a_write_to_the_input():
    # The IR's analysis stopped at getitem; the element of unbind is a view of the input.
    def build(g, x):
        first = _call(g, operator.getitem, _call(g, aten.unbind.int, x), 0)
        _call(g, aten.add_.Tensor, first, 1.0)
        return x

    assert ir.in_place_writes(_graph(build)) == {"buffers": [], "inputs": ["x"]}


def test_batch_norm_in_training_mode_writes_its_running_statistics():
    # Its schema does not say so; the IR's analysis missed it, the torch.compile backend's did not.
    def build(training):
        def graph(g, x):
            mean, var = g.get_attr("bn.running_mean"), g.get_attr("bn.running_var")
            return _call(g, aten.batch_norm.default, x, None, None, mean, var, training, 0.1, 1e-5, False)

        return graph

    stats = {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4)}
    # Buffers are named by their get_attr target (the torch.compile backend used the node's name).
    assert ir.in_place_writes(_graph(build(True), **stats)) == {"buffers": ["bn.running_mean", "bn.running_var"], "inputs": []}
    assert ir.in_place_writes(_graph(build(False), **stats)) == {"buffers": [], "inputs": []}


def test_a_write_to_a_list_of_tensors_writes_each():
    # ``Tensor(a!)[]``: the IR's analysis looked for a single node and missed the list.
    def build(g, x):
        _call(g, aten._foreach_add_.Scalar, [g.get_attr("a"), x], 1.0)
        return x

    assert ir.in_place_writes(_graph(build, a=torch.zeros(3))) == {"buffers": ["a"], "inputs": ["x"]}


def test_an_out_result_aliases_its_out_argument_not_its_first():
    # Both analyses followed every aliasing result to its first argument: add.out's result is ``out``.
    def build(g, x):
        result = _call(g, aten.add.out, x, x, out=g.get_attr("buf"))
        _call(g, aten.mul_.Tensor, result, 2.0)
        return result

    assert ir.in_place_writes(_graph(build, buf=torch.zeros(3))) == {"buffers": ["buf"], "inputs": []}


def test_a_result_of_a_multi_result_op_is_its_own_tensor():
    def build(g, x):
        values = _call(g, operator.getitem, _call(g, aten.sort.default, x), 0)
        _call(g, aten.add_.Tensor, values, 1.0)
        view = _call(g, aten.view.default, x, [-1])
        _call(g, aten.zero_.default, _call(g, operator.getitem, _call(g, aten.split.Tensor, view, 2), 1))
        return values

    assert ir.in_place_writes(_graph(build)) == {"buffers": [], "inputs": ["x"]}  # the zero_, not the add_
