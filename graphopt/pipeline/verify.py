"""Numerical checks of a rewritten graph against reference outputs.

A pass is judged by a *budget*: :class:`Exact` for passes that compute the same function up to
rounding, or a fidelity budget such as :class:`MinCosine` for approximate ones. A budget turns a
pair of output pytrees into a :class:`Check`: the measured number, whether it is within budget and,
when not, which output leaf broke it.

Outputs are compared leaf by leaf after ``torch.utils._pytree`` flattening, so ``ModelOutput``
objects, tuples and dicts all work; structures must match. Integer and boolean leaves must be
equal. A budget may compare only some positions (a ``mask`` per leaf), for passes whose outputs
differ by design where the original values are meaningless (pad tokens, for instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

__all__ = [
    "Budget",
    "Check",
    "Exact",
    "MinAgreement",
    "MinCosine",
    "Masks",
    "compare",
    "fallback_until_within",
    "flat_outputs",
    "intersect_masks",
    "relative_error",
    "resolve_masks",
    "row_cosines",
]

# per flat output leaf, a boolean tensor broadcastable to it (True: compared) or None (all of it)
Masks = Sequence[torch.Tensor | None] | Callable[[int, torch.Tensor], torch.Tensor | None] | None


@dataclass(frozen=True)
class Check:
    """The outcome of comparing outputs under a budget."""

    ok: bool
    metric: str
    value: float
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.metric}={self.value:.3g}" + (f" ({self.detail})" if self.detail else "")


def flat_outputs(outputs: Any) -> list[Any]:
    """The leaves of an output pytree, in a stable order."""
    return pytree.tree_leaves(outputs)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``: the largest error relative to the output's scale."""
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    if err != err:  # NaN
        return float("inf")
    return err / scale if scale > 0 else err


def row_cosines(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The cosine similarity of each row (along the last dimension) of ``out`` with the same row of
    ``ref``, in float64: a tensor of one value per row (a 0-d tensor counts as one row of one).

    Two rows that are both zero count as similar (1.0); a zero row against a non-zero one as 0.0.
    This is graphopt's one row cosine: :class:`MinCosine` takes its mean, and the zoo's embedding
    fidelity (``zoo.cosine_similarity_rows``) is this function.

    Raises:
        ValueError: the shapes differ.
    """
    if out.shape != ref.shape:
        raise ValueError(f"row cosines need tensors of equal shape, got {tuple(out.shape)} and {tuple(ref.shape)}")
    a = out.detach().double().reshape(-1, out.shape[-1]) if out.dim() else out.detach().double().reshape(1, 1)
    b = ref.detach().double().reshape(-1, ref.shape[-1]) if ref.dim() else ref.detach().double().reshape(1, 1)
    both_zero = (a.norm(dim=-1) == 0) & (b.norm(dim=-1) == 0)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30)
    return torch.where(both_zero, torch.ones_like(cos), cos)


class Budget:
    """How close a rewritten graph's outputs must be to the reference."""

    metric = "error"

    def measure(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        raise NotImplementedError

    def rows(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The measure per row (along the last dimension), whose mean is :meth:`measure`; by
        default the measure repeated once per row, for budgets that only have a whole-tensor value."""
        count = max(1, out.numel() // max(1, out.shape[-1])) if out.dim() else 1
        return torch.full((count,), self.measure(out, ref), dtype=torch.float64)

    def within(self, value: float) -> bool:
        raise NotImplementedError

    def worst(self, values: Sequence[float]) -> float:
        return max(values)

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Exact(Budget):
    """Same function up to rounding: relative error (see :func:`relative_error`) at most ``tol``."""

    tol: float = 1e-5
    metric = "rel_err"

    def measure(self, out, ref):
        return relative_error(out, ref)

    def within(self, value):
        return value <= self.tol

    def describe(self):
        return f"exact (rel. error <= {self.tol:g})"


@dataclass(frozen=True)
class MinCosine(Budget):
    """Approximate: the mean cosine similarity over the last dimension's rows at least ``threshold``."""

    threshold: float = 0.99
    metric = "cosine"

    def measure(self, out, ref):
        return row_cosines(out, ref).mean().item()

    def rows(self, out, ref):
        return row_cosines(out, ref).reshape(-1)

    def within(self, value):
        return value >= self.threshold

    def worst(self, values):
        return min(values)

    def describe(self):
        return f"approximate (cosine >= {self.threshold:g})"


@dataclass(frozen=True)
class MinAgreement(Budget):
    """Approximate: the share of rows (the last dimension's) whose argmax, the top-1 class, is the
    reference's, at least ``threshold``."""

    threshold: float = 0.99
    metric = "top-1 agreement"

    def measure(self, out, ref):
        return self.rows(out, ref).mean().item()

    def rows(self, out, ref):
        return out.argmax(-1).eq(ref.argmax(-1)).double().reshape(-1)

    def within(self, value):
        return value >= self.threshold

    def worst(self, values):
        return min(values)

    def describe(self):
        return f"approximate (top-1 agreement >= {self.threshold:g})"


def resolve_masks(masks: Masks, reference: Any) -> list[torch.Tensor | None] | None:
    """``masks`` as one entry per flat leaf of ``reference`` (a mask function is called per leaf)."""
    if masks is None:
        return None
    refs = flat_outputs(reference)
    if callable(masks):
        return [masks(i, r) if isinstance(r, torch.Tensor) else None for i, r in enumerate(refs)]
    masks = list(masks)
    if len(masks) != len(refs):
        raise ValueError(f"{len(masks)} masks for {len(refs)} outputs")
    return masks


def intersect_masks(a: Sequence[torch.Tensor | None] | None, b: Sequence[torch.Tensor | None] | None) -> list[torch.Tensor | None] | None:
    """Per leaf, the positions both selections keep (None keeps everything; masks broadcast)."""
    if a is None or b is None:
        return None if a is None and b is None else list(a if b is None else b)
    return [x if y is None else y if x is None else x.bool() & y.bool() for x, y in zip(a, b, strict=True)]


def compare(outputs: Any, reference: Any, budget: Budget, masks: Masks = None) -> Check:
    """Compare two output pytrees under ``budget``.

    ``masks`` optionally selects, per flat output leaf, the positions that count (a boolean tensor
    broadcastable to the leaf, or None for all of it); it may also be a function of
    ``(leaf_index, reference_leaf)``.
    """
    outs, refs = flat_outputs(outputs), flat_outputs(reference)
    if len(outs) != len(refs):
        return Check(False, budget.metric, float("nan"), f"{len(outs)} outputs, expected {len(refs)}")
    masks = resolve_masks(masks, reference)
    values: list[float] = []
    worst_leaf = 0
    for i, (o, r) in enumerate(zip(outs, refs)):
        if not isinstance(r, torch.Tensor):
            if o != r:
                return Check(False, budget.metric, float("nan"), f"output {i}: {o!r} != {r!r}")
            continue
        if not isinstance(o, torch.Tensor) or tuple(o.shape) != tuple(r.shape):
            got = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            return Check(False, budget.metric, float("nan"), f"output {i}: shape {got}, expected {tuple(r.shape)}")
        mask = masks[i] if masks is not None else None
        if mask is not None:
            mask = mask.expand_as(r) if mask.shape != r.shape else mask
            o, r = o[mask], r[mask]
        if not (r.is_floating_point() or r.is_complex()):
            if not torch.equal(o, r):
                return Check(False, budget.metric, float("nan"), f"output {i}: integer values differ")
            continue
        values.append(budget.measure(o, r))
        if budget.worst(values) == values[-1]:
            worst_leaf = i
    if not values:
        return Check(True, budget.metric, 0.0 if isinstance(budget, Exact) else 1.0, "no floating-point outputs")
    value = budget.worst(values)
    ok = budget.within(value)
    return Check(ok, budget.metric, value, "" if ok else f"worst at output {worst_leaf}; needs {budget.describe()}")


def fallback_until_within(items: Sequence[Any], check: Callable[[list[Any]], Check], budget: Budget) -> list[Any]:
    """The items to leave unrewritten so that rewriting the others meets ``budget``: none when all of
    them do; else each is measured rewritten alone (``check([item])``) and the worst are left out one
    at a time, worst first, until ``check(the rest)`` holds (all of them when it never does).

    What per-layer fallback by measured sensitivity means for an approximate pass (``quantize_int8``
    keeps a linear in fp32, ``attention_to_linear`` keeps softmax); ``check`` runs the graph with the
    given items rewritten and compares it with the reference."""
    if check(list(items)).ok:
        return []
    alone = [check([item]).value for item in items]
    sign = -1.0 if budget.worst([0.0, 1.0]) == 0.0 else 1.0  # a cosine is worst low, an error high
    order = sorted(range(len(items)), key=lambda i: sign * alone[i], reverse=True)
    left_out, active = [], list(items)
    for i in order:
        left_out.append(items[i])
        active.remove(items[i])
        if not active or check(active).ok:
            break
    return left_out
