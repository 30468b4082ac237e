"""A toy custom op declared in this one folder, to show that adding an op touches nothing else.

``graphopt_test::absmax_norm(x, weight, eps)`` scales each row of ``x`` (its last dim) by the
inverse of its largest magnitude: ``x / (max|x| + eps) * weight``. Its record tells FLOP counting,
residual streams, ``remove_padding``, the partitioner, the Triton row template and the eager
backend how to treat it; ``tests/ops/test_oprecord.py`` checks that each of them does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graphopt.ir import shape_of
from graphopt.ir.flops import size
from graphopt.ir.oprecord import OpRecord, register_op

EAGER_CALLS: list[tuple[int, ...]] = []
"""Shapes the eager fast path was called with (the test reads it to see the fast path ran)."""


def absmax_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.abs().amax(dim=-1, keepdim=True) + eps) * weight


@torch.library.custom_op("graphopt_test::absmax_norm", mutates_args=())
def absmax_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return absmax_norm_reference(x, weight, eps)


def _fake(x, weight, eps):
    return torch.empty_like(x)


def _flops(node) -> int:
    """One compare, one divide and one multiply per element (a made-up count the test can check)."""
    shape = shape_of(node)
    return 3 * math.prod(size(s) for s in shape) if shape is not None else 0


def _eager(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    EAGER_CALLS.append(tuple(x.shape))
    return absmax_norm_reference(x, weight, eps)


def _row_lowering(out: str, args: dict, fresh, row) -> list[str]:
    x, absmax = row.tensor(args, "x"), fresh(f"{out}_absmax")
    return [
        f"{absmax} = {row.max(f'tl.abs({x})')}",
        f"{out} = {x} / ({absmax} + {row.number(args['eps'], 'eps')}) * {row.tensor(args, 'weight')}",
    ]


RECORD = register_op(
    OpRecord(
        op=torch.ops.graphopt_test.absmax_norm,
        reference=absmax_norm_reference,
        fake=_fake,
        flops=_flops,
        partition_kind="norm",
        tokenwise=1,
        is_norm=True,
        eager_fast_path=_eager,
        triton_lowering=_row_lowering,
    )
)
