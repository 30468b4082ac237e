"""Whole Pre-LN models before and after ``layernorm_to_rmsnorm``, side by side, and where the time goes.

    python bench/rmsnorm_models.py            # writes bench/results/rmsnorm_models.{json,md}

Every graphopt configuration runs ``canonicalize`` first, so the "before" column is the same
canonical graph without the norm rewrite; ratios are to eager PyTorch in the same run. The
breakdown table measures, by ablation, what share of the eager graphs' time the norms take before
and after. The paper (Jiang et al., 2023) reports 1% to 10% less
inference time for Pre-RMSNorm on Pre-LN transformers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Case, eager, graphopt_pipeline, inductor, run_case, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt.tools import zoo  # noqa: E402

BEFORE = ["canonicalize"]
AFTER = ["canonicalize", "layernorm_to_rmsnorm"]
NORM_NODE_PREFIXES = ("layer_norm", "rms_norm", "crms_norm", "_rms_norm_eager", "_crms_norm_eager")


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


def _median_ms(fn, args, rounds: int = 30) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def norm_share(case: Case, passes) -> tuple[float, float]:
    """(ms, share of it spent in the norms) of the optimized graph on the eager backend, by ablation:
    the same runner with every norm replaced by its input, timed interleaved with the full one.
    (torch.profiler's per-event overhead is as large as a small norm, so it cannot tell.)"""
    opt = graphopt.optimize(case.model, passes, case.batches[0], verify=False)
    full = opt.compiled.runner
    ablated = graphopt.ir.clone_graph_module(full)
    for node in list(ablated.graph.nodes):
        if node.op == "call_function" and node.name.startswith(NORM_NODE_PREFIXES):
            graphopt.ir.replace_node(node, node.args[0])
    graphopt.ir.cleanup(ablated)
    args = case.batches[0]
    with torch.no_grad():
        for fn in (full, ablated):
            _median_ms(fn, args, rounds=3)
        pairs = [(_median_ms(full, args, 5), _median_ms(ablated, args, 5)) for _ in range(6)]
    t_full = statistics.median(p[0] for p in pairs)
    t_ablated = statistics.median(p[1] for p in pairs)
    return t_full, max(0.0, (t_full - t_ablated) / t_full)


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
            shares.append({"case": case.name, "graph": label, "ms": round(ms, 2), "norm share": f"{share:.1%}"})
    breakdown = tabulate(shares, headers="keys", tablefmt="github")
    json_path, md_path = write_results(rows, args.out, "rmsnorm_models", extra={"norm_share": shares})
    note = "Norm share: time of the eager graph minus time of the same graph with every norm replaced by its input, over the former."
    md_path.write_text(md_path.read_text() + "\n## Where the time goes (eager)\n\n" + note + "\n\n" + breakdown + "\n")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
