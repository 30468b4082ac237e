"""Fixtures for op tests: the norms' Triton launchers run by the Triton interpreter (see tests/conftest.py)."""

import pytest

_RUN_LAUNCHERS = """
import sys, torch
from graphopt.ops.norms import triton as triton_norm
calls = torch.load(sys.argv[1])
torch.save({name: getattr(triton_norm, launcher)(*args) for name, (launcher, args) in calls.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def run_interpreted(interpreted_call):
    """``run({name: (launcher, args)}) -> {name: output}``: launchers of ``graphopt.ops.norms.triton``
    called in the Triton interpreter (see ``python_interpreted``)."""
    return lambda calls: interpreted_call(_RUN_LAUNCHERS, calls)
