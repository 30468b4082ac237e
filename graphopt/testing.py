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

The numerics kit is the one way graphopt's tests compare numbers, and the one to copy:

    from graphopt.testing import assert_close, rel_err, TOLERANCES

    assert_close(fast(x), model(x))                      # elementwise, within TOLERANCES[dtype]
    assert_close(out.float(), ref, dtype=torch.float16)  # computed in fp16, compared in fp32
    assert_close(opt(x), model(x), max_rel_err=1e-6)     # relative to the output's scale
    assert_close(kernel(x), ref, rtol=2e-3, atol=1e-3)   # a bound of its own, stated where it is claimed

``rel_err`` measures without asserting (a number a subprocess reports, a table of errors); it is the
relative error :class:`graphopt.Exact` budgets, the same function, so a test's ``max_rel_err`` and
a pass's budget mean the same thing.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch.utils import _pytree as pytree

from graphopt.frontends.api import OptimizedModule, optimize
from graphopt.frontends.capture import inference_view
from graphopt.ir import count_ops, op_name
from graphopt.pipeline.manager import order_passes, run_graph
from graphopt.pipeline.pass_base import Pass, PassContext, make_pass
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, PassRecord
from graphopt.pipeline.verify import compare, intersect_masks, relative_error, resolve_masks

__all__ = ["TOLERANCES", "Tolerance", "assert_applies", "assert_close", "assert_not_applicable", "declared_masks", "rel_err", "run_pass"]


class Tolerance(NamedTuple):
    """Elementwise closeness: ``|actual - expected| <= atol + rtol * |expected|``."""

    rtol: float
    atol: float


# Per dtype of the compared values, the tightest tolerance any of graphopt's tests used before the
# kit (torch.testing's defaults, except float64's atol). A test that needs more states its own
# bound in the call: that bound is then a claim the test makes, visible where it is made.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-7, atol=1e-9),
    torch.float32: Tolerance(rtol=1.3e-6, atol=1e-5),
    torch.float16: Tolerance(rtol=1e-3, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-5),
}

rel_err = relative_error  # max |a - b| / max |b|, as graphopt.Exact measures it (one definition)


def assert_close(
    actual: Any,
    expected: Any,
    *,
    dtype: torch.dtype | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_rel_err: float | None = None,
    equal_nan: bool = False,
    msg: str = "",
) -> None:
    """Assert two pytrees of tensors (and plain values) are close, leaf by leaf.

    The pytrees must have the same structure (``torch.utils._pytree``: tuples, lists, dicts,
    registered classes such as ``ModelOutput``); non-tensor leaves must be equal; integer and
    boolean tensors must be equal. Floating-point tensors are compared one of two ways:

    * elementwise (the default), ``|actual - expected| <= atol + rtol * |expected|`` with shape,
      dtype and device checked, as :func:`torch.testing.assert_close` does; ``rtol`` and ``atol``
      default to ``TOLERANCES[dtype]``, ``dtype`` to the expected leaf's dtype (pass the dtype the
      values were computed in when they are compared after a cast);
    * ``max_rel_err=bound``: ``rel_err(actual, expected) <= bound`` (shapes must match), the
      scale-relative error of :class:`graphopt.Exact`, for results whose small entries carry no
      meaning of their own (a whole model's output, a folded weight).

    ``msg`` prefixes the failure message, which names the leaf (its pytree path) and the numbers.
    """
    if max_rel_err is not None and (rtol is not None or atol is not None):
        raise ValueError("give either max_rel_err or rtol/atol, not both")
    if (rtol is None) != (atol is None):
        raise ValueError("give both rtol and atol, or neither")
    got, got_spec = pytree.tree_flatten_with_path(actual)
    want, want_spec = pytree.tree_flatten_with_path(expected)
    prefix = f"{msg}: " if msg else ""
    if got_spec != want_spec:
        raise AssertionError(f"{prefix}structures differ: {pytree.treespec_pprint(got_spec)} vs {pytree.treespec_pprint(want_spec)}")
    for (path, a), (_, e) in zip(got, want):
        where = f"{prefix}output{pytree.keystr(path)}" if path else f"{prefix}value"
        if not isinstance(e, torch.Tensor) or not isinstance(a, torch.Tensor):
            if isinstance(a, torch.Tensor) or isinstance(e, torch.Tensor) or a != e:
                raise AssertionError(f"{where}: {a!r} != {e!r}")
            continue
        exact = not (e.is_floating_point() or e.is_complex())
        if max_rel_err is not None and not exact:
            if tuple(a.shape) != tuple(e.shape):
                raise AssertionError(f"{where}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
            err = rel_err(a, e)
            if not err <= max_rel_err:
                raise AssertionError(f"{where}: relative error {err:.3g} > {max_rel_err:g} (max |actual - expected| / max |expected|)")
            continue
        if exact:
            tol = Tolerance(0.0, 0.0)
        elif rtol is not None:
            tol = Tolerance(rtol, atol)
        else:
            tol = TOLERANCES.get(dtype or e.dtype)
            if tol is None:
                raise KeyError(f"no tolerance for {dtype or e.dtype} in graphopt.testing.TOLERANCES: give rtol and atol")
        torch.testing.assert_close(a, e, rtol=tol.rtol, atol=tol.atol, equal_nan=equal_nan, msg=lambda m, where=where: f"{where}: {m}")


def _name(op: Any) -> str:
    return op if isinstance(op, str) else op_name(op)


def run_pass(pass_: str | Pass, model: torch.nn.Module, example_inputs: Sequence[Any], **optimize_kwargs) -> tuple[OptimizedModule, PassRecord]:
    """Optimize ``model`` with the one pass (and the passes it requires); returns the optimized
    module and the pass's record."""
    p = make_pass(pass_)
    opt = optimize(model, [p], tuple(example_inputs), **optimize_kwargs)
    return opt, opt.report.record(p.name)


def declared_masks(passes: Sequence[PassRecord | Pass], reference: Any, inputs: Sequence[Any]) -> list[torch.Tensor | None] | None:
    """Per output leaf, the positions every pass of ``passes`` compares on ``inputs`` whose original
    outputs are ``reference``: the intersection of their ``output_masks``. Give the records of the
    applied passes (``report.record(name)``: they hold what each run declared); a pass instance
    answers for the positions its class declares whatever the run (``Pass.output_masks``)."""
    ctx = PassContext(example_inputs=tuple(inputs), reference=reference)
    masks = None
    for p in passes:
        if p.output_masks is not None:
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
    applied = [r for r in map(opt.report.record, (q.name for q in pipeline)) if r.status == APPLIED]
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
