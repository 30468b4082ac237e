"""The pass tests run with the canonical IR checked after capture and after every pass
(``GRAPHOPT_CHECK_IR``, see graphopt/ir/spec.py): a pass that breaks the IR fails its own tests,
at the pass that broke it. The checks cost milliseconds per graph."""

import pytest


@pytest.fixture(autouse=True)
def _check_the_ir_after_every_pass(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CHECK_IR", "1")


from quant_models import int8_pays  # noqa: E402, F401  (a fixture of the quantization pass tests)
