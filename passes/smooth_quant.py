"""``smooth_quant``: SmoothQuant's migration of activation outliers into the weights, exact.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models" (ICML 2023), Eq. 4. A linear ``y = x Wᵀ`` equals ``y = (x diag(s)⁻¹) (W diag(s))ᵀ`` for any
positive per-input-channel ``s``; choosing::

    s_j = max|X_j|^α / max|W_j|^(1−α)         (α = 0.5 by default)

divides the large activation channels (the outliers that ruin per-token int8) and multiplies the
matching weight columns, which per-channel weight quantization absorbs easily. ``max|X_j|`` is
calibrated on the example (and calibration) inputs; ``max|W_j|`` is over every linear that reads
the same input (q, k and v share one ``s``).

The pass is **exact** in real arithmetic; ``1/s`` goes where it costs nothing when it can:

* folded into the preceding norm's gain and bias when the linears are the norm's only readers
  (Pre-LN blocks: ``aten.layer_norm`` or ``graphopt::rms_norm`` with a gain, also through views
  that keep the last dim, as GPT-2's token flattening before its ``addmm``);
* otherwise as an explicit ``x * (1/s)`` before the linears (Post-LN BERT, where the norm's output
  is also the residual stream; the MLP's second linear; attention's output projection), which
  ``quantize_int8`` then absorbs into its quantization sweep (the op's ``smooth`` argument), so it
  costs nothing there either. On its own, without quantization, the pass only moves rounding.

``alpha="search"`` picks α per group from a grid (0.3 to 0.8) by the int8 error of the group's
linears on the calibration activations (the SmoothQuant paper's per-model α, chosen per layer).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from graphopt.ir import NotApplicable, add_constant, aten, get_tensor, is_op, normalized_args, val_of
from graphopt.ir.calibrate import calibration_batches, observe_channels
from graphopt.ir.linears import Linear, chosen_linears
from graphopt.ir.match import VIEW_OPS
from graphopt.ir.oprecord import op_record
from graphopt.ops.quant import cpu as quant_cpu
from graphopt.ops.quant.reference import int8_linear_reference, quantize_per_channel
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass, summarize_reasons

__all__ = ["ALPHA_GRID", "SmoothQuant", "smoothing_factors"]

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SAMPLE_ROWS = 512
"""Calibration rows kept per input for ``alpha="search"``."""


def smoothing_factors(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (fp64), 1 where a channel is all zeros."""
    a, w = act_absmax.double(), weight_absmax.double()
    s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


@register_pass
class SmoothQuant(Pass):
    """SmoothQuant migration (exact): ``x Wᵀ = (x / s)(W s)ᵀ``; see the module docstring."""

    name = "smooth_quant"
    exact = True
    default_pipeline = False  # it only prepares quantize_int8: alone it would add multiplies    after = ("canonicalize", "layernorm_to_rmsnorm")

    @dataclass(frozen=True)
    class Config:
        """Options of ``smooth_quant``.

        Attributes:
            alpha: the migration strength in [0, 1], or ``"search"`` for a per-group grid search.
            layers, pattern: which linears (by index in graph order, or a name regular expression).
            where_int8_pays: only where ``quantize_int8`` will quantize with its defaults: a group
                none of whose linears runs faster in int8 on this CPU (measured) is left alone, so
                that no unabsorbed ``x * (1/s)`` costs a pass in a graph that stays fp32 there.
        """

        alpha: float | str = 0.5
        where_int8_pays: bool = True
        layers: tuple[int, ...] | None = None
        pattern: str | None = None

        def __post_init__(self):
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(self.layers))
            if not (self.alpha == "search" or (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1)):
                raise ValueError(f"alpha must be in [0, 1] or 'search', got {self.alpha!r}")

    def analyze(self, gm: GraphModule, ctx: PassContext) -> dict[Node, list[Linear]]:
        groups: dict[Node, list[Linear]] = collections.defaultdict(list)
        left = []
        for lin in chosen_linears(gm, self.config.layers, self.config.pattern):
            val = val_of(lin.x)
            if not isinstance(val, torch.Tensor) or not val.is_floating_point():
                left.append(f"{lin.name}: input is not a floating tensor")
                continue
            groups[lin.x].append(lin)
        if self.config.where_int8_pays:
            for x, members in list(groups.items()):
                shapes = [(lin.tokens() or 1, *lin.weight(gm).shape) for lin in members]
                if not any(quant_cpu.int8_pays_off(m, n, k) for m, n, k in shapes):
                    left.append(f"{members[0].name}: int8 is no faster than fp32 here, so quantize_int8 keeps it fp32")
                    del groups[x]
        if not groups:
            raise NotApplicable(summarize_reasons(left))
        return dict(groups)

    def rewrite(self, gm: GraphModule, groups: dict[Node, list[Linear]], ctx: PassContext) -> PassResult:
        batches = calibration_batches(ctx)
        if not ctx.example_inputs and not ctx.example_kwargs:
            raise NotApplicable("smooth_quant calibrates on the example inputs, and there are none")
        stats = observe_channels(gm, groups, batches, keep_rows=SAMPLE_ROWS if self.config.alpha == "search" else 0)
        folded = inserted = 0
        alphas = []
        for x, linears in groups.items():
            weights = [lin.weight(gm).double() for lin in linears]
            w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
            alpha = self._alpha(stats[x], weights, w_absmax)
            alphas.append(alpha)
            s = smoothing_factors(stats[x].absmax, w_absmax, alpha)
            for lin, w in zip(linears, weights):
                self._scale_weight(gm, lin, w * s)
            if self._fold_into_norm(gm, x, linears, s):
                folded += 1
            else:
                self._insert_scale(gm, x, linears, s)
                inserted += 1
        mean_alpha = sum(alphas) / len(alphas)
        return PassResult(
            changed=True,
            stats={"groups": len(groups), "linears": sum(map(len, groups.values())), "folded_into_norms": folded, "scales_inserted": inserted, "alpha": round(mean_alpha, 3)},
        )

    # -- α

    def _alpha(self, stats, weights: list[Tensor], w_absmax: Tensor) -> float:
        if self.config.alpha != "search":
            return float(self.config.alpha)
        if stats.samples is None:
            return 0.5
        x = stats.samples.double()
        exact = [x @ w.t() for w in weights]
        best, best_error = 0.5, float("inf")
        for alpha in ALPHA_GRID:
            s = smoothing_factors(stats.absmax, w_absmax, alpha)
            error = 0.0
            for w, y in zip(weights, exact):
                q, scale = quantize_per_channel(w * s)
                approx = int8_linear_reference(x.float(), q, scale, None, (1 / s).float())
                error += float((approx.double() - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
            if error < best_error:
                best, best_error = alpha, error
        return best

    # -- the rewrite

    @staticmethod
    def _scale_weight(gm: GraphModule, lin: Linear, scaled: Tensor) -> None:
        stored = lin.weight_node
        value = (scaled.t() if lin.transposed else scaled).to(get_tensor(gm, stored).dtype).contiguous()
        new = add_constant(gm, value, f"{stored.target}_smoothed", before=lin.node)
        lin.node.replace_input_with(stored, new)

    @staticmethod
    def _norm_behind(x: Node) -> Node | None:
        """The norm computing ``x``, through views that keep the last dim (GPT-2 flattens the
        tokens before its ``addmm``), each read only by the next; None if there is none."""
        node = x
        while is_op(node, *VIEW_OPS) and len(node.args[0].users) == 1:
            before, after = val_of(node.args[0]), val_of(node)
            if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape[-1] == after.shape[-1]):
                return None
            node = node.args[0]
        if is_op(node, aten.layer_norm):
            return node
        record = op_record(node.target) if node.op == "call_function" else None
        return node if record is not None and record.is_norm and "weight" in normalized_args(node) else None

    def _fold_into_norm(self, gm: GraphModule, x: Node, linears: list[Linear], s: Tensor) -> bool:
        """Divide the gain and bias of the norm computing ``x`` by ``s``, if only these linears read it."""
        if set(x.users) != {lin.node for lin in linears}:
            return False
        norm = self._norm_behind(x)
        if norm is None:
            return False
        args = normalized_args(norm)
        weight, bias = args.get("weight"), args.get("bias")
        if not (isinstance(weight, Node) and weight.op == "get_attr"):
            return False
        if bias is not None and not (isinstance(bias, Node) and bias.op == "get_attr"):
            return False
        for node in (weight, bias):
            if node is None:
                continue
            value = get_tensor(gm, node)
            new = add_constant(gm, (value.double() / s).to(value.dtype), f"{node.target}_smoothed", before=norm)
            norm.replace_input_with(node, new)
        return True

    @staticmethod
    def _insert_scale(gm: GraphModule, x: Node, linears: list[Linear], s: Tensor) -> None:
        dtype = val_of(x).dtype
        factor = add_constant(gm, (1 / s).to(dtype), f"{x.name}_smooth", before=linears[0].node)
        first = min((lin.node for lin in linears), key=lambda n: list(gm.graph.nodes).index(n))
        with gm.graph.inserting_before(first):
            scaled = gm.graph.call_function(aten.mul.Tensor, (x, factor))
        for lin in linears:
            lin.node.replace_input_with(x, scaled)

