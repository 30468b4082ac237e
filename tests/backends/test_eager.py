"""The eager backend: graphopt ops call their kernels directly, the canonical graph is kept."""

import torch

import graphopt
from graphopt import ir
from graphopt.tools import zoo
from graphopt.ops.norms import EAGER_FAST_PATHS
from graphopt.testing import assert_close


def test_eager_backend_calls_norm_kernels_directly_and_matches():
    entry = zoo.load("gpt2-tiny")
    opt = graphopt.optimize(entry.model, ["layernorm_to_rmsnorm"], entry.example_inputs)
    canonical = ir.op_nodes(opt.graph_module, torch.ops.graphopt.rms_norm)
    assert len(canonical) == 5, "the optimized module keeps the canonical graph"
    runner = opt._runner
    assert runner is not opt.graph_module
    targets = [n.target for n in runner.graph.nodes if n.op == "call_function"]
    assert torch.ops.graphopt.rms_norm.default not in targets
    assert targets.count(EAGER_FAST_PATHS[torch.ops.graphopt.rms_norm.default]) == 5
    with torch.no_grad():
        assert_close(opt(*entry.example_inputs), opt.graph_module(*entry.example_inputs))
    assert "eager vs graph" in opt.report.final


def test_eager_backend_leaves_graphs_without_graphopt_ops_alone(tiny_mlp):
    model, args = tiny_mlp
    opt = graphopt.optimize(model, [], args)
    assert opt._runner is opt.graph_module
    assert opt.kernels == {}, "the eager backend generates no code"


def test_direct_path_falls_back_to_the_op_when_autograd_records():
    x = torch.randn(3, 8, requires_grad=True)
    direct = EAGER_FAST_PATHS[torch.ops.graphopt.rms_norm.default]
    assert_close(direct(x, None, None, 1e-6), torch.ops.graphopt.rms_norm(x, None, None, 1e-6))
