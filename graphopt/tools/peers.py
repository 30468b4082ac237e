"""The peers a speed–fidelity report stands beside: one fixed point each, built as its users build it.

* ``eager``: the model itself.
* ``inductor``: ``torch.compile(model, backend="inductor")``.
* ``torchao_int8``: torchao's dynamic int8 activations and int8 weights on every ``nn.Linear`` of a
  copy of the model (``Int8DynamicActivationInt8WeightConfig``), compiled with inductor, which is
  what generates its fused int8 CPU code.
* ``onnxruntime`` / ``onnxruntime_int8``: the model exported by ``torch.onnx.export`` (the dynamo
  exporter) and run by onnxruntime's CPUExecutionProvider with torch's thread count; the int8 one is
  quantized first by onnxruntime's own ``quantize_dynamic(per_channel=True, weight_type=QInt8)``.

Each builder returns a callable taking the model's positional inputs and returning torch tensors.
torchao and onnxruntime are optional: :func:`build` raises :class:`PeerUnavailable` with the reason
when one is missing or cannot take the model, and callers report that instead of a point.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["PEERS", "PeerUnavailable", "build", "inductor", "onnxruntime", "torchao_int8"]

PEERS = ("eager", "inductor", "torchao_int8", "onnxruntime", "onnxruntime_int8")


class PeerUnavailable(RuntimeError):
    """A peer that cannot be built here (not installed, or it cannot take the model); the message says why."""


def inductor(model: torch.nn.Module, dynamic: bool | None = None) -> Callable:
    """``torch.compile`` with inductor; ``dynamic=None`` is torch's default (static first, then one
    dynamic recompile), for batches of varying shapes."""
    return torch.compile(model, backend="inductor", dynamic=dynamic)


def torchao_int8(model: torch.nn.Module, dynamic: bool | None = None) -> Callable:
    """torchao int8 dynamic activations + int8 weights on a copy of ``model``, compiled with inductor."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as exc:
        raise PeerUnavailable(f"torchao is not installed ({exc})") from None
    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(quantized, backend="inductor", dynamic=dynamic)


def onnxruntime(model: torch.nn.Module, example: tuple, dynamic_shapes: Any = None, *, quantize: bool = False) -> tuple[Callable, int]:
    """``model`` exported to ONNX (optionally quantized by onnxruntime) and its session as a
    callable on torch tensors; also the size of the model file in bytes."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise PeerUnavailable(f"onnxruntime is not installed ({exc})") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        program = torch.onnx.export(model, tuple(example), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
        program.save(str(path))
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = Path(tmp) / "model.int8.onnx"
            quantize_dynamic(str(path), str(quantized), per_channel=True, weight_type=QuantType.QInt8)
            path = quantized
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        size = path.stat().st_size
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        outputs = [torch.from_numpy(o) for o in session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run, size


def build(name: str, model: torch.nn.Module, example: tuple, example_kwargs: dict | None = None, dynamic_shapes: Any = None) -> Callable:
    """The peer ``name`` (of :data:`PEERS`) for ``model``, called like it on positional inputs.

    ``dynamic_shapes`` is the ``torch.export`` spec the ONNX export needs for inputs of varying
    shapes. :class:`PeerUnavailable` when the peer is not installed, takes keyword inputs, or fails
    to build (the first line of its error)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; the peers are {list(PEERS)}")
    if name == "eager":
        return model
    if example_kwargs and name.startswith("onnxruntime"):
        raise PeerUnavailable("the ONNX session takes positional inputs only; this model has keyword inputs")
    try:
        if name == "inductor":
            return inductor(model)
        if name == "torchao_int8":
            return torchao_int8(model)
        return onnxruntime(model, example, dynamic_shapes, quantize=name == "onnxruntime_int8")[0]
    except PeerUnavailable:
        raise
    except Exception as exc:  # a peer's own failure on this model is a finding, not a crash
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PeerUnavailable(f"{type(exc).__name__}: {first}") from exc
