"""ONNX translations of ``graphopt::rms_norm`` and ``graphopt::crms_norm`` for ``torch.onnx.export(dynamo=True)``.

Each is a decomposition into standard ONNX ops (opset 18: ReduceMean/ReduceSum, Mul, Add, Sqrt, Div)
traced into the exporter's graph, computing what :mod:`graphopt.ops.norms.reference` computes: in
fp32 for fp16/bf16/fp32 inputs (fp64 for fp64), cast back to the input's dtype.
``RMSNormalization`` would be one node, but it needs opset 23, which the exporter's default opset
(18) and older runtimes lack; the decomposition runs everywhere and is what that op is defined as.

Imported only by the exporter (through the records' ``onnx`` loaders), so ``import graphopt``
does not import onnxscript.
"""

from __future__ import annotations

from onnxscript import ir
from onnxscript import opset18 as op

__all__ = ["crms_norm", "rms_norm"]


def _to_compute_dtype(x):
    """``x`` in fp32, or as it is when it is fp64 (the reference's ``promote_types(x.dtype, fp32)``)."""
    if x.dtype == ir.DataType.DOUBLE:
        return x
    return op.Cast(x, to=ir.DataType.FLOAT)


def _scalar_like(value: float, x):
    return op.CastLike(op.Constant(value_float=float(value)), x)


def rms_norm(x, weight=None, bias=None, eps: float = 1e-6):
    """``x / sqrt(mean(x²) + eps) * weight + bias`` over the last dim."""
    xf = _to_compute_dtype(x)
    mean_square = op.ReduceMean(op.Mul(xf, xf), op.Constant(value_ints=[-1]), keepdims=1)
    y = op.Div(xf, op.Sqrt(op.Add(mean_square, _scalar_like(eps, xf))))
    if weight is not None:
        y = op.Mul(y, op.CastLike(weight, xf))
    if bias is not None:
        y = op.Add(y, op.CastLike(bias, xf))
    return op.CastLike(y, x)


def crms_norm(x, eps: float = 1e-6):
    """``x / sqrt((Σ x² + (Σ x)²) / (d + 1) + eps)`` over the last dim (``d`` = its size)."""
    xf = _to_compute_dtype(x)
    axes = op.Constant(value_ints=[-1])
    total = op.ReduceSum(xf, axes, keepdims=1)
    sum_of_squares = op.ReduceSum(op.Mul(xf, xf), axes, keepdims=1)
    width = op.Add(op.CastLike(op.Shape(xf, start=-1), xf), _scalar_like(1.0, xf))  # d + 1, from the shape
    mean_square = op.Div(op.Add(sum_of_squares, op.Mul(total, total)), width)
    y = op.Div(xf, op.Sqrt(op.Add(mean_square, _scalar_like(eps, xf))))
    return op.CastLike(y, x)
