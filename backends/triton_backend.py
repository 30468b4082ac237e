"""The ``triton`` backend: the optimized graph with its pointwise regions run as generated kernels.

The method is a fusing compiler's back end (as in inductor or XLA): the graph is cut into fusion
regions by :mod:`graphopt.backends.partition` (each region one ``call_module`` submodule
``fused_<i>``), and each ``pointwise`` region is lowered by :mod:`graphopt.backends.triton_codegen`
to ONE Triton kernel, which replaces the region's submodule. Everything else keeps running as ATen
ops, op by op:

* pointwise regions the generator cannot lower (a view inside, an op with no lowering rule, an
  output rank it cannot index) stay their ATen submodule, with the reason recorded;
* ``reduction``, ``norm`` and ``matmul_epilogue`` regions stay ATen for now: the reduction, norm,
  matmul-epilogue and attention templates are future work of issue 4.

So a model never fails for an op the backend does not know; it only runs it unfused. The returned
runner is the fused ``GraphModule`` with two attributes: ``kernels`` (region name -> generated
kernel source) and ``left_to_aten`` (region name -> why it runs as ATen ops).

The kernels need a CUDA device, or the Triton interpreter (``TRITON_INTERPRET=1``, which Triton
reads when a kernel is defined and the launchers read at every call; it must be in the environment
before ``graphopt`` is imported, since importing it imports ``triton``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

from graphopt.backends import register_backend
from graphopt.backends.partition import fuse_regions
from graphopt.backends.triton_codegen import NotLowerable, compile_region, region_source
from graphopt.manager import run_graph

__all__ = ["TritonKernel", "triton"]

NO_CUDA = (
    "backend 'triton' needs a CUDA device; on this machine use backend='eager' or backend='inductor' "
    "(or interpret=True to run the generated kernels in the Triton interpreter)"
)


class TritonKernel(torch.nn.Module):
    """One fused region run by its generated kernel, or by its ATen ``region`` for inputs the
    launcher cannot index (it raises :class:`NotLowerable` before launching); ``fallback_reason``
    keeps the last such reason."""

    def __init__(self, launcher: Callable[..., Any], source: str, region: GraphModule):
        super().__init__()
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


@register_backend("triton")
def triton(gm: GraphModule, example_inputs: Any = (), example_kwargs: Any = None, interpret: bool | None = None) -> GraphModule:
    """Run ``gm`` with its pointwise regions as generated Triton kernels (see the module docstring).

    ``interpret``: run the kernels in the Triton interpreter (default: whether ``TRITON_INTERPRET=1``).
    Raises ``RuntimeError`` when there is neither a CUDA device nor the interpreter.
    """
    if not _interpreting(interpret) and not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    runner = fuse_regions(gm)
    kernels: dict[str, str] = {}
    left_to_aten: dict[str, str] = {}
    for node in runner.graph.nodes:
        if node.op != "call_module" or "region_kind" not in node.meta:
            continue
        name, kind = node.target, node.meta["region_kind"]
        if kind != "pointwise":
            left_to_aten[name] = f"{kind} region: only pointwise regions have a Triton template so far"
            continue
        region = runner.get_submodule(name)
        try:
            source = region_source(region)
            launcher = compile_region(region)
        except NotLowerable as exc:
            left_to_aten[name] = str(exc)
            continue
        runner.add_submodule(name, TritonKernel(launcher, source, region))
        kernels[name] = source

    # A trial run on the example inputs finds the kernels whose launcher refuses those shapes.
    if kernels:
        run_graph(runner, example_inputs, example_kwargs)
        for name in list(kernels):
            kernel = runner.get_submodule(name)
            if kernel.fallback_reason is not None:
                runner.add_submodule(name, kernel.region)
                left_to_aten[name] = kernel.fallback_reason
                del kernels[name]
    runner.kernels = kernels
    runner.left_to_aten = left_to_aten
    return runner
