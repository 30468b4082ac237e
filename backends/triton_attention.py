"""The triton backend's attention template: an ``aten.scaled_dot_product_attention`` call as a region
run by the static FlashAttention kernel of :mod:`graphopt.ops.flash_attention`.

The kernel (online softmax; causal, boolean and additive masks as ``tl.constexpr`` variants;
strided and broadcast inputs; grouped-query attention; zeros for fully masked rows, as ATen's CPU
SDPA gives) is documented in :mod:`graphopt.ops.flash_attention.triton`. This module is the graph
side: :func:`attention_region` cuts a region holding one SDPA call out of a larger graph,
:func:`compile_attention_region` turns such a region into a launcher of
:func:`~graphopt.ops.flash_attention.triton.flash_attention` (the output laid out with the strides
ATen's meta kernel gives it, the layout the captured graph was traced with), and
:func:`attention_region_source` is the kernel source shown for the region (``graphopt dump``).

:class:`NotLowerable` is raised (when compiling, or at a call before anything launches) for what
the kernel does not do: dropout, a mask together with ``is_causal``, mismatched batch or head
counts, ranks other than 3 or 4, dtypes other than fp16/bf16/fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from graphopt.backends.triton_codegen import NotLowerable
from graphopt.ir import aten, normalized_args
from graphopt.ops.flash_attention import triton as flash

__all__ = ["attention_inputs", "attention_region", "attention_region_source", "compile_attention_region"]

SDPA = aten.scaled_dot_product_attention.default

_TENSOR_ARGS = ("query", "key", "value", "attn_mask")


# ---------------------------------------------------------------------------------------------
# Regions.


def _sdpa_args(node: Node) -> dict[str, Any]:
    if node.op != "call_function" or node.target != SDPA:
        raise ValueError(f"{node.name} is not a call of {SDPA}")
    return normalized_args(node)


def attention_inputs(node: Node) -> list[Node]:
    """The tensor arguments of SDPA ``node``: query, key, value and ``attn_mask`` when it has one,
    one entry per argument (a node passed twice, e.g. as query and key, appears twice)."""
    args = _sdpa_args(node)
    return [args[name] for name in _TENSOR_ARGS if isinstance(args[name], Node)]


def attention_region(node: Node) -> GraphModule:
    """A region computing SDPA ``node`` alone: one placeholder per :func:`attention_inputs` entry,
    in that order (named query, key, value, attn_mask), and the node's other arguments as
    constants. Call it, or the launcher of :func:`compile_attention_region`, with the values of
    ``attention_inputs(node)``."""
    args = _sdpa_args(node)
    graph = Graph()
    tensors = {}
    for name in _TENSOR_ARGS:
        if isinstance(args[name], Node):
            tensors[name] = graph.placeholder(name)
            if "val" in args[name].meta:
                tensors[name].meta["val"] = args[name].meta["val"]
    constants = {name: value for name, value in args.items() if name not in _TENSOR_ARGS}
    query_key_value = tuple(tensors[name] for name in _TENSOR_ARGS[:3])
    call = graph.call_function(SDPA, query_key_value, {"attn_mask": tensors.get("attn_mask"), **constants})
    if "val" in node.meta:
        call.meta["val"] = node.meta["val"]
    graph.output(call)
    return GraphModule(torch.nn.Module(), graph)


def _region_call(region: GraphModule) -> tuple[dict[str, Any], list[Node]]:
    """The SDPA call's normalized arguments and the region's placeholders (raises NotLowerable)."""
    nodes = list(region.graph.nodes)
    calls = [node for node in nodes if node.op == "call_function"]
    if len(calls) != 1 or calls[0].target != SDPA:
        raise NotLowerable(f"the region is not one {SDPA} call: {[str(node.target) for node in calls]}")
    if any(node.op not in ("placeholder", "call_function", "output") for node in nodes):
        raise NotLowerable("the region holds nodes other than placeholders and the call")
    call, output = calls[0], region.graph.output_node()
    if output.args[0] is not call:
        raise NotLowerable("the region does not return the SDPA result itself")
    args = normalized_args(call)
    for name, value in args.items():
        is_tensor_arg = name in _TENSOR_ARGS and value is not None
        if is_tensor_arg and not (isinstance(value, Node) and value.op == "placeholder"):
            raise NotLowerable(f"SDPA's {name} is not a region input")
        if not is_tensor_arg and isinstance(value, Node):
            raise NotLowerable(f"SDPA's {name} is a graph value, not a constant")
    return args, [node for node in nodes if node.op == "placeholder"]


def _mask_kind(mask: Node | None) -> str:
    """The kernel's ``MASK_KIND`` for the traced mask (its dtype in ``meta["val"]``)."""
    if mask is None:
        return "none"
    val = mask.meta.get("val")
    return "bool" if val is not None and val.dtype == torch.bool else "additive"


def attention_region_source(region: GraphModule) -> str:
    """The kernel :func:`compile_attention_region` launches for ``region``: the static
    ``attention_fwd_kernel``'s source, after a comment naming the variant (``tl.constexpr``
    values) the region's traced inputs select."""
    args, _ = _region_call(region)
    variant = f"CAUSAL={bool(args['is_causal'])}, MASK_KIND={_mask_kind(args['attn_mask'])!r}, VARLEN=False"
    precision = 'INPUT_PRECISION="ieee" for fp32 inputs, "tf32" for fp16/bf16'
    return f"# This region launches attention_fwd_kernel with {variant};\n# {precision} (graphopt.ops.flash_attention).\n{flash.kernel_source()}"


def compile_attention_region(region: GraphModule) -> Callable[..., torch.Tensor]:
    """A function computing ``region(*inputs)`` with one launch of the fused attention kernel.

    ``region`` holds one ``aten.scaled_dot_product_attention.default`` call whose tensor arguments
    are its placeholders and whose other arguments are constants (see :func:`attention_region`).
    Unsupported constants raise :class:`NotLowerable` here; unsupported inputs raise it at the
    call, before anything launches. The kernel variant is picked by the mask's dtype at the call.
    """
    args, placeholders = _region_call(region)
    if args["dropout_p"] != 0:
        raise NotLowerable(f"dropout_p={args['dropout_p']}: the kernel has no dropout")
    causal, scale, enable_gqa = bool(args["is_causal"]), args["scale"], bool(args["enable_gqa"])
    if causal and args["attn_mask"] is not None:
        raise NotLowerable("attn_mask together with is_causal")
    if scale is not None and not math.isfinite(scale):
        raise NotLowerable(f"scale={scale}")
    position = {name: placeholders.index(args[name]) for name in _TENSOR_ARGS if args[name] is not None}

    def launch(*inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(placeholders):
            raise TypeError(f"the region takes {len(placeholders)} tensors, not {len(inputs)}")
        q, k, v = (inputs[position[name]] for name in _TENSOR_ARGS[:3])
        attn_mask = inputs[position["attn_mask"]] if "attn_mask" in position else None
        flash.check_attention_inputs(q, k, v, attn_mask, enable_gqa)
        # ATen's shape rules and output layout, from its meta kernel: no data is touched.
        metas = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in inputs]
        try:
            out_meta = region(*metas)
        except RuntimeError as exc:
            raise NotLowerable(f"ATen rejects these inputs: {exc}") from exc
        out = torch.empty_strided(out_meta.shape, out_meta.stride(), dtype=out_meta.dtype, device=q.device)
        return flash.flash_attention(q, k, v, attn_mask, is_causal=causal, scale=scale, enable_gqa=enable_gqa, out=out)

    return launch
