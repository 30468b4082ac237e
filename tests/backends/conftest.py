"""Fixtures for backend tests: Triton kernels run by the Triton interpreter, on CPU, in a subprocess."""

import os
import subprocess
import sys

import pytest
import torch

_RUN_LAUNCHERS = """
import sys, torch
from graphopt.backends import triton_norm
calls = torch.load(sys.argv[1])
torch.save({name: getattr(triton_norm, launcher)(*args) for name, (launcher, args) in calls.items()}, sys.argv[2])
"""


@pytest.fixture(scope="session")
def python_interpreted():
    """``run(script, *argv)``: run Python ``script`` in a fresh process with ``TRITON_INTERPRET=1``.

    The interpreter must be chosen before ``triton`` is first imported (its own library kernels are
    decorated then), and ``import graphopt`` imports it (through inductor), so an in-process switch
    cannot work; the subprocess also keeps the variable away from every other test.
    """
    pytest.importorskip("triton")

    def run(script: str, *argv: str) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    return run


@pytest.fixture(scope="module")
def run_interpreted(python_interpreted, tmp_path_factory):
    """``run({name: (launcher, args)}) -> {name: output}``: launchers of ``graphopt.backends.triton_norm``
    called in the Triton interpreter (see ``python_interpreted``)."""
    tmp = tmp_path_factory.mktemp("triton_interpreter")

    def run(calls):
        inputs, outputs = tmp / "inputs.pt", tmp / "outputs.pt"
        torch.save(calls, inputs)
        python_interpreted(_RUN_LAUNCHERS, str(inputs), str(outputs))
        return torch.load(outputs)

    return run
