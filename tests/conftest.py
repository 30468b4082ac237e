"""Shared fixtures: small deterministic models for tests of the core, and the Triton interpreter."""

import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def interpreted_python():
    """``run(*args) -> CompletedProcess``: ``python *args`` in a fresh process with ``TRITON_INTERPRET=1``,
    asserted to succeed (its stderr tail is the failure message); its stdout is captured.

    The interpreter must be chosen before ``triton`` is first imported (its own library kernels are
    decorated then), and ``import graphopt`` imports it (through inductor), so an in-process switch
    cannot work; the subprocess also keeps the variable away from every other test.
    """
    pytest.importorskip("triton")

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run


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
