"""The row-wise Triton template (``reduction`` and ``norm`` regions), run by the Triton interpreter.

Every region and its inputs are made here: single anchors traced from ``aten`` calls, and regions
cut by the partitioner out of captured modules (prologue, anchor, epilogue). ONE interpreted
subprocess compiles and runs them all (conftest.py's ``python_interpreted``); the checks run here,
against ATen computed in fp64 and rounded to each output's dtype. Refusals need no kernel run.
"""

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tests_helpers import Fn
from torch import nn
from torch.fx import GraphModule, Interpreter, symbolic_trace

from aten_programs import reference

from graphopt.backends import triton_rowwise
from graphopt.backends.partition import fuse_regions
from graphopt.backends.triton_codegen import NotLowerable
from graphopt.backends.triton_rowwise import compile_row_region, row_region_source
from graphopt.frontends.capture import capture
from graphopt.ir import propagate_shapes
from graphopt.testing import assert_close

aten = torch.ops.aten
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def traced(fn, inputs) -> GraphModule:
    """``fn`` (a function of tensors calling ``aten`` overloads) as a region with ``meta['val']``."""
    gm = symbolic_trace(fn)
    propagate_shapes(gm, inputs)
    return gm


def fused_region(module: nn.Module, inputs) -> tuple[GraphModule, list]:
    """The one ``reduction``/``norm`` region the partitioner cuts out of the captured ``module``,
    and the inputs it gets when the fused graph runs on ``inputs``."""
    fused = fuse_regions(capture(module, inputs))
    [node] = [n for n in fused.graph.nodes if n.meta.get("region_kind") in ("reduction", "norm")]
    seen = {}

    class Recorder(Interpreter):
        def call_module(self, target, args, kwargs):
            if target == node.target:
                seen["inputs"] = list(args)
            return super().call_module(target, args, kwargs)

    Recorder(fused).run(*inputs)
    return getattr(fused, node.target), seen["inputs"]


def assert_matches(region, inputs, outputs, expected=None):
    expected = reference(region, inputs) if expected is None else expected
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
        assert_close(out, ref, equal_nan=True)


_RUN_REGIONS = """
import sys, torch
from graphopt.backends.triton_rowwise import compile_row_region
from graphopt.ir import propagate_shapes
cases = torch.load(sys.argv[1], weights_only=False)
outputs = {}
for name, (region, inputs) in cases.items():
    propagate_shapes(region, inputs)  # meta['val'] does not survive pickling
    out = compile_row_region(region)(*inputs)
    outputs[name] = [out] if isinstance(out, torch.Tensor) else list(out)
torch.save(outputs, sys.argv[2])
"""


# --- one case per anchor, dtype and layout -----------------------------------------------------


def _x(shape, dtype, scale=2.0, offset=0.5):
    return (torch.randn(shape) * scale + offset).to(dtype)


def _layouts(dtype):
    """Inputs whose last dim is the row: permuted with a size-1 dim (column stride 6), one column,
    a single 1-D row, and rows over two programs (BLOCK_C = 1024, 4 rows each) with a ragged tail."""
    return {
        "permuted": _x((37, 2, 1, 3), dtype).permute(1, 2, 3, 0),
        "one-column": _x((5, 1), dtype),
        "one-row": _x((37,), dtype),
        "two-programs": _x((6, 600), dtype),
    }


def _anchors(dtype, ndim, c):
    """name -> ``fn(x, weight, bias, keepdim)`` for an input of ``ndim`` dims, ``c`` columns and
    ``dtype``; weight and bias are ``[c]``."""
    return {
        "sum": lambda x, w, b, k: aten.sum.dim_IntList(x, [-1], k),
        "sum-dtype-fp32": lambda x, w, b, k: aten.sum.dim_IntList(x, [ndim - 1], k, dtype=torch.float32),
        "mean": lambda x, w, b, k: aten.mean.dim(x, [-1], k),
        "amax": lambda x, w, b, k: aten.amax.default(x, [-1], k),
        "amin": lambda x, w, b, k: aten.amin.default(x, [-1], k),
        "var-unbiased": lambda x, w, b, k: aten.var.dim(x, [-1], True, k),
        "var-correction0": lambda x, w, b, k: aten.var.correction(x, [-1], correction=0, keepdim=k),
        "layer_norm": lambda x, w, b, k: aten.layer_norm.default(x, [c], w, b, 1e-5),
        "layer_norm-no-affine": lambda x, w, b, k: aten.layer_norm.default(x, [c], None, None, 1e-3),
        "rms_norm-eps-none": lambda x, w, b, k: aten.rms_norm.default(x, [c], w, None),
        "rms_norm-no-weight": lambda x, w, b, k: aten.rms_norm.default(x, [c], None, 1e-5),
        "graphopt-rms_norm": lambda x, w, b, k: torch.ops.graphopt.rms_norm.default(x, w, b, 1e-6),
        "graphopt-rms_norm-bias-only": lambda x, w, b, k: torch.ops.graphopt.rms_norm.default(x, None, b, 1e-6),
        "softmax": lambda x, w, b, k: aten.softmax.int(x, -1),
        "softmax-dtype": lambda x, w, b, k: aten.softmax.int(x, -1, torch.float16 if dtype == torch.float32 else torch.float32),
        "_softmax": lambda x, w, b, k: aten._softmax.default(x, -1, dtype != torch.float32),
        "log_softmax": lambda x, w, b, k: aten.log_softmax.int(x, ndim - 1),
        "_log_softmax": lambda x, w, b, k: aten._log_softmax.default(x, -1, False),
    }


def _bind(op, keepdim):
    """``op`` as a function of its tensors only (symbolic_trace makes every parameter an input)."""
    return lambda x, w, b: op(x, w, b, keepdim)


def _anchor_cases():
    torch.manual_seed(0)
    cases, references = {}, {}
    for dtype_name, dtype in DTYPES.items():
        for layout, x in _layouts(dtype).items():
            c = x.shape[-1]
            w, b = (torch.rand(c) + 0.5).to(dtype), torch.randn(c).to(dtype)
            keepdim = layout in ("permuted", "two-programs")
            for name, op in _anchors(dtype, x.dim(), c).items():
                region = traced(_bind(op, keepdim), [x, w, b])
                cases[f"{name}-{dtype_name}-{layout}"] = (region, [x, w, b])
                if name == "_softmax" and dtype != torch.float32:  # half_to_float takes no fp64 input
                    wide = aten._softmax.default(x.double(), -1, False).float()
                    references[f"{name}-{dtype_name}-{layout}"] = [wide]
    # eps=None is fp32's epsilon for fp16 too (ATen's opmath, so ATen's fp16 call is the
    # reference; in fp64 it is fp64's): visible when mean(x²) is that small
    small = _x((3, 10), torch.float16, scale=1e-3, offset=0)
    cases["rms_norm-eps-none-tiny-values-fp16"] = (traced(lambda x: aten.rms_norm.default(x, [10]), [small]), [small])
    references["rms_norm-eps-none-tiny-values-fp16"] = [aten.rms_norm.default(small, [10])]
    return cases, references


# --- regions cut out of captured modules -------------------------------------------------------


class ResidualLayerNormCast(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        nn.init.uniform_(self.ln.weight, 0.5, 1.5)
        nn.init.normal_(self.ln.bias)

    def forward(self, x, residual):
        return self.ln(x + residual).half()


class SoftmaxFromParts(nn.Module):
    """``e = exp(x - amax(x))`` then ``e / sum(e)``: the partitioner cuts two regions (one anchor each)."""

    def __init__(self, part):
        super().__init__()
        self.part = part

    def forward(self, x):
        e = (x - x.amax(-1, keepdim=True)).exp()
        return e if self.part == "exp" else e.sum(-1, keepdim=True)


def _module_cases():
    torch.manual_seed(1)
    cases = {}
    x, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    cases["residual-layer_norm-cast"] = fused_region(ResidualLayerNormCast(48), (x, r))
    cases["softmax-parts-amax-sub-exp"] = fused_region(SoftmaxFromParts("exp"), (torch.randn(4, 33) * 3,))
    e = torch.rand(4, 33) + 0.1
    cases["softmax-parts-sum-div"] = fused_region(Fn(lambda e: e / e.sum(-1, keepdim=True)), (e,))
    # absmax scale: a keepdim reduction with a prologue (abs) and a per-row epilogue (clamp, div),
    # returned too, and used by a full epilogue (x / scale)
    absmax = Fn(lambda x: (lambda scale: (scale, x / scale))(x.abs().amax(-1, keepdim=True).clamp_min(1e-5) / 127))
    cases["absmax-scale-and-scaled"] = fused_region(absmax, (torch.randn(3, 2, 20),))
    # a non-keepdim mean with a per-row epilogue reading a per-row input
    cases["mean-per-row-epilogue"] = fused_region(Fn(lambda x, y: (x * 2).mean(-1) * y + 1), (torch.randn(6, 7), torch.randn(6)))
    # attention scores: scale, broadcast mask over heads and queries, softmax, in fp16
    scores, mask = torch.randn(2, 3, 5, 7).half(), (torch.rand(2, 1, 1, 7) > 0.3).half() * -1e4
    cases["scaled-masked-softmax-fp16"] = fused_region(Fn(lambda s, m: torch.softmax(s * 0.125 + m, -1)), (scores, mask))
    # graphopt::rms_norm between a residual add and a SiLU, bf16
    w, b = (torch.rand(24) + 0.5).bfloat16(), torch.randn(24).bfloat16()
    gated = Fn(lambda x, r, w, b: torch.nn.functional.silu(torch.ops.graphopt.rms_norm(x + r, w, b, 1e-6)))
    cases["add-graphopt-rms_norm-silu-bf16"] = fused_region(gated, (torch.randn(4, 24).bfloat16(), torch.randn(4, 24).bfloat16(), w, b))
    # a count of a boolean mask: exact in fp32, stored as int64
    cases["bool-mask-count"] = fused_region(Fn(lambda m: m.sum(-1)), (torch.rand(4, 13) > 0.5,))
    # a transposed input to log_softmax of a sum with a broadcast row vector
    xt, v = torch.randn(9, 4).t(), torch.randn(9)
    cases["transposed-add-log_softmax"] = fused_region(Fn(lambda x, v: torch.log_softmax(x + v, -1)), (xt, v))
    return cases


def _two_anchor_case():
    """Softmax from its parts in ONE kernel (two reductions over the same rows), fp16."""
    x = _x((5, 19), torch.float16)

    def softmax(x):
        e = aten.exp.default(aten.sub.Tensor(x, aten.amax.default(x, [-1], True)))
        return aten.div.Tensor(e, aten.sum.dim_IntList(e, [-1], True))

    return traced(softmax, [x]), [x]


# --- random regions (hypothesis), drawn here so that they share the one subprocess -------------

_RANDOM_ANCHORS = {  # name -> fn(x, keepdim, columns)
    "sum": lambda x, k, c: aten.sum.dim_IntList(x, [-1], k),
    "amax": lambda x, k, c: aten.amax.default(x, [-1], k),
    "var": lambda x, k, c: aten.var.correction(x, [-1], correction=1, keepdim=k),
    "layer_norm": lambda x, k, c: aten.layer_norm.default(x, [c], None, None, 1e-5),
    "softmax": lambda x, k, c: aten.softmax.int(x, -1),
    "log_softmax": lambda x, k, c: aten._log_softmax.default(x, -1, False),
}


def _random_region_fn(anchor, keepdim, columns):
    op = _RANDOM_ANCHORS[anchor]
    return lambda x, w: aten.mul.Tensor(op(aten.add.Tensor(aten.mul.Tensor(x, w), 1), keepdim, columns), 3)


@st.composite
def random_region(draw):
    """``anchor(x * w + 1)`` then ``* 3`` for a random rank-1..4 input (permuted storage, size-1
    dims, C from 1 to 70) and a weight broadcasting along some dims."""
    rank = draw(st.integers(1, 4))
    shape = [*draw(st.lists(st.integers(1, 5), min_size=rank - 1, max_size=rank - 1)), draw(st.integers(1, 70))]
    order = draw(st.permutations(range(rank)))
    weight_shape = [size if draw(st.booleans()) else 1 for size in shape[draw(st.integers(0, rank - 1)) :]]
    anchor = draw(st.sampled_from(sorted(_RANDOM_ANCHORS)))
    keepdim = draw(st.booleans())
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn([shape[d] for d in order], generator=generator).permute(*[order.index(d) for d in range(rank)]).to(dtype)
    w = torch.randn(weight_shape, generator=generator).to(dtype)
    return traced(_random_region_fn(anchor, keepdim, shape[-1]), [x, w]), [x, w]


def _random_cases(count=12):
    drawn = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(random_region())
    def draw(case):
        drawn.append(case)

    draw()
    return {f"random{k}": case for k, case in enumerate(drawn)}


ANCHOR_CASES, ANCHOR_REFERENCES = _anchor_cases()
MODULE_CASES = _module_cases()
RANDOM_CASES = _random_cases()
CASES = {**ANCHOR_CASES, **MODULE_CASES, "two-anchors-softmax-fp16": _two_anchor_case(), **RANDOM_CASES}


@pytest.fixture(scope="module")
def outputs(interpreted_call):
    return interpreted_call(_RUN_REGIONS, CASES)


@pytest.mark.parametrize("case", [*ANCHOR_CASES, *MODULE_CASES, "two-anchors-softmax-fp16"])
def test_region_matches_aten(outputs, case):
    region, inputs = CASES[case]
    assert_matches(region, inputs, outputs[case], ANCHOR_REFERENCES.get(case))


def test_random_regions_match_aten(outputs):
    """The property: any anchor over random shapes, strides and broadcasts matches ATen."""
    assert len(RANDOM_CASES) == 12
    for name, (region, inputs) in RANDOM_CASES.items():
        assert_matches(region, inputs, outputs[name])


def test_every_anchor_is_exercised():
    targets = {n.target for region, _ in CASES.values() for n in region.graph.nodes if n.op == "call_function"}
    assert set(triton_rowwise.ANCHORS) - targets == set()


def test_regions_cut_by_the_partitioner_hold_prologue_anchor_and_epilogue():
    ops = {name: [n.target for n in MODULE_CASES[name][0].graph.nodes if n.op == "call_function"] for name in MODULE_CASES}
    assert ops["residual-layer_norm-cast"] == [aten.add.Tensor, aten.layer_norm.default, aten.to.dtype]
    assert ops["softmax-parts-amax-sub-exp"] == [aten.amax.default, aten.sub.Tensor, aten.exp.default]
    assert aten.amax.default in ops["absmax-scale-and-scaled"] and aten.abs.default in ops["absmax-scale-and-scaled"]
    assert len(MODULE_CASES["absmax-scale-and-scaled"][0].graph.output_node().args[0]) == 2  # per-row and full outputs


# --- generation (no kernel runs) ---------------------------------------------------------------


def test_source_reads_each_operand_once_and_reduces_masked_rows():
    region, _ = MODULE_CASES["residual-layer_norm-cast"]
    source = row_region_source(region)
    assert source.count("@triton.jit") == 1 and source.count("tl.load(") == 4 and source.count("tl.store(") == 1
    assert "tl.where(mask, add, 0.0)" in source and "BLOCK_C: tl.constexpr" in source and "48" not in source
    per_row = row_region_source(MODULE_CASES["mean-per-row-epilogue"][0])
    assert "mask=row_mask" in per_row and "tl.store(out0_ptr + rows," in per_row


def _refused(fn, inputs):
    return row_region_source(traced(fn, inputs))


@pytest.mark.parametrize(
    ("fn", "inputs", "message"),
    [
        (lambda x: aten.softmax.int(x, 0), [torch.randn(3, 4)], "not the last one"),
        (lambda x: aten.sum.dim_IntList(x, [0, 1]), [torch.randn(3, 4)], "not the last one"),
        (lambda x: aten.layer_norm.default(x, [3, 4]), [torch.randn(2, 3, 4)], "over 2 dims"),
        (lambda x: aten.amax.default(x, [-1]), [torch.randint(0, 9, (3, 4))], "torch.int64"),
        (lambda x: aten.exp.default(x), [torch.randn(3, 4)], "no row reduction"),
        (lambda x, w: aten.rms_norm.default(x, [4], aten.add.Tensor(w, 1), 1e-6), [torch.randn(3, 4), torch.randn(4)], "neither one per row"),
        # R == C: a non-keepdim sum broadcasts along the columns, not along the row
        (lambda x: aten.add.Tensor(x, aten.sum.dim_IntList(x, [-1])), [torch.randn(4, 4)], "other than along the row"),
        (lambda x: aten.sum.dim_IntList(x, [-1]), [torch.randn(2, triton_rowwise.MAX_BLOCK_C + 1)], "rows of 8193 elements"),
    ],
)
def test_refusals_at_generation(fn, inputs, message):
    with pytest.raises(NotLowerable, match=message):
        _refused(fn, inputs)


def test_refusals_at_call_time_come_before_launching():
    # generated for 4 columns; the launcher checks each call's shapes before it launches
    launch = compile_row_region(traced(lambda x: aten.amax.default(x, [-1], True), [torch.randn(3, 4)]))
    with pytest.raises(NotLowerable, match="rows of 8193 elements"):
        launch(torch.randn(2, triton_rowwise.MAX_BLOCK_C + 1))
    with pytest.raises(NotLowerable, match="do not collapse to 3 dims"):
        launch(torch.randn(4, 2, 3, 5, 4).permute(3, 1, 0, 2, 4))  # four row dims, none mergeable
    per_column = compile_row_region(traced(lambda x: aten.add.Tensor(x, aten.amax.default(x, [-1], True)), [torch.randn(3, 1)]))
    with pytest.raises(NotLowerable, match="per-row"):
        per_column(torch.randn(3, 5))  # one column at generation: every value there was per-row


def test_empty_rows_need_no_launch():
    launch = compile_row_region(traced(lambda x: aten.softmax.int(x, -1), [torch.randn(3, 4)]))
    out = launch(torch.randn(0, 4))
    assert out.shape == (0, 4) and out.dtype == torch.float32
