"""``quantize_weights``: weight-only int8 (per channel) or int4 (group-wise, asymmetric) linears.

For memory-bound inference (batch-1 decoding, where every weight is read once per token), the
weights' bytes are the cost: int8 reads a quarter of fp32's, int4 an eighth. Activations stay in
floating point, so the error is the weights' alone:

* ``bits=8``: ``W ≈ q · s``, ``q = round(W / s)``, ``s[n] = max_k |W[n, k]| / 127`` (per output
  channel, symmetric), as in LLM.int8()'s weight format;
* ``bits=4``: groups of ``group_size`` (32, 64 or 128) consecutive input channels of a row share a
  scale and a zero point, ``W ≈ (q - z) · s`` with ``q ∈ [0, 15]``, ``s = (max - min) / 15``,
  ``z = round(-min / s)`` (asymmetric min-max, the group-wise scheme of GPTQ/AWQ's storage format
  without their calibration: round-to-nearest).

Each linear becomes ``graphopt::weight_only_linear``; the CPU kernels read the int8 / packed int4
codes and convert them in registers for a few rows (matrix-vector), and dequantize into a GEMM
for many (:mod:`graphopt.ops.quant.cpu`). A layer whose weight-only kernel measures no faster than
fp32 at the example's token count stays fp32 (``require_speedup``; say ``False`` to trade speed for
memory), with the times in the report. Approximate: budget ``MinCosine(min_cosine)``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from graphopt.ir import NotApplicable, add_constant, replace_node, val_of
from graphopt.ir.linears import Linear, chosen_linears
from graphopt.ops.platform import cpu_capabilities
from graphopt.ops.quant import cpu as quant_cpu
from graphopt.ops.quant.reference import quantize_int4_groupwise, quantize_per_channel
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass, summarize_reasons
from graphopt.pipeline.verify import MinCosine

GROUP_SIZES = (32, 64, 128)


@register_pass
class QuantizeWeights(Pass):
    """Weight-only int8 / group-wise int4 linears for memory-bound inference. See the module docstring."""

    name = "quantize_weights"
    exact = False
    budget = MinCosine(0.99)
    after = ("canonicalize", "layernorm_to_rmsnorm", "remove_padding")

    @dataclass(frozen=True)
    class Config:
        """Options of ``quantize_weights``.

        Attributes:
            bits: 8 (per-channel int8) or 4 (group-wise int4).
            group_size: int4 group size along the input dim: 32, 64 or 128.
            layers, pattern: which linears (indices in graph order, or a name regular expression).
            min_cosine: the budget: mean cosine of the outputs against the graph before the pass.
            require_speedup: keep a layer fp32 where its weight-only kernel is not faster here.
        """

        bits: int = 8
        group_size: int = 128
        layers: tuple[int, ...] | None = None
        pattern: str | None = None
        min_cosine: float = 0.99
        require_speedup: bool = True

        def __post_init__(self):
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(self.layers))
            if self.bits not in (4, 8):
                raise ValueError(f"bits must be 8 or 4, got {self.bits}")
            if self.bits == 4 and self.group_size not in GROUP_SIZES:
                raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def _group(self) -> int:
        return 0 if self.config.bits == 8 else self.config.group_size

    def analyze(self, gm: GraphModule, ctx: PassContext) -> tuple[list[Linear], list[str]]:
        ready, left = [], []
        for lin in chosen_linears(gm, self.config.layers, self.config.pattern):
            val = val_of(lin.x)
            k = lin.weight(gm).shape[1]
            if not isinstance(val, torch.Tensor) or not val.is_floating_point():
                left.append(f"{lin.name}: input is not a floating tensor")
            elif self._group and k % self._group:
                left.append(f"{lin.name}: int4 groups of {self._group} do not divide its {k} input features")
            elif self._group and k % 2:
                left.append(f"{lin.name}: packed int4 needs an even number of input features, it has {k}")
            else:
                ready.append(lin)
        if not ready:
            raise NotApplicable(summarize_reasons(left))
        return ready, left

    def rewrite(self, gm: GraphModule, analysis: tuple[list[Linear], list[str]], ctx: PassContext) -> PassResult:
        linears, left = analysis
        group = self._group
        kept, done, paths = [], 0, collections.Counter()
        for lin in linears:
            weight = lin.weight(gm)
            n, k = weight.shape
            m = lin.tokens() or 1
            path, seconds = quant_cpu.weight_only_path(m, n, k, group)
            if self.config.require_speedup and seconds and seconds.get(path, float("inf")) >= seconds["aten_fp32"]:
                kept.append(f"{lin.name} ({path} {seconds[path] * 1e3:.3f} ms vs fp32 {seconds['aten_fp32'] * 1e3:.3f} ms at {m} tokens)")
                continue
            self._replace(gm, lin, weight, group)
            paths[path] += 1
            done += 1
        if not done:
            raise NotApplicable(f"weight-only int{self.config.bits} is no faster than fp32 for any chosen linear on {cpu_capabilities().describe()}: {summarize_reasons(kept)}")
        notes = [f"int{self.config.bits}" + (f" groups of {group}" if group else " per channel") + ": " + ", ".join(f"{p} x{c}" for p, c in paths.most_common())]
        if kept:
            notes.append(f"fp32 kept where not faster: {summarize_reasons(kept)}")
        notes.extend(left)
        return PassResult(changed=True, stats={"quantized": done, "fp32_slower": len(kept), "bits": self.config.bits, "paths": dict(paths)}, message="; ".join(notes))

    @staticmethod
    def _replace(gm: GraphModule, lin: Linear, weight: torch.Tensor, group: int) -> None:
        node = lin.node
        hint = lin.name.removesuffix(".weight")
        if group == 0:
            qweight, scale = quantize_per_channel(weight)
            zero_node = None
        else:
            qweight, scale, zero = quantize_int4_groupwise(weight, group)
            zero_node = add_constant(gm, zero, f"{hint}_zero", before=node)
        qweight_node = add_constant(gm, qweight, f"{hint}_int{8 if group == 0 else 4}", before=node)
        scale_node = add_constant(gm, scale, f"{hint}_scale", before=node)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(torch.ops.graphopt.weight_only_linear.default, (lin.x, qweight_node, scale_node, zero_node, group, lin.bias))
        replace_node(node, new)
