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


# ----------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def preln_tiny():
    """Hand-written attention (its head split is a view with the batch and length in it)."""
    from graphopt.tools import zoo

    return zoo.load("preln-tiny")


def _other(example, batch, length):
    ids, mask = example
    return ids[:1].repeat(batch, 1)[:, :length], mask[:1].repeat(batch, 1)[:, :length]


def test_other_batch_and_length_work_by_default(preln_tiny):
    model, example = preln_tiny.model, preln_tiny.example_inputs
    fast = graphopt.optimize(model, ["canonicalize"], example)  # no dynamic_shapes given
    assert fast.dynamic_shapes is not None and fast.shape_note == ""
    assert [i.dynamic_dims for i in fast.inputs] == [(0, 1), (0, 1)]
    assert "input_ids[*, *]" in fast.report.capture
    for batch, length in [(3, 9), (5, 16), (1, 4)]:
        other = _other(example, batch, length)
        assert_close(fast(*other), model(*other))


def test_static_capture_fails_with_one_clear_error_before_running(preln_tiny):
    model, example = preln_tiny.model, preln_tiny.example_inputs
    fast = graphopt.optimize(model, [], example, dynamic_shapes=None)
    assert fast.dynamic_shapes is None and all(i.static_dims == (0, 1) for i in fast.inputs)
    assert_close(fast(*example), model(*example))  # the captured shape still runs
    calls = []
    fast.compiled.runner = lambda *a, **k: calls.append(a)  # must not be reached
    with pytest.raises(graphopt.frontends.api.InputShapeError) as info:
        fast(*_other(example, 3, 16))
    message = str(info.value)
    assert "\n" not in message and not calls
    assert "input 'input_ids' was captured for [2, 16] and got [3, 16]" in message
    assert "dim 0 is fixed" in message and "dynamic_shapes=" in message


def test_a_size_one_example_dim_is_named_as_the_reason(preln_tiny):
    model, example = preln_tiny.model, _other(preln_tiny.example_inputs, 1, 16)
    fast = graphopt.optimize(model, [], example)  # export always specializes a size-1 dim
    assert fast.inputs[0].static_dims == (0,)
    other = _other(preln_tiny.example_inputs, 2, 9)
    with pytest.raises(graphopt.frontends.api.InputShapeError, match="is 1 in the example"):
        fast(*other)


def test_dynamic_capture_failing_falls_back_to_static_with_the_reason(preln_tiny, monkeypatch):
    import graphopt.frontends.api as api

    impossible = torch.export.Dim("batch", min=100)  # the example's batch of 2 is outside it
    monkeypatch.setattr(api, "auto_dynamic_shapes", lambda model, args, kwargs: ({0: impossible}, None))
    fast = graphopt.optimize(preln_tiny.model, [], preln_tiny.example_inputs)
    assert fast.dynamic_shapes is None and fast.shape_note.startswith("dynamic capture failed")
    assert "dynamic capture failed" in fast.report.capture
    with pytest.raises(api.InputShapeError, match="dynamic capture failed"):
        fast(*_other(preln_tiny.example_inputs, 3, 16))


def test_save_reuses_the_dynamic_shapes_and_loads_at_another_batch(preln_tiny, tmp_path):
    model, example = preln_tiny.model, preln_tiny.example_inputs
    fast = graphopt.optimize(model, ["canonicalize"], example)
    path = tmp_path / "preln.pt2"
    graphopt.save(fast, str(path), example)  # as the README shows it: no dynamic_shapes
    loaded = graphopt.load(str(path))
    for batch, length in [(3, 9), (2, 16)]:
        other = _other(example, batch, length)
        assert_close(loaded(*other), model(*other))


def test_hf_archive_loads_in_a_fresh_interpreter_without_importing_transformers(tmp_path):
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 100, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    fast = graphopt.optimize(bert, [], (ids, mask))
    path = tmp_path / "bert.pt2"
    graphopt.save(fast, str(path), (ids, mask))
    other = (torch.randint(0, 100, (5, 11)), torch.ones(5, 11, dtype=torch.long))
    with torch.no_grad():
        expected = bert(*other).last_hidden_state
    torch.save((other, expected), tmp_path / "io.pt")
    script = (
        "import sys, torch, graphopt\n"
        "assert 'transformers' not in sys.modules, 'graphopt imported transformers: the test proves nothing'\n"
        f"model = graphopt.load({str(path)!r})\n"
        f"(ids, mask), expected = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "out = model(ids, mask)\n"
        "print(type(out).__name__, (out.last_hidden_state - expected).abs().max().item())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    name, error = done.stdout.split()[-2:]
    assert name == "BaseModelOutputWithPoolingAndCrossAttentions" and float(error) < 1e-4


def test_load_names_a_module_it_cannot_import(tiny_mlp, tmp_path, monkeypatch):
    import graphopt.frontends.api as api

    model, args = tiny_mlp
    path = tmp_path / "mlp.pt2"
    graphopt.save(graphopt.optimize(model, [], args), str(path), args)
    monkeypatch.setattr(api, "_archive_meta", lambda p: {"pytree_modules": ["no_such_package.outputs"]})
    with pytest.raises(api.ArchiveError, match="'no_such_package.outputs', which cannot be imported"):
        graphopt.load(str(path))


def test_load_program_gives_the_stored_example_inputs_and_a_torch_archive_optimizes_again(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(3, 8)
    path = tmp_path / "plain.pt2"
    dims = ({0: torch.export.Dim.AUTO},)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dims), str(path))  # torch's own archive, no graphopt record
    program = graphopt.load_program(str(path))
    (args, kwargs) = program.example_inputs
    assert torch.equal(args[0], x) and kwargs == {}
    # the program's module (whose instance train/eval raise) is a model like any other
    fast = graphopt.optimize(program.module(), [DoubleReluPass()], args)
    other = torch.randn(5, 8)
    assert_close(fast(other), model(other))
    assert_close(graphopt.load(str(path))(other), model(other))


@pytest.mark.parametrize("content", ["text", "empty", "checkpoint"])
def test_load_of_a_file_that_is_not_an_archive_is_one_line(tmp_path, content):
    import graphopt.frontends.api as api

    path = tmp_path / "model.pt2"
    if content == "checkpoint":
        torch.save({"weight": torch.ones(2)}, path)  # a zip file too, but no torch.export archive
    else:
        path.write_text("not a zip archive" if content == "text" else "")
    for loader in (graphopt.load, graphopt.load_program):
        with pytest.raises(api.ArchiveError) as info:
            loader(str(path))
        message = str(info.value)
        assert message.startswith(f"{path}: not a torch.export archive (") and "\n" not in message
