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
from graphopt.capture import capture

_RUN_MODELS = """
import json, sys, torch
import torch.nn.functional as F
from torch import nn
import graphopt
from graphopt import zoo
from graphopt.backends.triton_backend import TritonKernel


class MLP(nn.Module):
    # A lowerable pointwise prologue, two matmul epilogues (gelu, residual add), and a pointwise
    # region after an opaque cumsum with sin, which has no Triton lowering.
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = F.gelu(x * 0.5 + 1.0)
        h = h + F.gelu(self.down(F.gelu(self.up(h))))
        return torch.sin(torch.cumsum(h, -1)) * 2.0 + torch.tanh(x) * x


class Rank5(nn.Module):
    # Lowerable ops, but a permuted 5-D input no launcher can index in 4 dimensions.
    def forward(self, x, y):
        return torch.exp(x) * y + 1.0


torch.manual_seed(0)
preln = zoo.load("preln-tiny")
cases = {
    "mlp": (MLP().eval(), (torch.randn(4, 8, 16),), []),
    "preln": (preln.model, preln.example_inputs, ["canonicalize"]),
    "rank5": (Rank5(), (torch.randn(2, 3, 4, 5, 6).permute(4, 2, 0, 3, 1), torch.randn(6, 4, 2, 5, 3)), []),
}
summary = {}
for name, (model, inputs, passes) in cases.items():
    optimized = graphopt.optimize(model, passes, inputs, backend="triton")
    runner = optimized._runner
    with torch.no_grad():
        error = (optimized(*inputs) - model(*inputs)).abs().max().item()
    summary[name] = {
        "error": error,
        "kernels": optimized.kernels,
        "left_to_aten": runner.left_to_aten,
        "kernel_modules": sorted(n for n, m in runner.named_children() if isinstance(m, TritonKernel)),
        "backend_check": optimized.report.final["triton vs graph"],
    }
json.dump(summary, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def interpreted(python_interpreted, tmp_path_factory):
    """What each model did under ``backend="triton"``, in the Triton interpreter."""
    out = tmp_path_factory.mktemp("triton_backend") / "summary.json"
    python_interpreted(_RUN_MODELS, str(out))
    return json.loads(out.read_text())


def test_mlp_pointwise_regions_run_as_kernels(interpreted):
    mlp = interpreted["mlp"]
    assert mlp["error"] < 1e-5
    assert list(mlp["kernels"]) == mlp["kernel_modules"] == ["fused_0"]
    assert "@triton.jit" in mlp["kernels"]["fused_0"] and "tl.math.erf" in mlp["kernels"]["fused_0"]  # the gelu
    reasons = mlp["left_to_aten"]
    assert sorted(r for r in reasons.values() if r.startswith("matmul_epilogue region")) == [reasons["fused_1"], reasons["fused_2"]]
    assert reasons["fused_3"] == "no Triton lowering for aten.sin.default"


def test_preln_tiny_keeps_what_cannot_lower_as_aten(interpreted):
    preln = interpreted["preln"]
    assert preln["error"] < 1e-5
    assert preln["kernels"] == {} and preln["kernel_modules"] == []
    kinds = {reason.split(" region")[0] for reason in preln["left_to_aten"].values() if " region:" in reason}
    assert kinds == {"norm", "matmul_epilogue"}
    # The attention-mask arithmetic is pointwise but holds views, which the generator does not lower.
    assert any("aten.unsqueeze" in reason for reason in preln["left_to_aten"].values())


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
    assert "backend='eager'" in message and "backend='inductor'" in message and "interpret=True" in message


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
