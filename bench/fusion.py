"""Fusion statistics per zoo model: ATen ops before, fused kernels after, ops left to ATen, the
analytic memory traffic of the fused regions against the unfused ops they replace, and what the
``triton`` backend generates for them (kernels per template, regions left to ATen and why).

    python bench/fusion.py                    # writes bench/results/fusion.{json,md}

Memory traffic is what fusion saves on a GPU: a fused kernel reads its region's inputs and writes
its outputs once, where the unfused ops each read and write their own. Counted from ``meta["val"]``
shapes and dtypes (``graphopt.backends.partition.fusion_stats``), on the canonical graph after
graphopt's exact passes, at the zoo's example inputs. The kernel counts come from
``graphopt.backends.triton_backend.plan``, which generates every kernel's source without a GPU.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from tabulate import tabulate

import graphopt
from graphopt.tools import zoo
from graphopt.backends.partition import fusion_stats
from graphopt.backends.triton_backend import plan

MODELS = {"minilm": {}, "gpt2-tiny": {}, "llama-tiny": {}, "vit-s": {}, "convnet-bn": {}, "preln-tiny": {}}
# remove_padding makes the token count data-dependent, which a static byte count cannot size;
# bench/remove_padding.py measures it.
EXACT = [name for name in graphopt.default_pass_names() if name != "remove_padding"]


def main() -> int:
    out = Path(__file__).resolve().parent / "results"
    rows = []
    for name, overrides in MODELS.items():
        entry = zoo.load(name, **overrides)
        opt = graphopt.optimize(entry.model, EXACT, entry.example_inputs, verify=False)
        stats = fusion_stats(opt.graph_module)
        _, lowerings = plan(opt.graph_module)
        generated = Counter(lowering.kind for lowering in lowerings.values() if lowering.source is not None)
        left = Counter(lowering.reason for lowering in lowerings.values() if lowering.source is None)
        rows.append(
            {
                "model": name,
                **{k: v for k, v in stats.items() if not isinstance(v, dict)},
                "triton_kernels": sum(generated.values()),
                "by_template": ", ".join(f"{kind} {count}" for kind, count in sorted(generated.items())),
                "regions_left_to_aten": "; ".join(f"{count}x {reason}" for reason, count in left.most_common()) or "none",
            }
        )
        print(name, stats, dict(generated), dict(left))
    out.mkdir(exist_ok=True)
    (out / "fusion.json").write_text(json.dumps({"passes": EXACT, "rows": rows}, indent=2))
    table = tabulate(rows, headers="keys", tablefmt="github")
    (out / "fusion.md").write_text(
        f"# fusion\n\nCanonical graphs after {', '.join(EXACT)}; zoo example inputs. `kernels` counts the partitioner's regions; "
        "`triton_kernels` the kernels the triton backend generates (its regions plus one per attention call), by template; "
        "bytes are the analytic traffic of the fused regions (each kernel reads its inputs and writes its outputs once) "
        f"against the unfused ATen ops they replace.\n\n{table}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
