"""``attention_to_linear``: softmax attention -> linear attention, or LoLCATs' sliding-window hybrid.

Replaces chosen ``aten.scaled_dot_product_attention`` nodes (after ``canonicalize``, every attention
is one) and ``graphopt::varlen_attention`` nodes (after ``remove_padding``) by

* ``graphopt::linear_attention(φ(q), φ(k), v, attn_mask, is_causal)``: ``softmax(q kᵀ) v`` with
  ``exp(q·k)`` replaced by ``φ(q)·φ(k)``, so that attention costs ``O(S·F·Dv)`` instead of
  ``O(L·S·D)`` (see :mod:`graphopt.ops.linear_attention`); the model's mask is honoured exactly
  (pads contribute nothing), causal attention stays causal, GQA stays grouped;
* or, with ``feature_map="hybrid"``, ``graphopt::hybrid_attention``: softmax over a sliding window
  of ``window`` keys plus Hedgehog linear attention over the rest, one normalizer, a learned
  per-head mix (LoLCATs, Zhang et al. 2024).

The feature maps (:mod:`graphopt.ops.linear_attention.feature_maps`): ``relu`` (SLAB), ``elu``
(``elu + 1``), ``hedgehog`` (learned ``[softmax(xW), softmax(−xW)]``). The learned ones are fitted
here by **attention transfer** (Hedgehog, LoLCATs stage 1): each converted layer alone, on its own
inputs as the unchanged graph computes them on the example and calibration batches
(``graphopt.optimize(calibration=...)``), Adam at ``transfer_lr`` on
``MSE(new attention, softmax attention) / Var(softmax attention)`` (plus, with
``attention_ce``, the cross-entropy of the linear attention's weights against softmax's). The
fitted ``W`` and mix are ``nn.Parameter`` constants of the graph module, so
:func:`graphopt.tools.attention_transfer.recover` can fine-tune them (and the attention's
projections) end to end afterwards.

Approximate: the budget is ``MinCosine(min_cosine)`` on the outputs. Converting a trained softmax
model without fine-tuning loses fidelity (SLAB trains from scratch; LoLCATs recovers with 40M
tokens), so expect the budget to fail without recovery on deep models: convert with a low
``min_cosine`` and recover, or convert a few layers (``layers`` / ``pattern``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

import graphopt.ops.linear_attention  # noqa: F401  (registers graphopt::linear_attention, hybrid_attention)
import graphopt.ops.varlen  # noqa: F401  (graphopt::varlen_attention, which remove_padding leaves)
from graphopt.ir import NotApplicable, add_constant, aten, normalized_args, op_nodes, replace_node, shape_of
from graphopt.ir.calibrate import calibration_batches, record_arguments, run_substituted
from graphopt.ir.flops import size
from graphopt.ir.match import select_layers
from graphopt.ir.weights import as_parameter
from graphopt.ops.linear_attention.feature_maps import FEATURE_MAPS, eager, features, hedgehog_init
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass, summarize_reasons
from graphopt.pipeline.verify import MinCosine, compare, fallback_until_within

_SDPA = aten.scaled_dot_product_attention.default
_VARLEN = torch.ops.graphopt.varlen_attention.default
MAPS = (*FEATURE_MAPS, "hybrid")


@dataclass
class _Layer:
    node: Node
    packed: bool  # a varlen_attention node: [T, H, D] operands and cu_seqlens
    heads: int
    kv_heads: int
    dim: int
    grid: int | None = None  # side of the square patch grid after one class token, for value_conv


def _patch_grid(tokens) -> int | None:
    """``g`` when a static ``tokens`` is ``1 + g²`` (a ViT's class token and square patch grid), else None."""
    if not isinstance(tokens, int) or tokens < 2:
        return None
    side = math.isqrt(tokens - 1)
    return side if side * side == tokens - 1 else None


def _attention_args(layer: _Layer, values: dict) -> tuple:
    """``(q, k, v, attn_mask, is_causal, scale, cu_seqlens)`` of a recorded call of the layer."""
    if layer.packed:
        return values["q"], values["k"], values["v"], None, False, values["scale"], values["cu_seqlens"]
    return values["query"], values["key"], values["value"], values["attn_mask"], values["is_causal"], values["scale"], None


def _softmax_attention(q, k, v, mask, causal, scale, cu_seqlens):
    if cu_seqlens is not None:
        return torch.ops.graphopt.varlen_attention(q, k, v, cu_seqlens, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def converted_attention(kind, q, k, v, mask, causal, scale, cu_seqlens, weights: dict, window: int, eps: float):
    """The replacement attention on tensors: what the pass's nodes compute (and attention transfer trains)."""
    packed = cu_seqlens is not None
    feature_kind = "hedgehog" if kind == "hybrid" else kind
    fq = features(eager, feature_kind, q, weights.get("q_map"), packed)
    fk = features(eager, feature_kind, k, weights.get("k_map"), packed)
    ops = torch.ops.graphopt
    if kind == "hybrid":
        if packed:
            return ops.varlen_hybrid_attention(q, k, v, fq, fk, weights["mix"], window, cu_seqlens, scale, eps)
        return ops.hybrid_attention(q, k, v, fq, fk, weights["mix"], window, mask, causal, scale, eps)
    if packed:
        return ops.varlen_linear_attention(fq, fk, v, cu_seqlens, eps)
    return ops.linear_attention(fq, fk, v, mask, causal, eps)


def _attention_weights_ce(kind, q, k, mask, causal, scale, weights) -> torch.Tensor:
    """Cross-entropy of the linear attention's weights against softmax's (Hedgehog's objective), dense."""
    fq = features(eager, "hedgehog", q, weights["q_map"])
    fk = features(eager, "hedgehog", k, weights["k_map"])
    groups = q.shape[1] // k.shape[1]
    fk = fk.repeat_interleave(groups, dim=1)
    scores = q @ k.repeat_interleave(groups, dim=1).transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    a = fq @ fk.transpose(-2, -1)
    if mask is not None:
        scores = scores + (torch.log(mask.to(q.dtype)) if mask.dtype == torch.bool else mask)
        a = a * (mask.to(q.dtype) if mask.dtype == torch.bool else torch.exp(mask))
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores, a = scores.masked_fill(~keep, float("-inf")), a.masked_fill(~keep, 0)
    target = torch.softmax(scores, -1)
    probs = a / (a.sum(-1, keepdim=True) + 1e-6)
    return -(target * torch.log(probs + 1e-6)).sum(-1).mean()


@register_pass
class AttentionToLinear(Pass):
    """Softmax attention -> linear (relu / elu / hedgehog) or sliding-window hybrid attention. See the module docstring."""

    name = "attention_to_linear"
    exact = False
    budget = MinCosine(0.9)
    after = ("canonicalize", "remove_padding")

    @dataclass(frozen=True)
    class Config:
        """Options of ``attention_to_linear``.

        Attributes:
            feature_map: ``"relu"``, ``"elu"``, ``"hedgehog"`` or ``"hybrid"`` (window softmax + hedgehog).
            window: the hybrid's window: the last ``window`` keys (causal) or ``window // 2`` on each side.
            value_conv: SLAB's depthwise 5×5 convolution on the values of a vision model's patch grid,
                added to the attention output (``[CLS] + h×w`` static tokens, ``h = w``); its weight
                starts at zero (the output is the linear attention's) and learns in recovery.
            layers, pattern: which attentions (indices in graph order, or a name regular expression).
            transfer_steps: Adam steps of attention transfer per layer for the learned maps (0: none).
            transfer_lr: its learning rate (LoLCATs: 1e-2).
            attention_ce: weight of the attention-weights cross-entropy in the transfer objective.
            min_cosine: the budget: mean cosine of the outputs against the graph before the pass.
            fallback: choose the layers by measured sensitivity: when converting them all misses the
                budget on the example, keep softmax in the most sensitive ones (each measured
                converted alone), one at a time, until it holds.
            eps: the normalizer's epsilon.
            seed: the random state of the learned maps' start.
        """

        feature_map: str = "hedgehog"
        window: int = 64
        value_conv: bool = False
        layers: tuple[int, ...] | None = None
        pattern: str | None = None
        transfer_steps: int = 100
        transfer_lr: float = 1e-2
        attention_ce: float = 0.0
        min_cosine: float = 0.9
        fallback: bool = False
        eps: float = 1e-6
        seed: int = 0

        def __post_init__(self):
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(self.layers))
            if self.feature_map not in MAPS:
                raise ValueError(f"feature_map must be one of {MAPS}, got {self.feature_map!r}")
            if self.window < 1:
                raise ValueError(f"window must be >= 1, got {self.window}")
            if self.transfer_steps < 0:
                raise ValueError(f"transfer_steps must be >= 0, got {self.transfer_steps}")

    @property
    def learned(self) -> bool:
        return self.config.feature_map in ("hedgehog", "hybrid")

    def analyze(self, gm: GraphModule, ctx: PassContext) -> list[_Layer]:
        candidates = op_nodes(gm, _SDPA, _VARLEN)
        chosen = select_layers(candidates, self.config.layers, self.config.pattern, "attention", operand="query", op="aten.scaled_dot_product_attention")
        layers, left = [], []
        for node in chosen:
            try:
                layers.append(self._layer(node))
            except NotApplicable as e:
                left.append(f"{node.name}: {e}")
        if not layers:
            raise NotApplicable(summarize_reasons(left))
        self._left = left
        return layers

    def _layer(self, node: Node) -> _Layer:
        args = normalized_args(node)
        packed = node.target is _VARLEN
        q, k = shape_of(args["q" if packed else "query"]), shape_of(args["k" if packed else "key"])
        if q is None or k is None:
            raise NotApplicable("its operands have no known shapes")
        if not packed:
            if args["dropout_p"] != 0:
                raise NotApplicable("it applies attention dropout (training mode)")
            if len(q) != 4 or len(k) != 4:
                raise NotApplicable(f"it takes rank-{len(q)} operands, not [batch, heads, seq, dim]")
        heads, kv_heads = size(q[-3 if not packed else 1]), size(k[-3 if not packed else 1])
        if self.config.value_conv and (packed or _patch_grid(q[-2]) is None or heads != kv_heads):
            raise NotApplicable(f"value_conv needs a static [CLS] + square patch grid of tokens and as many key as query heads, it has {q[-2]} tokens")
        if heads % kv_heads:
            raise NotApplicable(f"{heads} query heads do not group over {kv_heads} key heads")
        return _Layer(node, packed, heads, kv_heads, size(q[-1]), _patch_grid(q[-2]) if not packed else None)

    def rewrite(self, gm: GraphModule, layers: list[_Layer], ctx: PassContext) -> PassResult:
        kind = self.config.feature_map
        start = time.perf_counter()
        fitted = self._fit(gm, layers, ctx) if self.learned and self.config.transfer_steps else {}
        weights = {layer.node: fitted.get(layer.node) or self._initial_weights(layer, i) for i, layer in enumerate(layers)}
        kept = self._fallback(gm, layers, weights, ctx) if self.config.fallback and ctx.reference is not None else []
        if len(kept) == len(layers):
            raise NotApplicable(f"no layer can be converted within {self.budget.describe()}: even the least sensitive alone misses it")
        layers = [layer for layer in layers if layer not in kept]
        for layer in layers:
            self._replace(gm, layer, weights[layer.node])
        losses = [w["loss"] for node, w in fitted.items() if "loss" in w and any(layer.node is node for layer in layers)]
        stats = {"converted": len(layers), "feature_map": kind, "softmax_kept": [layer.node.name for layer in kept]}
        notes = [f"{len(layers)} attention(s) -> {'hybrid (window ' + str(self.config.window) + ')' if kind == 'hybrid' else kind + ' linear'} attention"]
        if kept:
            notes.append(f"softmax kept for the budget (most sensitive): {summarize_reasons([layer.node.name for layer in kept])}")
        if losses:
            stats["transfer_loss"] = sum(losses) / len(losses)
            stats["transfer_s"] = round(time.perf_counter() - start, 2)
            notes.append(f"attention transfer: mean normalized MSE {stats['transfer_loss']:.4f} after {self.config.transfer_steps} steps per layer")
        notes.extend(self._left)
        return PassResult(changed=True, stats=stats, message="; ".join(notes))

    def _initial_weights(self, layer: _Layer, index: int) -> dict:
        if not self.learned:
            return {}
        generator = torch.Generator().manual_seed(self.config.seed + index)
        weights = {"q_map": hedgehog_init(layer.heads, layer.dim, generator), "k_map": hedgehog_init(layer.kv_heads, layer.dim, generator)}
        if self.config.feature_map == "hybrid":
            weights["mix"] = torch.zeros(layer.heads)
        return weights

    def _fit(self, gm: GraphModule, layers: list[_Layer], ctx: PassContext) -> dict:
        """Attention transfer, one layer at a time, on the layers' recorded inputs."""
        recorded = record_arguments(gm, [layer.node for layer in layers], calibration_batches(ctx))
        fitted = {}
        for i, layer in enumerate(layers):
            weights = {name: t.requires_grad_(True) for name, t in self._initial_weights(layer, i).items()}
            calls = [_attention_args(layer, values) for values in recorded[layer.node]]
            targets = [_softmax_attention(*call) for call in calls]
            scales = [t.var().clamp_min(1e-12) for t in targets]
            optimizer = torch.optim.Adam(list(weights.values()), lr=self.config.transfer_lr)
            loss_value = float("nan")
            for step in range(self.config.transfer_steps):
                j = step % len(calls)
                q, k, v, mask, causal, scale, cu = calls[j]
                out = converted_attention(self.config.feature_map, q, k, v, mask, causal, scale, cu, weights, self.config.window, self.config.eps)
                loss = F.mse_loss(out, targets[j]) / scales[j]
                if self.config.attention_ce and cu is None:
                    loss = loss + self.config.attention_ce * _attention_weights_ce(self.config.feature_map, q, k, mask, causal, scale, weights)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_value = loss.item()
            with torch.no_grad():
                final = [
                    F.mse_loss(converted_attention(self.config.feature_map, *call, weights, self.config.window, self.config.eps), t) / s
                    for call, t, s in zip(calls, targets, scales)
                ]
            fitted[layer.node] = {**{name: t.detach() for name, t in weights.items()}, "loss": float(sum(final) / len(final)) if final else loss_value}
        return fitted

    @staticmethod
    def _add_value_conv(gm: GraphModule, layer: _Layer, v: Node, out: Node) -> Node:
        """``out + pad(dwconv5x5(v's patch grid))`` (SLAB): the class token gets nothing from the convolution."""
        channels, side = layer.heads * layer.dim, layer.grid
        weight = add_constant(gm, torch.zeros(channels, 1, 5, 5), f"{layer.node.name}_value_conv", before=out)
        as_parameter(gm, weight.target)
        graph = gm.graph
        with graph.inserting_before(layer.node):  # after `out`, which went in just before the attention it replaces

            def call(target, *args):
                return graph.call_function(target, args)

            patches = call(aten.slice.Tensor, v, 2, 1, 1 + side * side)  # [B, H, h·w, D]
            grid = call(aten.reshape.default, call(aten.permute.default, patches, [0, 1, 3, 2]), [-1, channels, side, side])
            conv = call(aten.conv2d.default, grid, weight, None, [1, 1], [2, 2], [1, 1], channels)
            back = call(aten.permute.default, call(aten.reshape.default, conv, [-1, layer.heads, layer.dim, side * side]), [0, 1, 3, 2])
            padded = call(aten.constant_pad_nd.default, back, [0, 0, 1, 0])
            total = call(aten.add.Tensor, out, padded)
        return total

    def _substitute(self, layer: _Layer, weights: dict):
        """The converted layer as a function of the node's arguments (for runs with it substituted)."""
        target = layer.node.target

        def run(*args, **kwargs):
            bound = torch.fx.operator_schemas.normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True).kwargs
            values = {**{a.name: a.default_value for a in target._schema.arguments if a.has_default_value()}, **bound}
            return converted_attention(self.config.feature_map, *_attention_args(layer, values), weights, self.config.window, self.config.eps)

        return run

    def _fallback(self, gm: GraphModule, layers: list[_Layer], weights: dict, ctx: PassContext) -> list[_Layer]:
        """The layers to keep in softmax so that the graph meets the budget on the example inputs."""
        args, kwargs = calibration_batches(ctx)[0]

        def check(active: list[_Layer]):
            outputs = run_substituted(gm, {layer.node: self._substitute(layer, weights[layer.node]) for layer in active}, args, kwargs)
            return compare(outputs, ctx.reference, self.budget)

        kept = fallback_until_within(layers, check, self.budget)
        if not kept:
            return []
        ctx.log(f"attention_to_linear: softmax kept in {len(kept)} most sensitive layer(s) for {self.budget.describe()}")
        return kept

    def _replace(self, gm: GraphModule, layer: _Layer, weights: dict) -> None:
        node, kind = layer.node, self.config.feature_map
        args = normalized_args(node)
        q, k, v = (args[n] for n in (("q", "k", "v") if layer.packed else ("query", "key", "value")))
        graph = gm.graph
        constants = {}
        for name in ("q_map", "k_map", "mix"):
            if name in weights:
                constants[name] = add_constant(gm, weights[name].detach().clone(), f"{node.name}_{name}", before=node)
                as_parameter(gm, constants[name].target)
        with graph.inserting_before(node):

            def call(target, *call_args):
                return graph.call_function(target, call_args)

            feature_kind = "hedgehog" if kind == "hybrid" else kind
            fq = features(call, feature_kind, q, constants.get("q_map"), layer.packed)
            fk = features(call, feature_kind, k, constants.get("k_map"), layer.packed)
            eps, ops = self.config.eps, torch.ops.graphopt
            if kind == "hybrid" and layer.packed:
                new = call(ops.varlen_hybrid_attention.default, q, k, v, fq, fk, constants["mix"], self.config.window, args["cu_seqlens"], args["scale"], eps)
            elif kind == "hybrid":
                new = call(
                    ops.hybrid_attention.default,
                    q,
                    k,
                    v,
                    fq,
                    fk,
                    constants["mix"],
                    self.config.window,
                    args["attn_mask"],
                    args["is_causal"],
                    args["scale"],
                    eps,
                )
            elif layer.packed:
                new = call(ops.varlen_linear_attention.default, fq, fk, v, args["cu_seqlens"], eps)
            else:
                new = call(ops.linear_attention.default, fq, fk, v, args["attn_mask"], args["is_causal"], eps)
        if self.config.value_conv:
            new = self._add_value_conv(gm, layer, v, new)
        new.meta["replaced_attention"] = node.name
        new.meta["softmax_scale"] = args["scale"]  # what attention transfer compares against later
        replace_node(node, new)
