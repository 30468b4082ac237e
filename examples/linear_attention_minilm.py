"""Convert the real all-MiniLM-L6-v2's attention to Hedgehog linear attention, recover, and measure.

    python examples/linear_attention_minilm.py           # about 40 s on 2 quiet CPU cores

1. ``attention_to_linear(feature_map="hedgehog")`` replaces every SDPA by linear attention with a
   learned feature map and fits each map alone on the layer's inputs (attention transfer) over the
   calibration batches;
2. ``recover`` fine-tunes the maps end to end against the original model;
3. fidelity is measured on real sentences neither step saw.

Training text: the docstrings of a few standard-library modules; evaluation: ``zoo.real_sentences``
(docstrings of standard-library callables). ``bench/attention_fidelity.py`` is the full measurement.
"""

import importlib
import inspect
import re

import torch

import graphopt
from graphopt.passes.attention_to_linear import AttentionToLinear
from graphopt.tools import zoo
from graphopt.tools.attention_transfer import recover


def sentences_from(modules: list[str]) -> list[str]:
    text = " ".join(" ".join((inspect.getdoc(importlib.import_module(m)) or "").split()) for m in modules)
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if 5 <= len(s.split()) <= 60]


def mean_cosine(model, reference, batches) -> float:
    with torch.no_grad():
        return torch.cat([torch.nn.functional.cosine_similarity(model(*b), reference(*b)) for b in batches]).mean().item()


entry = zoo.load("minilm")
train_text = sentences_from(["json", "argparse", "collections", "logging", "pathlib", "subprocess", "unittest", "csv"])[:64]
train = [zoo.tokenize(entry.tokenizer, train_text[i : i + 8]) for i in range(0, len(train_text), 8)]
held_out = [zoo.tokenize(entry.tokenizer, zoo.real_sentences(64)[i : i + 8]) for i in range(0, 64, 8)]

fast = graphopt.optimize(
    entry.model,
    ["canonicalize", AttentionToLinear(feature_map="hedgehog", transfer_steps=60, min_cosine=0.0)],
    train[0],
    calibration=train[1:],
)
print(fast.report)
print(f"after the pass: mean cosine {mean_cosine(fast, entry.model, held_out):.4f} on {64} held-out sentences")
recover(fast.graph_module, entry.model, train, steps=60, log=print, log_every=20)
print(f"after recovery: mean cosine {mean_cosine(fast, entry.model, held_out):.4f}")
