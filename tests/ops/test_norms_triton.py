"""The Triton RMSNorm / CRMSNorm kernels, run by the Triton interpreter on CPU, against the references.

Every case's inputs are made here; one subprocess (see conftest.py) runs all launchers, and each
test compares one output with the reference computed in this process.
"""

import types

import pytest
import torch

from graphopt.ops import norms as ops
from graphopt.ops.norms import crms_norm_reference, rms_norm_reference
from graphopt.testing import assert_close

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LONG_ROW = 4096 + 5  # MAX_BLOCK_SIZE + 5: two blocks per sweep, the second ragged


def _x(shape, dtype, scale=3.0):
    return (torch.randn(shape) * scale + 1).to(dtype)  # off-centre: RMSNorm must not subtract the mean


def _cases():
    torch.manual_seed(0)
    cases = {}
    for dtype_name, dtype in DTYPES.items():
        for rows in (1, 3):
            for d in (1, 7, 384, 385):
                x, w, b = _x((rows, d), dtype), (torch.rand(d) + 0.5).to(dtype), torch.randn(d).to(dtype)
                for affine, (weight, bias) in {"w+b": (w, b), "w": (w, None), "b": (None, b), "none": (None, None)}.items():
                    cases[f"rms-{dtype_name}-{rows}x{d}-{affine}"] = ("rms_norm_triton", (x, weight, bias, 1e-6))
                if d != 384:
                    cases[f"crms-{dtype_name}-{rows}x{d}"] = ("crms_norm_triton", (x, 1e-6))
    x = _x((2, 1, LONG_ROW), torch.float32)
    cases["rms-long-row-batched"] = ("rms_norm_triton", (x, torch.rand(LONG_ROW) + 0.5, torch.randn(LONG_ROW), 1e-5))
    cases["crms-long-row-batched"] = ("crms_norm_triton", (x, 1e-5))
    cases["rms-strided-mixed-dtypes"] = ("rms_norm_triton", (torch.randn(7, 5).t(), torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7).bfloat16(), 1e-6))
    cases["rms-fp16-squares-beyond-fp16-range"] = ("rms_norm_triton", (torch.full((2, 16), 300.0, dtype=torch.float16), None, None, 1e-6))
    return cases


CASES = _cases()
REFERENCES = {"rms_norm_triton": rms_norm_reference, "crms_norm_triton": crms_norm_reference}


@pytest.fixture(scope="module")
def outputs(run_interpreted):
    return run_interpreted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(outputs, case):
    launcher, args = CASES[case]
    out, expected = outputs[case], REFERENCES[launcher](*args)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected)


def test_half_precision_squares_are_accumulated_in_fp32(outputs):
    # 300² overflows fp16: computed in fp16 the norm would be inf and the output 0
    assert_close(outputs["rms-fp16-squares-beyond-fp16-range"], torch.ones(2, 16, dtype=torch.float16))


def test_cuda_kernels_route_supported_dtypes_to_triton(monkeypatch):
    """The ops' CUDA kernels call the Triton launchers for fp16/bf16/fp32, the torch formulation otherwise."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("graphopt::rms_norm", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("graphopt::crms_norm", "CUDA")
    calls = []
    launchers = types.SimpleNamespace(
        DTYPES=(torch.float16, torch.bfloat16, torch.float32),
        rms_norm_triton=lambda x, *args: calls.append(("rms", x.dtype)) or rms_norm_reference(x, *args),
        crms_norm_triton=lambda x, *args: calls.append(("crms", x.dtype)) or crms_norm_reference(x, *args),
    )
    monkeypatch.setattr(ops, "_triton_norm", lambda: launchers)
    for dtype in (torch.bfloat16, torch.float64):
        x, w, b = _x((3, 9), dtype), torch.rand(9, dtype=dtype), torch.randn(9, dtype=dtype)
        assert_close(ops._rms_norm_cuda(x, w, b, 1e-6), rms_norm_reference(x, w, b, 1e-6))
        assert_close(ops._crms_norm_cuda(x, 1e-6), crms_norm_reference(x, 1e-6))
    assert calls == [("rms", torch.bfloat16), ("crms", torch.bfloat16)]
