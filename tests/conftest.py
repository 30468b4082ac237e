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


@pytest.fixture
def graphopt_main(capfd):
    """``run(*args) -> CompletedProcess``: ``graphopt ARGS`` in this process, through the entry point the
    console script and ``python -m graphopt`` call (``main(argv)``, whose return value is the exit status);
    stdout and stderr are what reached the file descriptors 1 and 2 during the call. What a factory file
    adds to ``sys.path`` and ``sys.modules`` is taken back afterwards, as the end of its process would.
    Tests register passes of their own in this process: a command that runs the default pipeline (every
    registered exact pass) needs ``--passes`` here, or a subprocess."""
    from graphopt.frontends.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        path, modules = list(sys.path), set(sys.modules)
        capfd.readouterr()  # what came before is not this command's output
        try:
            status = main(argv)
        finally:
            out, err = capfd.readouterr()
            sys.path[:] = path
            for name in set(sys.modules) - modules:
                if name.startswith("graphopt_user_"):
                    del sys.modules[name]
        return subprocess.CompletedProcess(["graphopt", *argv], status, out, err)

    return run
