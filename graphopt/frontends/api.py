"""``graphopt.optimize``: capture, run passes with verification, hand the graph to a backend."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule

from graphopt.backends import CompiledGraph, as_compiled, get_backend
from graphopt.frontends.capture import capture, normalize_args
from graphopt.frontends.check import check_backend
from graphopt.pipeline.manager import PassManager
from graphopt.pipeline.pass_base import Pass
from graphopt.pipeline.report import Report

__all__ = ["OptimizedModule", "optimize", "save", "load"]


class OptimizedModule(torch.nn.Module):
    """The result of :func:`optimize`: a new module that takes and returns what the original did.

    Attributes:
        graph_module: the rewritten canonical graph (a ``torch.fx.GraphModule``).
        report: the :class:`graphopt.pipeline.report.Report` of the pipeline (prints as a table).
        backend: the name of the backend running it.
        compiled: what the backend made of ``graph_module``, a
            :class:`graphopt.backends.CompiledGraph` (runner, generated kernels, regions left to ATen).

    ``runner`` may be a :class:`~graphopt.backends.CompiledGraph` or any callable running
    ``graph_module`` (taken as one that generated nothing).
    """

    def __init__(self, graph_module: GraphModule, runner: CompiledGraph | Callable, report: Report, backend: str):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.backend = backend
        self.compiled = as_compiled(runner, backend)
        # A runner that is a module (a GraphModule, a compiled module) is a submodule, as it always
        # was: ``.to()``, ``.eval()`` and ``state_dict()`` reach the tensors the backend runs.
        self._runner = self.compiled.runner

    @property
    def kernels(self) -> dict[str, str]:
        """Generated kernel sources by region name (backends that generate code, e.g. ``triton``)."""
        return dict(self.compiled.kernels)

    def forward(self, *args, **kwargs):
        return self.compiled.runner(*args, **kwargs)


def optimize(
    model: torch.nn.Module,
    passes: Iterable[str | Pass | type[Pass]] = (),
    example_inputs: Any = None,
    *,
    example_kwargs: dict | None = None,
    dynamic_shapes: Any = None,
    backend: str = "eager",
    backend_options: dict | None = None,
    verify: bool = True,
    strict: bool = False,
    log: Callable[[str], None] | None = None,
    observers: Sequence[Callable] = (),
    name: str = "",
) -> OptimizedModule:
    """Optimize ``model`` with ``passes``; the original model is left exactly as it was.

    Args:
        model: the ``nn.Module`` to optimize.
        passes: pass names (see ``graphopt passes``), ``Pass`` classes or instances, mixed freely.
        example_inputs: positional inputs (a tuple, or one tensor) used to capture and to verify.
        example_kwargs: keyword inputs, if the model takes any.
        dynamic_shapes: ``torch.export`` dynamic-shapes spec (e.g. batch and sequence dynamic).
        backend: ``"eager"`` (run the rewritten graph), ``"inductor"`` (compile it) or ``"triton"``
            (a generated Triton kernel per fused region; CUDA, or the Triton interpreter).
        backend_options: keyword options for the backend (e.g. ``{"kinds": ("pointwise", "norm")}``
            for triton).
        verify: check every pass numerically (and the backend against the graph).
        strict: raise on a failing pass instead of rolling it back.
        log: receives progress messages.
        observers: ``fn(record, graph_before, graph_after)`` called after each pass.
        name: the model's name in the report.
    """
    if example_inputs is None and not example_kwargs:
        raise ValueError("optimize needs example_inputs (and/or example_kwargs) to capture and verify the model")
    args, kwargs = normalize_args(example_inputs), dict(example_kwargs or {})
    manager = PassManager(passes, verify=verify, strict=strict, log=log, observers=observers)
    compile_graph = get_backend(backend)  # unknown backends fail before the slow part
    if log:
        log(f"capturing {name or type(model).__name__}")
    gm = capture(model, args, kwargs, dynamic_shapes)
    report = Report(model=name or type(model).__name__, capture=gm.meta.get("graphopt_capture", ""))
    gm, report = manager.run(gm, args, kwargs, report)
    if log and backend != "eager":
        log(f"compiling with the {backend} backend")
    compiled = compile_graph(gm, args, kwargs, **(backend_options or {}))
    if verify and compiled.runner is not gm:
        if log:
            log(f"checking the {backend} backend against the optimized graph")
        check_backend(compiled, gm, args, kwargs, report)
    return OptimizedModule(gm, compiled, report, backend)


def save(module: OptimizedModule | GraphModule, path: str, example_inputs: Any, example_kwargs: dict | None = None, dynamic_shapes: Any = None) -> None:
    """Save an optimized graph as a ``torch.export`` archive (``.pt2``), loadable without running code.

    Graphs that use ``graphopt::`` ops need ``import graphopt`` before :func:`load` /
    ``torch.export.load``.
    """
    gm = module.graph_module if isinstance(module, OptimizedModule) else module
    args = normalize_args(example_inputs)
    ep = torch.export.export(gm, args, dict(example_kwargs or {}), dynamic_shapes=dynamic_shapes, strict=False)
    torch.export.save(ep, path)


def load(path: str) -> torch.nn.Module:
    """Load an archive written by :func:`save`; returns a callable module."""
    return torch.export.load(path).module()
