"""Randomized equivalence: tiny random models through the exact pass combinations, checked against the original.

    python bench/fuzz.py                      # 1000 cases, seed 0: writes bench/results/fuzz.{json,md}
    python bench/fuzz.py --cases 50 --seed 3

A case is one model configuration x one pass combination (graphopt/tools/fuzz.py has the space of
configurations and the checks). Each configuration is built and captured once and runs
``--per-config`` combinations: the full set of exact passes and a seeded sample of the others.
Configurations are drawn with ``random.Random(seed)``, so a seed gives the same cases on any machine.
Every failure is listed with its configuration as ``ModelConfig(...)`` source, ready to paste into a
regression test (tests/tools/test_fuzz_regressions.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment  # noqa: E402
from inductor_shapes import _cpu as lscpu  # noqa: E402
from tabulate import tabulate  # noqa: E402

from graphopt.pipeline.report import APPLIED  # noqa: E402
from graphopt.tools.fuzz import COMBINATIONS, EXACT_PASSES, CaseOutcome, random_config, run_config  # noqa: E402


def _combinations(rng: random.Random, per_config: int) -> list[tuple[str, ...]]:
    others = [c for c in COMBINATIONS if c != EXACT_PASSES]
    return [EXACT_PASSES, *rng.sample(others, min(per_config - 1, len(others)))]


def summarize(outcomes: list[CaseOutcome]) -> dict:
    per_pass: dict[str, Counter] = defaultdict(Counter)
    per_combination: dict[str, Counter] = defaultdict(Counter)
    per_family: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        for name in o.statuses or o.passes:  # no statuses: optimize raised before its report
            per_pass[name][o.statuses.get(name, "no report")] += 1
            per_pass[name]["in failed cases"] += not o.ok
        key = "+".join(o.passes)
        per_combination[key]["cases"] += 1
        per_combination[key]["failed" if not o.ok else "all applied" if all(o.statuses.get(p) == APPLIED for p in o.passes) else "ok"] += 1
        per_family[o.config.family]["cases"] += 1
        per_family[o.config.family]["failed"] += not o.ok
    return {
        "per_pass": {k: dict(v) for k, v in sorted(per_pass.items())},
        "per_combination": {k: dict(v) for k, v in sorted(per_combination.items())},
        "per_family": {k: dict(v) for k, v in sorted(per_family.items())},
    }


def write(outcomes: list[CaseOutcome], out_dir: Path, meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(outcomes)
    failures = [o for o in outcomes if not o.ok]
    payload = {
        **meta,
        "cases": len(outcomes),
        "configs": len({o.config for o in outcomes}),
        "failed": len(failures),
        **summary,
        "failures": [o.to_dict() for o in failures],
    }
    json_path, md_path = out_dir / "fuzz.json", out_dir / "fuzz.md"
    json_path.write_text(json.dumps(payload, indent=2))
    fates = ["applied", "unchanged", "not applicable", "rolled back", "no report", "in failed cases"]
    pass_rows = [[name, *(counts.get(f, 0) for f in fates)] for name, counts in summary["per_pass"].items()]
    combo_rows = [[k, v.get("cases", 0), v.get("all applied", 0), v.get("ok", 0), v.get("failed", 0)] for k, v in summary["per_combination"].items()]
    family_rows = [[k, v.get("cases", 0), v.get("failed", 0)] for k, v in summary["per_family"].items()]
    env = meta["environment"]
    lines = [
        "# fuzz: randomized equivalence of the exact passes",
        "",
        f"{len(outcomes)} cases ({payload['configs']} model configurations), seed {meta['seed']}, {len(failures)} failed, wall time {meta['wall_s']:.0f} s.",
        "",
        f"torch {env['torch']}, python {env['python']}, threads {env['threads']}, date {env['date']}; CPU: {meta['cpu'].get('Model name', '?')} ({meta['cpu'].get('CPU(s)', '?')} CPUs)",
        "",
        f"CPU flags: {meta['cpu'].get('Flags', '?')}",
        "",
        "A case passes when optimize raises nothing, no pass is rolled back, and the optimized module equals the original model",
        "(rel. error <= 1e-5, at the positions the applied passes declare) on the example and on a second batch of another size.",
        "",
        "## Per pass (report status in every case that ran it; a rolled-back pass is a failure)",
        "",
        tabulate(pass_rows, headers=["pass", *fates], tablefmt="github"),
        "",
        "## Per combination",
        "",
        tabulate(combo_rows, headers=["combination", "cases", "all applied", "ok (some not applicable)", "failed"], tablefmt="github"),
        "",
        "## Per model family",
        "",
        tabulate(family_rows, headers=["family", "cases", "failed"], tablefmt="github"),
        "",
        "## Failures",
        "",
    ]
    lines += [f"- `{'+'.join(o.passes)}` on `{o.config.describe()}`: {o.failure}" for o in failures] or ["none"]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="run at least this many cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-config", type=int, default=6, help="pass combinations per model configuration")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    meta = {"seed": args.seed, "per_config": args.per_config, "exact_passes": list(EXACT_PASSES), "environment": environment(), "cpu": lscpu()}
    outcomes: list[CaseOutcome] = []
    start = time.perf_counter()
    while len(outcomes) < args.cases:
        cfg = random_config(rng)
        batch = run_config(cfg, _combinations(rng, args.per_config))
        outcomes += batch
        failed = [o for o in batch if not o.ok]
        print(
            f"[{len(outcomes)}/{args.cases}] {time.perf_counter() - start:.0f}s {cfg.describe()}: {len(batch) - len(failed)} ok, {len(failed)} failed",
            flush=True,
        )
        for o in failed:
            print(f"    FAILED {'+'.join(o.passes)}: {o.failure}", flush=True)
        if len(outcomes) % 60 < args.per_config:  # partial results survive an interrupted run
            write(outcomes, Path(args.out), {**meta, "wall_s": time.perf_counter() - start, "complete": False})
    json_path, md_path = write(outcomes, Path(args.out), {**meta, "wall_s": time.perf_counter() - start, "complete": True})
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
