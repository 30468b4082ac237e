"""``graphopt.optimize``: capture, run passes with verification, hand the graph to a backend."""

from __future__ import annotations

import importlib
import json
import os
import zipfile
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule

from graphopt.backends import CompiledGraph, as_compiled, get_backend
from graphopt.frontends.capture import (
    CaptureError,
    CapturedInput,
    auto_dynamic_shapes,
    capture,
    captured_inputs,
    flat_inputs,
    graph_dynamic_shapes,
    normalize_args,
    normalize_batches,
    one_line,
)
from graphopt.frontends.check import check_backend
from graphopt.pipeline.manager import PassManager
from graphopt.pipeline.pass_base import Pass
from graphopt.pipeline.report import Report
from graphopt.pipeline.verify import Budget, MinCosine

__all__ = ["ArchiveError", "InputShapeError", "OptimizedModule", "optimize", "save", "load", "load_program"]


class InputShapeError(ValueError):
    """A call gave an input a size its captured graph holds as a constant (raised before running)."""


class ArchiveError(RuntimeError):
    """An archive cannot be loaded; the message says what to install or import."""


class OptimizedModule(torch.nn.Module):
    """The result of :func:`optimize`: a new module that takes and returns what the original did.

    Attributes:
        graph_module: the rewritten canonical graph (a ``torch.fx.GraphModule``).
        report: the :class:`graphopt.pipeline.report.Report` of the pipeline (prints as a table).
        backend: the name of the backend running it.
        compiled: what the backend made of ``graph_module``, a
            :class:`graphopt.backends.CompiledGraph` (runner, generated kernels, regions left to ATen).
        dynamic_shapes: the ``torch.export`` spec the model was captured with (the caller's, or
            :func:`~graphopt.frontends.capture.auto_dynamic_shapes`), None when captured static;
            :func:`save` reuses it.
        inputs: per graph input, a :class:`~graphopt.frontends.capture.CapturedInput` (shape of the
            example, dims held static) or None for a non-tensor input; ``()`` when unknown.
        shape_note: why the capture is static where dynamic was tried ("" otherwise).

    A call whose tensor inputs differ from the example in a static dim raises
    :class:`InputShapeError` before anything runs, naming the input and the shape it was captured for.

    ``runner`` may be a :class:`~graphopt.backends.CompiledGraph` or any callable running
    ``graph_module`` (taken as one that generated nothing).
    """

    def __init__(
        self,
        graph_module: GraphModule,
        runner: CompiledGraph | Callable,
        report: Report,
        backend: str,
        *,
        dynamic_shapes: Any = None,
        inputs: Sequence[CapturedInput | None] = (),
        shape_note: str = "",
    ):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.backend = backend
        self.dynamic_shapes = dynamic_shapes
        self.inputs = tuple(inputs)
        self.shape_note = shape_note
        # Only inputs with a static dim need checking on every call (a few integer compares).
        self._checked = any(i is not None and i.static_dims for i in self.inputs)
        self.compiled = as_compiled(runner, backend)
        # A runner that is a module (a GraphModule, a compiled module) is a submodule, as it always
        # was: ``.to()``, ``.eval()`` and ``state_dict()`` reach the tensors the backend runs.
        self._runner = self.compiled.runner
        self.tuning = None  # what passes="auto" chose and measured (graphopt.tools.autotune.TuneResult)

    @property
    def kernels(self) -> dict[str, str]:
        """Generated kernel sources by region name (backends that generate code, e.g. ``triton``)."""
        return dict(self.compiled.kernels)

    def forward(self, *args, **kwargs):
        if self._checked:
            self._check_shapes(args, kwargs)
        return self.compiled.runner(*args, **kwargs)

    def _check_shapes(self, args: tuple, kwargs: dict) -> None:
        leaves = flat_inputs(self.graph_module, args, kwargs)
        if leaves is None or len(leaves) != len(self.inputs):
            return  # another input structure: the graph's own call reports it
        for captured, value in zip(self.inputs, leaves):
            if captured is None or not isinstance(value, torch.Tensor):
                continue
            shape = tuple(value.shape)
            if len(shape) == len(captured.shape) and all(shape[i] == captured.shape[i] for i in captured.static_dims):
                continue
            raise InputShapeError(_shape_message(captured, shape, self.shape_note))


def _shape_message(captured: CapturedInput, shape: tuple, note: str) -> str:
    """One line: which input, captured for what, which dims are fixed, and what to pass instead."""
    fixed = [i for i in captured.static_dims if i >= len(shape) or shape[i] != captured.shape[i]] or list(captured.static_dims)
    why = f" ({note})" if note else ""
    if any(captured.shape[i] == 1 for i in fixed) and not note:
        why = " (torch.export always fixes a dim that is 1 in the example: capture with a larger example)"
    wanted = ", ".join(f"{i}: Dim.AUTO" for i in fixed)
    return (
        f"input {captured.name!r} was captured for {list(captured.shape)} and got {list(shape)}: "
        f"dim{'s' if len(fixed) > 1 else ''} {', '.join(map(str, fixed))} {'are' if len(fixed) > 1 else 'is'} fixed in the graph{why}; "
        f"pass dynamic_shapes=… to optimize (e.g. {{{captured.name!r}: {{{wanted}}}}})"
    )


def optimize(
    model: torch.nn.Module,
    passes: Iterable[str | Pass | type[Pass]] = (),
    example_inputs: Any = None,
    *,
    example_kwargs: dict | None = None,
    dynamic_shapes: Any = "auto",
    backend: str = "eager",
    backend_options: dict | None = None,
    verify: bool = True,
    strict: bool = False,
    log: Callable[[str], None] | None = None,
    observers: Sequence[Callable] = (),
    name: str = "",
    calibration: Sequence[Any] = (),
    budget: Budget | None = None,
    time_limit: float = 600.0,
) -> OptimizedModule:
    """Optimize ``model`` with ``passes``; the original model is left exactly as it was.

    Args:
        model: the ``nn.Module`` to optimize.
        passes: pass names (see ``graphopt passes``), ``Pass`` classes or instances, or
            ``{"pass": name, "options": {...}}`` dicts, mixed freely; a single name
            (``passes="fold_batchnorm"``), class or instance is one pass. ``"auto"``: search the
            approximate passes' per-layer settings for the fastest pipeline within ``budget``
            (:func:`graphopt.tools.autotune.tune`, on ``calibration``; the result is the module's
            ``tuning``). A path to a ``.json`` file: the pipeline a search saved.
        example_inputs: positional inputs (a tuple, or one tensor) used to capture and to verify.
        example_kwargs: keyword inputs, if the model takes any.
        dynamic_shapes: ``torch.export`` dynamic-shapes spec; ``"auto"`` (default): batch and
            sequence dims dynamic where the model allows it
            (:func:`~graphopt.frontends.capture.auto_dynamic_shapes`), static if that capture
            fails (the reason is in ``shape_note`` and the report's capture line); None: static.
            Static dims are checked on every call (:class:`InputShapeError`).
        backend: ``"eager"`` (run the rewritten graph), ``"inductor"`` (compile it) or ``"triton"``
            (a generated Triton kernel per fused region; CUDA, or the Triton interpreter).
        backend_options: keyword options for the backend (e.g. ``{"kinds": ("pointwise", "norm")}``
            for triton, ``{"dynamic": False}`` for inductor kernels compiled per input shape).
        verify: check every pass numerically (and the backend against the graph).
        strict: raise on a failing pass instead of rolling it back.
        log: receives progress messages.
        observers: ``fn(record, graph_before, graph_after)`` called after each pass.
        name: the model's name in the report.
        calibration: more inputs for the passes that calibrate on data (``quantize_int8``'s
            outliers and fallback, ``smooth_quant``), each a tuple of positional inputs (or one
            tensor) or an ``(args, kwargs)`` pair; the example inputs are always among them.
            With ``passes="auto"`` the inputs the search measures fidelity on (every third batch
            held out to check the choice).
        budget: ``passes="auto"`` only: the fidelity the choice keeps, ``MinCosine(0.995)`` when None,
            or ``MinAgreement(...)`` on the top-1 class.
        time_limit: ``passes="auto"`` only: the search's limit in seconds.
    """
    if example_inputs is None and not example_kwargs:
        raise ValueError("optimize needs example_inputs (and/or example_kwargs) to capture and verify the model")
    if isinstance(passes, str) and passes == "auto":
        from graphopt.tools.autotune import tune

        budget = budget if budget is not None else MinCosine(0.995)
        tuning = tune(model, example_inputs, budget=budget, calibration=calibration, example_kwargs=example_kwargs, time_limit=time_limit, log=log)
        optimized = optimize(
            model, tuning.passes, example_inputs, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes, backend=backend,
            backend_options=backend_options, verify=verify, strict=strict, log=log, observers=observers, name=name, calibration=calibration,
        )  # fmt: skip
        optimized.tuning = tuning
        optimized.report.final["auto"] = tuning.summary().splitlines()[0]
        return optimized
    if budget is not None:
        raise ValueError("budget is the search's (passes='auto'); a pass's own budget is its option, e.g. QuantizeInt8(min_cosine=0.99)")
    if isinstance(passes, (str, os.PathLike)) and str(passes).endswith(".json"):
        from graphopt.tools.autotune import load_config

        passes = load_config(passes)
    args, kwargs = normalize_args(example_inputs), dict(example_kwargs or {})
    manager = PassManager(passes, verify=verify, strict=strict, log=log, observers=observers)
    compile_graph = get_backend(backend)  # unknown backends fail before the slow part
    if log:
        log(f"capturing {name or type(model).__name__}")
    gm, dynamic_shapes, shape_note = _capture(model, args, kwargs, dynamic_shapes, log)
    inputs = captured_inputs(gm)
    report = Report(model=name or type(model).__name__, capture=_capture_line(gm, inputs, shape_note))
    batches = normalize_batches(calibration)
    gm, report = manager.run(gm, args, kwargs, report, calibration=batches)
    if log and backend != "eager":
        log(f"compiling with the {backend} backend")
    compiled = compile_graph(gm, args, kwargs, **(backend_options or {}))
    if verify and compiled.runner is not gm:
        if log:
            log(f"checking the {backend} backend against the optimized graph")
        check_backend(compiled, gm, args, kwargs, report)
    return OptimizedModule(gm, compiled, report, backend, dynamic_shapes=dynamic_shapes, inputs=inputs, shape_note=shape_note)


def _capture(model, args, kwargs, dynamic_shapes, log) -> tuple[GraphModule, Any, str]:
    """Capture with the caller's spec, or with ``Dim.AUTO`` batch/sequence dims falling back to a
    static capture; returns the graph, the spec it was captured with, and why it is static."""
    if not (isinstance(dynamic_shapes, str) and dynamic_shapes == "auto"):
        return capture(model, args, kwargs, dynamic_shapes), dynamic_shapes, ""
    try:
        spec = auto_dynamic_shapes(model, args, kwargs)
        return capture(model, args, kwargs, spec, fallback=False), spec, ""
    except (CaptureError, TypeError, ValueError) as error:
        note = f"dynamic capture failed: {one_line(error)}"
        if log:
            log(f"{note}; capturing static shapes")
        return capture(model, args, kwargs, None), None, note


def _capture_line(gm: GraphModule, inputs: Sequence[CapturedInput | None], note: str) -> str:
    """The report's capture line: the road, and each tensor input's shape with dynamic dims as ``*``."""
    shapes = ", ".join(f"{i.name}[{', '.join('*' if d in i.dynamic_dims else str(n) for d, n in enumerate(i.shape))}]" for i in inputs if i is not None)
    line = gm.meta.get("graphopt_capture", "")
    if shapes:
        line += f" ({shapes})"
    return line + (f"; {note}" if note else "")


def save(
    module: OptimizedModule | GraphModule,
    path: str,
    example_inputs: Any,
    example_kwargs: dict | None = None,
    dynamic_shapes: Any = None,
    *,
    format: str = "pt2",
) -> None:
    """Save an optimized graph as a ``torch.export`` archive (``.pt2``), loadable without running code.

    ``format="onnx"`` writes an ONNX model instead (weights embedded, ``graphopt::`` ops translated
    as their op records declare, the same dynamic axes; see
    :func:`graphopt.frontends.onnx_export.export_onnx`, whose ``OnnxExportError`` it raises).

    ``dynamic_shapes`` None (default) reuses what the graph was captured with: the
    ``dynamic_shapes`` of an :class:`OptimizedModule` from :func:`optimize`, else ``Dim.AUTO`` on
    the graph's symbolic input dims; so the archive runs at the batch and sequence lengths the optimized module did.
    The modules defining the graph's input and output classes (e.g. transformers' ``ModelOutput``
    subclasses, registered as pytree nodes) are recorded in the archive, for :func:`load` to import.

    Graphs that use ``graphopt::`` ops need ``import graphopt`` before ``torch.export.load``
    (:func:`load` has it).
    """
    if format not in ("pt2", "onnx"):
        raise ValueError(f"save: unknown format {format!r}; expected 'pt2' or 'onnx'")
    gm = module.graph_module if isinstance(module, OptimizedModule) else module
    args = normalize_args(example_inputs)
    if dynamic_shapes is None:
        # an OptimizedModule made by other means than optimize (e.g. repbn.finalize) knows no spec
        known = isinstance(module, OptimizedModule) and (module.dynamic_shapes is not None or module.inputs)
        dynamic_shapes = module.dynamic_shapes if known else graph_dynamic_shapes(gm)
    if format == "onnx":
        from graphopt.frontends.onnx_export import export_onnx  # imports onnx only when asked for

        export_onnx(gm, args, path, example_kwargs, dynamic_shapes=dynamic_shapes)
        return
    ep = torch.export.export(gm, args, dict(example_kwargs or {}), dynamic_shapes=dynamic_shapes, strict=False)
    meta = {"pytree_modules": _pytree_modules(ep.call_spec.in_spec) + _pytree_modules(ep.call_spec.out_spec)}
    torch.export.save(ep, path, extra_files={_ARCHIVE_META: json.dumps(meta)})


def load(path: str) -> torch.nn.Module:
    """Load an archive written by :func:`save` or ``torch.export.save``; returns a callable module.

    The module is ``load_program(path).module()`` (:func:`load_program`, which says what it
    imports first and what it raises).
    """
    return load_program(path).module()


def load_program(path: str) -> torch.export.ExportedProgram:
    """Read an archive written by :func:`save` or ``torch.export.save`` as a ``torch.export.ExportedProgram``.

    Besides its ``module()`` (what :func:`load` returns), the program holds the ``example_inputs``
    it was exported with, ``(args, kwargs)`` (None in archives written by older torch versions):
    ``graphopt.optimize(program.module(), passes, args, example_kwargs=kwargs)`` optimizes it again.

    First imports the modules :func:`save` recorded as defining the graph's input and output
    classes (their import registers them with ``torch.utils._pytree``), so e.g. a Hugging Face
    model's archive loads without importing ``transformers`` first.

    Raises:
        ArchiveError: ``path`` is not a ``torch.export`` archive (not a zip file, or a zip without
            the ``archive_format`` or ``version`` entry ``torch.export.save`` writes); a recorded
            module cannot be imported; or (an archive without that record) an input or output class
            is not registered. The message is one line, naming what to install or import.
    """
    for name in dict.fromkeys(_archive_meta(path).get("pytree_modules", [])):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ArchiveError(
                f"{path}: the graph's inputs or outputs are classes from {name!r}, which cannot be imported ({one_line(error)}); install it"
            ) from error
    try:
        return torch.export.load(path)
    except Exception as error:  # noqa: BLE001 - an unregistered pytree class shows as many kinds of error
        if "serializ" in str(error) or "pytree" in str(error).lower():
            # torch logs the class it could not find above its own one-line error
            raise ArchiveError(
                f"{path}: {one_line(error)}; if the log names a class 'not registered' in pytree, import the module that defines it (e.g. transformers) before loading"
            ) from error
        raise


_ARCHIVE_META = "graphopt.json"  # graphopt's record in the archive's extra files


def _archive_meta(path: str) -> dict:
    """The record :func:`save` wrote in the archive, read straight from the zip (before anything is
    deserialized: that needs the classes it names); ``{}`` for an archive without one.

    Raises:
        ArchiveError: ``path`` is not a zip file, or a zip (e.g. a ``torch.save`` checkpoint) with
            neither the ``<root>/archive_format`` entry of a ``torch.export`` archive nor the
            ``version`` entry of the zip layout torch 2.7 wrote.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name == "version" or name.endswith("/archive_format") for name in names):
                raise ArchiveError(f"{path}: not a torch.export archive (a zip file without the archive_format entry torch.export.save writes)")
            for name in names:
                if name.endswith(f"extra/{_ARCHIVE_META}"):
                    return json.loads(archive.read(name))
    except zipfile.BadZipFile as error:
        raise ArchiveError(f"{path}: not a torch.export archive ({one_line(error)})") from error
    except json.JSONDecodeError:
        pass
    return {}


def _pytree_modules(spec) -> list[str]:
    """Modules (outside Python and torch) defining the node classes of a pytree ``TreeSpec``."""
    found: list[str] = []
    stack = [spec]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        module = getattr(node.type, "__module__", None) if node.type is not None else None
        if module and module.split(".")[0] not in ("builtins", "collections", "torch", "typing"):
            found.append(module)
        stack.extend(node.children())
    return sorted(set(found))
