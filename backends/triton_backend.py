"""The ``triton`` backend: the optimized graph run as generated Triton kernels plus library calls.

The method is a fusing compiler's back end (as in inductor or XLA): the graph is cut into fusion
regions by :mod:`graphopt.backends.partition` (each region one ``call_module`` submodule
``fused_<i>``), and each region is lowered by the template for its kind to ONE Triton kernel,
which replaces the region's submodule:

* ``pointwise``: :mod:`~graphopt.backends.triton_codegen` composes one lowering rule per op;
* ``reduction`` / ``norm``: :mod:`~graphopt.backends.triton_rowwise`, a row kernel with the
  region's prologue and epilogue around the reduction;
* ``matmul_epilogue``: :mod:`~graphopt.backends.triton_matmul`, a tiled ``tl.dot`` GEMM with the
  pointwise epilogue applied to the accumulator tile;
* every ``scaled_dot_product_attention`` call becomes an ``attention_<k>`` region run by
  :mod:`~graphopt.backends.triton_attention` (FlashAttention-style online softmax).

Views inside a region stay out of its kernel (:mod:`~graphopt.backends.triton_region`). Whatever
a template cannot lower (an op with no rule, a view with no flat-index form, a shape a launcher
cannot index) keeps running as its ATen submodule, with the reason recorded, and ops in no region
(embeddings, lone matmuls, which the library GEMM serves well, opaque ops) stay ATen calls. So a
model never fails for an op the backend does not know; it only runs it unfused. The backend
returns a :class:`~graphopt.backends.CompiledGraph` whose ``runner`` is the fused ``GraphModule``
(each lowered region a :class:`TritonKernel` submodule), with ``kernels`` (region name -> generated
kernel source), ``left_to_aten`` (region name -> why it runs as ATen ops) and ``regions`` (region
name -> kind).

The kernels need a CUDA device, or the Triton interpreter (``TRITON_INTERPRET=1``, which Triton
reads when a kernel is defined and the launchers read at every call; it must be in the environment
before ``graphopt`` is imported, since importing it imports ``triton``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

from graphopt.backends import CompiledGraph, register_backend
from graphopt.backends.partition import fuse_regions
from graphopt.backends.triton_codegen import NotLowerable
from graphopt.pipeline.manager import run_graph

__all__ = ["KINDS", "Lowering", "TritonKernel", "plan", "triton"]

NO_CUDA = (
    "backend 'triton' needs a CUDA device; on this machine use backend='eager' or backend='inductor' "
    "(or set TRITON_INTERPRET=1 before importing graphopt to run the generated kernels in the Triton interpreter)"
)


class TritonKernel(torch.nn.Module):
    """One fused region run by its generated kernel, or by its ATen ``region`` for inputs the
    launcher cannot index (it raises :class:`NotLowerable` before launching); ``fallback_reason``
    keeps the last such reason. ``kind`` is the region's kind, ``source`` the kernel's source."""

    def __init__(self, launcher: Callable[..., Any], source: str, region: GraphModule, kind: str = "pointwise"):
        super().__init__()
        self.kind = kind
        self.launcher = launcher
        self.source = source
        self.region = region
        self.fallback_reason: str | None = None

    def forward(self, *inputs: torch.Tensor) -> Any:
        try:
            return self.launcher(*inputs)
        except NotLowerable as exc:
            self.fallback_reason = str(exc)
            return self.region(*inputs)


def _interpreting(interpret: bool | None) -> bool:
    in_environment = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret and not in_environment:
        raise RuntimeError("interpret=True needs TRITON_INTERPRET=1 in the environment before graphopt (which imports triton) is imported")
    return in_environment if interpret is None else interpret


def _templates() -> dict[str, tuple[Callable, Callable]]:
    """Region kind -> (source generator, compiler) of the template that lowers it."""
    from graphopt.backends import triton_attention, triton_codegen, triton_matmul, triton_rowwise

    rowwise = (triton_rowwise.row_region_source, triton_rowwise.compile_row_region)
    return {
        "pointwise": (triton_codegen.region_source, triton_codegen.compile_region),
        "reduction": rowwise,
        "norm": rowwise,
        "matmul_epilogue": (triton_matmul.matmul_region_source, triton_matmul.compile_matmul_region),
        "attention": (triton_attention.attention_region_source, triton_attention.compile_attention_region),
    }


KINDS = ("pointwise", "reduction", "norm", "matmul_epilogue", "attention")
"""What the backend lowers: the partitioner's region kinds, and ``attention`` for each
``scaled_dot_product_attention`` call (a fused attention kernel of its own)."""


def _attention_regions(runner: GraphModule) -> None:
    """Turn each attention call of ``runner`` into a ``call_module`` of an ``attention_<k>`` region."""
    from graphopt.backends.triton_attention import attention_inputs, attention_region

    for k, node in enumerate(list(runner.graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default))):
        name = f"attention_{k}"
        region = attention_region(node)
        runner.add_submodule(name, region)
        with runner.graph.inserting_before(node):
            call = runner.graph.call_module(name, tuple(attention_inputs(node)))
        call.meta = dict(node.meta)
        call.meta["region_kind"] = "attention"
        node.replace_all_uses_with(call)
        runner.graph.erase_node(node)
    runner.recompile()


@dataclasses.dataclass
class Lowering:
    """What the backend does with one region: its kind, and the generated kernel's ``source`` or
    the ``reason`` it stays ATen."""

    kind: str
    source: str | None = None
    reason: str | None = None


def plan(gm: GraphModule, kinds: tuple[str, ...] = KINDS) -> tuple[GraphModule, dict[str, Lowering]]:
    """The fused runner of ``gm`` (each region a ``fused_<i>`` submodule, each attention call an
    ``attention_<k>`` one) and, per region, its :class:`Lowering`. Only sources are generated:
    nothing is compiled or run, so this needs no GPU (``bench/fusion.py`` counts with it)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown region kind(s) {', '.join(unknown)}; the triton backend lowers {', '.join(KINDS)}")
    runner = fuse_regions(gm)
    if "attention" in kinds:
        _attention_regions(runner)
    templates = _templates()
    lowerings: dict[str, Lowering] = {}
    for node in runner.graph.nodes:
        if node.op != "call_module" or "region_kind" not in node.meta:
            continue
        name, kind = node.target, node.meta["region_kind"]
        if kind not in kinds:
            lowerings[name] = Lowering(kind, reason=f"{kind} region: not among the kinds asked for")
            continue
        try:
            lowerings[name] = Lowering(kind, source=templates[kind][0](runner.get_submodule(name)))
        except NotLowerable as exc:
            lowerings[name] = Lowering(kind, reason=str(exc))
    return runner, lowerings


@register_backend("triton")
def triton(
    gm: GraphModule,
    example_inputs: Any = (),
    example_kwargs: Any = None,
    interpret: bool | None = None,
    kinds: tuple[str, ...] = KINDS,
) -> CompiledGraph:
    """Run ``gm`` with its fused regions as generated Triton kernels (see the module docstring).

    ``interpret``: run the kernels in the Triton interpreter (default: whether ``TRITON_INTERPRET=1``).
    ``kinds``: the region kinds to lower (default: all of :data:`KINDS`); the others stay ATen.
    Raises ``RuntimeError`` when there is neither a CUDA device nor the interpreter.
    """
    if not _interpreting(interpret) and not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    runner, lowerings = plan(gm, kinds)
    templates = _templates()
    kernels: dict[str, str] = {}
    left_to_aten = {name: lowering.reason for name, lowering in lowerings.items() if lowering.source is None}
    for name, lowering in lowerings.items():
        if lowering.source is None:
            continue
        region = runner.get_submodule(name)
        try:
            launcher = templates[lowering.kind][1](region)
        except NotLowerable as exc:
            left_to_aten[name] = str(exc)
            continue
        runner.add_submodule(name, TritonKernel(launcher, lowering.source, region, lowering.kind))
        kernels[name] = lowering.source
    # A trial run on the example inputs finds the kernels whose launcher refuses those shapes.
    if kernels:
        run_graph(runner, example_inputs, example_kwargs)
        for name in list(kernels):
            kernel = runner.get_submodule(name)
            if kernel.fallback_reason is not None:
                runner.add_submodule(name, kernel.region)
                left_to_aten[name] = kernel.fallback_reason
                del kernels[name]
    regions = {name: lowering.kind for name, lowering in lowerings.items()}
    return CompiledGraph(runner, "triton", kernels=kernels, left_to_aten=left_to_aten, regions=regions, generates_code=True)
