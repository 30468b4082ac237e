"""The backend-vs-graph check every frontend runs after a backend compiled the optimized graph."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from graphopt.backends import CompiledGraph
from graphopt.ir import aten, is_op
from graphopt.ir.oprecord import op_record
from graphopt.pipeline.pass_base import make_pass
from graphopt.pipeline.manager import run_graph
from graphopt.pipeline.report import APPLIED, Report
from graphopt.pipeline.verify import Budget, Exact, MinCosine, compare

__all__ = ["BACKEND_TOLERANCE", "backend_budget", "check_backend"]

BACKEND_TOLERANCE = 1e-4
"""Relative error a backend may add to the graph's outputs: generated kernels and inductor reorder
float reductions, so the budget is looser than a pass's :class:`~graphopt.pipeline.verify.Exact`."""


def check_backend(compiled: CompiledGraph, graph: GraphModule, args: Any, kwargs: dict | None, report: Report, expected: Any = None) -> None:
    """Check that ``compiled`` reproduces ``graph`` on ``(args, kwargs)`` and record the outcome.

    The check is skipped when the backend runs ``graph`` itself. Otherwise both run (``expected``,
    when given, stands for ``graph``'s outputs: a backend may change the graph it compiles) and are
    compared under :func:`backend_budget` (``Exact(BACKEND_TOLERANCE)`` unless the graph rounds
    activations); ``report.final["<backend> vs graph"]`` gets the result.

    Raises:
        RuntimeError: the outputs differ beyond the tolerance.
    """
    if compiled.runner is graph:
        return
    outputs = run_graph(compiled.runner, args, kwargs)
    check = compare(outputs, run_graph(graph, args, kwargs) if expected is None else expected, backend_budget(graph, report))
    report.final[f"{compiled.backend} vs graph"] = str(check)
    if not check.ok:
        raise RuntimeError(f"backend {compiled.backend!r} does not reproduce the optimized graph: {check}")


def _rounds_activations(graph: GraphModule) -> bool:
    """Whether the graph rounds activations to a coarse grid: an op whose record ``quantizes``, or a
    cast to bf16/fp16."""
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        record = op_record(node.target)
        if record is not None and record.quantizes:
            return True
        if is_op(node, aten._to_copy, aten.to) and node.kwargs.get("dtype") in (torch.bfloat16, torch.float16):
            return True
    return False


def backend_budget(graph: GraphModule, report: Report) -> Budget:
    """How closely a backend must reproduce ``graph``: to rounding (``Exact(BACKEND_TOLERANCE)``),
    or, where the graph rounds activations (int8 codes, bf16 casts), within the tightest cosine
    budget of the applied approximate passes: another backend's last-bit differences flip the odd
    code there, and later quantized layers amplify the flips to the quantization's own noise."""
    if not _rounds_activations(graph):
        return Exact(BACKEND_TOLERANCE)
    thresholds = []
    for record in report.records:
        if record.status != APPLIED or record.exact:
            continue
        try:
            budget = make_pass(record.name, **record.options).budget
        except Exception:  # noqa: BLE001 - a pass that cannot be rebuilt from its options: no budget from it
            continue
        if isinstance(budget, MinCosine):
            thresholds.append(budget.threshold)
    return MinCosine(max(thresholds)) if thresholds else Exact(BACKEND_TOLERANCE)
