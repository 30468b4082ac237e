"""Inductor's shapes: graphopt + inductor against inductor on the real MiniLM, static and dynamic.

    python bench/inductor_shapes.py            # writes bench/results/inductor_shapes.{json,md}
    python bench/inductor_shapes.py --rounds 3 --batches 2

The foundation bench had graphopt + inductor slower than inductor on MiniLM. There the inductor
baseline was ``torch.compile(model, dynamic=False)`` (a static compile per padded length), while
graphopt's inductor backend called ``torch.compile(gm)`` with torch's default ``dynamic=None``,
which recompiles with symbolic shapes at the second length. This script puts the two shape modes of
both side by side in one process (see bench/harness.py: interleaved rounds, medians, ratios against
plain inductor static), on one thread:

* "varying lengths": real sentences, batches of 8 padded to their longest sentence (a new shape
  per batch, as a server sees them);
* "padded to 128": the same sentences, every batch padded to 128 tokens (one shape).

Besides the steady-state median, every configuration's notes give the seconds spent in first calls
on a new input shape (compilation for the static modes), summed over the case's batches.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Built, Case, Config, graphopt_pipeline, inductor, run_case, write_results  # noqa: E402

from graphopt.tools import zoo  # noqa: E402

PASSES = ["canonicalize"]  # what applied to MiniLM in the foundation bench: the graph, not a pass, is compared


def _first_calls_timed(config: Config, spent: dict[str, float]) -> Config:
    """``config`` whose callable adds the seconds of each first call on a new input shape to
    ``spent[config.name]`` (the build's own first call is in the harness's build seconds)."""

    def build(model, example):
        built = config.build(model, example)
        seen: set = {tuple(tuple(x.shape) for x in example if isinstance(x, torch.Tensor))}
        spent[config.name] = 0.0

        def fn(*inputs):
            key = tuple(tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor))
            if key in seen:
                return built.fn(*inputs)
            t0 = time.perf_counter()
            out = built.fn(*inputs)
            spent[config.name] += time.perf_counter() - t0
            seen.add(key)
            return out

        return Built(fn, built.flops, built.param_bytes, built.notes)

    return Config(config.name, build)


def _configs(spent: dict[str, float]) -> list[Config]:
    configs = [
        inductor(dynamic=False),
        inductor(dynamic=True),
        graphopt_pipeline(PASSES, "inductor", name="graphopt/inductor static", backend_options={"dynamic": False}),
        graphopt_pipeline(PASSES, "inductor", name="graphopt/inductor dynamic", backend_options={"dynamic": True}),
        graphopt_pipeline(PASSES, "inductor", name="graphopt/inductor torch default", backend_options={"dynamic": None}),
    ]
    configs[0].name, configs[1].name = "inductor static", "inductor dynamic"
    return [_first_calls_timed(c, spent) for c in configs]


def _cpu() -> dict[str, str]:
    """lscpu's model name and flags (inductor's CPU code depends on the vector extensions)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: fields.get(k, "").strip() for k in ("Model name", "CPU(s)", "Flags")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3, help="batches of 8 sentences per case")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    entry = zoo.load("minilm")
    sentences = zoo.real_sentences(8 * args.batches)
    chunks = [sentences[i : i + 8] for i in range(0, len(sentences), 8)]
    cases = [
        Case("minilm, varying lengths", entry.model, [zoo.tokenize(entry.tokenizer, c) for c in chunks], []),
        Case("minilm, padded to 128", entry.model, [zoo.tokenize(entry.tokenizer, c, pad_to=128) for c in chunks], []),
    ]
    rows, started = [], time.perf_counter()
    for case in cases:
        spent: dict[str, float] = {}
        case.configs = _configs(spent)
        case_rows = run_case(case, rounds=args.rounds, warmup=1)
        for row in case_rows:
            other_shapes = f"first calls on {len(case.batches) - 1} other batches {spent[row.config]:.1f} s"
            row.notes = f"{row.notes}; {other_shapes}" if row.notes else other_shapes
        rows += case_rows
    cpu = _cpu()
    # the machine may be shared: a load above the thread count makes every median noisier
    extra = {
        "cpu": cpu,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "passes": PASSES,
        "wall_s": round(time.perf_counter() - started, 1),
        "attn_implementation": getattr(entry.model.bert.config, "_attn_implementation", None),
    }
    json_path, md_path = write_results(rows, args.out, "inductor_shapes", extra=extra)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {extra['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
