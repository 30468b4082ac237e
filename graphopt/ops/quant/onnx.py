"""ONNX translations of ``graphopt::int8_linear`` and ``graphopt::weight_only_linear`` for
``torch.onnx.export(dynamo=True)``: standard opset-18 ops computing what
:mod:`graphopt.ops.quant.reference` computes.

``int8_linear``: the per-token scale (``ReduceMax(Abs(x)) / 127``), the codes (``Round``, half to
even as ``torch.round``; ``Clip``), shifted to uint8 with zero point 128 so that
``MatMulInteger(uint8, int8)`` (the pair every onnxruntime CPU build runs) accumulates them in
int32 exactly, then the per-token x per-channel dequantization, bias and activation (GELU written
with ``Erf``/``Tanh``: ``Gelu`` needs opset 20). ``weight_only_linear`` dequantizes its int8 or
packed int4 weights (``BitwiseAnd``/``BitShift`` unpack the nibbles) and multiplies in fp32. The
archive keeps the int8 / int4 weights.

Imported only by the exporter (through the records' ``onnx`` loaders).
"""

from __future__ import annotations

import math

from onnxscript import ir
from onnxscript import opset18 as op

__all__ = ["int8_linear", "weight_only_linear"]

_FLOAT = ir.DataType.FLOAT


def _scalar(value: float):
    return op.Constant(value_float=float(value))


def _activation(y, activation: str):
    if activation == "relu":
        return op.Relu(y)
    if activation == "gelu":
        return op.Mul(op.Mul(y, _scalar(0.5)), op.Add(_scalar(1.0), op.Erf(op.Mul(y, _scalar(1 / math.sqrt(2))))))
    if activation == "gelu_tanh":
        inner = op.Mul(_scalar(math.sqrt(2 / math.pi)), op.Add(y, op.Mul(_scalar(0.044715), op.Mul(y, op.Mul(y, y)))))
        return op.Mul(op.Mul(y, _scalar(0.5)), op.Add(_scalar(1.0), op.Tanh(inner)))
    return y


def int8_linear(x, qweight, weight_scale, bias=None, smooth=None, outlier_index=None, outlier_weight=None, activation: str = "none"):
    """Per-token int8 activations times per-channel int8 weights, int32 accumulation (``MatMulInteger``)."""
    xf = op.Cast(x, to=_FLOAT)
    if smooth is not None:
        xf = op.Mul(xf, smooth)
    extra = None
    if outlier_index is not None:
        extra = op.MatMul(op.Gather(xf, outlier_index, axis=-1), op.Transpose(outlier_weight, perm=[1, 0]))
        keep = op.ScatterElements(op.ConstantOfShape(op.Shape(xf, start=-1), value=ir.tensor([1.0], dtype=_FLOAT)), outlier_index, op.Expand(_scalar(0.0), op.Shape(outlier_index)))
        xf = op.Mul(xf, keep)
    axes = op.Constant(value_ints=[-1])
    scale = op.Div(op.ReduceMax(op.Abs(xf), axes, keepdims=1), _scalar(127.0))
    scale = op.Where(op.Greater(scale, _scalar(0.0)), scale, _scalar(1.0))
    codes = op.Clip(op.Round(op.Div(xf, scale)), _scalar(-127.0), _scalar(127.0))
    shifted = op.Cast(op.Add(codes, _scalar(128.0)), to=ir.DataType.UINT8)
    zero_point = op.Constant(value=ir.tensor(128, dtype=ir.DataType.UINT8))
    acc = op.MatMulInteger(shifted, op.Transpose(qweight, perm=[1, 0]), zero_point)
    y = op.Mul(op.Mul(op.Cast(acc, to=_FLOAT), scale), weight_scale)
    if extra is not None:
        y = op.Add(y, extra)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=_FLOAT))
    return op.CastLike(_activation(y, activation), x)


def weight_only_linear(x, qweight, scale, zero=None, group_size: int = 0, bias=None):
    """``x · Wᵀ + b`` with ``W`` dequantized from int8 (per channel) or packed int4 (groups of ``group_size``)."""
    xf = op.Cast(x, to=_FLOAT)
    if group_size == 0:
        weight = op.Mul(op.Cast(qweight, to=_FLOAT), op.Unsqueeze(scale, op.Constant(value_ints=[1])))
    else:
        low = op.BitwiseAnd(qweight, op.Constant(value=ir.tensor(15, dtype=ir.DataType.UINT8)))
        high = op.BitShift(qweight, op.Constant(value=ir.tensor(4, dtype=ir.DataType.UINT8)), direction="RIGHT")
        last = op.Constant(value_ints=[-1])
        codes = op.Concat(op.Unsqueeze(low, last), op.Unsqueeze(high, last), axis=-1)  # [N, K/2, 2]: even k, odd k
        rows = op.Shape(qweight, start=0, end=1)
        grouped = op.Reshape(op.Cast(codes, to=_FLOAT), op.Concat(rows, op.Constant(value_ints=[-1, group_size]), axis=0))
        weight = op.Mul(op.Sub(grouped, op.Unsqueeze(zero, last)), op.Unsqueeze(scale, last))
        weight = op.Reshape(weight, op.Concat(rows, op.Constant(value_ints=[-1]), axis=0))
    y = op.MatMul(xf, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=_FLOAT))
    return op.CastLike(y, x)
