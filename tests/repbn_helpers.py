"""Models and helpers shared by the RepBN tests (tests/passes/test_layernorm_to_repbn.py,
tests/passes/test_fold_repbn.py, tests/tools/test_repbn.py)."""

import pytest
import torch
from torch import nn

from graphopt import ir
from graphopt.passes.layernorm_to_repbn import ARGUMENTS, prepbn_nodes

LAYER_NORM = "aten.layer_norm.default"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one thread: the training loops there are tiny, and on
    a shared CPU spinning OpenMP threads only slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ThreeNorms(nn.Module):
    """One LayerNorm for each finalize outcome.

    ``norm_in`` reads a linear that nothing else reads (folds into ``fc_in``), its output also feeds
    a residual add; ``norm_qk`` is read by two linears only (folds into both); ``norm_out`` reads a
    residual sum and is the output (stays as a multiply and an add).
    """

    def __init__(self, d: int = 16):
        super().__init__()
        self.fc_in = nn.Linear(d, d)
        self.norm_in = nn.LayerNorm(d)
        self.fc_a = nn.Linear(d, d)
        self.norm_qk = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.norm_out = nn.LayerNorm(d)
        with torch.no_grad():
            for norm in (self.norm_in, self.norm_qk, self.norm_out):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.3)

    def forward(self, x):
        h = self.norm_in(self.fc_in(x))
        h = h + self.fc_a(h)
        n = self.norm_qk(h)
        h = h + self.q(n) * torch.sigmoid(self.k(n))
        return self.norm_out(h)


def inputs(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * 2.0 + 0.5


def randomise_repbn(graph_module) -> None:
    """Non-trivial BatchNorm statistics, affine parameters and η in every PRepBN of ``graph_module``."""
    gm = graph_module
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for node in prepbn_nodes(gm):
            t = {role: ir.get_tensor(gm, arg) for role, arg in zip(ARGUMENTS, node.args) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr"}
            t["running_mean"].copy_(torch.randn(t["running_mean"].shape, generator=gen))
            t["running_var"].copy_(torch.rand(t["running_var"].shape, generator=gen) * 2 + 0.5)
            t["bn_weight"].copy_(torch.rand(t["bn_weight"].shape, generator=gen) + 0.5)
            t["bn_bias"].copy_(torch.randn(t["bn_bias"].shape, generator=gen) * 0.3)
            t["eta"].copy_(torch.rand(1, generator=gen) * 0.5 + 0.25)
