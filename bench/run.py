"""Foundation benchmark: zoo models through eager, inductor and graphopt pipelines, side by side.

    python bench/run.py                       # all cases, writes bench/results/foundation.{json,md}
    python bench/run.py --models minilm --rounds 5

Each case runs in this one process (see bench/harness.py): ratios within a case are comparable,
absolute milliseconds are this machine's. Later issues add their own cases and configurations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Case, eager, graphopt_pipeline, inductor, run_case, write_results  # noqa: E402

from graphopt import default_pass_names  # noqa: E402
from graphopt.tools import zoo

EXACT_PASSES = default_pass_names()


def _configs(dynamic_shapes):
    return [
        eager(),
        inductor(),
        graphopt_pipeline(EXACT_PASSES, "eager", name="graphopt/eager", dynamic_shapes=dynamic_shapes),
        graphopt_pipeline(EXACT_PASSES, "inductor", name="graphopt/inductor", dynamic_shapes=dynamic_shapes),
    ]


def minilm_case(batch: int = 8) -> Case:
    """The real MiniLM on 64 real sentences, batches padded to their longest sentence."""
    entry = zoo.load("minilm")
    sentences = zoo.real_sentences(64)
    batches = zoo.tokenize_batches(entry.tokenizer, sentences, batch)
    return Case("minilm (64 sentences, batch 8)", entry.model, batches, _configs(entry.dynamic_shapes))


def zoo_case(name: str, **overrides) -> Case:
    entry = zoo.load(name, **overrides)
    return Case(name, entry.model, [entry.example_inputs], _configs(None))


CASES = {
    "minilm": minilm_case,
    "preln-tiny": lambda: zoo_case("preln-tiny"),
    "gpt2-tiny": lambda: zoo_case("gpt2-tiny"),
    "vit-s": lambda: zoo_case("vit-s"),
    "convnet-bn": lambda: zoo_case("convnet-bn"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="foundation")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        rows += run_case(CASES[name](), rounds=args.rounds)
    json_path, md_path = write_results(rows, args.out, args.name, extra={"passes": EXACT_PASSES})
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
