"""The ``Pass`` API and the pass registry.

A pass is a small class: a name, whether it is exact, ordering constraints, an applicability check
that says *why not*, and a rewrite that edits the canonical IR in place::

    @graphopt.register_pass
    class DropIdentityViews(graphopt.Pass):
        '''Remove ``aten.view`` nodes whose output shape equals their input shape.'''

        name = "drop_identity_views"
        exact = True

        def applicable(self, gm):
            found = any(self.is_identity(n) for n in gm.graph.nodes)
            return found, "" if found else "no identity view in the graph"

        def run(self, gm, ctx):
            ...
            return graphopt.PassResult(changed=True, stats={"removed": k})

The pass manager takes care of everything around ``run``: dead-code elimination, shape
re-propagation, verification against the outputs before the pass, rollback, and the report.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch.fx import GraphModule

from graphopt.pipeline.verify import Budget, Exact

__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "UnknownPassError",
    "available_passes",
    "get_pass",
    "make_pass",
    "register_pass",
]


@dataclass
class PassResult:
    """What a pass's ``run`` reports: whether it changed the graph, and counters for the report."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    message: str = ""


@dataclass
class PassContext:
    """What a pass may consult while it runs.

    Attributes:
        example_inputs: the positional example inputs the graph was captured with.
        example_kwargs: keyword example inputs.
        reference: the graph's outputs on the example inputs before this pass ran.
        log: a callable taking a progress message (shown by the CLI).
        state: a dict shared by all passes of one run (e.g. analyses an earlier pass computed).
    """

    example_inputs: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    reference: Any = None
    log: Any = print
    state: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of graph rewrites.

    Class attributes:
        name: the registry name (``snake_case``).
        exact: True when the rewrite computes the same function up to rounding; False for an
            approximation, which must then set ``budget`` to its declared fidelity budget.
        requires: names of passes that must run before this one; the manager adds them to the
            pipeline when missing.
        after: names of passes that, when present in the pipeline, run before this one.
        budget: how the manager verifies the pass (default: :class:`graphopt.pipeline.verify.Exact`).

    Subclasses take their options as constructor keyword arguments and must not modify tensors
    held by the graph in place (use :func:`graphopt.ir.set_tensor` / ``add_constant``).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    budget: Budget = Exact()

    def applicable(self, gm: GraphModule) -> tuple[bool, str]:
        """Whether the pass has anything to do on ``gm`` and, if not, why (one sentence)."""
        return True, ""

    def run(self, gm: GraphModule, ctx: PassContext) -> bool | PassResult:
        """Rewrite ``gm`` in place; return whether it changed (or a :class:`PassResult`)."""
        raise NotImplementedError

    def output_masks(self, reference: Any, ctx: PassContext):
        """Which output positions verification compares (None: all). See :func:`graphopt.pipeline.verify.compare`."""
        return None

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (for reports)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


_REGISTRY: dict[str, type[Pass]] = {}


class UnknownPassError(KeyError):
    """A pass name that is not registered; the message suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a ``Pass`` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise TypeError("register_pass expects a Pass subclass with a non-empty name")
    if not cls.exact and isinstance(cls.budget, Exact):
        raise TypeError(f"approximate pass {cls.name!r} must declare a fidelity budget")
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass class by name, sorted by name."""
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; :class:`UnknownPassError` names close matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_REGISTRY))}"
        raise UnknownPassError(f"unknown pass {name!r}{hint}")
    return _REGISTRY[name]


def make_pass(spec: str | Pass | type[Pass], **options: Any) -> Pass:
    """A pass instance from a name, a class, or an instance (returned as is)."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec(**options)
    if isinstance(spec, str):
        return get_pass(spec)(**options)
    raise TypeError(f"a pass is a name, a Pass subclass or a Pass instance, not {type(spec).__name__}")
