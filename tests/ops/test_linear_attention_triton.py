"""The linear-attention Triton kernels, run by the Triton interpreter on CPU, against the reference.

Every case's inputs are made here; one subprocess (``TRITON_INTERPRET=1`` must be set before triton
is imported; see tests/conftest.py) runs the launcher on all of them, and each test compares one
output with :func:`~graphopt.ops.linear_attention.reference.linear_attention_reference` computed in
this process, the key weights given to it as the additive mask ``log w``. Shapes are odd on purpose
(``L``, ``S`` not multiples of the interpreter's blocks and chunks of 16, ``F != Dv``, dims over
``MAX_TILE``) and small (the interpreter runs every program in numpy).
"""

import pytest
import torch

pytest.importorskip("triton")

from graphopt.ops.linear_attention import triton as linear_triton  # noqa: E402
from graphopt.ops.linear_attention.reference import linear_attention_reference  # noqa: E402
from graphopt.ops.triton_runtime import NotLowerable  # noqa: E402
from graphopt.testing import assert_close  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_RUN_LAUNCHER = """
import sys, torch
from graphopt.ops.linear_attention.triton import linear_attention_triton
calls = torch.load(sys.argv[1])
results = {}
for name, (args, kwargs) in calls.items():
    strides = [t.stride() if t is not None else None for t in args]  # what the launcher was given, views included
    results[name] = (linear_attention_triton(*args, **kwargs), strides)
torch.save(results, sys.argv[2])
"""


def make_case(batch=2, heads=2, kv_heads=2, length_q=70, length_k=70, features=24, dv=40, dtype=torch.float32, pads=None, strided=False, seed=0, **kwargs):
    """``((fq, fk, v, key_weights), kwargs)``: non-negative features, random values; ``pads``
    ``[pads of batch 0, ...]`` zero-weight keys at the end of each batch element (holding large
    values, which must not leak), else no weights (``pads=None``); ``strided``: the tensors are the
    ``[B, L, H, D] -> [B, H, L, D]`` views of Hugging Face models and the weights a column slice."""
    gen = torch.Generator().manual_seed(seed)

    def tensor(heads_, length, width, values):
        shape = (batch, length, heads_, width) if strided else (batch, heads_, length, width)
        t = torch.rand(*shape, generator=gen) if values == "features" else torch.randn(*shape, generator=gen)
        t = t.to(dtype)
        return t.transpose(1, 2) if strided else t

    fq, fk, v = tensor(heads, length_q, features, "features"), tensor(kv_heads, length_k, features, "features"), tensor(kv_heads, length_k, dv, "values")
    weights = None
    if pads is not None:
        weights = torch.rand(batch, 2 * length_k if strided else length_k, generator=gen) + 0.5
        weights = weights[:, ::2] if strided else weights
        for b, count in enumerate(pads):
            if count:
                weights[b, length_k - count :] = 0.0
                fk[b, :, length_k - count :] = 30.0  # garbage behind the pads: zero weight must cancel it exactly
                v[b, :, length_k - count :] = -1000.0
    return (fq, fk, v, weights), kwargs


def _cases():
    cases = {}
    for is_causal in (False, True):
        kind = "causal" if is_causal else "bidirectional"
        cases[f"{kind}-fp32"] = make_case(is_causal=is_causal)
        cases[f"{kind}-key-weights-pads"] = make_case(pads=[0, 23], seed=1, is_causal=is_causal)
        cases[f"{kind}-gqa"] = make_case(batch=1, heads=4, kv_heads=2, length_q=37, length_k=37, pads=[5], seed=2, is_causal=is_causal)
        cases[f"{kind}-strided-views"] = make_case(length_q=33, length_k=33, pads=[3, 0], strided=True, seed=3, is_causal=is_causal)
        cases[f"{kind}-wide-f72-dv80"] = make_case(batch=1, heads=1, kv_heads=1, length_q=35, length_k=35, features=72, dv=80, seed=4, is_causal=is_causal)
        for dtype_name in ("fp16", "bf16"):
            cases[f"{kind}-{dtype_name}"] = make_case(batch=1, length_q=40, length_k=40, dtype=DTYPES[dtype_name], pads=[7], seed=5, is_causal=is_causal)
        cases[f"{kind}-no-keys"] = make_case(batch=1, heads=1, kv_heads=1, length_q=5, length_k=0, pads=[0], is_causal=is_causal)
    cases["bidirectional-fewer-keys"] = make_case(batch=1, length_q=21, length_k=50, seed=6)
    cases["causal-more-queries-than-keys"] = make_case(batch=1, length_q=40, length_k=23, seed=7, is_causal=True)
    cases["causal-fewer-queries-than-keys"] = make_case(batch=1, length_q=20, length_k=50, seed=8, is_causal=True)
    cases["bidirectional-every-key-a-pad"] = make_case(batch=1, heads=1, kv_heads=1, length_q=9, length_k=9, pads=[9], eps=1e-3)
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def outputs(interpreted_call):
    return interpreted_call(_RUN_LAUNCHER, CASES)


def reference(args, kwargs):
    fq, fk, v, weights = args
    mask = None if weights is None else weights.log()[:, None, None, :]
    return linear_attention_reference(fq, fk, v, attn_mask=mask, **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_kernels_match_the_reference(outputs, case):
    args, kwargs = CASES[case]
    out, _ = outputs[case]
    expected = reference(args, kwargs)
    assert out.dtype == args[2].dtype and out.shape == expected.shape and out.is_contiguous()
    assert_close(out, expected)  # both in fp32; the kernels sum in another order


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
def test_pads_contribute_nothing(outputs, kind):
    """Batch element 1 has 23 pads of large keys and values: its output is that of its 47 real keys alone."""
    (fq, fk, v, weights), kwargs = CASES[f"{kind}-key-weights-pads"]
    out, _ = outputs[f"{kind}-key-weights-pads"]
    real = fk.shape[2] - 23
    alone = linear_attention_reference(fq[1:], fk[1:, :, :real], v[1:, :, :real], attn_mask=weights[1:, :real].log()[:, None, None, :], **kwargs)
    assert_close(out[1:], alone)


def test_a_row_without_keys_is_zero(outputs):
    for name in ("bidirectional-no-keys", "causal-no-keys", "bidirectional-every-key-a-pad"):
        out, _ = outputs[name]
        assert not out.any(), name


def test_strided_cases_reach_the_launcher_as_views(outputs):
    """The transposed views travel to the subprocess as views (``torch.save`` keeps strides) and are read in place."""
    (fq, _, _, weights), _ = CASES["causal-strided-views"]
    assert not fq.is_contiguous() and weights.stride() == (66, 2)
    _, strides = outputs["causal-strided-views"]
    assert strides[0] == fq.stride() and strides[3] == (66, 2)


# --- launches and refusals (no kernel runs) ---------------------------------------------------


def _recorded_launches(monkeypatch, *args, **kwargs):
    """``[(kernel, grid, constexprs)]`` the launcher makes (nothing runs)."""
    launches = []
    monkeypatch.setattr(linear_triton, "interpreted", lambda: True)
    monkeypatch.setattr(linear_triton, "_launch", lambda kernel, tuned, blocks, grid, *a, **constexprs: launches.append((kernel, grid, constexprs)))
    linear_triton.linear_attention_triton(*args, **kwargs)
    return launches


def test_launcher_picks_the_kernels_and_their_variants(monkeypatch):
    (fq, fk, v, weights), _ = make_case(batch=1, heads=4, kv_heads=2, length_q=20, length_k=20, features=72, dv=130, pads=[3])
    (state, state_grid, state_constexprs), (output, _, output_constexprs) = _recorded_launches(monkeypatch, fq, fk, v, weights)
    assert state is linear_triton.linear_attention_state_kernel and output is linear_triton.linear_attention_output_kernel
    assert state_grid == (2, 3, 2)  # F in 2 tiles of 64, Dv in 3, one program per key head
    assert state_constexprs == {"HAS_WEIGHTS": True, "INPUT_PRECISION": "ieee", "BLOCK_F": 64, "BLOCK_DV": 64}
    assert output_constexprs == {"INPUT_PRECISION": "ieee", "BLOCK_F": 64, "BLOCK_DV": 64}
    [(causal, causal_grid, causal_constexprs)] = _recorded_launches(monkeypatch, fq.half(), fk.half(), v.half(), is_causal=True)
    assert causal is linear_triton.causal_linear_attention_kernel and causal_grid == (3, 4)
    assert causal_constexprs == {"HAS_WEIGHTS": False, "INPUT_PRECISION": "tf32", "BLOCK_F": 128, "BLOCK_DV": 64}


def _inputs(**overrides):
    args = {"fq": torch.rand(2, 4, 5, 8), "fk": torch.rand(2, 2, 6, 8), "v": torch.randn(2, 2, 6, 12), "key_weights": None}
    return {**args, **overrides}


REFUSALS = {
    "fp64": (_inputs(v=torch.randn(2, 2, 6, 12, dtype=torch.float64)), "v of dtype torch.float64"),
    "3-d": (_inputs(fq=torch.rand(2, 5, 8)), "4-D"),
    "features-over-256": (_inputs(fq=torch.rand(1, 1, 5, 257), fk=torch.rand(1, 1, 6, 257), v=torch.randn(1, 1, 6, 12)), "at most 256"),
    "values-over-256": (_inputs(v=torch.randn(2, 2, 6, 300)), "at most 256"),
    "no-features": (_inputs(fq=torch.rand(2, 4, 5, 0), fk=torch.rand(2, 2, 6, 0)), "feature dim 0"),
    "heads-do-not-divide": (_inputs(fk=torch.rand(2, 3, 6, 8), v=torch.randn(2, 3, 6, 12)), "do not divide"),
    "feature-mismatch": (_inputs(fk=torch.rand(2, 2, 6, 9)), "do not fit"),
    "value-length-mismatch": (_inputs(v=torch.randn(2, 2, 7, 12)), "do not fit"),
    "weights-per-head": (_inputs(key_weights=torch.rand(2, 1, 6)), "key_weights"),
    "bool-weights": (_inputs(key_weights=torch.ones(2, 6, dtype=torch.bool)), "key_weights"),
    "infinite-eps": ({**_inputs(), "eps": float("inf")}, "eps"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_inputs_the_kernels_do_not_take_are_refused_before_launching(monkeypatch, case):
    monkeypatch.setattr(linear_triton, "interpreted", lambda: True)  # CPU tensors pass the device check
    kwargs, message = REFUSALS[case]
    with pytest.raises(NotLowerable, match=message):
        linear_triton.linear_attention_triton(**kwargs)


def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(linear_triton, "interpreted", lambda: False)
    with pytest.raises(NotLowerable, match="cpu tensors"):
        linear_triton.linear_attention_triton(**_inputs())
