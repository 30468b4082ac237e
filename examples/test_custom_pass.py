"""A pass-level unit test to copy for your own pass: a positive case, a not-applicable case."""

import torch
from custom_pass import FoldScalarMultiplies, Scaled

from graphopt.testing import assert_applies, assert_not_applicable


def test_folds_and_keeps_the_function():
    model = Scaled().eval()
    opt = assert_applies(FoldScalarMultiplies(), model, (torch.randn(4, 16),), other_inputs=[(torch.randn(7, 16),)])
    muls = [n for n in opt.graph_module.graph.nodes if n.op == "call_function" and "mul" in str(n.target)]
    assert len(muls) == 1 and muls[0].args[1] == 1.5
    assert opt.report.record("fold_scalar_multiplies").stats == {"folded": 1}


def test_says_why_not():
    model = torch.nn.Linear(4, 4).eval()
    assert_not_applicable(FoldScalarMultiplies(), model, (torch.randn(2, 4),), reason_contains="no two scalar multiplies")
