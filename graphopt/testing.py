"""Assertions for pass-level unit tests, for graphopt's own tests and for users' passes.

    from graphopt.testing import assert_applies, assert_not_applicable

    def test_my_pass_rewrites_and_keeps_the_function():
        assert_applies(MyPass(), model, (x,), gone=["aten.softmax.int"], present=["aten.scaled_dot_product_attention.default"], other_inputs=[(y,)])

    def test_my_pass_says_why_not():
        assert_not_applicable(MyPass(), plain_mlp, (x,), reason_contains="no attention")

Both run the pass through the real pass manager (capture, clone, verification), so a test written
with them checks exactly what ``graphopt.optimize`` will do. Outputs are compared where the
pipeline's passes declare them meaningful (their ``output_masks``, intersected over the applied
passes, evaluated on each input), as the manager's own checks do.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from graphopt.frontends.api import OptimizedModule, optimize
from graphopt.frontends.capture import inference_view
from graphopt.ir import count_ops, op_name
from graphopt.pipeline.manager import order_passes, run_graph
from graphopt.pipeline.pass_base import Pass, PassContext, make_pass
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, PassRecord
from graphopt.pipeline.verify import compare, intersect_masks, resolve_masks

__all__ = ["assert_applies", "assert_not_applicable", "declared_masks", "run_pass"]


def _name(op: Any) -> str:
    return op if isinstance(op, str) else op_name(op)


def run_pass(pass_: str | Pass, model: torch.nn.Module, example_inputs: Sequence[Any], **optimize_kwargs) -> tuple[OptimizedModule, PassRecord]:
    """Optimize ``model`` with the one pass (and the passes it requires); returns the optimized
    module and the pass's record."""
    p = make_pass(pass_)
    opt = optimize(model, [p], tuple(example_inputs), **optimize_kwargs)
    return opt, opt.report.record(p.name)


def declared_masks(passes: Sequence[Pass], reference: Any, inputs: Sequence[Any]) -> list[torch.Tensor | None] | None:
    """Per output leaf, the positions every pass of ``passes`` (which ran) compares on ``inputs``
    whose original outputs are ``reference``: the intersection of their ``output_masks``."""
    ctx = PassContext(example_inputs=tuple(inputs), reference=reference)
    masks = None
    for p in passes:
        masks = intersect_masks(masks, resolve_masks(p.output_masks(reference, ctx), reference))
    return masks


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
    (inputs the graph never saw, which catches values a rewrite baked in as constants), at the
    output positions the applied passes declare meaningful for each input."""
    p = make_pass(pass_)
    pipeline = order_passes([p])  # the instances the manager runs, with the passes p requires
    opt = optimize(model, pipeline, tuple(example_inputs), **optimize_kwargs)
    record = opt.report.record(p.name)
    assert record.status == APPLIED, f"{p.name} was {record.status}: {record.reason}"
    applied = [q for q in pipeline if opt.report.record(q.name).status == APPLIED]
    ops = count_ops(opt.graph_module)
    left = {n: ops[n] for n in map(_name, gone) if ops[n]}
    assert not left, f"{p.name} left ops it should remove: {left}"
    missing = [n for n in map(_name, present) if not ops[n]]
    assert not missing, f"{p.name} graph lacks {missing}"
    for inputs in [tuple(example_inputs), *map(tuple, other_inputs)]:
        with inference_view(model):  # the reference as captured: eval mode, no KV cache
            reference = run_graph(model, inputs)
        check = compare(run_graph(opt, inputs), reference, p.budget, declared_masks(applied, reference, inputs))
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
