"""Capture into the canonical IR, on every zoo model and on the failure roads."""

import warnings
from unittest import mock

import pytest
import torch

import graphopt
from graphopt import ir
from graphopt.tools import zoo
from graphopt.testing import assert_close

SMALL = {"vit-s": {"image_size": 32, "num_hidden_layers": 2}}


def _bigger_inputs(entry):
    """Inputs with a different batch and sequence length than the example (token models)."""
    ids, mask = entry.example_inputs[0], entry.example_inputs[1] if len(entry.example_inputs) > 1 else None
    gen = torch.Generator().manual_seed(7)
    new_ids = torch.randint(0, int(ids.max()) + 1, (ids.shape[0] + 1, ids.shape[1] + 3), generator=gen)
    if mask is None:
        return (new_ids,)
    new_mask = torch.ones_like(new_ids)
    new_mask[0, -4:] = 0
    return new_ids, new_mask


@pytest.mark.parametrize("name", zoo.list_models())
def test_capture_every_zoo_model(name):
    entry = zoo.load(name, **SMALL.get(name, {}))
    model = entry.model
    model.train()  # capture must use eval mode and then give the caller's mode back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")]
    caches = [c.use_cache for c in configs]

    gm = graphopt.capture(model, entry.example_inputs, dynamic_shapes=entry.dynamic_shapes)

    assert gm.meta["graphopt_capture"] == "torch.export"
    assert model.training and [c.use_cache for c in configs] == caches
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(entry.example_inputs), "parameters must be get_attr constants, not inputs"
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    assert not any(p.requires_grad for p in gm.parameters())
    ops = ir.count_ops(gm)
    assert ops["aten._assert_tensor_metadata.default"] == 0
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    for node in gm.graph.nodes:
        if node.op not in ("output",) and node.users:
            assert "val" in node.meta, f"{node.name} has no meta['val']"

    model.eval()
    with torch.no_grad():
        out, ref = gm(*entry.example_inputs), model(*entry.example_inputs)
    key = "logits" if name in ("gpt2-tiny", "llama-tiny") else None
    if key:  # with the cache off, the decoder returns logits and no past_key_values
        assert_close(out[key], ref[key])
    else:
        assert_close(out, ref)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"capture changed {k}"

    if entry.kind in ("encoder", "decoder"):  # dynamic batch and sequence: another size still runs
        other = _bigger_inputs(entry)
        with torch.no_grad():
            out2, ref2 = gm(*other), model(*other)
        first = (lambda o: o[key]) if key else (lambda o: torch.utils._pytree.tree_leaves(o)[0])
        assert_close(first(out2), first(ref2))


def test_weights_are_copies_and_ties_survive():
    entry = zoo.load("gpt2-tiny")
    gm = graphopt.capture(entry.model, entry.example_inputs)
    # the tie is one get_attr constant read by both the embedding and the LM head
    (tied,) = [n for n in gm.graph.nodes if n.op == "get_attr" and {u.target for u in n.users} == {ir.aten.embedding.default, ir.aten.linear.default}]
    weight = ir.get_tensor(gm, tied)
    assert torch.equal(weight, entry.model.transformer.wte.weight)
    assert weight.data_ptr() != entry.model.transformer.wte.weight.data_ptr()


def test_shapes_are_repropagated_symbolically_after_a_rewrite():
    entry = zoo.load("preln-tiny")
    gm = graphopt.capture(entry.model, entry.example_inputs, dynamic_shapes=entry.dynamic_shapes)
    softmax = ir.op_nodes(gm, ir.aten.softmax)[0]
    with gm.graph.inserting_after(softmax):
        doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (softmax, 1.0))
    softmax.replace_all_uses_with(doubled, delete_user_cb=lambda u: u is not doubled)
    gm.recompile()
    assert "val" not in doubled.meta
    ir.propagate_shapes(gm)
    shape = ir.shape_of(doubled)
    assert shape is not None and len(shape) == 4
    assert any(isinstance(s, torch.SymInt) for s in shape), "sizes should stay symbolic"


def test_export_failure_falls_back_to_symbolic_trace(tiny_mlp):
    model, args = tiny_mlp
    with mock.patch("torch.export.export", side_effect=RuntimeError("unsupported thing\nmore detail")):
        with pytest.warns(UserWarning, match=r"torch.export failed \(RuntimeError: unsupported thing\); trying torch.fx.symbolic_trace"):
            gm = graphopt.capture(model, args)
    assert gm.meta["graphopt_capture"] == "torch.fx.symbolic_trace"
    assert ir.count_ops(gm)["aten.linear.default"] == 2
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    assert_close(gm(*args), model(*args))


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: neither road can trace it
            return x * 2
        return x


def test_both_roads_failing_is_one_clear_capture_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(graphopt.CaptureError) as info:
            graphopt.capture(DataDependent(), (torch.ones(3),))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot capture DataDependent: torch.export failed (")
    assert "torch.fx.symbolic_trace failed (" in message


def test_not_a_module_is_a_capture_error():
    with pytest.raises(graphopt.CaptureError, match="expected a torch.nn.Module"):
        graphopt.capture(lambda x: x, (torch.ones(1),))


def test_in_place_writes_are_recorded():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * 2

    gm = graphopt.capture(Counter(), (torch.ones(2),))
    assert gm.meta["graphopt_mutations"] == {"buffers": ["calls"], "inputs": []}
    assert graphopt.capture(torch.nn.Linear(2, 2), (torch.ones(2),)).meta["graphopt_mutations"] == {"buffers": [], "inputs": []}


def test_fallback_with_dynamic_shapes(tiny_mlp):
    model, args = tiny_mlp
    dim = torch.export.Dim.AUTO
    with mock.patch("torch.export.export", side_effect=RuntimeError("nope")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = graphopt.capture(model, args, dynamic_shapes=({0: dim},))
    assert gm.meta["graphopt_capture"] == "torch.fx.symbolic_trace"
    assert_close(gm(*args), model(*args))


# ----------------------------------------------------------------------------- dynamic-shapes spec of a graph


class _Scaled(torch.nn.Module):
    def forward(self, x, mask, *, scale=2.0):
        return x * scale + mask


def test_graph_dynamic_shapes_marks_the_symbolic_dims_by_parameter_name():
    from graphopt.frontends.capture import graph_dynamic_shapes

    auto = torch.export.Dim.AUTO
    x, mask = torch.randn(3, 5, 4), torch.randn(4)
    gm = graphopt.capture(_Scaled(), (x,), {"mask": mask}, dynamic_shapes={"x": {0: auto, 1: auto}, "mask": None})
    spec = graph_dynamic_shapes(gm)
    assert spec == {"x": {0: auto, 1: auto}, "mask": None}  # keyword inputs too, keyed by name
    again = graphopt.capture(gm, (x,), {"mask": mask}, dynamic_shapes=spec, fallback=False)
    assert graph_dynamic_shapes(again) == spec  # capturing the graph with its spec keeps those dims symbolic

    assert graph_dynamic_shapes(graphopt.capture(_Scaled(), (x, mask))) is None  # static capture
    assert graph_dynamic_shapes(torch.fx.symbolic_trace(torch.nn.ReLU())) is None  # no shape metadata


def test_graph_dynamic_shapes_of_an_exported_programs_module_with_star_args():
    from graphopt.frontends.capture import graph_dynamic_shapes

    class Pair(torch.nn.Module):
        def forward(self, *xs):
            return xs[0] + xs[1]

    auto = torch.export.Dim.AUTO
    xs = (torch.randn(3, 4), torch.randn(3, 4))
    module = torch.export.export(Pair(), xs, dynamic_shapes=(({0: auto}, {0: auto}),)).module()
    # torch names the flattened *xs parameters of the program's module xs_0, xs_1
    assert graph_dynamic_shapes(module) == {"xs_0": {0: auto}, "xs_1": {0: auto}}


def test_an_exported_programs_module_is_captured_and_left_as_it_was():
    program = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),))
    module = program.module()  # its instance train()/eval() raise: the program's ops are fixed
    training = module.training
    x = torch.randn(2, 4)
    gm = graphopt.capture(module, (x,))
    assert_close(gm(x), module(x))
    assert module.training == training
    with pytest.raises(NotImplementedError):
        module.eval()  # the caller's module keeps torch's methods
