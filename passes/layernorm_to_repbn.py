"""``layernorm_to_repbn``: LayerNorm -> progressive re-parameterized BatchNorm (SLAB, ICML 2024).

Replaces chosen ``aten.layer_norm`` nodes (over the last dim) by ``call_module`` nodes of
:class:`PRepBN` modules registered on the graph module, which compute

    γ·LN(x) + (1 − γ)·(BN(x) + η·x)

with the LayerNorm's own gain and bias, a new BatchNorm over the channels (weight 1, bias 0, mean 0,
var 1) and η (one scalar, 1 by default), all ``get_attr`` constants passed to the module, the
BatchNorm weight and bias and η as ``nn.Parameter``. The modules of one run share one
:class:`Progress`; it starts at p = 0 (γ = 1), where the node computes exactly the LayerNorm it
replaced, so verification passes. The pass is approximate because its purpose is the model at p = 1
after fine-tuning: use :func:`graphopt.tools.repbn.prepare` for a trainable model with
``set_progress``, :func:`graphopt.tools.repbn.distill` to recover, :func:`graphopt.finalize` to fold
(the ``fold_repbn`` pass, ``passes/fold_repbn.py``).

Selection: all LayerNorms by default, or those at ``layers`` (indices over the graph's
``aten.layer_norm`` nodes in graph order) and/or those where the regular expression ``pattern`` is
found in the weight's attribute name, the module path (``nn_module_stack``) or the node name. A
LayerNorm over more than the last dim is left alone, with the reason.

This module also holds what the PRepBN graph is made of, for the ``fold_repbn`` pass and the
workflow in :mod:`graphopt.tools.repbn` (passes may not import tools): the :class:`PRepBN` module,
its shared :class:`Progress` and γ schedule (:func:`linear_schedule`), the order of its node's
arguments (:data:`ARGUMENTS`), :func:`prepbn_nodes`, :func:`repbn_scale_shift` and
:func:`as_parameter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.ir import add_constant, aten, normalized_args, op_nodes, replace_node, val_of
from graphopt.ir.match import module_path, select_layers
from graphopt.ir.weights import as_parameter  # noqa: F401  (re-exported: graphopt.tools.repbn imports it from here)
from graphopt.ir.spec import allow_module_calls
from graphopt.pipeline.pass_base import NotApplicable, Pass, PassContext, PassResult, register_pass
from graphopt.pipeline.verify import MinCosine

ARGUMENTS = ("input", "ln_weight", "ln_bias", "bn_weight", "bn_bias", "running_mean", "running_var", "eta")
"""The arguments of a PRepBN ``call_module`` node, in order."""

LEARNABLE = ("ln_weight", "ln_bias", "bn_weight", "bn_bias", "eta")
"""The PRepBN arguments that training updates by gradient (the statistics are updated by BatchNorm)."""


def linear_schedule(p: float) -> float:
    """SLAB's schedule: γ = 1 − p."""
    return 1.0 - p


class Progress:
    """The progress p ∈ [0, 1] that the PRepBN modules of one model share, and their γ = schedule(p).

    ``schedule`` maps p to γ ∈ [0, 1] and must give γ = 1 at p = 0 (the original model) and γ = 0 at
    p = 1 (RepBN alone, which :func:`graphopt.finalize` needs).
    """

    def __init__(self, schedule: Callable[[float], float] = linear_schedule):
        for p, wanted in ((0.0, 1.0), (1.0, 0.0)):
            got = float(schedule(p))
            if got != wanted:
                raise ValueError(f"a PRepBN schedule must give gamma={wanted:g} at progress {p:g}, got {got:g}")
        self.schedule = schedule
        self.p, self.gamma = 0.0, 1.0

    def set(self, p: float) -> None:
        """Move to progress ``p``."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {p}")
        gamma = float(self.schedule(p))
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"the schedule gave gamma={gamma:g} at progress {p:g}; gamma must be in [0, 1]")
        self.p, self.gamma = float(p), gamma

    def __repr__(self) -> str:
        return f"Progress(p={self.p:g}, gamma={self.gamma:g})"


class PRepBN(nn.Module):
    """``γ·LN(x) + (1 − γ)·(BN(x) + η·x)`` over the last dim of ``x``; γ comes from a shared :class:`Progress`.

    The module holds no tensors: its graph node passes them in (see :data:`ARGUMENTS`) as
    ``get_attr`` constants of the graph module, because graphopt's clean-up drops any constant that
    no ``get_attr`` node reads. In training mode BatchNorm normalises with the batch's statistics
    and updates the running ones (as SLAB trains), unless ``batch_statistics`` is False: then it
    uses the running statistics as in eval mode ("frozen" BatchNorm, see :func:`graphopt.tools.repbn.distill`). A branch
    whose weight is zero is not computed, except BatchNorm when it updates its running statistics,
    so that they follow the features from the first step.
    """

    def __init__(self, channels: int, ln_eps: float, bn_eps: float, momentum: float, progress: Progress, source: str = ""):
        super().__init__()
        self.channels = channels
        self.ln_eps = ln_eps
        self.bn_eps = bn_eps
        self.momentum = momentum
        self.progress = progress
        self.source = source  # the replaced LayerNorm, for messages
        self.batch_statistics = True

    @property
    def updates_statistics(self) -> bool:
        return self.training and self.batch_statistics

    def forward(self, x, ln_weight, ln_bias, bn_weight, bn_bias, running_mean, running_var, eta):
        gamma = self.progress.gamma
        rep = self.repbn(x, bn_weight, bn_bias, running_mean, running_var, eta) if gamma < 1 or self.updates_statistics else None
        if gamma == 0:
            return rep
        ln = F.layer_norm(x, (self.channels,), ln_weight, ln_bias, self.ln_eps)
        return ln if gamma == 1 else gamma * ln + (1 - gamma) * rep

    def repbn(self, x, bn_weight, bn_bias, running_mean, running_var, eta):
        """``BN(x) + η·x``, BatchNorm over the channels of all tokens (``x`` flattened to ``[-1, C]``)."""
        rows = x.reshape(-1, self.channels)
        normalized = F.batch_norm(rows, running_mean, running_var, bn_weight, bn_bias, self.updates_statistics, self.momentum, self.bn_eps)
        return normalized.reshape(x.shape) + eta * x

    def extra_repr(self) -> str:
        return f"{self.channels}, source={self.source!r}, {self.progress}"


allow_module_calls(PRepBN, "graphopt.finalize (the fold_repbn pass) replaces each PRepBN node by its affine map")


def repbn_scale_shift(bn_weight, bn_bias, running_mean, running_var, eta, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode RepBN as ``x·scale + shift`` (float64): ``scale = s + η``, ``shift = b − mean·s``, ``s = w / sqrt(var + eps)``."""
    s = bn_weight.double() / torch.sqrt(running_var.double() + eps)
    return s + eta.double(), bn_bias.double() - running_mean.double() * s


def prepbn_nodes(gm: GraphModule) -> list[Node]:
    """The ``call_module`` nodes of ``gm`` that call a :class:`PRepBN`, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), PRepBN)]


def _why_not_convertible(node: Node) -> str | None:
    args = normalized_args(node)
    val = val_of(args["input"])
    if len(args["normalized_shape"]) != 1:
        return f"normalises the last {len(args['normalized_shape'])} dims, RepBN normalises one channel dim"
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return "its input is not a tensor of token features [..., C]"
    return None


@register_pass
class LayerNormToRepBN(Pass):
    """LayerNorm -> PRepBN (``γ·LN + (1 − γ)·(BN + η·x)``), exact at progress 0; trainable. See the module docstring."""

    name = "layernorm_to_repbn"
    exact = False
    budget = MinCosine(0.99)
    after = ("canonicalize",)

    @dataclass(frozen=True)
    class Config:
        """Options of ``layernorm_to_repbn``.

        Attributes:
            layers: indices of the ``aten.layer_norm`` nodes to replace, in graph order (negative
                indices count from the end); None for all. Stored as a tuple.
            pattern: a regular expression; only LayerNorms where it is found (``re.search``) in the
                weight's attribute name, the module path or the node name are replaced.
            schedule: γ as a function of progress p; must give γ = 1 at p = 0 and γ = 0 at p = 1.
            eta: the initial η.
            momentum: BatchNorm's momentum for its running statistics.
            bn_eps: BatchNorm's epsilon.
        """

        layers: tuple[int, ...] | None = None
        pattern: str | None = None
        schedule: Callable[[float], float] = linear_schedule
        eta: float = 1.0
        momentum: float = 0.1
        bn_eps: float = 1e-5

        def __post_init__(self):
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(self.layers))
            Progress(self.schedule)  # rejects a bad schedule now rather than inside the pipeline

    def _selected(self, gm: GraphModule) -> list[Node]:
        """The chosen LayerNorm nodes; :class:`NotApplicable` when there are none."""
        return select_layers(op_nodes(gm, aten.layer_norm), self.config.layers, self.config.pattern, "LayerNorm", op="aten.layer_norm")

    def analyze(self, gm: GraphModule, ctx: PassContext) -> tuple[list[Node], list[str]]:
        """The LayerNorms to replace, and a ``"node: why not"`` line for each chosen one left alone."""
        convertible, left = [], []
        for ln in self._selected(gm):
            why = _why_not_convertible(ln)
            if why:
                left.append(f"{ln.name}: {why}")
            else:
                convertible.append(ln)
        if not convertible:
            raise NotApplicable("; ".join(left))
        return convertible, left

    def rewrite(self, gm: GraphModule, analysis: tuple[list[Node], list[str]], ctx: PassContext) -> PassResult:
        convertible, left = analysis
        progress = Progress(self.config.schedule)
        for ln in convertible:
            self._replace(gm, ln, progress)
        message = "left alone: " + "; ".join(left) if left else ""
        return PassResult(changed=True, stats={"replaced": len(convertible), "left": len(left)}, message=message)

    def _replace(self, gm: GraphModule, ln: Node, progress: Progress) -> None:
        args = normalized_args(ln)
        x = args["input"]
        channels = args["normalized_shape"][0]
        dtype = val_of(x).dtype
        target = _unique_submodule_name(gm, f"repbn_{ln.name}")

        def constant(value: torch.Tensor, role: str, learnable: bool) -> Node:
            node = add_constant(gm, value, f"{target}_{role}", before=ln)
            if learnable:
                as_parameter(gm, node.target)
            return node

        tensors = (
            constant(torch.ones(channels, dtype=dtype), "bn_weight", True),
            constant(torch.zeros(channels, dtype=dtype), "bn_bias", True),
            constant(torch.zeros(channels, dtype=dtype), "running_mean", False),
            constant(torch.ones(channels, dtype=dtype), "running_var", False),
            constant(torch.full((1,), self.config.eta, dtype=dtype), "eta", True),
        )
        module = PRepBN(channels, args["eps"], self.config.bn_eps, self.config.momentum, progress, source=module_path(ln) or ln.name)
        module.train(gm.training)  # captured graphs are in eval mode: BatchNorm must not update its statistics
        gm.add_submodule(target, module)
        with gm.graph.inserting_before(ln):
            node = gm.graph.call_module(target, (x, args["weight"], args["bias"], *tensors))
        node.meta["nn_module_stack"] = ln.meta.get("nn_module_stack", {})
        replace_node(ln, node)


def _unique_submodule_name(gm: GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
