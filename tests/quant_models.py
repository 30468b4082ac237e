"""Models shared by the quantization pass tests (tests/passes/test_quantize_int8.py,
test_smooth_quant.py, test_quantize_weights.py, test_cast_bf16.py)."""

import pytest
import torch
from torch import nn

from graphopt.ops.quant import cpu as quant_cpu


class PreLNBlock(nn.Module):
    """Pre-LN transformer MLP block: ``x + fc2(gelu(fc1(LN(x))))``, then a head linear."""

    def __init__(self, d: int = 64, hidden: int = 256, outlier: float | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2, self.head = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, 32)
        if outlier is not None:
            # one channel of the norm's output `outlier` times the others, read through weights as
            # many times smaller (what trained LLMs learn, Dettmers et al. 2022): the function is
            # unchanged, but a per-token int8 step sized by that channel swamps all the others
            with torch.no_grad():
                self.norm.weight[7] *= outlier
                self.norm.bias[7] *= outlier
                self.fc1.weight[:, 7] /= outlier

    def forward(self, x):
        h = x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(h)


def block(outlier: float | None = None, seed: int = 0) -> PreLNBlock:
    torch.manual_seed(seed)
    return PreLNBlock(outlier=outlier).eval()


def tokens(batch: int = 4, length: int = 32, d: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def int8_pays(monkeypatch):
    """``set(bool)``: make every int8 / weight-only path measure faster (True) or slower (False)
    than fp32, so the speed rule is tested without depending on this machine's timings."""

    def set_(pays: bool):
        fast, slow = (1e-4, 2e-4) if pays else (2e-4, 1e-4)
        monkeypatch.setattr(quant_cpu, "int8_timings", lambda m, n, k: {"onednn": fast, "aten_fp32": slow})
        monkeypatch.setattr(quant_cpu, "weight_only_timings", lambda m, n, k, g: {"gemv": fast, "dequant": fast * 2, "aten_fp32": slow})
        monkeypatch.setattr(quant_cpu, "c_kernels", quant_cpu.c_kernels)

    return set_
