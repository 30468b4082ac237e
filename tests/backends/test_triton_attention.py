"""The fused attention kernel, run by the Triton interpreter on CPU, against ATen's SDPA in fp64.

Every case is a region (a GraphModule holding one SDPA call, which pickles) and its inputs, made
here; one subprocess (``TRITON_INTERPRET=1`` must be set before triton is imported) compiles and
runs them all, and the checks run here, against ATen computed in fp64 and rounded to the output's
dtype (the kernel computes in fp32).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch.fx import Graph, GraphModule, Interpreter

import graphopt
from graphopt.tools import zoo
from graphopt.backends.triton_attention import attention_inputs, attention_region, attention_region_source, compile_attention_region
from graphopt.backends.triton_codegen import NotLowerable
from graphopt.ops.flash_attention import triton as flash
from graphopt.ir import aten, op_nodes
from graphopt.testing import assert_close
from tests_helpers import Fn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDPA = aten.scaled_dot_product_attention.default


def region(mask: bool = False, **constants) -> GraphModule:
    """A region of one SDPA call: placeholders query, key, value (and attn_mask), constants as given."""
    graph = Graph()
    tensors = [graph.placeholder(name) for name in ("query", "key", "value", "attn_mask")[: 4 if mask else 3]]
    graph.output(graph.call_function(SDPA, tuple(tensors[:3]), {"attn_mask": tensors[3] if mask else None, **constants}))
    return GraphModule(torch.nn.Module(), graph)


def reference(gm: GraphModule, inputs: list) -> torch.Tensor:
    """ATen's SDPA in fp64, rounded to the query's dtype."""
    return gm(*[x.double() if x.is_floating_point() else x for x in inputs]).to(inputs[0].dtype)


_RUN_ATTENTION = """
import sys, torch
from graphopt.backends.triton_attention import compile_attention_region
cases = torch.load(sys.argv[1], weights_only=False)
torch.save({name: compile_attention_region(gm)(*inputs) for name, (gm, inputs) in cases.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def run_attention(interpreted_call):
    """``run({name: (region, inputs)}) -> {name: output}`` in one interpreted subprocess."""
    return lambda cases: interpreted_call(_RUN_ATTENTION, cases)


def assert_matches(gm, inputs, out):
    expected = reference(gm, inputs)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected)


# --- cases ------------------------------------------------------------------------------------


def _qkv(batch, heads, lq, lk, d, dtype, dv=None):
    return [torch.randn(batch, heads, length, width).to(dtype) for length, width in ((lq, d), (lk, d), (lk, dv or d))]


def _layout_cases(dtype):
    """{name: (region, inputs)} for one dtype: every variant, odd lengths and head dims, layouts."""
    cases = {
        "plain-d24": (region(), _qkv(1, 2, 33, 33, 24, dtype)),
        "causal-square": (region(is_causal=True), _qkv(1, 2, 33, 33, 8, dtype)),
        "causal-lq-lt-lk": (region(is_causal=True), _qkv(1, 2, 7, 20, 8, dtype)),
        "causal-lq-gt-lk": (region(is_causal=True), _qkv(1, 2, 20, 7, 8, dtype)),
        "explicit-scale": (region(scale=0.3), _qkv(1, 1, 17, 9, 16, dtype)),
        "length-1": (region(), _qkv(2, 1, 1, 1, 8, dtype)),
        "value-dim-differs": (region(), _qkv(1, 2, 9, 18, 8, dtype, dv=12)),
        "gqa-4q-2kv": (region(enable_gqa=True), [torch.randn(1, 4, 9, 8).to(dtype), *_qkv(1, 2, 11, 11, 8, dtype)[1:]]),
    }
    bool_mask = torch.rand(9, 18) > 0.4
    bool_mask[:, 0] = True
    bool_mask[4] = False  # a fully masked row
    cases["bool-mask"] = (region(mask=True), [*_qkv(1, 2, 9, 18, 8, dtype), bool_mask])
    additive = torch.randn(1, 2, 9, 18)
    additive[0, 1, :, 3:7] = float("-inf")
    additive[0, 0, 2] = float("-inf")  # a fully masked row
    cases["additive-mask"] = (region(mask=True), [*_qkv(1, 2, 9, 18, 8, dtype), additive.to(dtype)])
    padding = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    padding[1, ..., 13:] = False  # BERT's padding mask: [B, 1, 1, Lk], broadcast over heads and rows
    cases["broadcast-padding-mask"] = (region(mask=True), [*_qkv(2, 2, 20, 20, 8, dtype), padding])
    # Hugging Face layout: [B, L, H, D] projections viewed as [B, H, L, D] (permuted strides).
    q, k, v = (torch.randn(2, length, 2, 8).to(dtype).transpose(1, 2) for length in (13, 21, 21))
    cases["permuted-qkv"] = (region(scale=0.5), [q, k, v])
    cases["3d-with-mask"] = (region(mask=True), [*(torch.randn(3, 7, 8).to(dtype) for _ in range(3)), torch.randn(7, 7).to(dtype)])
    cases["3d-causal"] = (region(is_causal=True), [torch.randn(3, 7, 8).to(dtype) for _ in range(3)])
    return cases


def _model_regions():
    """Regions cut out of captured graphs by ``attention_region``, with the values reaching them."""

    def sdpa_inputs(gm, inputs):
        node = op_nodes(gm, aten.scaled_dot_product_attention)[0]
        values = {}

        class Recorder(Interpreter):
            def run_node(self, n):
                values[n] = super().run_node(n)
                return values[n]

        Recorder(gm).run(*inputs)
        return attention_region(node), [values[n] for n in attention_inputs(node)], values[node]

    entry = zoo.load("preln-tiny")
    canonical = graphopt.optimize(entry.model, ["canonicalize"], entry.example_inputs).graph_module
    regions = {"preln-tiny": sdpa_inputs(canonical, entry.example_inputs)}

    def causal_from_hf_layout(q, k, v):  # [B, L, H, D] tensors, as Hugging Face models project them
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

    qkv = tuple(torch.randn(1, 11, 2, 8) for _ in range(3))
    regions["causal-module"] = sdpa_inputs(graphopt.capture(Fn(causal_from_hf_layout), qkv), qkv)
    return regions


def _cases():
    torch.manual_seed(0)
    return {f"{name}-{dtype_name}": case for dtype_name, dtype in DTYPES.items() for name, case in _layout_cases(dtype).items()}


CASES = _cases()
MODEL_REGIONS = _model_regions()


@pytest.fixture(scope="module")
def outputs(run_attention):
    return run_attention({**CASES, **{name: (gm, inputs) for name, (gm, inputs, _) in MODEL_REGIONS.items()}})


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_aten(outputs, case):
    gm, inputs = CASES[case]
    assert_matches(gm, inputs, outputs[case])


def test_fully_masked_rows_are_zeros_as_in_aten(outputs):
    for dtype_name in DTYPES:
        bool_case, additive_case = f"bool-mask-{dtype_name}", f"additive-mask-{dtype_name}"
        assert outputs[bool_case][0, :, 4].eq(0).all() and outputs[additive_case][0, 0, 2].eq(0).all()
        gm, inputs = CASES[bool_case]
        assert gm(*[x.float() if x.is_floating_point() else x for x in inputs])[0, :, 4].eq(0).all()  # ATen fp32 too
        assert outputs[bool_case][0, :, 3].abs().sum() > 0


@pytest.mark.parametrize("name", ["preln-tiny", "causal-module"])
def test_regions_of_captured_graphs(outputs, name):
    gm, inputs, in_model = MODEL_REGIONS[name]
    assert_matches(gm, inputs, outputs[name])
    assert_close(outputs[name], in_model)


def test_attention_region_holds_the_call_alone():
    gm, inputs, _ = MODEL_REGIONS["preln-tiny"]
    placeholders = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    assert placeholders == ["query", "key", "value", "attn_mask"]
    (call,) = op_nodes(gm, aten.scaled_dot_product_attention)
    assert call.kwargs["scale"] == 0.25 and call.kwargs["is_causal"] is False
    assert inputs[3].shape == (2, 1, 1, 16) and inputs[3].dtype == torch.float32  # BERT-style additive padding mask
    gm, inputs, _ = MODEL_REGIONS["causal-module"]
    (call,) = op_nodes(gm, aten.scaled_dot_product_attention)
    assert call.kwargs["is_causal"] is True and len(inputs) == 3 and not inputs[0].is_contiguous()


# --- random shapes ----------------------------------------------------------------------------


@st.composite
def random_attention(draw):
    """One region and inputs: random lengths and head dims (tails), variant, mask broadcast, layout."""
    batch, heads = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2), (1, 4)]))
    lq, lk, d, dv = (draw(st.integers(1, 40)) for _ in range(4))
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    variant = draw(st.sampled_from(["none", "causal", "bool", "additive"]))
    scale = draw(st.sampled_from([None, 0.2]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def tensor(shape, transposed):  # transposed: stored [B, L, H, ·], viewed [B, H, L, ·]
        if transposed:
            return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=generator).to(dtype).transpose(1, 2)
        return torch.randn(shape, generator=generator).to(dtype)

    transposed = draw(st.booleans())
    inputs = [tensor((batch, heads, length, width), transposed) for length, width in ((lq, d), (lk, d), (lk, dv))]
    if variant in ("none", "causal"):
        return region(is_causal=variant == "causal", scale=scale), inputs
    mask_shape = [size if draw(st.booleans()) else 1 for size in (batch, heads, lq, lk)][draw(st.integers(0, 2)) :]
    mask = torch.rand(mask_shape, generator=generator) > 0.3 if variant == "bool" else torch.randn(mask_shape, generator=generator).to(dtype)
    return region(mask=True, scale=scale), [*inputs, mask]


@settings(max_examples=2, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking reruns the subprocess: far too slow
@given(st.lists(random_attention(), min_size=12, max_size=12))
def test_random_shapes_match_aten(run_attention, cases):
    outputs = run_attention({f"case{k}": case for k, case in enumerate(cases)})
    for k, (gm, inputs) in enumerate(cases):
        assert_matches(gm, inputs, outputs[f"case{k}"])


# --- generation and refusals (no kernel runs) -------------------------------------------------


def test_variants_are_constexpr_switches_of_one_kernel():
    """One static kernel: the variants are its ``tl.constexpr`` arguments, not generated lines."""
    source = flash.kernel_source()
    assert source.count("@triton.jit") == 1 and source.count("tl.store(") == 1 and source.count("tl.dot(") == 2
    assert source.count("input_precision=INPUT_PRECISION") == 2
    for switch in ("CAUSAL", "MASK_KIND", "VARLEN", "INPUT_PRECISION"):
        assert f"{switch}: tl.constexpr" in source
    assert "tl.minimum(start_m + BLOCK_M, Lk)" in source and "cols[None, :] <= rows[:, None]" in source
    assert 'if MASK_KIND == "bool":' in source and 'if MASK_KIND == "additive":' in source and "s += tl.load(mask_ptrs" in source
    shown = attention_region_source(region(is_causal=True))
    assert "CAUSAL=True, MASK_KIND='none'" in shown and shown.endswith(source)


def _recorded_launch(monkeypatch, gm, inputs):
    """The kernel constexprs ``compile_attention_region(gm)(*inputs)`` launches with (nothing runs)."""
    launches = []
    monkeypatch.setattr(flash, "interpreted", lambda: True)
    monkeypatch.setattr(flash, "_launch", lambda rows, pairs, *args, **constexprs: launches.append(constexprs))
    compile_attention_region(gm)(*inputs)
    (constexprs,) = launches
    return constexprs


@pytest.mark.parametrize(
    ("gm", "mask", "dtype", "expected"),
    [
        (region(), None, torch.float32, (False, "none", "ieee")),
        (region(is_causal=True), None, torch.float32, (True, "none", "ieee")),
        (region(mask=True), torch.bool, torch.float16, (False, "bool", "tf32")),
        (region(mask=True), torch.bfloat16, torch.bfloat16, (False, "additive", "tf32")),
    ],
)
def test_launch_picks_the_variant(monkeypatch, gm, mask, dtype, expected):
    inputs = [torch.randn(1, 2, 5, 8, dtype=dtype)] * 3 + ([torch.ones(5, 5, dtype=mask)] if mask else [])
    constexprs = _recorded_launch(monkeypatch, gm, inputs)
    assert (constexprs["CAUSAL"], constexprs["MASK_KIND"], constexprs["INPUT_PRECISION"]) == expected and constexprs["VARLEN"] is False
    assert constexprs["BLOCK_D"] == 16 and constexprs["BLOCK_DV"] == 16


def test_autotuner_is_built_once_and_tunes_each_variant_apart():
    assert flash.autotuned_kernel() is flash.autotuned_kernel()
    assert {"CAUSAL", "MASK_KIND", "VARLEN", "INPUT_PRECISION"} <= set(flash.autotuned_kernel().keys)


@pytest.mark.parametrize(
    ("gm", "message"),
    [
        (region(dropout_p=0.1), "dropout_p=0.1"),
        (region(mask=True, is_causal=True), "attn_mask together with is_causal"),
    ],
)
def test_unsupported_constants_are_refused_at_generation(gm, message):
    with pytest.raises(NotLowerable, match=message):
        compile_attention_region(gm)


def test_region_of_other_ops_is_refused():
    graph = Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(aten.softmax.int, (x, -1)))
    with pytest.raises(NotLowerable, match="not one"):
        compile_attention_region(GraphModule(torch.nn.Module(), graph))


@pytest.mark.parametrize(
    ("gm", "inputs", "message"),
    [
        (region(), [torch.randn(4, 8)] * 3, "ranks"),
        (region(), [torch.randn(1, 2, 4, 8, dtype=torch.float64)] * 3, "dtypes"),
        (region(), [torch.randn(1, 4, 5, 8), *[torch.randn(1, 2, 5, 8)] * 2], "differ in batch or heads"),
        (region(enable_gqa=True), [torch.randn(1, 3, 5, 8), *[torch.randn(1, 2, 5, 8)] * 2], "differ in batch or heads"),
        (region(mask=True), [*[torch.randn(1, 2, 5, 8)] * 3, torch.ones(3, 5, dtype=torch.bool)], "does not broadcast"),
        (region(), [torch.randn(1, 2, 5, 8)] * 3, "cpu tensors"),
    ],
)
def test_unsupported_inputs_are_refused_before_launching(monkeypatch, gm, inputs, message):
    monkeypatch.setattr(flash, "interpreted", lambda: False)
    with pytest.raises(NotLowerable, match=message):
        compile_attention_region(gm)(*inputs)
