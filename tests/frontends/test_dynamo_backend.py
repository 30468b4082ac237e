"""torch.compile(backend="graphopt"): passes run on every dynamo graph with the weights frozen as
constants, outputs equal eager, and graphs the backend cannot freeze run dynamo's graph unchanged."""

import copy
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import graphopt
from graphopt import ir
from graphopt.tools import zoo
from graphopt.frontends.dynamo_backend import compile_backend, graphopt_backend
from graphopt.testing import assert_close


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SplitHeads(nn.Module):
    """Writes the batch size into a view, so a graph captured for one batch size fails on another."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        return self.fc(x).view(x.size(0), 2, 8).softmax(-1).flatten(1)


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


class TwoBlocks(nn.Module):
    """Linear+BN, an explicit graph break, then a branch on the input's values (another break)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.bn(self.fc(x))
        torch._dynamo.graph_break()
        if x.sum() > 0:
            return self.out(torch.relu(h))
        return self.out(torch.tanh(h))


class ScaledByInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, n):
        return self.fc(x) * n


class RecordGraphs(graphopt.Pass):
    """Changes nothing; keeps a copy of every graph the pass manager shows it."""

    name = "record_graphs_for_tests"

    def __init__(self):
        self.graphs = []

    def run(self, gm, ctx):
        self.graphs.append(ir.clone_graph_module(gm))
        return False


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return _randomise_batchnorm(cls()).eval()


def test_backend_by_name_optimizes_mlp_with_default_passes():
    model, x = _model(MLP), torch.randn(3, 8)
    messages = []
    fast = torch.compile(model, backend="graphopt", options={"log": messages.append})
    with torch.no_grad():
        assert_close(fast(x), model(x))
    summary = [m for m in messages if m.startswith("graphopt: dynamo graph")]
    assert len(summary) == 1 and "1 inputs, 4 frozen constants" in summary[0] and "backend eager" in summary[0]


def test_entry_point_is_found_by_a_fresh_interpreter():
    code = textwrap.dedent(
        """
        import sys, torch
        assert "graphopt" not in sys.modules
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
        x = torch.randn(3, 4)
        with torch.no_grad():
            out = torch.compile(model, backend="graphopt")(x)
            from graphopt.testing import assert_close  # only now: graphopt must be imported by torch.compile

            assert_close(out, model(x))
        assert "graphopt.frontends.dynamo_backend" in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_fold_batchnorm_applies_inside_dynamo():
    model, x = _model(ConvBN), torch.randn(2, 3, 6, 6)
    recorder = RecordGraphs()
    backend = graphopt.compile_backend(passes=["fold_batchnorm", recorder])
    with torch.no_grad():
        assert_close(torch.compile(model, backend=backend)(x), model(x))
    (report,) = backend.reports
    assert report.record("fold_batchnorm").status == "applied"
    (seen,) = recorder.graphs  # the graph after fold_batchnorm
    assert not ir.op_nodes(seen, ir.aten.batch_norm) and len(ir.op_nodes(seen, ir.aten.conv2d)) == 1


def test_parameters_and_buffers_become_get_attr_constants():
    model, x = _model(ConvBN), torch.randn(2, 3, 6, 6)
    recorder = RecordGraphs()
    with torch.no_grad():
        torch.compile(model, backend=compile_backend(passes=[recorder]))(x)
    (gm,) = recorder.graphs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [tuple(ir.shape_of(n)) for n in placeholders] == [tuple(x.shape)]
    constants = [ir.get_tensor(gm, n) for n in gm.graph.nodes if n.op == "get_attr"]
    state = dict(model.named_parameters(), **dict(model.named_buffers()))
    state.pop("bn.num_batches_tracked")  # not read by BatchNorm in eval mode
    assert len(constants) == len(state) == 8
    for name, tensor in state.items():
        copies = [c for c in constants if c.shape == tensor.shape and torch.equal(c, tensor)]
        assert copies and all(c is not tensor for c in copies), name


def test_options_route_passes_and_inductor():
    model, x = _model(ConvBN), torch.randn(2, 3, 6, 6)
    recorder, messages = RecordGraphs(), []
    compiled_before = sum(counters["inductor"].values())
    options = {"passes": ["fold_batchnorm", recorder], "backend": "inductor", "log": messages.append}
    fast = torch.compile(model, backend="graphopt", options=options)
    with torch.no_grad():
        assert_close(fast(x), model(x))
    assert len(recorder.graphs) == 1 and not ir.op_nodes(recorder.graphs[0], ir.aten.batch_norm)
    assert any("applied: fold_batchnorm; backend inductor" in m for m in messages)
    assert sum(counters["inductor"].values()) > compiled_before, "inductor never compiled the graph"


def test_unknown_option_and_unknown_pass_are_clear_errors():
    gm = torch.fx.symbolic_trace(MLP())
    with pytest.raises(ValueError, match="'pases'.*valid options: passes, backend, backend_options, verify, strict, log"):
        graphopt_backend(gm, [torch.randn(2, 8)], options={"pases": ["fold_batchnorm"]})
    with pytest.raises(graphopt.UnknownPassError, match="fold_batchnrom"):
        compile_backend(passes=["fold_batchnrom"])


def test_backend_options_reach_the_registry_backend(monkeypatch):
    import graphopt.backends

    seen = []

    def recording(gm, example_inputs, example_kwargs, **options):
        seen.append((options, [tuple(x.shape) for x in example_inputs]))
        return gm

    monkeypatch.setitem(graphopt.backends._BACKENDS, "recording", recording)
    model, x = _model(MLP), torch.randn(3, 8)
    fast = torch.compile(model, backend="graphopt", options={"backend": "recording", "backend_options": {"level": 3}})
    with torch.no_grad():
        assert_close(fast(x), model(x))
    assert seen == [({"level": 3}, [(3, 8)])]
    with pytest.raises(ValueError, match="backend_options are not supported for inductor"):
        compile_backend(backend="inductor", backend_options={"mode": "max-autotune"})


TRITON_UNDER_THE_INTERPRETER = """
import json, torch
from graphopt.backends import triton_backend
from graphopt.testing import assert_close

class GatedResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = x * torch.sigmoid(x) + 1.0  # a pointwise region of its own, ahead of the linear
        return torch.nn.functional.gelu(self.fc(h)) + h

launches = []  # (region, the reason the kernel fell back to ATen or None) per call of a TritonKernel
forward = triton_backend.TritonKernel.forward

def counted(self, *inputs):
    out = forward(self, *inputs)
    launches.append(self.fallback_reason)
    return out

triton_backend.TritonKernel.forward = counted
torch.manual_seed(0)
model = GatedResidual().eval()
messages = []
options = {"backend": "triton", "backend_options": {"interpret": True}, "strict": True, "log": messages.append}
fast = torch.compile(model, backend="graphopt", options=options)
with torch.no_grad():
    fast(torch.randn(5, 16))  # compiles: the backend's trial run and verification call the kernels too
    launches.clear()
    x = torch.randn(5, 16)
    assert_close(fast(x), model(x))
print(json.dumps({"launches": launches, "summary": [m for m in messages if m.startswith("graphopt: dynamo graph")]}))
"""


def test_triton_backend_runs_its_kernels_under_the_interpreter(interpreted_python):
    done = interpreted_python("-c", TRITON_UNDER_THE_INTERPRETER)
    result = json.loads(done.stdout.splitlines()[-1])
    (summary,) = result["summary"]
    generated = int(re.search(r"backend triton \((\d+) generated kernels\)", summary).group(1))
    assert generated >= 1
    assert result["launches"] == [None] * generated  # each kernel ran once for the call, none fell back


def test_graph_breaks_each_subgraph_optimized_outputs_equal_eager():
    model = _model(TwoBlocks)
    backend = compile_backend()
    fast = torch.compile(model, backend=backend)
    x = torch.randn(4, 8).abs()
    with torch.no_grad():
        for inputs in (x, -x):  # both sides of the data-dependent branch
            assert_close(fast(inputs), model(inputs))
    assert len(backend.reports) >= 3, [r.model for r in backend.reports]
    assert not [r.final["fallback"] for r in backend.reports if "fallback" in r.final]
    assert backend.reports[0].record("fold_batchnorm").status == "applied"


def test_two_batch_sizes_recompile_once_with_dynamic_batch():
    model, messages = _model(SplitHeads), []
    backend = compile_backend(log=messages.append)
    fast = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch in (3, 5, 7):
            x = torch.randn(batch, 8)
            assert_close(fast(x), model(x))
    assert len(backend.reports) == 2  # static graph, then one dynamic graph for every later batch
    assert "fallback" not in backend.reports[1].final
    summary = [m for m in messages if m.startswith("graphopt: dynamo graph")]
    assert "dynamic" not in summary[0] and "dynamic" in summary[1]


class ScaledConvBN(ConvBN):
    """A float attribute that nothing guards on: dynamo passes it as an input under dynamic=True."""

    def __init__(self):
        super().__init__()
        self.temperature = 0.5

    def forward(self, x):
        return super().forward(x) * self.temperature


def test_dynamic_true_freezes_module_floats_and_notices_their_change():
    model, backend = _model(ScaledConvBN), compile_backend()
    fast = torch.compile(model, backend=backend, dynamic=True)  # eps, momentum, temperature become inputs
    with torch.no_grad():
        for shape in ((2, 3, 6, 6), (3, 3, 5, 7)):
            x = torch.randn(shape)
            assert_close(fast(x), model(x))
        assert [r.record("fold_batchnorm").status for r in backend.reports] == ["applied"] * len(backend.reports)
        model.temperature = 2.0
        assert_close(fast(x), model(x))
    assert "changed after compilation" in backend.reports[-1].final["fallback"]


def test_hf_gpt2_tiny_two_sequence_lengths():
    entry = zoo.load("gpt2-tiny")
    model = entry.model.eval()
    backend = compile_backend()
    fast = torch.compile(model, backend=backend)
    torch.manual_seed(0)
    with torch.no_grad():
        for batch, seq in ((2, 8), (3, 12), (2, 5)):  # the third runs the dynamic graph at a new size
            ids = torch.randint(0, model.config.vocab_size, (batch, seq))
            mask = torch.ones(batch, seq, dtype=torch.long)
            out, ref = fast(ids, attention_mask=mask), model(ids, attention_mask=mask)
            assert_close(out.logits, ref.logits)
            # use_cache=True: the KV cache comes back from the optimized graph as well
            assert_close(out.past_key_values.layers[-1].values, ref.past_key_values.layers[-1].values)
    assert len(backend.reports) == 2
    assert all("fallback" not in r.final and r.final["backend"] == "eager" for r in backend.reports)


def test_inference_mode_is_optimized():
    model, x = _model(ConvBN), torch.randn(2, 3, 6, 6)
    backend = compile_backend()
    with torch.inference_mode():
        assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert backend.reports[0].record("fold_batchnorm").status == "applied"


def test_symbolic_int_that_is_no_size_falls_back_to_dynamo():
    model, x = _model(ScaledByInt), torch.randn(3, 4)
    backend = compile_backend()
    fast = torch.compile(model, backend=backend)
    with torch.no_grad():
        for n in (2, 3, 4):  # the second call makes n a SymInt input
            assert_close(fast(x, n), model(x, n))
    assert "fallback" not in backend.reports[0].final
    assert "symbolic int input" in backend.reports[1].final["fallback"]


def test_fake_example_inputs_fall_back_to_dynamo():
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []

    def keep(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward

    model = _model(MLP)
    with torch.no_grad():
        torch.compile(model, backend=keep)(torch.randn(3, 8))
    ((gm, example_inputs),) = seen
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in example_inputs]
    backend = compile_backend()
    with torch.no_grad():
        assert backend(gm, fakes) == gm.forward
    assert "fake example" in backend.reports[0].final["fallback"]


def test_autograd_recording_falls_back_and_keeps_gradients():
    model, x = _model(MLP), torch.randn(3, 8)
    backend = compile_backend()
    out = torch.compile(model, backend=backend)(x)
    assert_close(out, model(x))
    out.sum().backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0
    assert "autograd is recording" in backend.reports[0].final["fallback"]


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


def _batchnorm_in_training_mode():
    return _model(lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).train()


@pytest.mark.parametrize("make", [lambda: _model(Counter), _batchnorm_in_training_mode], ids=["buffer-counter", "batchnorm-training"])
def test_graph_that_writes_its_state_falls_back_and_matches_eager(make):
    model = make()
    reference = copy.deepcopy(model)
    backend = compile_backend()
    fast = torch.compile(model, backend=backend)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(3, 4)
            assert_close(fast(x), reference(x))
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        assert_close(got, want, msg=name)
    assert "in place" in backend.reports[0].final["fallback"]


def test_input_mutation_falls_back_and_mutates_once():
    class Doubles(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            x.mul_(2)
            return self.fc(x)

    model, x = _model(Doubles), torch.randn(3, 4)
    backend = compile_backend()
    mine, theirs = x.clone(), x.clone()
    with torch.no_grad():
        assert_close(torch.compile(model, backend=backend)(mine), model(theirs))
    assert_close(mine, 2 * x)
    assert "in place" in backend.reports[0].final["fallback"]


def test_weights_changed_after_compile_are_honoured():
    model, x = _model(MLP), torch.randn(3, 8)
    backend = compile_backend()
    fast = torch.compile(model, backend=backend)
    with torch.no_grad():
        assert_close(fast(x), model(x))
        assert "fallback" not in backend.reports[0].final
        model.fc1.weight.mul_(2)
        assert_close(fast(x), model(x))
    assert "changed after compilation" in backend.reports[0].final["fallback"]
