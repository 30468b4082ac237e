"""Autograd for custom ops whose fast form is written in differentiable torch ops: recompute it in the backward.

A ``torch.library.custom_op`` is opaque to autograd. Where its CPU form is made of torch ops that
autograd can differentiate (gathers, ``index_add``, SDPA, matmuls; choices such as an argmax or a
sort simply pass no gradient), the backward can rerun that form under autograd on the saved inputs
and differentiate it: the forward keeps no graph (inference pays nothing), training pays one extra
forward per op. What recovery by self-distillation trains through: linear attention, token pruning
and merging, proportional attention.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def recomputed_backward(op, forward: Callable[..., Tensor | tuple[Tensor, ...]]) -> None:
    """Make ``op`` differentiable by recomputing ``forward`` (its torch form) under autograd in the
    backward. ``forward`` takes the op's arguments and returns what the op returns: a tensor or a
    tuple of tensors (outputs that are not floating point, or get no gradient, are skipped)."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
        ctx.others = [None if isinstance(x, Tensor) else x for x in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))

    def backward(ctx, *grads_out):
        args = list(ctx.others)
        wanted = []
        for i, saved in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = saved.detach().requires_grad_(bool(ctx.needs_input_grad[i]) and saved.is_floating_point())
            if args[i].requires_grad:
                wanted.append(i)
        grads = [None] * len(args)
        if wanted:
            with torch.enable_grad():
                outputs = forward(*args)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                pairs = [(o, g) for o, g in zip(outputs, grads_out) if g is not None and o.requires_grad]
                found = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted], [g for _, g in pairs], allow_unused=True) if pairs else []
            for i, g in zip(wanted, found):
                grads[i] = g
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
