"""``quantize_int8``: dynamic W8A8 linears, per-token activations, per-channel weights, fused epilogue.

The scheme of LLM.int8() (Dettmers et al. 2022) and SmoothQuant's per-token setting (Xiao et al.
2023, "O1"): each linear ``y = x Wᵀ + b`` becomes ``graphopt::int8_linear``::

    q_w = round(W / s_w),  s_w[n] = max_k |W[n, k]| / qmax_w        (once, stored as int8)
    q_x = round(x / s_x),  s_x[m] = max_k |x[m, k]| / 127           (per token, at run time)
    y[m, n] = s_x[m] · s_w[n] · Σ_k q_x[m, k] q_w[n, k] + b[n]       (int32 accumulation)

Per-token scales make the op token-wise (a row's result depends on that row only), so it stacks
with ``remove_padding`` exactly. The op's CPU kernels quantize in one sweep, run the fastest int8
GEMM this CPU has (oneDNN, fbgemm, or ``_int_mm`` where VNNI makes it fast; chosen by measurement,
:mod:`graphopt.ops.quant.cpu`) and apply dequantization, bias and a following ReLU/GELU (absorbed
into the op) in one epilogue sweep. ``qmax_w`` is 127 on CPUs with VNNI and 63 elsewhere, where
larger weights would saturate the int16 pair sums of ``vpmaddubsw``.

Per layer:

* **selection** by index or name pattern (``layers``, ``pattern``);
* **never slower than fp32**: a layer whose fastest int8 path measures no faster than the fp32 GEMM
  at the example's token count stays fp32 (``require_speedup``; the report says so, with times);
* **SmoothQuant**: an ``x * c`` in front of the linear (what ``smooth_quant`` leaves where it cannot
  fold ``c`` into a norm) is absorbed into the quantization sweep (the op's ``smooth``);
* **outliers** (``outlier_threshold``, LLM.int8()'s 6.0): input channels whose calibrated
  ``max |x|`` exceeds it are taken out of the int8 product and multiplied in fp32;
* **fallback by measured sensitivity** (``fallback``): when the quantized graph misses the budget on
  the example (and calibration) inputs, each layer's own error is measured (the graph run with that
  layer alone quantized) and the most sensitive layers return to fp32, one at a time, until it holds.

Approximate, budget ``MinCosine(min_cosine)`` (default 0.995) on the graph's outputs.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule

from graphopt.ir import NotApplicable, add_constant, replace_node, val_of
from graphopt.ir.calibrate import calibration_batches, observe_channels, run_substituted
from graphopt.ir.linears import Linear, chosen_linears, linear_input_scale, pointwise_after
from graphopt.ops.platform import cpu_capabilities
from graphopt.ops.quant import cpu as quant_cpu
from graphopt.ops.quant.reference import quantize_per_channel
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass, summarize_reasons
from graphopt.pipeline.verify import MinCosine, compare, fallback_until_within


@dataclass
class _Plan:
    """One linear to quantize."""

    linear: Linear
    source: object  # the node the op reads (the linear's input, or the input of an absorbed x * c)
    smooth: Tensor | None
    activation: tuple | None  # (node, name) of an absorbed ReLU/GELU
    qweight: Tensor
    scale: Tensor
    outliers: Tensor | None
    outlier_weight: Tensor | None
    path: str
    timing: str


@register_pass
class QuantizeInt8(Pass):
    """Dynamic W8A8 linears (per-token int8 activations, per-channel int8 weights). See the module docstring."""

    name = "quantize_int8"
    exact = False
    budget = MinCosine(0.995)
    after = ("canonicalize", "smooth_quant", "layernorm_to_rmsnorm", "remove_padding")

    @dataclass(frozen=True)
    class Config:
        """Options of ``quantize_int8``.

        Attributes:
            layers: indices of the linears to quantize (graph order; negative from the end), None for all.
            pattern: a regular expression searched in the weight's name, the module path, the node name.
            min_cosine: the budget: mean cosine of the outputs against the graph before the pass.
            require_speedup: keep a layer in fp32 where int8 measures no faster on this CPU.
            fallback: return the most sensitive layers to fp32 until the budget holds.
            outlier_threshold: LLM.int8() outlier channels (``max |x| >`` this, e.g. 6.0) stay fp32; None: off.
            weight_qmax: the weight codes' range ±qmax; None: 127 with VNNI, 63 without.
            fuse_activation: absorb a following ReLU/GELU into the op's epilogue.
        """

        layers: tuple[int, ...] | None = None
        pattern: str | None = None
        min_cosine: float = 0.995
        require_speedup: bool = True
        fallback: bool = True
        outlier_threshold: float | None = None
        weight_qmax: int | None = None
        fuse_activation: bool = True

        def __post_init__(self):
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(self.layers))
            if self.weight_qmax is not None and not 1 <= self.weight_qmax <= 127:
                raise ValueError(f"weight_qmax must be in 1..127, got {self.weight_qmax}")

    # -- analysis

    def analyze(self, gm: GraphModule, ctx: PassContext) -> tuple[list[Linear], list[str]]:
        ready, left = [], []
        for lin in chosen_linears(gm, self.config.layers, self.config.pattern):
            val = val_of(lin.x)
            if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
                left.append(f"{lin.name}: input is {getattr(val, 'dtype', 'not a tensor')}, int8 linears take fp32 activations")
            elif val.device.type != "cpu" and self.config.require_speedup:
                left.append(f"{lin.name}: on {val.device.type}; the speed check measures CPU kernels")
            else:
                ready.append(lin)
        if not ready:
            raise NotApplicable(summarize_reasons(left))
        return ready, left

    # -- rewrite

    def rewrite(self, gm: GraphModule, analysis: tuple[list[Linear], list[str]], ctx: PassContext) -> PassResult:
        linears, left = analysis
        cfg = self.config
        caps = cpu_capabilities()
        qmax = cfg.weight_qmax or (127 if caps.vnni else 63)
        batches = calibration_batches(ctx)
        stats = observe_channels(gm, {lin.x for lin in linears}, batches) if cfg.outlier_threshold is not None else {}

        plans, kept_speed = [], []
        for lin in linears:
            plan, timing = self._plan(gm, lin, qmax, stats)
            if plan is None:
                kept_speed.append(f"{lin.name} ({timing})")
            else:
                plans.append(plan)
        if not plans:
            raise NotApplicable(f"int8 is no faster than fp32 for any chosen linear on {caps.describe()}: " + summarize_reasons(kept_speed))

        kept_fidelity = self._fallback(gm, plans, ctx, batches) if cfg.fallback and ctx.reference is not None else []
        plans = [p for p in plans if p.linear.name not in {k.linear.name for k in kept_fidelity}]
        if not plans:
            raise NotApplicable(f"no set of int8 linears meets {self.budget.describe()} on the example inputs")
        replaced: dict = {}
        fused = sum(self._replace(gm, plan, replaced) for plan in plans)

        paths = collections.Counter(p.path for p in plans)
        notes = [f"{caps.describe()}, weights at ±{qmax}: " + ", ".join(f"{path} x{n}" for path, n in paths.most_common())]
        if kept_speed:
            notes.append(f"fp32 kept where int8 is not faster: {summarize_reasons(kept_speed)}")
        if kept_fidelity:
            notes.append(f"fp32 kept for the budget (most sensitive): {summarize_reasons([k.linear.name for k in kept_fidelity])}")
        notes.extend(left)
        return PassResult(
            changed=True,
            stats={
                "quantized": len(plans),
                "fp32_slower": len(kept_speed),
                "fp32_sensitive": len(kept_fidelity),
                "fused_activations": fused,
                "smoothed": sum(p.smooth is not None for p in plans),
                "outlier_channels": sum(0 if p.outliers is None else len(p.outliers) for p in plans),
                "paths": dict(paths),
            },
            message="; ".join(notes),
        )

    def _plan(self, gm: GraphModule, lin: Linear, qmax: int, stats: dict) -> tuple[_Plan | None, str]:
        """The layer's plan, or None where int8 measures no faster than fp32; and the timing note."""
        weight = lin.weight(gm)
        n, k = weight.shape
        m = lin.tokens() or 1
        path, seconds = quant_cpu.int8_path(m, n, k)
        timing = f"{path} chosen"
        if seconds:
            fp32 = seconds["aten_fp32"]
            timing = f"int8 {path} {seconds[path] * 1e3:.3f} ms vs fp32 {fp32 * 1e3:.3f} ms at {m} tokens"
            if self.config.require_speedup and seconds[path] >= fp32:
                return None, timing
        source, smooth = lin.x, None
        scaled = linear_input_scale(gm, lin.x)
        if scaled is not None:
            source, smooth = scaled
        activation = pointwise_after(lin.node) if self.config.fuse_activation else None
        outliers = outlier_weight = None
        if lin.x in stats:
            found = stats[lin.x].outliers(self.config.outlier_threshold)
            if 0 < len(found) < k:
                outliers, outlier_weight = found, weight[:, found].float().contiguous()
                weight = weight.index_fill(1, found, 0.0)
        qweight, scale = quantize_per_channel(weight, qmax)
        return _Plan(lin, source, smooth, activation, qweight, scale, outliers, outlier_weight, path, timing), timing

    @staticmethod
    def _kernel(plan: _Plan):
        """The plan's quantized linear as a substitute for the linear node (its own argument order)."""
        bias_index = 0 if plan.linear.transposed else 2

        def run(*args):
            x = args[1] if plan.linear.transposed else args[0]
            bias = args[bias_index] if len(args) > bias_index and plan.linear.bias is not None else None
            return quant_cpu.int8_linear_cpu(x, plan.qweight, plan.scale, bias, None, plan.outliers, plan.outlier_weight, "none")

        return run

    def _fallback(self, gm: GraphModule, plans: list[_Plan], ctx: PassContext, batches) -> list[_Plan]:
        """The plans to leave in fp32 so that the graph meets the budget on the example inputs."""
        args, kwargs = batches[0]

        def check(active: list[_Plan]):
            outputs = run_substituted(gm, {p.linear.node: self._kernel(p) for p in active}, args, kwargs)
            return compare(outputs, ctx.reference, self.budget)

        kept = fallback_until_within(plans, check, self.budget)
        if not kept:
            return []
        ctx.log(f"quantize_int8: {len(kept)} most sensitive linears kept in fp32 for {self.budget.describe()}")
        return kept

    def _replace(self, gm: GraphModule, plan: _Plan, replaced: dict) -> int:
        """Put the op in place of the linear (and its absorbed activation); ``replaced`` maps the
        nodes replaced so far to their replacements (a later linear may read an absorbed GELU)."""
        lin = plan.linear
        node = lin.node
        hint = lin.name.removesuffix(".weight") if isinstance(lin.name, str) else node.name
        qweight = add_constant(gm, plan.qweight, f"{hint}_int8", before=node)
        scale = add_constant(gm, plan.scale, f"{hint}_scale", before=node)
        smooth = add_constant(gm, plan.smooth.float(), f"{hint}_smooth", before=node) if plan.smooth is not None else None
        outliers = add_constant(gm, plan.outliers, f"{hint}_outlier_index", before=node) if plan.outliers is not None else None
        outlier_weight = add_constant(gm, plan.outlier_weight, f"{hint}_outlier_weight", before=node) if plan.outliers is not None else None
        target, activation = node, "none"
        if plan.activation is not None:
            target, activation = plan.activation
        with gm.graph.inserting_after(target):
            new = gm.graph.call_function(
                torch.ops.graphopt.int8_linear.default, (replaced.get(plan.source, plan.source), qweight, scale, lin.bias, smooth, outliers, outlier_weight, activation)
            )
        replace_node(target, new)
        replaced[target] = new
        if target is not node and not node.users:
            gm.graph.erase_node(node)
        return int(plan.activation is not None)
