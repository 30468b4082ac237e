"""``attention_to_sparse``: softmax attention -> sliding-window + global attention, or block-sparse attention.

Longformer (Beltagy et al., "Longformer: The Long-Document Transformer", 2020) replaces full
attention by a sliding window of ``window`` neighbours plus ``global_tokens`` global tokens (CLS)
that attend to and are attended by every token; BigBird (Zaheer et al. 2020) computes the same
pattern on blocks, and Sparse Transformers (Child et al. 2019) attend through a fixed block layout.
Each query then sees ``O(window)`` keys instead of ``S``::

    out_i = Σ_{j ∈ V(i)} softmax_j(q_i·k_j · scale + m_ij) v_j

``pattern="window"``: ``V(i)`` = the window (``|i − j| <= window // 2``, or ``i − window < j <= i``
for causal attention) ∪ ``{j < g}`` ∪ (everything when ``i < g``), ``g = global_tokens``:
``graphopt::window_attention``. ``pattern="block"``: the same pattern on blocks of
``block_size`` (BigBird's sliding and global blocks, without its random blocks, so the graph stays
deterministic): key block ``kb`` is visible from query block ``qb`` iff
``|qb − kb| <= ceil((window // 2) / bs)`` (causal: ``0 <= qb − kb <= ceil((window − 1) / bs)``) or
either block holds a global token: ``graphopt::block_sparse_attention``, its layout built in the
graph from the sequence lengths (``arange`` over the block starts), so it follows the input's length.

Rewritten: canonical ``aten.scaled_dot_product_attention.default`` nodes with 4-D operands (SDPA's
``attn_mask`` and ``is_causal`` carry over; grouped-query attention too), and, after
``remove_padding``, ``graphopt.varlen_attention`` nodes (window pattern only:
``graphopt::varlen_window_attention``, windows and global tokens per sequence). Not rewritten, each
with its reason: dropout (training), operands that are not 4-D, heads that do not group, and an
attention whose sequence is static and no longer than the pattern covers ("no-op, every key already
visible"). A sequence of dynamic length is rewritten even where the example's is covered (longer
inputs then attend sparsely); the stats say per layer whether the rewrite is ``exact`` on the
example (every pair visible) and the fraction of pairs it keeps.

Causal attention is ``is_causal`` or a mask that hides every later key (a decoder's causal mask built
into the tensor: Hugging Face's Llama passes SDPA a ``[B, 1, L, L]`` mask with ``is_causal=False``):
``window_attention`` decides so itself at run time (the hybrid attention's rule,
:func:`~graphopt.ops.sparse_attention.reference.window_is_causal`); the pass reads the example's mask
for the stats (pairs counted under causality) and for the ``"block"`` layout, built causal for it.

Approximate: an attention that needs keys outside the pattern changes; budget
``MinCosine(min_cosine)`` on the example, rolled back when it fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import graphopt.ops.sparse_attention  # noqa: F401  (registers graphopt::window_attention and its kin)
from graphopt.ir import NotApplicable, aten, describe, is_op, normalized_args, op_nodes, replace_node, shape_of, val_of
from graphopt.ir.calibrate import record_arguments
from graphopt.ir.flops import record_example_run, size
from graphopt.ir.match import select_layers
from graphopt.ops.sparse_attention.reference import block_pair_count, window_is_causal, window_pair_count
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass, summarize_reasons
from graphopt.pipeline.verify import MinCosine

_SDPA = aten.scaled_dot_product_attention.default
_VARLEN = torch.ops.graphopt.varlen_attention.default
PATTERNS = ("window", "block")


def block_reach(window: int, block_size: int, is_causal: bool) -> int:
    """How many key blocks before (and, bidirectional, after) its own a query block sees."""
    reach = window - 1 if is_causal else window // 2
    return math.ceil(reach / block_size)


def block_layout(length_q: int, length_k: int, window: int, global_tokens: int, block_size: int, is_causal: bool) -> torch.Tensor:
    """The ``pattern="block"`` layout, ``[ceil(L / bs), ceil(S / bs)]`` bool (what the graph builds)."""
    starts_q = torch.arange(0, length_q, block_size)[:, None]
    starts_k = torch.arange(0, length_k, block_size)[None, :]
    return _layout_of(starts_q, starts_k, window, global_tokens, block_size, is_causal)


def _layout_of(starts_q, starts_k, window: int, global_tokens: int, block_size: int, is_causal: bool):
    """The layout from the blocks' first positions; written once, for tensors here and, by the same
    operators, in :func:`_emit_layout` as graph nodes."""
    reach = block_reach(window, block_size, is_causal) * block_size
    offset = starts_q - starts_k
    near = (offset >= 0) & (offset <= reach) if is_causal else offset.abs() <= reach
    global_start = math.ceil(global_tokens / block_size) * block_size
    return near | (starts_k < global_start) | (starts_q < global_start)


@dataclass(frozen=True)
class _Site:
    """One attention to rewrite, with what the example says about it."""

    node: Node
    varlen: bool
    exact: bool  # every pair of the example stays visible
    visible_fraction: float
    pairs: int  # visible pairs on the example (per batch and head)
    total: int
    causal: bool = False  # is_causal, or the example's mask hides every later key


def _hint(x: Any) -> int:
    return size(x)


def _static(x: Any) -> bool:
    return isinstance(x, int)


@register_pass
class AttentionToSparse(Pass):
    """Softmax attention -> sliding-window + global (Longformer) or block-sparse (BigBird) attention. See the module docstring."""

    name = "attention_to_sparse"
    exact = False
    budget = MinCosine(0.99)
    requires = ("canonicalize",)
    after = ("canonicalize", "remove_padding")

    @dataclass(frozen=True)
    class Config:
        """Options of ``attention_to_sparse``.

        Attributes:
            pattern: ``"window"`` (graphopt::window_attention) or ``"block"`` (graphopt::block_sparse_attention).
            window: the sliding window: ``|i − j| <= window // 2``, or ``i − window < j <= i`` for causal attention.
            global_tokens: the first tokens of the sequence that attend to and are attended by all (1: CLS).
            block_size: the blocks of ``pattern="block"``.
            layers, layer_pattern: which attentions (indices in graph order, or a regular expression
                searched in the module path and node name).
            min_cosine: the budget: mean cosine of the outputs against the graph before the pass.
        """

        pattern: str = "window"
        window: int = 128
        global_tokens: int = 1
        block_size: int = 64
        layers: tuple[int, ...] | None = None
        layer_pattern: str | None = None
        min_cosine: float = 0.99

        def __post_init__(self):
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(self.layers))
            if self.pattern not in PATTERNS:
                raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
            if self.window < 1:
                raise ValueError(f"window must be at least 1, got {self.window}")
            if self.global_tokens < 0:
                raise ValueError(f"global_tokens must be >= 0, got {self.global_tokens}")
            if self.block_size < 1:
                raise ValueError(f"block_size must be positive, got {self.block_size}")

    # -- analysis

    def analyze(self, gm: GraphModule, ctx: PassContext) -> tuple[list[_Site], list[str]]:
        nodes = op_nodes(gm, _SDPA, _VARLEN)
        if not nodes:
            raise NotApplicable(
                "no aten.scaled_dot_product_attention or graphopt.varlen_attention in the graph (run canonicalize first for written-out attention)"
            )
        chosen = select_layers(nodes, self.config.layers, self.config.layer_pattern, "attention", op="aten.scaled_dot_product_attention")
        offsets = self._example_offsets(gm, ctx) if any(is_op(n, _VARLEN) for n in chosen) else {}
        hiding = self._masks_hiding_later_keys(gm, ctx, [n for n in chosen if is_op(n, _SDPA)])
        sites, left = [], []
        for node in chosen:
            try:
                sites.append(self._varlen_site(node, offsets) if is_op(node, _VARLEN) else self._sdpa_site(node, hiding.get(node, False)))
            except NotApplicable as e:
                left.append(f"{node.name}: {e.reason}")
        if not sites:
            raise NotApplicable(summarize_reasons(left))
        return sites, left

    def _pairs(self, length_q: int, length_k: int, is_causal: bool) -> tuple[int, int]:
        """(visible pairs, pairs dense attention computes) of one (batch, head) on the example."""
        c = self.config
        total = window_pair_count(length_q, length_k, max(length_q, length_k) * 2 + 1, 0, is_causal)  # a window covering everything
        if c.pattern == "window":
            return window_pair_count(length_q, length_k, c.window, c.global_tokens, is_causal), total
        layout = block_layout(length_q, length_k, c.window, c.global_tokens, c.block_size, is_causal)
        return block_pair_count(layout, c.block_size, length_q, length_k, 1, is_causal), total

    @staticmethod
    def _masks_hiding_later_keys(gm: GraphModule, ctx: PassContext, nodes: list[Node]) -> dict[Node, bool]:
        """For each SDPA with a mask and ``is_causal=False``: whether its mask, on the example, hides every later key."""
        masked = [n for n in nodes if normalized_args(n)["attn_mask"] is not None and not normalized_args(n)["is_causal"]]
        if not masked:
            return {}
        try:
            recorded = record_arguments(gm, masked, [(tuple(ctx.example_inputs), dict(ctx.example_kwargs))])
        except Exception:  # noqa: BLE001 - without the run the stats count the pairs as bidirectional, nothing else
            return {}
        hiding = {}
        for node in masked:
            calls = recorded.get(node) or []
            hiding[node] = bool(calls) and all(
                isinstance(c["attn_mask"], torch.Tensor) and window_is_causal(c["attn_mask"], False, c["query"].shape[-2], c["key"].shape[-2]) for c in calls
            )
        return hiding

    def _sdpa_site(self, node: Node, mask_hides_later_keys: bool = False) -> _Site:
        args = normalized_args(node)
        q, k, v = (shape_of(args[name]) for name in ("query", "key", "value"))
        if args["dropout_p"]:
            raise NotApplicable(f"dropout p={args['dropout_p']} (training): the sparse ops take none")
        if not (q and k and v) or not len(q) == len(k) == len(v) == 4:
            raise NotApplicable(f"{describe(node)} has operands that are not 4-D [batch, heads, seq, dim] ({q}, {k}, {v})")
        heads, kv_heads = q[1], k[1]
        if not (_static(heads) and _static(kv_heads)) or kv_heads == 0 or heads % kv_heads or (heads != kv_heads and not args["enable_gqa"]):
            raise NotApplicable(f"{describe(node)}: {heads} query heads and {kv_heads} key heads do not group")
        mask = args["attn_mask"]
        if mask is not None and (len(shape_of(mask) or ()) > 4 or not isinstance(val_of(mask), torch.Tensor)):
            raise NotApplicable(f"{describe(node)}: attn_mask {describe(mask)} is not a tensor of at most 4 dims")
        length_q, length_k = _hint(q[2]), _hint(k[2])
        causal = bool(args["is_causal"]) or mask_hides_later_keys  # the keys after a query count for nothing then
        pairs, total = self._pairs(length_q, length_k, causal)
        exact = pairs == total
        if exact and _static(q[2]) and _static(k[2]):
            raise NotApplicable(f"no-op, every key already visible: the sequence ({length_q} queries, {length_k} keys) is static and within {self._covers()}")
        return _Site(node, False, exact, pairs / max(total, 1), pairs, total, causal)

    def _varlen_site(self, node: Node, offsets: dict[str, torch.Tensor]) -> _Site:
        if self.config.pattern != "window":
            raise NotApplicable("packed (varlen) attention takes pattern='window' only")
        q, k = shape_of(normalized_args(node)["q"]), shape_of(normalized_args(node)["k"])
        if q is None or k is None or q[1] != k[1]:
            raise NotApplicable(f"{describe(node)}: query and key heads differ")
        cu_seqlens = offsets.get(normalized_args(node)["cu_seqlens"].name)
        lengths = cu_seqlens.diff().tolist() if cu_seqlens is not None else []
        pairs = sum(window_pair_count(n, n, self.config.window, self.config.global_tokens, False) for n in lengths)
        total = sum(n * n for n in lengths)
        return _Site(node, True, pairs == total, pairs / max(total, 1), pairs, total)

    @staticmethod
    def _example_offsets(gm: GraphModule, ctx: PassContext) -> dict[str, torch.Tensor]:
        """``cu_seqlens`` of the example (the small integer tensors of one run of the graph)."""
        try:
            return record_example_run(gm, ctx.example_inputs, ctx.example_kwargs).values
        except Exception:  # noqa: BLE001 - without the run the stats lack the lengths, nothing else
            return {}

    def _covers(self) -> str:
        c = self.config
        what = f"window {c.window} + {c.global_tokens} global token(s)"
        return what if c.pattern == "window" else f"{what} on blocks of {c.block_size}"

    # -- rewrite

    def rewrite(self, gm: GraphModule, analysis: tuple[list[_Site], list[str]], ctx: PassContext) -> PassResult:
        sites, left = analysis
        c = self.config
        layouts: dict[tuple, Node] = {}
        for site in sites:
            node = site.node
            args = normalized_args(node)
            with gm.graph.inserting_before(node):
                if site.varlen:
                    new = gm.graph.call_function(
                        torch.ops.graphopt.varlen_window_attention.default,
                        (args["q"], args["k"], args["v"], args["cu_seqlens"], c.window, c.global_tokens),
                        {"scale": args["scale"]},
                    )
                elif c.pattern == "window":
                    new = gm.graph.call_function(
                        torch.ops.graphopt.window_attention.default,
                        (args["query"], args["key"], args["value"], c.window, c.global_tokens),
                        {"attn_mask": args["attn_mask"], "is_causal": bool(args["is_causal"]), "scale": args["scale"]},
                    )
                else:
                    layout = self._emit_layout(gm, args["query"], args["key"], site.causal, layouts)
                    new = gm.graph.call_function(
                        torch.ops.graphopt.block_sparse_attention.default,
                        (args["query"], args["key"], args["value"], layout, c.block_size),
                        {"attn_mask": args["attn_mask"], "is_causal": bool(args["is_causal"]), "scale": args["scale"]},
                    )
            new.meta.update({key: node.meta[key] for key in ("nn_module_stack", "val") if key in node.meta})
            replace_node(node, new)
        pairs, total = sum(s.pairs for s in sites), sum(s.total for s in sites)
        layers = {s.node.name: {"exact": s.exact, "visible_fraction": round(s.visible_fraction, 4)} for s in sites}
        stats = {
            "converted": len(sites),
            "pattern": c.pattern,
            "window": c.window,
            "global_tokens": c.global_tokens,
            "visible_fraction": round(pairs / max(total, 1), 4),
            "exact": all(s.exact for s in sites),
            "layers": layers,
        }
        notes = [f"{len(sites)} attention(s) to {c.pattern} ({self._covers()}), {stats['visible_fraction']:.1%} of the example's pairs visible"]
        if all(s.exact for s in sites):
            notes.append("exact on the example: every example sequence is within the pattern")
        if left:
            notes.append(f"left dense: {summarize_reasons(left)}")
        return PassResult(changed=True, stats=stats, message="; ".join(notes))

    def _emit_layout(self, gm: GraphModule, query: Node, key: Node, is_causal: bool, cache: dict[tuple, Node]) -> Node:
        """The block layout as graph nodes from the query's and key's lengths (shared by attentions of the same lengths)."""
        c = self.config
        q_len, k_len = shape_of(query)[2], shape_of(key)[2]
        cache_key = (str(q_len), str(k_len), is_causal)
        if cache_key in cache:
            return cache[cache_key]
        graph = gm.graph
        device = val_of(query).device

        def length(x: Node, n: Any) -> Any:
            return n if _static(n) else graph.call_function(aten.sym_size.int, (x, 2))

        def starts(x: Node, n: Any, dim: int) -> Node:
            ramp = graph.call_function(aten.arange.start_step, (0, length(x, n), c.block_size), {"dtype": torch.int64, "device": device})
            return graph.call_function(aten.unsqueeze.default, (ramp, dim))

        starts_q, starts_k = starts(query, q_len, 1), starts(key, k_len, 0)
        cache[cache_key] = layout = _GraphOps(graph).layout(starts_q, starts_k, c.window, c.global_tokens, c.block_size, is_causal)
        return layout


class _GraphOps:
    """:func:`_layout_of`'s operators as ATen nodes (the same formula, emitted instead of computed)."""

    def __init__(self, graph):
        self.graph = graph

    def _call(self, op, *args) -> Node:
        return self.graph.call_function(op, args)

    def layout(self, starts_q: Node, starts_k: Node, window: int, global_tokens: int, block_size: int, is_causal: bool) -> Node:
        reach = block_reach(window, block_size, is_causal) * block_size
        offset = self._call(aten.sub.Tensor, starts_q, starts_k)
        if is_causal:
            near = self._call(aten.bitwise_and.Tensor, self._call(aten.ge.Scalar, offset, 0), self._call(aten.le.Scalar, offset, reach))
        else:
            near = self._call(aten.le.Scalar, self._call(aten.abs.default, offset), reach)
        global_start = math.ceil(global_tokens / block_size) * block_size
        if global_start == 0:
            return near
        near = self._call(aten.bitwise_or.Tensor, near, self._call(aten.lt.Scalar, starts_k, global_start))
        return self._call(aten.bitwise_or.Tensor, near, self._call(aten.lt.Scalar, starts_q, global_start))
