"""Backends: what runs the optimized canonical graph (installed as ``graphopt.backends``).

A backend is registered as ``fn(gm, example_inputs, example_kwargs, **options)`` and returns a
:class:`CompiledGraph`: the callable that takes and returns what ``gm`` does, with the kernels it
generated and the regions it left to ATen and why. :func:`get_backend` gives the registered function
with its result made a :class:`CompiledGraph`, so a backend that returns a plain callable (a user's,
registered with :func:`register_backend`) works as well. Built in:

* ``eager``: the rewritten ``GraphModule`` itself, op by op (every device, no compile time), with
  graphopt's own ops calling their kernels directly;
* ``inductor``: the rewritten graph handed to ``torch.compile(backend="inductor")`` (CPU and GPU);
* ``triton``: each fused region of the graph as a generated Triton kernel
  (:mod:`graphopt.backends.triton_backend`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

__all__ = ["CompiledGraph", "as_compiled", "available_backends", "get_backend", "register_backend"]

_BACKENDS: dict[str, Callable[..., Any]] = {}


@dataclasses.dataclass
class CompiledGraph:
    """What a backend made of an optimized graph: the callable that runs it and what it generated.

    Calling it calls ``runner``. Frontends (``optimize``, ``dump``, the ``torch.compile`` backend,
    the CLI) read these fields and nothing else of a backend's result.

    Attributes:
        runner: takes and returns what the graph does (pytree in, pytree out). It may be the graph
            itself (``eager`` with nothing to swap), which needs no check against the graph.
        backend: the name the backend is registered under.
        kernels: region name -> source of the kernel generated for it (``{}``: none generated).
        left_to_aten: region name -> why that region runs as ATen ops rather than as a kernel.
        regions: region name -> kind (``pointwise``, ``norm``, ``matmul_epilogue``, ...) for every
            region the backend cut the graph into, lowered or not, in graph order.
        generates_code: whether the backend generates kernels. Then ``kernels`` and
            ``left_to_aten`` together cover ``regions``, and ``runner`` is a ``GraphModule`` with
            one submodule per region under its name: a module whose ``region`` attribute is the
            region's ATen ``GraphModule`` (lowered), or that ``GraphModule`` itself (left to ATen).
    """

    runner: Callable[..., Any]
    backend: str = ""
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    left_to_aten: dict[str, str] = dataclasses.field(default_factory=dict)
    regions: dict[str, str] = dataclasses.field(default_factory=dict)
    generates_code: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner(*args, **kwargs)


def as_compiled(result: Any, backend: str = "") -> CompiledGraph:
    """``result`` as a :class:`CompiledGraph`: itself (its ``backend`` filled in when empty), or a
    plain callable wrapped as one that generated nothing.

    Raises:
        TypeError: ``result`` is neither.
    """
    if isinstance(result, CompiledGraph):
        return result if result.backend or not backend else dataclasses.replace(result, backend=backend)
    if not callable(result):
        raise TypeError(f"backend {backend!r} returned a {type(result).__name__}, neither a CompiledGraph nor a callable")
    return CompiledGraph(result, backend)


class UnknownBackendError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register_backend(name: str) -> Callable:
    """Decorator registering ``fn(gm, example_inputs, example_kwargs, **options)`` under ``name``;
    ``fn`` returns a :class:`CompiledGraph`, or any callable that runs ``gm`` (wrapped as one)."""

    def wrap(fn):
        _BACKENDS[name] = fn
        return fn

    return wrap


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Callable[..., CompiledGraph]:
    """The backend registered as ``name``, as ``fn(gm, example_inputs=(), example_kwargs=None,
    **options) -> CompiledGraph`` (see :func:`as_compiled`).

    Raises:
        UnknownBackendError: no backend has that name (a ``KeyError``).
    """
    if name not in _BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    backend = _BACKENDS[name]

    @functools.wraps(backend)
    def compile_graph(gm: Any, example_inputs: Any = (), example_kwargs: Any = None, **options: Any) -> CompiledGraph:
        return as_compiled(backend(gm, example_inputs, example_kwargs, **options), name)

    return compile_graph


@register_backend("eager")
def eager(gm, example_inputs: Any = (), example_kwargs: Any = None, **options) -> CompiledGraph:
    """Run the graph op by op; custom ops with a direct kernel (their record's ``eager_fast_path``)
    call it without going through the dispatcher, in a copy of the graph (``gm`` stays canonical)."""
    from graphopt.ir import clone_graph_module
    from graphopt.ir.oprecord import op_record

    def fast_path(node):
        record = op_record(node.target) if node.op == "call_function" else None
        return record.eager_fast_path if record is not None else None

    if not any(fast_path(n) is not None for n in gm.graph.nodes):
        return CompiledGraph(gm, "eager")
    runner = clone_graph_module(gm)
    for node in runner.graph.nodes:
        direct = fast_path(node)
        if direct is not None:
            node.target = direct
    runner.recompile()
    return CompiledGraph(runner, "eager")


@register_backend("inductor")
def inductor(gm, example_inputs: Any = (), example_kwargs: Any = None, *, dynamic: bool | None = None, **options) -> CompiledGraph:
    """Compile the rewritten graph with torch's inductor (lazily, on the first call).

    Args:
        dynamic: ``torch.compile``'s shape mode. ``False``: kernels for the exact shapes of each
            call, compiled again for every new input shape (and, past dynamo's
            ``recompile_limit`` shapes, the graph runs uncompiled); ``True``: one compile with
            symbolic sizes; ``None`` (default): torch's own, static at the first shape and
            symbolic from the second. The graph itself keeps the sizes it was captured with
            either way (see ``graphopt.optimize``'s ``dynamic_shapes``). Measured on the real
            MiniLM (bench/inductor_shapes.py, 1 CPU thread), static and symbolic kernels ran
            within the run's noise of each other (±5 %), while each new shape cost ~18 s of
            compilation in static mode; hence torch's default, which compiles at most twice.
        options: the other keyword arguments of ``torch.compile`` (``mode``, ``options``, ...).
    """
    import torch

    return CompiledGraph(torch.compile(gm, backend="inductor", dynamic=dynamic, **options), "inductor")


from graphopt.backends import triton_backend  # noqa: E402,F401  (registers "triton")
