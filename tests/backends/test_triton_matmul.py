"""The tiled matmul template with fused epilogues, run by the Triton interpreter on CPU, against ATen.

Every region is built here: single heads from a *program* (``{"inputs": n, "steps": [(op, args,
kwargs)], "outputs": [...]}``; ``"%k"`` names value ``k``: inputs first, then one value per step),
epilogue regions by capturing tiny modules and cutting them with the partitioner, random regions
drawn by hypothesis. All of them go to ONE subprocess (``TRITON_INTERPRET=1`` must be set before
triton is imported) as pickled ``GraphModule``s with their inputs; it compiles and runs each, and
the checks run here, against ATen computed in fp64 and rounded to each output's dtype.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule, Interpreter

from aten_programs import build, reference

from graphopt.backends import triton_matmul
from graphopt.backends.partition import fuse_regions
from graphopt.backends.triton_codegen import NotLowerable
from graphopt.backends.triton_matmul import compile_matmul_region, matmul_region_source
from graphopt.frontends.capture import capture
from graphopt.ir import aten, count_ops
from graphopt.testing import assert_close

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def head(op: str, inputs: int, *extra, **kwargs) -> dict:
    """A program holding one head op on all its inputs."""
    return {"inputs": inputs, "steps": [(op, (*[f"%{k}" for k in range(inputs)], *extra), kwargs)], "outputs": [inputs]}


def assert_matches(region, inputs, outputs):
    expected = reference(region, inputs)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert_close(out, ref)


# --- one case per head, layout and dtype ------------------------------------------------------


def _head_cases(dtype):
    """(program, inputs) per head: dims that are not multiples of the 16-wide blocks, K = 1, M = 1,
    transposed and permuted operands, broadcast bias terms and batches."""

    def r(*shape):
        return torch.randn(shape).to(dtype)

    nan_bias = torch.full((13,), float("nan")).to(dtype)
    return {
        "linear-3d-bias": (head("linear.default", 3), [r(2, 5, 19), r(21, 19), r(21)]),
        "linear-M1-no-bias": (head("linear.default", 2), [r(1, 33), r(17, 33)]),
        "linear-K1": (head("linear.default", 3), [r(6, 1), r(20, 1), r(20)]),
        "linear-vector-input": (head("linear.default", 3), [r(19), r(7, 19), r(7)]),
        "linear-seq-first-input": (head("linear.default", 3), [r(5, 2, 19).transpose(0, 1), r(21, 19), r(21)]),
        "linear-transposed-weight": (head("linear.default", 2), [r(9, 24), r(24, 18).t()]),
        "mm-tails": (head("mm.default", 2), [r(33, 40), r(40, 17)]),
        "mm-transposed-operands": (head("mm.default", 2), [r(20, 35).t(), r(18, 20).t()]),
        "mm-K1": (head("mm.default", 2), [r(20, 1), r(1, 35)]),
        "mm-M1-N1": (head("mm.default", 2), [r(1, 24), r(24, 1)]),
        "addmm-K0-is-the-bias": (head("addmm.default", 3), [r(7), r(5, 0), r(0, 7)]),
        "linear-no-rows": (head("linear.default", 3), [r(0, 19), r(21, 19), r(21)]),
        "addmm-scaled": (head("addmm.default", 3, beta=0.5, alpha=2.0), [r(17), r(12, 30), r(30, 17)]),
        "addmm-column-bias": (head("addmm.default", 3), [r(12, 1), r(12, 30), r(17, 30).t()]),
        "addmm-beta0-ignores-nan-bias": (head("addmm.default", 3, beta=0), [nan_bias, r(12, 30), r(30, 13)]),
        "bmm": (head("bmm.default", 2), [r(3, 9, 20), r(3, 20, 18)]),
        "bmm-permuted": (head("bmm.default", 2), [r(9, 3, 20).permute(1, 0, 2), r(3, 18, 20).transpose(1, 2)]),
        "baddbmm-row-bias": (head("baddbmm.default", 3, beta=-1.0, alpha=0.5), [r(1, 18), r(2, 9, 20), r(2, 20, 18)]),
        "matmul-2d": (head("matmul.default", 2), [r(12, 30), r(30, 13)]),
        "matmul-4d-by-2d": (head("matmul.default", 2), [r(2, 3, 5, 30), r(30, 13)]),
        "matmul-4d-by-4d": (head("matmul.default", 2), [r(2, 3, 5, 16), r(2, 3, 9, 16).transpose(-1, -2)]),
        "matmul-2d-by-3d": (head("matmul.default", 2), [r(7, 16), r(3, 16, 9)]),
    }


# --- epilogue regions cut out of captured modules ---------------------------------------------


class LinearGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 40)

    def forward(self, x):
        return F.gelu(self.fc(x))


class LinearResidual(nn.Module):
    """A residual block's output projection, with a second output (the projection itself)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 24)

    def forward(self, x, residual):
        projected = self.fc(x)
        return residual + projected, projected


class GPT2MLPUp(nn.Module):
    """GPT-2's ``Conv1D`` (addmm on the flattened input, viewed back) and its tanh-GELU formula."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(24, 40) * 0.2)
        self.bias = nn.Parameter(torch.randn(40))

    def forward(self, x):
        batch, length, channels = x.shape
        h = torch.addmm(self.bias, x.view(-1, channels), self.weight).view(batch, length, 40)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return h.view(batch * length, 40)


class MatmulBias(nn.Module):
    """``x @ W + b``: a bias broadcast along M, then a SiLU, dropout (eval) and a cast."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(24, 40) * 0.2)
        self.bias = nn.Parameter(torch.randn(40))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(F.silu(x @ self.weight + self.bias)).to(torch.float16)


class AttentionScores(nn.Module):
    """Batched scores ``q @ k^T`` scaled, plus a mask broadcast over heads and queries."""

    def forward(self, q, k, mask):
        return torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask


MODULES = {  # name: (module, example inputs, an op the region must hold)
    "linear-gelu": (LinearGelu, lambda: [torch.randn(2, 7, 24)], "aten.gelu.default"),
    "linear-residual-two-outputs": (LinearResidual, lambda: [torch.randn(3, 5, 24), torch.randn(3, 5, 24)], "aten.add.Tensor"),
    "gpt2-addmm-view-tanh-gelu-view": (GPT2MLPUp, lambda: [torch.randn(2, 7, 24)], "aten.tanh.default"),
    "matmul-bias-silu-dropout-cast": (MatmulBias, lambda: [torch.randn(13, 24)], "aten.dropout.default"),
    "attention-scores-masked": (AttentionScores, lambda: [torch.randn(2, 2, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 1, 1, 11)], "aten.mul.Tensor"),
}


class _RegionInputs(Interpreter):
    """Runs the fused graph and keeps the arguments of the matmul_epilogue submodule's call."""

    def call_module(self, target, args, kwargs):
        if target == self.region_name:
            self.region_args = list(args)
        return super().call_module(target, args, kwargs)


def epilogue_region(module: nn.Module, inputs: list) -> tuple[GraphModule, list]:
    """The partitioner's one ``matmul_epilogue`` region of ``module`` and the values it reads."""
    fused = fuse_regions(capture(module, tuple(inputs)))
    (node,) = [n for n in fused.graph.nodes if n.meta.get("region_kind") == "matmul_epilogue"]
    runner = _RegionInputs(fused)
    runner.region_name = node.target
    runner.run(*inputs)
    return fused.get_submodule(node.target), runner.region_args


def _module_cases():
    cases = {}
    for name, (module_class, make_inputs, _) in MODULES.items():
        torch.manual_seed(0)
        region, region_inputs = epilogue_region(module_class().eval(), make_inputs())
        for dtype_name, dtype in DTYPES.items():
            cases[f"{name}-{dtype_name}"] = (region, [x.to(dtype) for x in region_inputs])
    return cases


# --- random regions, drawn by hypothesis ------------------------------------------------------

_EPILOGUES = ("none", "relu", "gelu-tanh", "residual", "bias-silu")


@st.composite
def random_region(draw):
    """A mm, addmm, linear or bmm of random odd sizes, operands possibly transposed, in a random
    dtype, with a random epilogue reading a full residual or a bias broadcast along M."""
    op = draw(st.sampled_from(["mm", "addmm", "linear", "bmm"]))
    batch = draw(st.integers(1, 3)) if op == "bmm" else 1
    m, n, k = (draw(st.integers(1, 40)) for _ in range(3))
    transpose_a, transpose_b = draw(st.booleans()), draw(st.booleans())
    epilogue = draw(st.sampled_from(_EPILOGUES))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**16))
    return {
        "op": op,
        "batch": batch,
        "m": m,
        "n": n,
        "k": k,
        "transpose_a": transpose_a,
        "transpose_b": transpose_b,
        "epilogue": epilogue,
        "dtype": dtype,
        "seed": seed,
    }


def random_case(spec: dict) -> tuple[GraphModule, list]:
    """The region and inputs a drawn spec describes."""
    generator = torch.Generator().manual_seed(spec["seed"])
    op, m, n, k, dtype = spec["op"], spec["m"], spec["n"], spec["k"], DTYPES[spec["dtype"]]
    batch = [spec["batch"]] if op == "bmm" else []

    def r(*shape, transposed=False):
        if not transposed:
            return torch.randn(shape, generator=generator).to(dtype)
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator).to(dtype).transpose(-1, -2)

    a = r(*batch, m, k, transposed=spec["transpose_a"])
    b = r(n, k, transposed=spec["transpose_b"]) if op == "linear" else r(*batch, k, n, transposed=spec["transpose_b"])
    inputs = [r(n), a, b] if op == "addmm" else [a, b]
    steps = [(f"{op}.default", tuple(f"%{i}" for i in range(len(inputs))), {})]
    if spec["epilogue"] in ("residual", "bias-silu"):
        inputs.append(r(*batch, m, n) if spec["epilogue"] == "residual" else r(n))
    product, extra = f"%{len(inputs)}", f"%{len(inputs) - 1}"
    if spec["epilogue"] == "relu":
        steps.append(("relu.default", (product,), {}))
    elif spec["epilogue"] == "gelu-tanh":
        steps.append(("gelu.default", (product,), {"approximate": "tanh"}))
    elif spec["epilogue"] == "residual":
        steps.append(("add.Tensor", (product, extra), {}))
    elif spec["epilogue"] == "bias-silu":
        steps += [("add.Tensor", (product, extra), {}), ("silu.default", (f"%{len(inputs) + 1}",), {})]
    return build({"inputs": len(inputs), "steps": steps, "outputs": [len(inputs) + len(steps) - 1]}), inputs


def _draw_random_specs(count: int) -> list[dict]:
    """``count`` regions drawn by hypothesis, derandomized (the same ones at every run), so that
    they join the one interpreted subprocess of this module."""
    drawn = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(random_region())
    def collect(spec):
        drawn.append(spec)

    collect()
    return drawn[:count]


RANDOM_SPECS = _draw_random_specs(12)


def _cases():
    torch.manual_seed(0)
    cases = {}
    for dtype_name, dtype in DTYPES.items():
        for name, (program, inputs) in _head_cases(dtype).items():
            cases[f"{name}-{dtype_name}"] = (build(program), inputs)
    cases["mm-fp16-wide-accumulation"] = (build(head("mm.default", 2)), [torch.full((3, 40), 100.0).half(), torch.full((40, 5), 10.0).half()])
    cases.update(_module_cases())
    for index, spec in enumerate(RANDOM_SPECS):
        cases[f"random{index}"] = random_case(spec)
    return cases


CASES = _cases()

_RUN_REGIONS = """
import sys, torch
from graphopt.backends.triton_matmul import compile_matmul_region
outputs = {}
for name, (region, inputs) in torch.load(sys.argv[1], weights_only=False).items():
    out = compile_matmul_region(region)(*inputs)
    outputs[name] = [out] if isinstance(out, torch.Tensor) else list(out)
torch.save(outputs, sys.argv[2])
"""


@pytest.fixture(scope="module")
def outputs(interpreted_call):
    """Every case's outputs, from one interpreted subprocess."""
    return interpreted_call(_RUN_REGIONS, CASES)


@pytest.mark.parametrize("case", [name for name in CASES if not name.startswith("random")])
def test_region_matches_aten(outputs, case):
    region, inputs = CASES[case]
    assert_matches(region, inputs, outputs[case])


@pytest.mark.parametrize("index", range(len(RANDOM_SPECS)))
def test_random_regions_match_aten(outputs, index):
    region, inputs = CASES[f"random{index}"]
    assert_matches(region, inputs, outputs[f"random{index}"])


@pytest.mark.parametrize("name", MODULES)
def test_captured_regions_hold_head_and_epilogue(name):
    ops = count_ops(CASES[f"{name}-fp32"][0])
    assert ops[MODULES[name][2]] >= 1 and sum(ops[f"aten.{op}.default"] for op in ("linear", "addmm", "matmul")) == 1
    if name.startswith("gpt2"):  # the views between the head and the epilogue stay in the region
        assert ops["aten.view.default"] == 2


def test_random_regions_cover_every_head_and_epilogue():
    assert {spec["op"] for spec in RANDOM_SPECS} == {"mm", "addmm", "linear", "bmm"}
    assert len({spec["epilogue"] for spec in RANDOM_SPECS}) >= 3


def test_beta0_drops_the_nan_bias(outputs):
    assert torch.isfinite(outputs["addmm-beta0-ignores-nan-bias-fp32"][0]).all()


def test_half_precision_products_accumulate_in_fp32(outputs):
    # 40 products of 1000: partial sums 17000, 19000, ... fall between fp16 numbers (spaced 16
    # there), so only a wider accumulator ends on 40000 exactly
    assert torch.equal(outputs["mm-fp16-wide-accumulation"][0], torch.full((3, 5), 40000.0, dtype=torch.float16))


# --- generation and refusals (no kernel runs) -------------------------------------------------


def test_source_is_one_kernel_with_one_dot_one_line_per_op_and_no_baked_shapes():
    region, _ = CASES["gpt2-addmm-view-tanh-gelu-view-fp32"]
    source = matmul_region_source(region)
    assert source.count("@triton.jit") == 1 and source.count("tl.dot(") == 1 and source.count("tl.store(") == 1
    computing = [n for n in region.graph.nodes if n.op == "call_function" and n.target != aten.view.default]
    for node in computing:
        assert sum(line.strip().startswith(f"{node.name} = ") for line in source.splitlines()) == 1, node.name
    assert "view" not in source and re.search(r"\b(14|24|40)\b", source) is None  # shapes are kernel arguments
    # the bias is an epilogue operand read at the tile's coordinates through its strides
    assert "operand0_stride_m" in source and "addmm = acc + operand0" in source


def test_linear_weight_is_read_transposed_without_a_copy():
    x, weight = torch.randn(2, 5, 19), torch.randn(21, 19)
    a, b = triton_matmul._gemm_views(aten.linear.default, x, weight)
    assert a.shape == (1, 10, 19) and a.data_ptr() == x.data_ptr()
    assert b.shape == (1, 19, 21) and b.stride()[1:] == (1, 19) and b.data_ptr() == weight.data_ptr()
    # leading dims that do not merge become the batch, the weight is shared by it (stride 0)
    a, b = triton_matmul._gemm_views(aten.linear.default, x.transpose(0, 1), weight)
    assert a.shape == (5, 2, 19) and a.data_ptr() == x.data_ptr() and b.stride() == (0, 1, 19)


def _call(program, inputs):
    return compile_matmul_region(build(program))(*inputs)


@pytest.mark.parametrize(
    ("program", "inputs", "message"),
    [
        (head("mm.default", 2), [torch.randn(4, 3).double(), torch.randn(3, 5).double()], "torch.float64"),
        (head("mm.default", 2), [torch.randint(0, 3, (4, 3)), torch.randint(0, 3, (3, 5))], "torch.int64"),
        (head("matmul.default", 2), [torch.randn(3), torch.randn(3, 5)], "matmul of a vector"),
        (head("matmul.default", 2), [torch.randn(1, 3, 4, 8), torch.randn(2, 3, 8, 5)], "do not merge"),
        # the epilogue broadcasts the product to more elements than the tiles compute
        (
            {"inputs": 3, "steps": [("mm.default", ("%0", "%1"), {}), ("add.Tensor", ("%3", "%2"), {})], "outputs": [4]},
            [torch.randn(4, 3), torch.randn(3, 5), torch.randn(2, 4, 5)],
            "elements",
        ),
    ],
)
def test_inputs_the_template_cannot_index_are_refused_before_launch(program, inputs, message):
    with pytest.raises(NotLowerable, match=message):
        _call(program, inputs)


@pytest.mark.parametrize(
    ("program", "message"),
    [
        ({"inputs": 2, "steps": [("mm.default", ("%0", "%1"), {}), ("atan.default", ("%2",), {})], "outputs": [3]}, "aten.atan.default"),
        ({"inputs": 1, "steps": [("relu.default", ("%0",), {})], "outputs": [1]}, "not a matmul head"),
        (
            {"inputs": 2, "steps": [("mm.default", ("%0", "%1"), {}), ("t.default", ("%2",), {}), ("relu.default", ("%3",), {})], "outputs": [4]},
            "no flat-index form",
        ),
    ],
)
def test_regions_outside_the_template_are_not_lowerable(program, message):
    with pytest.raises(NotLowerable, match=message):
        matmul_region_source(build(program))


def test_gpu_configs_that_overflow_shared_memory_are_pruned():
    # The largest tile fits fp16 operands but not fp32 ones on an A100 (163 KiB of shared memory),
    # as the ahead-of-time GPU compile test found.
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st) for m, n, k, w, st in triton_matmul.GPU_CONFIGS]
    assert triton_matmul.configs_fitting(configs, 2, 166912) == configs
    fp32 = triton_matmul.configs_fitting(configs, 4, 166912)
    assert fp32 == configs[1:] and triton_matmul.configs_fitting(configs, 4, 1) == configs[-1:]
