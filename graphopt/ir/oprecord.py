"""Op records: everything the rest of graphopt needs to know about a custom op, declared in one place.

An op folder of :mod:`graphopt.ops` (``graphopt/ops/norms/``, ``graphopt/ops/varlen/``, a test's toy
op) defines its ops with ``torch.library.custom_op`` and calls :func:`register_op` once per op with
an :class:`OpRecord`. The analyses, passes and backends that treat an op specially (FLOP counting,
residual streams, ``remove_padding``, the fusion partitioner, the Triton row template, the eager
backend) look the record up with :func:`op_record` when they meet the op in a graph, instead of
naming the op or importing its module. Adding an op therefore means adding one folder.

The registry lives in the IR layer, the lowest one, so that every layer can read it; it imports
nothing of graphopt. Lookups happen at call time: any ``import graphopt`` imports
:mod:`graphopt.ops` (and so fills the registry) before a graph is analysed.

Example (the whole declaration of a hypothetical op)::

    @torch.library.custom_op("mylib::scale_rows", mutates_args=())
    def scale_rows(x: Tensor, w: Tensor) -> Tensor:
        return scale_rows_reference(x, w)

    register_op(OpRecord(
        op=torch.ops.mylib.scale_rows,
        reference=scale_rows_reference,
        fake=lambda x, w: torch.empty_like(x),
        flops=lambda node: 0,
        partition_kind="pointwise",
        tokenwise=0,
    ))
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator, Mapping

import torch

__all__ = ["OpRecord", "onnx_translation", "op_record", "op_records", "register_op"]


@dataclasses.dataclass(frozen=True)
class OpRecord:
    """The facts about one custom op (all overloads of one ``torch.ops.<namespace>.<name>`` packet).

    Every callable that takes the op's arguments takes them as its schema orders them (the
    signature of the ``custom_op`` function). Every field but ``op`` is optional; ``None`` means
    "nothing special": the op is then counted as 0 FLOPs, opaque to fusion, not a norm, a barrier to
    ``remove_padding``, and run through the dispatcher by every backend.

    Attributes:
        op: the op, an ``OpOverloadPacket`` such as ``torch.ops.graphopt.rms_norm`` (an
            ``OpOverload`` is taken as its packet).
        reference: the definition of what the op computes, in plain ATen ops on any device (the
            "naive twin" every kernel is tested against). Read by the tests.
        fake: the fake (meta) implementation giving output shapes and dtypes from input shapes.
            :func:`register_op` registers it with ``torch.library.register_fake``.
        kernels: device type (``"cpu"``, ``"cuda"``) -> a faster kernel for that device.
            :func:`register_op` registers each with ``torch.library.register_kernel``; devices
            without one run the ``custom_op`` function itself.
        flops: ``fn(node) -> int``, the op's FLOPs (one multiply-add counts as two) for a
            ``call_function`` node of the op. Read by :func:`graphopt.ir.flops.node_flops`, which
            also provides the helpers a rule uses to read sizes (``size``, ``example_value``).
        partition_kind: the op's fusion kind for :func:`graphopt.backends.partition.op_kind`: one of
            its ``KINDS`` (``"pointwise"``, ``"reduction"``, ``"norm"``, ...), or ``fn(node) -> kind``.
            A ``"norm"`` or ``"reduction"`` kind needs ``triton_lowering`` to run in a generated kernel.
        tokenwise: how many trailing dims of its first argument the op mixes over, when each
            output row depends only on the same row of the first argument and on the other
            arguments, which must not vary by token (weights, constants); the output has the first
            argument's shape. ``1`` for a norm over the last dim, ``0`` for an elementwise op,
            ``None`` for an op that mixes tokens or changes their layout. ``remove_padding`` runs
            such an op on packed tokens unchanged when the token dims precede those trailing dims.
        is_norm: whether the op is a normalisation over the last dim, for
            :func:`graphopt.ir.streams.is_norm` (the norms a Post-LN residual stream passes through,
            and the norms a pass recognises as "already RMSNorm").
        inductor_decomposition: ``fn(*args) -> Tensor`` in ATen ops (usually ``reference``) that
            inductor traces instead of calling the op as an opaque extern kernel, so the op fuses
            with its neighbours. :func:`register_op` enters it in inductor's decomposition table
            (inductor's alone: export, capture and the eager backends keep the op as it is).
        eager_fast_path: ``fn(*args) -> Tensor`` the eager backend calls in place of the op's
            overloads: the op's kernels without the dispatcher's cost per call (it must compute what
            the op computes on every device and under autograd).
        triton_lowering: ``fn(out, args, fresh, row) -> lines``, the op as an anchor of the Triton
            row template (:mod:`graphopt.backends.triton_rowwise`) over its first argument's last
            dim: ``out`` is the output's kernel name, ``args`` the normalized arguments with tensors
            replaced by their kernel names, ``fresh(base)`` makes new kernel-local names, ``row`` the
            template's helpers (``row.sum``, ``row.tensor``, ``row.number``, ``row.rms``, ...);
            returns the lines of Triton code assigning ``out``. The output is full rows for a
            ``"norm"`` ``partition_kind`` and one value per row otherwise.
        onnx: ``fn() -> translation``: returns the op's ONNX translation for
            ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``, a function
            taking the op's arguments as onnxscript values (standard ONNX ops traced into the
            graph, or a call of an ``onnxscript`` function of a custom domain). A loader rather
            than the translation itself so that ``import graphopt`` does not import onnxscript;
            :mod:`graphopt.frontends.onnx_export` calls it for every overload of the op. ``None``:
            the op cannot be exported to ONNX.
        quantizes: whether the op rounds its activation input to a coarse grid (int8), so that its
            output is a step function of it: a last-bit difference upstream (another backend's
            reduction order) may flip a code, and the flips grow through later quantized layers.
            Backends are then checked against the graph within the applied passes' budget rather
            than to rounding (:func:`graphopt.frontends.check.check_backend`).
    """

    op: Any
    reference: Callable[..., Any] | None = None
    fake: Callable[..., Any] | None = None
    kernels: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    flops: Callable[[torch.fx.Node], int] | None = None
    partition_kind: str | Callable[[torch.fx.Node], str] | None = None
    tokenwise: int | None = None
    is_norm: bool = False
    inductor_decomposition: Callable[..., Any] | None = None
    eager_fast_path: Callable[..., Any] | None = None
    triton_lowering: Callable[..., list[str]] | None = None
    onnx: Any = None
    quantizes: bool = False

    def __post_init__(self) -> None:
        packet = _packet(self.op)
        if packet is None:
            raise TypeError(f"OpRecord.op must be an OpOverloadPacket or OpOverload, not {self.op!r}")
        object.__setattr__(self, "op", packet)
        object.__setattr__(self, "kernels", dict(self.kernels))

    @property
    def name(self) -> str:
        """The op's qualified name, ``namespace::name``."""
        return self.op._qualified_op_name


_RECORDS: dict[torch._ops.OpOverloadPacket, OpRecord] = {}


def _packet(target: Any) -> torch._ops.OpOverloadPacket | None:
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket
    return None


def register_op(record: OpRecord) -> OpRecord:
    """Enter ``record`` in the registry and make torch's registrations it declares.

    Registers ``fake`` with ``torch.library.register_fake``, each of ``kernels`` with
    ``torch.library.register_kernel``, and ``inductor_decomposition`` for every overload of the op
    in inductor's decomposition table. Call it once per op, at import of the op's folder, right
    after the ``custom_op`` definition. Raises ValueError if the op already has a record (a second
    import of the same definition would fail in ``torch.library`` too). Returns ``record``.
    """
    if record.op in _RECORDS:
        raise ValueError(f"{record.name} already has an op record")
    if record.fake is not None:
        torch.library.register_fake(record.name, record.fake)
    for device_type, kernel in record.kernels.items():
        torch.library.register_kernel(record.name, device_type, kernel)
    if record.inductor_decomposition is not None:
        _register_inductor_decomposition(record.op, record.inductor_decomposition)
    _RECORDS[record.op] = record
    return record


def _register_inductor_decomposition(op: torch._ops.OpOverloadPacket, decomposition: Callable[..., Any]) -> None:
    # Imported here, not at module level: ~0.1 s once torch.export is loaded (any capture loads
    # it), ~0.7 s before, paid only by a process that registers a decomposition.
    from torch._inductor import decomposition as inductor_decompositions

    inductor_decompositions.register_decomposition([getattr(op, name) for name in op.overloads()])(decomposition)
    inductor_decompositions.fast_random_decomps.cache_clear()  # inductor's copy of the table, cached at its first compile


def op_record(target: Any) -> OpRecord | None:
    """The record of the op ``target`` calls: ``target`` is an ``OpOverload`` (a node's target) or an
    ``OpOverloadPacket``; ``None`` for ops without a record and for any other target (a Python
    function, ``operator.getitem``, a string)."""
    packet = _packet(target)
    return None if packet is None else _RECORDS.get(packet)


def op_records() -> Iterator[OpRecord]:
    """Every registered record, in registration order."""
    return iter(list(_RECORDS.values()))


def onnx_translation(module: str, name: str) -> Callable[[], Any]:
    """An :attr:`OpRecord.onnx` loader: ``module``'s ``name``, imported on the first export that asks
    for it (an op folder's ``onnx`` module imports onnxscript, which ``import graphopt`` must not);
    e.g. ``onnx=onnx_translation(f"{__name__}.onnx", "rms_norm")`` in the folder's ``__init__``."""
    return lambda: getattr(importlib.import_module(module), name)
