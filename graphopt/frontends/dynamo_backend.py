"""``torch.compile`` backend: graphopt's verified passes on every graph dynamo captures.

Usage::

    import torch

    fast = torch.compile(model, backend="graphopt")  # found through the package's entry point
    fast = torch.compile(model, backend="graphopt", options={"passes": ["fold_batchnorm"], "backend": "inductor"})
    fast = torch.compile(model, backend="graphopt", options={"backend": "triton"})  # CUDA, or TRITON_INTERPRET=1
    with torch.no_grad():
        y = fast(x)

    import graphopt

    backend = graphopt.compile_backend(passes=["canonicalize", "fold_batchnorm"], log=print)
    fast = torch.compile(model, backend=backend)
    with torch.no_grad():
        fast(x)
    print(backend.reports[-1])  # what the last compiled graph got

Options (the ``options`` dict, or the keywords of :func:`compile_backend`): ``passes`` (default:
``canonicalize`` and ``fold_batchnorm``, those of them that are registered), ``backend``
(``"eager"``, ``"inductor"`` or ``"triton"``, see :mod:`graphopt.backends`; inductor is called
through ``compile_fx`` here, as the registry's lazy ``torch.compile`` would not compile inside
dynamo's compiled code), ``backend_options`` (keywords for the registry backend, e.g.
``{"interpret": True}`` for triton; not for inductor), ``verify``, ``strict``, ``log``. A backend
that generates kernels (triton) puts their count in the graph's report (``final["kernels"]``).

What happens to one graph. Dynamo hands over a torch-level ``GraphModule`` whose inputs include the
model's parameters and buffers (``inline_inbuilt_nn_modules``). Those are frozen: held as attributes
of a wrapper module that takes only the other inputs, which :func:`graphopt.capture` turns into the
canonical ATen IR with them as ``get_attr`` constants, so that weight-rewriting passes such as
``fold_batchnorm`` apply. Float attributes of modules (``eps``, dropout ``p``), which
``torch.compile(dynamic=True)`` turns into inputs, are frozen too. The
:class:`graphopt.PassManager` runs and verifies the passes on the real inputs of the call that
triggered compilation, the chosen backend compiles the result, and the returned callable keeps
dynamo's calling convention (every original input, in order; the frozen ones are checked, not
used).

Freezing is an inference optimization (like inductor's ``freezing``), so dynamo's own graph is
returned unchanged, with a one-line reason in the log and in the graph's report, when:

* autograd is recording (grad mode on and some input requires grad): run under ``torch.no_grad()``
  or ``torch.inference_mode()`` to get the optimized graph;
* the graph writes to its inputs or constants in place (BatchNorm in training mode, counters);
* a symbolic int input is not the size of a tensor input, or an example input is fake;
* capture or verification fails (with ``strict=True``, such failures raise instead).

Dynamic shapes: after a shape change dynamo recompiles with symbolic sizes; those dimensions are
captured as ``Dim.DYNAMIC`` (export fails rather than specialize them, and that falls back) and the
symbolic int inputs are recomputed from the tensors' sizes. If a frozen parameter or buffer is
changed in place or replaced after compilation (or a frozen float changed), the callable notices
(version counter, identity, value) and runs dynamo's graph from then on; ``torch._dynamo.reset()``
optimizes again.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule, Node

from graphopt import ir
from graphopt.backends import CompiledGraph, get_backend
from graphopt.frontends.capture import capture, one_line
from graphopt.frontends.check import check_backend
from graphopt.pipeline.manager import PassManager, run_graph
from graphopt.pipeline.pass_base import Pass, available_passes
from graphopt.pipeline.report import Report
from graphopt.pipeline.verify import Exact, compare

__all__ = ["DEFAULT_PASSES", "GraphoptBackend", "compile_backend", "graphopt_backend"]

_log = logging.getLogger(__name__)

DEFAULT_PASSES = ("canonicalize", "fold_batchnorm")
_OPTION_NAMES = ("passes", "backend", "backend_options", "verify", "strict", "log")


def graphopt_backend(gm: GraphModule, example_inputs: Sequence[Any], options: dict | None = None) -> Callable:
    """The function dynamo calls for ``torch.compile(m, backend="graphopt", options={...})``."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown graphopt option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(_OPTION_NAMES)}")
    return compile_backend(**options)(gm, example_inputs)


def compile_backend(
    passes: Iterable[str | Pass | type[Pass]] | None = None,
    backend: str = "eager",
    backend_options: dict | None = None,
    verify: bool = True,
    strict: bool = False,
    log: Callable[[str], None] | None = None,
) -> GraphoptBackend:
    """A backend for ``torch.compile(m, backend=compile_backend(...))``; see the module docstring.

    Args:
        passes: pass names, classes or instances; None for the registered :data:`DEFAULT_PASSES`.
        backend: the graphopt backend that runs the optimized graph (``"eager"``, ``"inductor"``,
            ``"triton"``).
        backend_options: keyword options for that backend (e.g. ``{"interpret": True}`` for
            triton); inductor, called as ``compile_fx`` inside dynamo, takes none.
        verify: check the capture, every pass and the backend on the real example inputs.
        strict: raise when a pass fails or a graph cannot be optimized because something failed,
            instead of rolling back / running dynamo's graph.
        log: receives progress messages and the reason of every fallback.

    Returns:
        A :class:`GraphoptBackend`; its ``reports`` list gets one report per compiled graph.
    """
    return GraphoptBackend(passes, backend=backend, backend_options=backend_options, verify=verify, strict=strict, log=log)


class _CannotOptimize(Exception):
    """The graph is outside what freezing supports; dynamo's own graph runs instead."""


class GraphoptBackend:
    """A dynamo backend, ``backend(gm, example_inputs) -> callable``, that runs graphopt passes.

    Attributes:
        reports: one :class:`graphopt.Report` per graph compiled so far; a graph left to dynamo
            has no records and ``final["fallback"]`` says why.
    """

    def __init__(
        self,
        passes: Iterable[str | Pass | type[Pass]] | None = None,
        *,
        backend: str = "eager",
        backend_options: dict | None = None,
        verify: bool = True,
        strict: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        if backend == "inductor" and backend_options:
            raise ValueError("backend_options are not supported for inductor inside torch.compile (it is called as compile_fx)")
        if isinstance(passes, (str, Pass)):  # one pass (a name is not a list of its characters)
            passes = [passes]
        self.passes = list(passes) if passes is not None else [p for p in DEFAULT_PASSES if p in available_passes()]
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.verify = verify
        self.strict = strict
        self.log = log or (lambda msg: None)
        self.reports: list[Report] = []
        # Unknown backends and passes fail here, when the backend is made, rather than mid-compile.
        self._compile = get_backend(backend)
        PassManager(self.passes)

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        compile_id = gm.meta.get("dynamo_compile_id")
        report = Report(model=f"dynamo graph {compile_id}" if compile_id is not None else "dynamo graph")
        self.reports.append(report)
        example_inputs = list(example_inputs)
        try:
            # Dynamo's tracing context (fake mode, shape env) is active while it calls a backend;
            # export and shape propagation must not see it, or they add guards to dynamo's frame.
            with torch._guards.tracing(None):
                optimized, split = self._optimize(gm, example_inputs, report)
            return self._lower(gm, optimized, split, example_inputs, report)
        except _CannotOptimize as e:
            return self._fall_back(gm, report, str(e))
        except Exception as e:  # noqa: BLE001 - any failure leaves the graph to dynamo
            if self.strict:
                raise
            return self._fall_back(gm, report, one_line(e))

    def _fall_back(self, gm: GraphModule, report: Report, reason: str) -> Callable:
        self._note_fallback(report, reason)
        return gm.forward

    def _note_fallback(self, report: Report, reason: str) -> None:
        report.final["fallback"] = reason
        message = f"graphopt: {report.model} left to dynamo: {reason}"
        _log.warning(message)
        self.log(message)

    def _optimize(self, gm: GraphModule, example_inputs: list, report: Report) -> tuple[GraphModule, _InputSplit]:
        """Freeze the module state, capture the canonical graph and run the passes on it."""
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
            raise _CannotOptimize("autograd is recording; run under torch.no_grad() or torch.inference_mode() to optimize")
        split = _split_inputs(gm, example_inputs)
        wrapper = _FrozenGraph(gm, split.slots, split.constants)
        user_inputs = [example_inputs[i] for i in split.user_positions]
        dynamic = any(split.dynamic_dims)
        canonical = capture(
            wrapper,
            tuple(user_inputs),
            dynamic_shapes=(tuple({d: torch.export.Dim.DYNAMIC for d in dims} for dims in split.dynamic_dims),) if dynamic else None,
            fallback=not dynamic,  # the symbolic_trace road specializes every size
        )
        report.capture = canonical.meta.get("graphopt_capture", "")
        written = ir.in_place_writes(canonical)
        if written["buffers"] or written["inputs"]:
            raise _CannotOptimize(f"the graph modifies {', '.join(written['buffers'] + written['inputs'])} in place")
        if self.verify:
            check = compare(run_graph(canonical, user_inputs), run_graph(wrapper, user_inputs), Exact())
            if not check.ok:
                raise RuntimeError(f"the captured graph does not reproduce dynamo's graph: {check}")
        manager = PassManager(self.passes, verify=self.verify, strict=self.strict, log=self.log)
        optimized, _ = manager.run(canonical, user_inputs, report=report)
        return optimized, split

    def _lower(self, gm: GraphModule, optimized: GraphModule, split: _InputSplit, example_inputs: list, report: Report) -> Callable:
        """Hand the optimized graph to the backend and wrap it in dynamo's calling convention."""
        user_inputs = [example_inputs[i] for i in split.user_positions]
        expected = run_graph(optimized, user_inputs) if self.verify else None
        if self.backend == "inductor":
            # The registry's inductor backend wraps the graph in torch.compile, which does not
            # compile when called from code dynamo compiled. Inside dynamo, inductor is called
            # directly, in dynamo's tracing context, so that it sees the same symbolic sizes.
            from torch._inductor.compile_fx import compile_fx

            compiled = CompiledGraph(compile_fx(optimized, user_inputs), "inductor")
        else:
            compiled = self._compile(optimized, tuple(user_inputs), {}, **self.backend_options)
        if self.verify:
            check_backend(compiled, optimized, user_inputs, {}, report, expected=expected)
        report.final["backend"] = self.backend
        kernels = ""
        if compiled.generates_code:
            regions = len(compiled.kernels) + len(compiled.left_to_aten)
            report.final["kernels"] = f"{len(compiled.kernels)} of {regions} fused regions: {', '.join(compiled.kernels) or 'none'}"
            kernels = f" ({len(compiled.kernels)} generated kernels)"
        self.log(
            f"graphopt: {report.model}: {len(user_inputs)} inputs, {len(split.frozen_tensors) + len(split.frozen_floats)} frozen constants"
            f"{', dynamic' if any(split.dynamic_dims) else ''}; applied: {', '.join(report.applied) or 'nothing'}; backend {self.backend}{kernels}"
        )
        names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
        return _DynamoCallable(compiled.runner, split, names, gm.forward, on_stale=lambda why: self._note_fallback(report, why))


@dataclass
class _InputSplit:
    """How dynamo's graph inputs map onto frozen constants and the wrapper's own inputs.

    ``slots`` has one entry per dynamo input: ``("constant", attribute)``, ``("float", value,
    dtype)`` (a module's float attribute, which dynamo passes as a 0-d tensor), ``("input", k)``
    (the wrapper's k-th input) or ``("size", k, dim)`` (a symbolic int, ``inputs[k].size(dim)``).
    """

    slots: list[tuple] = field(default_factory=list)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    frozen_tensors: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, tensor)
    frozen_floats: list[tuple[int, float]] = field(default_factory=list)  # (position, value)
    user_positions: list[int] = field(default_factory=list)
    dynamic_dims: list[list[int]] = field(default_factory=list)


def _source(node: Node):
    return getattr(node.meta.get("grapharg"), "source", None)


def _is_module_state(node: Node) -> bool:
    """Whether dynamo read this input out of an ``nn.Module``'s ``_parameters`` or ``_buffers``.

    The input's source is the one criterion that means "a weight of the model": ``isinstance(x,
    nn.Parameter)`` misses buffers (BatchNorm statistics) and also catches parameters passed as call
    arguments, which may differ from call to call; dynamo's static-input mark
    (``_dynamo_static_input_type``) also covers tensors a user marked with ``mark_static_address``,
    such as a static KV cache whose contents change every step.
    """
    from torch._dynamo.source import is_from_unspecialized_param_buffer_source

    source = _source(node)
    return source is not None and is_from_unspecialized_param_buffer_source(source)


def _is_module_float(node: Node) -> bool:
    """Whether this input is a float attribute of an ``nn.Module`` (an ``eps``, a dropout ``p``).

    With ``torch.compile(dynamic=True)`` dynamo stops specializing floats and passes them as 0-d
    tensors that the graph reads with ``.item()``; export cannot branch on such a value (dropout and
    BatchNorm check their arguments), so they are frozen like the weights.
    """
    from torch._dynamo.source import is_from_unspecialized_nn_module_source

    source = _source(node)
    passed_as_tensor = getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False)
    return passed_as_tensor and source is not None and is_from_unspecialized_nn_module_source(source)


def _symbol(value: Any):
    """The sympy expression of a symbolic int, or None for a concrete one."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return None if is_concrete_int(value) else value.node.expr


def _split_inputs(gm: GraphModule, example_inputs: list) -> _InputSplit:
    from torch._subclasses.fake_tensor import is_fake

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _CannotOptimize(f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs")
    split = _InputSplit()
    sizes: dict[Any, tuple[int, int]] = {}  # symbol -> (wrapper input, dim) it is the size of
    for position, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(example, torch.Tensor) and is_fake(example):
            raise _CannotOptimize(f"dynamo passed a fake example for {node.name}; real values are needed to verify")
        if isinstance(example, torch.Tensor) and _is_module_state(node):
            split.slots.append(("constant", node.name))
            split.constants[node.name] = example
            split.frozen_tensors.append((position, example))
        elif isinstance(example, torch.Tensor) and _is_module_float(node):
            split.slots.append(("float", example.item(), example.dtype))
            split.frozen_floats.append((position, example.item()))
        elif isinstance(example, torch.Tensor):
            k = len(split.user_positions)
            split.slots.append(("input", k))
            split.user_positions.append(position)
            fake = node.meta.get("example_value")
            if not isinstance(fake, torch.Tensor):  # without it, symbolic sizes would be specialized
                raise _CannotOptimize(f"graph input {node.name} has no example_value; not a dynamo graph?")
            symbols = [_symbol(s) for s in fake.shape]
            split.dynamic_dims.append([d for d, s in enumerate(symbols) if s is not None])
            for d, s in enumerate(symbols):
                if s is not None:
                    sizes.setdefault(s, (k, d))
        elif isinstance(example, torch.SymInt):
            split.slots.append(("size", node.name, _symbol(example)))  # resolved once all sizes are known
        else:
            raise _CannotOptimize(f"graph input {node.name} is a {type(example).__name__}")
    for i, (kind, *where) in enumerate(split.slots):
        if kind == "size":
            name, symbol = where
            if symbol not in sizes:
                raise _CannotOptimize(f"symbolic int input {name} is not the size of a tensor input")
            split.slots[i] = ("size", *sizes[symbol])
    return split


class _FrozenGraph(torch.nn.Module):
    """Dynamo's graph with its parameters and buffers held as attributes.

    ``forward`` takes only the remaining tensor inputs and rebuilds dynamo's argument list from the
    slots, computing symbolic int inputs from tensor sizes so that export keeps them symbolic.
    """

    def __init__(self, gm: GraphModule, slots: list[tuple], constants: dict[str, torch.Tensor]):
        super().__init__()
        self.graph = gm
        for name, tensor in constants.items():
            if isinstance(tensor, torch.nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor)
        self.slots = slots

    def forward(self, *inputs):
        args = []
        for kind, *where in self.slots:
            if kind == "constant":
                args.append(getattr(self, where[0]))
            elif kind == "float":  # a tensor made here is a constant to export, and so is its item()
                args.append(torch.tensor(where[0], dtype=where[1]))
            elif kind == "input":
                args.append(inputs[where[0]])
            else:
                args.append(inputs[where[0]].size(where[1]))
        return self.graph(*args)


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version  # inference tensors have no version counter


class _DynamoCallable:
    """What dynamo calls: all of its graph's inputs in, the optimized graph's outputs out.

    The frozen inputs are not used, only checked: a parameter or buffer that was replaced or
    modified in place, or a float attribute that was changed, since compilation makes this (and
    every later) call run dynamo's graph.
    """

    def __init__(self, runner: Callable, split: _InputSplit, input_names: list[str], dynamo_forward: Callable, on_stale: Callable[[str], Any]):
        self._runner = runner
        self._input_names = input_names
        self._user_positions = split.user_positions
        self._tensors = [(i, weakref.ref(t), _version(t)) for i, t in split.frozen_tensors]
        self._floats = split.frozen_floats
        self._dynamo_forward = dynamo_forward
        self._on_stale = on_stale
        self._stale = False

    def _changed_input(self, args) -> int | None:
        for i, ref, version in self._tensors:
            if args[i] is not ref() or _version(args[i]) != version:
                return i
        for i, value in self._floats:
            if args[i].item() != value:
                return i
        return None

    def __call__(self, *args):
        if not self._stale:
            changed = self._changed_input(args)
            if changed is not None:
                self._stale = True
                self._on_stale(f"frozen input {self._input_names[changed]} changed after compilation")
        if self._stale:
            return self._dynamo_forward(*args)
        return self._runner(*(args[i] for i in self._user_positions))
