"""Write your own pass: fold ``x * a * b`` (two scalar multiplies in a row) into ``x * (a*b)``.

    python examples/custom_pass.py

Shows the whole contract: a docstring naming the rewrite, an analysis that finds what to rewrite
or says why not (``graphopt.NotApplicable``), the rewrite of what the analysis found on the
canonical ATen IR with graphopt.ir helpers, stats for the report. The pass manager runs the
analysis once per pipeline run, on its own copy of the graph. Its unit test, ready to copy, is
examples/test_custom_pass.py.
"""

from __future__ import annotations

import torch

import graphopt
from graphopt import ir


def _scalar_mul(node) -> bool:
    return ir.is_op(node, ir.aten.mul.Tensor, ir.aten.mul.Scalar) and isinstance(node.args[1], (int, float))


@graphopt.register_pass
class FoldScalarMultiplies(graphopt.Pass):
    """``(x * a) * b  ->  x * (a * b)`` for Python-number ``a`` and ``b``; exact up to rounding."""

    name = "fold_scalar_multiplies"
    exact = True

    def analyze(self, gm, ctx):
        pairs = []
        for node in gm.graph.nodes:
            first = node.args[0] if _scalar_mul(node) else None
            if first is not None and _scalar_mul(first) and len(first.users) == 1:
                pairs.append((first, node))
        if not pairs:
            raise graphopt.NotApplicable("no two scalar multiplies in a row")
        return pairs

    def rewrite(self, gm, pairs, ctx):
        folded = 0
        for first, second in pairs:
            if first.graph is None or second.args[0] is not first:  # consumed by an earlier fold
                continue
            with gm.graph.inserting_before(second):
                fused = gm.graph.call_function(torch.ops.aten.mul.Tensor, (first.args[0], first.args[1] * second.args[1]))
            ir.replace_node(second, fused)
            folded += 1
        return graphopt.PassResult(changed=folded > 0, stats={"folded": folded})


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x) * 0.5 * 3.0


if __name__ == "__main__":
    model, x = Scaled().eval(), torch.randn(4, 16)
    fast = graphopt.optimize(model, ["fold_scalar_multiplies"], (x,))
    print(fast.report)
    print(fast.graph_module.code)
