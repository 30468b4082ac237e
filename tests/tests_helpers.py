"""Passes shared by several core tests (a module, not a conftest, so tests can import them)."""

import torch
from torch import nn

import graphopt
from graphopt import ir


@graphopt.register_pass
class DoubleReluPass(graphopt.Pass):
    """Exact: relu(x) == relu(relu(x)); inserts one relu after each relu."""

    name = "double_relu_for_tests"

    def applicable(self, gm):
        found = bool(ir.op_nodes(gm, ir.aten.relu))
        return found, "" if found else "no relu in the graph"

    def run(self, gm, ctx):
        for node in ir.op_nodes(gm, ir.aten.relu):
            with gm.graph.inserting_after(node):
                again = gm.graph.call_function(torch.ops.aten.relu.default, (node,))
            ir.replace_node(node, again)  # node stays: again reads it
        return True


class Fn(nn.Module):
    """A module running ``fn`` on its inputs: one written form (or one op) per module."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)
