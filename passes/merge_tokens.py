"""``merge_tokens``: ToMe, bipartite soft matching of similar tokens, in every block.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023). Between the attention and the MLP
of a block, each sequence's tokens are split alternately into sets A and B; every A token is
matched to its most similar B token by the cosine of the block's keys averaged over heads, and the
``r`` best-matched A tokens are merged into their match, ``x_B ← (s_A x_A + s_B x_B) / (s_A + s_B)``,
sizes ``s_B ← s_A + s_B``. Later attentions are proportional, ``softmax(q kᵀ·scale + log s) v``,
so a merged token still weighs as the tokens it stands for, and a masked-mean pooling becomes
size-weighted, ``Σ s·x / n``. ``[CLS]`` (and, for text, ``[SEP]``) are never merged.

The graph must be packed (``remove_padding``; the pass packs a graph itself where it was not, every
token valid when the model has no padding mask): merging then keeps every sequence apart, each
merges ``min(r, |A|)`` of its own real tokens, and the packed length ``T`` shrinks per sequence.
The merge itself is ``graphopt::merge_tokens`` and the weighted attention
``graphopt::varlen_attention_sized`` (:mod:`graphopt.ops.token_reduction`); where a block is cut
is :func:`graphopt.ir.tokens.residual_fork`.

Approximate, zero-shot: budget ``MinCosine(min_cosine)`` on the outputs. Recovery:
:func:`graphopt.tools.token_recovery.recover`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

import graphopt.ops.token_reduction  # noqa: F401  (graphopt::merge_tokens, varlen_attention_sized)
from graphopt.ir import NotApplicable
from graphopt.ir.tokens import chosen_layers, default_protect_last, is_packed, key_metric, reduce_tokens, reduction_stats, token_stream, with_sizes
from graphopt.passes import remove_padding
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass
from graphopt.pipeline.verify import MinCosine


@register_pass
class MergeTokens(Pass):
    """ToMe: merge ``r`` tokens per sequence after the attention of each chosen block. See the module docstring."""

    name = "merge_tokens"
    exact = False
    budget = MinCosine(0.95)
    requires = ("canonicalize",)
    after = ("remove_padding", "prune_tokens")

    @dataclass(frozen=True)
    class Config:
        """Options of ``merge_tokens``.

        Attributes:
            r: tokens merged per sequence in each chosen block (fewer where a sequence has fewer to
                merge): one value, or one per layer of ``layers``.
            layers: the blocks (indices of the attentions, in graph order; negative from the end), None for all.
            protect_first, protect_last: leading and trailing tokens of each sequence never merged
                (``[CLS]``; ``[SEP]``). ``protect_last`` None: 1 for text packed by a padding mask, 0 otherwise.
            proportional: proportional attention after a merge (ToMe's ``log s`` on the logits).
            min_cosine: the budget: mean cosine of the outputs against the graph before the pass.
        """

        r: int | tuple[int, ...] = 8
        layers: tuple[int, ...] | None = None
        protect_first: int = 1
        protect_last: int | None = None
        proportional: bool = True
        min_cosine: float = 0.95

        def __post_init__(self):
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(self.layers))
            if isinstance(self.r, list):
                object.__setattr__(self, "r", tuple(self.r))
            if not all(isinstance(r, int) and r >= 1 for r in (self.r if isinstance(self.r, tuple) else (self.r,))):
                raise ValueError(f"r must be >= 1, got {self.r!r}")
            if isinstance(self.r, tuple) and (self.layers is None or len(self.layers) != len(self.r)):
                raise ValueError("an r per layer needs layers of the same length")
            if self.protect_first < 0 or (self.protect_last is not None and self.protect_last < 0):
                raise ValueError("protect_first and protect_last must be >= 0")

    def analyze(self, gm: GraphModule, ctx: PassContext):
        """None on a packed graph; else remove_padding's plan for packing it (every token valid without a padding mask)."""
        return None if is_packed(gm) else remove_padding.packing_plan(gm, unmasked=True)

    def rewrite(self, gm: GraphModule, plan, ctx: PassContext) -> PassResult:
        if plan is not None:
            remove_padding.apply_packing(gm, plan)
        stream = token_stream(gm)
        layers = chosen_layers(self.config.layers, len(stream.attentions), default=range(len(stream.attentions)))
        protect_last = default_protect_last(stream) if self.config.protect_last is None else self.config.protect_last
        cfg = self.config
        n = len(stream.attentions)
        r_of = {i % n: r for i, r in zip(cfg.layers, cfg.r)} if isinstance(cfg.r, tuple) else {i: cfg.r for i in layers}

        def emit(graph, x, layout, attention):
            metric = key_metric(graph, attention)
            sizes = with_sizes(layout, graph, x)
            r = r_of[stream.attentions.index(attention)]  # each cut replaces the attentions after it (proportional attention)
            merged = graph.call_function(torch.ops.graphopt.merge_tokens.default, (x, metric, sizes, layout.mask, r, cfg.protect_first, protect_last))
            return tuple(graph.call_function(operator.getitem, (merged, i)) for i in range(3))

        layouts = reduce_tokens(gm, stream, layers, emit, protected=cfg.protect_first, proportional=cfg.proportional)
        if len(layouts) < 2:
            raise NotApplicable("no block chosen")
        stats = reduction_stats(gm, ctx, layouts)
        stats.update(
            {
                "r": [r_of[i] for i in layers] if isinstance(cfg.r, tuple) else cfg.r,
                "blocks": len(layouts) - 1,
                "protect": [cfg.protect_first, protect_last],
                "packed_here": plan is not None,
            }
        )
        kept = f"; {stats['kept']:.0%} of the tokens left after the last on the example" if "kept" in stats else ""
        return PassResult(
            changed=True,
            stats=stats,
            message=f"{cfg.r if isinstance(cfg.r, int) else '/'.join(map(str, cfg.r))} tokens merged per sequence in each of {len(layouts) - 1} block(s){kept}",
        )
