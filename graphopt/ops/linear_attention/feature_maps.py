"""The feature maps ``φ`` of linear attention, written once for both eager tensors and graph nodes.

* ``relu``: ``φ(x) = max(x, 0)``, SLAB's simplified linear attention (Guo et al., ICML 2024);
* ``elu``: ``φ(x) = elu(x) + 1``, Katharopoulos et al. (ICML 2020);
* ``hedgehog``: ``φ(x) = [softmax(x W), softmax(−x W)]`` over the feature dim, with a learned
  per-head ``W`` (``[H, D, E]``, started at the identity), Zhang et al., "The Hedgehog & the
  Porcupine" (ICLR 2024): trained to mimic softmax attention's spiky, monotonic weights.

:func:`features` takes ``call(target, *args)``: ``eager`` runs the ATen op, a graph's
``call_function`` inserts it, so the pass emits exactly what attention transfer fitted.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

aten = torch.ops.aten

FEATURE_MAPS = ("relu", "elu", "hedgehog")
LEARNED = ("hedgehog",)


def eager(target: Any, *args: Any) -> Any:
    """``call`` for :func:`features` on tensors."""
    return target(*args)


def features(call: Callable[..., Any], kind: str, x: Any, weight: Any = None, packed: bool = False) -> Any:
    """``φ(x)`` for ``x`` ``[B, H, L, D]`` (or packed ``[T, H, D]``), ``weight`` ``[H, D, E]`` for hedgehog."""
    if kind == "relu":
        return call(aten.relu.default, x)
    if kind == "elu":
        return call(aten.add.Tensor, call(aten.elu.default, x), 1.0)
    if kind != "hedgehog":
        raise ValueError(f"unknown feature map {kind!r}: one of {FEATURE_MAPS}")
    if packed:  # [T, H, D] -> [T, H, 1, D], so that the matmul broadcasts over tokens with W's heads
        x = call(aten.unsqueeze.default, x, -2)
    projected = call(aten.matmul.default, x, weight)
    if packed:
        projected = call(aten.squeeze.dim, projected, -2)
    positive = call(aten.softmax.int, projected, -1)
    negative = call(aten.softmax.int, call(aten.neg.default, projected), -1)
    return call(aten.cat.default, [positive, negative], -1)


def hedgehog_init(heads: int, dim: int, generator: torch.Generator | None = None, noise: float = 1e-2) -> Tensor:
    """``W`` ``[H, D, D]`` near the identity: ``softmax(±x)`` to start, a little noise to break symmetry."""
    eye = torch.eye(dim).expand(heads, dim, dim)
    return (eye + noise * torch.randn(heads, dim, dim, generator=generator)).contiguous()


def feature_input(node: Any) -> Any:
    """The node :func:`features` mapped into ``node`` (the raw query or key), or None if ``node`` is no feature map."""
    target = getattr(node, "target", None)
    if target is aten.relu.default:
        return node.args[0]
    if target is aten.add.Tensor and getattr(node.args[0], "target", None) is aten.elu.default:
        return node.args[0].args[0]
    if target is aten.cat.default:
        projected = node.args[0][0].args[0]
        if projected.target is aten.squeeze.dim:
            projected = projected.args[0]
        x = projected.args[0]
        return x.args[0] if x.target is aten.unsqueeze.default else x
    return None
