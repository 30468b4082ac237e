"""``layernorm_to_rmsnorm``: Pre-LN -> Pre-RMSNorm (and Pre-CRMSNorm), exactly.

Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN
Transformers" (NeurIPS 2023). LayerNorm is RMSNorm of the centred input::

    LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * g + b = RMSNorm(x - mean(x)) * g + b,
    RMSNorm(x) = x / sqrt(mean(x²) + eps)

because ``var(x) = mean((x - mean(x))²)``. In a Pre-LN transformer the residual stream
``h = e + Σ f_i(LN_i(h))`` is read *only* through LayerNorms, so its mean along the hidden dim is
never seen: remove it and every LayerNorm on the stream becomes an RMSNorm with the same gain,
bias and eps. The mean is removed where the stream is written (*recentring*): every writer is an
affine map of something, ``y = W u + c``, and ``P y = (P W) u + P c`` with ``P = I - 1 1ᵀ / d``
the centring projection, i.e. subtract from ``W`` the mean of its rows (over the output dim) and
from ``c`` its mean. The writers recentred (:func:`graphopt.ir.streams.trace_writer`): linears and
GPT-2's ``addmm`` projections, embedding tables (each row), position-embedding / class-token
constants (last dim), patch-embedding convolutions (over output channels), through views, cat and
sums. Every write is then zero-mean, so the stream is, and ``LN(h) = RMSNorm(h) * g + b`` holds
exactly; in float32 the outputs move by 1e-6 relative or less (on gpt2-tiny the converted graph is
even closer to a float64 reference than the original: the mean is removed once, in float64, from
the weights, instead of by every LayerNorm, in float32, from activations).

Tensors are recentred in float64 and attached as new constants: a weight the writer shares with a
non-stream use is copied, never changed under it. The trap this covers is GPT-2's LM head tied to
the token embedding (one constant read by ``aten.embedding`` and the head's ``aten.linear``): the
embedding gets the recentred copy, the head keeps the original table (stat ``untied``).

**Pre-CRMSNorm** (``compress=True``). A zero-mean ``d``-vector is determined by its first ``d - 1``
coordinates (the last is minus their sum), so the stream is stored ``d - 1`` wide: writers produce
only the first ``d - 1`` coordinates (the recentred weights sliced) and each LayerNorm becomes
``CRMSNorm(x) = x / sqrt((Σ x_i² + (Σ x_i)²) / d + eps)`` (``graphopt::crms_norm``, still ``d - 1``
wide), followed by the decompression ``v = M x = [x, -Σ x]`` (``M = [I; -1ᵀ]``) and the affine map.
Where the norm output feeds only linears (through views), both fold into them:
``W' = (W · diag(g)) M`` and ``c' = c + W b``; elsewhere (a graph output, an attention input) an
explicit ``cat([x, -sum(x)]) * g + b`` follows the norm. The stream's shape changes from ``d`` to
``d - 1`` mid-graph (views on the way are rewritten, shapes re-propagate). What it saves is ``1/d``
of the stream's memory traffic and of the writers' and readers' matmul work: 0.8% at ``d = 128``,
0.13% at ``d = 768``. The paper's point is the equivalence (pick the cheapest of the three forms
at no cost in accuracy); compression itself is not a speed-up one can measure on CPU, where the odd ``d - 1`` widths and the extra decompression ops cost more than the
saved column. Use it for very narrow streams, or for the memory. Numerically the implicit last
coordinate carries the rounding of the ``d - 1`` stored ones, so errors are a few times larger than
without compression (3e-6 to 5e-6 relative on vit-s, d = 384, all of it in that coordinate).

A stream is converted only when every reader is an ``aten.layer_norm`` over its last dim (the one
reader that provably ignores the mean: an RMSNorm, a linear, a pooling or a graph output all see
it) and every writer traces back to constant parameters without being read elsewhere; otherwise it
is left alone and the message says which node stops it. Post-LN networks (BERT: ``h = LN(h + f(h))``) are
not applicable: their residual adds read a LayerNorm's output, so the stream is read by the
sublayers' linears directly. Networks already on RMSNorm (Llama) have no LayerNorm to convert.
Runs after ``canonicalize``, which turns hand-written LayerNorm formulas into ``aten.layer_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from graphopt.ir import NotApplicable, add_constant, aten, describe, external_user, get_tensor, is_op, normalized_args, replace_node, shape_of
from graphopt.ir.match import VIEW_OPS, same_shape
from graphopt.ir.streams import ResidualStream, WriterTrace, find_residual_streams, is_norm, is_transparent, trace_writer
from graphopt.ir.weights import affine_before
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass, summarize_reasons

_SIZED_OPS = (*VIEW_OPS, aten.expand)  # ops whose size argument names the hidden size


# ----------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """A stream that converts: its writers traced to parameters, and its LayerNorms."""

    stream: ResidualStream
    traces: list[WriterTrace]
    layer_norms: list[Node]

    @property
    def hidden_size(self) -> int:
        return self.stream.hidden_size


def _is_layer_norm_over(node: Node, d: int, stream_nodes: set[Node]) -> bool:
    if not is_op(node, aten.layer_norm):
        return False
    args = normalized_args(node)
    return args["input"] in stream_nodes and list(args["normalized_shape"]) == [d]


def _check_readers(stream: ResidualStream, d: int) -> list[Node]:
    """The stream's LayerNorms; :class:`NotApplicable` when anything else reads it."""
    nodes = set(stream.nodes)
    if stream.norms:
        norm = stream.norms[-1]
        add = next(u for u in norm.users if u in nodes)
        while not is_op(add, aten.add):  # past eval dropout to the residual add
            add = next(u for u in add.users if u in nodes)
        other = next((r for r in stream.readers if not _is_layer_norm_over(r, d, nodes)), None)
        read = f", so {describe(other)} reads the stream, not only LayerNorm" if other else ""
        raise NotApplicable(f"post-LN: {add.name} reads the output of LayerNorm {norm.name}{read}")
    layer_norms = [r for r in stream.readers if _is_layer_norm_over(r, d, nodes)]
    if not layer_norms:
        rms = [r for r in stream.readers if is_norm(r)]
        if rms:
            raise NotApplicable(f"no LayerNorm reads it: already RMSNorm ({describe(rms[0])})")
        raise NotApplicable("no LayerNorm reads it")
    for reader in stream.readers:
        if reader.op == "output":
            raise NotApplicable("the raw stream is a graph output (no LayerNorm before it), so its mean is seen")
        if reader not in layer_norms:
            raise NotApplicable(f"reader {describe(reader)} is not a LayerNorm over the hidden dim")
    return layer_norms


def _constant(op: Node, name: str, *, optional: bool = False) -> Node | None:
    value = normalized_args(op)[name]
    if value is None and optional:
        return None
    if not (isinstance(value, Node) and value.op == "get_attr"):
        raise NotApplicable(f"the {name} of writer {describe(op)} is not a constant")
    return value


_LEAF_PARAMETERS = {  # op -> ((argument, dim holding the output channels, optional), ...)
    aten.linear: (("weight", 0, False), ("bias", -1, True)),
    aten.addmm: (("mat2", 1, False), ("self", -1, False)),  # GPT-2's Conv1D: bias + x @ W, W is [in, out]
    aten.embedding: (("weight", 1, False),),
    aten.conv1d: (("weight", 0, False), ("bias", -1, True)),
    aten.conv2d: (("weight", 0, False), ("bias", -1, True)),
    aten.conv3d: (("weight", 0, False), ("bias", -1, True)),
    aten.convolution: (("weight", 0, False), ("bias", -1, True)),
}


def _leaf_parameters(leaf: Node) -> list[tuple[Node, int]]:
    """The constants a writer leaf's output channels come from, with their channel dim."""
    if leaf.op == "get_attr":
        return []
    params = []
    for name, dim, optional in _LEAF_PARAMETERS[leaf.target.overloadpacket]:
        node = _constant(leaf, name, optional=optional)
        if node is not None:
            params.append((node, dim))
    return params


def _shrinkable(node: Node, dim: int, d: int) -> bool:
    """Whether ``node``'s size argument (if any) can say ``d - 1`` instead of ``d`` at ``dim``."""
    if not is_op(node, *_SIZED_OPS):
        return True
    size = list(node.args[1])[dim]
    return size == d or size == -1


def _check_writers(stream: ResidualStream, d: int, compress: bool) -> list[WriterTrace]:
    traces = []
    for writer in stream.writers:
        if writer.op == "placeholder":
            raise NotApplicable(f"writer {writer.name} is a graph input")
        try:
            trace = trace_writer(writer)
        except NotApplicable as e:
            raise NotApplicable(f"writer {writer.name} is not recentrable: {e.reason}", node=e.node) from None
        for leaf in trace.leaves:
            _leaf_parameters(leaf.node)  # raises when a weight or bias is not a constant
        ops = [n for n, _ in trace.path] + [leaf.node for leaf in trace.leaves if leaf.node.op != "get_attr"]
        leaked = external_user([*ops, *stream.nodes], keep=stream.nodes)
        if leaked is not None:
            users = ", ".join(u.name for u in leaked.users)
            raise NotApplicable(f"writer {writer.name} is not recentrable: {leaked.name} is also read outside the stream ({users})")
        if compress:
            for node, dim in trace.path:
                if not _shrinkable(node, dim, d):
                    raise NotApplicable(f"cannot compress: {describe(node)} has a fixed size other than {d} in the hidden dim")
        traces.append(trace)
    return traces


def _plan(stream: ResidualStream, compress: bool) -> _Plan:
    d = stream.hidden_size
    if not isinstance(d, int):
        raise NotApplicable("its hidden size is not static")
    layer_norms = _check_readers(stream, d)
    traces = _check_writers(stream, d, compress)
    if compress:
        for node in stream.nodes:
            if not _shrinkable(node, len(shape_of(node)) - 1, d):
                raise NotApplicable(f"cannot compress: {describe(node)} has a fixed size other than {d} in the hidden dim")
    return _Plan(stream, traces, layer_norms)


def _analyse(gm: GraphModule, compress: bool) -> tuple[list[_Plan], list[str]]:
    """Plans for the convertible streams, and a reason for each other stream."""
    plans, reasons = [], []
    for stream in find_residual_streams(gm):
        try:
            plans.append(_plan(stream, compress))
        except NotApplicable as e:
            reasons.append(f"stream {stream.name}: {e.reason}")
    return plans, reasons


# ----------------------------------------------------------------------------- rewriting


class _Rewriter:
    """Edits one graph: new constants for recentred / folded parameters, norms replaced."""

    def __init__(self, gm: GraphModule, compress: bool):
        self.gm = gm
        self.compress = compress
        self.recentred_copies: dict[tuple[Node, int], Node] = {}  # one copy per shared weight

    def recentred(self, old: Node, dim: int, d: int) -> Node:
        """A new constant: ``old`` minus its mean along ``dim`` (its first ``d - 1`` entries there
        when compressing). ``old`` itself is left to its other readers."""
        if (old, dim) not in self.recentred_copies:
            t = get_tensor(self.gm, old)
            centred = t.double() - t.double().mean(dim=dim, keepdim=True)
            if self.compress:
                centred = centred.narrow(dim, 0, d - 1)
            self.recentred_copies[old, dim] = add_constant(self.gm, centred.to(t.dtype).contiguous(), old.target)
        return self.recentred_copies[old, dim]

    def recentre_writers(self, plan: _Plan) -> int:
        d, stream_nodes = plan.hidden_size, set(plan.stream.nodes)
        leaves = 0
        for trace in plan.traces:
            path_nodes = {n for n, _ in trace.path}
            for leaf in trace.leaves:
                if leaf.node.op == "get_attr":
                    new = self.recentred(leaf.node, leaf.dim, d)
                    for consumer in [u for u in leaf.node.users if u in path_nodes or u in stream_nodes]:
                        consumer.replace_input_with(leaf.node, new)
                else:
                    for param, dim in _leaf_parameters(leaf.node):
                        leaf.node.replace_input_with(param, self.recentred(param, dim, d))
                leaves += 1
            if self.compress:
                for node, dim in trace.path:
                    _shrink_size(node, dim, d)
        if self.compress:
            for node in plan.stream.nodes:
                _shrink_size(node, len(shape_of(node)) - 1, d)
        return leaves

    def to_rms_norm(self, ln: Node) -> None:
        args = normalized_args(ln)
        with self.gm.graph.inserting_before(ln):
            rms = self.gm.graph.call_function(torch.ops.graphopt.rms_norm.default, (args["input"], args["weight"], args["bias"], args["eps"]))
        replace_node(ln, rms)

    def to_crms_norm(self, ln: Node, d: int) -> None:
        args = normalized_args(ln)
        with self.gm.graph.inserting_before(ln):
            norm = self.gm.graph.call_function(torch.ops.graphopt.crms_norm.default, (args["input"], args["eps"]))
        chain = _linear_readers(ln, d)
        affine = [args[k] for k in ("weight", "bias") if args[k] is not None]
        if chain is not None and all(a.op == "get_attr" for a in affine):
            views, linears = chain
            for view in views:
                _shrink_size(view, len(shape_of(view)) - 1, d)
            for linear in linears:
                self.fold_into(linear, args["weight"], args["bias"])
            replace_node(ln, norm)
            return
        with self.gm.graph.inserting_before(ln):  # after norm, in order
            total = self.gm.graph.call_function(aten.sum.dim_IntList, (norm, [-1], True))
            last = self.gm.graph.call_function(aten.neg.default, (total,))
            out = self.gm.graph.call_function(aten.cat.default, ([norm, last], -1))
            if args["weight"] is not None:
                out = self.gm.graph.call_function(aten.mul.Tensor, (out, args["weight"]))
            if args["bias"] is not None:
                out = self.gm.graph.call_function(aten.add.Tensor, (out, args["bias"]))
        replace_node(ln, out)

    def fold_into(self, linear: Node, gain: Node | None, shift: Node | None) -> None:
        """Make ``linear`` (reading the ``d``-wide LayerNorm output ``x * g + b``) read the
        ``d - 1``-wide CRMSNorm output ``x̃`` (``x = M x̃``): ``W' = (W diag(g)) M``, ``c' = c + W b``."""
        weight_first = is_op(linear, aten.linear)  # linear: [out, in]; addmm: mat2 is [in, out]
        w_name, c_name = ("weight", "bias") if weight_first else ("mat2", "self")
        w_node, c_node = normalized_args(linear)[w_name], normalized_args(linear)[c_name]
        w = get_tensor(self.gm, w_node)
        w64 = w.double() if weight_first else w.double().T
        c64 = get_tensor(self.gm, c_node).double() if c_node is not None else None
        g = get_tensor(self.gm, gain) if gain is not None else 1.0
        b = get_tensor(self.gm, shift) if shift is not None else 0.0
        scaled, new_c = affine_before(w64, c64, g, b)
        folded = scaled[:, :-1] - scaled[:, -1:]
        folded = folded if weight_first else folded.T
        new_w = add_constant(self.gm, folded.to(w.dtype).contiguous(), w_node.target)
        linear.replace_input_with(w_node, new_w)
        new_c_node = add_constant(self.gm, new_c.to(w.dtype), c_node.target if c_node is not None else f"{w_node.target}_bias")
        if c_node is not None:
            linear.replace_input_with(c_node, new_c_node)
        else:
            _set_linear_bias(linear, new_c_node)


def _set_linear_bias(linear: Node, bias: Node) -> None:
    """Give an ``aten.linear`` that has none a bias."""
    if "bias" in linear.kwargs:
        linear.update_kwarg("bias", bias)
    elif len(linear.args) > 2:
        linear.update_arg(2, bias)
    else:
        linear.args = (*linear.args, bias)


def _shrink_size(node: Node, dim: int, d: int) -> None:
    """Rewrite ``node``'s size argument from ``d`` to ``d - 1`` at ``dim`` (``-1`` stays)."""
    if is_op(node, *_SIZED_OPS):
        sizes = list(node.args[1])
        if sizes[dim] == d:
            sizes[dim] = d - 1
            node.update_arg(1, sizes)


def _linear_readers(ln: Node, d: int) -> tuple[list[Node], list[Node]] | None:
    """The views and the linears that read ``ln``'s output, if only linears do (through views keeping
    the last dim and value identities); None otherwise."""
    views, linears, stack = [], [], [ln]
    while stack:
        node = stack.pop()
        for user in node.users:
            keeps_last = is_op(user, *VIEW_OPS) and same_shape(shape_of(user)[-1:], (d,)) and _shrinkable(user, -1, d)
            if is_transparent(user) or keeps_last:
                views.append(user)
                stack.append(user)
            elif _foldable_linear(user, node):
                linears.append(user)
            else:
                return None
    return views, linears


def _foldable_linear(user: Node, source: Node) -> bool:
    """Whether ``user`` is a linear / addmm with constant parameters whose input is ``source``."""
    if is_op(user, aten.linear):
        args = normalized_args(user)
        constants = [args["weight"], *([args["bias"]] if args["bias"] is not None else [])]
        return args["input"] is source and all(_is_constant(c) for c in constants)
    if is_op(user, aten.addmm):
        args = normalized_args(user)
        return args["mat1"] is source and args["beta"] == 1 and args["alpha"] == 1 and _is_constant(args["mat2"]) and _is_constant(args["self"])
    return False


def _is_constant(value) -> bool:
    return isinstance(value, Node) and value.op == "get_attr"


def _untied(gm: GraphModule, plans: list[_Plan]) -> int:
    """How many recentred constants are also read outside the streams' writers (tied weights)."""
    writer_uses: dict[str, set[Node]] = {}
    for plan in plans:
        stream_nodes = set(plan.stream.nodes)
        for trace in plan.traces:
            path_nodes = {n for n, _ in trace.path}
            for leaf in trace.leaves:
                if leaf.node.op == "get_attr":
                    uses = {u for u in leaf.node.users if u in path_nodes or u in stream_nodes}
                    writer_uses.setdefault(leaf.node.target, set()).update(uses)
                else:
                    for param, _ in _leaf_parameters(leaf.node):
                        writer_uses.setdefault(param.target, set()).add(leaf.node)
    untied = 0
    for target, uses in writer_uses.items():
        readers = {u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users}
        untied += bool(readers - uses)
    return untied


# ----------------------------------------------------------------------------- the pass


@register_pass
class LayerNormToRMSNorm(Pass):
    """Pre-LN -> Pre-RMSNorm (Jiang et al., 2023): zero-mean residual streams, RMSNorm readers.

    Recentre every writer of a residual stream, then every LayerNorm reading it is an RMSNorm with
    the same gain and bias (exact). ``compress=True``: Pre-CRMSNorm, streams stored ``d - 1`` wide.
    """

    name = "layernorm_to_rmsnorm"
    exact = True
    after = ("canonicalize",)

    @dataclass(frozen=True)
    class Config:
        """Options of ``layernorm_to_rmsnorm``.

        Attributes:
            compress: Pre-CRMSNorm: store each converted stream ``d - 1`` wide (see the module docstring).
        """

        compress: bool = False

    def analyze(self, gm: GraphModule, ctx: PassContext) -> tuple[list[_Plan], list[str]]:
        """Plans for the convertible streams and a reason for each other stream; :class:`NotApplicable`
        when no stream converts."""
        plans, reasons = _analyse(gm, self.config.compress)
        if plans:
            return plans, reasons
        if not reasons:
            raise NotApplicable("no residual stream in the graph")
        raise NotApplicable(f"no convertible residual stream: {summarize_reasons(reasons)}")

    def rewrite(self, gm: GraphModule, analysis: tuple[list[_Plan], list[str]], ctx: PassContext) -> PassResult:
        plans, reasons = analysis
        compress = self.config.compress
        untied = _untied(gm, plans)
        rewriter = _Rewriter(gm, compress)
        leaves = layer_norms = 0
        for plan in plans:
            leaves += rewriter.recentre_writers(plan)
            for ln in plan.layer_norms:
                if compress:
                    rewriter.to_crms_norm(ln, plan.hidden_size)
                else:
                    rewriter.to_rms_norm(ln)
                layer_norms += 1
        stats = {"streams": len(plans), "layer_norms": layer_norms, "writers_recentred": leaves, "untied": untied}
        message = f"left {len(reasons)} stream(s): {summarize_reasons(reasons)}" if reasons else ""
        return PassResult(changed=bool(plans), stats=stats, message=message)
