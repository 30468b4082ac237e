"""graphopt.ir.spec: the canonical IR's guarantees hold after capture and canonicalize, and a
graph that breaks one is reported with the rule and the node."""

import operator

import pytest
import torch

import graphopt
from graphopt.frontends.capture import capture
from graphopt.pipeline.report import APPLIED
from graphopt.ir import spec
from graphopt.ir.spec import RULES, IRSpecError, allow_module_calls, check_ir, violations
from graphopt.tools import zoo

# the zoo's small models (bert-base and vit-s are full-size: their capture alone takes seconds)
SMALL_ZOO = ["preln-tiny", "convnet-bn", "gpt2-tiny", "llama-tiny", "minilm"]


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_zoo_models_meet_the_spec_after_capture_and_canonicalize(name):
    entry = zoo.load(name)
    gm = capture(entry.model, entry.example_inputs, dynamic_shapes=entry.dynamic_shapes)
    check_ir(gm, "captured")
    # check_ir=True checks the input and the graph after canonicalize (it raises, never rolls back)
    after, report = graphopt.PassManager(["canonicalize"], strict=True, check_ir=True).run(gm, entry.example_inputs)
    check_ir(after, "canonicalized")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


@pytest.fixture
def tiny_graph():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    return capture(_Tiny().eval(), (x,)), x


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _rules_broken(gm, stage="captured"):
    return {(v.rule, v.node) for v in violations(gm, stage)}


def test_every_rule_is_documented():
    assert {"well-formed", "one-output", "flat-graph", "op-overloads", "constants", "meta-val", "no-dead-code", "writes-recorded", "fused-forms"} <= set(RULES)
    assert all(rule.doc for rule in RULES.values())


def test_a_missing_meta_val_is_named(tiny_graph):
    gm, _ = tiny_graph
    relu = _node(gm, torch.ops.aten.relu.default)
    del relu.meta["val"]
    assert _rules_broken(gm) == {("meta-val", relu.name)}
    with pytest.raises(IRSpecError, match=rf"meta-val: {relu.name}: has no meta\[\"val\"\]"):
        check_ir(gm)


def test_a_stale_constant_val_is_named(tiny_graph):
    gm, _ = tiny_graph
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr" and gm.get_parameter(n.target).dim() == 2)
    gm.register_buffer("replacement", torch.zeros(3, 4))
    weight.target = "replacement"
    assert ("meta-val", weight.name) in _rules_broken(gm)


def test_every_violation_is_listed_in_one_error(tiny_graph):
    gm, x = tiny_graph
    relu = _node(gm, torch.ops.aten.relu.default)
    graph = gm.graph
    with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
        packet = graph.call_function(torch.ops.aten.neg, (relu,))  # a packet, not an overload
        python = graph.call_function(torch.relu, (packet,))  # a Python function
        lower = graph.call_function(torch.ops.aten.native_layer_norm.default, (python, [4], None, None, 1e-5))
        dead = graph.call_function(torch.ops.aten.exp.default, (relu,))  # nobody reads it
        picked = graph.call_function(operator.getitem, (lower, 0))
    relu.replace_all_uses_with(picked, delete_user_cb=lambda user: user is not packet and user is not dead)
    gm.recompile()
    for node in (packet, python, lower, dead, picked):
        node.meta["val"] = relu.meta["val"] if node is not lower else (relu.meta["val"],) * 3
    with pytest.raises(IRSpecError) as failure:
        check_ir(gm, "canonicalized", where="after a broken pass")
    message = str(failure.value)
    assert "after a broken pass" in message and "(canonicalized)" in message
    assert {(v.rule, v.node) for v in failure.value.violations} == {
        ("op-overloads", packet.name),
        ("op-overloads", python.name),
        ("fused-forms", lower.name),
        ("no-dead-code", dead.name),
    }
    assert f"fused-forms: {lower.name}: is aten.native_layer_norm, a lower form of aten.layer_norm" in message


def test_an_unrecorded_write_to_a_weight_is_named(tiny_graph):
    gm, _ = tiny_graph
    relu = _node(gm, torch.ops.aten.relu.default)
    bias = next(n for n in gm.graph.nodes if n.op == "get_attr" and gm.get_parameter(n.target).dim() == 1)
    with gm.graph.inserting_after(relu):
        write = gm.graph.call_function(torch.ops.aten.add_.Scalar, (bias, 1.0))
    write.meta["val"] = bias.meta["val"]
    gm.recompile()
    assert _rules_broken(gm) == {("writes-recorded", None)}  # the write is impure: not dead code
    gm.meta["graphopt_mutations"] = {"buffers": [bias.target], "inputs": []}
    assert _rules_broken(gm) == set()  # capture recorded it: allowed


def test_a_submodule_call_and_a_missing_output_are_named(tiny_graph):
    gm, x = tiny_graph
    gm.add_submodule("inner", torch.nn.ReLU())
    relu = _node(gm, torch.ops.aten.relu.default)
    with gm.graph.inserting_after(relu):
        call = gm.graph.call_module("inner", (relu,))
    call.meta["val"] = relu.meta["val"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (call,)
    assert ("flat-graph", call.name) in _rules_broken(gm)

    class StandIn(torch.nn.ReLU):
        """A declared trainable stand-in, as layernorm_to_repbn's PRepBN."""

    allow_module_calls(StandIn, "removed by this test")
    try:
        gm.inner = StandIn()
        assert ("flat-graph", call.name) not in _rules_broken(gm)
    finally:
        spec._ALLOWED_MODULES.pop(StandIn)
    gm.graph.erase_node(output)
    assert ("one-output", None) in _rules_broken(gm)


class _PythonRelu(graphopt.Pass):
    """Exact, but leaves a Python function in the graph: breaks the spec, not the numbers."""

    name = "python_relu_for_spec_tests"

    def applicable(self, gm):
        return True, ""

    def run(self, gm, ctx):
        relu = _node(gm, torch.ops.aten.relu.default)
        relu.target = torch.relu
        return True


def test_the_manager_checks_after_each_pass_when_asked(tiny_graph, monkeypatch):
    gm, x = tiny_graph
    monkeypatch.delenv("GRAPHOPT_CHECK_IR", raising=False)
    _, report = graphopt.PassManager([_PythonRelu()]).run(gm, (x,))
    assert report.record(_PythonRelu.name).status == APPLIED  # unchecked, the numbers are right
    with pytest.raises(IRSpecError, match=rf"(?s)after {_PythonRelu.name} .*op-overloads: relu: calls torch.relu"):
        graphopt.PassManager([_PythonRelu()], check_ir=True).run(gm, (x,))
    monkeypatch.setenv("GRAPHOPT_CHECK_IR", "1")
    assert graphopt.PassManager([]).check_ir
    with pytest.raises(IRSpecError):
        graphopt.PassManager([_PythonRelu()]).run(gm, (x,))
    assert not graphopt.PassManager([], check_ir=False).check_ir
