"""An abstract interpreter for attention masks: what a mask's derivation provably computes.

Passes that drop, replace or exploit an ``attn_mask`` (``remove_padding`` packs the tokens a
key-padding mask keeps; ``canonicalize`` turns a provably causal mask into SDPA's
``is_causal=True``) need to know the mask's value at every element from the graph alone, without
running it. :class:`MaskAnalysis` follows the derivation backwards from the mask and gives every
node one abstract value, each a statement about every element of the tensor, on any input:

* :class:`Const`: every element equals ``value`` (a ``full`` / ``ones`` / ``zeros`` and what
  pointwise ops, broadcasts, views, slices and gathers make of one);
* :class:`Ramp`: every element equals its index along ``dim`` (``arange(n)`` from 0 in steps of 1,
  broadcast, cast to an integer type or a float type that holds it, ``+ 0``);
* :class:`Padded`: ``valid`` where ``source[b, s]`` (a ``[batch, seq]`` integer or boolean input,
  ``attention_mask``) is non-zero, ``pad`` where it is 0, ``b`` and ``s`` the indices along two dims;
* :class:`Causal`: ``valid`` where the index along ``key_dim`` is at most the index along
  ``query_dim``, ``masked`` elsewhere.

Dims are counted from the right, so broadcasting (which aligns on the right) keeps them. Pointwise
ops apply to the scalars (``_apply`` runs the op itself on 0-d tensors of the operands' dtypes, so
promotion, casts and comparisons are PyTorch's own); a value laid out along dims is combined only
with constants or with values of the same kind laid out along the same dims. The rules that make
positions into a mask are the exact ones:

* a comparison of two ramps along different dims, each spanning its dim of the result and of
  provably the same length: ``le(k, q)`` and ``ge(q, k)`` are :class:`Causal` (True, False),
  ``gt(k, q)`` and ``lt(q, k)`` its negation; ``ge(r, c)`` with ``c <= 0`` and ``gt(r, c)`` with
  ``c < 0`` of one ramp are all True. ``lt(k, q)``, ``eq`` / ``ne``, a difference of ramps
  (a windowed mask), a ramp plus a non-zero offset (a KV cache's query positions) are rejected;
* ``index`` of a 2-D ramp source (position ids, ``arange`` expanded over the batch) by one index
  tensor per dim gives the index along the ramp's dim, so position ids gathered by a sequence ramp
  are that ramp; of a :class:`Padded` ``[batch, seq]`` source by two ramps, the :class:`Padded`
  laid out along the ramps' dims (Hugging Face's vectorised mask functions); of a constant, the
  constant;
* ``slice(ramp, dim, 0, 1)`` along the ramp's dim is 0, a slice along another dim keeps the ramp;
* ``diff`` of a ramp along its dim is all 1 (with ``n=1`` and no ``prepend`` / ``append``, or a
  ``prepend`` of one -1 along that dim), along another dim all 0, and ``cumsum`` of zeros is
  zeros: Hugging Face's packed-sequence detection from position ids, ``cumsum(diff(pos, prepend=
  pos[:, :1] - 1) != 1)``, is provably 0 for ``arange`` positions, one sequence per row.

Anything else, including an op whose value depends on a graph input other than a ``[batch, seq]``
mask, raises :class:`graphopt.ir.NotApplicable` naming the node. An ``index`` is taken to be in
bounds (out of bounds it raises at run time), and an integer mask input to hold 0 (pad) and
1 (token), as ``attention_mask`` does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node

from graphopt.ir import NotApplicable, aten, describe, is_op, normalized_args, shape_of, val_of
from graphopt.ir.match import VIEW_OPS, is_value_identity, known_true, normalize_dim, permutation, same_shape

CASTS = (aten.to, aten._to_copy, aten.type_as)
LOGICAL = (aten.__and__, aten.__or__, aten.__xor__, aten.where)  # pointwise, but not tagged so


def rank_of(node: Any) -> int | None:
    shape = shape_of(node) if isinstance(node, Node) else None
    return None if shape is None else len(shape)


def ancestors(nodes: list[Node]) -> set[Node]:
    """Every node the given nodes are computed from (not the nodes themselves, unless on a cycle)."""
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


@dataclass(frozen=True)
class Const:
    """Every element equals ``value``."""

    value: Any


@dataclass(frozen=True)
class Ramp:
    """Element value = its index along ``dim`` (counted from the right): an ``arange`` broadcast."""

    dim: int


@dataclass(frozen=True)
class Padded:
    """Element value = ``valid`` where ``source[b, s]`` is a token, ``pad`` where it is padding;
    ``b`` and ``s`` are the indices along ``batch_dim`` and ``seq_dim`` (counted from the right)."""

    source: Node
    batch_dim: int
    seq_dim: int
    valid: Any
    pad: Any


@dataclass(frozen=True)
class Causal:
    """Element value = ``valid`` where its index along ``key_dim`` is at most its index along
    ``query_dim``, ``masked`` where it is greater (both dims counted from the right)."""

    query_dim: int
    key_dim: int
    valid: Any
    masked: Any


# casts that keep every index of a ramp exactly (float32 holds the integers up to 2**24)
_RAMP_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)
_COMPARISONS = (aten.le.Tensor, aten.ge.Tensor, aten.lt.Tensor, aten.gt.Tensor)


def scalar(value: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)


class MaskAnalysis:
    """Abstract values of the nodes an attention mask is computed from (memoised)."""

    def __init__(self) -> None:
        self.values: dict[Node, Any] = {}

    def value(self, node: Any) -> Any:
        if not isinstance(node, Node):
            if isinstance(node, (bool, int, float)):
                return Const(node)
            raise NotApplicable(f"the mask derivation takes {node!r}, not a tensor")
        if node not in self.values:
            self.values[node] = self._evaluate(node)
        return self.values[node]

    def try_value(self, node: Any) -> Any | None:
        try:
            return self.value(node)
        except NotApplicable:
            return None

    def _evaluate(self, node: Node) -> Any:
        val = val_of(node)
        if node.op == "placeholder":
            if isinstance(val, torch.Tensor) and val.dim() == 2 and not val.is_floating_point():
                return Padded(node, -2, -1, valid=scalar(1, val.dtype).item(), pad=scalar(0, val.dtype).item())
            raise NotApplicable(f"it depends on the input {node.name}, which is not a [batch, seq] integer or boolean mask")
        if node.op == "get_attr":
            tensor = getattr(node.graph.owning_module, node.target, None)
            if isinstance(tensor, torch.Tensor) and tensor.numel() == 1:
                return Const(tensor.item())
            raise NotApplicable(f"it depends on the constant {node.name}")
        if node.op != "call_function":
            raise NotApplicable(f"it depends on {node.name}")
        if is_op(
            node,
            aten.zeros,
            aten.ones,
            aten.full,
            aten.new_zeros,
            aten.new_ones,
            aten.new_full,
            aten.scalar_tensor,
            aten.zeros_like,
            aten.ones_like,
            aten.full_like,
        ):
            return Const(self._filled_value(node))
        if is_op(node, aten.arange.default, aten.arange.start, aten.arange.start_step):
            return self._arange(node)
        if is_op(node, aten.sym_size):
            raise NotApplicable(f"{node.name} is a size, not a mask")
        if is_op(node, aten.index.Tensor):
            return self._index(node)
        if is_op(node, aten.diff.default):
            return self._diff(node)
        if is_op(node, aten.cumsum.default):
            return self._cumsum(node)
        if is_op(node, *CASTS) or is_op(node, *LOGICAL) or torch.Tag.pointwise in node.target.tags:
            return self._pointwise(node)
        if is_op(node, aten.masked_fill_) and isinstance(node.args[0], Node) and len(node.args[0].users) == 1:
            # filling a fresh tensor nothing else reads (nn.MultiheadAttention's key-padding mask
            # from zeros_like): the same as the out-of-place masked_fill
            return self._pointwise(node)
        return self._shape_op(node)

    @staticmethod
    def _filled_value(node: Node) -> Any:
        if is_op(node, aten.zeros, aten.new_zeros, aten.zeros_like):
            return 0
        if is_op(node, aten.ones, aten.new_ones, aten.ones_like):
            return 1
        args = normalized_args(node)
        value = args.get("fill_value", args.get("s"))
        if not isinstance(value, (bool, int, float)):
            raise NotApplicable(f"{describe(node)} fills with a computed value")
        return value

    def _arange(self, node: Node) -> Ramp:
        args = normalized_args(node)
        if args.get("start", 0) != 0 or args.get("step", 1) != 1:
            raise NotApplicable(f"{describe(node)} is not arange(n)")
        if val_of(node).dtype not in _RAMP_DTYPES:
            raise NotApplicable(f"{describe(node)} counts in {val_of(node).dtype}, which does not hold every position")
        return Ramp(-1)

    def _index(self, node: Node) -> Any:
        """``source[ramp_b, ramp_s]``: the index gather that vectorises a per-(b, s) mask function."""
        source, indices = node.args[0], node.args[1]
        src = self.value(source)
        if isinstance(src, Const):
            return src  # every element gathered is the constant (an index out of bounds raises)
        if isinstance(src, Ramp):
            return self._index_ramp(node, source, src, indices)
        if not isinstance(src, Padded) or (src.batch_dim, src.seq_dim) != (-2, -1) or rank_of(source) != 2 or len(indices) != 2:
            raise NotApplicable(f"{describe(node)} indexes the mask other than by one index per dimension")
        ramps = [self.value(i) if isinstance(i, Node) else None for i in indices]
        if not all(isinstance(r, Ramp) for r in ramps):
            raise NotApplicable(f"{describe(node)} indexes the mask with something other than index ramps")
        # A ramp may be sized from another input (Hugging Face takes the batch size from the ids);
        # the packing ops then need the two sizes equal and raise where they are not.
        return Padded(src.source, ramps[0].dim, ramps[1].dim, src.valid, src.pad)

    def _index_ramp(self, node: Node, source: Node, src: Ramp, indices: list) -> Any:
        """``pos[i_0, ..., i_n]`` of a ramp along dim ``d`` is ``i_d`` (one integer index tensor
        per dim, so the result has their broadcast shape): position ids gathered by a sequence
        ramp are that ramp, as long as it spans its dim of the result."""
        rank = rank_of(source)
        if rank is None or len(indices) != rank or not all(isinstance(i, Node) for i in indices):
            raise NotApplicable(f"{describe(node)} indexes the positions other than by one index tensor per dimension")
        if any(val_of(i).dtype not in (torch.int32, torch.int64) for i in indices):
            raise NotApplicable(f"{describe(node)} indexes the positions with a non-integer index")
        index = indices[rank + src.dim]
        value = self.value(index)
        if isinstance(value, Const):
            return value
        if isinstance(value, Ramp) and _spans(index, value.dim, node):
            return value
        raise NotApplicable(f"{describe(node)} gathers positions by something other than an index ramp")

    def _diff(self, node: Node) -> Const:
        """``diff`` of positions: 1 along a ramp (``prepend`` of -1 allowed), 0 across it."""
        args = normalized_args(node)
        source, n, prepend, append = args["self"], args["n"], args.get("prepend"), args.get("append")
        value = self.value(source)
        rank = rank_of(source)
        if not isinstance(value, Ramp) or rank is None or n != 1 or append is not None:
            raise NotApplicable(f"{describe(node)} is not a first difference of positions")
        dim = normalize_dim(args["dim"], rank)
        if dim != rank + value.dim:
            if prepend is None:
                return Const(0)  # the positions are the same all along another dim
            raise NotApplicable(f"{describe(node)} prepends to positions across their ramp")
        if prepend is None:
            return Const(1)
        first = self.value(prepend) if isinstance(prepend, Node) else None
        prepend_shape = shape_of(prepend) if isinstance(prepend, Node) else None
        if isinstance(first, Const) and first.value == -1 and prepend_shape is not None and known_true(prepend_shape[dim] == 1):
            return Const(1)  # -1, 0, 1, 2, ...: every step is 1
        raise NotApplicable(f"{describe(node)} prepends something other than one -1 to the positions")

    def _cumsum(self, node: Node) -> Const:
        value = self.value(node.args[0])
        if isinstance(value, Const) and value.value == 0:
            return Const(0)  # a running sum of zeros (or False) is zeros
        raise NotApplicable(f"{describe(node)} is a running sum of something other than zeros")

    def _pointwise(self, node: Node) -> Any:
        operands = [a for a in node.args if isinstance(a, Node)] + [a for a in node.kwargs.values() if isinstance(a, Node)]
        values = {a: self.value(a) for a in operands}
        ramps = [v for v in values.values() if isinstance(v, Ramp)]
        padded = [v for v in values.values() if isinstance(v, Padded)]
        causal = [v for v in values.values() if isinstance(v, Causal)]
        if ramps:
            return self._ramp_op(node, values, ramps, padded + causal)
        if causal:
            return self._causal_op(node, values, causal, padded)
        if not padded:
            return Const(self._apply(node, values, lambda v: v.value))
        first = padded[0]
        if any((p.source, p.batch_dim, p.seq_dim) != (first.source, first.batch_dim, first.seq_dim) for p in padded):
            raise NotApplicable(f"{describe(node)} combines masks laid out along different dimensions")
        valid = self._apply(node, values, lambda v: v.valid if isinstance(v, Padded) else v.value)
        pad = self._apply(node, values, lambda v: v.pad if isinstance(v, Padded) else v.value)
        return Padded(first.source, first.batch_dim, first.seq_dim, valid, pad)

    def _causal_op(self, node: Node, values: dict, causal: list, padded: list) -> Causal:
        if padded:
            raise NotApplicable(f"{describe(node)} combines a causal mask with a padding mask")
        first = causal[0]
        if any((c.query_dim, c.key_dim) != (first.query_dim, first.key_dim) for c in causal):
            raise NotApplicable(f"{describe(node)} combines causal masks laid out along different dimensions")
        valid = self._apply(node, values, lambda v: v.valid if isinstance(v, Causal) else v.value)
        masked = self._apply(node, values, lambda v: v.masked if isinstance(v, Causal) else v.value)
        return Causal(first.query_dim, first.key_dim, valid, masked)

    def _ramp_op(self, node: Node, values: dict, ramps: list, padded: list) -> Any:
        """Ops on index ramps: ``ramp + 0`` is the ramp, ``ramp >= c`` (``c <= 0``) is all True,
        ``key <= query`` of two ramps is :class:`Causal`."""
        if len(ramps) > 1:
            return self._causal_comparison(node, values)
        if padded:
            raise NotApplicable(f"{describe(node)} mixes positions into the padding mask")
        other = [v.value for v in values.values() if isinstance(v, Const)] + [a for a in node.args[1:] if isinstance(a, (int, float))]
        if is_op(node, *CASTS) or is_value_identity(node):
            if val_of(node).dtype in _RAMP_DTYPES:
                return ramps[0]
            raise NotApplicable(f"{describe(node)} casts the positions to {val_of(node).dtype}, which does not hold them all")
        if is_op(node, aten.add, aten.sub) and other == [0] and values.get(node.args[0]) is ramps[0]:
            return ramps[0]
        if node.args[0] is not None and values.get(node.args[0]) is ramps[0] and len(other) == 1:
            if (is_op(node, aten.ge) and other[0] <= 0) or (is_op(node, aten.gt) and other[0] < 0):
                return Const(True)
        raise NotApplicable(f"{describe(node)} makes the mask depend on the position")

    def _causal_comparison(self, node: Node, values: dict) -> Causal:
        """``le(k, q)`` / ``ge(q, k)``: True where the key position is at most the query position;
        ``gt(k, q)`` / ``lt(q, k)``: its negation. ``k`` and ``q`` are ramps along different dims,
        each spanning its dim of the result, of provably the same length (a query ramp offset by
        a KV cache, or shorter than the keys, is no ramp from 0 or fails the length check)."""
        reject = NotApplicable(f"{describe(node)} compares query and key positions other than as a causal mask (e.g. a windowed one)")
        if not is_op(node, *_COMPARISONS) or len(node.args) != 2 or node.kwargs:
            raise reject
        a, b = node.args
        va, vb = values.get(a), values.get(b)
        if not (isinstance(va, Ramp) and isinstance(vb, Ramp)) or va.dim == vb.dim:
            raise reject
        if not (_spans(a, va.dim, node) and _spans(b, vb.dim, node)):
            raise NotApplicable(f"{describe(node)} compares positions broadcast along their own dimension")
        if not known_true(shape_of(a)[va.dim] == shape_of(b)[vb.dim]):
            raise NotApplicable(f"{describe(node)} compares query and key positions of lengths not provably equal")
        if is_op(node, aten.le.Tensor):  # a <= b: a is the key
            return Causal(vb.dim, va.dim, True, False)
        if is_op(node, aten.ge.Tensor):  # a >= b: b is the key
            return Causal(va.dim, vb.dim, True, False)
        if is_op(node, aten.gt.Tensor):  # a > b: not (a <= b), a is the key
            return Causal(vb.dim, va.dim, False, True)
        return Causal(va.dim, vb.dim, False, True)  # a < b: not (b <= a), b is the key

    @staticmethod
    def _apply(node: Node, values: dict, pick: Callable[[Any], Any]) -> Any:
        """Run ``node``'s op on 0-d tensors holding the picked scalar of each abstract operand."""

        def concrete(arg: Any) -> Any:
            if isinstance(arg, Node):
                return scalar(pick(values[arg]), val_of(arg).dtype)
            return arg

        args, kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), concrete)
        try:
            result = node.target(*args, **kwargs)
        except (RuntimeError, TypeError) as e:
            raise NotApplicable(f"{describe(node)} cannot be evaluated on a mask value ({e})") from None
        return result.item() if isinstance(result, torch.Tensor) else result

    def _shape_op(self, node: Node) -> Any:
        source = node.args[0] if node.args else None
        if not isinstance(source, Node):
            raise NotApplicable(f"{describe(node)} is not a recognised mask derivation")
        value = self.value(source)
        if isinstance(value, Const):
            if is_op(node, aten.unsqueeze, aten.expand, aten.slice, aten.permute, aten.transpose, aten.squeeze, *VIEW_OPS):
                return value
            raise NotApplicable(f"{describe(node)} is not a recognised mask derivation")
        if isinstance(value, Ramp) and is_op(node, aten.slice.Tensor) and not is_full_slice(node, shape_of(source)):
            return self._slice_ramp(node, source, value)
        mapping = self._dim_mapping(node, source)
        if isinstance(value, Ramp):
            return Ramp(mapping(value.dim))
        if isinstance(value, Causal):
            return Causal(mapping(value.query_dim), mapping(value.key_dim), value.valid, value.masked)
        return Padded(value.source, mapping(value.batch_dim), mapping(value.seq_dim), value.valid, value.pad)

    @staticmethod
    def _slice_ramp(node: Node, source: Node, value: Ramp) -> Any:
        """The first position of a ramp (``pos[:, :1]``) is 0; a slice across the ramp keeps it."""
        args = normalized_args(node)
        rank = rank_of(source)
        if normalize_dim(args["dim"], rank) != rank + value.dim:
            return value  # the same positions in fewer rows
        if args["start"] in (None, 0) and args["end"] == 1:
            return Const(0)
        raise NotApplicable(f"{describe(node)} slices the positions other than to their first")

    @staticmethod
    def _dim_mapping(node: Node, source: Node) -> Callable[[int], int]:
        """Where each dimension of ``source`` (counted from the right) is in ``node``'s output."""
        in_shape, out_shape = shape_of(source), shape_of(node)
        if in_shape is None or out_shape is None:
            raise NotApplicable(f"{describe(node)} has no shape information")
        r_in, r_out = len(in_shape), len(out_shape)
        reject = NotApplicable(f"{describe(node)} reshapes the mask other than by adding size-1 dimensions")
        if is_op(node, aten.expand) or (is_op(node, aten.slice) and is_full_slice(node, in_shape)):
            return lambda d: d
        if is_op(node, aten.unsqueeze):
            at = normalize_dim(node.args[1], r_out)
            return lambda d: d if r_in + d >= at else d - 1
        perm = permutation(node)
        if perm is not None:
            return lambda d: perm.index(r_in + d) - r_out
        if is_op(node, *VIEW_OPS, aten.squeeze):
            kept_in = [i for i, s in enumerate(in_shape) if not known_true(s == 1)]
            kept_out = [i for i, s in enumerate(out_shape) if not known_true(s == 1)]
            if len(kept_in) != len(kept_out) or not same_shape([in_shape[i] for i in kept_in], [out_shape[i] for i in kept_out]):
                raise reject

            def mapped(d: int) -> int:
                if r_in + d not in kept_in:
                    raise reject
                return kept_out[kept_in.index(r_in + d)] - r_out

            return mapped
        raise NotApplicable(f"{describe(node)} is not a recognised mask derivation")


def _spans(node: Node, dim: int, result: Node) -> bool:
    """Whether ``node`` has the size of ``result`` along ``dim`` (counted from the right), so
    broadcasting it into ``result`` repeats no element along that dim."""
    shape, out = shape_of(node), shape_of(result)
    return shape is not None and out is not None and len(shape) >= -dim and len(out) >= -dim and known_true(shape[dim] == out[dim])


def is_full_slice(node: Node, shape: tuple) -> bool:
    args = normalized_args(node)
    dim, start, end, step = args["dim"], args["start"], args["end"], args["step"]
    size = shape[normalize_dim(dim, len(shape))]
    return start in (None, 0) and step == 1 and (end is None or end == sys.maxsize or (isinstance(end, int) and known_true(end >= size)))


def position_comparison(mask: Node) -> Node | None:
    """A comparison in ``mask``'s derivation between two values computed from ``arange``s, if any."""
    for node in [mask, *ancestors([mask])]:
        if is_op(node, aten.lt, aten.le, aten.gt, aten.ge, aten.eq, aten.ne) and len(node.all_input_nodes) == 2:
            if all(any(is_op(a, aten.arange) for a in [x, *ancestors([x])]) for x in node.all_input_nodes):
                return node
    return None
