"""The graphopt:: custom ops: references, the fast CPU kernels, the inductor lowering, capture/save/load."""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import graphopt
from graphopt import ir
from graphopt.ops import norms as ops
from graphopt.ops.norms import crms_norm_reference, rms_norm_reference
from graphopt.testing import assert_close


class UsesRmsNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        return torch.ops.graphopt.rms_norm(x, self.weight, self.bias, 1e-6) * 2 + torch.ops.graphopt.crms_norm(x, 1e-5).sum(-1, keepdim=True)


def test_reference_matches_formula():
    x = torch.randn(3, 5, 16)
    w, b = torch.rand(16), torch.randn(16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w + b
    assert_close(torch.ops.graphopt.rms_norm(x, w, b, 1e-6), expected)
    assert_close(torch.ops.graphopt.rms_norm(x, None, None, 1e-6), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_half_precision_computes_in_float32():
    x = torch.randn(4, 64) * 300
    out = torch.ops.graphopt.rms_norm(x.to(torch.bfloat16), None, None, 1e-6)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), torch.ops.graphopt.rms_norm(x.to(torch.bfloat16).float(), None, None, 1e-6), atol=1e-2, rtol=1e-2)


def test_custom_op_captures_propagates_dynamic_shapes_and_saves(tmp_path):
    model = UsesRmsNorm()
    x = torch.randn(2, 7, 16)
    dim = torch.export.Dim.AUTO
    gm = graphopt.capture(model, (x,), dynamic_shapes=({0: dim, 1: dim},))
    (node,) = ir.op_nodes(gm, torch.ops.graphopt.rms_norm)
    assert len(ir.op_nodes(gm, torch.ops.graphopt.crms_norm)) == 1
    ir.propagate_shapes(gm)
    assert len(ir.shape_of(node)) == 3 and not isinstance(ir.shape_of(node)[1], int)  # symbolic sequence length
    path = tmp_path / "rms.pt2"
    graphopt.save(gm, str(path), (x,), dynamic_shapes=({0: dim, 1: dim},))
    loaded = graphopt.load(str(path))
    y = torch.randn(3, 4, 16)
    assert_close(loaded(y), model(y))


def test_crms_norm_equals_rms_norm_of_the_decompressed_vector():
    v = torch.randn(3, 7, 10, dtype=torch.float64)
    v = v - v.mean(-1, keepdim=True)  # zero-mean: the last coordinate is minus the sum of the others
    full = torch.ops.graphopt.rms_norm(v, None, None, 1e-6)
    compressed = torch.ops.graphopt.crms_norm(v[..., :-1], 1e-6)
    assert_close(compressed, full[..., :-1])


def test_reference_computes_fp64_in_fp64():
    x = torch.randn(4, 33, dtype=torch.float64) + 1
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_close(rms_norm_reference(x, None, None, 1e-6), expected, rtol=1e-14, atol=1e-14)


AFFINE = {"w+b": (True, True), "w": (True, False), "b": (False, True), "none": (False, False)}
SHAPES = [(1, 1), (3, 7), (2, 5, 385), (3, 50, 130)]  # the last is big enough for the C kernels' threads


def _norm_inputs(shape, dtype, affine):
    torch.manual_seed(0)
    d = shape[-1]
    x = (torch.randn(shape) * 3 + 1).to(dtype)  # off-centre, so a mean-subtracting kernel would fail
    weight, bias = AFFINE[affine]
    return x, (torch.rand(d) + 0.5).to(dtype) if weight else None, torch.randn(d).to(dtype) if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", AFFINE)
def test_cpu_kernels_match_references(dtype, shape, affine):
    """The registered CPU kernels (C for fp32, else the ATen formulation) and the ATen formulation itself."""
    x, w, b = _norm_inputs(shape, dtype, affine)
    expected, expected_crms = rms_norm_reference(x, w, b, 1e-6), crms_norm_reference(x, 1e-6)
    for out, crms in [
        (torch.ops.graphopt.rms_norm(x, w, b, 1e-6), torch.ops.graphopt.crms_norm(x, 1e-6)),
        (ops.rms_norm_torch(x, w, b, 1e-6), ops.crms_norm_torch(x, 1e-6)),
    ]:
        assert out.dtype == dtype and out.shape == x.shape
        assert_close(out, expected)
        assert_close(crms, expected_crms)


def test_cpu_kernels_handle_strided_and_mixed_dtype_inputs():
    x = torch.randn(7, 6).t()  # column stride 6
    w, b = torch.rand(7, dtype=torch.bfloat16) + 0.5, torch.randn(7, dtype=torch.float64)
    assert_close(torch.ops.graphopt.rms_norm(x, w, b, 1e-6), rms_norm_reference(x, w, b, 1e-6))
    assert_close(torch.ops.graphopt.crms_norm(x, 1e-6), crms_norm_reference(x, 1e-6))
    x = torch.randn(4, 16)
    w = torch.rand(32)[::2]  # a strided gain: not for the C kernel
    assert_close(torch.ops.graphopt.rms_norm(x, w, None, 1e-6), rms_norm_reference(x, w, None, 1e-6))


def _aten_ops_run(fn, *args):
    with torch.profiler.profile() as prof:
        fn(*args)
    return {event.name for event in prof.events()}


def test_fp32_cpu_dispatch_runs_the_c_kernel_and_other_dtypes_one_reduction_kernel():
    if ops.c_kernels() is None:
        pytest.skip("no C compiler or OpenMP runtime: the C kernels are off")
    x, w, b = torch.randn(8, 384), torch.rand(384), torch.randn(384)
    assert not _aten_ops_run(torch.ops.graphopt.rms_norm, x, w, b, 1e-6) & {"aten::linalg_vector_norm", "aten::mul", "aten::mean"}
    assert not _aten_ops_run(torch.ops.graphopt.crms_norm, x, 1e-6) & {"aten::linalg_vector_norm", "aten::sum", "aten::mul"}
    ops_run = _aten_ops_run(torch.ops.graphopt.rms_norm, x.bfloat16(), w, b, 1e-6)
    assert "aten::linalg_vector_norm" in ops_run and "aten::addcmul" in ops_run
    assert not ops_run & {"aten::mean", "aten::pow"}  # the reference's x² temporary and its mean


@pytest.fixture
def fresh_c_kernels(monkeypatch, tmp_path):
    """``ops.c_kernels`` rebuilt from scratch into an empty cache, and restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ops.c_kernels.cache_clear()
    yield tmp_path
    ops.c_kernels.cache_clear()


def test_c_kernels_build_into_the_cache_in_well_under_a_minute(fresh_c_kernels):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    start = time.perf_counter()
    kernels = ops.c_kernels()
    assert kernels is not None and time.perf_counter() - start < 20
    (library,) = (fresh_c_kernels / "graphopt").glob("norm_kernels_*.so")
    assert Path(kernels._name) == library


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])  # missing; present but every build fails
def test_without_a_working_compiler_the_cpu_kernels_fall_back_to_aten(fresh_c_kernels, monkeypatch, compiler):
    monkeypatch.setenv("CC", compiler)
    assert ops.c_kernels() is None
    x, w, b = _norm_inputs((3, 50, 130), torch.float32, "w+b")
    assert_close(torch.ops.graphopt.rms_norm(x, w, b, 1e-6), rms_norm_reference(x, w, b, 1e-6))
    assert "aten::linalg_vector_norm" in _aten_ops_run(torch.ops.graphopt.crms_norm, x, 1e-6)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_inductor_fuses_the_ops_instead_of_calling_them():
    """The ops lower through their references (inductor decompositions) into generated kernels."""

    def residual_norms(h, a, w, b):
        h = h + a
        return torch.ops.graphopt.rms_norm(h, w, b, 1e-6), torch.ops.graphopt.crms_norm(h[..., 1:], 1e-6)

    h, a, w, b = torch.randn(2, 5, 48), torch.randn(2, 5, 48), torch.rand(48) + 0.5, torch.randn(48)
    torch._dynamo.reset()
    with torch.compiler.config.patch(force_disable_caches=True):  # a cached graph may predate the decompositions
        (rms, crms), code = run_and_get_code(torch.compile(residual_norms, backend="inductor"), h, a, w, b)
    assert "graphopt" not in "\n".join(code)  # no extern call to the custom ops
    assert_close(rms, rms_norm_reference(h + a, w, b, 1e-6))
    assert_close(crms, crms_norm_reference((h + a)[..., 1:], 1e-6))
