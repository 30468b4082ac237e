"""Fidelity of ``attention_to_linear`` on the real all-MiniLM-L6-v2, before and after recovery.

    python bench/attention_fidelity.py                 # writes bench/results/attention_fidelity.{json,md}
    python bench/attention_fidelity.py --quick --out /tmp/q   # a smoke run: fewer configurations and steps

Data. Calibration and recovery never see the evaluation text:

* **train**: sentences from the docstrings of standard-library *modules* (``json``, ``argparse``,
  ``collections``, ...), split at sentence ends, 5-60 words, batches of 8 padded to their longest;
* **evaluation, sentences**: the zoo's 128 real sentences (``zoo.real_sentences(128)``, docstrings
  of standard-library *callables*), batches of 8 padded to their longest;
* **evaluation, long passages**: whole module docstrings of other modules, 200-512 tokens each.

Measured per configuration: mean and min cosine of the sentence embeddings against the original
model, nearest-neighbour agreement over the 128 sentences, the same cosines on the long passages,
the conversion time (the pass, with its layer-local attention transfer) and the recovery time
(:func:`graphopt.tools.attention_transfer.recover`). Configurations: each feature map with every
layer converted; Hedgehog with 1, 3 and 6 layers converted (the last ones); recovery of the relu and
Hedgehog conversions of all layers. Everything at 2 threads unless ``--threads``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphopt  # noqa: E402
from graphopt.passes.attention_to_linear import AttentionToLinear  # noqa: E402
from graphopt.tools import zoo  # noqa: E402
from graphopt.tools.attention_transfer import recover  # noqa: E402
from harness import environment, load_snapshot  # noqa: E402

TRAIN_MODULES = ("json", "argparse", "collections", "logging", "pathlib", "subprocess", "unittest", "email", "csv", "itertools", "functools", "datetime")
PASSAGE_MODULES = ("pickle", "tarfile", "zipfile", "shutil", "tempfile", "difflib", "textwrap", "heapq", "string", "decimal", "fractions", "statistics")


def _module_doc(name: str) -> str:
    try:
        return " ".join((inspect.getdoc(importlib.import_module(name)) or "").split())
    except ImportError:
        return ""


def train_sentences(limit: int, modules: tuple[str, ...] = TRAIN_MODULES) -> list[str]:
    out = []
    for name in modules:
        for sentence in re.split(r"(?<=[.!?])\s+", _module_doc(name)):
            if 5 <= len(sentence.split()) <= 60 and sentence not in out:
                out.append(sentence)
    return out[:limit]


# Recovery data for long passages: docstrings of other modules, whole, so that a training input is
# as long as an evaluation passage.
PASSAGE_TRAIN_MODULES = TRAIN_MODULES + (
    "asyncio", "inspect", "typing", "threading", "socket", "sqlite3", "configparser", "dataclasses", "enum", "contextlib",
    "io", "os", "re", "random", "http.client", "urllib.request", "xml.etree.ElementTree", "ast", "dis", "codecs",
    "locale", "gettext", "optparse", "pdb", "doctest", "trace", "timeit", "cmd", "queue", "sched", "selectors", "signal",
)  # fmt: skip


def train_passages(limit: int, words: int = 250) -> list[str]:
    """Passages of ``words`` words (the last of a text at least 150) cut from the docstrings of
    ``PASSAGE_TRAIN_MODULES``: each module's docstring, then its classes' and functions' in name
    order, joined. Never a module of ``PASSAGE_MODULES``, the long-passage evaluation text."""
    out = []
    for name in PASSAGE_TRAIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(module) or ""]
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
                parts.append(inspect.getdoc(obj) or "")
        text = " ".join(" ".join(parts).split()).split()
        out += [" ".join(text[i : i + words]) for i in range(0, len(text), words) if len(text[i : i + words]) >= 150]
    return out[:limit]


def long_passages(tokenizer, limit: int) -> list[str]:
    passages = []
    for name in PASSAGE_MODULES:
        doc = _module_doc(name)
        if len(tokenizer(doc)["input_ids"]) >= 200:
            passages.append(doc)
    return passages[:limit]


def batches_of(tokenizer, texts: list[str], size: int = 8, max_length: int = 128) -> list[tuple]:
    return zoo.tokenize_batches(tokenizer, texts, size, max_length=max_length)


def embed(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*b) for b in batches])


def scores(model, reference: dict, data: dict) -> dict:
    sentences, passages = embed(model, data["sentences"]), embed(model, data["passages"])
    cos = F.cosine_similarity(sentences, reference["sentences"])
    long_cos = F.cosine_similarity(passages, reference["passages"])
    return {
        "mean cosine": cos.mean().item(),
        "min cosine": cos.min().item(),
        "NN agreement": zoo.nearest_neighbour_agreement(sentences, reference["sentences"]),
        "passages mean cosine": long_cos.mean().item(),
        "passages min cosine": long_cos.min().item(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: two configurations, few steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--transfer-steps", type=int, default=100, help="attention-transfer steps per layer inside the pass")
    parser.add_argument("--recovery-steps", type=int, default=150)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="attention_fidelity")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    entry = zoo.load("minilm")
    model, tokenizer = entry.model, entry.tokenizer
    train = batches_of(tokenizer, train_sentences(16 if args.quick else 96))
    data = {
        "sentences": batches_of(tokenizer, zoo.real_sentences(16 if args.quick else 128)),
        "passages": batches_of(tokenizer, long_passages(tokenizer, 4 if args.quick else 12), 4, 512),
    }
    reference = {k: embed(model, v) for k, v in data.items()}
    transfer_steps = 10 if args.quick else args.transfer_steps
    recovery_steps = 5 if args.quick else args.recovery_steps
    before = load_snapshot()
    started = time.perf_counter()

    plans = [("relu", None), ("elu", None), ("hedgehog", None), ("hybrid", None), ("hedgehog", [5]), ("hedgehog", [3, 4, 5])]
    if args.quick:
        plans = [("relu", None), ("hybrid", None)]
    recovered_maps = ("relu",) if args.quick else ("relu", "hedgehog")
    rows = []
    for feature_map, layers in plans:
        t = time.perf_counter()
        opt = graphopt.optimize(
            model,
            ["canonicalize", AttentionToLinear(feature_map=feature_map, layers=layers, transfer_steps=transfer_steps, min_cosine=0.0)],
            train[0],
            calibration=train[1:8],
        )
        convert_s = time.perf_counter() - t
        converted = opt.report.record("attention_to_linear").stats["converted"]
        row = {"feature map": feature_map, "layers converted": converted, "recovery": "none", "convert s": round(convert_s, 1), "recover s": 0.0}
        row.update(scores(opt, reference, data))
        rows.append(row)
        print(row, flush=True)
        if layers is None and feature_map in recovered_maps:
            t = time.perf_counter()
            recover(
                opt.graph_module,
                model,
                train,
                recovery_steps,
                train="maps" if feature_map == "hedgehog" else "attention",
                lr=1e-3 if feature_map == "hedgehog" else 2e-4,
            )
            row = {**row, "recovery": f"{recovery_steps} steps", "recover s": round(time.perf_counter() - t, 1)}
            row.update(scores(opt, reference, data))
            rows.append(row)
            print(row, flush=True)
    elapsed = time.perf_counter() - started
    after = load_snapshot()

    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "rows": rows, "load": [before, after], "seconds": elapsed, "threads": args.threads}
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2))
    table = tabulate(
        [[r[k] if not isinstance(r[k], float) or k.endswith(" s") else f"{r[k]:.4f}" for k in rows[0]] for r in rows],
        headers=list(rows[0]),
        tablefmt="github",
        disable_numparse=True,
    )
    text = f"""# {args.name}

{", ".join(f"{k} {v}" for k, v in env.items() if v is not None)}; {args.threads} threads.
Machine load: before {before}; after {after}; the run took {elapsed:.0f} s.

{__doc__.split(chr(10) + chr(10), 1)[1]}
Attention transfer inside the pass: {transfer_steps} Adam steps per layer (lr 1e-2) on the
recorded inputs of {len(train[:8])} training batches. Recovery: {recovery_steps} AdamW steps over
{len(train)} training batches (relu: the attention projections, lr 2e-4; Hedgehog: the feature maps
only, lr 1e-3), cosine on the embeddings plus the per-layer transfer loss.

{table}
"""
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
