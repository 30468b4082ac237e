"""The packed token stream of a graph: where it can be cut, and how to shrink it there.

Token pruning and merging (``prune_tokens``, ``merge_tokens``) reduce the tokens of every sequence
at a point of the network and let everything after it run on fewer. They work on the packed form
``remove_padding`` leaves (ByteTransformer): the valid tokens of all sequences are one ``[T, ...]``
tensor laid out by a ``[B, S]`` mask (``graphopt::pack_tokens``), attentions see only their own
sequence through cumulative offsets (``cu_seqlens``), and pooling reads the packed tokens
(``graphopt::sum_tokens`` / ``select_token``). Shrinking that stream needs no reshaping of any
``[B, S, ...]`` tensor and keeps every sequence apart: a reduction op maps ``[T, ...]`` to
``[T', ...]`` and returns the mask of the new layout (each row's ``n'_b`` tokens first), and
everything downstream reads the new layout instead of the old one:

* the token count (``sym_size(x, 0)`` of a packed value, which the packed views take as their first size);
* ``cu_seqlens`` of packed attentions, recomputed from the new mask exactly as ``remove_padding``
  computes them;
* the ``mask`` operand of every packed op (poolings, packed attentions that take one);
* ``sizes``, the number of original tokens each current token stands for, where a reduction
  tracks them (ToMe's size-weighted averages, proportional attention, size-weighted pooling).

**Where to cut** (:func:`residual_fork`). ToMe merges "between the attention and the MLP of each
block", Zero-TPrune prunes after the attention whose probabilities scored the tokens. In a graph
that is the residual stream right after attention ``l``: the first node after it that every path
from the packed tokens to the next attention (or, after the last, to the graph's output) goes
through (a dominator, ``networkx.immediate_dominators``) and that more than one op reads (the
stream forks into the MLP and its residual). In a pre-LN block (ViT) that is ``x + attn(norm(x))``;
in a post-LN one (BERT) the LayerNorm after that sum.

**What blocks a cut.** A node after the cut that reads token values from before it as well (a skip
connection around the cut, per-token outputs of earlier layers concatenated with later ones), or
the graph returning per-token values after the cut (``unpack_tokens``: the positions no longer
exist), or a pooling of a position other than protected leading ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from graphopt.ir import NotApplicable, aten, describe, is_op, op_name, val_of

__all__ = ["Layout", "TokenStream", "residual_fork", "shrink", "token_stream", "weight_poolings"]

# The packed ops by name: this module is below graphopt.ops in the import layers (the passes that
# call it import the ops, which registers them).
_PACK, _UNPACK, _SELECT, _SUM = "graphopt.pack_tokens.default", "graphopt.unpack_tokens.default", "graphopt.select_token.default", "graphopt.sum_tokens.default"
_VARLEN = "graphopt.varlen_attention.default"


def _is(node: Node, name: str) -> bool:
    return node.op == "call_function" and op_name(node.target) == name


def is_packed(gm: GraphModule) -> bool:
    """Whether ``gm`` holds packed tokens (``graphopt::pack_tokens``, what ``remove_padding`` emits)."""
    return any(_is(n, _PACK) for n in gm.graph.nodes)


def _argument_names(node: Node) -> list[str]:
    schema = getattr(node.target, "_schema", None)
    return [a.name for a in schema.arguments] if schema is not None else []


def _argument(node: Node, name: str) -> Any:
    names = _argument_names(node)
    i = names.index(name)
    return node.args[i] if i < len(node.args) else node.kwargs.get(name)


def _is_graphopt(node: Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "graphopt"


def packed_attention(node: Node) -> bool:
    """A graphopt attention over packed tokens: an op taking ``cu_seqlens`` (varlen softmax,
    linear, hybrid or window attention) or a ``mask`` and ``sizes`` (proportional attention)."""
    if not _is_graphopt(node):
        return False
    names = _argument_names(node)
    return "cu_seqlens" in names or ("sizes" in names and "v" in names)


@dataclass
class Layout:
    """The graph values that describe the packed tokens at a point of the graph.

    Attributes:
        count: ``sym_size(x, 0)`` of a packed value there (the packed views' first size).
        mask: the ``[B, S]`` mask whose row ``b`` marks sequence ``b``'s tokens (the input mask
            before any reduction; each row's first ``n'_b`` positions after one).
        cu_seqlens: the offsets of ``mask`` for packed attentions.
        sizes: float32 ``[T]`` original tokens per token, None while every token is one.
        proportional: whether the sizes vary within a sequence (after a merge), so that attention
            must weigh keys by them (ToMe's proportional attention) to stay what it was.
    """

    count: Node
    mask: Node
    cu_seqlens: Node | None
    sizes: Node | None = None
    proportional: bool = False


@dataclass
class TokenStream:
    """The packed tokens of a graph: the pack, its layout and the attentions that read them, in order."""

    pack: Node
    layout: Layout
    attentions: list[Node]
    tokens: set[Node] = field(default_factory=set)  # nodes holding packed tokens first ([T, ...])
    reductions: dict[Node, Node] = field(default_factory=dict)  # a reduced value -> the value it reduced
    side: set[Node] = field(default_factory=set)  # nodes a reduction emitted (scores, metric, sizes): not the stream's readers


def _count_symbol(node: Node) -> Any:
    val = val_of(node)
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    size = val.shape[0]
    return size.node.expr if isinstance(size, torch.SymInt) else None


def token_stream(gm: GraphModule) -> TokenStream:
    """The packed token stream of ``gm``; :class:`NotApplicable` when it has none (no
    ``graphopt::pack_tokens``: run ``remove_padding`` first) or more than one."""
    packs = [n for n in gm.graph.nodes if _is(n, _PACK)]
    if not packs:
        raise NotApplicable("the graph holds no packed tokens (graphopt::pack_tokens): remove_padding did not apply to it")
    if len(packs) > 1:
        raise NotApplicable(f"the graph packs tokens {len(packs)} times; token reduction follows one packed stream")
    pack = packs[0]
    symbol = _count_symbol(pack)
    tokens = {n for n in gm.graph.nodes if n.op == "call_function" and symbol is not None and _count_symbol(n) == symbol}
    tokens.add(pack)
    attentions = [n for n in gm.graph.nodes if packed_attention(n)]
    if not attentions:
        raise NotApplicable("no attention reads the packed tokens")
    counts = [n for n in gm.graph.nodes if is_op(n, aten.sym_size.int) and n.args[0] in tokens and n.args[1] == 0]
    offsets = {_argument(a, "cu_seqlens") for a in attentions if "cu_seqlens" in _argument_names(a)}
    if len(offsets) > 1:
        raise NotApplicable("the packed attentions read different offsets")
    with gm.graph.inserting_after(pack):
        count = counts[0] if counts else gm.graph.call_function(aten.sym_size.int, (pack, 0))
    layout = Layout(count=count, mask=pack.args[1], cu_seqlens=next(iter(offsets), None))
    return TokenStream(pack, layout, attentions, tokens)


def residual_fork(gm: GraphModule, stream: TokenStream, layer: int) -> Node:
    """Where to reduce the tokens after attention ``layer``: the first node after it that every
    path from the pack to the next attention (the graph's output after the last) passes through,
    and that more than one op reads (the residual stream); the first such dominator when none forks."""
    # Only token values count as paths: the token count and offsets reach every layer too, but
    # they describe the layout, which a cut replaces anyway.
    graph, sink_name = nx.DiGraph(), "tokens leave the stream"
    graph.add_node(stream.pack)
    for node in stream.tokens:
        for user in node.users:
            if user in stream.tokens:
                graph.add_edge(node, user)
            elif not is_op(user, aten.sym_size.int) and user not in stream.side:
                graph.add_edge(node, sink_name)
    for reduced, source in stream.reductions.items():
        graph.add_edge(source, reduced)
    attention = stream.attentions[layer]
    sink = stream.attentions[layer + 1] if layer + 1 < len(stream.attentions) else sink_name
    reachable = nx.descendants(graph, stream.pack) | {stream.pack}
    if sink not in reachable:
        raise NotApplicable(f"{getattr(sink, 'name', sink)} does not read the packed tokens")
    dominators = nx.immediate_dominators(graph.subgraph(reachable), stream.pack)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    chain, node = [], sink
    while node is not stream.pack:
        node = dominators[node]
        if order[node] <= order[attention]:
            break
        chain.append(node)
    chain = [n for n in reversed(chain) if n in stream.tokens]
    if not chain:
        raise NotApplicable(f"no single token value carries everything from {attention.name} to {getattr(sink, 'name', sink)}")
    forks = [n for n in chain if sum(1 for u in n.users if u in stream.tokens or packed_attention(u)) > 1]
    return (forks or chain)[0]


def _descendants(node: Node) -> list[Node]:
    seen, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    seen.discard(node)
    return [n for n in node.graph.nodes if n in seen]


def _call(graph, target, *args, **kwargs) -> Node:
    return graph.call_function(target, args, kwargs)


def offsets_of(graph, mask: Node) -> Node:
    """``cu_seqlens`` of a ``[B, S]`` mask in ATen ops, as ``remove_padding`` emits them."""
    lengths = _call(graph, aten.sum.dim_IntList, _call(graph, aten.ne.Scalar, mask, 0), [1])
    return _call(graph, aten.constant_pad_nd.default, _call(graph, aten.cumsum.default, lengths, 0), [1, 0], 0)


def shrink(
    gm: GraphModule,
    stream: TokenStream,
    cut: Node,
    layout: Layout,
    reduce: Callable[[Any, Node, Layout], tuple[Node, Node, Node]],
    *,
    protected: int,
    proportional: bool,
) -> Layout:
    """Reduce the tokens at ``cut`` and make everything downstream read the new layout.

    ``reduce(graph, x, layout)`` emits the reduction of the packed value ``x`` (inserted right after
    ``cut``) and returns its ``(x', sizes', mask')`` nodes. Every reader of ``cut`` then reads
    ``x'``, and every node downstream of ``x'`` reads the new count, offsets, mask and sizes where
    it read the old ones. ``proportional``: the new sizes vary within a sequence, so downstream
    softmax attentions become size-weighted (``graphopt::varlen_attention_sized``).
    Raises :class:`NotApplicable` (before editing anything) for what blocks a cut (module docstring).
    """
    graph = gm.graph
    after = set(_descendants(cut))
    for node in after:
        if node.op == "output":
            continue
        if _is(node, _UNPACK):
            raise NotApplicable(f"{describe(node)} returns per-token values after {cut.name}, whose positions token reduction removes")
        if _is(node, _SELECT) and not 0 <= node.args[2] < protected:
            raise NotApplicable(f"{describe(node)} pools position {node.args[2]}, which is not a protected token ({protected} protected)")
        mixed = [a for a in node.all_input_nodes if a in stream.tokens and a is not cut and a not in after]
        if mixed:
            raise NotApplicable(f"{describe(node)} reads {mixed[0].name}, a token value from before the cut at {cut.name}")
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaked = [a for a in output.all_input_nodes if a in after and a in stream.tokens]
    if leaked:
        raise NotApplicable(f"the graph returns {leaked[0].name}, per-token values after the cut at {cut.name}")

    users = list(cut.users)
    with graph.inserting_after(cut):
        anchor = _call(graph, aten.alias.default, cut)  # new nodes go before it: right after `cut`, in order
    with graph.inserting_before(anchor):
        x, sizes, mask = reduce(graph, cut, layout)
        count = _call(graph, aten.sym_size.int, x, 0)
        offsets = offsets_of(graph, mask) if layout.cu_seqlens is not None else None
    emitted, node = [], cut.next
    while node is not anchor:
        emitted.append(node)
        node = node.next
    stream.side.update(emitted)
    anchor.replace_all_uses_with(cut)
    graph.erase_node(anchor)
    for user in users:
        user.replace_input_with(cut, x)
    new = Layout(count, mask, offsets, sizes, layout.proportional or proportional)
    counts = {n for n in graph.nodes if is_op(n, aten.sym_size.int) and n.args[0] in stream.tokens and n.args[1] == 0}
    renames = {layout.mask: mask, **({layout.cu_seqlens: offsets} if offsets is not None else {})}
    if layout.sizes is not None:
        renames[layout.sizes] = sizes
    for node in _descendants(x):
        for old in node.all_input_nodes:
            if old in counts or old is layout.count:
                node.replace_input_with(old, count)
            elif old in renames:
                node.replace_input_with(old, renames[old])
        if new.proportional and _is(node, _VARLEN):
            stream.tokens.add(_weigh_keys(graph, node, new))
    stream.tokens.add(x)
    stream.reductions[x] = cut
    return new


def _weigh_keys(graph, node: Node, layout: Layout) -> Node:
    """``varlen_attention`` -> ``varlen_attention_sized`` with the layout's sizes (proportional attention)."""
    q, k, v = node.args[:3]
    scale = _argument(node, "scale")
    with graph.inserting_before(node):
        sized = _call(graph, torch.ops.graphopt.varlen_attention_sized.default, q, k, v, layout.mask, layout.sizes, scale)
    node.replace_all_uses_with(sized)
    graph.erase_node(node)
    return sized


def weight_poolings(gm: GraphModule, layout: Layout) -> int:
    """Make every ``sum_tokens`` of the final layout size-weighted: ``sum_tokens(x * sizes)``, so a
    sum (and the masked mean dividing it by the original count) counts each token as the tokens it
    stands for. Returns how many."""
    if layout.sizes is None:
        return 0
    graph, weighted = gm.graph, 0
    for node in list(graph.nodes):
        if not (_is(node, _SUM) and node.args[1] is layout.mask):
            continue
        x = node.args[0]
        rank = val_of(x).dim() if isinstance(val_of(x), torch.Tensor) else 2
        with graph.inserting_before(node):
            w = _call(graph, aten._to_copy.default, layout.sizes, dtype=val_of(x).dtype if val_of(x) is not None else torch.float32)
            w = _call(graph, aten.view.default, w, [-1, *[1] * (rank - 1)])
            node.replace_input_with(x, _call(graph, aten.mul.Tensor, x, w))
        weighted += 1
    return weighted


def with_sizes(layout: Layout, graph, like: Node) -> Node:
    """The layout's sizes, or ones ``[T]`` (float32) emitted after ``like`` when every token is one."""
    if layout.sizes is not None:
        return layout.sizes
    return _call(graph, aten.new_ones.default, like, [layout.count], dtype=torch.float32)


def key_metric(graph, attention: Node) -> Node:
    """ToMe's similarity metric for the tokens attention ``attention`` reads: its keys averaged over heads, ``[T, D]``."""
    return _call(graph, aten.mean.dim, _argument(attention, "k"), [1])


def attention_operands(attention: Node) -> dict[str, Any]:
    """``q``, ``k`` and ``scale`` of a packed attention node."""
    return {
        "q": _argument(attention, "q"),
        "k": _argument(attention, "k"),
        "scale": _argument(attention, "scale") if "scale" in _argument_names(attention) else None,
    }


def default_protect_last(stream: TokenStream) -> int:
    """How many trailing tokens to protect when the user does not say: one where the tokens were
    packed by a padding-mask input (text: ``[SEP]``), none where every position is a token (a ViT's patches)."""
    return 1 if stream.layout.mask.op == "placeholder" else 0


def reduce_tokens(
    gm: GraphModule,
    stream: TokenStream,
    layers: list[int],
    emit: Callable[[Any, Node, Layout, Node], tuple[Node, Node, Node]],
    *,
    protected: int,
    proportional: bool,
) -> list[Layout]:
    """Reduce the packed tokens after each attention in ``layers`` (indices into the packed
    attentions, in graph order), each at its :func:`residual_fork`, then weight the final poolings
    by the sizes. ``emit(graph, x, layout, attention)`` emits one reduction (see :func:`shrink`).
    ``stream`` is :func:`token_stream` of ``gm`` before any cut. Returns the layout before the
    first cut and after each."""
    layout, layouts = stream.layout, [stream.layout]
    for layer in sorted(set(layers)):
        attention = stream.attentions[layer]
        cut = residual_fork(gm, stream, layer)
        layout = shrink(gm, stream, cut, layout, lambda graph, x, lay, a=attention: emit(graph, x, lay, a), protected=protected, proportional=proportional)
        layouts.append(layout)
        stream.attentions = [n for n in gm.graph.nodes if packed_attention(n)]
    weight_poolings(gm, layout)
    return layouts


def chosen_layers(layers: Sequence[int] | None, count: int, default: Sequence[int]) -> list[int]:
    """Indices ``layers`` into ``count`` attentions (negative from the end), or ``default``;
    :class:`NotApplicable` for one out of range."""
    if layers is None:
        return sorted(set(default))
    outside = [i for i in layers if not -count <= i < count]
    if outside:
        raise NotApplicable(f"layers {outside} out of range: the graph has {count} attentions")
    return sorted({i % count for i in layers})


def token_counts(gm: GraphModule, layouts: Sequence[Layout], batches) -> list[int]:
    """The total number of tokens of each of ``layouts`` (what :func:`reduce_tokens` returns), summed over ``batches``."""
    from graphopt.ir.calibrate import record_arguments

    nodes = [layout.count for layout in layouts]
    recorded = record_arguments(gm, nodes, batches)
    first_tensor = lambda call: next(v for v in torch.utils._pytree.tree_leaves(call) if isinstance(v, torch.Tensor))  # noqa: E731
    return [sum(int(first_tensor(call).shape[0]) for call in recorded[node]) for node in nodes]


def reduction_stats(gm: GraphModule, ctx: Any, layouts: Sequence[Layout]) -> dict:
    """A reduction pass's stats: the total token count on the example inputs before the first cut
    and after each (``tokens``), and the share left after the last (``kept``)."""
    from graphopt.ir.calibrate import calibration_batches

    counts = token_counts(gm, layouts, calibration_batches(ctx)[:1]) if ctx.example_inputs or ctx.example_kwargs else []
    stats: dict[str, Any] = {"tokens": counts}
    if counts:
        stats["kept"] = round(counts[-1] / max(counts[0], 1), 4)
    return stats
