"""What graphopt's quantized linears compute, stated plainly.

These are the definitions every kernel is tested against. Three formats:

* **Dynamic W8A8** (``graphopt::int8_linear``; LLM.int8() without outliers, SmoothQuant's
  "O1"/per-token setting): weights per output channel, symmetric, int8 ``q_w = round(W / s_w)``
  with ``s_w[n] = max_k |W[n, k]| / qmax_w``; activations per token (row), symmetric,
  ``q_x = round(x / s_x)`` with ``s_x[m] = max_k |x[m, k]| / 127``; the int32 product
  dequantized per token and channel::

      y[m, n] = s_x[m] · s_w[n] · Σ_k q_x[m, k] · q_w[n, k] + b[n]

  Optional extras, all exact in real arithmetic: a per-input-channel ``smooth`` factor
  (SmoothQuant: the activation is multiplied by it before quantization; the weights were
  multiplied by its inverse when quantized), LLM.int8()'s outlier columns (``outlier_index``
  columns of ``x`` taken out before quantization and multiplied in floating point by
  ``outlier_weight``), and a pointwise ``activation`` applied after the bias (fused epilogue).
* **Weight-only int8** (``graphopt::weight_only_linear`` with ``bits=8``): per-channel symmetric
  int8 weights, floating activations: ``y = x · (q_w · s_w)ᵀ + b``.
* **Weight-only int4, group-wise asymmetric** (``bits=4``): ``K`` split into groups of ``G``
  (32, 64 or 128) along each output row, ``q ∈ [0, 15]``, ``W ≈ (q - z) · s`` with a scale and a
  zero point per (row, group); two 4-bit values per byte, the even ``k`` in the low nibble.

Rounding is ``torch.round`` (half to even); the analytic error of a quantized dot product is
bounded by half a step per factor (:func:`int8_linear_error_bound`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "apply_activation",
    "dequantize_int4",
    "int8_linear_error_bound",
    "int8_linear_reference",
    "pack_int4",
    "quantize_int4_groupwise",
    "quantize_per_channel",
    "quantize_per_token",
    "take_out_outliers",
    "unpack_int4",
    "weight_only_linear_reference",
]

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
"""The pointwise ops an int8 linear's epilogue applies after the bias."""


def apply_activation(y: Tensor, activation: str) -> Tensor:
    """``y`` through one of :data:`ACTIVATIONS`."""
    if activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    raise ValueError(f"unknown epilogue activation {activation!r}; one of {', '.join(ACTIVATIONS)}")


def quantize_per_channel(weight: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 weights: ``(q [N, K] int8, scale [N] fp32)``, ``W ≈ q · scale[:, None]``.

    Computed in fp64; an all-zero row gets scale 1 (its codes are 0).
    """
    w = weight.detach().double()
    scale = w.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale.float()


def quantize_per_token(x: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (token) quantization of ``x [..., K]``: ``(q int8, scale [...] fp32)``.

    ``scale = max|x| / qmax`` per row (1 for an all-zero row), computed in fp32 as the kernels do.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale[..., None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def take_out_outliers(x: Tensor, smooth: Tensor | None, outlier_index: Tensor | None, outlier_weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """What an int8 linear quantizes, and what it adds in floating point: ``x * smooth`` with the
    outlier columns zeroed, and those columns times ``outlier_weightᵀ`` (None without outliers), in
    the dtype of ``x``."""
    xs = x if smooth is None else x * smooth.to(x.dtype)
    if outlier_index is None:
        return xs, None
    extra = xs.index_select(-1, outlier_index) @ outlier_weight.to(x.dtype).t()
    return xs.index_fill(-1, outlier_index, 0.0), extra


def int8_linear_reference(
    x: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    smooth: Tensor | None = None,
    outlier_index: Tensor | None = None,
    outlier_weight: Tensor | None = None,
    activation: str = "none",
) -> Tensor:
    """Dynamic W8A8 linear ``x [..., K] -> [..., N]`` in the dtype of ``x`` (see the module docstring).

    The int32 accumulation is computed exactly, in fp64.
    """
    xf, extra = take_out_outliers(x.double(), smooth, outlier_index, outlier_weight)
    q, s_x = quantize_per_token(xf.float())
    acc = q.double() @ qweight.double().t()  # integers, exact in fp64 for any K < 2^38
    y = acc * s_x.double()[..., None] * weight_scale.double()
    if extra is not None:
        y = y + extra
    if bias is not None:
        y = y + bias.double()
    return apply_activation(y, activation).to(x.dtype)


def int8_linear_error_bound(x: Tensor, weight: Tensor, qweight: Tensor, weight_scale: Tensor) -> Tensor:
    """An upper bound on ``|int8_linear(x) - x · Wᵀ|`` per output element (no smooth, no outliers).

    With ``x = x̂ + e_x`` (``|e_x| ≤ s_x / 2``) and ``W = Ŵ + e_w`` (``|e_w| ≤ s_w / 2``):
    ``|x Wᵀ - x̂ Ŵᵀ| ≤ Σ_k |e_x| |W| + |x̂| |e_w|`` ≤ ``s_x/2 · Σ|W[n]| + s_w[n]/2 · Σ|x̂[m]|``.
    """
    _, s_x = quantize_per_token(x)
    xd, wd = x.double(), weight.double()
    x_abs_sum = (xd.abs().sum(-1) + s_x.double() * x.shape[-1] / 2)[..., None]  # Σ|x̂| ≤ Σ|x| + K·s_x/2
    return s_x.double()[..., None] / 2 * wd.abs().sum(-1) + weight_scale.double() / 2 * x_abs_sum


def weight_only_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, bias: Tensor | None = None) -> Tensor:
    """Weight-only linear: ``x · Wᵀ + b`` with ``W`` dequantized from int8 (``group_size == 0``:
    per-channel, ``qweight [N, K]`` int8, ``scale [N]``) or packed int4 (``qweight [N, K/2]`` uint8,
    ``scale``/``zero`` ``[N, K/G]``). Computed in fp32 (fp64 inputs in fp64), returned in ``x``'s dtype."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if group_size == 0:
        w = qweight.to(dtype) * scale.to(dtype)[:, None]
    else:
        w = dequantize_int4(qweight, scale, zero, group_size).to(dtype)
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype)).to(x.dtype)


def pack_int4(q: Tensor) -> Tensor:
    """``[N, K]`` codes in ``[0, 15]`` -> ``[N, K/2]`` uint8, the even ``k`` in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_int4`: ``[N, K/2]`` uint8 -> ``[N, K]`` uint8 codes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4_groupwise(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise int4: ``(packed [N, K/2] uint8, scale [N, K/G] fp32, zero [N, K/G] fp32)``.

    Per (row, group): ``s = (max - min) / 15``, ``z = round(-min / s)`` (an integer code, so 0 is
    represented exactly), ``q = clamp(round(w / s) + z, 0, 15)``. Needs ``K % group_size == 0``.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 groups of {group_size} do not divide the input size {k}")
    w = weight.detach().double().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(n, k)), scale.float(), zero.float()


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """``(q - z) · s`` of packed int4 weights, ``[N, K]`` fp32."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    w = (q.reshape(n, k // group_size, group_size) - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(n, k)
