"""The backend-vs-graph check every frontend runs after a backend compiled the optimized graph."""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule

from graphopt.backends import CompiledGraph
from graphopt.pipeline.manager import run_graph
from graphopt.pipeline.report import Report
from graphopt.pipeline.verify import Exact, compare

__all__ = ["BACKEND_TOLERANCE", "check_backend"]

BACKEND_TOLERANCE = 1e-4
"""Relative error a backend may add to the graph's outputs: generated kernels and inductor reorder
float reductions, so the budget is looser than a pass's :class:`~graphopt.pipeline.verify.Exact`."""


def check_backend(compiled: CompiledGraph, graph: GraphModule, args: Any, kwargs: dict | None, report: Report, expected: Any = None) -> None:
    """Check that ``compiled`` reproduces ``graph`` on ``(args, kwargs)`` and record the outcome.

    The check is skipped when the backend runs ``graph`` itself. Otherwise both run (``expected``,
    when given, stands for ``graph``'s outputs: a backend may change the graph it compiles) and are
    compared under ``Exact(BACKEND_TOLERANCE)``; ``report.final["<backend> vs graph"]`` gets the result.

    Raises:
        RuntimeError: the outputs differ beyond the tolerance.
    """
    if compiled.runner is graph:
        return
    outputs = run_graph(compiled.runner, args, kwargs)
    check = compare(outputs, run_graph(graph, args, kwargs) if expected is None else expected, Exact(BACKEND_TOLERANCE))
    report.final[f"{compiled.backend} vs graph"] = str(check)
    if not check.ok:
        raise RuntimeError(f"backend {compiled.backend!r} does not reproduce the optimized graph: {check}")
