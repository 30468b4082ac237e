"""``cast_bf16``: linears, matmuls and attention in bfloat16; norms, softmax statistics and the
residual stream stay in float32.

Mixed precision as in Micikevicius et al., "Mixed Precision Training" (ICLR 2018) and the bf16
inference recipes of oneDNN/AMX: the GEMMs (where the time goes) read bf16 operands and accumulate
in fp32 inside the kernel; their outputs return to fp32 at once, so LayerNorm, the residual adds
and everything pointwise see fp32 values, and only the GEMM inputs are rounded (8 mantissa bits:
relative error ~2⁻⁹ per operand). Constant weights are stored in bf16 (half the bytes).

Rewritten: ``aten.linear`` / ``addmm`` / ``mm`` with constant weights (weights cast once, the
activation cast per call), ``aten.scaled_dot_product_attention`` and ``graphopt::varlen_attention``
(q, k, v cast; SDPA computes its softmax in fp32 internally), and ``aten.matmul`` / ``bmm`` between
two activations (hand-written attention).

**Only where it pays.** bf16 is native on CPUs with AVX-512 BF16 or AMX (and on GPUs); elsewhere
torch emulates it and a bf16 GEMM is several times *slower* than fp32 (9x on an AVX2-only CPU,
measured here). Unless ``require_native=False``, the pass applies only where this CPU has native
bf16 *and* a bf16 GEMM of the graph's largest linear shape measures faster than fp32, and
otherwise says which of the two failed. Approximate: budget ``MinCosine(min_cosine)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from graphopt.ir import NotApplicable, add_constant, aten, get_tensor, is_op, val_of
from graphopt.ir.linears import chosen_linears, find_linears
from graphopt.ir.oprecord import op_record
from graphopt.ops.platform import cpu_capabilities, fastest
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass
from graphopt.pipeline.verify import MinCosine

_ATTENTION_OPS = (aten.scaled_dot_product_attention,)
_MATMUL_OPS = (aten.matmul, aten.bmm)


def bf16_speedup(m: int, n: int, k: int) -> float:
    """fp32 time over bf16 time of an ``[m, k] x [n, k]ᵀ`` linear on this CPU (measured once, cached)."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
    xb, wb = x.bfloat16(), w.bfloat16()
    _, seconds = fastest("bf16_linear", (m, n, k), {"fp32": functools.partial(F.linear, x, w), "bf16": functools.partial(F.linear, xb, wb)})
    return seconds["fp32"] / seconds["bf16"]


def _is_attention(node: Node) -> bool:
    if is_op(node, *_ATTENTION_OPS):
        return True
    record = op_record(node.target) if node.op == "call_function" else None
    return record is not None and record.name == "graphopt::varlen_attention"


@register_pass
class CastBF16(Pass):
    """GEMMs and attention in bf16, the rest in fp32. See the module docstring."""

    name = "cast_bf16"
    exact = False
    budget = MinCosine(0.999)
    after = ("canonicalize", "layernorm_to_rmsnorm", "remove_padding")

    @dataclass(frozen=True)
    class Config:
        """Options of ``cast_bf16``.

        Attributes:
            min_cosine: the budget: mean cosine of the outputs against the graph before the pass.
            require_native: apply only where bf16 is native on this CPU and measures faster.
            attention: also run attention (SDPA, varlen attention, activation matmuls) in bf16.
            layers, pattern: which linears (indices in graph order, or a name regular expression);
                None for all.
        """

        min_cosine: float = 0.999
        require_native: bool = True
        attention: bool = True
        layers: tuple[int, ...] | None = None
        pattern: str | None = None

        def __post_init__(self):
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(self.layers))

    def analyze(self, gm: GraphModule, ctx: PassContext) -> tuple[list, list[Node]]:
        chosen = find_linears(gm) if self.config.layers is None and self.config.pattern is None else chosen_linears(gm, self.config.layers, self.config.pattern)
        linears = [lin for lin in chosen if val_of(lin.x) is not None and val_of(lin.x).dtype == torch.float32]
        others = [n for n in gm.graph.nodes if self.config.attention and (_is_attention(n) or (is_op(n, *_MATMUL_OPS) and self._activation_matmul(n)))]
        others = [n for n in others if all(isinstance(val_of(a), torch.Tensor) and val_of(a).dtype == torch.float32 for a in n.args[:2])]
        if not linears and not others:
            raise NotApplicable("no fp32 linear, matmul or attention in the graph")
        return linears, others

    @staticmethod
    def _activation_matmul(node: Node) -> bool:
        return all(isinstance(a, Node) and a.op != "get_attr" for a in node.args[:2])

    def rewrite(self, gm: GraphModule, analysis, ctx: PassContext) -> PassResult:
        linears, others = analysis
        caps = cpu_capabilities()
        if self.config.require_native:
            if not caps.native_bf16:
                raise NotApplicable(f"no native bf16 on {caps.describe()}: torch emulates it, slower than fp32 (require_native=False forces it)")
            if linears:
                m, (n, k) = max(((lin.tokens() or 1, tuple(lin.weight(gm).shape)) for lin in linears), key=lambda t: t[0] * t[1][0] * t[1][1])
                speedup = bf16_speedup(min(m, 4096), n, k)
                if speedup <= 1.0:
                    raise NotApplicable(
                        f"a bf16 linear of the graph's largest shape ({m}x{k} by {n}) measures {1 / speedup:.2f}x the fp32 time on {caps.describe()}"
                    )
        for lin in linears:
            self._cast_linear(gm, lin)
        for node in others:
            self._cast_node(gm, node)
        return PassResult(changed=True, stats={"linears": len(linears), "attention_matmuls": len(others)})

    @staticmethod
    def _to(gm: GraphModule, value: Node, dtype: torch.dtype, before: Node) -> Node:
        with gm.graph.inserting_before(before):
            return gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})

    def _cast_linear(self, gm: GraphModule, lin) -> None:
        node = lin.node
        weight = add_constant(gm, get_tensor(gm, lin.weight_node).to(torch.bfloat16), f"{lin.name}_bf16", before=node)
        node.replace_input_with(lin.weight_node, weight)
        if lin.bias is not None:
            bias = add_constant(gm, get_tensor(gm, lin.bias).to(torch.bfloat16), f"{lin.bias.target}_bf16", before=node)
            node.replace_input_with(lin.bias, bias)
        node.replace_input_with(lin.x, self._to(gm, lin.x, torch.bfloat16, node))
        self._back_to_fp32(gm, node)

    def _cast_node(self, gm: GraphModule, node: Node) -> None:
        count = 3 if _is_attention(node) else 2
        for arg in list(node.args[:count]):
            if isinstance(arg, Node):
                node.replace_input_with(arg, self._to(gm, arg, torch.bfloat16, node))
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 and is_op(node, aten.scaled_dot_product_attention) else None)
        if isinstance(mask, Node) and isinstance(val_of(mask), torch.Tensor) and val_of(mask).is_floating_point():
            node.replace_input_with(mask, self._to(gm, mask, torch.bfloat16, node))
        self._back_to_fp32(gm, node)

    def _back_to_fp32(self, gm: GraphModule, node: Node) -> None:
        with gm.graph.inserting_after(node):
            back = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
