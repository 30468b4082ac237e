"""Code generation of one Triton kernel for a row-wise region: a reduction or normalization over the
last dim, with its pointwise prologue and epilogue.

The regions are the partitioner's ``reduction`` and ``norm`` kinds (e.g. residual add -> LayerNorm
-> cast, or ``x - amax(x, -1, keepdim)`` -> exp), prepared by :class:`KernelRegion` (views moved out
of the kernel, inputs as operands). The kernel follows the fused softmax and layer-norm tutorials of
Triton: the anchor's input is viewed as ``[R, C]`` (``C`` its last dim, ``R`` the rest), and each
program holds ``BLOCK_R`` whole rows in registers, as a ``[BLOCK_R, BLOCK_C]`` tile with
``BLOCK_C = next_power_of_2(C)``. Every value of the kernel graph is then one of two kinds:

* **full**: ``R * C`` elements, a ``[BLOCK_R, BLOCK_C]`` tile (the prologue, a norm's output and
  what is computed from it);
* **per-row**: ``R`` elements, a ``[BLOCK_R, 1]`` column (a reduction's output, keepdim or not,
  and an epilogue computed from such values only), which broadcasts over the columns of a tile.

Each anchor op has a small rule (:data:`ANCHORS`; a custom op's ``OpRecord.triton_lowering``) that writes its reduction(s) with ``tl.sum`` /
``tl.max`` over axis 1; masked tail columns are replaced by the reduction's neutral value
(``tl.where``), so whatever the prologue computed there never counts. Pointwise ops reuse the
pointwise generator's rules (:func:`lower_node`). Several anchors over the same rows may share one
kernel (the partitioner makes one per region).

Operands are read in place: each is broadcast to the op reading it and viewed as
``[*row_dims, C]`` (full) or ``[*row_dims]`` (per-row), whose row dims are collapsed like the
pointwise kernel's (size-1 dims dropped, contiguous neighbours merged) to at most
:data:`ROW_RANK`, so broadcast weights (stride 0) and permuted inputs need no copy. Loads are cast
to fp32 at once and everything computes in fp32; each output is stored contiguous in its ATen
dtype (a fp16 softmax stays fp16, ``_softmax(half_to_float=True)`` is fp32, a fp16 sum is fp16).

Limits (:class:`NotLowerable`, the region then runs as ATen ops): rows longer than
:data:`MAX_BLOCK_C` (a whole row lives in registers, and each live row value costs ``BLOCK_C / (32
* num_warps)`` registers per thread; longer rows want a looping template), an anchor over a dim
other than the last, values that are neither full nor per-row (e.g. a gain computed in the region,
``[C]``), anchors over integer inputs (bool is fine: counts are exact in fp32), row dims that do
not collapse to :data:`ROW_RANK`, and shapes at call time that change which values are per-row
(the kernel's source depends on it). fp64 computes in fp32, as in the pointwise kernels; a NaN in a
row goes through ``tl.max``/``tl.min``, whose NaN propagation is not checked against ATen's.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import triton
from torch.fx import GraphModule, Node

from graphopt.backends.triton_codegen import LOWERINGS, NotLowerable, collapse_dims, interpreted, load_template_kernel, lower_node, unravel
from graphopt.backends.triton_region import KernelRegion
from graphopt.ir import aten, normalized_args
from graphopt.ir.oprecord import op_record

__all__ = ["ANCHORS", "MAX_BLOCK_C", "ROW_HELPERS", "ROW_RANK", "anchor_rule", "compile_row_region", "row_region_source"]

MAX_BLOCK_C = 8192
"""Longest row a program holds (32 KB of fp32 per live row value); longer rows stay ATen."""

ROW_RANK = 3
"""Row dims the kernel indexes, after size-1 dims are dropped and contiguous ones merged."""

TILE = 4096
"""Elements per program: ``BLOCK_R = TILE // BLOCK_C`` rows (at least one, at most the row count)."""

GPU_NUM_WARPS = (2, 4, 8, 16)
"""Warps per program the autotuner times on a GPU, keyed by the row length and rows per program."""


# ---------------------------------------------------------------------------------------------
# Anchor rules: (output name, normalized arguments with tensors as Triton names, fresh-name
# function) -> lines of kernel code assigning the output. ``mask`` is the tile's mask and
# ``n_cols`` the row length inside the kernel.


def _row_sum(x: str) -> str:
    return f"tl.sum(tl.where(mask, {x}, 0.0), axis=1, keep_dims=True)"


def _row_max(x: str) -> str:
    return f"tl.max(tl.where(mask, {x}, -float('inf')), axis=1, keep_dims=True)"


def _row_min(x: str) -> str:
    return f"tl.min(tl.where(mask, {x}, float('inf')), axis=1, keep_dims=True)"


def _tensor(args: dict, key: str) -> str:
    value = args[key]
    if not isinstance(value, str):
        raise NotLowerable(f"argument {key} is not a tensor")
    return value


def _input_as(args: dict, key: str = "self") -> str:
    """The input, first rounded to the ``dtype`` argument when there is one (as ATen converts it)."""
    x = _tensor(args, key)
    dtype = args.get("dtype")
    return x if dtype is None else LOWERINGS[aten._to_copy.default]({"self": x, "dtype": dtype})


def _number(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NotLowerable(f"{what} {value!r} is not a finite number")
    return repr(float(value))


def _affine(y: str, args: dict, weight: str, bias: str) -> str:
    if args.get(weight) is not None:
        y = f"{y} * {_tensor(args, weight)}"
    if args.get(bias) is not None:
        y = f"{y} + {_tensor(args, bias)}"
    return y


def _sum(out, args, fresh):
    return [f"{out} = {_row_sum(_input_as(args))}"]


def _mean(out, args, fresh):
    return [f"{out} = {_row_sum(_input_as(args))} / n_cols"]


def _amax(out, args, fresh):
    return [f"{out} = {_row_max(_tensor(args, 'self'))}"]


def _amin(out, args, fresh):
    return [f"{out} = {_row_min(_tensor(args, 'self'))}"]


def _var(out, args, fresh):
    # Two passes over the registers (mean, then squared deviations): no cancellation.
    correction = args.get("correction")
    if "unbiased" in args:
        correction = 1 if args["unbiased"] else 0
    correction = 1 if correction is None else correction
    x, mean, centered = _tensor(args, "self"), fresh(f"{out}_mean"), fresh(f"{out}_centered")
    return [
        f"{mean} = {_row_sum(x)} / n_cols",
        f"{centered} = tl.where(mask, {x} - {mean}, 0.0)",
        f"{out} = tl.sum({centered} * {centered}, axis=1, keep_dims=True) / tl.maximum(n_cols - {_number(correction, 'correction')}, 0.0)",
    ]


def _layer_norm(out, args, fresh):
    x, mean, centered, rstd = _tensor(args, "input"), fresh(f"{out}_mean"), fresh(f"{out}_centered"), fresh(f"{out}_rstd")
    return [
        f"{mean} = {_row_sum(x)} / n_cols",
        f"{centered} = tl.where(mask, {x} - {mean}, 0.0)",
        f"{rstd} = tl.math.rsqrt(tl.sum({centered} * {centered}, axis=1, keep_dims=True) / n_cols + {_number(args['eps'], 'eps')})",
        f"{out} = {_affine(f'{centered} * {rstd}', args, 'weight', 'bias')}",
    ]


def _rms(out, x, eps, args, weight, bias, fresh):
    inv_rms = fresh(f"{out}_inv_rms")
    return [
        f"{inv_rms} = tl.math.rsqrt({_row_sum(f'{x} * {x}')} / n_cols + {_number(eps, 'eps')})",
        f"{out} = {_affine(f'{x} * {inv_rms}', args, weight, bias)}",
    ]


def _rms_norm(out, args, fresh):
    # eps=None is ATen's epsilon of the compute dtype, fp32 here (ATen's too for fp16/bf16/fp32).
    eps = torch.finfo(torch.float32).eps if args["eps"] is None else args["eps"]
    return _rms(out, _tensor(args, "input"), eps, args, "weight", None, fresh)


def _softmax_parts(out, args, fresh):
    x = _input_as(args)
    shifted, total = fresh(f"{out}_shifted"), fresh(f"{out}_sum")
    lines = [f"{shifted} = {x} - {_row_max(x)}", f"{total} = {_row_sum(f'tl.exp({shifted})')}"]
    return lines, shifted, total


def _softmax(out, args, fresh):
    lines, shifted, total = _softmax_parts(out, args, fresh)
    return [*lines, f"{out} = tl.exp({shifted}) / {total}"]


def _log_softmax(out, args, fresh):
    lines, shifted, total = _softmax_parts(out, args, fresh)
    return [*lines, f"{out} = {shifted} - tl.log({total})"]


AnchorRule = Callable[[str, dict, Callable[[str], str]], list[str]]

ANCHORS: dict[Any, tuple[bool, AnchorRule]] = {
    aten.sum.dim_IntList: (False, _sum),
    aten.mean.dim: (False, _mean),
    aten.amax.default: (False, _amax),
    aten.amin.default: (False, _amin),
    aten.var.dim: (False, _var),
    aten.var.correction: (False, _var),
    aten.layer_norm.default: (True, _layer_norm),
    aten.rms_norm.default: (True, _rms_norm),
    aten.softmax.int: (True, _softmax),
    aten._softmax.default: (True, _softmax),
    aten.log_softmax.int: (True, _log_softmax),
    aten._log_softmax.default: (True, _log_softmax),
}
"""Anchor op -> (whether its output is full, i.e. a normalization; its rule). Custom ops are
anchors through their op records (:func:`anchor_rule`)."""

ROW_HELPERS = types.SimpleNamespace(sum=_row_sum, max=_row_max, min=_row_min, tensor=_tensor, input_as=_input_as, number=_number, affine=_affine, rms=_rms)
"""The template's helpers, handed to a custom op's ``OpRecord.triton_lowering`` as its ``row`` argument:
``sum(x)`` / ``max(x)`` / ``min(x)`` (masked row reductions of a tile, ``[BLOCK_R, 1]``),
``tensor(args, key)`` (an argument's kernel name; NotLowerable if it is not a tensor),
``input_as(args, key)`` (the input cast to the ``dtype`` argument), ``number(value, what)`` (a finite
number as a literal), ``affine(y, args, weight_key, bias_key)`` (``y * w + b`` for the arguments
present) and ``rms(out, x, eps, args, weight_key, bias_key, fresh)`` (lines of ``x / rms(x) * w + b``)."""


def anchor_rule(target: Any) -> tuple[bool, AnchorRule] | None:
    """``(full, rule)`` for an anchor op (see :data:`ANCHORS`), or for a custom op whose record has a
    ``triton_lowering`` (full when its ``partition_kind`` is ``"norm"``); None for any other op."""
    if target in ANCHORS:
        return ANCHORS[target]
    record = op_record(target)
    if record is None or record.triton_lowering is None:
        return None
    lowering = record.triton_lowering
    return record.partition_kind == "norm", lambda out, args, fresh: lowering(out, args, fresh, ROW_HELPERS)


def _anchor_input(node: Node) -> Node:
    """The tensor an anchor reduces or normalizes (its first argument)."""
    return node.args[0]


def _check_last_dim(node: Node, ndim: int) -> None:
    """Raise unless the anchor works over its input's last dim only."""
    args = normalized_args(node)
    if "normalized_shape" in args:
        if len(args["normalized_shape"]) != 1:
            raise NotLowerable(f"{node.name} normalizes over {len(args['normalized_shape'])} dims")
        return
    if "dim" not in args:  # a custom op's lowering (graphopt::rms_norm): always the last dim
        return
    dims = args["dim"]
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if len(dims) != 1 or dims[0] % max(ndim, 1) != max(ndim, 1) - 1:
        raise NotLowerable(f"{node.name} works over dims {args['dim']}, not the last one only")


# ---------------------------------------------------------------------------------------------
# Which values are full and which per-row, from the shapes of one call (or of the capture).


def _classify(kernel: KernelRegion, shapes: dict[Node, Any]) -> tuple[dict[Node, bool], list[int], int]:
    """``(full, row_shape, C)``: for each kernel-graph op whether it is full (``R * C`` elements)
    or per-row (``R``), the anchor input's leading dims and its last dim.

    ``shapes`` maps each kernel-graph node (operand placeholders included) to its shape. A per-row
    value read by a full op must broadcast along the columns only (shape ``[..., 1]`` against
    ``[..., C]``), since in the flat-index kernel it is one value per row.
    """
    ops = [n for n in kernel.kernel_graph.graph.nodes if n.op == "call_function"]
    anchors = [n for n in ops if anchor_rule(n.target) is not None]
    if not anchors:
        raise NotLowerable("no row reduction or normalization in the region")
    anchor_shape = list(shapes[_anchor_input(anchors[0])])
    if not anchor_shape:
        raise NotLowerable("a reduction of a 0-d tensor")
    row_shape, cols = anchor_shape[:-1], anchor_shape[-1]
    rows = math.prod(row_shape)
    if not sympy.sympify(cols).is_number:
        raise NotLowerable(f"rows of symbolic length {cols}")
    if cols == 0 or cols > MAX_BLOCK_C:
        raise NotLowerable(f"rows of {cols} elements (the template holds 1 to {MAX_BLOCK_C} per row)")

    full: dict[Node, bool] = {}
    for node in ops:
        numel = math.prod(shapes[node])
        computed = [a for a in node.all_input_nodes if a in full]
        if anchor_rule(node.target) is not None:
            source = _anchor_input(node)
            shape = list(shapes[source])
            _check_last_dim(node, len(shape))
            if shape[-1:] != [cols] or math.prod(shape) != rows * cols or not (full.get(source, True) or cols == 1):
                raise NotLowerable(f"{node.name} does not work over the rows of {anchors[0].name}")
            full[node] = anchor_rule(node.target)[0]
        elif any(full[a] for a in computed):
            full[node] = True
        elif cols != 1:  # the element count tells
            full[node] = numel == rows * cols
        else:  # one column: full tiles and per-row columns coincide; ops on operands only count as full
            full[node] = not computed
        if numel != (rows * cols if full[node] else rows):
            raise NotLowerable(f"{node.name} has {numel} elements: neither one per row nor one per row element")
        if full[node]:
            for arg in computed:
                arg_shape = list(shapes[arg])
                padded = [1] * (len(shapes[node]) - len(arg_shape)) + arg_shape
                if not full[arg] and (padded != [*shapes[node][:-1], 1] or shapes[node][-1] != cols):
                    raise NotLowerable(f"{node.name} broadcasts the per-row {arg.name} other than along the row")
    return full, row_shape, cols


# ---------------------------------------------------------------------------------------------
# Source generation.

_RESERVED = {"pid", "rows", "cols", "row_mask", "mask", "n_rows", "n_cols", "BLOCK_R", "BLOCK_C", "tl", "triton", "float"}
_RESERVED_PATTERN = r"(size|i|rest|out)\d+|.*_ptr|.*_stride(\d+|_col)"


def _namer() -> Callable[[str], str]:
    """``fresh(base)``: a kernel-local name like ``base``, unused so far and clear of the kernel's own."""
    used: set[str] = set()

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used or name in _RESERVED or re.fullmatch(_RESERVED_PATTERN, name):
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    return fresh


def _size(size: int | torch.SymInt) -> int | sympy.Expr:
    """A size, a symbolic one as its sympy expression: symbolic sizes (a dynamic batch, or a
    data-dependent packed token count with no example value) then compare structurally, never guessed."""
    return size.node.expr if isinstance(size, torch.SymInt) else size


class _RowKernel:
    """A region's kernel graph, with which values are full (from the capture's shapes) and the source."""

    def __init__(self, region: GraphModule):
        self.kernel = KernelRegion(region)
        graph = self.kernel.kernel_graph.graph
        self.placeholders = list(graph.find_nodes(op="placeholder"))
        by_name = {n.name: n for n in region.graph.nodes}
        # the region value behind each kernel-graph node: an operand's source, a computed op itself
        self.region_node = {p: o.source for p, o in zip(self.placeholders, self.kernel.operands)}
        self.region_node.update({n: by_name[n.name] for n in graph.nodes if n.op == "call_function"})
        self.ops = [n for n in graph.nodes if n.op == "call_function"]
        self.outputs = list(graph.output_node().args[0])
        vals = {n: region_node.meta.get("val") for n, region_node in self.region_node.items()}
        if not all(isinstance(v, torch.Tensor) for v in vals.values()):
            raise NotLowerable("the region's values have no shapes (meta['val'])")
        self.full, _, _ = self._classify(vals)
        self.source = self._generate()

    def _classify(self, values: dict[Node, torch.Tensor]) -> tuple[dict[Node, bool], list[int], int]:
        for anchor in (n for n in self.ops if anchor_rule(n.target) is not None):
            dtype = values[_anchor_input(anchor)].dtype
            if not (dtype.is_floating_point or dtype == torch.bool):
                raise NotLowerable(f"{anchor.name} of a {dtype} tensor (the kernel computes in fp32)")
        return _classify(self.kernel, {n: [_size(size) for size in v.shape] for n, v in values.items()})

    def operand_layout(self, placeholder: Node) -> tuple[bool, bool]:
        """``(full, reduced)``: whether the operand is loaded as full rows, and whether it is the
        input of a reduction (read as it is, not broadcast to the reduced shape of its reader)."""
        consumer = next(iter(placeholder.users))  # one operand per (value, reader) pair
        reduced = anchor_rule(consumer.target) is not None and _anchor_input(consumer) is placeholder and not self.full[consumer]
        return self.full[consumer] or reduced, reduced

    def _generate(self) -> str:
        fresh = _namer()
        names = {n: fresh(n.name) for n in [*self.placeholders, *self.ops]}
        dims = range(ROW_RANK)
        full_operands = [p for p in self.placeholders if self.operand_layout(p)[0]]
        params = [f"{names[p]}_ptr" for p in self.placeholders] + [f"out{k}_ptr" for k in range(len(self.outputs))]
        params += ["n_rows", "n_cols", *(f"size{d}" for d in dims[1:])]
        for p in self.placeholders:
            params += [f"{names[p]}_stride{d}" for d in dims] + ([f"{names[p]}_stride_col"] if p in full_operands else [])
        params += ["BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr"]
        lines = ["@triton.jit", "def fused_rowwise_kernel(", *[f"    {param}," for param in params], "):"]
        lines += [
            "    # BLOCK_R whole rows per program: rows down axis 0, the row's columns along axis 1.",
            "    pid = tl.program_id(axis=0).to(tl.int64)  # 64-bit offsets: tensors may exceed 2**31 elements",
            "    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]",
            "    cols = tl.arange(0, BLOCK_C)[None, :]",
            "    row_mask = rows < n_rows",
            "    mask = row_mask & (cols < n_cols)",
            f"    # Coordinates of each row over the {ROW_RANK} row dims.",
        ]
        lines += unravel("rows", ROW_RANK)
        lines.append("    # Operands through their strides: full rows as [BLOCK_R, BLOCK_C] tiles, per-row values as [BLOCK_R, 1].")
        for p in self.placeholders:
            offset = " + ".join(f"i{d} * {names[p]}_stride{d}" for d in dims)
            if p in full_operands:
                offset, mask = f"{offset} + cols * {names[p]}_stride_col", "mask"
            else:
                mask = "row_mask"
            lines.append(f"    {names[p]} = tl.load({names[p]}_ptr + {offset}, mask={mask}, other=0).to(tl.float32)")
        lines.append("    # The region's ops in fp32; reductions see their neutral value in the masked tail columns.")
        for node in self.ops:
            rule = anchor_rule(node.target)
            if rule is not None:
                args = {k: names[v] if isinstance(v, Node) else v for k, v in normalized_args(node).items()}
                lines += [f"    {line}" for line in rule[1](names[node], args, fresh)]
            else:
                lines.append(f"    {names[node]} = {lower_node(node, names)}")
        lines.append("    # Contiguous outputs in their own dtype: full ones [R, C], per-row ones [R].")
        for k, out in enumerate(self.outputs):
            offset, mask = ("rows * n_cols + cols", "mask") if self.full[out] else ("rows", "row_mask")
            lines.append(f"    tl.store(out{k}_ptr + {offset}, {names[out]}.to(out{k}_ptr.dtype.element_ty), mask={mask})")
        return "\n".join(lines) + "\n"

    # ----------------------------------------------------------------------------- call time

    def arguments(self, inputs: Sequence[torch.Tensor]) -> tuple[list[Any], list[torch.Tensor], dict[Node, Any], int, int]:
        """``(kernel arguments before the constexprs, kernel outputs, region values, R, C)`` for a call;
        :class:`NotLowerable` when these shapes do not fit the generated kernel."""
        values = self.kernel.bind(inputs)
        full, row_shape, cols = self._classify({n: values[r] for n, r in self.region_node.items()})
        rows = math.prod(row_shape)
        outputs = [torch.empty(values[self.region_node[n]].shape, dtype=values[self.region_node[n]].dtype, device=inputs[0].device) for n in self.outputs]
        if rows == 0:
            return [], outputs, values, rows, cols
        if full != self.full:
            raise NotLowerable("these shapes change which values are per-row")
        operands = []
        for p, operand in zip(self.placeholders, self.kernel.operands):
            is_full, reduced = self.operand_layout(p)
            shape = [*row_shape, cols] if is_full else row_shape
            operands.append(values[operand.source].reshape(shape) if reduced else self.kernel.operand_tensor(values, operand, shape))
        row_strides = [list(t.stride()[: len(row_shape)]) for t in operands]
        sizes, strides = collapse_dims(list(row_shape), row_strides)
        if len(sizes) > ROW_RANK:
            raise NotLowerable(f"rows {tuple(row_shape)} do not collapse to {ROW_RANK} dims")
        pad = ROW_RANK - len(sizes)
        args: list[Any] = [*operands, *outputs, rows, cols, *([1] * pad + sizes)[1:]]
        for p, t, s in zip(self.placeholders, operands, strides):
            args += [0] * pad + s + ([t.stride(-1)] if self.operand_layout(p)[0] else [])
        return args, outputs, values, rows, cols


def row_region_source(region: GraphModule) -> str:
    """The ``@triton.jit`` kernel computing a ``reduction`` or ``norm`` region, as Python source
    (raises :class:`NotLowerable`)."""
    return _RowKernel(region).source


def compile_row_region(region: GraphModule) -> Callable[..., Any]:
    """A function computing ``region(*inputs)`` with one launch of the generated kernel.

    The source is generated (and :class:`NotLowerable` raised) here, once; shapes, strides and
    dtypes are read at every call, which raises :class:`NotLowerable` before launching when they
    do not fit (a row longer than :data:`MAX_BLOCK_C`, rows that do not collapse to
    :data:`ROW_RANK` dims, ...). It returns a tensor or a tuple, like ``region``.
    """
    row_kernel = _RowKernel(region)
    kernel = load_template_kernel(row_kernel.source, "fused_rowwise_kernel", [(warps,) for warps in GPU_NUM_WARPS], [], ["n_cols", "BLOCK_R"])

    def launch(*inputs: torch.Tensor) -> Any:
        args, outputs, values, rows, cols = row_kernel.arguments(inputs)
        if rows:
            block_c = triton.next_power_of_2(cols)
            block_r = min(triton.next_power_of_2(rows), max(1, TILE // block_c))
            options = {"num_warps": 4} if interpreted() else {}
            kernel[(triton.cdiv(rows, block_r),)](*args, BLOCK_R=block_r, BLOCK_C=block_c, **options)
        return row_kernel.kernel.results(values, outputs)

    return launch
