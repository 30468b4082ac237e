"""The tiled matmul template: one Triton kernel per ``matmul_epilogue`` region (a GEMM and the
pointwise ops after it).

The kernel follows the matrix-multiplication tutorial of Triton. The region's head (``linear``,
``mm``, ``addmm``, ``bmm``, ``baddbmm`` or ``matmul``) is seen as ``batch`` independent products
``A[M, K] @ B[K, N]``; each program computes one ``[BLOCK_M, BLOCK_N]`` tile of one product:

1. *Which tile*: programs are numbered batch by batch; inside a batch, tiles are walked in groups
   of ``GROUP_M`` tile rows, column by column, so that programs running together read the same
   rows of ``A`` and columns of ``B`` and find them in L2 (the tutorial's grouped ordering).
2. *K loop*: ``[BLOCK_M, BLOCK_K]`` blocks of ``A`` and ``[BLOCK_K, BLOCK_N]`` blocks of ``B`` are
   loaded through their strides, masked at the ragged edges, and multiplied by ``tl.dot`` into an
   fp32 accumulator. fp16/bf16 operands go to ``tl.dot`` in their own dtype on a GPU (tensor
   cores); under the interpreter (and for fp32 operands) they are fp32. fp32 products use TF32
   only when torch allows it (``torch.set_float32_matmul_precision``), as ATen does.
3. *Epilogue*: the head's own scaling and bias (``alpha * acc + beta * bias``), then the region's
   pointwise ops, each written by :func:`graphopt.backends.triton_codegen.lower_node` on fp32
   values. Every other operand of the epilogue (a bias, a residual) is loaded at the tile's
   ``(batch, m, n)`` coordinates through its strides, so a bias broadcast along ``M`` is read with
   stride 0 and nothing is copied. One store per region output, contiguous, in its dtype.

The region is prepared by :class:`graphopt.backends.triton_region.KernelRegion`: views of inputs
run in torch before the launch and reshapes of computed values vanish (the accumulator tile is the
row-major ``[batch, M, N]`` output, whatever shape the epilogue views it as). Operands are handed
to the kernel as views: ``linear``'s weight ``[N, K]`` is read transposed through its strides,
leading dimensions are merged into ``M`` (or into ``batch`` when their strides do not merge), and
a ``matmul``'s broadcast batch dimensions are merged into one when strides allow (else the region
is not lowered: nothing is copied to make it fit).

:func:`compile_matmul_region` returns the launcher and :func:`matmul_region_source` the kernel
source; both raise :class:`~graphopt.backends.triton_codegen.NotLowerable` for what the template
cannot compute, and the launcher raises it before launching for inputs it cannot index (fp64 or
integer operands, batch dimensions that do not merge). Shapes and strides are kernel arguments.
On a GPU ``triton.autotune`` picks the block sizes among :data:`GPU_CONFIGS`; under the interpreter
they are fixed (:data:`INTERPRETER_BLOCKS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
from torch.fx import GraphModule, Node

from graphopt.backends.triton_codegen import NotLowerable, interpreted, load_template_kernel, lower_node
from graphopt.backends.triton_region import KernelRegion
from graphopt.ir import aten, normalized_args

__all__ = ["GPU_CONFIGS", "HEADS", "INTERPRETER_BLOCKS", "compile_matmul_region", "matmul_region_source"]

HEADS = {
    aten.linear.default: ("input", "weight", "bias"),
    aten.mm.default: ("self", "mat2", None),
    aten.addmm.default: ("mat1", "mat2", "self"),
    aten.bmm.default: ("self", "mat2", None),
    aten.baddbmm.default: ("batch1", "batch2", "self"),
    aten.matmul.default: ("self", "other", None),
}
"""The heads the template computes: the schema names of ``A``, ``B`` and the added term (or None)."""

GPU_CONFIGS = (  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), after the Triton matmul tutorial
    (128, 256, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (32, 64, 32, 2, 5),
)
"""Tile shapes and launch options the autotuner times on a GPU, keyed by ``(M, N, K)``."""

GPU_GROUP_M = 8
"""Tile rows per group of the grouped ordering on a GPU (the tutorial's value)."""

INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
"""Fixed launch under the interpreter: the smallest blocks ``tl.dot`` takes; two tile rows per group."""

INTERPRETER_LARGE_BLOCK = 64
"""Under the interpreter, a dimension over this size gets blocks of this size: the interpreter's
cost is per block operation, so a model's 384-wide linears run 16x fewer of them."""

DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_RESERVED = {"pid", "tiles_m", "tiles_n", "batch", "tile", "group", "first_tile_m", "group_size_m", "tile_m", "tile_n"}
_RESERVED |= {"rows", "cols", "ks", "a_ptrs", "b_ptrs", "acc", "k", "k_left", "a", "b", "mask", "out_offsets", "M", "N", "K", "tl", "triton"}
_RESERVED |= {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "DOT_IN_FP32", "INPUT_PRECISION"}
_RESERVED_PATTERN = r".*_ptr|.*_stride_(batch|m|n|k)"
"""Kernel-local names a node's name must not take (it gets a trailing underscore instead)."""


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NotLowerable(f"scale {value!r} is not a finite number")
    return float(value)


@dataclasses.dataclass
class _Plan:
    """What the kernel needs from a region: its :class:`KernelRegion`, the head node and the
    ``kernel_graph`` placeholders of ``A``, ``B`` and the added term, the epilogue operands (the
    placeholders read at the tile's coordinates, added term first)."""

    kernel_region: KernelRegion
    head: Node
    a: Node
    b: Node
    added: Node | None
    alpha: float
    beta: float
    tile_operands: list[Node]


def _plan(region: GraphModule) -> _Plan:
    """The region's :class:`_Plan` (raises :class:`NotLowerable` when its first op is no matmul head)."""
    kernel_region = KernelRegion(region)
    graph = kernel_region.kernel_graph.graph
    head = next(node for node in graph.nodes if node.op != "placeholder")
    if head.op != "call_function" or head.target not in HEADS:
        raise NotLowerable(f"the region's first op {head.target} is not a matmul head")
    args = normalized_args(head)
    a_name, b_name, added_name = HEADS[head.target]
    alpha, beta = _number(args.get("alpha", 1)), _number(args.get("beta", 1))
    added = args[added_name] if added_name is not None and beta != 0 else None  # ATen ignores the term when beta == 0
    epilogue_reads = [node for node in graph.find_nodes(op="placeholder") if any(user is not head for user in node.users)]
    tile_operands = list(dict.fromkeys(([added] if added is not None else []) + epilogue_reads))
    return _Plan(kernel_region, head, args[a_name], args[b_name], added, alpha, beta, tile_operands)


# ---------------------------------------------------------------------------------------------
# Source generation.


def _generate(plan: _Plan) -> str:
    graph = plan.kernel_region.kernel_graph.graph
    outputs = list(graph.output_node().args[0])
    names: dict[Node, str] = {}
    for node in graph.nodes:
        names[node] = node.name + "_" if node.name in _RESERVED or re.fullmatch(_RESERVED_PATTERN, node.name) else node.name

    tiles = [names[p] for p in plan.tile_operands]
    params = ["a_ptr", "b_ptr", *[f"{t}_ptr" for t in tiles], *[f"out{k}_ptr" for k in range(len(outputs))], "M", "N", "K"]
    params += ["a_stride_batch", "a_stride_m", "a_stride_k", "b_stride_batch", "b_stride_k", "b_stride_n"]
    params += [f"{t}_stride_{d}" for t in tiles for d in ("batch", "m", "n")]
    params += [f"{c}: tl.constexpr" for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "DOT_IN_FP32", "INPUT_PRECISION")]
    lines = ["@triton.jit", "def matmul_epilogue_kernel(", *[f"    {param}," for param in params], "):"]
    lines += [
        "    # Which output tile: batch by batch; within a batch, GROUP_M tile rows walked column by",
        "    # column, so that programs running together share rows of A and columns of B in L2.",
        "    pid = tl.program_id(axis=0)",
        "    tiles_m = tl.cdiv(M, BLOCK_M)",
        "    tiles_n = tl.cdiv(N, BLOCK_N)",
        "    batch = (pid // (tiles_m * tiles_n)).to(tl.int64)  # 64-bit offsets: operands may exceed 2**31 elements",
        "    tile = pid % (tiles_m * tiles_n)",
        "    group = tile // (GROUP_M * tiles_n)",
        "    first_tile_m = group * GROUP_M",
        "    group_size_m = tl.minimum(tiles_m - first_tile_m, GROUP_M)",
        "    tile_m = first_tile_m + (tile % (GROUP_M * tiles_n)) % group_size_m",
        "    tile_n = (tile % (GROUP_M * tiles_n)) // group_size_m",
        "    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)",
        "    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)",
        "    ks = tl.arange(0, BLOCK_K)",
        "    # K loop: blocks of A and B read through their strides, masked at the edges, fp32 accumulator.",
        "    a_ptrs = a_ptr + batch * a_stride_batch + rows[:, None] * a_stride_m + ks[None, :] * a_stride_k",
        "    b_ptrs = b_ptr + batch * b_stride_batch + ks[:, None] * b_stride_k + cols[None, :] * b_stride_n",
        "    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "    for k in range(0, tl.cdiv(K, BLOCK_K)):",
        "        k_left = K - k * BLOCK_K",
        "        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0.0)",
        "        b = tl.load(b_ptrs, mask=(ks[:, None] < k_left) & (cols[None, :] < N), other=0.0)",
        "        if DOT_IN_FP32:",
        "            a = a.to(tl.float32)",
        "            b = b.to(tl.float32)",
        "        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)",
        "        a_ptrs += BLOCK_K * a_stride_k",
        "        b_ptrs += BLOCK_K * b_stride_k",
        "    # Epilogue on the fp32 tile: each operand read at the tile's (batch, m, n) through its strides.",
        "    mask = (rows[:, None] < M) & (cols[None, :] < N)",
    ]
    for t in tiles:
        index = f"batch * {t}_stride_batch + rows[:, None] * {t}_stride_m + cols[None, :] * {t}_stride_n"
        lines.append(f"    {t} = tl.load({t}_ptr + {index}, mask=mask, other=0).to(tl.float32)")
    lines.append(f"    {names[plan.head]} = {_head_expression(plan, names)}")
    for node in graph.nodes:
        if node.op == "call_function" and node is not plan.head:
            lines.append(f"    {names[node]} = {lower_node(node, names)}")
    lines.append("    # One contiguous [batch, M, N] store per output, in its own dtype.")
    lines.append("    out_offsets = batch * M * N + rows[:, None] * N + cols[None, :]")
    for k, out in enumerate(outputs):
        lines.append(f"    tl.store(out{k}_ptr + out_offsets, {names[out]}.to(out{k}_ptr.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


def _head_expression(plan: _Plan, names: dict[Node, str]) -> str:
    product = "acc" if plan.alpha == 1 else f"{plan.alpha!r} * acc"
    if plan.added is None:
        return product
    return f"{product} + {names[plan.added]}" if plan.beta == 1 else f"{product} + {plan.beta!r} * {names[plan.added]}"


def matmul_region_source(region: GraphModule) -> str:
    """The ``@triton.jit`` kernel computing the ``matmul_epilogue`` region (raises :class:`NotLowerable`)."""
    return _generate(_plan(region))


# ---------------------------------------------------------------------------------------------
# Operands as [batch, rows, cols] views.


def _merged_rows(t: torch.Tensor) -> torch.Tensor:
    """``t[..., R, C]`` as a ``[batch, rows, C]`` view: every leading dim merged into the rows
    (batch 1) when strides allow, else all but the last into the batch."""
    columns = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    try:
        return t.view(1, rows, columns)
    except RuntimeError:
        pass
    try:
        return t.view(math.prod(t.shape[:-2]), t.shape[-2], columns)
    except RuntimeError:
        raise NotLowerable(f"an operand {tuple(t.shape)} with strides {t.stride()} has no [batch, rows, cols] view") from None


def _merged_batch(t: torch.Tensor, batch_shape: Sequence[int]) -> torch.Tensor:
    """``t[..., R, C]`` broadcast to ``batch_shape`` and its batch dims merged, as a view."""
    expanded = t.expand(*batch_shape, *t.shape[-2:])
    try:
        return expanded.view(math.prod(batch_shape), *t.shape[-2:])
    except RuntimeError:
        raise NotLowerable(f"the batch dims of an operand {tuple(expanded.shape)} with strides {expanded.stride()} do not merge") from None


def _gemm_views(target: Any, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` as ``[batch, M, K]`` and ``B`` as ``[batch, K, N]`` views (batch stride 0 for a shared ``B``)."""
    if target == aten.linear.default:
        if b.dim() != 2:
            raise NotLowerable(f"linear by a weight of shape {tuple(b.shape)}")
        a3 = a.view(1, 1, a.shape[0]) if a.dim() == 1 else _merged_rows(a)
        return a3, b.t().expand(a3.shape[0], *b.t().shape)
    if target == aten.matmul.default and (a.dim() < 2 or b.dim() < 2):
        raise NotLowerable("matmul of a vector")
    if a.dim() == 2 and b.dim() == 2:  # mm, addmm, 2-D matmul
        return a.unsqueeze(0), b.unsqueeze(0)
    if target == aten.matmul.default and b.dim() == 2:
        a3 = _merged_rows(a)
        return a3, b.expand(a3.shape[0], *b.shape)
    batch_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return _merged_batch(a, batch_shape), _merged_batch(b, batch_shape)


# ---------------------------------------------------------------------------------------------
# Compilation and launch.


def _fits_shared_memory(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """The configs whose pipelined ``A`` and ``B`` tiles fit the device's shared memory.

    The largest tile is for fp16/bf16; fp32 operands take twice the bytes and overflow it (on
    sm_80 even without TF32), which the GPU compile test found ahead of time.
    """
    a = named_args["a_ptr"]
    limit = triton.runtime.driver.active.utils.get_device_properties(a.device.index or 0)["max_shared_mem"]
    return configs_fitting(configs, a.element_size(), limit)


def configs_fitting(configs: list[triton.Config], element_size: int, shared_memory: int) -> list[triton.Config]:
    """The configs whose ``num_stages`` buffers of an ``A`` and a ``B`` tile of ``element_size``
    bytes fit ``shared_memory`` bytes (at least the smallest config)."""
    fits = [c for c in configs if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * element_size * c.num_stages <= shared_memory]
    return fits or configs[-1:]


def compile_matmul_region(region: GraphModule) -> Callable[..., Any]:
    """A function computing ``region(*inputs)`` with one launch of the generated kernel.

    The source is generated (and :class:`NotLowerable` raised) here, once; shapes, strides and
    dtypes are read from the inputs at every call, and :class:`NotLowerable` is raised before the
    launch for inputs the template cannot index. It returns a tensor or a tuple, like ``region``.
    """
    plan = _plan(region)
    kernel = load_template_kernel(
        _generate(plan),
        "matmul_epilogue_kernel",
        GPU_CONFIGS,
        ["BLOCK_M", "BLOCK_N", "BLOCK_K"],
        ["M", "N", "K"],
        constants={"GROUP_M": GPU_GROUP_M},
        prune=_fits_shared_memory,
    )
    kernel_region = plan.kernel_region
    region_nodes = {node.name: node for node in region.graph.nodes}
    placeholders = kernel_region.kernel_graph.graph.find_nodes(op="placeholder")
    operand_of = dict(zip(placeholders, kernel_region.operands))
    computed = [node for node in kernel_region.kernel_graph.graph.nodes if node.op == "call_function"]
    kernel_outputs = list(kernel_region.kernel_graph.graph.output_node().args[0])

    def launch(*inputs: torch.Tensor) -> Any:
        values = kernel_region.bind(inputs)
        a, b = _gemm_views(plan.head.target, values[operand_of[plan.a].source], values[operand_of[plan.b].source])
        if a.dtype not in DOT_DTYPES or b.dtype != a.dtype:
            raise NotLowerable(f"a product of {a.dtype} by {b.dtype}")
        batch, m, k = a.shape
        n = b.shape[-1]
        for node in computed:
            if values[region_nodes[node.name]].numel() != batch * m * n:
                raise NotLowerable(f"{node.name} has {values[region_nodes[node.name]].numel()} elements, not the product's {batch * m * n}")
        tiles = [kernel_region.operand_tensor(values, operand_of[p], (batch, m, n)) for p in plan.tile_operands]
        outs = [torch.empty((batch, m, n), dtype=values[region_nodes[node.name]].dtype, device=a.device) for node in kernel_outputs]
        if batch * m * n:
            grid = lambda meta: (batch * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            options = _interpreter_blocks(m, n, k) if interpreted() else {}
            precision = "ieee" if interpreted() or torch.get_float32_matmul_precision() == "highest" else "tf32"
            strides = [s for t in tiles for s in t.stride()]
            dot_in_fp32 = interpreted() or a.dtype == torch.float32
            kernel[grid](a, b, *tiles, *outs, m, n, k, *a.stride(), *b.stride(), *strides, DOT_IN_FP32=dot_in_fp32, INPUT_PRECISION=precision, **options)
        return kernel_region.results(values, outs)

    return launch


def _interpreter_blocks(m: int, n: int, k: int) -> dict[str, int]:
    sizes = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
    large = {name: INTERPRETER_LARGE_BLOCK for name, size in sizes.items() if size > INTERPRETER_LARGE_BLOCK}
    return {**INTERPRETER_BLOCKS, **large, "num_warps": 4}
