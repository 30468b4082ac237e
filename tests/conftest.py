"""Shared fixtures: small deterministic models for tests of the core."""

import pytest
import torch


class TinyMLP(torch.nn.Module):
    """linear -> relu -> layer_norm -> linear, returning a dict (a pytree output)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.norm = torch.nn.LayerNorm(2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm(torch.relu(self.fc1(x)))
        return {"out": self.fc2(h), "hidden": h}


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP().eval(), (torch.randn(2, 5, 8),)
