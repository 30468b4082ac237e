"""graphopt.match: the generic questions matchers ask about nodes of the canonical IR."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.ir import match
from graphopt.ir import aten, op_nodes, val_of
from graphopt.testing import assert_close


class Fn(nn.Module):
    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, *args):
        return self.fn(self, *args)


def _graph(fn, *inputs, **buffers):
    return graphopt.capture(Fn(fn, **buffers), inputs)


def _only(gm, target):
    (node,) = op_nodes(gm, target)
    return node


def test_normalize_dim():
    assert match.normalize_dim(-1, 4) == 3
    assert match.normalize_dim(2, 4) == 2


def test_same_shape_and_broadcasts_to():
    assert match.same_shape((2, 3), (2, 3))
    assert not match.same_shape((2, 3), (3, 2))
    assert not match.same_shape((2, 3), None)
    assert match.broadcasts_to((1, 5), (2, 3, 4, 5))
    assert match.broadcasts_to((2, 1, 1, 5), (2, 3, 4, 5))
    assert not match.broadcasts_to((2, 2, 3, 4, 5), (2, 3, 4, 5))  # would grow the target
    assert not match.broadcasts_to((3, 1), (2, 3, 4, 5))  # 3 against 4


class Sums(nn.Module):
    def forward(self, x, same_batch, other_batch):
        return x.sum(), same_batch.sum(), other_batch.sum()


def test_broadcasts_to_with_symbolic_sizes():
    b, t, b2 = torch.export.Dim("b"), torch.export.Dim("t"), torch.export.Dim("b2")
    inputs = (torch.randn(2, 5, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 4))
    gm = graphopt.capture(Sums(), inputs, dynamic_shapes=({0: b, 1: t}, {0: b}, {0: b2}))
    x, same_batch, other_batch = (tuple(val_of(n).shape) for n in gm.graph.nodes if n.op == "placeholder")
    assert match.broadcasts_to((1, 4), x)
    assert match.broadcasts_to(same_batch, x)
    assert not match.broadcasts_to(other_batch, x)  # b2 is not provably b
    assert match.same_shape(x, x) and not match.same_shape(same_batch, other_batch)


def test_permutation_and_swaps_last_two():
    def fn(self, x):
        return x.transpose(-2, -1), x.transpose(2, 3), x.permute(0, 1, 3, 2), x.transpose(1, 2), x.permute(0, 2, 3, 1)

    gm = _graph(fn, torch.randn(2, 3, 4, 5))
    nodes = op_nodes(gm, aten.transpose, aten.permute)
    assert [match.permutation(n) for n in nodes] == [(0, 1, 3, 2), (0, 1, 3, 2), (0, 1, 3, 2), (0, 2, 1, 3), (0, 2, 3, 1)]
    assert [match.swaps_last_two(n) for n in nodes] == [True, True, True, False, False]
    placeholder = next(iter(gm.graph.nodes))
    assert match.permutation(placeholder) is None and not match.swaps_last_two(placeholder)


def test_value_identities():
    def fn(self, x):
        return (
            F.dropout(x, 0.1, training=False),
            F.dropout(x, 0.1, training=True),
            x.to(torch.float32),
            x.to(torch.float64),
            x.clone(),
        )

    gm = _graph(fn, torch.randn(3, 4))
    eval_dropout, train_dropout = op_nodes(gm, aten.dropout)
    assert match.is_value_identity(eval_dropout) and not match.is_value_identity(train_dropout)
    same_cast, real_cast = op_nodes(gm, aten.to)
    assert match.is_value_identity(same_cast) and not match.is_value_identity(real_cast)
    assert match.is_value_identity(_only(gm, aten.clone))
    assert not match.is_value_identity(next(iter(gm.graph.nodes)))  # a placeholder


def test_walking_through_identities():
    def fn(self, x):
        y = torch.relu(F.dropout(x.to(torch.float32), 0.1, training=False)).clone()
        return torch.tanh(y), torch.sigmoid(y)

    gm = _graph(fn, torch.randn(3, 4))
    x = next(iter(gm.graph.nodes))
    relu = _only(gm, aten.relu)
    source, passed = match.source_through_identities(relu.args[0])
    assert source is x and [n.target for n in passed] == [aten.dropout.default, aten.to.dtype]
    consumer, passed = match.user_through_identities(x)
    assert consumer is relu and len(passed) == 2
    consumer, passed = match.user_through_identities(relu)  # the clone has two users
    assert consumer is None and [n.target for n in passed] == [aten.clone.default]


def test_scalar_constant():
    def fn(self, x):
        return x * self.one, x * self.many, x * torch.tensor(0.5)

    gm = _graph(fn, torch.randn(3, 2), one=torch.tensor([2.0]), many=torch.tensor([1.0, 2.0]))
    one, many, lifted = (n.args[1] for n in op_nodes(gm, aten.mul))
    assert match.scalar_constant(one) == 2.0
    assert match.scalar_constant(lifted) == 0.5  # through lift_fresh_copy / detach_
    assert match.scalar_constant(many) is None
    assert match.scalar_constant(next(n for n in gm.graph.nodes if n.op == "placeholder")) is None
    assert match.scalar_constant(3) == 3.0 and match.scalar_constant(0.25) == 0.25
    assert match.scalar_constant(True) is None and match.scalar_constant("2") is None


@pytest.mark.parametrize(
    ("equation", "swapped", "left_t", "right_t"),
    [
        ("bhqd,bhkd->bhqk", False, False, True),
        ("bhqk,bhkd->bhqd", False, False, False),
        ("bhqd,bhdk->bhqk", False, False, False),
        ("bhdq,bhkd->bhqk", False, True, True),
        ("bhkd,bhqd->bhqk", True, False, True),
        ("bhqd,bhkd->bhkq", True, False, True),
        ("...qd,...kd->...qk", False, False, True),
    ],
)
def test_einsum_as_matmul(equation, swapped, left_t, right_t):
    def fn(self, a, b):
        return torch.einsum(equation, a, b)

    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    gm = _graph(fn, a, b)
    node = _only(gm, aten.einsum)
    operands = match.matmul_operands(node)
    first, second = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert (operands.left, operands.right) == ((second, first) if swapped else (first, second))
    assert (operands.left_transposed, operands.right_transposed) == (left_t, right_t)
    left, right = (b, a) if swapped else (a, b)
    left = left.transpose(-2, -1) if left_t else left
    right = right.transpose(-2, -1) if right_t else right
    assert_close(left @ right, torch.einsum(equation, a, b))


NOT_BATCHED_MATMULS = ["bhqd,hbkd->bhqk", "bhqd,bhkd->bhq", "bhqd,bhkd", "bhqq,bhqd->bhqd", "bhqd,bhkd,bhkd->bhqk"]


@pytest.mark.parametrize("equation", NOT_BATCHED_MATMULS)
def test_einsums_that_are_not_batched_matmuls(equation):
    def fn(self, *xs):
        return torch.einsum(equation, *xs)

    count = equation.split("->")[0].count(",") + 1
    gm = _graph(fn, *(torch.randn(4, 4, 4, 4) for _ in range(count)))
    assert match.matmul_operands(_only(gm, aten.einsum)) is None


def test_matmul_and_bmm_operands():
    def fn(self, a, b, v):
        return a @ b, torch.bmm(a, b), a @ v

    gm = _graph(fn, torch.randn(2, 3, 4), torch.randn(2, 4, 3), torch.randn(4))
    batched, vector = op_nodes(gm, aten.matmul)
    a, b, _ = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert match.matmul_operands(batched) == match.MatmulOperands(a, b)
    bmm = _only(gm, aten.bmm)
    assert match.matmul_operands(bmm) == match.MatmulOperands(bmm.args[0], bmm.args[1])
    assert match.matmul_operands(vector) is None  # matrix @ vector
    assert match.matmul_operands(a) is None


def test_infer_val_gives_new_nodes_shapes():
    def fn(self, x):
        return x.sum(-1)

    gm = _graph(fn, torch.randn(2, 3, 4))
    x = next(iter(gm.graph.nodes))
    with gm.graph.inserting_after(x):
        node = gm.graph.call_function(aten.transpose.int, (x, -2, -1))
    match.infer_val(node)
    assert tuple(val_of(node).shape) == (2, 4, 3) and val_of(node).dtype == torch.float32
    orphan = gm.graph.call_function(aten.relu.default, (gm.graph.call_function(aten.randn.default, ([2],)),))
    match.infer_val(orphan)  # its input has no fake value: nothing to infer from
    assert val_of(orphan) is None
