"""Code generation of one Triton kernel for a fused region of pointwise ATen ops.

The input is a ``torch.fx.GraphModule`` whose ``call_function`` nodes are all pointwise ATen ops
(a region cut out by the partitioner: its placeholders are the region's inputs, its output the
region's outputs). Each op has a small lowering rule in :data:`LOWERINGS` that turns the Triton
expressions of its arguments into the Triton expression of its result; the generator composes
them, in graph order, into the body of ONE ``@triton.jit`` kernel, in the style of the vector-add
tutorial of Triton: 1-D blocks over the flattened (broadcast) output, a mask for the ragged last
block, one load per input, one store per output.

Each input is read in place through its own strides over the output's coordinates: a broadcast
dimension has stride 0 and a permuted input keeps its strides, so neither is copied. Loads are cast
to fp32 at once, so fp16/bf16 regions compute in fp32, and each store casts to its output's
dtype; outputs are contiguous. Shapes are kernel arguments (nothing is baked into the source): at
call time dimensions of size 1 are dropped and adjacent dimensions that every operand walks
contiguously are merged, and up to :data:`MAX_RANK` dimensions remain.

:func:`compile_region` returns the launcher, :func:`region_source` the kernel's source. Kernels are
cached by a hash of their source and launch configuration. Under the Triton interpreter
(``TRITON_INTERPRET=1``) the block size is fixed; on a GPU ``@triton.autotune`` picks it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import triton
from torch.fx import GraphModule, Node

from graphopt.backends.triton_region import KernelRegion, NotLowerable
from graphopt.ir import aten, normalized_args
from graphopt.ops.triton_runtime import interpreted

__all__ = [
    "LOWERINGS",
    "MAX_RANK",
    "NotLowerable",
    "compile_region",
    "collapse_dims",
    "interpreted",
    "load_kernel",
    "load_template_kernel",
    "lower_node",
    "region_source",
    "unravel",
]

MAX_RANK = 4
"""Dimensions the kernel indexes, after size-1 dimensions are dropped and contiguous ones merged."""

BLOCK_SIZE = 1024
"""Elements per program under the interpreter (on a GPU the autotuner picks among GPU_CONFIGS)."""

GPU_CONFIGS = ((256, 2), (512, 4), (1024, 4), (2048, 8))
"""(BLOCK_SIZE, num_warps) pairs the autotuner times on a GPU, keyed by the element count."""


# ---------------------------------------------------------------------------------------------
# Lowering rules: normalized arguments (tensors as Triton expressions) -> Triton expression.


def _expr(value: Any) -> str:
    """A Triton expression for an argument: an expression already (a tensor) or a number."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NotLowerable(f"argument {value!r} is neither a tensor nor a number")
    if not math.isfinite(value):
        raise NotLowerable(f"non-finite scalar {value!r}")
    return repr(float(value))  # everything computes in fp32


def _scaled(value: Any, alpha: Any) -> str:
    return _expr(value) if alpha == 1 else f"{_expr(alpha)} * {_expr(value)}"


def _binary(operator: str) -> Callable[[dict], str]:
    return lambda a: f"({_expr(a['self'])} {operator} {_expr(a['other'])})"


def _unary(template: str) -> Callable[[dict], str]:
    return lambda a: template.format(x=_expr(a["self"]))


def _tanh(x: str) -> str:
    # tl.math has no tanh and libdevice does not run under the interpreter: tanh(x) = 2σ(2x) - 1
    return f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"


def _pow(a: dict) -> str:
    x, exponent = _expr(a["self"]), a["exponent"]
    if isinstance(exponent, str):
        raise NotLowerable("pow with a tensor exponent")
    special = {0: f"(tl.zeros_like({x}) + 1.0)", 0.5: f"tl.sqrt({x})", 1: x, 2: f"({x} * {x})", 3: f"({x} * {x} * {x})", -1: f"(1.0 / {x})"}
    if exponent in special:
        return special[exponent]
    if float(exponent).is_integer():  # defined for negative bases: |x|^e, negated for odd e
        magnitude = f"tl.exp2({_expr(exponent)} * tl.log2(tl.abs({x})))"
        return f"tl.where({x} < 0, -{magnitude}, {magnitude})" if int(exponent) % 2 else magnitude
    return f"tl.exp2({_expr(exponent)} * tl.log2({x}))"  # NaN for negative bases, as in ATen


def _gelu(a: dict) -> str:
    x = _expr(a["self"])
    if a["approximate"] == "tanh":
        return f"(0.5 * {x} * (1.0 + {_tanh(f'0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})')}))"
    return f"(0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476)))"


def _clamp(a: dict) -> str:
    out = _expr(a["self"])
    if a.get("min") is not None:
        out = f"tl.maximum({out}, {_expr(a['min'])})"
    if a.get("max") is not None:
        out = f"tl.minimum({out}, {_expr(a['max'])})"
    return out


_TRITON_DTYPES = {
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
}


def _cast(a: dict) -> str:
    """Round to the target dtype, then go on in fp32 (bool stays a Triton int1 mask)."""
    x, dtype = _expr(a["self"]), a["dtype"]
    if dtype is None or dtype in (torch.float32, torch.float64):  # fp64 computes in fp32 like all else
        return x
    if dtype == torch.bool:
        return f"({x} != 0)"
    if dtype not in _TRITON_DTYPES:
        raise NotLowerable(f"cast to {dtype}")
    return f"{x}.to({_TRITON_DTYPES[dtype]}).to(tl.float32)"


def _where(a: dict) -> str:
    return f"tl.where({_expr(a['condition'])} != 0, {_expr(a['self'])}, {_expr(a['other'])})"


def _dropout(a: dict) -> str:
    if a["train"]:
        raise NotLowerable("dropout in training mode")
    return _expr(a["input"])


LOWERINGS: dict[Any, Callable[[dict[str, Any]], str]] = {
    aten.add.Tensor: lambda a: f"({_expr(a['self'])} + {_scaled(a['other'], a['alpha'])})",
    aten.add.Scalar: lambda a: f"({_expr(a['self'])} + {_scaled(a['other'], a['alpha'])})",
    aten.sub.Tensor: lambda a: f"({_expr(a['self'])} - {_scaled(a['other'], a['alpha'])})",
    aten.sub.Scalar: lambda a: f"({_expr(a['self'])} - {_scaled(a['other'], a['alpha'])})",
    aten.rsub.Scalar: lambda a: f"({_scaled(a['other'], 1)} - {_scaled(a['self'], a['alpha'])})",
    aten.mul.Tensor: _binary("*"),
    aten.mul.Scalar: _binary("*"),
    aten.div.Tensor: _binary("/"),
    aten.div.Scalar: _binary("/"),
    aten.neg.default: _unary("(-{x})"),
    aten.abs.default: _unary("tl.abs({x})"),
    aten.exp.default: _unary("tl.exp({x})"),
    aten.log.default: _unary("tl.log({x})"),
    aten.sqrt.default: _unary("tl.sqrt({x})"),
    aten.rsqrt.default: _unary("tl.math.rsqrt({x})"),
    aten.pow.Tensor_Scalar: _pow,
    aten.reciprocal.default: _unary("(1.0 / {x})"),
    aten.sin.default: _unary("tl.sin({x})"),
    aten.cos.default: _unary("tl.cos({x})"),
    aten.erf.default: _unary("tl.math.erf({x})"),
    aten.maximum.default: lambda a: f"tl.maximum({_expr(a['self'])}, {_expr(a['other'])})",
    aten.minimum.default: lambda a: f"tl.minimum({_expr(a['self'])}, {_expr(a['other'])})",
    aten.logical_not.default: _unary("({x} == 0)"),
    aten.logical_and.default: lambda a: f"(({_expr(a['self'])} != 0) & ({_expr(a['other'])} != 0))",
    aten.logical_or.default: lambda a: f"(({_expr(a['self'])} != 0) | ({_expr(a['other'])} != 0))",
    aten.relu.default: _unary("tl.maximum({x}, 0.0)"),
    aten.sigmoid.default: _unary("tl.sigmoid({x})"),
    aten.tanh.default: lambda a: _tanh(_expr(a["self"])),
    aten.silu.default: _unary("({x} * tl.sigmoid({x}))"),
    aten.gelu.default: _gelu,
    aten.where.self: _where,
    aten.where.ScalarOther: _where,
    aten.clamp.default: _clamp,
    aten.clamp.Tensor: _clamp,
    aten.clamp_min.default: lambda a: _clamp({"self": a["self"], "min": a["min"]}),
    aten.clamp_max.default: lambda a: _clamp({"self": a["self"], "max": a["max"]}),
    aten._to_copy.default: _cast,
    aten.to.dtype: _cast,
    aten.to.dtype_layout: _cast,  # the partitioner keeps device moves out of regions
    aten.to.device: _cast,
    aten.dropout.default: _dropout,
}
# Bitwise ops on booleans are logical ops (masks); on integers they stay ATen (see lower_node).
_AND = LOWERINGS[aten.logical_and.default]
_OR = LOWERINGS[aten.logical_or.default]
BOOLEAN_ONLY = {aten.bitwise_and.Tensor, aten.__and__.Tensor, aten.bitwise_or.Tensor, aten.__or__.Tensor, aten.bitwise_not.default}
LOWERINGS.update(dict.fromkeys([aten.bitwise_and.Tensor, aten.__and__.Tensor], _AND))
LOWERINGS.update(dict.fromkeys([aten.bitwise_or.Tensor, aten.__or__.Tensor], _OR))
LOWERINGS[aten.bitwise_not.default] = LOWERINGS[aten.logical_not.default]
for _name, _operator in {"lt": "<", "gt": ">", "le": "<=", "ge": ">=", "eq": "==", "ne": "!="}.items():
    for _overload in ("Tensor", "Scalar"):
        LOWERINGS[getattr(getattr(aten, _name), _overload)] = _binary(_operator)


def _dtype(node: Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def lower_node(node: Node, names: dict[Node, str]) -> str:
    """The Triton expression computing pointwise ``node`` from its arguments, which are named by
    ``names`` (a Triton variable per node: a value loaded or computed in fp32) or are numbers."""
    rule = LOWERINGS.get(node.target)
    if rule is None:
        raise NotLowerable(f"no Triton lowering for {node.target}")
    if node.target in BOOLEAN_ONLY and any(_dtype(a) not in (torch.bool, None) for a in node.all_input_nodes):
        raise NotLowerable(f"{node.target} of integers (values are computed in fp32: no bits to operate on)")
    args = {key: names[value] if isinstance(value, Node) else value for key, value in normalized_args(node).items()}
    if any(isinstance(value, (list, tuple)) and any(isinstance(v, Node) for v in value) for value in args.values()):
        raise NotLowerable(f"{node.target} takes a list of tensors")
    return rule(args)


# ---------------------------------------------------------------------------------------------
# Source generation.

_RESERVED = {"pid", "offsets", "mask", "n_elements", "BLOCK_SIZE", "tl", "triton"}
_RESERVED_PATTERN = r"(size|i|rest|out)\d+|.*_ptr|.*_stride\d+"
"""Kernel-local names a node's name must not take (it gets a trailing underscore instead)."""


def unravel(flat: str, rank: int) -> list[str]:
    """Kernel lines splitting the row-major index ``flat`` into coordinates ``i0 .. i{rank-1}`` over
    the sizes ``size1 .. size{rank-1}`` (kernel arguments; the leading size is never needed)."""
    lines, inner = [], flat
    for d in reversed(range(1, rank)):
        lines += [f"    i{d} = {inner} % size{d}", f"    rest{d} = {inner} // size{d}"]
        inner = f"rest{d}"
    return [*lines, f"    i0 = {inner}"]


def _generate(gm: GraphModule) -> str:
    """The kernel of a :attr:`KernelRegion.kernel_graph`: its placeholders are the operands, all
    of the output's shape (any strides), its output the tuple of values to store."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    outputs = list(gm.graph.output_node().args[0])
    names: dict[Node, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            raise NotLowerable(f"{node.op} node {node.name}")
        names[node] = node.name + "_" if node.name in _RESERVED or re.fullmatch(_RESERVED_PATTERN, node.name) else node.name

    dims = range(MAX_RANK)
    params = [f"{names[p]}_ptr" for p in placeholders] + [f"out{k}_ptr" for k in range(len(outputs))]
    params += [f"size{d}" for d in dims[1:]]
    params += [f"{names[p]}_stride{d}" for p in placeholders for d in dims]
    params += ["n_elements", "BLOCK_SIZE: tl.constexpr"]
    lines = ["@triton.jit", "def fused_pointwise_kernel(", *[f"    {param}," for param in params], "):"]
    lines += [
        "    pid = tl.program_id(axis=0).to(tl.int64)  # 64-bit offsets: the output may exceed 2**31 elements",
        "    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)",
        "    mask = offsets < n_elements",
        f"    # Coordinates of each output element, row-major over the {MAX_RANK}-D output.",
    ]
    lines += unravel("offsets", MAX_RANK)
    lines.append("    # Each input read through its own strides (0 along broadcast dimensions), computed in fp32.")
    for p in placeholders:
        index = " + ".join(f"i{d} * {names[p]}_stride{d}" for d in dims)
        lines.append(f"    {names[p]} = tl.load({names[p]}_ptr + {index}, mask=mask, other=0).to(tl.float32)")

    lines.append("    # The region's ops, one per line.")
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        lines.append(f"    {names[node]} = {lower_node(node, names)}")

    lines.append("    # Contiguous outputs, in their own dtype.")
    for k, out in enumerate(outputs):
        lines.append(f"    tl.store(out{k}_ptr + offsets, {names[out]}.to(out{k}_ptr.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


def region_source(gm: GraphModule) -> str:
    """The ``@triton.jit`` kernel computing the region, as Python source (raises :class:`NotLowerable`)."""
    return _generate(KernelRegion(gm).kernel_graph)


# ---------------------------------------------------------------------------------------------
# Compilation and launch.

_KERNELS: dict[str, Any] = {}


def load_kernel(source: str, name: str, gpu_configs: list[triton.Config], autotune_key: list[str], prune: Callable | None = None) -> Any:
    """The ``@triton.jit`` function ``name`` defined by ``source``, cached by a hash of the source
    and its launch configuration; on a GPU wrapped in ``triton.autotune(gpu_configs, autotune_key)``
    (``prune(configs, named_args, **kwargs) -> configs``: its ``early_config_prune``).

    It is written to a file and imported, since ``triton.jit`` reads its function's source file.
    Under the interpreter the caller passes fixed block sizes at launch instead of autotuning.
    """
    interpreting = interpreted()
    launch_config = "interpreted" if interpreting else f"autotune {[str(c) for c in gpu_configs]} on {autotune_key}"
    key = hashlib.sha256(f"{source}\n{launch_config}".encode()).hexdigest()[:24]
    if key not in _KERNELS:
        directory = Path(tempfile.gettempdir()) / "graphopt_triton_codegen"
        directory.mkdir(exist_ok=True)
        path = directory / f"kernel_{key}.py"
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(f"import triton\nimport triton.language as tl\n\n\n{source}")
        os.replace(staging, path)  # atomic: concurrent processes never import a half-written file
        spec = importlib.util.spec_from_file_location(f"graphopt_triton_kernel_{key}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        kernel = getattr(module, name)
        if not interpreting:
            prune_configs_by = {"early_config_prune": prune} if prune else None
            kernel = triton.autotune(configs=gpu_configs, key=autotune_key, prune_configs_by=prune_configs_by)(kernel)
        _KERNELS[key] = kernel
    return _KERNELS[key]


def load_template_kernel(
    source: str,
    name: str,
    gpu_configs: Sequence[Sequence[int]],
    params: Sequence[str],
    autotune_key: list[str],
    *,
    constants: dict[str, Any] | None = None,
    prune: Callable | None = None,
) -> Any:
    """:func:`load_kernel` for a template that declares its GPU configs as a table.

    Each row of ``gpu_configs`` is one ``triton.Config``: its first ``len(params)`` values are the
    meta-parameters named by ``params`` (block sizes), the next ``num_warps`` and, when present,
    ``num_stages``. ``constants`` are meta-parameters every config sets alike; ``autotune_key`` and
    ``prune`` are :func:`load_kernel`'s.
    """
    configs = []
    for row in gpu_configs:
        meta = {**dict(zip(params, row)), **(constants or {})}
        launch = dict(zip(("num_warps", "num_stages"), row[len(params) :]))
        configs.append(triton.Config(meta, **launch))
    return load_kernel(source, name, configs, autotune_key, prune=prune)


def collapse_dims(shape: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dimensions and merge neighbours every operand walks as one (``stride[d] == stride[d+1] * size[d+1]``)."""
    kept = [d for d, size in enumerate(shape) if size != 1]
    sizes, merged = [shape[d] for d in kept], [[s[d] for d in kept] for s in strides]
    d = len(sizes) - 2
    while d >= 0:
        if all(s[d] == s[d + 1] * sizes[d + 1] for s in merged):
            sizes[d : d + 2] = [sizes[d] * sizes[d + 1]]
            for s in merged:
                s[d : d + 2] = [s[d + 1]]
        d -= 1
    return sizes, merged


def compile_region(gm: GraphModule) -> Callable[..., Any]:
    """A function computing ``gm(*inputs)`` with one launch of the generated Triton kernel.

    The source is generated (and :class:`NotLowerable` raised) here, once; shapes, strides and
    dtypes are read from the inputs at every call. The iteration space is the shape of the first
    computed output; the other outputs must have as many elements. It returns a tensor or a
    tuple, like ``gm``.
    """
    region = KernelRegion(gm)
    kernel = load_template_kernel(_generate(region.kernel_graph), "fused_pointwise_kernel", GPU_CONFIGS, ["BLOCK_SIZE"], ["n_elements"])
    computed = list(region.kernel_graph.graph.output_node().args[0])

    def launch(*inputs: Any) -> Any:
        values = region.bind(inputs)
        shape = values[region.original[computed[0]]].shape
        n_elements = math.prod(shape)
        for node in computed:
            if values[region.original[node]].numel() != n_elements:
                raise NotLowerable(f"the outputs {node.name} and {computed[0].name} differ in size")
        operands = [region.operand_tensor(values, operand, shape) for operand in region.operands]
        device = next((t.device for t in operands), None) or next(t.device for t in inputs if isinstance(t, torch.Tensor))
        results = [torch.empty(shape, dtype=values[region.original[node]].dtype, device=device) for node in computed]
        if n_elements:
            sizes, strides = collapse_dims(list(shape), [list(t.stride()) for t in operands] + [list(results[0].stride())])
            if len(sizes) > MAX_RANK:
                raise NotLowerable(f"the output {tuple(shape)} does not collapse to {MAX_RANK} dimensions")
            pad = MAX_RANK - len(sizes)
            sizes = [1] * pad + sizes
            flat_strides = [stride for s in strides[: len(operands)] for stride in [0] * pad + s]
            grid = lambda meta: (triton.cdiv(n_elements, meta["BLOCK_SIZE"]),)  # noqa: E731
            options = {"BLOCK_SIZE": BLOCK_SIZE, "num_warps": 4} if interpreted() else {}
            kernel[grid](*operands, *results, *sizes[1:], *flat_strides, n_elements, **options)
        return region.results(values, results)

    return launch
