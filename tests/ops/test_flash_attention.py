"""The flash-attention kernel's varlen launcher, run by the Triton interpreter on CPU, against per-sequence SDPA in fp64.

Every case is packed inputs made here; one subprocess (``TRITON_INTERPRET=1`` must be set before
triton is imported) runs them all, and the checks run here, against ATen's SDPA on each sequence
alone, computed in fp64 and rounded to the output's dtype (the kernel computes in fp32).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from graphopt.ops.flash_attention import NotLowerable
from graphopt.ops.flash_attention import triton as flash
from graphopt.ops.flash_attention.reference import attention_reference, varlen_attention_reference
from graphopt.ops.flash_attention.triton import flash_attention_varlen as varlen_attention
from graphopt.testing import assert_close

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reference(q, k, v, cu_seqlens, scale=None):
    """SDPA on each sequence alone, in fp64, rounded to the query's dtype: ``[T, H, Dv]``."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if end > start:
            q_b, k_b, v_b = (t[start:end].double().transpose(0, 1) for t in (q, k, v))  # [H, L, ·]
            out[start:end] = F.scaled_dot_product_attention(q_b, k_b, v_b, scale=scale).transpose(0, 1)
    return out.to(q.dtype)


_RUN_VARLEN = """
import sys, torch
import graphopt.ops.varlen  # defines graphopt::varlen_attention, for the fallback of the CUDA kernel
from graphopt.ops.flash_attention.triton import flash_attention_varlen as varlen_attention
from graphopt.ops.varlen import _varlen_attention_cuda
calls = torch.load(sys.argv[1])
launchers = {"launcher": varlen_attention, "cuda-kernel": _varlen_attention_cuda}
torch.save({name: launchers[launcher](*args, **kwargs) for name, (launcher, args, kwargs) in calls.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def run_varlen(interpreted_call):
    """``run({name: case}) -> {name: output}`` in one interpreted subprocess; a case is
    ``(q, k, v, cu_seqlens, kwargs)`` for the launcher, or ``("cuda-kernel", args, {})``."""

    def run(cases):
        calls = {name: case if case[0] == "cuda-kernel" else ("launcher", case[:4], case[4]) for name, case in cases.items()}
        return interpreted_call(_RUN_VARLEN, calls)

    return run


def assert_matches(case, out):
    q, k, v, cu_seqlens, kwargs = case
    expected = reference(q, k, v, cu_seqlens, kwargs.get("scale"))
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected)


# --- cases ------------------------------------------------------------------------------------


def offsets(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)


def packed(lengths, heads, d, dtype, dv=None, fused_qkv=False, generator=None, **kwargs):
    """A case ``(q, k, v, cu_seqlens, kwargs)`` for sequences of ``lengths``; with ``fused_qkv``
    q, k and v are slices of one ``[T, 3, H, D]`` tensor, as a fused QKV projection gives them."""
    total = sum(lengths)
    if fused_qkv:
        qkv = torch.randn(total, 3, heads, d, generator=generator).to(dtype)
        q, k, v = qkv.unbind(1)
    else:
        q, k, v = (torch.randn(total, heads, width, generator=generator).to(dtype) for width in (d, d, dv or d))
    return q, k, v, offsets(lengths), kwargs


def _layout_cases(dtype):
    return {
        "mixed-lengths": packed([5, 1, 33, 17], 2, 16, dtype),
        "lengths-1": packed([1, 1, 1], 1, 8, dtype),
        "single-sequence": packed([40], 2, 8, dtype),
        "odd-d24-value-dim-differs": packed([9, 20], 2, 24, dtype, dv=12),
        "empty-sequence": packed([7, 0, 12], 1, 8, dtype),
        "fused-qkv-slices": packed([13, 21, 2], 2, 8, dtype, fused_qkv=True),
        "explicit-scale": packed([10, 3], 1, 16, dtype, scale=0.3),
        "max-seqlen-given-above-longest": packed([10, 30], 1, 8, dtype, max_seqlen=64),
    }


def _cases():
    torch.manual_seed(0)
    cases = {f"{name}-{dtype_name}": case for dtype_name, dtype in DTYPES.items() for name, case in _layout_cases(dtype).items()}
    cases["no-tokens"] = packed([], 2, 8, torch.float32)
    cases["no-tokens-empty-sequences"] = packed([0, 0], 2, 8, torch.float32)
    return cases


CASES = _cases()
CUDA_KERNEL_CASES = {"cuda-kernel-fp32": packed([6, 11], 2, 8, torch.float32), "cuda-kernel-fp64-falls-back": packed([6, 11], 2, 8, torch.float64)}


@pytest.fixture(scope="module")
def outputs(run_varlen):
    cuda_kernel_calls = {name: ("cuda-kernel", (*case[:4], None), {}) for name, case in CUDA_KERNEL_CASES.items()}
    return run_varlen({**CASES, **cuda_kernel_calls})


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_sdpa_per_sequence(outputs, case):
    assert_matches(CASES[case], outputs[case])


def test_fused_qkv_case_holds_strided_slices_of_one_tensor():
    q, k, v, *_ = CASES["fused-qkv-slices-fp32"]
    assert not q.is_contiguous() and q.stride() == (3 * 2 * 8, 8, 1) and k.data_ptr() == q.data_ptr() + 2 * 8 * 4


def test_no_tokens_gives_an_empty_output(outputs):
    assert outputs["no-tokens"].shape == (0, 2, 8) and outputs["no-tokens-empty-sequences"].shape == (0, 2, 8)


def test_length_1_sequences_return_their_value_row(outputs):
    _, _, v, _, _ = CASES["lengths-1-fp32"]
    assert torch.equal(outputs["lengths-1-fp32"], v)  # softmax over one key is exactly 1


def test_agrees_with_the_ops_cpu_implementation(outputs):
    q, k, v, cu_seqlens, _ = CASES["mixed-lengths-fp32"]
    assert_close(outputs["mixed-lengths-fp32"], torch.ops.graphopt.varlen_attention(q, k, v, cu_seqlens))


@pytest.mark.parametrize("case", CUDA_KERNEL_CASES)
def test_cuda_kernel_runs_the_launcher_or_falls_back_to_the_op(outputs, case):
    assert_matches(CUDA_KERNEL_CASES[case], outputs[case])


# --- random lengths ---------------------------------------------------------------------------


@st.composite
def random_varlen(draw):
    """One case: a random list of sequence lengths (empty and length-1 ones included), heads, head dims, dtype, layout."""
    lengths = draw(st.lists(st.integers(0, 32), min_size=1, max_size=5))
    heads = draw(st.integers(1, 2))
    d, dv = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    fused_qkv = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.2]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return packed(lengths, heads, d, dtype, dv=d if fused_qkv else dv, fused_qkv=fused_qkv, generator=generator, scale=scale)


# Few examples of many cases: each example costs a subprocess (~5 s to import graphopt), and so
# would shrinking. Hypothesis's first example is the simplest (every sequence empty); the second is random.
@settings(max_examples=2, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(st.lists(random_varlen(), min_size=10, max_size=10))
def test_random_lengths_match_sdpa_per_sequence(run_varlen, cases):
    outputs = run_varlen({f"case{n}": case for n, case in enumerate(cases)})
    for n, case in enumerate(cases):
        assert_matches(case, outputs[f"case{n}"])


# --- generation, registration and refusals (no kernel runs) -----------------------------------


def _recorded_launch(monkeypatch, *args, **kwargs):
    """``(arguments, constexprs)`` the varlen launcher passes the kernel (nothing runs)."""
    launches = []
    monkeypatch.setattr(flash, "interpreted", lambda: True)
    monkeypatch.setattr(flash, "_launch", lambda rows, pairs, *args, **constexprs: launches.append((args, constexprs)))
    varlen_attention(*args, **kwargs)
    (launch,) = launches
    return launch


def test_varlen_is_a_constexpr_variant_of_the_attention_kernel(monkeypatch):
    source = flash.kernel_source()
    assert source.count("@triton.jit") == 1 and "def attention_fwd_kernel(" in source
    assert "Q, K, V, Out, Mask, CuSeqlens," in source and "tl.load(CuSeqlens + b + 1)" in source
    assert "    if VARLEN:\n" in source and "if start_m >= Lq:" in source and "            return\n" in source
    q, k, v, cu_seqlens, _ = packed([5, 3], 2, 8, torch.float32)
    args, constexprs = _recorded_launch(monkeypatch, q, k, v, cu_seqlens)
    assert args[5] is cu_seqlens
    assert constexprs["VARLEN"] is True and constexprs["CAUSAL"] is False and constexprs["MASK_KIND"] == "none"
    assert constexprs["INPUT_PRECISION"] == "ieee"
    _, constexprs = _recorded_launch(monkeypatch, *(t.half() for t in (q, k, v)), cu_seqlens)
    assert constexprs["INPUT_PRECISION"] == "tf32"


def test_references_match_sdpa():
    """The naive twins (``reference.py``) agree with ATen's SDPA."""
    q, k, v, cu_seqlens, _ = packed([5, 0, 9], 2, 8, torch.float64)
    assert_close(varlen_attention_reference(q, k, v, cu_seqlens, 0.3), reference(q, k, v, cu_seqlens, 0.3))
    q, k, v = (torch.randn(2, 4 if name == "q" else 2, 7, 8, dtype=torch.float64) for name in "qkv")
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[0, 0, 3] = False  # a fully masked row: zeros, as ATen's CPU SDPA gives
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}, {"attn_mask": torch.randn(7, 7, dtype=torch.float64)}):
        expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        assert_close(attention_reference(q, k, v, enable_gqa=True, **kwargs), expected)


def test_is_the_cuda_kernel_of_the_op():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("graphopt::varlen_attention", "CUDA")


def _qkv(total=5, heads=2, d=8, dtype=torch.float32):
    return [torch.randn(total, heads, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([*(torch.randn(1, 5, 2, 8) for _ in range(3)), offsets([5])], "ranks"),
        ([*_qkv(dtype=torch.float64), offsets([5])], "dtypes"),
        ([*_qkv()[:2], torch.randn(5, 3, 8), offsets([5])], "do not fit together"),
        ([*_qkv(), offsets([5]).int()], "cu_seqlens must be int64"),
        ([*_qkv(heads=2), offsets([1] * 40000)[:-1]], "exceed the grid"),
        ([*_qkv(), offsets([5])], "cpu tensors"),
    ],
)
def test_unsupported_inputs_are_refused_before_launching(monkeypatch, inputs, message):
    monkeypatch.setattr(flash, "interpreted", lambda: False)
    with pytest.raises(NotLowerable, match=message):
        varlen_attention(*inputs)
