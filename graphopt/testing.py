"""Assertions for pass-level unit tests, for graphopt's own tests and for users' passes.

    from graphopt.testing import assert_applies, assert_not_applicable

    def test_my_pass_rewrites_and_keeps_the_function():
        assert_applies(MyPass(), model, (x,), gone=["aten.softmax.int"], present=["aten.scaled_dot_product_attention.default"], other_inputs=[(y,)])

    def test_my_pass_says_why_not():
        assert_not_applicable(MyPass(), plain_mlp, (x,), reason_contains="no attention")

Both run the pass through the real pass manager (capture, clone, verification), so a test written
with them checks exactly what ``graphopt.optimize`` will do.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from graphopt.api import OptimizedModule, optimize
from graphopt.capture import inference_view
from graphopt.ir import count_ops, op_name
from graphopt.manager import run_graph
from graphopt.pass_base import Pass, make_pass
from graphopt.report import APPLIED, NOT_APPLICABLE, PassRecord
from graphopt.verify import compare

__all__ = ["assert_applies", "assert_not_applicable", "run_pass"]


def _name(op: Any) -> str:
    return op if isinstance(op, str) else op_name(op)


def run_pass(pass_: str | Pass, model: torch.nn.Module, example_inputs: Sequence[Any], **optimize_kwargs) -> tuple[OptimizedModule, PassRecord]:
    """Optimize ``model`` with the one pass; returns the optimized module and the pass's record."""
    p = make_pass(pass_)
    opt = optimize(model, [p], tuple(example_inputs), **optimize_kwargs)
    return opt, opt.report.record(p.name)


def assert_applies(
    pass_: str | Pass,
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    gone: Iterable[Any] = (),
    present: Iterable[Any] = (),
    other_inputs: Iterable[Sequence[Any]] = (),
    **optimize_kwargs,
) -> OptimizedModule:
    """Assert the pass applies, removes every op in ``gone``, leaves every op in ``present``, and
    keeps the model's outputs within the pass's budget on the example *and* on ``other_inputs``
    (inputs the graph never saw, which catches values a rewrite baked in as constants)."""
    p = make_pass(pass_)
    opt, record = run_pass(p, model, example_inputs, **optimize_kwargs)
    assert record.status == APPLIED, f"{p.name} was {record.status}: {record.reason}"
    ops = count_ops(opt.graph_module)
    left = {n: ops[n] for n in map(_name, gone) if ops[n]}
    assert not left, f"{p.name} left ops it should remove: {left}"
    missing = [n for n in map(_name, present) if not ops[n]]
    assert not missing, f"{p.name} graph lacks {missing}"
    for inputs in [tuple(example_inputs), *map(tuple, other_inputs)]:
        with inference_view(model):  # the reference as captured: eval mode, no KV cache
            reference = run_graph(model, inputs)
        check = compare(run_graph(opt, inputs), reference, p.budget)
        assert check.ok, f"{p.name} changed the function: {check}"
    return opt


def assert_not_applicable(pass_: str | Pass, model: torch.nn.Module, example_inputs: Sequence[Any], *, reason_contains: str, **optimize_kwargs) -> PassRecord:
    """Assert the pass declines ``model`` with a reason containing ``reason_contains``, and that
    the graph is left as captured."""
    opt, record = run_pass(pass_, model, example_inputs, **optimize_kwargs)
    assert record.status != APPLIED, f"{record.name} applied but should not have"
    assert reason_contains in record.reason, f"reason {record.reason!r} does not mention {reason_contains!r}"
    assert record.status == NOT_APPLICABLE or record.nodes_after == record.nodes_before
    return record
