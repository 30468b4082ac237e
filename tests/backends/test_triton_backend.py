"""The ``triton`` backend end to end: ``graphopt.optimize(..., backend="triton")`` against eager.

The kernels run in the Triton interpreter, which must be chosen before ``triton`` is first imported
(``import graphopt`` imports it), so every interpreted check runs in ONE subprocess with
``TRITON_INTERPRET=1`` that reports back what it saw; the assertions run here.
"""

import json
import os

import pytest
import torch

import graphopt
from graphopt.backends import get_backend
from graphopt.frontends.capture import capture

_RUN_MODELS = """
import json, sys, time, torch
import torch.nn.functional as F
from torch import nn
import graphopt
from graphopt.tools import zoo
from graphopt.backends.triton_backend import TritonKernel
from graphopt.testing import rel_err


# atan has no Triton lowering rule; registered as pointwise, it makes a region no template lowers.
from graphopt.backends.partition import register_kind
register_kind(torch.ops.aten.atan.default, "pointwise")


class MLP(nn.Module):
    # A pointwise prologue, two matmul epilogues (gelu, residual add), a softmax, and a pointwise
    # region after an opaque cumsum with atan.
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = F.gelu(x * 0.5 + 1.0)
        h = h + F.gelu(self.down(F.gelu(self.up(h))))
        return torch.atan(torch.cumsum(h, -1)) * 2.0, torch.softmax(h, -1) * x


class Rank5(nn.Module):
    # Lowerable ops, but a permuted 5-D input no launcher can index in 4 dimensions.
    def forward(self, x, y):
        return torch.exp(x) * y + 1.0


torch.manual_seed(0)
EXACT = ["canonicalize", "fold_batchnorm", "layernorm_to_rmsnorm"]  # remove_padding: minilm-packed
minilm = zoo.load("minilm")
sentences = zoo.tokenize(minilm.tokenizer, zoo.real_sentences(2), max_length=8)
gpt2, vit, preln = zoo.load("gpt2-tiny"), zoo.load("vit-s", image_size=32, num_hidden_layers=1), zoo.load("preln-tiny")
cases = {
    "mlp": (MLP().eval(), (torch.randn(4, 8, 16),), []),
    "rank5": (Rank5(), (torch.randn(2, 3, 4, 5, 6).permute(4, 2, 0, 3, 1), torch.randn(6, 4, 2, 5, 3)), []),
    "preln-tiny": (preln.model, preln.example_inputs, EXACT),
    "gpt2-tiny": (gpt2.model, (torch.randint(0, 1000, (1, 8)),), EXACT),
    "vit-s": (vit.model, (torch.randn(1, 3, 32, 32),), EXACT),
    "minilm": (minilm.model, sentences, EXACT),
    "minilm-packed": (minilm.model, zoo.tokenize(minilm.tokenizer, ["A cat.", "Graphs are rewritten, then lowered to kernels.", "Hi"]), ["canonicalize", "remove_padding"]),
}
summary = {}
for name, (model, inputs, passes) in cases.items():
    start = time.perf_counter()
    optimized = graphopt.optimize(model, passes, inputs, backend="triton")
    runner = optimized.compiled.runner
    with torch.no_grad():
        out, ref = optimized(*inputs), model(*inputs)
    leaves = zip(*(torch.utils._pytree.tree_leaves(x) for x in (out, ref)))
    summary[name] = {
        "error": max(rel_err(o, r) for o, r in leaves),
        "kernels": optimized.kernels,
        "kinds": {n: runner.get_submodule(n).kind for n in optimized.kernels},
        "left_to_aten": optimized.compiled.left_to_aten,
        "kernel_modules": sorted(n for n, m in runner.named_children() if isinstance(m, TritonKernel)),
        "backend_check": optimized.report.final["triton vs graph"],
        "aten_calls": sorted({str(n.target) for n in runner.graph.nodes if n.op == "call_function"}),
        "seconds": time.perf_counter() - start,
    }
json.dump(summary, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def interpreted(python_interpreted, tmp_path_factory):
    """What each model did under ``backend="triton"``, in the Triton interpreter."""
    out = tmp_path_factory.mktemp("triton_backend") / "summary.json"
    python_interpreted(_RUN_MODELS, str(out))
    return json.loads(out.read_text())


def test_mlp_regions_run_as_kernels_and_an_unknown_op_stays_aten(interpreted):
    mlp = interpreted["mlp"]
    assert mlp["error"] < 1e-5
    assert sorted(mlp["kernels"]) == mlp["kernel_modules"]
    assert sorted(mlp["kinds"].values()) == ["matmul_epilogue", "matmul_epilogue", "norm", "pointwise"]  # softmax * x: norm
    assert all("@triton.jit" in source for source in mlp["kernels"].values())
    assert list(mlp["left_to_aten"].values()) == ["no Triton lowering for aten.atan.default"]
    assert "aten.cumsum.default" in mlp["aten_calls"]


@pytest.mark.parametrize("model", ["preln-tiny", "gpt2-tiny", "vit-s", "minilm"])
def test_zoo_models_lowered_end_to_end(interpreted, model):
    result = interpreted[model]
    assert result["error"] < 1e-4, result["backend_check"]
    kinds = set(result["kinds"].values())
    assert {"norm", "matmul_epilogue", "attention"} <= kinds
    # Every attention runs as the fused kernel: no SDPA call is left in the runner's graph.
    assert not any("scaled_dot_product_attention" in call for call in result["aten_calls"])
    assert all(not name.startswith("attention_") for name in result["left_to_aten"]), result["left_to_aten"]


def test_zoo_models_lower_every_region_the_templates_cover(interpreted):
    # What stays ATen, and why, is a short list: ops with no rule and views with no flat-index form.
    reasons = {reason for model in ("preln-tiny", "gpt2-tiny", "vit-s", "minilm") for reason in interpreted[model]["left_to_aten"].values()}
    expected = ("no Triton lowering", "no flat-index form", "elements", "both reshaping and expanding")
    assert all(any(why in r for why in expected) for r in reasons), reasons


def test_packed_minilm_runs_its_token_wise_regions_as_kernels(interpreted):
    # After remove_padding the token count is data-dependent: the kernels take it at each call,
    # and attention is graphopt::varlen_attention (its CUDA kernel is the varlen Triton template).
    packed = interpreted["minilm-packed"]
    assert packed["error"] < 1e-4, packed["backend_check"]
    kinds = sorted(packed["kinds"].values())
    assert kinds.count("matmul_epilogue") == 18 and kinds.count("norm") >= 12
    assert "graphopt.varlen_attention.default" in packed["aten_calls"]
    assert not any("scaled_dot_product_attention" in call for call in packed["aten_calls"])


def test_launcher_refusing_the_example_shapes_falls_back_to_aten(interpreted):
    rank5 = interpreted["rank5"]
    assert rank5["error"] < 1e-5
    assert rank5["kernels"] == {} and rank5["kernel_modules"] == []
    assert list(rank5["left_to_aten"]) == ["fused_0"] and "does not collapse to 4 dimensions" in rank5["left_to_aten"]["fused_0"]
    assert rank5["backend_check"] == "rel_err=0"


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a machine with neither CUDA nor the interpreter")
def test_no_cuda_is_one_clear_error():
    with pytest.raises(RuntimeError) as raised:
        graphopt.optimize(torch.nn.ReLU(), [], (torch.randn(3),), backend="triton")
    message = str(raised.value)
    assert "\n" not in message and "needs a CUDA device" in message
    assert "backend='eager'" in message and "backend='inductor'" in message and "TRITON_INTERPRET=1" in message


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter is on in this process")
def test_interpret_true_without_the_environment_variable_says_what_to_set():
    x = torch.randn(3)
    gm = capture(torch.nn.ReLU(), (x,))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        get_backend("triton")(gm, (x,), {}, interpret=True)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter is on in this process")
def test_optimize_passes_backend_options_through():
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()).eval(), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        graphopt.optimize(model, [], (x,), backend="triton", backend_options={"interpret": True})
