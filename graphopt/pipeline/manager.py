"""The pass manager: order passes, run each on a copy, check it, keep it or roll it back.

For every pass, in an order that satisfies its ``requires`` / ``after`` constraints:

1. clone the graph (tensors shared, never edited in place) and run the pass's ``analyze`` on the
   clone, once; a pass with nothing to do raises :class:`graphopt.ir.NotApplicable` and is recorded
   with its reason (an analysis raising anything else is recorded as not applicable too, with the
   exception);
2. ``rewrite`` the clone from that analysis;
3. lint, eliminate dead code and unused constants, recompile, re-propagate ``meta["val"]``;
4. run the new graph on the example inputs and compare with the outputs before the pass, under the
   pass's budget (:class:`graphopt.pipeline.verify.Exact` for exact passes), at the output positions the
   pass declares (``PassResult.output_masks``, else ``Pass.output_masks``) that every earlier pass
   declared too;
5. keep the clone, or drop it (rollback) and record why; with ``strict=True`` raise instead.

The clone comes before the analysis so that the analysis (which may hold the clone's nodes) is
handed to the rewrite as is, and computed once per run; a pass that turns out not to apply costs
a copy of the graph's nodes (not of its tensors).

Each pass is checked against the graph just before it, so an approximate pass's error is not
charged to the exact passes after it; ``Report.final`` holds the end-to-end comparison, at the
positions every applied pass declared meaningful (the intersection of their masks: a position one
pass made meaningless, like a pad token, stays so). The records' FLOPs are counted on the example
inputs, data-dependent sizes included (:func:`graphopt.ir.flops.count_flops`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import networkx as nx
import torch
from torch.fx import GraphModule

from graphopt import ir
from graphopt.ir.flops import count_flops, param_bytes
from graphopt.ir.spec import check_ir, check_ir_enabled
from graphopt.pipeline.pass_base import NotApplicable, Pass, PassContext, PassResult, get_pass, make_pass
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, ROLLED_BACK, UNCHANGED, PassRecord, Report, one_line
from graphopt.pipeline.verify import Exact, compare, intersect_masks, resolve_masks

__all__ = ["PassFailedError", "PassManager", "PassOrderError", "order_passes", "run_graph"]

Observer = Callable[[PassRecord, GraphModule, GraphModule], None]


class PassOrderError(ValueError):
    """The passes' ordering constraints cannot all hold (a cycle)."""


class PassFailedError(RuntimeError):
    """A pass raised or failed verification under ``strict=True``."""


def order_passes(passes: Sequence[Pass]) -> list[Pass]:
    """Order ``passes`` so that every ``requires`` and ``after`` constraint holds.

    Passes named in ``requires`` but missing are added (with default options). Among orders that
    satisfy the constraints, the one closest to the given order is chosen.
    """
    pipeline = list(passes)
    present = {p.name for p in pipeline}
    i = 0
    while i < len(pipeline):  # add missing requirements, transitively
        for req in pipeline[i].requires:
            if req not in present:
                pipeline.append(get_pass(req)())
                present.add(req)
        i += 1
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(pipeline)))
    by_name: dict[str, list[int]] = {}
    for idx, p in enumerate(pipeline):
        by_name.setdefault(p.name, []).append(idx)
    for idx, p in enumerate(pipeline):
        for dep in (*p.requires, *p.after):
            for j in by_name.get(dep, []):
                if j != idx:
                    graph.add_edge(j, idx)
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=lambda n: n))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(graph)
        names = [pipeline[u].name for u, _ in cycle] + [pipeline[cycle[0][0]].name]
        raise PassOrderError("pass ordering constraints form a cycle: " + " -> ".join(names)) from None
    return [pipeline[n] for n in order]


def run_graph(gm: Callable, example_inputs: Sequence[Any], example_kwargs: dict | None = None) -> Any:
    """Run a graph (or any callable) on the example inputs without autograd."""
    with torch.no_grad():
        return gm(*example_inputs, **(example_kwargs or {}))


def _op_count(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


class PassManager:
    """Runs a pipeline of passes with verification and rollback.

    Args:
        passes: pass names, classes or instances, in the order wanted (constraints may reorder).
        verify: compare outputs after each pass (rollback on failure). Without it, a pass is only
            rolled back when it raises or leaves a graph that no longer propagates shapes.
        strict: raise :class:`PassFailedError` instead of rolling back.
        log: progress messages go here (e.g. ``print``); None for silence.
        observers: called as ``observer(record, graph_before, graph_after)`` after each pass.
        check_ir: check the canonical IR's guarantees (:mod:`graphopt.ir.spec`) on the input graph
            and after every applied pass, raising :class:`graphopt.ir.spec.IRSpecError` at the first
            pass that breaks them; None: when the ``GRAPHOPT_CHECK_IR`` environment variable is set.
    """

    def __init__(
        self,
        passes: Iterable[str | Pass | type[Pass]],
        *,
        verify: bool = True,
        strict: bool = False,
        log: Callable[[str], None] | None = None,
        observers: Sequence[Observer] = (),
        check_ir: bool | None = None,
    ):
        self.passes = order_passes([make_pass(p) for p in passes])
        self.check_ir = check_ir_enabled(check_ir)
        self.verify = verify
        self.strict = strict
        self.log = log or (lambda msg: None)
        self.observers = list(observers)

    def run(
        self, gm: GraphModule, example_inputs: Sequence[Any] = (), example_kwargs: dict | None = None, report: Report | None = None
    ) -> tuple[GraphModule, Report]:
        """Run the pipeline on ``gm`` (left untouched); returns the new graph and the report."""
        report = report or Report()
        args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
        if self.check_ir:
            check_ir(gm, "captured", where="given to the pass manager")
        original = run_graph(gm, args, kwargs)
        count_flops(gm, args, kwargs)  # records the example's data-dependent sizes, if any
        current, reference = gm, original
        compared = _Compared()
        state: dict[str, Any] = {}
        for p in self.passes:
            current, reference, compared = self._run_one(p, current, reference, compared, args, kwargs, state, report)
        if self.verify and report.records:
            final = compare(run_graph(current, args, kwargs), original, Exact(), compared.masks)
            where = f" (at the output positions declared by {', '.join(compared.declared_by)})" if compared.declared_by else ""
            report.final.setdefault("error vs original", f"{final.metric} {final.value:.2e}{where}")
        return current, report

    def _run_one(self, p: Pass, gm, reference, compared, args, kwargs, state, report) -> tuple[GraphModule, Any, _Compared]:
        after, reference, compared = self._attempt(p, gm, reference, compared, args, kwargs, state, report)
        for observer in self.observers:
            observer(report.records[-1], gm, after)
        return after, reference, compared

    def _attempt(self, p: Pass, gm, reference, compared, args, kwargs, state, report) -> tuple[GraphModule, Any, _Compared]:
        record = PassRecord(
            name=p.name,
            exact=p.exact,
            options=p.options(),
            status=NOT_APPLICABLE,
            nodes_before=_op_count(gm),
            param_bytes_before=param_bytes(gm),
            flops_before=count_flops(gm),
        )
        record.nodes_after, record.param_bytes_after, record.flops_after = record.nodes_before, record.param_bytes_before, record.flops_before
        report.records.append(record)
        self.log(f"[{p.name}] checking applicability")
        start = time.perf_counter()
        work = ir.clone_graph_module(gm)
        ctx = PassContext(example_inputs=args, example_kwargs=kwargs, reference=reference, log=self.log, state=state)
        try:
            analysis = p.analyze(work, ctx)
        except NotApplicable as e:
            return self._not_applicable(p, record, e.reason, start, gm, reference, compared)
        except Exception as e:  # noqa: BLE001 - a broken check is reported like a broken pass
            return self._not_applicable(p, record, f"applicability check raised {one_line(e)}", start, gm, reference, compared)
        self.log(f"[{p.name}] running")
        narrowed = compared
        try:
            try:
                result = p.rewrite(work, analysis, ctx)
            except NotApplicable as e:  # found out late; the clone is dropped
                return self._not_applicable(p, record, e.reason, start, gm, reference, compared)
            result = result if isinstance(result, PassResult) else PassResult(changed=bool(result))
            record.stats.update(result.stats)
            if not result.changed:
                record.status, record.reason = UNCHANGED, result.message
                record.seconds = time.perf_counter() - start
                return gm, reference, compared
            ir.cleanup(work)
            ir.propagate_shapes(work, list(args))
            outputs = run_graph(work, args, kwargs)
            declare = result.output_masks if result.output_masks is not None else p.output_masks
            if self.verify:
                narrowed = compared.narrowed(p.name, declare, reference, ctx)
                check = compare(outputs, reference, p.budget, narrowed.masks)
                record.metric, record.error = check.metric, check.value
                if not check.ok:
                    raise _VerificationFailed(f"verification failed: {check}")
        except Exception as e:  # noqa: BLE001 - any failure of the pass means rollback
            record.status = ROLLED_BACK
            record.reason = str(e) if isinstance(e, _VerificationFailed) else f"raised {one_line(e)}"
            record.seconds = time.perf_counter() - start
            self.log(f"[{p.name}] rolled back: {record.reason}")
            if self.strict:
                raise PassFailedError(f"pass {p.name!r} {record.reason}") from e
            return gm, reference, compared
        if self.check_ir:  # a broken IR is a bug in the pass, not a rewrite to roll back: raise
            canonical = any(r.name == "canonicalize" and r.status != ROLLED_BACK for r in report.records)
            check_ir(work, "canonicalized" if canonical else "captured", where=f"after {p.name}")
        record.status, record.reason, record.output_masks = APPLIED, result.message, declare
        record.seconds = time.perf_counter() - start
        record.nodes_after, record.param_bytes_after, record.flops_after = _op_count(work), param_bytes(work), count_flops(work, args, kwargs)
        self.log(f"[{p.name}] applied ({record.nodes_before} -> {record.nodes_after} ops)")
        return work, outputs, narrowed

    def _not_applicable(self, p: Pass, record: PassRecord, reason: str, start: float, gm, reference, compared) -> tuple[GraphModule, Any, _Compared]:
        record.status, record.reason = NOT_APPLICABLE, reason or "not applicable"
        record.seconds = time.perf_counter() - start
        self.log(f"[{p.name}] not applicable: {record.reason}")
        return gm, reference, compared


class _VerificationFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class _Compared:
    """The output positions still meaningful after the passes so far, per flat output leaf.

    A pass's output masks (``PassResult.output_masks``) declare the positions where its output
    must equal the one before it; elsewhere the values are meaningless by design (the pad tokens
    of ``remove_padding``).
    Later passes cannot make such a position meaningful again, so the positions compared after a
    pipeline are those *every* applied pass compared: the intersection of their masks.
    """

    masks: list[torch.Tensor | None] | None = None  # None: all positions
    declared_by: tuple[str, ...] = ()

    def narrowed(self, name: str, declare: Callable[[Any, PassContext], Any], reference: Any, ctx: PassContext) -> _Compared:
        declared = resolve_masks(declare(reference, ctx), reference)
        if declared is None:
            return self
        return _Compared(intersect_masks(self.masks, declared), (*self.declared_by, name))
