"""Fusion partitioning of the canonical IR: which ATen ops one generated kernel can run together.

The method is the classic one of fusing compilers (XLA's and TVM's operator fusion, inductor's
scheduler): every op gets a *kind* (:func:`op_kind`), then ops are merged greedily along
producer -> consumer edges into the largest regions that one kernel can compute:

* ``pointwise``: a DAG of elementwise ops, with the views between them (pure index arithmetic);
* ``reduction`` / ``norm``: one row reduction (over the last dim) or one normalization
  (layer_norm, rms_norm, softmax over the last dim) with its pointwise prologue and epilogue;
* ``matmul_epilogue``: one matmul/linear at the head and the pointwise ops after it (bias,
  activation, residual add).

A merge is legal only if the merged region keeps those shapes (at most one reduction, norm or
heavy op; a heavy op only at the head) and creates no cycle: no path between the two groups through
an op outside both. Groups live in a :mod:`networkx` quotient DAG of the graph, so the cycle test is
a ``has_path`` after dropping the direct edges, and a merge is ``contracted_nodes``.

Why not ``torch.fx``'s ``CapabilityBasedPartitioner``: it merges every supported node it can, with
no notion of what a region may contain, so "one reduction per region" and "heavy op at the head"
would have to be restored by splitting its partitions afterwards, and a split needs the very same
cycle check among the pieces. Checking each merge as it happens is simpler and gives the same
maximal acyclic regions. ``fuse_by_partitions`` (the same infrastructure's back half) then turns
regions into ``call_module`` submodules.

:func:`fusion_stats` counts what fusion saves: kernels launched and an analytic memory traffic
(bytes read + written, from ``meta["val"]``) of each fused kernel vs the unfused ops it replaces.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Union

import networkx as nx
import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from graphopt.ir import aten, clone_graph_module, normalized_args
from graphopt.ir.oprecord import op_record

__all__ = ["KINDS", "Region", "fuse_regions", "fusion_stats", "op_kind", "partition", "register_kind"]

KINDS = ("pointwise", "reduction", "norm", "view", "heavy", "opaque")

KindRule = Union[str, Callable[[Node], str]]

# ----------------------------------------------------------------------------- classification


def _ndim(value) -> int | None:
    val = value.meta.get("val") if isinstance(value, Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _is_last_dim(node: Node, dim) -> bool:
    """Whether ``dim`` (an int or a one-element list) names the last dim of the node's input."""
    ndim = _ndim(node.args[0])
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return ndim is not None and isinstance(dim, int) and dim % max(ndim, 1) == ndim - 1


def _last_dim_reduction(node: Node) -> str:
    return "reduction" if _is_last_dim(node, normalized_args(node).get("dim")) else "opaque"


def _last_dim_norm(node: Node) -> str:
    return "norm" if _is_last_dim(node, normalized_args(node)["dim"]) else "opaque"


def _norm_over_last_dim(node: Node) -> str:
    # layer_norm/rms_norm normalize over len(normalized_shape) trailing dims: one row = one dim.
    shape = normalized_args(node)["normalized_shape"]
    return "norm" if shape is not None and len(shape) == 1 else "opaque"


def _dropout(node: Node) -> str:
    args = normalized_args(node)
    return "pointwise" if not args["train"] or args["p"] == 0 else "opaque"


def _cast(node: Node) -> str:
    # A device move is a copy between memories, not something a kernel computes.
    args = normalized_args(node)
    device = args.get("device")
    source = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    moves = device is not None and source is not None and torch.device(device) != source.device
    return "opaque" if moves else "pointwise"


_POINTWISE = [
    aten.add,
    aten.sub,
    aten.rsub,
    aten.mul,
    aten.div,
    aten.neg,
    aten.pow,
    aten.sqrt,
    aten.rsqrt,
    aten.exp,
    aten.log,
    aten.abs,
    aten.reciprocal,
    aten.sin,
    aten.cos,
    aten.erf,
    aten.maximum,
    aten.minimum,
    aten.eq,
    aten.ne,
    aten.lt,
    aten.le,
    aten.gt,
    aten.ge,
    aten.logical_and,
    aten.logical_or,
    aten.logical_not,
    aten.bitwise_and,
    aten.bitwise_or,
    aten.bitwise_not,
    aten.__and__,
    aten.__or__,
    aten.where,
    aten.masked_fill,
    aten.gelu,
    aten.silu,
    aten.relu,
    aten.sigmoid,
    aten.tanh,
    aten.clamp,
    aten.clamp_min,
    aten.clamp_max,
    aten.type_as,
]
_VIEWS = [
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.permute,
    aten.transpose,
    aten.t,
    aten.expand,
    aten.unsqueeze,
    aten.squeeze,
    aten.slice,
    aten.select,
    aten.flatten,
    aten.alias,
    aten.contiguous,
    aten.clone,
]
_HEAVY = [
    aten.linear,
    aten.matmul,
    aten.mm,
    aten.bmm,
    aten.addmm,
    aten.baddbmm,
    aten.conv1d,
    aten.conv2d,
    aten.conv3d,
    aten.convolution,
    aten.conv_transpose1d,
    aten.conv_transpose2d,
    aten.scaled_dot_product_attention,
    aten.embedding,
]
# Heavy ops a generated kernel can take a pointwise epilogue after (a GEMM's output tile).
EPILOGUE_HEADS = {aten.linear, aten.matmul, aten.mm, aten.bmm, aten.addmm, aten.baddbmm}

_TABLE: dict[object, KindRule] = {
    **dict.fromkeys(_POINTWISE, "pointwise"),
    **dict.fromkeys(_VIEWS, "view"),
    **dict.fromkeys(_HEAVY, "heavy"),
    **dict.fromkeys([aten.sum, aten.mean, aten.amax, aten.amin, aten.var], _last_dim_reduction),
    **dict.fromkeys([aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax], _last_dim_norm),
    **dict.fromkeys([aten.layer_norm, aten.rms_norm], _norm_over_last_dim),
    aten.dropout: _dropout,
    aten._to_copy: _cast,
    aten.to: _cast,
}


def register_kind(target, kind: KindRule) -> None:
    """Classify ``target`` (an overload, or a packet for all its overloads) as ``kind``: one of
    :data:`KINDS`, or ``fn(node) -> kind`` for a kind that depends on the call's arguments."""
    if isinstance(kind, str) and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    _TABLE[target] = kind


def _writes_in_place(node: Node) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in node.target._schema.arguments)


def op_kind(node: Node) -> str:
    """The fusion kind of ``node`` (one of :data:`KINDS`): from the table (:func:`register_kind`),
    else from the op's record (``OpRecord.partition_kind``); anything in neither, anything writing
    in place and anything not an ATen/torch.library call is ``"opaque"``."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return "opaque"
    rule = _TABLE.get(node.target, _TABLE.get(node.target.overloadpacket))
    if rule is None:
        record = op_record(node.target)
        rule = record.partition_kind if record is not None and record.partition_kind is not None else "opaque"
    if _writes_in_place(node):
        return "opaque"
    return rule(node) if callable(rule) else rule


# ----------------------------------------------------------------------------- regions


@dataclasses.dataclass
class Region:
    """One fused kernel: ``nodes`` in graph order, the values it reads (``inputs``: nodes outside
    it) and those used after it (``outputs``: its nodes with a user outside it), in graph order."""

    kind: str
    nodes: list[Node]
    inputs: list[Node]
    outputs: list[Node]


_ANCHORS = {"reduction", "norm", "heavy"}


def _legal(members: list[Node], kinds: dict[Node, str]) -> bool:
    """At most one reduction/norm/heavy op; a heavy op only as an epilogue head, i.e. with every
    other member downstream of it inside the region."""
    anchors = [n for n in members if kinds[n] in _ANCHORS]
    if len(anchors) > 1:
        return False
    if not anchors or kinds[anchors[0]] != "heavy":
        return True
    head = anchors[0]
    if len(members) > 1 and head.target.overloadpacket not in EPILOGUE_HEADS:
        return False
    inside = set(members)
    reached, frontier = {head}, [head]
    while frontier:
        for user in frontier.pop().users:
            if user in inside and user not in reached:
                reached.add(user)
                frontier.append(user)
    return reached == inside


def _creates_cycle(dag: nx.DiGraph, a: Node, b: Node) -> bool:
    """Whether merging groups ``a`` and ``b`` of the quotient DAG closes a cycle: a path between
    them through some other group."""
    direct = [(u, v) for u, v in ((a, b), (b, a)) if dag.has_edge(u, v)]
    dag.remove_edges_from(direct)
    cycle = nx.has_path(dag, a, b) or nx.has_path(dag, b, a)
    dag.add_edges_from(direct)
    return cycle


def _region_kind(members: list[Node], kinds: dict[Node, str]) -> str:
    found = {kinds[n] for n in members}
    if "heavy" in found:
        return "matmul_epilogue"
    return next((k for k in ("norm", "reduction") if k in found), "pointwise")


def _worth_a_kernel(members: list[Node], kinds: dict[Node, str]) -> bool:
    # Views alone are metadata; a heavy op with no pointwise epilogue is best left to its library
    # kernel (the views after it stay views of its output).
    computing = [n for n in members if kinds[n] != "view"]
    return bool(computing) and not (len(computing) == 1 and kinds[computing[0]] == "heavy")


def partition(gm: GraphModule) -> list[Region]:
    """The fused regions of ``gm``, in graph order of their first node; ops in none stay ATen calls."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    kinds = {n: op_kind(n) for n in gm.graph.nodes}
    fusible = {n for n, k in kinds.items() if k != "opaque"}

    dag = nx.DiGraph()  # quotient graph: one node per group, named by a representative fx node
    dag.add_nodes_from(gm.graph.nodes)
    dag.add_edges_from((p, n) for n in gm.graph.nodes for p in n.all_input_nodes)
    group = {n: n for n in gm.graph.nodes}
    members = {n: [n] for n in gm.graph.nodes}

    for node in gm.graph.nodes:
        if node not in fusible:
            continue
        for producer in node.all_input_nodes:
            mine, theirs = group[node], group[producer]
            if producer not in fusible or mine is theirs:
                continue
            merged = sorted(members[mine] + members[theirs], key=order.__getitem__)
            if not _legal(merged, kinds) or _creates_cycle(dag, theirs, mine):
                continue
            nx.contracted_nodes(dag, theirs, mine, self_loops=False, copy=False)
            for n in members.pop(mine):
                group[n] = theirs
            members[theirs] = merged

    regions = []
    for nodes in sorted(members.values(), key=lambda ns: order[ns[0]]):
        if nodes[0] not in fusible or not _worth_a_kernel(nodes, kinds):
            continue
        inside = set(nodes)
        inputs = sorted({p for n in nodes for p in n.all_input_nodes if p not in inside}, key=order.__getitem__)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        regions.append(Region(_region_kind(nodes, kinds), nodes, inputs, outputs))
    return regions


def fuse_regions(gm: GraphModule, regions: list[Region] | None = None) -> GraphModule:
    """A copy of ``gm`` with each region (default: :func:`partition`'s) as one ``call_module`` node
    of a submodule ``fused_<i>`` (``meta["region_kind"]`` says its kind); other ops stay as they are."""
    regions = partition(gm) if regions is None else regions
    fused = clone_graph_module(gm)
    by_name = {n.name: n for n in fused.graph.nodes}
    fuse_by_partitions(fused, [dict.fromkeys(by_name[n.name] for n in r.nodes) for r in regions], prefix="fused_")
    for node in fused.graph.nodes:
        if node.op == "call_module" and node.target.startswith("fused_"):
            node.meta["region_kind"] = regions[int(node.target.removeprefix("fused_"))].kind
    fused.recompile()
    return fused


# ----------------------------------------------------------------------------- what fusion saves


def _bytes(node: Node) -> int:
    """Bytes of the tensor(s) a node produces (a tuple output counts each tensor)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return sum(int(v.numel()) * v.element_size() for v in vals if isinstance(v, torch.Tensor))


def _is_aten_op(node: Node) -> bool:
    return node.op == "call_function" and node.target is not operator.getitem


def fusion_stats(gm: GraphModule, regions: list[Region] | None = None) -> dict:
    """What fusing ``gm`` saves: ``aten_ops`` (op calls before), ``kernels`` (regions after),
    ``ops_left_to_aten``, ``regions_by_kind``, and the memory traffic of the fused regions:
    ``bytes_fused`` (each kernel reads its inputs once and writes its outputs once) vs
    ``bytes_unfused`` (each non-view op of those regions reads its inputs and writes its output;
    views cost no traffic), both summed over the model."""
    regions = partition(gm) if regions is None else regions
    kinds = {n: op_kind(n) for n in gm.graph.nodes}
    in_regions = {n for r in regions for n in r.nodes}
    fused = sum(sum(map(_bytes, r.inputs)) + sum(map(_bytes, r.outputs)) for r in regions)
    unfused = sum(sum(map(_bytes, n.all_input_nodes)) + _bytes(n) for n in in_regions if kinds[n] != "view")
    by_kind: dict[str, int] = {}
    for r in regions:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    return {
        "aten_ops": sum(map(_is_aten_op, gm.graph.nodes)),
        "kernels": len(regions),
        "ops_left_to_aten": sum(_is_aten_op(n) and n not in in_regions for n in gm.graph.nodes),
        "regions_by_kind": by_kind,
        "bytes_unfused": unfused,
        "bytes_fused": fused,
        "bytes_saved": unfused - fused,
    }
