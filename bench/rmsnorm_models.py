"""Whole Pre-LN models before and after ``layernorm_to_rmsnorm``, side by side, and where the time goes.

    python bench/rmsnorm_models.py            # writes bench/results/rmsnorm_models.{json,md}

Every graphopt configuration runs ``canonicalize`` first, so the "before" column is the same
canonical graph without the norm rewrite; ratios are to eager PyTorch in the same run. The
breakdown table profiles the eager graphs (torch.profiler, self CPU time by op) to show what share
of the time the norms take before and after. The paper (Jiang et al., 2023) reports 1% to 10% less
inference time for Pre-RMSNorm on Pre-LN transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Case, eager, graphopt_pipeline, inductor, run_case, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402

BEFORE = ["canonicalize"]
AFTER = ["canonicalize", "layernorm_to_rmsnorm"]
NORM_OPS = ("aten::layer_norm", "aten::native_layer_norm", "graphopt::rms_norm", "graphopt::crms_norm")


def _configs():
    from graphopt.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm

    return [
        eager(),
        graphopt_pipeline(BEFORE, "eager", name="canonical/eager"),
        graphopt_pipeline(AFTER, "eager", name="rmsnorm/eager"),
        graphopt_pipeline(["canonicalize", LayerNormToRMSNorm(compress=True)], "eager", name="crmsnorm/eager"),
        inductor(),
        graphopt_pipeline(BEFORE, "inductor", name="canonical/inductor"),
        graphopt_pipeline(AFTER, "inductor", name="rmsnorm/inductor"),
    ]


def gpt2_case() -> Case:
    entry = zoo.load("gpt2-tiny")
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    return Case("gpt2-tiny (8x128 tokens)", entry.model, [(ids,)], _configs())


def vit_case() -> Case:
    entry = zoo.load("vit-s")
    return Case("vit-s (1x224px)", entry.model, [entry.example_inputs], _configs())


def preln_case() -> Case:
    entry = zoo.load("preln-tiny")
    return Case("preln-tiny", entry.model, [entry.example_inputs], _configs())


CASES = {"gpt2-tiny": gpt2_case, "vit-s": vit_case, "preln-tiny": preln_case}


def norm_share(case: Case, passes) -> tuple[float, float]:
    """(total ms, share of self CPU time in norm ops) of one eager run of the optimized graph."""
    opt = graphopt.optimize(case.model, passes, case.batches[0], verify=False)
    with torch.no_grad():
        for _ in range(3):
            opt(*case.batches[0])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                opt(*case.batches[0])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    norms = sum(e.self_cpu_time_total for e in events if e.key in NORM_OPS)
    return total / 5 / 1e3, norms / total if total else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    rows, shares = [], []
    for name in args.models.split(","):
        case = CASES[name]()
        rows += run_case(case, rounds=args.rounds)
        for label, passes in (("before (canonical)", BEFORE), ("after (rmsnorm)", AFTER)):
            ms, share = norm_share(case, passes)
            shares.append({"case": case.name, "graph": label, "profiled ms": round(ms, 2), "norm share": f"{share:.1%}"})
    breakdown = tabulate(shares, headers="keys", tablefmt="github")
    json_path, md_path = write_results(rows, args.out, "rmsnorm_models", extra={"norm_share": shares})
    md_path.write_text(md_path.read_text() + "\n## Where the time goes (eager, profiled)\n\n" + breakdown + "\n")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
