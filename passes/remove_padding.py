"""Padding-free execution of variable-length batches (ByteTransformer).

Zhai et al., "ByteTransformer: A High-Performance Transformer Boosted for Variable-Length Inputs"
(IPDPS 2023): in a padded batch most of every linear, norm, activation and attention computes on
pad tokens. This pass rewrites an encoder graph so that the valid tokens of all sequences are
packed once into a ``[total_tokens, ...]`` tensor (``graphopt::pack_tokens``), every token-wise op
runs on the packed tensor, every attention becomes ``graphopt::varlen_attention`` over cumulative
sequence offsets (emitted with ATen ops from the mask), and the results are unpacked
(``graphopt::unpack_tokens``, zeros at pads) where something outside the token-wise region reads
them.

**The padding mask.** Every ``aten.scaled_dot_product_attention`` must be bidirectional (no
``is_causal``, no dropout, no GQA) with an ``attn_mask`` that provably is a key-padding mask of
one ``[batch, seq]`` graph input. A small abstract interpreter follows the mask's derivation:
each value is a constant, an index ramp (``arange``) or a function of ``mask[b, s]`` laid out
along two dimensions; it passes casts, comparisons, arithmetic, ``where`` / ``masked_fill``,
and-ing with other masks, ``unsqueeze`` / ``expand`` / views that add size-1 dimensions, full
slices and the ``index`` gather Hugging Face uses to vectorise its mask functions, and an in-place
``masked_fill_`` of a fresh tensor nothing else reads (``nn.MultiheadAttention``'s key-padding mask). A comparison of
two index ramps (a causal or windowed mask) or any other op ends the match with the reason. The
mask must be True (or an additive 0) at valid keys and False (or ``<= -1e4``, so that the softmax
weight underflows to 0) at pads, along the batch and key dimensions of SDPA's ``[B, H, L, S]``.
An integer mask input is taken to hold 0 (pad) and 1 (token), as ``attention_mask`` does.

**The token-wise region.** Tensors with the batch and sequence dimensions of the mask get a
layout (which dimensions are batch and sequence; the packed form moves them to the front and
merges them into ``T``). Linear, layer/RMS norms, custom ops whose op record declares them
token-wise (``OpRecord.tokenwise``), pointwise ops with token-independent operands, eval-mode
dropout, softmax over a feature dimension, embedding lookups, views that split or merge only
trailing feature dimensions, transposes and SDPA keep a layout; so do the pieces of a fused QKV
projection split along a feature dimension (``split`` / ``chunk``, or ``unflatten`` to
``[B, S, 3, H, D]``, a permute and ``unbind``, and their ``getitem``, or a ``select`` of a feature
dimension), and a view flattening the tokens to ``[B*S, ...]`` for a 2-D linear and back
(``[T, ...]`` either way once packed, so those views go or only reshape the features; a flattened
value may not leave the region). Sequence-first values ``[S, B, ...]`` are followed the same way:
``nn.MultiheadAttention`` (``nn.TransformerEncoder``, batch- or sequence-first) transposes to
``[S, B, E]``, selects q, k and v from its in-projection unflattened and permuted to
``[3, S, B, E]`` (the form ``canonicalize`` gives its chains of views), moves the heads to
``[B, H, S, D]`` and merges them through ``[S*B, E]`` for its out-projection; packed, every one of
these is ``[T, ...]``, ``[S*B]`` as well as ``[B*S]``, as long as the view back restores the order
it flattened. Sizes read from a region
value (``b, s, _ = x.shape``) are read from the entry, which the pack leaves as it is. The pack goes where one
tensor carries everything the region needs: the earliest ``[B, S, ...]`` ancestor of the
attentions from which the region reaches every SDPA. In BERT that is the sum of the word, type
and position embeddings (the position embeddings depend on the position, which the packed layout
no longer has, so they are added before packing; packing the ids instead would take one pack per
embedding input). The head split ``[B, S, H, D] -> [B, H, S, D]`` then becomes ``[T, H, D]``, the
layout of ``varlen_attention``, and the transposes around SDPA disappear.

**Outside the region.** Region values read by other ops are unpacked. Those readers see zeros at
pads where the original saw pad-token values, so the pass follows them: multiplying by the mask
(masked-mean pooling), selecting a fixed position (CLS pooling) and token-wise ops are fine; an
op that reads pad positions otherwise (a reduction or convolution over the sequence, a cumsum)
makes the pass not applicable, as does a sequence-mixing op between the pack and an attention.
Graph outputs are compared at valid tokens only (the ``output_masks`` of the pass's result): at pad
positions the original values are meaningless, and the rewritten graph gives zeros.

**Pooling in the packed domain.** A pooling of a region value reads the packed tokens directly: a
sum over the sequence of the value gated by the mask (``x * mask`` with the gate exactly 1 at
tokens and 0 at pads, ``where(mask, x, 0)``, ``masked_fill(~mask, 0)``: masked-sum and
sentence-transformers' masked-mean pooling) becomes ``graphopt::sum_tokens``, and ``select`` of a
fixed position (CLS pooling, BERT's pooler) becomes ``graphopt::select_token``. Both compute what
the unpacked value would give, so a value read only by poolings is never unpacked: when only the
pooled output leaves the graph, the padded ``[B, S, ...]`` tensor is never built.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

import graphopt.ops.varlen  # noqa: F401  (registers the graphopt:: packing and attention ops)
from graphopt.ir import NotApplicable, aten, describe, is_op, normalized_args, op_nodes, propagate_shapes, shape_of, val_of
from graphopt.ir.masks import Causal as _Causal, ancestors as _ancestors, MaskAnalysis as _MaskAnalysis, Padded as _Padded, is_full_slice as _is_full_slice, position_comparison as _position_comparison
from graphopt.ir.match import VIEW_OPS, is_value_identity, known_true, normalize_dim, permutation, same_shape
from graphopt.ir.oprecord import op_record
from graphopt.pipeline.pass_base import Pass, PassContext, PassResult, register_pass

_SDPA = aten.scaled_dot_product_attention.default
_PAD_BIAS_MAX = -1e4  # an additive mask at most this low gives pads softmax weight exactly 0
_CASTS = (aten.to, aten._to_copy, aten.type_as)
_NORMS = (aten.layer_norm.default, aten.rms_norm.default)
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)  # a fused QKV's pieces


def _split_dim(node: Node) -> int:
    return normalized_args(node)["dim"]


def _rank(node: Any) -> int | None:
    shape = shape_of(node) if isinstance(node, Node) else None
    return None if shape is None else len(shape)


# ----------------------------------------------------------------------------- the padding mask


def _check_form(sdpa: Node) -> dict:
    """``sdpa``'s arguments when it can run packed: bidirectional, dropout-free, not grouped, 4-D; raises :class:`NotApplicable`."""
    args = normalized_args(sdpa)
    if args["is_causal"]:
        raise NotApplicable(f"{sdpa.name} is causal attention (a decoder): every token needs the ones before it, pads included in the layout")
    if args["dropout_p"] != 0:
        raise NotApplicable(f"{sdpa.name} applies attention dropout")
    if args["enable_gqa"]:
        raise NotApplicable(f"{sdpa.name} uses grouped-query attention")
    if any(_rank(args[k]) != 4 for k in ("query", "key", "value")):
        raise NotApplicable(f"{sdpa.name} does not take [batch, heads, seq, dim] operands")
    return args


def _check_attention(sdpa: Node, masks: _MaskAnalysis) -> Node:
    """The padding-mask input ``sdpa``'s ``attn_mask`` is derived from; raises :class:`NotApplicable`."""
    args = _check_form(sdpa)
    mask = args["attn_mask"]
    if mask is None:
        raise NotApplicable(f"{sdpa.name} has no attention mask: every token attends to the pads, which then cannot be removed")
    try:
        value = masks.value(mask)
    except NotApplicable as e:
        causal = _position_comparison(mask)
        if causal is not None:
            raise NotApplicable(f"the attention mask of {sdpa.name} is causal or windowed: {describe(causal)} compares query and key positions") from None
        raise NotApplicable(f"the attention mask of {sdpa.name} is not derived from a padding input: {e}") from None
    if isinstance(value, _Causal):
        raise NotApplicable(f"the attention mask of {sdpa.name} is causal: every token needs the ones before it, pads included in the layout")
    if not isinstance(value, _Padded) or value.batch_dim != -4 or value.seq_dim != -1:
        raise NotApplicable(f"the attention mask of {sdpa.name} is not a per-sequence key mask [batch, 1, 1|seq, seq]")
    if val_of(mask).dtype == torch.bool:
        ok = value.valid is True and value.pad is False
    else:
        ok = value.valid == 0 and value.pad <= _PAD_BIAS_MAX
    if not ok:
        raise NotApplicable(f"the attention mask of {sdpa.name} gives valid keys {value.valid} and pads {value.pad}, not a padding mask")
    return value.source


# ----------------------------------------------------------------------------- the token-wise region


@dataclass(frozen=True)
class _Layout:
    """Which dimensions of a padded tensor are batch and sequence; the packed form is
    ``x.permute(batch, seq, *rest).flatten(0, 1)[valid]``, ``rest`` the other dims in order."""

    batch: int
    seq: int
    seq_major: bool = False  # flattened ([B*S] or, when True, [S*B]): which order the flat dim holds

    @property
    def flat(self) -> bool:
        """The tokens are one dimension (0), ``[B*S, ...]`` or ``[S*B, ...]``; packed, ``[T, ...]``."""
        return self.batch == self.seq

    def rest(self, rank: int) -> list[int]:
        return [d for d in range(rank) if d not in (self.batch, self.seq)]

    def packed_dim(self, dim: int, rank: int) -> int:
        return 1 + self.rest(rank).index(normalize_dim(dim, rank))


_TOKENS = _Layout(0, 1)
_FLAT = _Layout(0, 0)  # [B*S, ...]: tokens flattened for a 2-D linear; packed, the same [T, ...]
_SEQ_FIRST = _Layout(1, 0)  # [S, B, ...], nn.MultiheadAttention's layout
_HEADS = _Layout(0, 2)  # [B, H, S, D], SDPA's layout


def _token_independent(arg: Any, layout: _Layout, rank: int, region: dict) -> bool:
    """Whether ``arg`` is the same for every token of a ``rank``-D value laid out as ``layout``: a
    number, or a tensor outside the region that broadcasts over dims after batch and sequence only."""
    if not isinstance(arg, Node):
        return not isinstance(arg, torch.Tensor)
    if arg in region:
        return False
    arg_rank = _rank(arg)
    return arg_rank is not None and arg_rank <= rank - 1 - max(layout.batch, layout.seq)


def _outside_region(arg: Any, region: dict) -> bool:
    return not (isinstance(arg, Node) and arg in region)


def _flattening(node: Node, layout: _Layout, grid: tuple) -> _Layout | None:
    """The layout of a view that flattens the leading ``[B, S, *f]`` or ``[S, B, *f]`` of a value
    into ``[B*S, *g]`` (or ``[S*B, *g]``), unflattens such a flat value back in the same order, or
    reshapes the features of a flat value (``grid`` is ``(B, S)``); else None.

    Packed, each is a reshape of ``[T, *f]`` to ``[T, *g]``: the tokens stay where they are."""
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    if in_shape is None or out_shape is None or not grid:
        return None
    order = {_TOKENS: tuple(grid), _SEQ_FIRST: tuple(grid[::-1])}
    if layout in order and len(in_shape) >= 2 and len(out_shape) >= 1:
        ok = same_shape(in_shape[:2], order[layout]) and known_true(out_shape[0] == grid[0] * grid[1])
        return _Layout(0, 0, layout == _SEQ_FIRST) if ok else None
    if layout.flat and len(out_shape) >= 1 and known_true(out_shape[0] == in_shape[0]):
        return layout
    if layout.flat and len(out_shape) >= 2:
        unflat = _SEQ_FIRST if layout.seq_major else _TOKENS
        return unflat if same_shape(out_shape[:2], order[unflat]) else None
    return None


def _layout_of(node: Node, region: dict, pad_masks: set, grid: tuple = ()) -> _Layout | None:
    """The layout of ``node`` when it runs on packed operands unchanged in meaning, else None.

    The pieces of a fused QKV projection split along a feature dimension (``split``, ``chunk``)
    keep the layout: the split node's layout is that of its input, and each ``getitem`` has it."""
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        return region.get(source) if is_op(source, *_SPLITS, aten.unbind.int) else None
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if is_op(node, _SDPA):
        return _sdpa_layout(node, region, pad_masks)
    rank = _rank(node)
    x = node.args[0] if node.args else None
    if rank is None and is_op(node, *_SPLITS, aten.unbind.int):
        rank = _rank(x)  # a split's value is a tuple of tensors of its input's rank
    if rank is None or not isinstance(x, Node) or x not in region:
        return None
    layout, x_rank = region[x], _rank(x)
    last_token_dim = max(layout.batch, layout.seq)
    if is_op(node, aten.linear.default, aten.matmul.default):
        ok = last_token_dim < x_rank - 1 and all(_outside_region(a, region) for a in node.args[1:]) and rank == x_rank
        return layout if ok and (not is_op(node, aten.matmul) or _rank(node.args[1]) == 2) else None
    if is_op(node, *_NORMS):
        normalized = len(node.args[1])
        ok = last_token_dim < x_rank - normalized and all(_outside_region(a, region) for a in node.args[2:])
        return layout if ok else None
    record = op_record(node.target)
    if record is not None and record.tokenwise is not None:  # a custom op declared token-wise (graphopt::rms_norm)
        params = [*node.args[1:], *node.kwargs.values()]
        return layout if last_token_dim < x_rank - record.tokenwise and all(_outside_region(a, region) for a in params) else None
    if is_op(node, *_SOFTMAX):
        return layout if normalize_dim(node.args[1], x_rank) not in (layout.batch, layout.seq) else None
    if is_op(node, *_SPLITS):
        return layout if normalize_dim(_split_dim(node), x_rank) not in (layout.batch, layout.seq) else None
    if is_op(node, aten.select.int) and not layout.flat:
        # one piece of a fused projection, [3, ...] on a feature dim (nn.MultiheadAttention)
        dim = normalize_dim(node.args[1], x_rank)
        if dim in (layout.batch, layout.seq):
            return None
        return _Layout(*(d - 1 if d > dim else d for d in (layout.batch, layout.seq)))
    if is_op(node, aten.unflatten.int, aten.unbind.int) and not layout.flat:
        # Q, K and V of a fused projection unflattened to [B, S, 3, H, D], permuted, unbound
        dim = normalize_dim(node.args[1] if len(node.args) > 1 else 0, x_rank)
        if dim in (layout.batch, layout.seq):
            return None
        shift = len(node.args[2]) - 1 if is_op(node, aten.unflatten) else -1
        return _Layout(*(d + shift if d > dim else d for d in (layout.batch, layout.seq)))
    if is_op(node, *VIEW_OPS):
        in_shape, out_shape = shape_of(x), shape_of(node)
        if layout in (_TOKENS, _SEQ_FIRST) and len(out_shape) >= 2 and same_shape(in_shape[:2], out_shape[:2]):
            # only the features are reshaped; packed, the view keeps [T] and its own feature sizes
            return layout if not any(isinstance(s, Node) for s in node.args[1][2:]) else None
        flattened = _flattening(node, layout, grid)
        kept = 1 if flattened is not None and flattened.flat else 2
        return flattened if not any(isinstance(s, Node) for s in node.args[1][kept:]) else None
    perm = permutation(node)
    if perm is not None:
        return None if layout.flat else _Layout(perm.index(layout.batch), perm.index(layout.seq))
    if is_value_identity(node) or torch.Tag.pointwise in node.target.tags or is_op(node, *_CASTS):
        return _pointwise_layout(node, region)
    return None


def _pointwise_layout(node: Node, region: dict) -> _Layout | None:
    rank = _rank(node)
    operands = list(node.args) + list(node.kwargs.values())
    packed = [a for a in operands if isinstance(a, Node) and a in region]
    layout = region[packed[0]]
    if any(region[a] != layout or not same_shape(shape_of(a), shape_of(node)) for a in packed):
        return None
    others = [a for a in operands if isinstance(a, Node) and a not in region]
    return layout if all(_token_independent(a, layout, rank, region) for a in others) else None


def _sdpa_layout(node: Node, region: dict, pad_masks: set) -> _Layout | None:
    args = normalized_args(node)
    ok = args["attn_mask"] in pad_masks and all(region.get(args[k]) == _HEADS for k in ("query", "key", "value"))
    return _HEADS if ok else None


def _embedding_layout(node: Node, region: dict) -> _Layout | None:
    if not is_op(node, aten.embedding.default):
        return None
    weight, indices = node.args[0], node.args[1]
    return region[indices] if indices in region and weight not in region else None


@dataclass
class _Region:
    entry: Node
    layouts: dict[Node, _Layout]
    missing: list[Node]  # attentions the region does not reach
    blocker: Node | None  # the first node reading the region that is not token-wise, on the way to a missing attention
    size_reads: dict[Node, int] = field(default_factory=dict)  # sym_size of a region value's batch (0) or sequence (1) dim


def _grow_region(gm: GraphModule, entry: Node, sdpas: list[Node], pad_masks: set, ancestors: set) -> _Region:
    layouts: dict[Node, _Layout] = {entry: _TOKENS}
    size_reads: dict[Node, int] = {}
    blocker = None
    started = False
    for node in gm.graph.nodes:
        if node is entry:
            started = True
            continue
        if not started or node.op != "call_function":
            continue
        reads_region = any(a in layouts for a in node.all_input_nodes)
        if not reads_region:
            continue
        if is_op(node, aten.sym_size.int) and node.args[0] in layouts:
            # The batch or sequence size of a region value is the entry's (``b, s, _ = x.shape``):
            # read from the entry, which the pack leaves as it is. Other sizes are read after unpacking.
            x_layout, dim = layouts[node.args[0]], normalize_dim(node.args[1], _rank(node.args[0]))
            if not x_layout.flat and dim in (x_layout.batch, x_layout.seq):
                size_reads[node] = 0 if dim == x_layout.batch else 1
            continue
        layout = _embedding_layout(node, layouts) or _layout_of(node, layouts, pad_masks, tuple(shape_of(entry)[:2]))
        if layout is not None:
            layouts[node] = layout
        elif blocker is None and node in ancestors:
            blocker = node
    missing = [s for s in sdpas if s not in layouts]
    return _Region(entry, layouts, missing, blocker, size_reads)


# ----------------------------------------------------------------------------- readers of unpacked values


@dataclass(frozen=True)
class _AtPads:
    """A value outside the region that differs from the original only where ``mask[b, s]`` is a
    pad: along ``batch`` and ``seq``, or (``seq`` None) in rows ``b`` whose token ``position`` is."""

    batch: int
    seq: int | None
    position: int = 0


def _follow_unpacked(gm: GraphModule, exits: dict[Node, _Layout], mask_input: Node, masks: _MaskAnalysis) -> dict[int, _AtPads]:
    """Check every reader of unpacked values; returns the graph outputs that differ at pads, by
    flat output index. Raises :class:`NotApplicable` for a reader that would see the zeros at pads."""
    differs: dict[Node, _AtPads] = {x: _AtPads(layout.batch, layout.seq) for x, layout in exits.items()}
    outputs: dict[int, _AtPads] = {}
    for node in gm.graph.nodes:
        dirty = [a for a in node.all_input_nodes if a in differs]
        if not dirty or node in exits:
            continue
        if node.op == "output":
            for i, leaf in enumerate(torch.utils._pytree.tree_leaves(node.args[0])):
                if leaf in differs:
                    outputs[i] = differs[leaf]
            continue
        state = _reader_state(node, dirty, differs, mask_input, masks)
        if state is None:
            raise NotApplicable(f"{describe(node)} reads the encoder output at pad positions, where removing padding leaves zeros")
        if state != "clean":
            differs[node] = state
    return outputs


def _reader_state(node: Node, dirty: list[Node], differs: dict, mask_input: Node, masks: _MaskAnalysis) -> _AtPads | str | None:
    state = differs[dirty[0]]
    if any(differs[d] != state for d in dirty) or node.op != "call_function":
        return None
    rank = _rank(node)
    x = node.args[0]
    if is_op(node, aten.sym_size.int):
        return "clean"  # the unpacked value has the original shape
    if is_op(node, aten.mul.Tensor, aten.where.self, aten.where.ScalarOther, aten.masked_fill.Scalar) and state.seq is not None:
        # the gated value is the dirty operand, whichever argument it is (where's first is the condition)
        if len(dirty) == 1 and _zeroes_pads(node, dirty[0], state, mask_input, masks):
            return "clean"
    if is_op(node, aten.select.int) and state.seq is not None and x in dirty and normalize_dim(node.args[1], _rank(x)) == state.seq:
        index = node.args[2]
        if isinstance(index, int) and index >= 0:
            return _AtPads(state.batch - (state.batch > state.seq), None, index)
        return None
    if is_op(node, aten.slice.Tensor) and _is_full_slice(node, shape_of(x)):
        return state
    tokens = [d for d in (state.batch, state.seq) if d is not None]
    if is_op(node, aten.linear.default) and x in dirty and max(tokens) < rank - 1 and rank == _rank(x):
        return state if not any(a in dirty for a in node.args[1:]) else None
    if is_op(node, *_NORMS) and x in dirty and max(tokens) < rank - len(node.args[1]):
        return state
    pointwise = is_value_identity(node) or torch.Tag.pointwise in node.target.tags or is_op(node, *_CASTS)
    if pointwise and all(same_shape(shape_of(d), shape_of(node)) for d in dirty):
        return state
    return None


def _zeroes_pads(node: Node, x: Node, state: _AtPads, mask_input: Node, masks: _MaskAnalysis) -> bool:
    """Whether ``node`` multiplies / selects the value by the padding mask, so pads become 0 either way."""
    rank = _rank(node)
    batch, seq = state.batch - rank, state.seq - rank
    if is_op(node, aten.mul.Tensor):
        other = node.args[1] if node.args[0] is x else node.args[0]
        gate = masks.try_value(other)
        return isinstance(gate, _Padded) and gate.source is mask_input and (gate.batch_dim, gate.seq_dim) == (batch, seq) and gate.pad == 0
    cond = masks.try_value(node.args[0] if is_op(node, aten.where) else node.args[1])
    if not (isinstance(cond, _Padded) and cond.source is mask_input and (cond.batch_dim, cond.seq_dim) == (batch, seq)):
        return False
    if is_op(node, aten.masked_fill.Scalar):
        return node.args[0] is x and cond.pad is True and cond.valid is False and node.args[2] == 0
    return node.args[1] is x and cond.valid is True and cond.pad is False and node.args[2] == 0


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Pooling:
    """A reader of an unpacked value that reduces it to one row per sequence, which the packed
    tokens give directly: ``sum`` over the sequence of the value with its pads zeroed (masked-sum
    and masked-mean pooling), or ``select`` of one position (CLS pooling)."""

    node: Node  # the node the pooled op replaces: the sum, or the select
    exit: Node
    layout: _Layout
    position: int | None  # select's position; None for a sum
    keepdim: bool = False


@dataclass
class _Plan:
    mask: Node | None  # None: packed without a mask, every token valid (packing_plan(unmasked=True))
    region: _Region
    exits: dict[Node, _Layout]
    outputs_at_pads: dict[int, _AtPads] = field(default_factory=dict)
    poolings: list[_Pooling] = field(default_factory=list)


def _plan(gm: GraphModule, unmasked: bool = False) -> _Plan:
    sdpas = op_nodes(gm, _SDPA)
    if not sdpas:
        raise NotApplicable("no aten.scaled_dot_product_attention in the graph (run canonicalize first for written-out attention)")
    masks = _MaskAnalysis()
    if unmasked and all(normalized_args(s)["attn_mask"] is None for s in sdpas):
        for s in sdpas:
            _check_form(s)  # a mask-free attention packs with every token valid
        mask, pad_masks = None, {None}
    else:
        sources = {_check_attention(s, masks) for s in sdpas}
        if len(sources) > 1:
            raise NotApplicable("the attention masks come from different inputs: " + ", ".join(sorted(s.name for s in sources)))
        (mask,) = sources
        pad_masks = {normalized_args(s)["attn_mask"] for s in sdpas}
    region = _choose_region(gm, mask, sdpas, pad_masks, masks)
    inside = {**region.layouts, **region.size_reads}
    exits = {n: layout for n, layout in region.layouts.items() if n is not region.entry and any(u not in inside for u in n.users)}
    flat = [n for n, layout in exits.items() if layout.flat]
    if flat:
        raise NotApplicable(f"{describe(flat[0])} holds the tokens flattened to [batch*seq, ...] and is read outside the token-wise region")
    plan = _Plan(mask, region, exits)
    if mask is not None:  # without a mask every position is a token: nothing differs at pads
        plan.outputs_at_pads = _follow_unpacked(gm, exits, mask, masks)
    plan.poolings = [p for x, layout in exits.items() for u in x.users if u not in inside for p in _poolings(u, x, layout, mask, masks)]
    return plan


def packing_plan(gm: GraphModule, *, unmasked: bool = False) -> _Plan:
    """What :func:`apply_packing` would do to ``gm``; :class:`NotApplicable` saying why it cannot.

    ``unmasked``: also pack a graph whose attentions take no mask, every token valid: nothing to
    remove, but the packed form is what token pruning and merging shrink per sequence."""
    return _plan(gm, unmasked)


def apply_packing(gm: GraphModule, plan: _Plan) -> dict[str, int]:
    """Rewrite ``gm`` to the packed form by ``plan`` (:func:`packing_plan` of this ``gm``), drop
    what it no longer reads and propagate shapes (for a pass that goes on editing the packed graph);
    returns the stats."""
    stats = _rewrite(gm, plan)
    gm.graph.eliminate_dead_code()
    propagate_shapes(gm)
    return stats


def _poolings(reader: Node, x: Node, layout: _Layout, mask: Node, masks: _MaskAnalysis) -> list[_Pooling]:
    """The poolings ``reader`` of the unpacked ``x`` starts: itself as a ``select`` of a fixed
    sequence position, or, as a mask gate leaving ``x`` exactly as unpacking does (the value at
    valid tokens, 0 at pads) read only by sums over the sequence dim, those sums; else none."""
    rank = _rank(x)
    if is_op(reader, aten.select.int) and reader.args[0] is x and normalize_dim(reader.args[1], rank) == layout.seq:
        position = reader.args[2]
        return [_Pooling(reader, x, layout, position)] if isinstance(position, int) and position >= 0 else []
    gate_keeps_x = (
        is_op(reader, aten.mul.Tensor, aten.where.self, aten.where.ScalarOther, aten.masked_fill.Scalar)
        and _zeroes_pads(reader, x, _AtPads(layout.batch, layout.seq), mask, masks)
        and val_of(reader).dtype == val_of(x).dtype
        and same_shape(shape_of(reader), shape_of(x))
    )
    if gate_keeps_x and is_op(reader, aten.mul.Tensor):  # the gate must also be exactly 1 at valid tokens
        gate = masks.try_value(reader.args[1] if reader.args[0] is x else reader.args[0])
        gate_keeps_x = gate.valid == 1
    sums = []
    for user in reader.users if gate_keeps_x else ():
        args = normalized_args(user)
        if not (is_op(user, aten.sum.dim_IntList) and args.get("dtype") is None and [normalize_dim(d, rank) for d in args["dim"] or ()] == [layout.seq]):
            return []
        sums.append(_Pooling(user, x, layout, None, bool(args.get("keepdim"))))
    return sums


def _choose_region(gm: GraphModule, mask: Node, sdpas: list[Node], pad_masks: set, masks: _MaskAnalysis) -> _Region:
    """The region grown from the earliest ``[B, S, ...]`` ancestor of the attentions that reaches them all."""
    query_shape = shape_of(normalized_args(sdpas[0])["query"])
    token_grid = (query_shape[0], query_shape[2])  # the mask's own sizes may be other symbols
    ancestors = _ancestors(sdpas)
    mask_cone = set(masks.values)
    candidates = [
        n
        for n in gm.graph.nodes
        if n in ancestors and n is not mask and n not in mask_cone and n not in pad_masks and (_rank(n) or 0) >= 2 and same_shape(shape_of(n)[:2], token_grid)
    ]
    best: _Region | None = None
    for entry in candidates:
        region = _grow_region(gm, entry, sdpas, pad_masks, ancestors)
        if not region.missing:
            return region
        if best is None or len(region.missing) < len(best.missing) or (len(region.missing) == len(best.missing) and best.blocker is None):
            best = region
    if best is None:
        shaped = f"shaped like the mask {mask.name} " if mask is not None else ""
        raise NotApplicable(f"no [batch, seq, ...] tensor {shaped}feeds the attentions")
    first = best.missing[0]
    if best.blocker is not None:
        raise NotApplicable(
            f"{describe(best.blocker)} between the packed tokens and {first.name} is not token-wise (it mixes sequence positions or changes the token layout)"
        )
    raise NotApplicable(f"no single packed tensor reaches {first.name} through token-wise ops")


# ----------------------------------------------------------------------------- the rewrite


def _call(graph, target, args, kwargs=None) -> Node:
    return graph.call_function(target, tuple(args), kwargs or {})


def _rewrite(gm: GraphModule, plan: _Plan) -> dict[str, int]:
    graph, mask, entry = gm.graph, plan.mask, plan.region.entry
    layouts = plan.region.layouts
    # before any edit: a split's input may be the entry, which the pack replaces
    split_dims = {n: layouts[n].packed_dim(_split_dim(n), _rank(n.args[0])) for n in layouts if is_op(n, *_SPLITS)}
    # unflatten and unbind take a dim of their input, whose layout gives its packed position
    input_dims = {
        n: layouts[n.args[0]].packed_dim(n.args[1] if len(n.args) > 1 else 0, _rank(n.args[0]))
        for n in layouts
        if is_op(n, aten.unflatten.int, aten.unbind.int, aten.select.int)
    }
    anchor = entry.next
    while anchor.op == "placeholder":
        anchor = anchor.next
    with graph.inserting_before(anchor):
        if mask is None:  # no padding mask: every position of the entry is a token
            grid = [_call(graph, aten.sym_size.int, (entry, d)) for d in (0, 1)]
            mask = graph.call_function(aten.new_ones.default, (entry, grid), {"dtype": torch.int64})
        packed = _call(graph, torch.ops.graphopt.pack_tokens.default, (entry, mask))
        tokens = _call(graph, aten.sym_size.int, (packed, 0))
        lengths = _call(graph, aten.sum.dim_IntList, (_call(graph, aten.ne.Scalar, (mask, 0)), [1]))
        offsets = _call(graph, aten.cumsum.default, (lengths, 0))
        cu_seqlens = _call(graph, aten.constant_pad_nd.default, (offsets, [1, 0], 0))
    for user in [u for u in entry.users if u in layouts]:
        user.replace_input_with(entry, packed)
    for size, dim in plan.region.size_reads.items():
        size.args = (entry, dim)

    # a pooling reads the packed exit: its select, or the mask gate of its sums, needs no unpacking
    pooling_readers = {p.node if p.position is not None else p.node.args[0] for p in plan.poolings}
    unpacks = 0
    for node, layout in plan.exits.items():
        rank = _rank(node)
        outside = [u for u in node.users if u not in layouts and u not in pooling_readers]
        if not outside:  # every reader pools the packed tokens
            continue
        unpacks += 1
        with graph.inserting_after(node):
            unpacked = _call(graph, torch.ops.graphopt.unpack_tokens.default, (node, mask))
        if layout != _TOKENS:  # [B, S, *rest] back to the original order of dimensions
            packed_order = [layout.batch, layout.seq, *layout.rest(rank)]
            with graph.inserting_after(unpacked):
                unpacked = _call(graph, aten.permute.default, (unpacked, [packed_order.index(d) for d in range(rank)]))
        for user in outside:
            user.replace_input_with(node, unpacked)

    for pooling in plan.poolings:
        _pool_packed(graph, pooling, mask)

    # decide every edit from the original shapes first: the edits drop the nodes' shape metadata
    region_nodes = [n for n in graph.nodes if n in layouts and n is not entry]
    permutations = {n: _packed_permutation(n, layouts) for n in region_nodes if permutation(n) is not None}
    view_sizes = {n: _packed_view_sizes(n, layouts) for n in region_nodes if is_op(n, *VIEW_OPS)}
    softmax_dims = {n: layouts[n].packed_dim(n.args[1], _rank(n)) for n in region_nodes if is_op(n, *_SOFTMAX)}
    attentions = 0
    for node in region_nodes:
        if node in view_sizes and view_sizes[node] is None:
            # e.g. [B, S, *f] <-> [B*S, *f]: both are [T, *f] packed, so the view is an identity there
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node in view_sizes:
            node.args = (node.args[0], [tokens, *view_sizes[node]], *node.args[2:])
        elif node in softmax_dims:
            node.args = (node.args[0], softmax_dims[node], *node.args[2:])
        elif node in input_dims:
            node.args = (node.args[0], input_dims[node], *node.args[2:])
        elif node in split_dims:
            args = normalized_args(node)
            args["dim"] = split_dims[node]
            node.args, node.kwargs = (), args
        elif node in permutations:
            _apply_permutation(node, permutations[node])
        elif is_op(node, _SDPA):
            args = normalized_args(node)
            with graph.inserting_before(node):
                attention = _call(
                    graph, torch.ops.graphopt.varlen_attention.default, (args["query"], args["key"], args["value"], cu_seqlens), {"scale": args["scale"]}
                )
            node.replace_all_uses_with(attention)
            graph.erase_node(node)
            attentions += 1
    return {"attentions": attentions, "packs": 1, "unpacks": unpacks, "pooled": len(plan.poolings)}


def _pool_packed(graph, pooling: _Pooling, mask: Node) -> None:
    """Replace a pooling of the unpacked exit by the pooled op on its packed tokens, and drop the
    mask gate a sum read when nothing else reads it."""
    x, layout, node = pooling.exit, pooling.layout, pooling.node
    rank = _rank(x)
    with graph.inserting_before(node):
        if pooling.position is None:
            pooled = _call(graph, torch.ops.graphopt.sum_tokens.default, (x, mask))
        else:
            pooled = _call(graph, torch.ops.graphopt.select_token.default, (x, mask, pooling.position))
        # the op gives [B, *rest]; the original keeps the dims other than the sequence in their order
        kept = [d for d in range(rank) if d != layout.seq]
        order = [layout.batch, *layout.rest(rank)]
        if order != kept:
            pooled = _call(graph, aten.permute.default, (pooled, [order.index(d) for d in kept]))
        if pooling.keepdim:
            pooled = _call(graph, aten.unsqueeze.default, (pooled, layout.seq))
    gate = node.args[0] if pooling.position is None else None
    node.replace_all_uses_with(pooled)
    graph.erase_node(node)
    if gate is not None and not gate.users:
        graph.erase_node(gate)


def _packed_view_sizes(node: Node, layouts: dict) -> list | None:
    """The feature sizes of a region view run on ``[T, *f]`` (the view's own, after its token
    dims), or None when the packed view is an identity (only the tokens were (un)flattened)."""
    in_layout, out_layout = layouts[node.args[0]], layouts[node]
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    in_features = in_shape[1 if in_layout.flat else 2 :]
    out_kept = 1 if out_layout.flat else 2
    if in_layout.flat != out_layout.flat and same_shape(in_features, out_shape[out_kept:]):
        return None
    return list(node.args[1][out_kept:])


def _packed_permutation(node: Node, layouts: dict) -> list[int]:
    """A transpose/permute on packed values: only the order of the non-token dims is left to change."""
    rank, perm = _rank(node), permutation(node)
    in_rest = layouts[node.args[0]].rest(rank)
    return [0] + [1 + in_rest.index(perm[d]) for d in layouts[node].rest(rank)]


def _apply_permutation(node: Node, packed_perm: list[int]) -> None:
    if packed_perm == list(range(len(packed_perm))):
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)
        return
    node.target = aten.permute.default
    node.args = (node.args[0], packed_perm)
    node.kwargs = {}


@register_pass
class RemovePadding(Pass):
    """Run encoders on the valid tokens only: pack once, varlen attention, unpack at the end (ByteTransformer)."""

    name = "remove_padding"
    exact = True
    requires = ("canonicalize",)

    def analyze(self, gm: GraphModule, ctx: PassContext) -> _Plan:
        """The padding mask input, the token-wise region and the outputs that differ at pads;
        :class:`NotApplicable` saying why when the graph is not a padded encoder this pass can rewrite."""
        return _plan(gm)

    def rewrite(self, gm: GraphModule, plan: _Plan, ctx: PassContext) -> PassResult:
        stats = _rewrite(gm, plan)
        stats["packed_ops"] = len(plan.region.layouts) - 1
        stats["mask_input"] = plan.mask.name
        mask_index = [n for n in gm.graph.nodes if n.op == "placeholder"].index(plan.mask)
        masks = _OutputMasks(plan.outputs_at_pads, mask_index) if plan.outputs_at_pads else None
        return PassResult(changed=True, stats=stats, output_masks=masks)


@dataclass(frozen=True)
class _OutputMasks:
    """``PassResult.output_masks`` of a run: the valid-token positions of the outputs that carry
    tokens, read from the padding mask among the inputs; other outputs are compared whole."""

    outputs_at_pads: dict[int, _AtPads]
    mask_index: int  # position of the mask among the flat (positional, then keyword) inputs

    def __call__(self, reference: Any, ctx: PassContext) -> list[torch.Tensor | None]:
        inputs = torch.utils._pytree.tree_leaves((list(ctx.example_inputs), ctx.example_kwargs))
        valid = inputs[self.mask_index].ne(0)
        leaves = torch.utils._pytree.tree_leaves(reference)
        return [_valid_positions(self.outputs_at_pads.get(i), valid, leaf) for i, leaf in enumerate(leaves)]


def _valid_positions(at_pads: _AtPads | None, valid: torch.Tensor, leaf: Any) -> torch.Tensor | None:
    """A boolean tensor broadcastable to ``leaf``, True where it does not depend on pad tokens."""
    if at_pads is None or not isinstance(leaf, torch.Tensor):
        return None
    rank = leaf.dim()
    if at_pads.seq is None:
        shape = [1] * rank
        shape[at_pads.batch] = valid.shape[0]
        return valid[:, at_pads.position].reshape(shape)
    order = [at_pads.batch, at_pads.seq]
    grid = valid if order == sorted(order) else valid.t()
    shape = [leaf.shape[d] if d in order else 1 for d in range(rank)]
    return grid.reshape(shape)
