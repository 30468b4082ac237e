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

The clone shares the graph's tensors, so rollback is only real if a pass never writes them in place.
The manager makes sure: while a pass runs (analysis, rewrite, and the verification run of its graph),
a dispatch mode (:class:`_WriteGuard`) watches every ATen op that writes an argument; the first write
to the storage of a tensor the graph before the pass holds (``get_attr`` constants, parameters,
buffers), of an example input or of the reference outputs copies that tensor first. After the pass,
such a write is undone from the copy, the pass is rolled back with the tensor named in its reason
(``strict=True``: :class:`PassFailedError`, after restoring). A change the mode cannot see (the
tensor's version counter or storage changed with no copy taken, an attribute of the graph before
re-pointed) cannot be undone from a copy; a re-pointed attribute is put back, any other such change
raises :class:`PassFailedError` naming the pass and the tensor, ``strict`` or not, because the graph
before the pass is no longer what it was. Tensors the graph writes by design (``ir.in_place_writes``
of the graph before, e.g. running statistics, and the buffers of ``call_module`` modules in training
mode) are not watched, nor are the example inputs when the graph writes an input by design.

After the pipeline, the end-to-end error is checked against the combined budget of the applied passes
(:func:`combined_budget`); over it, the report gets a warning (``Report.warnings``) and
:class:`graphopt.pipeline.report.BudgetWarning` is issued.

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
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import networkx as nx
import torch
from torch.fx import GraphModule
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import _pytree as pytree

from graphopt import ir
from graphopt.ir.flops import count_flops, param_bytes
from graphopt.ir.spec import check_ir, check_ir_enabled
from graphopt.pipeline.pass_base import NotApplicable, Pass, PassContext, PassResult, get_pass, make_pass
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, ROLLED_BACK, UNCHANGED, BudgetWarning, PassRecord, Report, one_line
from graphopt.pipeline.verify import Budget, Exact, MinCosine, compare, intersect_masks, resolve_masks

__all__ = ["PassFailedError", "PassManager", "PassOrderError", "combined_budget", "order_passes", "run_graph"]

Observer = Callable[[PassRecord, GraphModule, GraphModule], None]


class PassOrderError(ValueError):
    """The passes' ordering constraints cannot all hold (a cycle)."""


class PassFailedError(RuntimeError):
    """A pass raised or failed verification under ``strict=True``."""


def _checked(p: Pass) -> Pass:
    """``p``, once it has a name and, if approximate, a budget (instances are not registered, so
    the registry's checks never saw them)."""
    if not p.name:
        raise TypeError(f"pass {type(p).__name__} has no name: set the class attribute `name`")
    if not p.exact and isinstance(p.budget, Exact):
        raise TypeError(f"approximate pass {p.name!r} ({type(p).__name__}) has no fidelity budget: set `budget` (e.g. MinCosine(0.99))")
    return p


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
        passes: pass names, classes or instances, in the order wanted (constraints may reorder);
            one name, class or instance alone is one pass. Every pass needs a name, and an
            approximate one a budget (``TypeError`` otherwise).
        verify: compare outputs after each pass (rollback on failure). Without it, a pass is only
            rolled back when it raises or leaves a graph that no longer propagates shapes.
        strict: raise :class:`PassFailedError` instead of rolling back (also when a pass wrote a
            shared tensor in place: after restoring it).
        log: progress messages go here (e.g. ``print``); None for silence.
        observers: called as ``observer(record, graph_before, graph_after)`` after each pass.
        check_ir: check the canonical IR's guarantees (:mod:`graphopt.ir.spec`) on the input graph
            and after every applied pass, raising :class:`graphopt.ir.spec.IRSpecError` at the first
            pass that breaks them; None: when the ``GRAPHOPT_CHECK_IR`` environment variable is set.
        count_flops: record each pass's FLOPs before and after in the report (a count propagates the
            example's shapes through the graph); the auto search, which builds hundreds of
            pipelines and times them instead, turns it off (the records then say 0).
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
        count_flops: bool = True,
    ):
        if isinstance(passes, (str, Pass)) or (isinstance(passes, type) and issubclass(passes, Pass)):
            passes = [passes]  # one pass, not the characters of its name
        self.passes = order_passes([_checked(make_pass(p)) for p in passes])
        self.check_ir = check_ir_enabled(check_ir)
        self.verify = verify
        self.strict = strict
        self.log = log or (lambda msg: None)
        self.observers = list(observers)
        self.count_flops = count_flops

    def run(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any] = (),
        example_kwargs: dict | None = None,
        report: Report | None = None,
        calibration: Sequence[Any] = (),
    ) -> tuple[GraphModule, Report]:
        """Run the pipeline on ``gm`` (left untouched); returns the new graph and the report.

        ``calibration``: more inputs for passes that calibrate on data (quantization), as
        ``(args, kwargs)`` pairs; passes find them in ``ctx.state["calibration"]``
        (:func:`graphopt.ir.calibrate.calibration_batches`). Verification uses the example inputs only.
        """
        report = report or Report()
        args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
        if self.check_ir:
            check_ir(gm, "captured", where="given to the pass manager")
        original = run_graph(gm, args, kwargs)
        if self.count_flops:
            count_flops(gm, args, kwargs)  # records the example's data-dependent sizes, if any
        current, reference = gm, original
        compared = _Compared()
        state: dict[str, Any] = {"calibration": list(calibration)}
        applied: list[Pass] = []
        for p in self.passes:
            current, reference, compared = self._run_one(p, current, reference, compared, args, kwargs, state, report)
            if report.records[-1].status == APPLIED:
                applied.append(p)
        if self.verify and report.records:
            outputs = run_graph(current, args, kwargs)
            final = compare(outputs, original, Exact(), compared.masks)
            where = f" (at the output positions declared by {', '.join(compared.declared_by)})" if compared.declared_by else ""
            report.final.setdefault("error vs original", f"{final.metric} {final.value:.2e}{where}")
            for budget in combined_budget(applied) if applied else ():
                check = compare(outputs, original, budget, compared.masks)
                if not check.ok:
                    names = ", ".join(p.name for p in applied)
                    message = (
                        f"end-to-end {check.metric}={check.value:.3g} is over the combined budget of the applied passes ({names}): needs {budget.describe()}"
                    )
                    report.warnings.append(message)
                    warnings.warn(f"graphopt: {message}", BudgetWarning, stacklevel=2)
        return current, report

    def _run_one(self, p: Pass, gm, reference, compared, args, kwargs, state, report) -> tuple[GraphModule, Any, _Compared]:
        guard = _WriteGuard(gm, args, kwargs, reference)
        failure: Exception | None = None
        try:
            with guard, ir.quiet_meta_errors():  # a shape error is the pass's reason, not a logged traceback
                after, new_reference, new_compared = self._attempt(p, gm, reference, compared, args, kwargs, state, report)
        except Exception as e:  # noqa: BLE001 - strict failures and IR errors: restore first, then raise
            failure = e
        except BaseException:
            guard.check_and_restore()
            raise
        restored, lost = guard.check_and_restore()
        if lost:
            raise PassFailedError(
                f"pass {p.name!r} wrote in place to {', '.join(lost)}, shared with the graph before it, in a way that cannot be undone; "
                "the graph before the pass is changed, so nothing can be returned (passes must use ir.set_tensor / ir.add_constant)"
            ) from failure
        if failure is not None and not restored:
            raise failure
        if restored:  # the write is the cause of whatever else went wrong: it is what the record and the error say
            record = report.records[-1]
            record.status = ROLLED_BACK
            record.reason = f"wrote in place to {', '.join(restored)} (restored; passes must use ir.set_tensor / ir.add_constant)"
            record.nodes_after, record.param_bytes_after, record.flops_after = record.nodes_before, record.param_bytes_before, record.flops_before
            record.output_masks = None
            self.log(f"[{p.name}] rolled back: {record.reason}")
            if self.strict or failure is not None:
                raise PassFailedError(f"pass {p.name!r} {record.reason}") from failure
            after = gm
        else:
            reference, compared = new_reference, new_compared
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
            flops_before=count_flops(gm) if self.count_flops else 0,
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
        record.nodes_after, record.param_bytes_after = _op_count(work), param_bytes(work)
        record.flops_after = count_flops(work, args, kwargs) if self.count_flops else 0
        self.log(f"[{p.name}] applied ({record.nodes_before} -> {record.nodes_after} ops)")
        return work, outputs, narrowed

    def _not_applicable(self, p: Pass, record: PassRecord, reason: str, start: float, gm, reference, compared) -> tuple[GraphModule, Any, _Compared]:
        record.status, record.reason = NOT_APPLICABLE, reason or "not applicable"
        record.seconds = time.perf_counter() - start
        self.log(f"[{p.name}] not applicable: {record.reason}")
        return gm, reference, compared


class _VerificationFailed(RuntimeError):
    pass


def combined_budget(passes: Sequence[Pass]) -> list[Budget]:
    """The budgets the end-to-end outputs of ``passes`` (the applied ones) must meet together.

    Without an approximate pass: one :class:`Exact` whose tolerance is the sum of the passes'
    (rounding errors add up). With approximate passes, their budgets: :class:`MinCosine` budgets
    combine into one whose allowed loss ``1 - threshold`` is the sum of theirs; any other budget is
    kept as it is (each must hold end to end). Exact passes' rounding is then left out, far below
    any approximate budget.
    """
    approximate = [p.budget for p in passes if not p.exact]
    if not approximate:
        tol = sum(p.budget.tol if isinstance(p.budget, Exact) else Exact().tol for p in passes)
        return [Exact(tol or Exact().tol)]
    cosines = [b for b in approximate if isinstance(b, MinCosine)]
    others = [b for b in approximate if not isinstance(b, MinCosine)]
    return ([MinCosine(1.0 - sum(1.0 - b.threshold for b in cosines))] if cosines else []) + others


@dataclass
class _Watched:
    """A tensor the pass must not write: where it lives and what it was."""

    name: str
    tensor: torch.Tensor
    alias: torch.Tensor  # the tensor's storage before the pass, kept alive to put back
    version: int
    data_ptr: int
    owner: torch.nn.Module | None = None  # for graph attributes: the module holding it, and the attribute
    attr: str = ""


def _storage_key(t: Any) -> int:
    """The address of a real tensor's storage (0 for fakes, meta tensors and anything else)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - tensors without storage (functional wrappers): not ours
        return 0


def _resolve(gm: GraphModule, name: str) -> tuple[torch.nn.Module | None, Any]:
    """The module holding attribute path ``name`` of ``gm`` and the attribute's value (None, None if absent)."""
    *path, attr = name.split(".")
    try:
        owner = gm.get_submodule(".".join(path))
        return owner, getattr(owner, attr)
    except AttributeError:
        return None, None


class _WriteGuard(TorchDispatchMode):
    """Watches the tensors shared with the graph before a pass (and the example inputs and reference
    outputs) while the pass runs; copies each before its first in-place write, so it can be restored.

    Writes are seen at the dispatcher, by the op's schema (``Tensor(a!)`` arguments), so writes
    through views and ``.data`` count; a tensor is identified by its storage.
    """

    def __init__(self, gm: GraphModule, args: tuple, kwargs: dict, reference: Any):
        super().__init__()
        by_design = ir.in_place_writes(gm)
        exempt_names = set(by_design["buffers"])
        for node in gm.graph.nodes:  # a module in training mode may update its buffers (running statistics) when run
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if module is not None and any(m.training for m in module.modules()):
                exempt_names.update(f"{node.target}.{name}" for name, _ in module.named_buffers())
        watched: list[_Watched] = []
        seen: set[str] = set()

        def watch(name: str, t: Any, owner: torch.nn.Module | None = None, attr: str = "") -> None:
            if name in seen or _storage_key(t) == 0:
                return
            seen.add(name)
            watched.append(_Watched(name, t, t.detach(), t._version, t.data_ptr(), owner, attr))

        targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
        names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers(remove_duplicate=False)]
        # storages written by design may also back another name (tied weights): watch none of them
        exempt = {_storage_key(_resolve(gm, name)[1]) for name in exempt_names}
        for name in dict.fromkeys([*targets, *names]):
            owner, t = _resolve(gm, name)
            if name not in exempt_names and isinstance(t, torch.Tensor):
                watch(f"graph tensor {name!r}", t, owner, name.rsplit(".", 1)[-1])
        if not by_design["inputs"]:
            for i, leaf in enumerate(pytree.tree_leaves(args)):
                watch(f"example input {i}", leaf)
            for key, value in kwargs.items():
                for j, leaf in enumerate(pytree.tree_leaves(value)):
                    watch(f"example input {key!r}" + (f" (leaf {j})" if j else ""), leaf)
        for i, leaf in enumerate(pytree.tree_leaves(reference)):
            watch(f"reference output {i}", leaf)
        self._by_storage: dict[int, list[_Watched]] = {}
        for w in watched:
            key = _storage_key(w.tensor)
            if key not in exempt:
                self._by_storage.setdefault(key, []).append(w)
        self.watched = [w for ws in self._by_storage.values() for w in ws]
        self.backups: dict[int, list[tuple[_Watched, torch.Tensor]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if schema is not None and schema.is_mutable and self._by_storage:
            for i, a in enumerate(schema.arguments):
                if a.alias_info is None or not a.alias_info.is_write:
                    continue
                value = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    key = _storage_key(t)
                    if key in self._by_storage and key not in self.backups:
                        self.backups[key] = [(w, w.tensor.detach().clone()) for w in self._by_storage[key]]
        return func(*args, **kwargs)

    def check_and_restore(self) -> tuple[list[str], list[str]]:
        """Undo what the pass changed; returns the names restored and the names that could not be."""
        restored, lost = [], []
        with torch.no_grad():
            for w in self.watched:
                if w.owner is not None and getattr(w.owner, w.attr, None) is not w.tensor:
                    setattr(w.owner, w.attr, w.tensor)  # a shared module's attribute re-pointed: point it back
                    restored.append(w.name + " (attribute replaced)")
                if w.tensor.data_ptr() != w.data_ptr:  # storage swapped (``t.data = ...``, ``set_``)
                    w.tensor.data = w.alias
                    restored.append(w.name + " (storage replaced)")
            for backups in self.backups.values():
                for w, backup in backups:
                    w.tensor.detach().copy_(backup)
                    restored.append(w.name)
            for w in self.watched:
                if _storage_key(w.tensor) not in self.backups and w.tensor._version != w.version and not any(w.name in r for r in restored):
                    lost.append(w.name)
        return list(dict.fromkeys(restored)), lost


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
