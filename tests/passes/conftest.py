"""The pass tests run with the canonical IR checked after capture and after every pass
(``GRAPHOPT_CHECK_IR``, see graphopt/ir/spec.py): a pass that breaks the IR fails its own tests,
at the pass that broke it. The checks cost milliseconds per graph."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _check_the_ir_after_every_pass(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CHECK_IR", "1")


from quant_models import int8_pays  # noqa: E402, F401  (a fixture of the quantization pass tests)


@pytest.fixture(scope="module")
def tiny_bert():
    """A 2-layer random-init BERT as users load it (SDPA), ids ``[2, 24]`` and a mask whose second row ends in 7 pads."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    return model, ids, mask
