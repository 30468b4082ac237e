"""Weight-only linears at decoding shapes: where ``quantize_weights`` pays (memory-bound layers).

    python bench/quantize_weight_only.py        # writes bench/results/quantize_weight_only.{json,md}

One token (and four) through one linear, N x K from gpt2-tiny's 64-wide layers up to a 4096 x 4096
layer of a 7B-class model: the fp32 ``F.linear`` against graphopt's weight-only kernels
(``weight_only_linear_cpu`` with int8 per-channel weights, and int4 in groups of 32 and 128, each on
its matrix-vector path ``gemv`` and its dequantize-then-GEMM path), timed interleaved (medians),
at 1 and 2 threads. A layer pays when its weights do not fit in cache: reading a quarter (int8) or
an eighth (int4) of the bytes is the whole gain. The CPU model and flags are recorded.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment  # noqa: E402

from graphopt.ops.quant import cpu as quant_cpu  # noqa: E402
from graphopt.ops.quant.reference import quantize_int4_groupwise, quantize_per_channel  # noqa: E402

SHAPES = [(256, 64), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096)]  # (N, K)
ROWS = (1, 4)


def race(candidates: dict, rounds: int = 30) -> dict[str, float]:
    for fn in candidates.values():
        fn()
    runs = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) * 1e3 for name, seconds in runs.items()}


def main() -> int:
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n, k in SHAPES:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(n, k, generator=g) * 0.02
            q8, s8 = quantize_per_channel(w)
            q4 = {group: quantize_int4_groupwise(w, group) for group in (32, 128) if k % group == 0}
            for m in ROWS:
                x = torch.randn(m, k, generator=g)
                run = quant_cpu.weight_only_linear_cpu
                candidates = {"fp32": functools.partial(F.linear, x, w)}
                for path in quant_cpu.WEIGHT_ONLY_PATHS:
                    candidates[f"int8 {path}"] = functools.partial(run, x, q8, s8, None, 0, None, path=path)
                    for group, (packed, scale, zero) in q4.items():
                        candidates[f"int4 g{group} {path}"] = functools.partial(run, x, packed, scale, zero, group, None, path=path)
                ms = race(candidates, rounds=10 if n * k > 2e7 else 30)
                best8 = min(ms["int8 gemv"], ms["int8 dequant"])
                best4 = min((v for name, v in ms.items() if name.startswith("int4")), default=float("nan"))
                rows.append(
                    {
                        "threads": threads,
                        "N x K": f"{n}x{k}",
                        "tokens": m,
                        "fp32 MiB": round(n * k * 4 / 2**20, 1),
                        "fp32 ms": round(ms["fp32"], 4),
                        "int8 ms (best)": round(best8, 4),
                        "int8 speedup": round(ms["fp32"] / best8, 2),
                        "int4 ms (best)": round(best4, 4),
                        "int4 speedup": round(ms["fp32"] / best4, 2),
                        "all ms": {name: round(v, 4) for name, v in ms.items()},
                    }
                )
                print(rows[-1]["threads"], rows[-1]["N x K"], m, rows[-1]["fp32 ms"], rows[-1]["int8 speedup"], rows[-1]["int4 speedup"], flush=True)
    env = environment()
    out = Path(__file__).resolve().parent / "results"
    (out / "quantize_weight_only.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    table = tabulate([{k: v for k, v in r.items() if k != "all ms"} for r in rows], headers="keys", tablefmt="github")
    env_line = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    (out / "quantize_weight_only.md").write_text(
        f"# quantize_weight_only\n\n{env_line}\n\n{__doc__.split(chr(10), 3)[3].strip()}\n\n"
        "Speedups are fp32 time over the faster of graphopt's two paths for that format (medians of interleaved runs).\n\n"
        f"{table}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
