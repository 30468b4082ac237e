"""The ``Pass`` API and the pass registry.

A pass is a small class: a name, whether it is exact, ordering constraints, its options (a frozen
``Config`` dataclass), an analysis that finds what to rewrite or says *why not*, and a rewrite that
edits the canonical IR in place::

    @graphopt.register_pass
    class DropIdentityViews(graphopt.Pass):
        '''Remove ``aten.view`` nodes whose output shape equals their input shape.'''

        name = "drop_identity_views"
        exact = True

        @dataclass(frozen=True)
        class Config:
            keep_named: bool = False  # DropIdentityViews(keep_named=True) or DropIdentityViews(config=...)

        def analyze(self, gm, ctx):
            views = [n for n in gm.graph.nodes if self.is_identity(n)]
            if not views:
                raise graphopt.NotApplicable("no identity view in the graph")
            return views

        def rewrite(self, gm, views, ctx):
            ...
            return graphopt.PassResult(changed=True, stats={"removed": len(views)})

The pass manager runs ``analyze`` once, on its copy of the graph, and hands the result to
``rewrite``; it takes care of everything around them: dead-code elimination, shape re-propagation,
verification against the outputs before the pass, rollback, and the report. A pass holds no state
of a run: what verification needs from a run (``PassResult.output_masks``) comes back in the result.

Passes written against the earlier protocol, ``applicable(gm) -> (ok, reason)`` and
``run(gm, ctx)``, keep working: the base class's ``analyze`` asks ``applicable`` and its
``rewrite`` calls ``run``. Conversely a pass that defines ``analyze`` / ``rewrite`` still answers
``applicable(gm)`` and ``run(gm, ctx)`` when called directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

from torch.fx import GraphModule

from graphopt.ir import NotApplicable
from graphopt.pipeline.verify import Budget, Exact, MinCosine

__all__ = [
    "NotApplicable",
    "Pass",
    "PassContext",
    "PassNameClashError",
    "PassResult",
    "UnknownPassError",
    "available_passes",
    "default_pass_names",
    "get_pass",
    "make_pass",
    "pass_spec",
    "register_pass",
    "summarize_reasons",
]

REASONS_SHOWN = 3
"""How many reasons :func:`summarize_reasons` spells out before counting the rest."""


def summarize_reasons(reasons: Sequence[str], shown: int = REASONS_SHOWN) -> str:
    """The first ``shown`` reasons joined by ``"; "``, then how many more: ``"a; b; c (+2 more)"``.

    For a pass's message when it leaves several candidates alone, each with its own reason.
    """
    text = "; ".join(reasons[:shown])
    more = len(reasons) - shown
    return text + (f" (+{more} more)" if more > 0 else "")


@dataclass
class PassResult:
    """What a pass's rewrite reports.

    Attributes:
        changed: whether the graph changed (False: the manager keeps the graph before the pass).
        stats: counters for the report.
        message: a sentence for the report (e.g. why some candidates were left alone).
        output_masks: which output positions verification compares, as a function
            ``output_masks(reference, ctx)`` of the graph's outputs before the pass and the context
            they were computed in (its ``example_inputs``); None: every position. A function rather
            than masks because the positions follow the inputs (the pad tokens of a batch):
            :mod:`graphopt.testing` calls it again on inputs the pass never saw. It returns what
            :func:`graphopt.pipeline.verify.resolve_masks` accepts.
    """

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    output_masks: Callable[[Any, PassContext], Any] | None = None


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
        budget: how the manager verifies the pass (default: :class:`graphopt.pipeline.verify.Exact`);
            an approximate pass whose ``Config`` has a ``min_cosine`` option gets
            ``MinCosine(min_cosine)`` per instance.
        default_pipeline: whether an exact pass runs when no pass list is given
            (:func:`default_pass_names`: the CLI without ``--passes``, the fuzzer). False for an
            exact pass that only prepares another one (``smooth_quant`` before ``quantize_int8``)
            and would only add work alone.
        Config: the pass's options, a frozen dataclass (the base one has no field). A pass is built
            as ``P(**options)`` or ``P(config=P.Config(...))``; the instance keeps it as ``config``.
            Frozen, so a pipeline, a report or a search can list, compare and vary options.

    Subclasses implement :meth:`analyze` and :meth:`rewrite` (or, as before, :meth:`applicable`
    and :meth:`run`), keep no state of a run on the instance, and must not modify tensors held by
    the graph in place (use :func:`graphopt.ir.set_tensor` / ``add_constant``): the graph before the
    pass shares them; the pass manager undoes such a write and rolls the pass back.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    budget: Budget = Exact()
    default_pipeline: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Config:
        """No options."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config = cls.__dict__.get("Config")
        if config is not None and not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
            raise TypeError(f"{cls.__name__}.Config must be a frozen dataclass (@dataclass(frozen=True))")

    def __init__(self, *, config: Any = None, **options: Any):
        cls = type(self)
        label = f"pass {cls.name!r}" if cls.name else cls.__name__
        if config is not None:
            if options:
                raise TypeError(f"{label} takes a config or options, not both")
            if not isinstance(config, cls.Config):
                raise TypeError(f"{label} expects a {cls.__name__}.Config, not {type(config).__name__}")
            self.config = config
            self._budget_from_config()
            return
        known = [f.name for f in dataclasses.fields(cls.Config)]
        unknown = [k for k in options if k not in known]
        if unknown:
            takes = f"its options: {', '.join(known)}" if known else "it takes no options"
            raise TypeError(f"{label} got unknown option(s) {', '.join(unknown)}; {takes}")
        try:
            self.config = cls.Config(**options)
        except TypeError as e:  # a required option is missing
            raise TypeError(f"{label}: {e}") from None
        self._budget_from_config()

    def _budget_from_config(self) -> None:
        """An approximate pass whose ``Config`` has a ``min_cosine`` option is verified against it
        (``MinCosine(min_cosine)`` in place of the class's ``budget``)."""
        if not type(self).exact and "min_cosine" in {f.name for f in dataclasses.fields(self.config)}:
            self.budget = MinCosine(self.config.min_cosine)

    # -- the protocol the pass manager uses

    def analyze(self, gm: GraphModule, ctx: PassContext) -> Any:
        """Find what to rewrite in ``gm``; raise :class:`NotApplicable` when there is nothing to do.

        Runs once per pipeline run, on the manager's copy of the graph that :meth:`rewrite` then
        edits, so the result may hold its nodes. ``ctx`` is the context :meth:`rewrite` gets; an
        analysis should not need ``ctx.example_inputs`` (:meth:`applicable` passes an empty
        context). Must not edit ``gm``. The default asks :meth:`applicable` and returns None.
        """
        ok, reason = self.applicable(gm)
        if not ok:
            raise NotApplicable(reason or "not applicable")
        return None

    def rewrite(self, gm: GraphModule, analysis: Any, ctx: PassContext) -> bool | PassResult:
        """Rewrite ``gm`` in place from ``analysis`` (what :meth:`analyze` returned on this ``gm``);
        return whether it changed, or a :class:`PassResult`. It may still raise
        :class:`NotApplicable` (the manager drops its copy and records the reason). The default
        calls :meth:`run`."""
        return self.run(gm, ctx)

    # -- the earlier protocol, and direct calls

    def applicable(self, gm: GraphModule) -> tuple[bool, str]:
        """Whether the pass has anything to do on ``gm`` and, if not, why (one sentence).

        The default runs :meth:`analyze` with an empty :class:`PassContext` when the pass defines
        one, else answers yes.
        """
        if type(self).analyze is Pass.analyze:
            return True, ""
        try:
            self.analyze(gm, PassContext())
        except NotApplicable as e:
            return False, e.reason
        return True, ""

    def run(self, gm: GraphModule, ctx: PassContext) -> bool | PassResult:
        """Rewrite ``gm`` in place; return whether it changed (or a :class:`PassResult`).

        The default is :meth:`analyze` then :meth:`rewrite` (raising :class:`NotApplicable` when
        there is nothing to do), for passes that define them.
        """
        if type(self).rewrite is Pass.rewrite:
            raise NotImplementedError(f"{type(self).__name__} defines neither rewrite nor run")
        return self.rewrite(gm, self.analyze(gm, ctx), ctx)

    def output_masks(self, reference: Any, ctx: PassContext):
        """Which output positions verification compares (None: all). See :func:`graphopt.pipeline.verify.compare`.

        For passes whose positions do not depend on the run; a pass whose positions do returns
        them in :attr:`PassResult.output_masks`, which takes precedence.
        """
        return None

    # -- options

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (its ``config``'s fields), for reports.

        A pass written before ``Config`` (options kept as instance attributes by its own
        ``__init__``) reports its public attributes instead.
        """
        config = self.__dict__.get("config")
        if dataclasses.is_dataclass(config) and dataclasses.fields(config):
            return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "config"}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


_REGISTRY: dict[str, type[Pass]] = {}


class UnknownPassError(KeyError):
    """A pass name that is not registered; the message suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0])


def _source_file(cls: type) -> str | None:
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return os.path.realpath(path) if path else None


class PassNameClashError(ValueError):
    """:func:`register_pass` was given a name another pass class already holds."""


def register_pass(cls: type[Pass] | None = None, *, override: bool = False) -> Any:
    """Class decorator adding a ``Pass`` subclass to the registry under ``cls.name``.

    Used bare (``@register_pass``), called (``register_pass(cls)``), or with options
    (``@register_pass(override=True)``, ``register_pass(cls, override=True)``).

    Args:
        override: replace the pass already registered under the name (a built-in included).

    Raises:
        PassNameClashError: the name is taken by another class and ``override`` is False.
            Registering the same class again is a no-op, and so is a class of the same module and
            qualified name (the same definition run again: a module reloaded or imported under a
            second name), which replaces the earlier one.
        TypeError: not a ``Pass`` subclass with a name, or an approximate pass without a budget.
    """
    if cls is None:
        return lambda c: register_pass(c, override=override)
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise TypeError(f"register_pass expects a Pass subclass with a non-empty name, got {getattr(cls, '__name__', cls)!r}")
    if not cls.exact and isinstance(cls.budget, Exact):
        raise TypeError(f"approximate pass {cls.name!r} must declare a fidelity budget")
    held = _REGISTRY.get(cls.name)
    same_definition = held is not None and (_source_file(held), held.__qualname__) == (_source_file(cls), cls.__qualname__) and _source_file(cls) is not None
    if held is not None and held is not cls and not same_definition and not override:
        raise PassNameClashError(
            f"a pass named {cls.name!r} is already registered ({held.__module__}.{held.__qualname__}); "
            f"choose another name for {cls.__qualname__}, or register it with override=True to replace it"
        )
    _REGISTRY[cls.name] = cls
    return cls


def default_pass_names() -> list[str]:
    """The exact passes that run when no pass list is given, in registry order: every registered
    exact pass whose class keeps ``default_pipeline``."""
    return [name for name, cls in available_passes().items() if cls.exact and cls.default_pipeline]


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


def make_pass(spec: str | dict | Pass | type[Pass], **options: Any) -> Pass:
    """A pass instance from a name, a class, a :func:`pass_spec` dict, or an instance (returned as is).

    The pass manager further refuses a pass without a name, or approximate without a budget."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec(**options)
    if isinstance(spec, str):
        return get_pass(spec)(**options)
    if isinstance(spec, dict):
        if not isinstance(spec.get("pass"), str) or set(spec) - {"pass", "options"}:
            raise TypeError(f'a pass spec is {{"pass": name, "options": {{...}}}}, not {spec!r}')
        return get_pass(spec["pass"])(**{k: _tuples(v) for k, v in (spec.get("options") or {}).items()}, **options)
    raise TypeError(f"a pass is a name, a spec dict, a Pass subclass or a Pass instance, not {type(spec).__name__}")


def pass_spec(p: Pass) -> dict[str, Any]:
    """A pass as plain data, ``{"pass": name, "options": {...}}`` (the options that differ from the
    defaults; tuples as lists), which :func:`make_pass` turns back into an equal pass: what a saved
    pipeline (``passes="auto"``'s choice) is made of."""
    defaults = type(p).Config()
    options = {f.name: getattr(p.config, f.name) for f in dataclasses.fields(p.config) if getattr(p.config, f.name) != getattr(defaults, f.name)}
    return {"pass": p.name, "options": {k: _lists(v) for k, v in options.items()}} if options else {"pass": p.name}


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    # JSON has no tuples; pass options hold sequences as tuples (frozen, hashable configs)
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
