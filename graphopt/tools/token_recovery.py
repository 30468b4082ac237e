"""Recovering a model whose tokens ``prune_tokens`` or ``merge_tokens`` reduced: a short self-distillation.

Zero-TPrune and ToMe are zero-shot: the reduced model runs the original weights on fewer tokens.
The layers after a cut then see token sets they were never trained on (averaged tokens, gaps where
tokens were pruned), and the error grows with depth. :func:`recover` fine-tunes the reduced graph on
unlabelled inputs to reproduce the original model's outputs with
:class:`graphopt.tools.distill.Distiller` (output matching, cosine by default), the way ToMe's
off-the-shelf numbers improve when ToMe is applied during fine-tuning and LTP trains with its
pruning in place. Gradients flow through the reduction ops to the kept and merged tokens
(:mod:`graphopt.ops.recompute`); the choices of tokens pass none.

What trains (``train``): ``"norms"``, the LayerNorm / RMSNorm weights and biases (a few thousand
numbers: cheap, hard to over-fit on a few hundred inputs); ``"all"``, every weight. The graph keeps
its ops; the weights are constants again (``requires_grad`` off) when it returns.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

import graphopt.ops.norms  # noqa: F401  (graphopt::rms_norm, crms_norm)
import graphopt.ops.token_reduction  # noqa: F401  (graphopt::prune_tokens, merge_tokens)
from graphopt.ir import aten, get_tensor, is_op
from graphopt.ir.weights import as_parameter
from graphopt.tools.distill import DistillConfig, DistillHistory, Distiller

__all__ = ["REDUCTION_OPS", "recover"]

REDUCTION_OPS = (torch.ops.graphopt.prune_tokens.default, torch.ops.graphopt.merge_tokens.default)
_NORMS = (aten.layer_norm.default, aten.rms_norm.default, torch.ops.graphopt.rms_norm.default, torch.ops.graphopt.crms_norm.default)


def recover(
    gm: GraphModule,
    teacher: nn.Module,
    batches: Sequence[Any],
    steps: int,
    *,
    train: str = "all",
    lr: float = 2e-5,
    loss: str = "cosine",
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    progress_bar: bool = False,
    max_seconds: float | None = None,
    seed: int | None = 0,
) -> DistillHistory:
    """Fine-tune the reduced graph ``gm`` (``graphopt.optimize(...).graph_module``) to reproduce
    ``teacher`` (the original model) on unlabelled ``batches``; see the module docstring.

    Args:
        gm: the reduced graph module, trained in place (the optimized model runs it).
        teacher: the original model, only run.
        batches: inputs (a tuple of positional inputs, a dict of keyword inputs, or one input), cycled.
        steps: AdamW steps.
        train: ``"norms"`` or ``"all"``.
        lr: the learning rate.
        loss: ``"cosine"`` or ``"mse"`` on the outputs.
        log, log_every, progress_bar, max_seconds, seed: as :class:`~graphopt.tools.distill.DistillConfig`.

    Returns:
        The run's history (loss, fidelity to the teacher per step, seconds).

    Raises:
        ValueError: no token reduction in ``gm``, or an unknown ``train``.
    """
    if train not in ("norms", "all"):
        raise ValueError(f"train must be 'norms' or 'all', got {train!r}")
    if not any(n.op == "call_function" and n.target in REDUCTION_OPS for n in gm.graph.nodes):
        raise ValueError("no token reduction in the graph: run prune_tokens or merge_tokens first")
    gm.requires_grad_(False)
    if train == "norms":
        wanted = {a.target for n in gm.graph.nodes if is_op(n, *_NORMS) for a in n.all_input_nodes if a.op == "get_attr"}
    else:
        constants = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        wanted = {t for t in constants if isinstance(get_tensor(gm, t), torch.Tensor) and get_tensor(gm, t).is_floating_point()}
    for target in sorted(wanted):
        as_parameter(gm, target, requires_grad=True)
    config = DistillConfig(steps=steps, lr=lr, loss=loss, seed=seed, max_seconds=max_seconds, log_every=log_every, progress_bar=progress_bar)
    try:
        return Distiller(gm, teacher, batches, config, log=log).run()
    finally:
        gm.requires_grad_(False)
