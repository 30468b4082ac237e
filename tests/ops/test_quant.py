"""graphopt::int8_linear and graphopt::weight_only_linear: the references against fp64 and their
analytic error bounds, every CPU kernel path against the reference on odd shapes, the saturation
guard of CPUs without VNNI, the measured-choice cache, and the op records."""

import json

import pytest
import torch
import torch.nn.functional as F

from graphopt.ir.oprecord import op_record
from graphopt.ops import platform
from graphopt.ops.quant import cpu as quant_cpu
from graphopt.ops.quant import reference as R

SHAPES = [(1, 40, 10), (3, 100, 96), (77, 384, 200), (130, 64, 24)]  # (M, K, N): ragged, below and above the SIMD widths


def _linear(m, k, n, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * scale, torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)


# ----------------------------------------------------------------------------- references


def test_per_channel_and_per_token_codes_are_within_half_a_step():
    x, w, _ = _linear(17, 33, 9)
    for qmax in (127, 63):
        q, s = R.quantize_per_channel(w, qmax)
        assert q.dtype == torch.int8 and q.abs().max() <= qmax
        assert ((q.double() * s.double()[:, None] - w.double()).abs() <= s.double()[:, None] / 2 + 1e-7).all()
    q, s = R.quantize_per_token(x)
    assert ((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()
    zero_row_codes, zero_row_scale = R.quantize_per_token(torch.zeros(2, 5))
    assert (zero_row_codes == 0).all() and (zero_row_scale == 1).all()


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_linear_reference_is_within_the_analytic_bound_of_fp64(m, k, n):
    x, w, b = _linear(m, k, n)
    q, s = R.quantize_per_channel(w)
    y = R.int8_linear_reference(x.double(), q, s, b)
    exact = F.linear(x.double(), w.double(), b.double())
    bound = R.int8_linear_error_bound(x, w, q, s)
    assert ((y - exact).abs() <= bound).all()
    assert (y - exact).abs().max() > 0  # quantization did happen


def test_int8_linear_reference_extras_are_exact_rewrites():
    x, w, b = _linear(9, 48, 20)
    smooth = torch.rand(48, dtype=torch.float64) + 0.5
    q, s = R.quantize_per_channel(w.double() / smooth)  # SmoothQuant: weights divided by what x is multiplied by
    smoothed = R.int8_linear_reference(x.double(), q, s, b, smooth=smooth)
    assert (smoothed - F.linear(x.double(), w.double(), b.double())).abs().max() < R.int8_linear_error_bound(x * smooth.float(), w / smooth.float(), q, s).max()
    outliers = torch.tensor([3, 40])
    x[:, outliers] *= 100  # two huge channels, taken out of the int8 product
    kept = w.index_fill(1, outliers, 0.0)
    q, s = R.quantize_per_channel(kept)
    y = R.int8_linear_reference(x.double(), q, s, b, outlier_index=outliers, outlier_weight=w[:, outliers], activation="gelu")
    exact = F.gelu(F.linear(x.double(), w.double(), b.double()))
    plain_q, plain_s = R.quantize_per_channel(w)
    plain = F.gelu(R.int8_linear_reference(x.double(), plain_q, plain_s, b))
    assert (y - exact).abs().max() < (plain - exact).abs().max() / 10


def test_int4_groupwise_round_trip_and_error():
    w = torch.randn(24, 256)
    for group in (32, 64, 128):
        packed, scale, zero = R.quantize_int4_groupwise(w, group)
        assert packed.shape == (24, 128) and packed.dtype == torch.uint8 and scale.shape == (24, 256 // group)
        codes = R.unpack_int4(packed)
        assert torch.equal(R.pack_int4(codes), packed) and codes.max() <= 15
        error = (R.dequantize_int4(packed, scale, zero, group) - w).abs().reshape(24, -1, group)
        assert (error <= scale[..., None] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="do not divide"):
        R.quantize_int4_groupwise(torch.randn(4, 100), 32)


# ----------------------------------------------------------------------------- CPU kernels against the reference


def _paths(m, k, n):
    return quant_cpu.int8_paths_available(m, n, k)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh"])
def test_every_int8_path_matches_the_reference_within_one_step(m, k, n, activation):
    x, w, b = _linear(m, k, n, seed=m)
    smooth = torch.rand(k) + 0.5
    q, s = R.quantize_per_channel(w / smooth, 63)
    reference = R.int8_linear_reference(x, q, s, b, smooth, None, None, activation)
    exact = R.apply_activation(F.linear(x.double() * smooth.double(), (q.double() * s.double()[:, None]), b.double()), activation)
    bound = R.int8_linear_error_bound(x * smooth, q.float() * s[:, None], q, s)
    for path in _paths(m, k, n):
        y = quant_cpu.int8_linear_cpu(x, q, s, b, smooth, None, None, activation, path=path)
        assert y.shape == (m, n) and y.dtype == torch.float32
        if path == "fp32":  # the same codes as the reference: equal up to fp32 rounding
            torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
        else:  # a grid of 127.5 steps instead of 127: within the activation bound of the dequantized weights
            assert ((y.double() - exact).abs() <= bound * 1.01 + 1e-5).all(), path


def test_int8_paths_take_leading_dims_outliers_and_empty_inputs():
    x, w, b = _linear(24, 64, 16)
    x = x.reshape(2, 12, 64)
    idx = torch.tensor([5])
    q, s = R.quantize_per_channel(w.index_fill(1, idx, 0.0), 63)
    reference = R.int8_linear_reference(x, q, s, b, None, idx, w[:, idx], "relu")
    for path in _paths(24, 64, 16):
        y = quant_cpu.int8_linear_cpu(x, q, s, b, None, idx, w[:, idx], "relu", path=path)
        assert y.shape == (2, 12, 16)
        assert (y - reference).abs().max() < 0.05 * reference.abs().max()
    assert quant_cpu.int8_linear_cpu(torch.empty(0, 64), q, s, b).shape == (0, 16)


def test_weights_beyond_64_do_not_saturate_without_vnni(monkeypatch):
    """vpmaddubsw adds pairs of uint8 x int8 products in int16: 255 * 127 * 2 overflows. A row of
    ones against a row of ones is 256 exactly; weights at ±127 must run on the 7-bit grid there."""
    x, w = torch.ones(2, 256), torch.ones(4, 256)
    q, s = R.quantize_per_channel(w, 127)
    for vnni in (False, True):
        monkeypatch.setattr(platform.CpuCapabilities, "vnni", property(lambda self, v=vnni: v))
        quant_cpu._packs.clear()
        half, zero_point = quant_cpu._grid(q, s)
        assert (half, zero_point) == ((127.5, 128) if vnni else (63.5, 64))
    monkeypatch.undo()  # this CPU as it is: whatever its paths, no saturation
    quant_cpu._packs.clear()
    for path in _paths(2, 256, 4):
        if path == "int_mm":
            continue
        y = quant_cpu.int8_linear_cpu(x, q, s, None, path=path)
        assert (y - 256).abs().max() < 4, (path, y)


@pytest.mark.parametrize("m,n,k", [(1, 24, 128), (3, 17, 128), (5, 40, 256)])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
def test_weight_only_paths_match_the_reference(m, n, k, group):
    g = torch.Generator().manual_seed(k + group)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    if group and k % group:
        pytest.skip("the group does not divide k")
    if group:
        qweight, scale, zero = R.quantize_int4_groupwise(w, group)
    else:
        (qweight, scale), zero = R.quantize_per_channel(w), None
    reference = R.weight_only_linear_reference(x, qweight, scale, zero, group, b)
    for path in quant_cpu.WEIGHT_ONLY_PATHS:
        y = quant_cpu.weight_only_linear_cpu(x, qweight, scale, zero, group, b, path=path)
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-4)
    dequantized = qweight.float() * scale[:, None] if not group else R.dequantize_int4(qweight, scale, zero, group)
    assert (dequantized - w).abs().max() <= (scale.max() / 2 + 1e-6)


# ----------------------------------------------------------------------------- measured choices


def test_fastest_times_once_and_caches_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    platform.forget_timings()
    calls = {"slow": 0, "fast": 0}

    def make(name, loops):
        def run():
            calls[name] += 1
            torch.randn(loops, 64).sum()

        return run

    best, seconds = platform.fastest("test_kind", (1, 2), {"slow": make("slow", 4000), "fast": make("fast", 1)})
    assert best == "fast" and seconds["slow"] > seconds["fast"]
    ran = dict(calls)
    platform.forget_timings()  # a new process: only the file remains
    assert platform.fastest("test_kind", (1, 2), {"slow": make("slow", 4000), "fast": make("fast", 1)})[0] == "fast"
    assert calls == ran  # nothing ran again
    stored = json.loads(platform.timings_file().read_text())
    (entry,) = stored.values()
    assert entry["best"] == "fast" and entry["threads"] == torch.get_num_threads() and entry["cpu"] == platform.cpu_capabilities().describe()
    platform.forget_timings()


def test_capabilities_describe_this_cpu():
    caps = platform.cpu_capabilities()
    text = caps.describe()
    assert caps.torch_capability in text and ("VNNI" in text) and ("bf16" in text)
    assert caps.vnni == bool(caps.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def test_int_mm_is_never_a_candidate_without_vnni():
    if platform.cpu_capabilities().vnni:
        assert "int_mm" in quant_cpu.int8_paths_available(1024, 256, 256)
    else:
        assert "int_mm" not in quant_cpu.int8_paths_available(1024, 256, 256)


# ----------------------------------------------------------------------------- the records


def test_records_are_token_wise_with_linear_flops_and_fake_shapes():
    for op in (torch.ops.graphopt.int8_linear, torch.ops.graphopt.weight_only_linear):
        record = op_record(op.default)
        assert record.tokenwise == 1 and record.flops is not None
    x, w, b = _linear(6, 32, 8)
    q, s = R.quantize_per_channel(w)
    x = x.reshape(2, 3, 32)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fq, fs = mode.from_tensor(x), mode.from_tensor(q), mode.from_tensor(s)
        assert torch.ops.graphopt.int8_linear(fx, fq, fs, None, None, None, None, "none").shape == (2, 3, 8)


def test_int8_decomposition_is_registered_with_vnni_only_and_matches_the_reference():
    from graphopt.ops.quant import int8_linear_decomposition

    record = op_record(torch.ops.graphopt.int8_linear.default)
    assert (record.inductor_decomposition is not None) == platform.cpu_capabilities().vnni
    x, w, b = _linear(32, 64, 24)
    idx = torch.tensor([3, 9])
    q, s = R.quantize_per_channel(w.index_fill(1, idx, 0.0))
    smooth = torch.rand(64) + 0.5
    for extras in ((None, None, None), (smooth, None, None), (smooth, idx, w[:, idx])):
        y = int8_linear_decomposition(x, q, s, b, *extras, "gelu")
        torch.testing.assert_close(y, R.int8_linear_reference(x, q, s, b, *extras, "gelu"), rtol=1e-5, atol=1e-5)
