"""Generated pointwise Triton kernels, run by the Triton interpreter on CPU, against ATen.

A region is described by a *program* (``{"inputs": n, "steps": [(op, args, kwargs)], "outputs":
[...]}``; ``"%k"`` names value ``k``: inputs first, then one value per step) so that one subprocess
(``TRITON_INTERPRET=1`` must be set before triton is imported) can rebuild every case's graph with
:func:`build`, compile it, run it, and send the outputs back; the checks run here, against ATen in
fp64 rounded to the output's dtype.
"""

from pathlib import Path

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from aten_programs import build, reference

from graphopt.backends import triton_codegen
from graphopt.backends.triton_codegen import NotLowerable, compile_region, region_source
from graphopt.ir import count_ops
from graphopt.testing import assert_close

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


_RUN_REGIONS = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from aten_programs import build
from graphopt.backends.triton_codegen import compile_region
cases = torch.load(sys.argv[1])
outputs = {}
for name, (program, inputs) in cases.items():
    out = compile_region(build(program))(*inputs)
    outputs[name] = [out] if isinstance(out, torch.Tensor) else list(out)
torch.save(outputs, sys.argv[2])
"""


@pytest.fixture(scope="module")
def run_regions(interpreted_call):
    """``run({name: (program, inputs)}) -> {name: [outputs]}`` in one interpreted subprocess."""
    return lambda cases: interpreted_call(_RUN_REGIONS, cases, str(Path(__file__).parent))


def assert_matches(program, inputs, outputs, contiguous=True):
    expected = reference(build(program), inputs)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert out.dtype == ref.dtype and out.shape == ref.shape and (out.is_contiguous() or not contiguous)
        assert_close(out, ref, equal_nan=True)


# --- one case per lowering rule, dtype and layout ---------------------------------------------


def _values(shape, domain, dtype):
    if domain == "positive":
        x = torch.rand(shape) * 3 + 0.1
    elif domain == "small_ints":  # comparisons need ties
        x = torch.randint(-2, 3, shape).float()
    elif domain == "away_from_zero":
        x = (torch.rand(shape) + 0.5) * torch.randn(shape).sign()
    else:
        x = torch.randn(shape) * 2
    return x.to(dtype)


def _unary_layouts(domain, dtype):
    """A permuted 3-D input with a size-1 dim, and a contiguous one spanning two blocks (ragged)."""
    return {
        "permuted": [_values((5, 1, 7), domain, dtype).permute(2, 1, 0)],
        "two-blocks": [_values((11, 101), domain, dtype)],
    }


def _binary_layouts(domain, dtype):
    """Broadcast against a transposed input, and two contiguous inputs of one odd shape."""
    return {
        "broadcast-transposed": [_values((4, 1, 6), domain, dtype), _values((6, 3), domain, dtype).t()],
        "same-shape": [_values((3, 37), domain, dtype), _values((3, 37), domain, dtype)],
    }


UNARY = {  # name: (op, extra args, kwargs, domain)
    "neg": ("neg.default", (), {}, "any"),
    "abs": ("abs.default", (), {}, "any"),
    "exp": ("exp.default", (), {}, "any"),
    "log": ("log.default", (), {}, "positive"),
    "sqrt": ("sqrt.default", (), {}, "positive"),
    "rsqrt": ("rsqrt.default", (), {}, "positive"),
    "pow0": ("pow.Tensor_Scalar", (0,), {}, "any"),
    "pow1": ("pow.Tensor_Scalar", (1,), {}, "any"),
    "pow2": ("pow.Tensor_Scalar", (2,), {}, "any"),
    "pow3": ("pow.Tensor_Scalar", (3,), {}, "any"),
    "pow5": ("pow.Tensor_Scalar", (5,), {}, "away_from_zero"),
    "pow-1": ("pow.Tensor_Scalar", (-1,), {}, "away_from_zero"),
    "pow-2": ("pow.Tensor_Scalar", (-2.0,), {}, "away_from_zero"),
    "pow0.5": ("pow.Tensor_Scalar", (0.5,), {}, "positive"),
    "pow1.7": ("pow.Tensor_Scalar", (1.7,), {}, "positive"),
    "relu": ("relu.default", (), {}, "any"),
    "reciprocal": ("reciprocal.default", (), {}, "away_from_zero"),
    "sin": ("sin.default", (), {}, "any"),
    "cos": ("cos.default", (), {}, "any"),
    "erf": ("erf.default", (), {}, "any"),
    "logical_not": ("logical_not.default", (), {}, "small_ints"),
    "sigmoid": ("sigmoid.default", (), {}, "any"),
    "tanh": ("tanh.default", (), {}, "any"),
    "silu": ("silu.default", (), {}, "any"),
    "gelu": ("gelu.default", (), {}, "any"),
    "gelu-tanh": ("gelu.default", (), {"approximate": "tanh"}, "any"),
    "clamp": ("clamp.default", (-0.5, 0.7), {}, "any"),
    "clamp-max-only": ("clamp.default", (), {"max": 0.25}, "any"),
    "clamp_min": ("clamp_min.default", (0.1,), {}, "any"),
    "clamp_max": ("clamp_max.default", (-0.1,), {}, "any"),
    "add-scalar": ("add.Scalar", (1.5,), {"alpha": 2}, "any"),
    "sub-scalar": ("sub.Scalar", (3,), {}, "any"),
    "rsub-scalar": ("rsub.Scalar", (1.0,), {"alpha": 0.5}, "any"),
    "mul-scalar": ("mul.Scalar", (-0.75,), {}, "any"),
    "div-scalar": ("div.Scalar", (3,), {}, "any"),
    "to_copy-fp16": ("_to_copy.default", (), {"dtype": "torch.float16"}, "any"),
    "to_copy-bf16": ("_to_copy.default", (), {"dtype": "torch.bfloat16"}, "any"),
    "to_copy-fp32": ("_to_copy.default", (), {"dtype": "torch.float32"}, "any"),
    "to_copy-int32": ("_to_copy.default", (), {"dtype": "torch.int32"}, "any"),
    "to_copy-bool": ("_to_copy.default", (), {"dtype": "torch.bool"}, "small_ints"),
    "to-dtype-fp16": ("to.dtype", ("torch.float16",), {}, "any"),
    "to-dtype-layout-fp16": ("to.dtype_layout", (), {"dtype": "torch.float16"}, "any"),
    "to-same-device-bf16": ("to.device", ("cpu", "torch.bfloat16"), {}, "any"),
    "dropout-eval": ("dropout.default", (0.5, False), {}, "any"),
}
BINARY = {
    "add": ("add.Tensor", {"alpha": 2}, "any"),
    "sub": ("sub.Tensor", {}, "any"),
    "mul": ("mul.Tensor", {}, "any"),
    "div": ("div.Tensor", {}, "away_from_zero"),
    "clamp-tensor-min": ("clamp.Tensor", {}, "any"),
    "maximum": ("maximum.default", {}, "any"),
    "minimum": ("minimum.default", {}, "any"),
    "logical_and": ("logical_and.default", {}, "small_ints"),
    "logical_or": ("logical_or.default", {}, "small_ints"),
}
for _cmp in ("lt", "gt", "le", "ge", "eq", "ne"):
    UNARY[f"{_cmp}-scalar"] = (f"{_cmp}.Scalar", (1,), {}, "small_ints")
    BINARY[_cmp] = (f"{_cmp}.Tensor", {}, "small_ints")


def _rule_cases():
    torch.manual_seed(0)
    cases = {}
    for dtype_name, dtype in DTYPES.items():
        for name, (op, extra, kwargs, domain) in UNARY.items():
            program = {"inputs": 1, "steps": [(op, ("%0", *extra), kwargs)], "outputs": [1]}
            for layout, inputs in _unary_layouts(domain, dtype).items():
                cases[f"{name}-{dtype_name}-{layout}"] = (program, inputs)
        for name, (op, kwargs, domain) in BINARY.items():
            program = {"inputs": 2, "steps": [(op, ("%0", "%1"), kwargs)], "outputs": [2]}
            for layout, inputs in _binary_layouts(domain, dtype).items():
                cases[f"{name}-{dtype_name}-{layout}"] = (program, inputs)
        where = {"inputs": 3, "steps": [("where.self", ("%0", "%1", "%2"), {})], "outputs": [3]}
        cases[f"where-{dtype_name}"] = (where, [torch.rand(1, 6) > 0.5, _values((4, 3, 6), "any", dtype), _values((3, 1), "any", dtype)])
        where_scalar = {"inputs": 2, "steps": [("gt.Scalar", ("%0", 0), {}), ("where.ScalarOther", ("%2", "%1", 0.0), {})], "outputs": [3]}
        cases[f"where-scalar-other-{dtype_name}"] = (where_scalar, [_values((2, 5), "any", dtype), _values((5,), "any", dtype)])
    # A fused chain with two outputs of different dtypes, inputs of mixed dtypes, over 5-D shapes
    # that collapse to fewer dimensions (the trailing three are contiguous in every operand).
    chain = {
        "inputs": 3,
        "steps": [
            ("mul.Tensor", ("%0", "%1"), {}),
            ("add.Tensor", ("%3", "%2"), {}),
            ("gelu.default", ("%4",), {}),
            ("gt.Scalar", ("%5", 0.1), {}),
            ("_to_copy.default", ("%5",), {"dtype": "torch.float16"}),
        ],
        "outputs": [7, 6],
    }
    cases["chain-two-outputs-5d"] = (chain, [torch.randn(2, 3, 4, 5, 6), torch.randn(3, 1, 1, 1).bfloat16(), torch.randn(4, 5, 6).half()])
    # Views: reshapes of computed values are identities on the flat index; views of inputs run in
    # torch before the launch (no copy); a value smaller than the output is broadcast by recomputing.
    between = {"inputs": 2, "steps": [("add.Tensor", ("%0", "%1"), {}), ("view.default", ("%2", [6, 4]), {}), ("relu.default", ("%3",), {})], "outputs": [4, 3]}
    cases["reshape-between-ops"] = (between, [torch.randn(2, 3, 4), torch.randn(4)])
    input_views = {
        "inputs": 2,
        "steps": [
            ("permute.default", ("%0", [1, 0]), {}),
            ("unsqueeze.default", ("%1", -1), {}),
            ("mul.Tensor", ("%2", "%3"), {}),
            ("exp.default", ("%4",), {}),
        ],
        "outputs": [5],
    }
    cases["views-of-inputs"] = (input_views, [torch.randn(4, 6).half(), torch.randn(6)])
    later = {"inputs": 2, "steps": [("mul.Scalar", ("%0", 2.0), {}), ("add.Tensor", ("%2", "%1"), {})], "outputs": [3]}
    cases["small-value-broadcast-later"] = (later, [torch.randn(5), torch.randn(3, 5)])
    # An expand of a computed value (an attention mask built from a row and broadcast) is computed
    # at every element of the broadcast; an expanded value returned is an expand of the kernel's.
    expand_mid = {
        "inputs": 2,
        "steps": [("gt.Scalar", ("%0", 0), {}), ("expand.default", ("%2", [3, 5]), {}), ("where.ScalarOther", ("%3", "%1", -1.0), {})],
        "outputs": [4],
    }
    cases["expand-of-computed"] = (expand_mid, [torch.randn(1, 5), torch.randn(3, 5)])
    expand_out = {"inputs": 1, "steps": [("exp.default", ("%0",), {}), ("expand.default", ("%1", [2, 4]), {})], "outputs": [2]}
    cases["expanded-output"] = (expand_out, [torch.randn(4)])
    masks = [torch.rand(3, 6) > 0.5, torch.rand(6) > 0.3]
    for name in ("bitwise_and.Tensor", "__and__.Tensor", "bitwise_or.Tensor", "__or__.Tensor"):
        cases[f"bool-{name}"] = ({"inputs": 2, "steps": [(name, ("%0", "%1"), {})], "outputs": [2]}, masks)
    cases["bool-bitwise_not"] = ({"inputs": 1, "steps": [("bitwise_not.default", ("%0",), {})], "outputs": [1]}, masks[:1])
    cases["input-passed-through"] = ({"inputs": 2, "steps": [("exp.default", ("%0",), {})], "outputs": [2, 0]}, [torch.randn(3, 4), torch.randn(4)])
    return cases


CASES = _rule_cases()


@pytest.fixture(scope="module")
def outputs(run_regions):
    return run_regions(CASES)


@pytest.mark.parametrize("case", CASES)
def test_lowering_matches_aten(outputs, case):
    program, inputs = CASES[case]
    assert_matches(program, inputs, outputs[case], contiguous=case != "expanded-output")  # an expand is a view, as in ATen


def test_every_lowering_rule_is_exercised():
    targets = {node.target for program, _ in CASES.values() for node in build(program).graph.nodes if node.op == "call_function"}
    assert set(triton_codegen.LOWERINGS) - targets == set()


# --- random chains ----------------------------------------------------------------------------

_CHAIN_UNARY = [
    ("neg.default", ()),
    ("abs.default", ()),
    ("sigmoid.default", ()),
    ("tanh.default", ()),
    ("silu.default", ()),
    ("gelu.default", ()),
    ("relu.default", ()),
    ("mul.Scalar", (0.5,)),
    ("clamp.default", (-1.0, 1.0)),
]
_CHAIN_BINARY = ["add.Tensor", "sub.Tensor", "mul.Tensor", "maximum-by-where"]


@st.composite
def random_region(draw):
    """Two inputs, the second broadcasting into the (possibly permuted) first, and a random chain
    whose last step adds the first step's value, so the output has the full shape."""
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 7), min_size=rank, max_size=rank))
    order = draw(st.permutations(range(rank)))
    small = [size if draw(st.booleans()) else 1 for size in shape[draw(st.integers(0, rank - 1)) :]]
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    seed = draw(st.integers(0, 2**16))
    first_op, first_extra = draw(st.sampled_from(_CHAIN_UNARY))
    steps = [(first_op, ("%0", *first_extra), {})]
    floats = [0, 1, 2]  # the values a step may take (the comparisons' masks are not among them)
    for _ in range(draw(st.integers(0, 5))):
        values = 2 + len(steps)
        a, b = (f"%{draw(st.sampled_from(floats))}" for _ in range(2))
        if draw(st.booleans()):
            op, extra = draw(st.sampled_from(_CHAIN_UNARY))
            steps.append((op, (a, *extra), {}))
        elif (op := draw(st.sampled_from(_CHAIN_BINARY))) == "maximum-by-where":
            steps.append(("gt.Tensor", (a, b), {}))
            steps.append(("where.self", (f"%{values}", a, b), {}))
        else:
            steps.append((op, (a, b), {}))
        floats.append(1 + len(steps))
    steps.append(("add.Tensor", (f"%{1 + len(steps)}", "%2"), {}))
    program = {"inputs": 2, "steps": steps, "outputs": [1 + len(steps)]}
    generator = torch.Generator().manual_seed(seed)
    storage_shape = [shape[d] for d in order]
    first = torch.randn(storage_shape, generator=generator).permute(*[order.index(d) for d in range(rank)]).to(dtype)
    return program, [first, torch.randn(small, generator=generator).to(dtype)]


@settings(max_examples=2, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking reruns the subprocess: far too slow
@given(st.lists(random_region(), min_size=8, max_size=8))
def test_random_pointwise_chains_match_aten(run_regions, regions):
    outputs = run_regions({f"region{k}": region for k, region in enumerate(regions)})
    for k, (program, inputs) in enumerate(regions):
        assert_matches(program, inputs, outputs[f"region{k}"])


# --- generation, caching and refusals (no kernel runs) ----------------------------------------


def test_source_is_one_kernel_with_one_line_per_op_and_no_baked_shapes():
    program, _ = CASES["chain-two-outputs-5d"]
    gm = build(program)
    source = region_source(gm)
    assert source.count("@triton.jit") == 1 and source.count("tl.store(") == 2 and source.count("tl.load(") == 3
    for node in (node for node in gm.graph.nodes if node.op == "call_function"):
        assert sum(line.strip().startswith(f"{node.name} = ") for line in source.splitlines()) == 1
    assert "size3," in source and "operand1_stride0," in source and "1024" not in source
    assert count_ops(gm)["aten.gelu.default"] == 1


def test_kernels_are_cached_by_source():
    gm = build({"inputs": 1, "steps": [("sigmoid.default", ("%0",), {}), ("mul.Scalar", ("%1", 3.25), {})], "outputs": [2]})
    compile_region(gm)
    kernels = len(triton_codegen._KERNELS)
    compile_region(build({"inputs": 1, "steps": [("sigmoid.default", ("%0",), {}), ("mul.Scalar", ("%1", 3.25), {})], "outputs": [2]}))
    assert len(triton_codegen._KERNELS) == kernels
    compile_region(build({"inputs": 1, "steps": [("sigmoid.default", ("%0",), {}), ("mul.Scalar", ("%1", 4.5), {})], "outputs": [2]}))
    assert len(triton_codegen._KERNELS) == kernels + 1


@pytest.mark.parametrize(
    ("program", "message"),
    [
        ({"inputs": 1, "steps": [("exp.default", ("%0",), {}), ("atan.default", ("%1",), {})], "outputs": [2]}, "aten.atan.default"),
        ({"inputs": 1, "steps": [("dropout.default", ("%0", 0.1, True), {})], "outputs": [1]}, "dropout in training mode"),
        ({"inputs": 2, "steps": [("pow.Tensor_Tensor", ("%0", "%1"), {})], "outputs": [2]}, "aten.pow.Tensor_Tensor"),
    ],
)
def test_unknown_ops_are_not_lowerable(program, message):
    with pytest.raises(NotLowerable, match=message):
        region_source(build(program))


def test_views_stay_out_of_the_kernel():
    source = region_source(build(CASES["views-of-inputs"][0]))
    assert "permute" not in source and "unsqueeze" not in source and source.count("tl.load(") == 2


def test_bitwise_ops_on_integers_are_not_lowerable():
    gm = build({"inputs": 2, "steps": [("bitwise_and.Tensor", ("%0", "%1"), {})], "outputs": [2]})
    for node, dtype in zip(gm.graph.nodes, (torch.int64, torch.int64)):
        node.meta["val"] = torch.empty(3, dtype=dtype)
    with pytest.raises(NotLowerable, match="of integers"):
        region_source(gm)


def test_a_region_reshaping_and_expanding_computed_values_is_not_lowerable():
    program = {
        "inputs": 1,
        "steps": [("exp.default", ("%0",), {}), ("view.default", ("%1", [2, 3]), {}), ("expand.default", ("%2", [4, 2, 3]), {})],
        "outputs": [3],
    }
    with pytest.raises(NotLowerable, match="both reshaping and expanding"):
        region_source(build(program))


def test_a_permute_of_a_computed_value_is_not_lowerable():
    program = {"inputs": 1, "steps": [("exp.default", ("%0",), {}), ("permute.default", ("%1", [1, 0]), {}), ("relu.default", ("%2",), {})], "outputs": [3]}
    with pytest.raises(NotLowerable, match="aten.permute.default of a computed value"):
        region_source(build(program))


def test_collapse_merges_dimensions_every_operand_walks_contiguously():
    # [2, 3, 4] with a contiguous operand and one broadcast along dim 0: dims 1 and 2 merge, and
    # the size-1 dim is dropped
    sizes, strides = triton_codegen.collapse_dims([2, 1, 3, 4], [[12, 12, 4, 1], [0, 0, 4, 1]])
    assert sizes == [2, 12] and strides == [[12, 1], [0, 1]]
    # a transposed operand keeps its two dimensions
    sizes, strides = triton_codegen.collapse_dims([3, 5], [[1, 3], [5, 1]])
    assert sizes == [3, 5] and strides == [[1, 3], [5, 1]]
