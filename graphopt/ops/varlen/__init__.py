"""Custom ops for padding-free execution of variable-length batches (ByteTransformer): ops and records.

ByteTransformer (Zhai et al., "ByteTransformer: A High-Performance Transformer Boosted for
Variable-Length Inputs", IPDPS 2023) packs the valid tokens of a padded batch into one
``[total_tokens, hidden]`` tensor, runs every token-wise op on it, and replaces attention with a
variable-length attention that only ever sees the tokens of each sequence. These ops are the
building blocks of the ``remove_padding`` pass:

* ``graphopt::pack_tokens(x, mask)``: ``[B, S, *rest] -> [T, *rest]``, the valid tokens in
  row-major (batch, position) order (``x[mask != 0]``);
* ``graphopt::unpack_tokens(packed, mask)``: the inverse, ``[T, *rest] -> [B, S, *rest]`` with
  zeros at pad positions;
* ``graphopt::varlen_attention(q, k, v, cu_seqlens, scale=None)``: bidirectional (encoder)
  attention of each packed token to the tokens of its own sequence only;
* ``graphopt::sum_tokens(packed, mask)``: ``[T, *rest] -> [B, *rest]``, the sum of each sequence's
  tokens, as ``unpack_tokens(packed, mask).sum(1)`` (masked mean pooling without the padded tensor);
* ``graphopt::select_token(packed, mask, position)``: ``[T, *rest] -> [B, *rest]``, each
  sequence's token at ``position``, zeros where it is a pad, as ``unpack_tokens(packed, mask)[:, position]``
  (CLS pooling without the padded tensor).

``T`` is data-dependent: the fake implementations give it as an unbacked symbolic size
(``new_dynamic_size``), so graphs holding these ops export, propagate shapes and save with
``torch.export``. Import this package (any ``import graphopt`` does) before loading a saved graph
that uses them.

In an ATen graph, the pass computes the offsets of :func:`cu_seqlens` from the ``[B, S]`` mask as

    valid = aten.ne.Scalar(mask, 0)                                    # bool [B, S]
    lengths = aten.sum.dim_IntList(valid, [1], dtype=torch.int64)      # int64 [B]
    offsets = aten.cumsum.default(lengths, 0)                          # int64 [B]
    cu_seqlens = aten.pad.default(offsets, [1, 0])                     # int64 [B + 1], leading 0

which is what :func:`cu_seqlens` captures to.

The folder: ``reference.py`` (the definitions, with :func:`cu_seqlens`), ``cpu.py`` (bucketed SDPA,
the attention on every device without a kernel of its own, and the pooling kernels), ``onnx.py``
(their ONNX translations), this module (the ops, their FLOP rules and records, and the CUDA kernel
of ``varlen_attention``). None of them is token-wise in ``remove_padding``'s sense: the pass itself
places them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.fx import Node

from graphopt.ir import normalized_args, shape_of
from graphopt.ir.flops import example_value, size
from graphopt.ir.oprecord import OpRecord, onnx_translation, register_op
from graphopt.ops.recompute import recomputed_backward
from graphopt.ops.varlen.cpu import (  # noqa: F401  (_length_buckets: checked by the tests)
    _length_buckets,
    select_token_gathered,
    sum_tokens_segmented,
    varlen_attention_bucketed,
)
from graphopt.ops.varlen.reference import (
    cu_seqlens,
    pack_tokens_reference,
    select_token_reference,
    sum_tokens_reference,
    unpack_tokens_reference,
    varlen_attention_reference,
)

__all__ = ["cu_seqlens", "pack_tokens", "select_token", "sum_tokens", "unpack_tokens", "varlen_attention", "varlen_attention_reference"]


@torch.library.custom_op("graphopt::pack_tokens", mutates_args=())
def pack_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """The valid tokens of ``x`` ``[B, S, *rest]``, ``[T, *rest]`` in (batch, position) order.

    ``mask`` ``[B, S]`` is bool or integer, nonzero at valid tokens; ``T`` is their number.
    """
    return pack_tokens_reference(x, mask)


def _pack_tokens_fake(x, mask):
    total_tokens = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((total_tokens, *x.shape[2:]))


@torch.library.custom_op("graphopt::unpack_tokens", mutates_args=())
def unpack_tokens(packed: Tensor, mask: Tensor) -> Tensor:
    """The inverse of :func:`pack_tokens`: ``[T, *rest] -> [B, S, *rest]``, zeros at pad positions."""
    return unpack_tokens_reference(packed, mask)


def _unpack_tokens_fake(packed, mask):
    return packed.new_empty((*mask.shape, *packed.shape[1:]))


@torch.library.custom_op("graphopt::varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """Bidirectional attention of each packed token to the tokens of its own sequence.

    ``q``, ``k`` ``[T, H, D]``, ``v`` ``[T, H, Dv]``, ``cu_seqlens`` int64 ``[B + 1]`` with
    ``cu_seqlens[0] = 0`` and ``cu_seqlens[-1] = T``: sequence ``b`` is rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]``. Returns ``softmax(q kᵀ * scale) v`` per sequence and
    head, ``[T, H, Dv]``, with ``scale`` defaulting to ``1 / sqrt(D)``; computed by
    ``scaled_dot_product_attention`` in the inputs' dtype, as SDPA on each sequence alone would.
    Empty sequences are allowed.
    """
    return varlen_attention_bucketed(q, k, v, cu_seqlens, scale)


def _varlen_attention_fake(q, k, v, cu_seqlens, scale=None):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


@torch.library.custom_op("graphopt::sum_tokens", mutates_args=())
def sum_tokens(packed: Tensor, mask: Tensor) -> Tensor:
    """The sum of each sequence's packed tokens: ``[T, *rest] -> [B, *rest]``, as
    ``unpack_tokens(packed, mask).sum(1)`` computes it (an empty sequence sums to zeros)."""
    return sum_tokens_segmented(packed, mask)


def _pooled_fake(packed, mask, *args):
    return packed.new_empty((mask.shape[0], *packed.shape[1:]))


@torch.library.custom_op("graphopt::select_token", mutates_args=())
def select_token(packed: Tensor, mask: Tensor, position: int) -> Tensor:
    """Each sequence's token at ``position`` (a position of the padded ``[B, S]`` layout, ``>= 0``):
    ``[T, *rest] -> [B, *rest]``, zeros where that position is a pad, as
    ``unpack_tokens(packed, mask)[:, position]`` computes it."""
    return select_token_gathered(packed, mask, position)


def _varlen_attention_flops(node: Node) -> int:
    """Per sequence of length ``L_b``: ``2 * L_b² * H * (D + Dv)``, as SDPA on it alone.

    The lengths come from ``cu_seqlens`` on the example run. Without one (shapes static, offsets
    computed from data never run), the ``T`` tokens are counted as spread evenly over the ``B``
    sequences, ``T² / B`` query-key pairs: the fewest ``T`` tokens in ``B`` sequences can make,
    exact when the lengths are equal.
    """
    args = normalized_args(node)
    q, v, offsets = shape_of(args["q"]), shape_of(args["v"]), shape_of(args["cu_seqlens"])
    if not (q and v and offsets):
        return 0
    offsets_run = example_value(args["cu_seqlens"])
    if offsets_run is not None:
        pairs = int((offsets_run.diff() ** 2).sum())
    else:
        pairs = size(q[0]) ** 2 // max(size(offsets[0]) - 1, 1)
    return 2 * pairs * size(q[1]) * (size(q[2]) + size(v[2]))


def _moves_tokens(node: Node) -> int:
    """Packing moves tokens and computes nothing; pooling is a reduction, memory-bound, counted as
    zero as :mod:`graphopt.ir.flops` counts ``aten.sum`` (so pooling the packed tokens instead of the
    padded ones changes no count)."""
    return 0


register_op(
    OpRecord(
        op=torch.ops.graphopt.pack_tokens,
        reference=pack_tokens_reference,
        fake=_pack_tokens_fake,
        flops=_moves_tokens,
        onnx=onnx_translation(f"{__name__}.onnx", "pack_tokens"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.unpack_tokens,
        reference=unpack_tokens_reference,
        fake=_unpack_tokens_fake,
        flops=_moves_tokens,
        onnx=onnx_translation(f"{__name__}.onnx", "unpack_tokens"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.varlen_attention,
        reference=varlen_attention_reference,
        fake=_varlen_attention_fake,
        flops=_varlen_attention_flops,
        onnx=onnx_translation(f"{__name__}.onnx", "varlen_attention"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.sum_tokens,
        reference=sum_tokens_reference,
        fake=_pooled_fake,
        flops=_moves_tokens,
        onnx=onnx_translation(f"{__name__}.onnx", "sum_tokens"),
    )
)
register_op(
    OpRecord(
        op=torch.ops.graphopt.select_token,
        reference=select_token_reference,
        fake=_pooled_fake,
        flops=_moves_tokens,
        onnx=onnx_translation(f"{__name__}.onnx", "select_token"),
    )
)


# Training a packed graph (recovery after token pruning or merging, attention transfer after
# remove_padding) differentiates through the packing, attention and pooling ops.
recomputed_backward(pack_tokens, pack_tokens_reference)
recomputed_backward(unpack_tokens, unpack_tokens_reference)
recomputed_backward(varlen_attention, varlen_attention_bucketed)
recomputed_backward(sum_tokens, sum_tokens_segmented)
recomputed_backward(select_token, select_token_gathered)


@functools.cache
def _triton_varlen():
    """:mod:`graphopt.ops.flash_attention.triton`, or None where Triton is not installed."""
    try:
        from graphopt.ops.flash_attention import triton as flash
    except ImportError:
        return None
    return flash


@varlen_attention.register_kernel("cuda")
def _varlen_attention_cuda(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """The FlashAttention kernel of :mod:`graphopt.ops.flash_attention` (its ``VARLEN`` variant);
    the bucketed SDPA above where Triton is not installed or the kernel refuses the inputs (fp64)."""
    kernels = _triton_varlen()
    if kernels is not None:
        try:
            return kernels.flash_attention_varlen(q, k, v, cu_seqlens, scale)
        except kernels.NotLowerable:
            pass
    with varlen_attention.set_kernel_enabled("cuda", False):
        return varlen_attention(q, k, v, cu_seqlens, scale)
