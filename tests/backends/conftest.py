"""Fixtures for backend tests: Triton kernels run by the Triton interpreter, on CPU, in a subprocess."""

import pytest
import torch

_RUN_LAUNCHERS = """
import sys, torch
from graphopt.backends import triton_norm
calls = torch.load(sys.argv[1])
torch.save({name: getattr(triton_norm, launcher)(*args) for name, (launcher, args) in calls.items()}, sys.argv[2])
"""


@pytest.fixture(scope="session")
def python_interpreted(interpreted_python):
    """``run(script, *argv)``: run Python ``script`` in a fresh process with ``TRITON_INTERPRET=1``
    (see ``interpreted_python`` in tests/conftest.py)."""
    return lambda script, *argv: interpreted_python("-c", script, *argv)


@pytest.fixture(scope="session")
def interpreted_call(python_interpreted, tmp_path_factory):
    """``call(script, payload, *argv) -> result``: ``payload`` saved with ``torch.save``, ``script``
    run by ``python_interpreted`` with ``sys.argv[1:]`` = (payload file, result file, *argv), and
    the result it saved loaded back. One subprocess runs a whole batch of kernel cases."""

    def call(script: str, payload, *argv: str):
        tmp = tmp_path_factory.mktemp("triton_interpreter")
        inputs, outputs = tmp / "inputs.pt", tmp / "outputs.pt"
        torch.save(payload, inputs)
        python_interpreted(script, str(inputs), str(outputs), *argv)
        return torch.load(outputs)

    return call


@pytest.fixture(scope="module")
def run_interpreted(interpreted_call):
    """``run({name: (launcher, args)}) -> {name: output}``: launchers of ``graphopt.backends.triton_norm``
    called in the Triton interpreter (see ``python_interpreted``)."""
    return lambda calls: interpreted_call(_RUN_LAUNCHERS, calls)
