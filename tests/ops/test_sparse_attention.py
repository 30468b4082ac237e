"""graphopt::window_attention, block_sparse_attention and varlen_window_attention: CPU kernels and the
Triton kernel (in the interpreter) against the references, the FLOP rules, and that the CPU fast
paths never build an ``[L, S]`` tensor."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import graphopt  # noqa: F401  (registers the ops)
from graphopt.ir.flops import count_flops
from graphopt.ops import attention_masks
from graphopt.ops.sparse_attention import cpu
from graphopt.ops.sparse_attention.reference import (
    block_layout_keep,
    block_pair_count,
    block_sparse_attention_reference,
    varlen_window_attention_reference,
    window_attention_reference,
    window_pair_count,
    window_pattern_keep,
)
from graphopt.ops.linear_attention.reference import window_keep
from graphopt.testing import assert_close

ops = torch.ops.graphopt


def qkv(batch, heads, kv_heads, length_q, length_k, d, dv, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, length_q, d, generator=gen).to(dtype),
        torch.randn(batch, kv_heads, length_k, d, generator=gen).to(dtype),
        torch.randn(batch, kv_heads, length_k, dv, generator=gen).to(dtype),
    )


def masks(batch, heads, length_q, length_k, seed=1):
    """No mask, a bool key-padding mask (a row of all pads too), an additive one, it materialised to [B, 1, L, S],
    a general one, and decoder masks built into the tensor (``tril ∧ keys``, bool and additive, as Hugging Face passes them)."""
    gen = torch.Generator().manual_seed(seed)
    pad = torch.rand(batch, 1, 1, length_k, generator=gen) > 0.3
    pad[-1, ..., length_k // 2 :] = False
    additive = torch.randn(batch, heads, 1, length_k, generator=gen)
    tril = torch.ones(length_q, length_k, dtype=torch.bool).tril()
    return {
        "none": None,
        "key-bool": pad,
        "key-additive": additive,
        "key-materialised": pad.expand(batch, 1, length_q, length_k).clone(),
        "general": torch.rand(length_q, length_k, generator=gen) > 0.4,
        "causal-padded": tril & pad,
        "causal-additive": additive.masked_fill(~tril, torch.finfo(torch.float32).min),
    }


WINDOW_SHAPES = {
    # name: (B, H, Hk, L, S, D, Dv, window, global_tokens)
    "long-odd": (2, 2, 2, 201, 201, 24, 12, 17, 1),
    "gqa-globals": (1, 4, 2, 150, 150, 16, 16, 9, 3),
    "queries-fewer-than-keys": (2, 2, 1, 130, 170, 8, 8, 32, 0),
    "window-covers": (1, 2, 2, 40, 40, 8, 8, 128, 1),
}


@pytest.mark.parametrize("path", ["auto", "chunked"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", WINDOW_SHAPES)
def test_window_attention_matches_reference(shape, causal, path, monkeypatch):
    if path == "chunked":  # the bands even where dense SDPA computes fewer pairs
        monkeypatch.setattr(cpu, "DENSE_FRACTION", float("inf"))
    b, h, hk, lq, lk, d, dv, window, glob = WINDOW_SHAPES[shape]
    q, k, v = qkv(b, h, hk, lq, lk, d, dv)
    for name, mask in masks(b, h, lq, lk).items():
        out = ops.window_attention(q, k, v, window, glob, attn_mask=mask, is_causal=causal)
        assert_close(out, window_attention_reference(q, k, v, window, glob, mask, causal), rtol=1e-5, atol=1e-5, msg=name)


def test_a_mask_that_hides_later_keys_makes_the_window_causal(monkeypatch):
    """A decoder's ``tril ∧ keys`` mask with ``is_causal=False`` (Hugging Face's): the window is the causal
    one (``i − window < j <= i``, as ``is_causal``), not ``|i − j| <= window // 2``; the fast path runs it."""
    q, k, v = qkv(2, 2, 1, 300, 300, 16, 16)
    pad = masks(2, 2, 300, 300)["key-bool"]
    tril = torch.ones(300, 300, dtype=torch.bool).tril()
    for glob in (0, 2):
        as_causal = window_attention_reference(q, k, v, 40, glob, pad, True)
        for mask in (tril & pad, torch.zeros(2, 1, 300, 300).masked_fill(~(tril & pad), float("-inf"))):
            assert_close(window_attention_reference(q, k, v, 40, glob, mask), as_causal, rtol=1e-5, atol=1e-5)
            assert_close(ops.window_attention(q, k, v, 40, glob, attn_mask=mask), as_causal, rtol=1e-5, atol=1e-5)
    assert attention_masks.causal_key_row(tril & pad, 300, 300).shape == (2, 1, 300)
    monkeypatch.setattr(attention_masks, "CHECK_ROWS", 64)  # the mask is read 64 rows at a time
    decoder = tril & pad
    with LargestTensor() as seen:  # the key-padding row, not the [L, S] mask, reaches the bands
        cpu.window_attention_chunked(q, k, v, 40, 1, decoder, False)
    assert seen.largest < 300 * 300 // 2
    general = tril & (torch.rand(300, 300, generator=torch.Generator().manual_seed(0)) > 0.5)  # hides later keys, not a key mask
    assert_close(ops.window_attention(q, k, v, 40, 1, attn_mask=general), window_attention_reference(q, k, v, 40, 1, general), rtol=1e-5, atol=1e-5)
    assert_close(window_attention_reference(q, k, v, 40, 1, general), window_attention_reference(q, k, v, 40, 1, general, True), rtol=1e-5, atol=1e-5)
    sees_later = tril.clone()
    sees_later[5, 6] = True  # one later key visible: bidirectional window again
    bidirectional = window_pattern_keep(300, 300, 40, 0, False)
    assert_close(
        window_attention_reference(q, k, v, 40, 0, sees_later), window_attention_reference(q, k, v, 40, 0, sees_later & bidirectional), rtol=1e-5, atol=1e-5
    )
    assert_close(ops.window_attention(q, k, v, 40, 0, attn_mask=sees_later), window_attention_reference(q, k, v, 40, 0, sees_later), rtol=1e-5, atol=1e-5)


def test_dense_sdpa_runs_where_the_bands_cover_most_keys():
    q, k, v = qkv(1, 2, 2, 512, 512, 16, 16)
    for window, dense in ((256, True), (16, False)):
        with LargestTensor() as seen:
            out = cpu.window_attention_chunked(q, k, v, window, 0)
        assert (seen.largest >= 512 * 512) is dense, window
        assert_close(out, window_attention_reference(q, k, v, window, 0), rtol=1e-5, atol=1e-5)


def test_window_attention_fully_masked_rows_are_zero_and_fp16_works():
    q, k, v = qkv(1, 2, 2, 150, 150, 16, 16, dtype=torch.float16)
    mask = torch.zeros(1, 1, 1, 150, dtype=torch.bool)
    out = ops.window_attention(q, k, v, 8, 0, attn_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))
    mask[..., ::3] = True
    out = ops.window_attention(q, k, v, 8, 2, attn_mask=mask)
    assert_close(out.float(), window_attention_reference(q.float(), k.float(), v.float(), 8, 2, mask).float(), rtol=2e-3, atol=2e-3)


def test_window_pattern_uses_linear_attentions_window_convention():
    keep = window_pattern_keep(30, 30, 6, 0, False)
    assert torch.equal(keep, window_keep(30, 30, 6, False))
    causal = window_pattern_keep(30, 30, 6, 2, True)
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    assert torch.equal(causal, ((j > i - 6) | (j < 2) | (i < 2)) & (j <= i))


def layout_case(heads, lq, lk, bs, per_head, seed=2):
    gen = torch.Generator().manual_seed(seed)
    nq, nk = -(-lq // bs), -(-lk // bs)
    layout = torch.rand((heads, nq, nk) if per_head else (nq, nk), generator=gen) > 0.5
    layout[..., 1, :] = False  # a query block that sees no key: zeros
    layout[..., 0, :] = True
    return layout


BLOCK_SHAPES = {
    # name: (B, H, Hk, L, S, D, Dv, block_size, per_head)
    "shared-layout-ragged": (2, 4, 2, 100, 100, 16, 8, 16, False),
    "per-head-rectangular": (1, 2, 2, 70, 90, 24, 24, 32, True),
    "small-odd-blocks": (2, 2, 1, 33, 33, 8, 8, 5, True),
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", BLOCK_SHAPES)
def test_block_sparse_attention_matches_reference(shape, causal):
    b, h, hk, lq, lk, d, dv, bs, per_head = BLOCK_SHAPES[shape]
    q, k, v = qkv(b, h, hk, lq, lk, d, dv)
    layout = layout_case(h, lq, lk, bs, per_head)
    for name, mask in masks(b, h, lq, lk).items():
        out = ops.block_sparse_attention(q, k, v, layout, bs, attn_mask=mask, is_causal=causal)
        assert_close(out, block_sparse_attention_reference(q, k, v, layout, bs, mask, causal), rtol=1e-5, atol=1e-5, msg=name)


def test_block_sparse_attention_rejects_a_layout_of_the_wrong_size():
    q, k, v = qkv(1, 2, 2, 40, 40, 8, 8)
    with pytest.raises(ValueError, match="layout"):
        ops.block_sparse_attention(q, k, v, torch.ones(2, 2, dtype=torch.bool), 16)


def packed(lengths, heads, kv_heads, d, seed=3):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    return (*(torch.randn(total, n, d, generator=gen) for n in (heads, kv_heads, kv_heads)), cu_seqlens)


def test_varlen_window_attention_matches_each_sequence_alone():
    q, k, v, cu_seqlens = packed([130, 0, 7, 130, 201], 4, 2, 16)
    out = ops.varlen_window_attention(q, k, v, cu_seqlens, 20, 2)
    assert_close(out, varlen_window_attention_reference(q, k, v, cu_seqlens, 20, 2), rtol=1e-5, atol=1e-5)
    start, end = cu_seqlens[3].item(), cu_seqlens[4].item()  # sequence 3 alone, as padded window attention
    alone = ops.window_attention(*(t[start:end].transpose(0, 1)[None] for t in (q, k, v)), 20, 2)
    assert_close(out[start:end], alone[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


# --- cost ---------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """The most elements any op's output had while the mode was on (views, which allocate nothing, aside)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not func.is_view:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_cpu_fast_paths_never_build_an_l_by_s_tensor(causal):
    length = 2048
    q, k, v = qkv(1, 1, 1, length, length, 8, 8)
    pad = torch.ones(1, 1, 1, length, dtype=torch.bool)
    layout = torch.eye(length // 64, dtype=torch.bool) | torch.eye(length // 64, dtype=torch.bool).roll(1, 0)
    calls = {
        "window": lambda: cpu.window_attention_chunked(q, k, v, 32, 1, pad, causal),
        "block": lambda: cpu.block_sparse_attention_gathered(q, k, v, layout, 64, pad, causal),
    }
    for name, call in calls.items():
        with LargestTensor() as seen:
            call()
        assert seen.largest < length * length // 8, f"{name}: a tensor of {seen.largest} elements (L·S = {length * length})"
    with LargestTensor() as seen:  # the dense fallback does build one: the check sees it
        cpu.window_attention_chunked(q, k, v, 32, 1, torch.rand(length, length) > 0.5, causal)
    assert seen.largest >= length * length


def test_pair_counts_and_flops_count_visible_pairs_only():
    for causal in (False, True):
        for lq, lk, window, glob in [(100, 100, 7, 0), (100, 120, 16, 3), (50, 40, 200, 60), (10, 10, 1, 0)]:
            assert window_pair_count(lq, lk, window, glob, causal) == int(window_pattern_keep(lq, lk, window, glob, causal).sum())
        layout = layout_case(3, 70, 90, 16, True)
        keep = block_layout_keep(layout, 16, 70, 90) & (torch.ones(70, 90, dtype=torch.bool).tril() if causal else True)
        assert block_pair_count(layout, 16, 70, 90, 3, causal) == int(keep.sum())

    class Window(torch.nn.Module):
        def forward(self, q, k, v):
            return ops.window_attention.default(q, k, v, 16, 1)

    q, k, v = qkv(2, 4, 4, 256, 256, 32, 32)
    gm = torch.fx.symbolic_trace(Window())
    graphopt.ir.propagate_shapes(gm, (q, k, v))
    pairs = window_pair_count(256, 256, 16, 1, False)
    assert count_flops(gm) == 2 * 2 * 4 * pairs * (32 + 32)
    assert count_flops(gm) < 2 * 2 * 4 * 256 * 256 * 64 // 8


# --- Triton, in the interpreter --------------------------------------------------------------------

_RUN_TRITON = """
import sys, torch
from graphopt.ops.sparse_attention import triton as sparse
from graphopt.ops.sparse_attention import _window_attention_cuda
calls = torch.load(sys.argv[1])
launchers = {"window": sparse.window_attention_triton, "block": sparse.block_sparse_attention_triton,
             "varlen": sparse.varlen_window_attention_triton, "cuda-kernel": _window_attention_cuda}
torch.save({name: launchers[launcher](*args) for name, (launcher, args) in calls.items()}, sys.argv[2])
"""


def _triton_cases():
    q, k, v = qkv(2, 2, 1, 45, 45, 24, 12)
    pad = masks(2, 2, 45, 45)["key-bool"]
    additive = masks(2, 2, 45, 45)["key-additive"]
    layout = layout_case(2, 45, 45, 10, True)
    pq, pk, pv, cu_seqlens = packed([20, 0, 33, 5], 2, 2, 16)
    cases = {
        "window-bidirectional-gqa-pad": ("window", (q, k, v, 9, 2, pad, False, None)),
        "window-causal-additive": ("window", (q, k, v, 6, 1, additive, True, 0.3)),
        "window-mask-hides-later-keys": ("window", (q, k, v, 6, 1, torch.ones(45, 45, dtype=torch.bool).tril() & pad, False, None)),
        "block-per-head-odd-block": ("block", (q, k, v, layout, 10, None, False, None)),
        "block-shared-causal-pad": ("block", (q, k, v, layout[0], 10, pad, True, None)),
        "varlen": ("varlen", (pq, pk, pv, cu_seqlens, 6, 1, None)),
        "fp16-window": ("window", (q.half(), k.half(), v.half(), 9, 2, None, False, None)),
        "cuda-kernel-fp64-falls-back": ("cuda-kernel", (q.double(), k.double(), v.double(), 9, 2, None, False, None)),
    }
    return cases


TRITON_CASES = _triton_cases()


@pytest.fixture(scope="module")
def triton_outputs(interpreted_call):
    pytest.importorskip("triton")
    return interpreted_call(_RUN_TRITON, TRITON_CASES)


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_kernel_matches_reference(triton_outputs, case):
    launcher, args = TRITON_CASES[case]
    if launcher == "varlen":
        expected = varlen_window_attention_reference(*args)
    elif launcher == "block":
        expected = block_sparse_attention_reference(*args)
    else:
        expected = window_attention_reference(*args)
    out = triton_outputs[case]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    tol = {torch.float16: (2e-3, 2e-3), torch.float64: (1e-10, 1e-10)}.get(out.dtype, (1e-5, 1e-5))
    assert_close(out, expected, rtol=tol[0], atol=tol[1])
