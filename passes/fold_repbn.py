"""``fold_repbn``: each PRepBN at γ = 0 becomes its eval-mode affine map, folded into a linear where possible; exact.

The last step of the RepBN workflow (:func:`graphopt.finalize`, which runs this pass under
:class:`graphopt.PassManager` on a copy of a :class:`graphopt.tools.repbn.RepBNModel`'s graph).
At γ = 0 in eval mode a :class:`~graphopt.passes.layernorm_to_repbn.PRepBN` computes
``x·(s + η) + t`` per channel (:func:`~graphopt.passes.layernorm_to_repbn.repbn_scale_shift`).
That map goes

* into every linear that reads the norm's output, when all its readers are linears with constant
  weights (each reader gets its own folded weights), else
* into the linear that computes the norm's input, when the norm is that linear's only reader, else
* stays as one ``mul`` and one ``add``; the result's message names those norms and why.

The pass is not registered: it only applies to graphs that ``layernorm_to_repbn`` made and that were
trained to γ = 0, which :func:`graphopt.finalize` checks first.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from graphopt import ir
from graphopt.ir.weights import fold_affine_after, fold_affine_before
from graphopt.passes.layernorm_to_repbn import ARGUMENTS, prepbn_nodes, repbn_scale_shift
from graphopt.pipeline.pass_base import NotApplicable, Pass, PassContext, PassResult

__all__ = ["FoldRepBN"]


class FoldRepBN(Pass):
    """Replace every PRepBN at γ = 0 (eval mode) by its affine map, folded into a linear where possible; exact."""

    name = "fold_repbn"
    exact = True

    def analyze(self, gm: GraphModule, ctx: PassContext) -> list[Node]:
        """The PRepBN nodes, in graph order; which fold applies to each is decided as the rewrite reaches it."""
        nodes = prepbn_nodes(gm)
        if not nodes:
            raise NotApplicable("no PRepBN in the graph")
        return nodes

    def rewrite(self, gm: GraphModule, nodes: list[Node], ctx: PassContext) -> PassResult:
        stats = {"folded_into_next": 0, "folded_into_previous": 0, "kept_as_scale_shift": 0}
        kept: list[str] = []
        for node in nodes:
            module = gm.get_submodule(node.target)
            args = dict(zip(ARGUMENTS, node.args))
            tensors = [ir.get_tensor(gm, args[role]) for role in ("bn_weight", "bn_bias", "running_mean", "running_var", "eta")]
            scale, shift = repbn_scale_shift(*tensors, eps=module.bn_eps)
            x = args["input"]
            if _reads_only_as_linear_input(node):
                for linear in list(node.users):
                    fold_affine_before(gm, linear, scale, shift)
                stats["folded_into_next"] += 1
            elif ir.is_op(x, ir.aten.linear) and len(x.users) == 1 and _constant_linear(x):
                fold_affine_after(gm, x, scale, shift)
                stats["folded_into_previous"] += 1
            else:
                kept.append(f"{module.source or node.name} ({_why_not_folded(node, x)})")
                dtype = ir.val_of(x).dtype
                scale_node = ir.add_constant(gm, scale.to(dtype), f"{node.target}_scale", before=node)
                shift_node = ir.add_constant(gm, shift.to(dtype), f"{node.target}_shift", before=node)
                with gm.graph.inserting_before(node):
                    scaled = gm.graph.call_function(ir.aten.mul.Tensor, (x, scale_node))
                    affine = gm.graph.call_function(ir.aten.add.Tensor, (scaled, shift_node))
                scaled.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                affine.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                ir.replace_node(node, affine)
                stats["kept_as_scale_shift"] += 1
                continue
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
        message = "kept as x*scale+shift, no adjacent linear to fold into: " + ", ".join(kept) if kept else ""
        return PassResult(changed=True, stats=stats, message=message)


def _constant_linear(linear: Node) -> bool:
    args = ir.normalized_args(linear)
    return all(isinstance(v, Node) and v.op == "get_attr" for v in (args["weight"], args["bias"]) if v is not None)


def _reads_only_as_linear_input(node: Node) -> bool:
    return bool(node.users) and all(ir.is_op(u, ir.aten.linear) and u.args[0] is node and node not in u.args[1:] and _constant_linear(u) for u in node.users)


def _why_not_folded(node: Node, x: Node) -> str:
    """Why neither fold applies, in brief: which reader is not a linear, and what the input is."""
    others = sorted(u.name for u in node.users if not ir.is_op(u, ir.aten.linear))
    after = f"read by {', '.join(others)}" if others else "a reader's weights are not constants"
    if not ir.is_op(x, ir.aten.linear):
        before = f"input {x.name} is {ir.op_name(x.target) if x.op == 'call_function' else 'a ' + x.op}"
    else:
        before = f"input {x.name} is also read by {', '.join(sorted(u.name for u in x.users if u is not node))}"
    return f"{after}; {before}"
