"""Recovering a model whose attention ``attention_to_linear`` converted: attention transfer end to end.

The pass fits each learned feature map alone, on the layer's inputs as the original model computes
them (LoLCATs' stage 1, layer by layer). The converted model still drifts: every layer's error
changes the next layer's inputs. :func:`recover` fine-tunes the whole converted graph on unlabelled
inputs with :class:`graphopt.tools.distill.Distiller`, against two objectives at once:

* **attention transfer**, per converted layer: ``MSE(new attention, softmax attention) / Var`` on
  the layer's *current* inputs (the student's own q, k, v: softmax attention is computed beside the
  converted one and detached), so that each layer keeps imitating softmax where the model is now;
* **output matching** against the original model (``loss``: cosine by default), so that what the
  layers do not imitate is compensated downstream.

What trains (``train``): ``"maps"``, the feature maps' parameters (Hedgehog's ``W``, the hybrid's
mix); ``"attention"``, those and the linear projections that compute the converted layers'
queries and keys (LoLCATs trains low-rank adapters of them; here the weights themselves, the model
being small); ``"all"``, every parameter. Nothing else changes: the graph keeps its ops, and the
parameters are constants of the graph module again (``requires_grad`` off) when it returns.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.ir import aten, is_op, op_nodes
from graphopt.ir.match import VIEW_OPS
from graphopt.ir.weights import as_parameter
from graphopt.ops.linear_attention.feature_maps import feature_input
from graphopt.tools.distill import DistillConfig, DistillHistory, Distiller, DistillHooks

__all__ = ["CONVERTED_OPS", "converted_nodes", "recover"]

_OPS = torch.ops.graphopt
CONVERTED_OPS = (_OPS.linear_attention.default, _OPS.hybrid_attention.default, _OPS.varlen_linear_attention.default, _OPS.varlen_hybrid_attention.default)
_PASSING = (*VIEW_OPS, aten.transpose, aten.permute, aten.contiguous, aten.clone)


def converted_nodes(gm: GraphModule) -> list[Node]:
    """The converted attention nodes of ``gm`` (linear and hybrid, padded and packed), in graph order."""
    return op_nodes(gm, *CONVERTED_OPS)


def _raw_operands(node: Node) -> tuple[Node, Node, Node]:
    """The query, key and value nodes a converted attention node was made from."""
    if node.target in (_OPS.hybrid_attention.default, _OPS.varlen_hybrid_attention.default):
        return node.args[0], node.args[1], node.args[2]
    q, k = feature_input(node.args[0]), feature_input(node.args[1])
    if q is None or k is None:
        raise ValueError(f"{node.name}: its features are not a map attention_to_linear emits")
    return q, k, node.args[2]


def _projection(node: Node) -> Node | None:
    """The ``aten.linear`` a query or key comes from through views, or None."""
    while isinstance(node, Node) and is_op(node, *_PASSING):
        node = node.args[0]
    return node if isinstance(node, Node) and is_op(node, aten.linear) else None


def _softmax_target(op, scale: float | None, q, k, v, rest: tuple) -> torch.Tensor:
    """Softmax attention on a converted call's operands (``rest``: its mask, causality and scale, or offsets)."""
    if op is _OPS.varlen_linear_attention.default:
        return _OPS.varlen_attention(q, k, v, rest[0], scale)
    if op is _OPS.varlen_hybrid_attention.default:
        return _OPS.varlen_attention(q, k, v, rest[0], rest[1])
    if op is _OPS.hybrid_attention.default:
        mask, causal, scale = rest
    else:
        mask, causal = rest
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class _TransferTaps(DistillHooks):
    """Swaps each converted node for a call that also computes softmax attention on the same inputs."""

    def __init__(self, gm: GraphModule, nodes: list[Node], weight: float):
        self.gm, self.nodes, self.weight = gm, nodes, weight
        self.terms: list[torch.Tensor] = []
        self._saved: dict[Node, tuple] = {}

    def _tap(self, node: Node, op, *args):
        *call, q, k, v = args
        out = op(*call)
        rest = {
            _OPS.linear_attention.default: lambda: (call[3], call[4]),
            _OPS.hybrid_attention.default: lambda: (call[7], call[8], call[9]),
            _OPS.varlen_linear_attention.default: lambda: (call[3],),
            _OPS.varlen_hybrid_attention.default: lambda: (call[7], call[8]),
        }[op]()
        with torch.no_grad():
            target = _softmax_target(op, node.meta.get("softmax_scale"), q.detach(), k.detach(), v.detach(), rest)
        self.terms.append(F.mse_loss(out, target) / target.var().clamp_min(1e-12))
        return out

    def _tapped(self, node: Node, op) -> Callable[..., torch.Tensor]:
        def tapped(*args):
            return self._tap(node, op, *args)

        tapped.__name__ = tapped.__qualname__ = f"attention_transfer_{node.name}"
        return tapped

    def begin_training(self, student: nn.Module) -> None:
        for node in self.nodes:
            full = list(node.args) + [None] * (len(node.target._schema.arguments) - len(node.args))
            for i, argument in enumerate(node.target._schema.arguments):
                if argument.name in node.kwargs:
                    full[i] = node.kwargs[argument.name]
                elif i >= len(node.args):
                    full[i] = argument.default_value
            raw = _raw_operands(node)
            self._saved[node] = (node.target, node.args, node.kwargs)
            node.target = self._tapped(node, node.target)
            node.args, node.kwargs = (*full, *raw), {}
        self.gm.recompile()

    def end_training(self, student: nn.Module) -> None:
        for node, (target, args, kwargs) in self._saved.items():
            node.target, node.args, node.kwargs = target, args, kwargs
        self._saved.clear()
        self.gm.recompile()

    def extra_loss(self, student: nn.Module) -> torch.Tensor | None:
        if not self.terms or not self.weight:
            self.terms.clear()
            return None
        loss = self.weight * torch.stack(self.terms).mean()
        self.terms.clear()
        return loss


def recover(
    gm: GraphModule,
    teacher: nn.Module,
    batches: Sequence[Any],
    steps: int,
    *,
    train: str | None = None,
    lr: float = 1e-3,
    transfer_weight: float = 1.0,
    output_weight: float = 1.0,
    loss: str = "cosine",
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    progress_bar: bool = False,
    max_seconds: float | None = None,
    seed: int | None = 0,
) -> DistillHistory:
    """Fine-tune the converted graph ``gm`` (``graphopt.optimize(...).graph_module``) to reproduce
    ``teacher`` (the original model) on unlabelled ``batches``; see the module docstring.

    Args:
        gm: the converted graph module, trained in place (the optimized model runs it).
        teacher: the original model, only run.
        batches: inputs (a tuple of positional inputs, a dict of keyword inputs, or one input), cycled.
        steps: AdamW steps.
        train: ``"maps"``, ``"attention"`` or ``"all"`` (module docstring); by default ``"maps"`` where
            the converted layers have learned maps (on little data, training the projections too
            over-fits: ``bench/results/attention_fidelity.md``), else ``"attention"``.
        lr: the learning rate.
        transfer_weight, output_weight: the weights of the two objectives.
        loss: the output objective, ``"cosine"`` or ``"mse"``.
        log, log_every, progress_bar, max_seconds, seed: as :class:`~graphopt.tools.distill.DistillConfig`.

    Returns:
        The run's history (loss, fidelity to the teacher per step, seconds).

    Raises:
        ValueError: no converted attention in ``gm``, or an unknown ``train``.
    """
    nodes = converted_nodes(gm)
    if train is None:
        learned = any(_map_constants(node.args[0]) or node.target in (_OPS.hybrid_attention.default, _OPS.varlen_hybrid_attention.default) for node in nodes)
        train = "maps" if learned else "attention"
    if train not in ("maps", "attention", "all"):
        raise ValueError(f"train must be 'maps', 'attention' or 'all', got {train!r}")
    if not nodes:
        raise ValueError("no converted attention in the graph: run attention_to_linear first")
    gm.requires_grad_(False)
    targets = set()
    for node in nodes:
        q, k, _ = _raw_operands(node)
        targets |= {a.target for a in node.all_input_nodes if a.op == "get_attr"}  # the hybrid's mix
        for x in (node.args[0], node.args[1]):
            targets |= {a.target for a in _map_constants(x)}
        if train == "attention":
            for projection in filter(None, (_projection(q), _projection(k))):
                targets |= {a.target for a in projection.all_input_nodes if a.op == "get_attr"}
    targets |= {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("_value_conv")}  # SLAB's convolution on V
    for target in targets:
        as_parameter(gm, target, requires_grad=True)
    if train == "all":
        gm.requires_grad_(True)
    hooks = _TransferTaps(gm, nodes, transfer_weight)
    config = DistillConfig(
        steps=steps, lr=lr, loss=loss, output_weight=output_weight, match=(), seed=seed, max_seconds=max_seconds, log_every=log_every, progress_bar=progress_bar
    )
    try:
        return Distiller(gm, teacher, batches, config, hooks=hooks, log=log).run()
    finally:
        gm.requires_grad_(False)


def _map_constants(features: Any) -> list[Node]:
    """The ``get_attr`` constants among the nodes of a feature map (Hedgehog's ``W``)."""
    found, stack = [], [features]
    while stack:
        node = stack.pop()
        if not isinstance(node, Node):
            continue
        if node.op == "get_attr":
            found.append(node)
        elif node.target in (aten.cat.default, aten.softmax.int, aten.neg.default, aten.matmul.default, aten.squeeze.dim):
            stack.extend(node.all_input_nodes)
    return found
