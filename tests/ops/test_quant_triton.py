"""The quantized-linear Triton kernels, run by the Triton interpreter on CPU, against the references.

Every case's inputs are made here; one subprocess (``TRITON_INTERPRET=1`` must be set before triton
is imported; see tests/conftest.py) runs all launchers, and each test compares one output with
:mod:`graphopt.ops.quant.reference` computed in this process. Shapes are odd on purpose (ragged
tiles in M, N and K) and small (the interpreter runs every program in numpy).
"""

import pytest
import torch

pytest.importorskip("triton")

from graphopt.ops.quant import reference as ref  # noqa: E402
from graphopt.ops.quant import triton as quant_triton  # noqa: E402
from graphopt.ops.triton_runtime import NotLowerable  # noqa: E402
from graphopt.testing import assert_close  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT8_SHAPES = [(1, 40, 10), (3, 100, 96), (77, 384, 200), (3, 40, 200), (77, 100, 10)]  # (M, K, N)
INT4_SHAPES = {32: (3, 96, 13), 64: (37, 192, 45), 128: (1, 256, 13)}  # group -> (M, K, N); K ragged against BLOCK_K=64 for 32
LONG_ROW = quant_triton.MAX_BLOCK_SIZE + 5  # two blocks per sweep, the second ragged

_RUN_LAUNCHERS = """
import sys, torch
from graphopt.ops.quant import triton as quant_triton
calls = torch.load(sys.argv[1])
torch.save({name: getattr(quant_triton, launcher)(*args, **kwargs) for name, (launcher, args, kwargs) in calls.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def run_interpreted(interpreted_call):
    """``run({name: (launcher, args, kwargs)}) -> {name: output}``: launchers of
    ``graphopt.ops.quant.triton`` called in one interpreted subprocess."""
    return lambda calls: interpreted_call(_RUN_LAUNCHERS, calls)


def _weights(n, k, generator):
    w = torch.randn(n, k, generator=generator) * 0.1
    qweight, scale = ref.quantize_per_channel(w)
    return qweight, scale, torch.randn(n, generator=generator)


def _ties():
    """Rows whose quotients ``x / scale`` are exact halves: round half to even must pick the even code."""
    x = torch.zeros(3, 40)
    x[0, :7] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5])  # scale 1
    x[1, :5] = torch.tensor([63.5, 1.25, -0.75, 0.25, 31.75])  # scale 0.5: quotients 2.5, -1.5, 0.5, 63.5
    return x  # row 2: all zeros, scale 1


def _cases():
    gen = torch.Generator().manual_seed(0)
    cases = {}
    # Per-row quantization.
    for dtype_name, dtype in DTYPES.items():
        for m, k in ((1, 40), (3, 100), (77, 384)):
            cases[f"quantize-{dtype_name}-{m}x{k}"] = ("quantize_rows_triton", ((torch.randn(m, k, generator=gen) * 3).to(dtype),), {})
    cases["quantize-ties-and-zero-row"] = ("quantize_rows_triton", (_ties(),), {})
    cases["quantize-long-row"] = ("quantize_rows_triton", (torch.randn(2, LONG_ROW, generator=gen),), {})
    cases["quantize-strided-rows"] = ("quantize_rows_triton", (torch.randn(5, 70, generator=gen)[:, 3:53],), {})
    # The int8 GEMM on codes: every activation on every shape, with a bias; without one; fp16/bf16 outputs.
    for m, k, n in INT8_SHAPES:
        xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
        x_scale = torch.rand(m, generator=gen) * 0.02 + 1e-3
        qweight, w_scale, bias = _weights(n, k, gen)
        for activation in ref.ACTIVATIONS:
            cases[f"gemm-{m}x{k}x{n}-{activation}"] = ("int8_gemm_triton", (xq, x_scale, qweight, w_scale, bias, activation), {})
        cases[f"gemm-{m}x{k}x{n}-no-bias"] = ("int8_gemm_triton", (xq, x_scale, qweight, w_scale, None), {})
    xq, x_scale = torch.randint(-127, 128, (3, 100), generator=gen, dtype=torch.int8), torch.rand(3, generator=gen) * 0.02
    qweight, w_scale, bias = _weights(96, 100, gen)
    for dtype_name in ("fp16", "bf16"):
        cases[f"gemm-out-{dtype_name}"] = ("int8_gemm_triton", (xq, x_scale, qweight, w_scale, bias, "gelu"), {"out_dtype": DTYPES[dtype_name]})
    cases["gemm-transposed-weight-view"] = ("int8_gemm_triton", (xq, x_scale, qweight.t().contiguous().t(), w_scale, bias), {})
    # The int8 linear: quantize then GEMM, leading dims, each input dtype.
    qweight, w_scale, bias = _weights(96, 100, gen)
    for dtype_name, dtype in DTYPES.items():
        x = torch.randn(2, 3, 100, generator=gen).to(dtype)
        cases[f"linear-{dtype_name}-gelu_tanh"] = ("int8_linear_triton", (x, qweight, w_scale, bias.to(dtype), "gelu_tanh"), {})
    x = torch.randn(77, 100, generator=gen)
    x[5] = 0.0
    for activation in ref.ACTIVATIONS:
        cases[f"linear-fp32-77x100-{activation}"] = ("int8_linear_triton", (x, qweight, w_scale, bias, activation), {})
    # The weight-only int4 GEMM: each group size, each dtype, with and without a bias.
    for group, (m, k, n) in INT4_SHAPES.items():
        packed, scale, zero = ref.quantize_int4_groupwise(torch.randn(n, k, generator=gen), group)
        bias = torch.randn(n, generator=gen)
        for dtype_name, dtype in DTYPES.items():
            x = torch.randn(m, k, generator=gen).to(dtype)
            cases[f"int4-g{group}-{m}x{k}x{n}-{dtype_name}"] = ("int4_linear_triton", (x, packed, scale, zero, group, bias), {})
        cases[f"int4-g{group}-no-bias-leading-dims"] = ("int4_linear_triton", (torch.randn(2, m, k, generator=gen), packed, scale, zero, group), {})
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def outputs(run_interpreted):
    return run_interpreted(CASES)


def _names(prefix):
    return [name for name in CASES if name.startswith(prefix)]


@pytest.mark.parametrize("case", _names("quantize-"))
def test_row_quantization_is_the_reference_bit_for_bit(outputs, case):
    (x,) = CASES[case][1]
    q, scale = outputs[case]
    q_ref, scale_ref = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)


def test_ties_round_to_even(outputs):
    q, scale = outputs["quantize-ties-and-zero-row"]
    assert scale.tolist() == [1.0, 0.5, 1.0]
    assert q[0, :7].tolist() == [127, 2, -4, 0, 0, 2, -126]
    assert q[1, :5].tolist() == [127, 2, -2, 0, 64] and not q[2].any()


def _gemm_reference(xq, x_scale, qweight, w_scale, bias=None, activation="none"):
    """The int8 GEMM's definition in fp64 (the accumulation exact)."""
    y = (xq.double() @ qweight.double().t()) * x_scale.double()[:, None] * w_scale.double()
    if bias is not None:
        y = y + bias.double()
    return ref.apply_activation(y, activation)


@pytest.mark.parametrize("case", _names("gemm-"))
def test_int8_gemm_matches_its_definition(outputs, case):
    _, args, kwargs = CASES[case]
    out, expected = outputs[case], _gemm_reference(*args)
    dtype = kwargs.get("out_dtype", torch.float32)
    assert out.dtype == dtype and out.shape == expected.shape
    if dtype == torch.float32:
        assert_close(out, expected.float(), max_rel_err=1e-5)  # fp32 rounding of the epilogue only
    else:
        assert_close(out, expected.to(dtype))


@pytest.mark.parametrize("case", _names("linear-"))
def test_int8_linear_matches_the_reference(outputs, case):
    _, args, _ = CASES[case]
    out, expected = outputs[case], ref.int8_linear_reference(*args[:4], activation=args[4])
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if out.dtype == torch.float32:
        assert_close(out, expected, max_rel_err=1e-5)  # same codes: only the epilogue's fp32 rounding differs
    else:
        assert_close(out, expected)


@pytest.mark.parametrize("case", _names("int4-"))
def test_int4_linear_matches_the_reference(outputs, case):
    _, (x, packed, scale, zero, group, *bias), _ = CASES[case]
    out, expected = outputs[case], ref.weight_only_linear_reference(x, packed, scale, zero, group, *bias)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if out.dtype == torch.float32:
        assert_close(out, expected, max_rel_err=1e-5)  # fp32 sums in another order
    else:
        assert_close(out, expected)  # within one rounding to fp16/bf16


# --- configurations and refusals (no kernel runs) ---------------------------------------------


def test_gpu_configs_fit_the_kernels():
    """int8 ``tl.dot`` needs ``BLOCK_K >= 32``; every int4 ``BLOCK_K`` divides or is a multiple of every group size."""
    for m, n, k, *_ in quant_triton.INT8_GPU_CONFIGS:
        assert m >= 16 and n >= 16 and k >= 32
    for *_, k, _, _ in quant_triton.INT4_GPU_CONFIGS:
        assert all(k % group == 0 or group % k == 0 for group in quant_triton.GROUP_SIZES)
    assert quant_triton.INT8_INTERPRETER_BLOCKS["BLOCK_K"] >= 32


def _int8_inputs(m=3, k=40, n=10):
    qweight, w_scale, bias = _weights(n, k, torch.Generator().manual_seed(1))
    return torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.rand(m), qweight, w_scale, bias


def _int4_inputs(m=3, k=64, n=5, group=32):
    packed, scale, zero = ref.quantize_int4_groupwise(torch.randn(n, k), group)
    return torch.randn(m, k), packed, scale, zero, group


def _replace(args, index, value):
    return (*args[:index], value, *args[index + 1 :])


INT8 = _int8_inputs()
INT4 = _int4_inputs()

REFUSALS = {
    "quantize-3d": ("quantize_rows_triton", (torch.randn(2, 3, 4),), {}, "2-D"),
    "quantize-fp64": ("quantize_rows_triton", (torch.randn(2, 4, dtype=torch.float64),), {}, "dtype"),
    "quantize-no-columns": ("quantize_rows_triton", (torch.randn(2, 0),), {}, "0 columns"),
    "gemm-fp32-weight": ("int8_gemm_triton", _replace(INT8, 2, INT8[2].float()), {}, "qweight must be a 2-D int8"),
    "gemm-uint8-activations": ("int8_gemm_triton", _replace(INT8, 0, INT8[0].view(torch.uint8)), {}, "xq must be a 2-D int8"),
    "gemm-k-mismatch": ("int8_gemm_triton", _replace(INT8, 2, INT8[2][:, :32]), {}, "differ in K"),
    "gemm-fp16-scale": ("int8_gemm_triton", _replace(INT8, 1, INT8[1].half()), {}, "x_scale of dtype"),
    "gemm-scale-length": ("int8_gemm_triton", _replace(INT8, 3, INT8[3][:4]), {}, "weight_scale must be a 1-D tensor of 10"),
    "gemm-activation": ("int8_gemm_triton", INT8, {"activation": "silu"}, "activation 'silu'"),
    "gemm-out-int32": ("int8_gemm_triton", INT8, {"out_dtype": torch.int32}, "out_dtype"),
    "linear-fp32-weight": ("int8_linear_triton", (torch.randn(3, 40), INT8[2].float(), INT8[3]), {}, "qweight must be int8"),
    "linear-k-mismatch": ("int8_linear_triton", (torch.randn(3, 41), INT8[2], INT8[3]), {}, "must be \\[N, 41\\]"),
    "int4-k-not-multiple-of-group": ("int4_linear_triton", (*_int4_inputs(k=96)[:4], 64), {}, "do not divide"),
    "int4-group-48": ("int4_linear_triton", _replace(INT4, 4, 48), {}, "group size 48"),
    "int4-int8-codes": ("int4_linear_triton", _replace(INT4, 1, INT4[1].view(torch.int8)), {}, "uint8"),
    "int4-unpacked-codes": ("int4_linear_triton", _replace(INT4, 1, ref.unpack_int4(INT4[1])), {}, "holds 128 codes per row"),
    "int4-fp64-activations": ("int4_linear_triton", _replace(INT4, 0, INT4[0].double()), {}, "dtype"),
    "int4-scale-shape": ("int4_linear_triton", _replace(INT4, 2, INT4[2][:, :1]), {}, "scale must be fp32"),
    "int4-fp16-zero": ("int4_linear_triton", _replace(INT4, 3, INT4[3].half()), {}, "zero must be fp32"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_inputs_the_kernels_do_not_take_are_refused_before_launching(monkeypatch, case):
    monkeypatch.setattr(quant_triton, "interpreted", lambda: True)  # CPU tensors pass the device check
    launcher, args, kwargs, message = REFUSALS[case]
    with pytest.raises(NotLowerable, match=message):
        getattr(quant_triton, launcher)(*args, **kwargs)


@pytest.mark.parametrize("launcher, args", [("quantize_rows_triton", (torch.randn(2, 4),)), ("int8_gemm_triton", INT8), ("int4_linear_triton", INT4)])
def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch, launcher, args):
    monkeypatch.setattr(quant_triton, "interpreted", lambda: False)
    with pytest.raises(NotLowerable, match="cpu tensors"):
        getattr(quant_triton, launcher)(*args)


def test_launchers_pass_the_variant_constexprs(monkeypatch):
    """What reaches the kernels (nothing runs): the activation and bias switches of the int8 GEMM;
    the group size and dot dtype of the int4 GEMM."""
    launches = []
    monkeypatch.setattr(quant_triton, "interpreted", lambda: True)
    monkeypatch.setattr(quant_triton, "_launch_gemm", lambda kernel, tuned, blocks, m, n, *args, **constexprs: launches.append((kernel, blocks, constexprs)))
    quant_triton.int8_gemm_triton(*INT8[:4], None, "gelu")
    quant_triton.int4_linear_triton(*INT4)
    (kernel8, blocks8, int8), (kernel4, blocks4, int4) = launches
    assert kernel8 is quant_triton.int8_gemm_kernel and int8 == {"HAS_BIAS": False, "ACTIVATION": "gelu"}
    assert kernel4 is quant_triton.int4_gemm_kernel and int4["GROUP_SIZE"] == 32 and int4["HAS_BIAS"] is False and int4["DOT_IN_FP32"] is True
    assert blocks8["BLOCK_K"] == 32 and blocks4["BLOCK_K"] == 64


_RUN_CUDA_KERNEL = """
import sys, torch
import graphopt.ops.quant as quant
args = torch.load(sys.argv[1])
torch.save(quant._int8_linear_cuda(*args), sys.argv[2])
"""


def test_the_cuda_kernel_takes_smoothing_and_outlier_columns(interpreted_call):
    """``int8_linear``'s CUDA kernel: the template behind one pointwise pass (smoothing, outlier
    columns zeroed) and the outliers' fp32 product, against the reference."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(9, 64, generator=g) * 3, torch.randn(24, 64, generator=g) * 0.1, torch.randn(24, generator=g)
    smooth, idx = torch.rand(64, generator=g) + 0.5, torch.tensor([4, 33])
    q, s = ref.quantize_per_channel(w.index_fill(1, idx, 0.0))
    args = (x, q, s, b, smooth, idx, w[:, idx].contiguous(), "gelu")
    out = interpreted_call(_RUN_CUDA_KERNEL, args)
    assert_close(out, ref.int8_linear_reference(*args), rtol=1e-5, atol=1e-5)
