"""ONNX export of a graph graphopt captured or rewrote, ``graphopt::`` ops included.

:func:`export_onnx` is the one exporter behind ``graphopt dump`` (``model_before.onnx``,
``model_after.onnx``), ``graphopt export MODEL --onnx out.onnx`` and
``graphopt.save(module, path, example_inputs, format="onnx")``.

It runs ``torch.onnx.export(..., dynamo=True)`` with a ``custom_translation_table`` built from the
op records (:func:`onnx_translation_table`: each ``graphopt::`` op's ``OpRecord.onnx``), so the
ops a pass added become standard ONNX ops or calls of ``graphopt``-domain functions of standard ops.
The exporter's opset conversion inlines every function (onnxscript's version converter only takes
inlined models), so the file holds the functions' bodies: standard ops only, which any ONNX runtime runs. The TorchScript exporter is the fallback for graphs the first one cannot
take (it knows no ``graphopt::`` op). Dims that are symbolic in the graph (batch, sequence) stay
dynamic axes of the ONNX model.

Both exporters talk: warnings, logs, and the TorchScript exporter prints its IR to stdout from C++.
All of it is captured at the file-descriptor level and kept only to explain a failure:
:class:`OnnxExportError` holds each exporter's whole error (ANSI colour codes removed) and that output.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.fx import GraphModule

from graphopt.frontends.capture import graph_dynamic_shapes, normalize_args
from graphopt.ir.oprecord import op_records

__all__ = ["OnnxExportError", "export_onnx", "onnx_translation_table", "strip_ansi"]

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (the colours of rich-formatted exporter errors)."""
    return _ANSI.sub("", text)


class OnnxExportError(RuntimeError):
    """Neither ONNX exporter produced a model that passes ``onnx.checker``.

    ``str()`` is one line: ``<exporter>: <Type>: <first line of its error>; <exporter>: ...``.
    ``details`` is the whole story: each exporter's full error (traceback-free message, ANSI codes
    removed) and whatever it printed while it ran.
    """

    def __init__(self, summary: str, details: str):
        super().__init__(summary)
        self.summary = summary
        self.details = details


def onnx_translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """``{overload: translation}`` for every overload of every op whose record declares ``onnx``."""
    table = {}
    for record in op_records():
        if record.onnx is None:
            continue
        translation = record.onnx()
        for overload in record.op.overloads():
            table[getattr(record.op, overload)] = translation
    return table


@contextlib.contextmanager
def _captured_output() -> Iterator[io.StringIO]:
    """Everything written to stdout/stderr inside, by Python or by C++, into the yielded buffer."""
    buffer = io.StringIO()
    logger_levels = {name: logging.getLogger(name).level for name in ("torch.onnx", "onnxscript", "torch.export", "torch")}
    for name in logger_levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):  # no such descriptor: nothing to capture there
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
            with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                warnings.simplefilter("ignore")
                yield buffer
        finally:
            with contextlib.suppress(Exception):
                ctypes.CDLL(None).fflush(None)  # C stdio buffers before the descriptors go back
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            for name, level in logger_levels.items():
                logging.getLogger(name).setLevel(level)
            sink.seek(0)
            buffer.write(sink.read().decode(errors="replace"))


def _error_text(exc: BaseException) -> str:
    """The exception's whole message and those of its causes, without ANSI codes."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {strip_ansi(str(exc)).strip()}")
        exc = exc.__cause__ or exc.__context__
    return "\ncaused by ".join(parts)


def _first_line(exc: BaseException) -> str:
    lines = strip_ansi(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Any,
    path: Path | str,
    example_kwargs: dict | None = None,
    *,
    dynamic_shapes: Any = None,
) -> str:
    """Export a graph to a single-file ONNX model at ``path``, checked with ``onnx.checker``.

    Args:
        module: a ``GraphModule`` from :func:`graphopt.capture` or a pass, or an
            :class:`~graphopt.frontends.api.OptimizedModule` (its ``graph_module`` is exported).
        example_inputs, example_kwargs: inputs the graph takes (to trace it once).
        path: the ``.onnx`` file to write (weights embedded: models over ONNX's 2 GB protobuf
            limit cannot be exported this way).
        dynamic_shapes: a ``torch.export`` spec; default: the module's own ``dynamic_shapes``
            attribute if it has one, else every dim symbolic in the graph (:func:`~graphopt.frontends.capture.graph_dynamic_shapes`).

    Returns which exporter worked: ``"torch.export-based exporter"`` or ``"TorchScript exporter"``.
    Nothing is printed. Raises :class:`OnnxExportError` when both fail (nothing is left at ``path`` then).
    """
    import onnx

    gm = getattr(module, "graph_module", module)
    path = Path(path)
    args, kwargs = normalize_args(example_inputs), dict(example_kwargs or {})
    if dynamic_shapes is None:
        dynamic_shapes = getattr(module, "dynamic_shapes", None)
    if dynamic_shapes is None and isinstance(gm, GraphModule):
        dynamic_shapes = graph_dynamic_shapes(gm)
    attempts = (
        ("torch.export-based exporter", {"dynamo": True, "custom_translation_table": onnx_translation_table(), "dynamic_shapes": dynamic_shapes}),
        ("TorchScript exporter", {"dynamo": False}),
    )
    summaries, details = [], []
    for exporter, options in attempts:
        with _captured_output() as output:
            try:
                with torch.no_grad():
                    torch.onnx.export(gm, args, str(path), kwargs=kwargs, external_data=False, verbose=False, **options)
                onnx.checker.check_model(str(path))
                return exporter
            except Exception as e:  # noqa: BLE001 - any failure means: try the next exporter
                error = e
        path.unlink(missing_ok=True)
        summaries.append(f"{exporter}: {_first_line(error)}")
        printed = strip_ansi(output.getvalue()).strip()
        details.append(f"== {exporter} ==\n{_error_text(error)}" + (f"\n\n-- what it printed --\n{printed}" if printed else ""))
    raise OnnxExportError("; ".join(summaries), "\n\n".join(details) + "\n")
