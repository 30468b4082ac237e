"""Fusion statistics per zoo model: ATen ops before, fused kernels after, ops left to ATen, and the
analytic memory traffic of the fused regions against the unfused ops they replace.

    python bench/fusion.py                    # writes bench/results/fusion.{json,md}

Memory traffic is what fusion saves on a GPU: a fused kernel reads its region's inputs and writes
its outputs once, where the unfused ops each read and write their own. Counted from ``meta["val"]``
shapes and dtypes (``graphopt.backends.partition.fusion_stats``), on the canonical graph after
graphopt's exact passes, at the zoo's example inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tabulate import tabulate

import graphopt
from graphopt import zoo
from graphopt.backends.partition import fusion_stats

MODELS = {"minilm": {}, "gpt2-tiny": {}, "llama-tiny": {}, "vit-s": {}, "convnet-bn": {}, "preln-tiny": {}}
EXACT = [name for name, cls in graphopt.available_passes().items() if cls.exact]


def main() -> int:
    out = Path(__file__).resolve().parent / "results"
    rows = []
    for name, overrides in MODELS.items():
        entry = zoo.load(name, **overrides)
        opt = graphopt.optimize(entry.model, EXACT, entry.example_inputs, verify=False)
        stats = fusion_stats(opt.graph_module)
        rows.append({"model": name, **{k: v for k, v in stats.items() if not isinstance(v, dict)}})
        print(name, stats)
    out.mkdir(exist_ok=True)
    (out / "fusion.json").write_text(json.dumps({"passes": EXACT, "rows": rows}, indent=2))
    table = tabulate(rows, headers="keys", tablefmt="github")
    (out / "fusion.md").write_text(f"# fusion\n\nCanonical graphs after {', '.join(EXACT)}; zoo example inputs.\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
