"""``layernorm_to_repbn``: LayerNorm -> progressive re-parameterized BatchNorm (SLAB, ICML 2024).

Replaces chosen ``aten.layer_norm`` nodes (over the last dim) by ``call_module`` nodes of
:class:`graphopt.tools.repbn.PRepBN` modules registered on the graph module, which compute

    γ·LN(x) + (1 − γ)·(BN(x) + η·x)

with the LayerNorm's own gain and bias, a new BatchNorm over the channels (weight 1, bias 0, mean 0,
var 1) and η (one scalar, 1 by default), all ``get_attr`` constants passed to the module, the
BatchNorm weight and bias and η as ``nn.Parameter``. The modules of one run share one
:class:`graphopt.tools.repbn.Progress`; it starts at p = 0 (γ = 1), where the node computes exactly the
LayerNorm it replaced, so verification passes. The pass is approximate because its purpose is the
model at p = 1 after fine-tuning: use :func:`graphopt.tools.repbn.prepare` for a trainable model with
``set_progress``, :func:`graphopt.tools.repbn.distill` to recover, :func:`graphopt.finalize` to fold.

Selection: all LayerNorms by default, or those at ``layers`` (indices over the graph's
``aten.layer_norm`` nodes in graph order) and/or those where the regular expression ``pattern`` is
found in the weight's attribute name, the module path (``nn_module_stack``) or the node name. A
LayerNorm over more than the last dim is left alone, with the reason.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
from torch.fx import GraphModule, Node

from graphopt.ir import add_constant, aten, normalized_args, op_nodes, replace_node, val_of
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass
from graphopt.tools.repbn import PRepBN, Progress, as_parameter, linear_schedule
from graphopt.pipeline.verify import MinCosine


def _module_path(node: Node) -> str:
    """The LayerNorm's module path from ``nn_module_stack``, else its weight's owner (nodes a pass created lack the stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return list(stack.values())[-1][0]
    weight = normalized_args(node)["weight"]
    if isinstance(weight, Node) and weight.op == "get_attr" and weight.target.endswith(".weight"):
        return weight.target.removesuffix(".weight")
    return ""


def _names(node: Node) -> list[str]:
    """What a ``pattern`` is matched against: the weight's attribute name, the module path, the node name."""
    weight = normalized_args(node)["weight"]
    names = [weight.target] if isinstance(weight, Node) and weight.op == "get_attr" else []
    return [*names, _module_path(node), node.name]


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

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        pattern: str | None = None,
        schedule: Callable[[float], float] = linear_schedule,
        eta: float = 1.0,
        momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ):
        Progress(schedule)  # rejects a bad schedule now rather than inside the pipeline
        self.layers = None if layers is None else list(layers)
        self.pattern = pattern
        self.schedule = schedule
        self.eta = eta
        self.momentum = momentum
        self.bn_eps = bn_eps

    def _selected(self, gm: GraphModule) -> tuple[list[Node], str]:
        """The chosen LayerNorm nodes, or none and why."""
        norms = op_nodes(gm, aten.layer_norm)
        if not norms:
            return [], "no LayerNorm (aten.layer_norm) in the graph"
        chosen = norms
        if self.layers is not None:
            outside = [i for i in self.layers if not -len(norms) <= i < len(norms)]
            if outside:
                return [], f"layers {outside} out of range: the graph has {len(norms)} LayerNorms"
            wanted = {i % len(norms) for i in self.layers}
            chosen = [n for i, n in enumerate(norms) if i in wanted]
        if self.pattern is not None:
            regex = re.compile(self.pattern)
            chosen = [n for n in chosen if any(regex.search(name) for name in _names(n))]
            if not chosen:
                return [], f"no LayerNorm matches pattern {self.pattern!r} (first: {', '.join(_names(norms[0]))})"
        return chosen, ""

    def applicable(self, gm: GraphModule) -> tuple[bool, str]:
        chosen, reason = self._selected(gm)
        if chosen and all(_why_not_convertible(n) for n in chosen):
            reason = "; ".join(f"{n.name}: {_why_not_convertible(n)}" for n in chosen)
            return False, reason
        return bool(chosen), reason

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        progress = Progress(self.schedule)
        chosen, _ = self._selected(gm)
        left = []
        replaced = 0
        for ln in chosen:
            why = _why_not_convertible(ln)
            if why:
                left.append(f"{ln.name}: {why}")
                continue
            self._replace(gm, ln, progress)
            replaced += 1
        message = "left alone: " + "; ".join(left) if left else ""
        return PassResult(changed=replaced > 0, stats={"replaced": replaced, "left": len(left)}, message=message)

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
            constant(torch.full((1,), self.eta, dtype=dtype), "eta", True),
        )
        module = PRepBN(channels, args["eps"], self.bn_eps, self.momentum, progress, source=_module_path(ln) or ln.name)
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
