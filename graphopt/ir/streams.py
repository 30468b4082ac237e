"""Residual streams of the canonical IR: what writes them, what reads them, and along which dim.

A residual network (He et al., 2016; every transformer since Vaswani et al., 2017) carries one
value, the *residual stream*, from its embeddings to its head; each block reads it and adds its
output back: ``h = h + f(h)``. Passes that rewrite a stream as a whole (LayerNorm -> RMSNorm
recentring, RepBN re-parameterisation, token pruning) need that structure explicitly:

* **nodes**: the values that *are* the stream, in graph order: its head (the first value), the
  residual adds, the transparent ops between them (eval dropout, copies, same-dtype casts, views
  to the same shape), and in a Post-LN network the norms between the adds;
* **writers**: the values added into it: the non-stream operands of its adds, and the head itself
  when the head is not an add (an add as head contributes its operands instead, so the embedding
  sum ``tok + pos`` of a GPT-2 reports both embeddings as writers);
* **readers**: every user of a stream node that is not itself a stream node (the pre-norms of a
  Pre-LN transformer, the final norm, a graph output, the branch input of a Post-LN block).

How streams are found (:func:`find_residual_streams`). A *residual add* is an ``aten.add.Tensor``
``x + y`` where ``x``'s source (through transparent ops) is an ancestor of ``y`` along a path with a
weighted op (linear, matmul, convolution, attention): the skip connection around a sublayer. The
``weighted op`` condition keeps elementwise formulas such as GELU's ``x + 0.044715 * x**3`` out.
Seeded with the residual adds and their skip sources, a stream grows forward through transparent
ops and through every add of a stream value that keeps the stream's shape (so the parallel form
``h + attn(LN(h)) + mlp(LN(h))`` is one stream too); connected seeds form one stream. A head that
itself reads an earlier stream node joins the two: in a Post-LN network (``h = LN(h + f(h))``) each
residual add reads the previous norm's output, so the norms are stream nodes
(:attr:`ResidualStream.norms`), and likewise the ReLUs of a post-activation ResNet.

How writers are traced (:func:`trace_writer`): backwards from a writer to the ops whose output
channels become the stream's hidden dim (the *leaves*: a linear, GPT-2's ``addmm``, an ungrouped
convolution, an embedding, a constant), following that dim through value identities, views that
keep the last dim, ``flatten``, ``transpose``, ``permute``, ``unsqueeze``, ``expand``, ``slice`` and
``cat`` along another dim, ``add`` of such parts and multiplication by a Python scalar. Anything
else raises :class:`graphopt.ir.NotApplicable` naming the node, which is what a pass reports as "why not".

The stream's hidden dim is its last dim (transformers; a channels-first CNN's stream is found, but
its "hidden size" is then its last spatial size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from graphopt.ir import NotApplicable, aten, describe, is_op, normalized_args, shape_of, val_of
from graphopt.ir.match import VIEW_OPS, is_value_identity, normalize_dim, same_shape
from graphopt.ir.oprecord import op_record
from graphopt.ir.weights import CONV_OPS, output_channel_dim

__all__ = [
    "NORM_OPS",
    "WEIGHTED_OPS",
    "ResidualStream",
    "WriterLeaf",
    "WriterTrace",
    "find_residual_streams",
    "is_norm",
    "is_transparent",
    "trace_writer",
]

WEIGHTED_OPS = (aten.linear, aten.addmm, aten.mm, aten.bmm, aten.matmul, aten.scaled_dot_product_attention, *CONV_OPS)
"""Ops that mix features with weights: a path through one of them makes an add a residual add."""

NORM_OPS = (aten.layer_norm, aten.rms_norm)
"""ATen's normalisations over the last dim; custom ops declare theirs in their op record (:func:`is_norm`)."""


def is_norm(node: Node) -> bool:
    """Whether ``node`` is a normalisation over the last dim: one of :data:`NORM_OPS`, or a custom
    op whose :class:`~graphopt.ir.oprecord.OpRecord` says ``is_norm`` (``graphopt::rms_norm``)."""
    if is_op(node, *NORM_OPS):
        return True
    record = op_record(node.target) if node.op == "call_function" else None
    return record is not None and record.is_norm


def is_transparent(node: Node) -> bool:
    """Whether ``node`` passes its first argument's values through unchanged, shape included:
    a value identity (eval dropout, copy, same-dtype cast) or a view / alias to the same shape."""
    if is_value_identity(node):
        return True
    if not is_op(node, *VIEW_OPS, aten.alias) or not isinstance(node.args[0], Node):
        return False
    return same_shape(shape_of(node.args[0]), shape_of(node))


def _source(node: Node) -> tuple[Node, list[Node]]:
    """Walk back through transparent ops; returns ``(source, transparent_nodes_passed)``."""
    passed = []
    while isinstance(node, Node) and is_transparent(node):
        passed.append(node)
        node = node.args[0]
    return node, passed


# ----------------------------------------------------------------------------- the stream


@dataclass
class ResidualStream:
    """One residual stream of a graph (see the module docstring for the definitions).

    Attributes:
        nodes: the stream's values in graph order (head first).
        writers: the values added into the stream, in graph order.
        readers: users of stream nodes outside the stream, in graph order (may include the
            graph's ``output`` node).
        hidden_size: the stream's last dim (an int, or a symbolic size when not static).
        adds: the stream's adds (residual adds and the head's own add, if any), in graph order.
    """

    nodes: list[Node]
    writers: list[Node]
    readers: list[Node]
    hidden_size: int | torch.SymInt | None
    adds: list[Node]

    @property
    def head(self) -> Node:
        """The stream's first value."""
        return self.nodes[0]

    @property
    def name(self) -> str:
        """A short label for messages: ``add_4..add_11``."""
        return f"{self.adds[0].name}..{self.adds[-1].name}" if len(self.adds) > 1 else self.adds[0].name

    @property
    def norms(self) -> list[Node]:
        """Normalisations (:func:`is_norm`) that are stream nodes: the stream passes *through* them.

        Non-empty for a Post-LN network: its residual adds read a LayerNorm's output
        (``h = LN(h + f(h))``), so the norm joins consecutive adds into one stream instead of
        reading it from the side, as the pre-norms of a Pre-LN network do.
        """
        return [n for n in self.nodes if is_norm(n)]


def _ancestors_after(node: Node, first_index: int, index: dict[Node, int]) -> set[Node]:
    """Ancestors of ``node`` (itself included) no earlier than position ``first_index``."""
    seen, stack = {node}, [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen and index[arg] >= first_index:
                seen.add(arg)
                stack.append(arg)
    return seen


def _is_branch_of(source: Node, branch: Node, index: dict[Node, int]) -> bool:
    """Whether ``branch`` depends on ``source`` along a path through a weighted op."""
    if index[source] >= index[branch]:
        return False
    between = _ancestors_after(branch, index[source], index)
    if source not in between:
        return False
    seen, stack = {source}, [source]  # forward from source, inside the ancestors of branch
    while stack:
        for user in stack.pop().users:
            if user in between and user not in seen:
                if is_op(user, *WEIGHTED_OPS):
                    return True
                seen.add(user)
                stack.append(user)
    return False


def _float_tensor(node: Node) -> bool:
    val = val_of(node)
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.dim() >= 1


def _two_tensor_add(node: Node) -> bool:
    return is_op(node, aten.add.Tensor) and len(node.args) >= 2 and all(isinstance(a, Node) and _float_tensor(a) for a in node.args[:2]) and _float_tensor(node)


def _residual_skip(add: Node, index: dict[Node, int]) -> Node | None:
    """The skip operand of a residual add (the one its other operand branches from), or None."""
    for skip, branch in (add.args[:2], add.args[1::-1]):
        source, _ = _source(skip)
        if same_shape(shape_of(skip), shape_of(add)) and _is_branch_of(source, branch, index):
            return skip
    return None


def find_residual_streams(gm: GraphModule) -> list[ResidualStream]:
    """Every residual stream of ``gm``, ordered by their first node."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    members: set[Node] = set()
    for add in filter(_two_tensor_add, gm.graph.nodes):
        skip = _residual_skip(add, index)
        if skip is not None:
            source, passed = _source(skip)
            members.update([source, *passed, add])
    frontier = list(members)
    while frontier:  # grow forward through transparent ops and shape-keeping adds
        node = frontier.pop()
        for user in node.users:
            if user in members:
                continue
            grows = is_transparent(user) or (_two_tensor_add(user) and same_shape(shape_of(user), shape_of(node)))
            if grows:
                members.add(user)
                frontier.append(user)
    return [_stream(component, members, index) for component in _components(members, index)]


def _components(members: set[Node], index: dict[Node, int]) -> list[list[Node]]:
    """Connected components of ``members`` (edges: argument -> user), each in graph order."""
    done: set[Node] = set()
    components = []
    for start in sorted(members, key=index.__getitem__):
        if start in done:
            continue
        component, stack = {start}, [start]
        while stack:
            node = stack.pop()
            for other in (*node.all_input_nodes, *node.users):
                if other in members and other not in component:
                    component.add(other)
                    stack.append(other)
        done |= component
        components.append(sorted(component, key=index.__getitem__))
    return components


def _stream(nodes: list[Node], members: set[Node], index: dict[Node, int]) -> ResidualStream:
    writers: list[Node] = []
    for node in nodes:
        inputs_in_stream = [a for a in node.all_input_nodes if a in members]
        if _two_tensor_add(node):
            writers.extend(a for a in node.args[:2] if a not in members)
        elif not inputs_in_stream:
            writers.append(node)  # a head that is not an add writes itself
    readers = {u for n in nodes for u in n.users if u not in members}
    shape = shape_of(nodes[0])
    return ResidualStream(
        nodes=nodes,
        writers=sorted(set(writers), key=index.__getitem__),
        readers=sorted(readers, key=index.__getitem__),
        hidden_size=shape[-1] if shape else None,
        adds=[n for n in nodes if _two_tensor_add(n)],
    )


# ----------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class WriterLeaf:
    """An op (or constant) whose output channels ``dim`` become the stream's hidden dim.

    ``node`` is an ``aten.linear`` (dim = last), an ``aten.addmm`` (dim 1), an ungrouped,
    non-transposed convolution (its output-channel dim), an ``aten.embedding`` (dim = last) or a
    ``get_attr`` constant (any dim).
    """

    node: Node
    dim: int


@dataclass
class WriterTrace:
    """What a writer is made of: its leaves, and the nodes from the leaves to the writer (the
    writer included, leaves excluded) with the position of the hidden dim in each node's output."""

    writer: Node
    leaves: list[WriterLeaf]
    path: list[tuple[Node, int]]


def _rank(node: Node) -> int:
    shape = shape_of(node)
    if shape is None:
        raise NotApplicable(f"the shape of {describe(node)} is unknown", node=node)
    return len(shape)


def _output_channels(node: Node) -> int | None:
    """The output dim indexing a leaf op's output channels; None when ``node`` is not a leaf op."""
    if is_op(node, aten.linear, aten.embedding):
        return _rank(node) - 1
    if is_op(node, aten.addmm):
        return 1
    if is_op(node, *CONV_OPS):
        args = normalized_args(node)
        if args.get("transposed") or args.get("groups", 1) != 1:
            # each group's outputs see only its own inputs: no weight edit recentres across groups
            raise NotApplicable(f"{describe(node)} is a grouped or transposed convolution", node=node)
        return output_channel_dim(node)
    return None


def _inputs_with_dim(node: Node, dim: int) -> list[tuple[Node, int]]:
    """The tensor inputs of ``node`` that carry the hidden dim, with its position there.

    ``dim`` is the hidden dim in ``node``'s output. Raises :class:`NotApplicable` when the op
    does not keep that dim as a dim of one input (or keeps it but mixes in constants).
    """
    rank = _rank(node)
    size = shape_of(node)[dim]
    src = node.args[0] if node.args else None
    if is_value_identity(node):
        return [(src, dim)]
    if is_op(node, *VIEW_OPS) and dim == rank - 1 and same_shape(shape_of(src)[-1:], (size,)):
        return [(src, _rank(src) - 1)]  # row-major: a view keeping the last dim only regroups rows
    if is_op(node, aten.flatten):
        args = normalized_args(node)
        start, end = (normalize_dim(args[k], _rank(src)) for k in ("start_dim", "end_dim"))
        if dim < start:
            return [(src, dim)]
        if dim > start:
            return [(src, dim + end - start)]
        if start == end:
            return [(src, dim)]
    if is_op(node, aten.transpose):
        a, b = (normalize_dim(d, rank) for d in node.args[1:3])
        return [(src, {a: b, b: a}.get(dim, dim))]
    if is_op(node, aten.permute):
        return [(src, normalize_dim(node.args[1][dim], rank))]
    if is_op(node, aten.unsqueeze):
        inserted = normalize_dim(node.args[1], rank)
        if dim != inserted:
            return [(src, dim - (dim > inserted))]
    if is_op(node, aten.expand):
        src_dim = dim - (rank - _rank(src))
        if src_dim >= 0 and same_shape(shape_of(src)[src_dim : src_dim + 1], (size,)):
            return [(src, src_dim)]
    if is_op(node, aten.slice.Tensor) and normalize_dim(normalized_args(node)["dim"], rank) != dim:
        return [(src, dim)]  # e.g. the first T rows of a position-embedding table
    if is_op(node, aten.cat):
        parts, cat_dim = node.args[0], normalize_dim(normalized_args(node)["dim"], rank)
        if cat_dim != dim:
            return [(p, dim) for p in parts]
    if is_op(node, aten.add.Tensor) and not _two_tensor_add(node):
        raise NotApplicable(f"{describe(node)} adds a number, which moves the mean", node=node)
    if _two_tensor_add(node):  # x + alpha * y: sums of zero-mean parts are zero-mean
        operands = []
        for operand in node.args[:2]:
            operand_dim = dim - (rank - _rank(operand))
            if operand_dim < 0 or not same_shape(shape_of(operand)[operand_dim : operand_dim + 1], (size,)):
                raise NotApplicable(f"{describe(node)} broadcasts {operand.name} along the hidden dim", node=node)
            operands.append((operand, operand_dim))
        return operands
    if is_op(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) and isinstance(src, Node):
        other = node.args[1]
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return [(src, dim)]  # scaling by a number keeps a zero mean zero
    raise NotApplicable(f"cannot follow the hidden dim through {describe(node)}", node=node)


def trace_writer(writer: Node) -> WriterTrace:
    """Follow ``writer``'s last dim back to the leaves that produce it (see the module docstring).

    Raises :class:`NotApplicable` with a reason naming the node that stops the trace (a graph
    input, an op that mixes the hidden dim with others, a grouped convolution, ...).
    """
    leaves: list[WriterLeaf] = []
    path: list[tuple[Node, int]] = []
    stack = [(writer, _rank(writer) - 1)]
    while stack:
        node, dim = stack.pop()
        if node.op == "get_attr":
            leaves.append(WriterLeaf(node, dim))
            continue
        if node.op == "placeholder":
            raise NotApplicable(f"{node.name} is a graph input", node=node)
        channels = _output_channels(node)
        if channels is None:
            path.append((node, dim))
            stack.extend(_inputs_with_dim(node, dim))
        elif channels == dim:
            leaves.append(WriterLeaf(node, dim))
        else:
            raise NotApplicable(f"the hidden dim of {describe(node)} is dim {dim}, not its output channels (dim {channels})", node=node)
    return WriterTrace(writer, leaves, path)
