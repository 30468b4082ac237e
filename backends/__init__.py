"""Backends: what runs the optimized canonical graph (installed as ``graphopt.backends``).

A backend is ``fn(gm, example_inputs, example_kwargs) -> callable`` taking and returning what
``gm`` does. Built in:

* ``eager``: the rewritten ``GraphModule`` itself, op by op (every device, no compile time), with
  graphopt's own ops calling their kernels directly;
* ``inductor``: the rewritten graph handed to ``torch.compile(backend="inductor")`` (CPU and GPU).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["available_backends", "get_backend", "register_backend"]

_BACKENDS: dict[str, Callable[..., Callable]] = {}


class UnknownBackendError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register_backend(name: str) -> Callable:
    """Decorator registering ``fn(gm, example_inputs, example_kwargs, **options)`` under ``name``."""

    def wrap(fn):
        _BACKENDS[name] = fn
        return fn

    return wrap


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Callable[..., Callable]:
    if name not in _BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return _BACKENDS[name]


@register_backend("eager")
def eager(gm, example_inputs: Any = (), example_kwargs: Any = None, **options) -> Callable:
    """Run the graph op by op; graphopt ops with a direct kernel (``graphopt.ops.norms.EAGER_FAST_PATHS``)
    call it without going through the dispatcher, in a copy of the graph (``gm`` stays canonical)."""
    from graphopt.ir import clone_graph_module
    from graphopt.ops.norms import EAGER_FAST_PATHS

    if not any(n.op == "call_function" and n.target in EAGER_FAST_PATHS for n in gm.graph.nodes):
        return gm
    runner = clone_graph_module(gm)
    for node in runner.graph.nodes:
        if node.op == "call_function" and node.target in EAGER_FAST_PATHS:
            node.target = EAGER_FAST_PATHS[node.target]
    runner.recompile()
    return runner


@register_backend("inductor")
def inductor(gm, example_inputs: Any = (), example_kwargs: Any = None, **options) -> Callable:
    """Compile the rewritten graph with torch's inductor (lazily, on the first call)."""
    import torch

    return torch.compile(gm, backend="inductor", **options)


from graphopt.backends import triton_backend  # noqa: E402,F401  (registers "triton")
