"""graphopt.ir: matching, walking, constants, rewriting and shape helpers over the canonical IR."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim
from torch.fx import Graph, GraphModule

from graphopt import capture, ir
from graphopt.testing import assert_close

aten = ir.aten


class Block(nn.Module):
    """linear -> relu -> linear, with the first linear's output also added at the end."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h)) + h


@pytest.fixture
def block():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 4)
    return model, x, capture(model, (x,))


def _hand_graph(build):
    """A GraphModule over a hand-built graph: ``build(graph, x)`` returns the output node."""
    graph = Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    return GraphModule(torch.nn.Module(), graph)


# ----------------------------------------------------------------------------- identifying ops


def test_op_name():
    assert ir.op_name(aten.linear.default) == "aten.linear.default"
    assert ir.op_name(aten.add.Tensor) == "aten.add.Tensor"
    assert ir.op_name(aten.add) == "aten.add"
    assert ir.op_name(operator.getitem) == "getitem"


def test_is_op_matches_overloads_and_packets(block):
    _, _, gm = block
    add = ir.op_nodes(gm, aten.add)[0]
    assert ir.is_op(add, aten.add.Tensor) and ir.is_op(add, aten.add)
    assert not ir.is_op(add, aten.add.Scalar) and not ir.is_op(add, aten.mul)
    assert ir.is_op(add, aten.mul, aten.add.Tensor)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert not ir.is_op(placeholder, aten.add)


def test_op_nodes_and_count_ops(block):
    _, _, gm = block
    linears = ir.op_nodes(gm, aten.linear)
    assert [n.name for n in linears] == ["linear", "linear_1"]  # graph order
    assert [n.name for n in ir.op_nodes(gm, aten.relu.default, aten.add)] == ["relu", "add"]
    assert ir.count_ops(gm) == {"aten.linear.default": 2, "aten.relu.default": 1, "aten.add.Tensor": 1}


def test_normalized_args_with_positional_keyword_and_default_arguments():
    nodes = {}

    def build(g, x):
        nodes["mean"] = g.call_function(aten.mean.dim, (x, [1]), {"keepdim": True})
        nodes["linear"] = g.call_function(aten.linear.default, (x,), {"weight": x})
        nodes["add"] = g.call_function(aten.add.Tensor, (x, 2.0), {"alpha": 3})
        nodes["softmax"] = g.call_function(aten._softmax.default, (x, -1, False))
        return nodes["add"]

    _hand_graph(build)
    x = nodes["mean"].args[0]
    assert ir.normalized_args(nodes["mean"]) == {"self": x, "dim": [1], "keepdim": True, "dtype": None}
    assert ir.normalized_args(nodes["linear"]) == {"input": x, "weight": x, "bias": None}
    assert ir.normalized_args(nodes["add"]) == {"self": x, "other": 2.0, "alpha": 3}
    assert ir.normalized_args(nodes["softmax"]) == {"self": x, "dim": -1, "half_to_float": False}


# ----------------------------------------------------------------------------- walking the graph


def test_only_user(block):
    _, _, gm = block
    first, second = ir.op_nodes(gm, aten.linear)
    relu = ir.op_nodes(gm, aten.relu)[0]
    assert ir.only_user(relu) is second
    assert ir.only_user(first) is None  # relu and add
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert ir.only_user(output) is None


def test_follow_chain_success_alternatives_and_multi_user_failure(block):
    _, _, gm = block
    first, second = ir.op_nodes(gm, aten.linear)
    relu, add = ir.op_nodes(gm, aten.relu)[0], ir.op_nodes(gm, aten.add)[0]
    assert ir.follow_chain(relu, aten.linear, aten.add) == [relu, second, add]
    assert ir.follow_chain(relu, (aten.gelu, aten.linear.default)) == [relu, second]
    assert ir.follow_chain(relu) == [relu]
    assert ir.follow_chain(relu, aten.gelu) is None
    assert ir.follow_chain(first, aten.relu) is None  # first linear has two users
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert ir.follow_chain(x, aten.linear) == [x, first]  # the last node may have several users


def test_external_user(block):
    _, _, gm = block
    first, second = ir.op_nodes(gm, aten.linear)
    relu, add = ir.op_nodes(gm, aten.relu)[0], ir.op_nodes(gm, aten.add)[0]
    assert ir.external_user([first, relu, second], keep=[second]) is first  # first also feeds add
    assert ir.external_user([first, relu, second]) in (first, second)  # both feed add
    assert ir.external_user([first, relu, second], keep=[first, second]) is None
    assert ir.external_user([relu, second, add], keep=[add]) is None
    assert ir.external_user([relu, second, add]) is add  # read by the output node


def test_val_of_and_shape_of(block):
    _, _, gm = block
    first = ir.op_nodes(gm, aten.linear)[0]
    assert isinstance(ir.val_of(first), torch.Tensor) and ir.shape_of(first) == (2, 4)
    assert ir.val_of(3) is None
    assert ir.shape_of(next(n for n in gm.graph.nodes if n.op == "output")) is None  # a tuple value


# ----------------------------------------------------------------------------- constants


def test_get_tensor_by_node_and_by_path(block):
    model, _, gm = block
    weight_node = ir.op_nodes(gm, aten.linear)[0].args[1]
    assert torch.equal(ir.get_tensor(gm, weight_node), model.fc1.weight)
    assert ir.get_tensor(gm, "fc1.weight") is ir.get_tensor(gm, weight_node)
    with pytest.raises(ValueError, match="not a get_attr constant"):
        ir.get_tensor(gm, ir.op_nodes(gm, aten.relu)[0])


def test_set_tensor_replaces_without_writing_into_the_old_tensor(block):
    model, x, gm = block
    weight_node = ir.op_nodes(gm, aten.linear)[0].args[1]
    old = ir.get_tensor(gm, weight_node)
    old_values = old.clone()
    assert ir.set_tensor(gm, weight_node, torch.zeros(4, 4, dtype=torch.float64)) is weight_node
    assert weight_node.target == "fc1.weight"  # not shared: the attribute itself is replaced
    assert torch.equal(old, old_values)
    assert ir.val_of(weight_node).dtype == torch.float64  # meta follows the new tensor
    new = torch.randn(4, 4)
    ir.set_tensor(gm, weight_node, new)
    gm.recompile()
    with torch.no_grad():
        h = F.linear(x, new, model.fc1.bias)
        assert_close(gm(x), model.fc2(torch.relu(h)) + h)
    with pytest.raises(ValueError, match="not a get_attr node"):
        ir.set_tensor(gm, ir.op_nodes(gm, aten.relu)[0], new)


class TiedLM(nn.Module):
    """GPT-2 style: the LM head reuses the token embedding matrix."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        hidden = self.wte(ids)
        return hidden, self.lm_head(hidden)


def test_set_tensor_unties_an_attribute_read_by_two_get_attr_nodes():
    torch.manual_seed(0)
    model, ids = TiedLM().eval(), torch.tensor([[1, 2, 3]])
    gm = capture(model, (ids,))
    embedding, linear = ir.op_nodes(gm, aten.embedding)[0], ir.op_nodes(gm, aten.linear)[0]
    shared = linear.args[1]
    assert embedding.args[0] is shared  # export reads the tied weight through one node
    with gm.graph.inserting_before(linear):  # give the head its own reader of the same attribute
        head_reader = gm.graph.get_attr(shared.target)
    linear.replace_input_with(shared, head_reader)
    new_head = torch.randn(10, 4)
    ir.set_tensor(gm, head_reader, new_head)
    gm.recompile()
    assert head_reader.target != shared.target
    assert ir.get_tensor(gm, shared) is not new_head
    hidden, logits = gm(ids)
    with torch.no_grad():
        assert_close(hidden, model.wte(ids))  # the embedding still sees the old value
        assert_close(logits, model.wte(ids) @ new_head.T)


def test_add_constant_names_places_and_describes_the_new_node(block):
    _, _, gm = block
    relu = ir.op_nodes(gm, aten.relu)[0]
    node = ir.add_constant(gm, torch.ones(3), "fc1.weight", before=relu)
    assert node.op == "get_attr" and node.target == "fc1_weight" and node.next is relu
    again = ir.add_constant(gm, torch.ones(3), "fc1.weight")
    assert again.target == "fc1_weight_1" and again is next(iter(gm.graph.nodes))
    assert torch.equal(ir.get_tensor(gm, again), torch.ones(3))
    fake_mode = ir.val_of(relu).fake_mode
    assert ir.val_of(node).fake_mode is fake_mode and ir.shape_of(node) == (3,)


# ----------------------------------------------------------------------------- rewriting


def test_replace_node_moves_uses_and_keeps_the_stack_trace(block):
    model, x, gm = block
    relu = ir.op_nodes(gm, aten.relu)[0]
    with gm.graph.inserting_after(relu):
        gelu = gm.graph.call_function(aten.gelu.default, (relu.args[0],))
    ir.replace_node(relu, gelu)
    assert relu not in gm.graph.nodes
    assert gelu.meta["stack_trace"] == relu.meta["stack_trace"]
    gm.recompile()
    with torch.no_grad():
        h = model.fc1(x)
        assert_close(gm(x), model.fc2(F.gelu(h)) + h)


def test_replace_node_without_erasing(block):
    _, _, gm = block
    relu = ir.op_nodes(gm, aten.relu)[0]
    with gm.graph.inserting_after(relu):
        gelu = gm.graph.call_function(aten.gelu.default, (relu.args[0],))
    ir.replace_node(relu, gelu, erase=False)
    assert relu in gm.graph.nodes and not relu.users
    assert list(gelu.users) == ir.op_nodes(gm, aten.linear)[1:]


def test_replace_node_with_a_node_that_reads_old(block):
    _, _, gm = block
    relu = ir.op_nodes(gm, aten.relu)[0]
    with gm.graph.inserting_after(relu):
        neg = gm.graph.call_function(aten.neg.default, (relu,))
    ir.replace_node(relu, neg)  # relu stays: neg still reads it
    assert neg.args == (relu,) and list(relu.users) == [neg]
    assert list(neg.users) == [ir.op_nodes(gm, aten.linear)[1]]


def test_cleanup_removes_dead_nodes_and_unused_attributes(block):
    model, x, gm = block
    second = ir.op_nodes(gm, aten.linear)[1]
    dead = ir.add_constant(gm, torch.ones(2), "unused")
    second.replace_all_uses_with(ir.op_nodes(gm, aten.relu)[0])  # fc2 is now dead
    assert hasattr(gm, "fc2") and hasattr(gm, "unused")
    ir.cleanup(gm)
    assert dead not in gm.graph.nodes and second not in gm.graph.nodes
    assert not hasattr(gm, "unused")
    assert {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()} == {"fc1.weight", "fc1.bias"}
    with torch.no_grad():
        h = model.fc1(x)
        assert_close(gm(x), torch.relu(h) + h)  # recompiled


def test_delete_unused_attributes_counts(block):
    _, _, gm = block
    ir.add_constant(gm, torch.ones(2), "a")
    ir.add_constant(gm, torch.ones(2), "b")
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in ("a", "b")]:
        gm.graph.erase_node(node)
    assert ir.delete_unused_attributes(gm) == 2
    assert ir.delete_unused_attributes(gm) == 0


def test_clone_graph_module_shares_tensors_not_the_graph(block):
    _, x, gm = block
    clone = ir.clone_graph_module(gm)
    assert clone.graph is not gm.graph
    assert ir.get_tensor(clone, "fc1.weight") is ir.get_tensor(gm, "fc1.weight")
    assert clone.meta["graphopt_capture"] == gm.meta["graphopt_capture"]
    relu = ir.op_nodes(clone, aten.relu)[0]
    relu.target = aten.neg.default
    clone.recompile()
    assert ir.count_ops(gm)["aten.relu.default"] == 1 and ir.count_ops(clone)["aten.relu.default"] == 0
    assert not torch.equal(clone(x), gm(x))
    original_weight = ir.get_tensor(gm, "fc1.weight")
    ir.set_tensor(clone, ir.op_nodes(clone, aten.linear)[0].args[1], torch.zeros(4, 4))
    assert ir.get_tensor(gm, "fc1.weight") is original_weight  # rollback relies on this


def _insert_concat(gm):
    """Insert ``cat([h, h], dim=0)`` after the first linear (doubling the batch dim downstream)."""
    first = ir.op_nodes(gm, aten.linear)[0]
    with gm.graph.inserting_after(first):
        cat = gm.graph.call_function(aten.cat.default, ([first, first], 0))
    first.replace_all_uses_with(cat, delete_user_cb=lambda user: user is not cat)
    gm.recompile()
    return cat


def test_propagate_shapes_static(block):
    _, x, gm = block
    cat = _insert_concat(gm)
    ir.propagate_shapes(gm)
    assert ir.shape_of(cat) == (4, 4)
    assert ir.shape_of(ir.op_nodes(gm, aten.add)[0]) == (4, 4)


def test_propagate_shapes_dynamic_keeps_symbolic_sizes():
    torch.manual_seed(0)
    gm = capture(Block().eval(), (torch.randn(3, 4),), dynamic_shapes=({0: Dim.AUTO},))
    batch = ir.shape_of(ir.op_nodes(gm, aten.linear)[0])[0]
    assert isinstance(batch, torch.SymInt)
    cat = _insert_concat(gm)
    ir.propagate_shapes(gm)
    doubled, features = ir.shape_of(cat)
    assert isinstance(doubled, torch.SymInt) and features == 4
    assert str(doubled) == f"2*{batch}"


def test_propagate_shapes_needs_example_inputs_without_meta():
    gm = _hand_graph(lambda g, x: g.call_function(aten.relu.default, (x,)))
    with pytest.raises(ValueError, match="needs example inputs"):
        ir.propagate_shapes(gm)
    with pytest.raises(ValueError, match="graph has 1 inputs, got 2 example values"):
        ir.propagate_shapes(gm, [torch.ones(2), torch.ones(2)])
    ir.propagate_shapes(gm, [torch.ones(2, 3)])
    relu = ir.op_nodes(gm, aten.relu)[0]
    assert ir.shape_of(relu) == (2, 3)


def test_fresh_nodes_and_map_outputs(block):
    _, _, gm = block
    names = [n.name for n in gm.graph.nodes]
    cat = _insert_concat(gm)
    assert ir.fresh_nodes(names, gm) == [cat]
    doubled = ir.map_outputs(lambda t: t * 2, {"a": torch.ones(2), "b": (torch.ones(1), 3)})
    assert torch.equal(doubled["a"], torch.full((2,), 2.0)) and doubled["b"][1] == 3
