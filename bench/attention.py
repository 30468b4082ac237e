"""Long-context attention on CPU: SDPA against graphopt's linear, sliding-window and hybrid attention.

    python bench/attention.py                                  # both sections: bench/results/attention.{json,md} + attention_ops.png
    python bench/attention.py --sections ops                   # one section only (ops or models)
    python bench/attention.py --quick                          # smoke run (short lengths, few rounds): writes to /tmp/graphopt_bench_quick

Two sections, each measured side by side in this one process, configurations interleaved round by
round so that machine noise hits all of them alike, ratios taken within the run:

1. ``ops``: one attention layer, batch 1, 8 heads of 64, at 512 to 16384 tokens, causal and
   bidirectional: ``torch.nn.functional.scaled_dot_product_attention`` (the baseline) against
   ``graphopt::linear_attention`` (ReLU features, computed beforehand and not timed),
   ``graphopt::window_attention`` (window 256, 1 global token) and ``graphopt::hybrid_attention``
   (softmax on a window of 64 + linear attention on Hedgehog features, computed beforehand). Median
   latency and the peak of the bytes the call allocates (torch's profiler, below), with a log-log
   plot of both against the length.
2. ``models``: the zoo's random-init long-context models ``llama-long`` (decoder, causal, GQA) and
   ``bert-long`` (encoder, bidirectional) at 2048, 4096 and 8192 tokens, batch 1: eager PyTorch
   against graphopt ``[canonicalize]`` and ``[canonicalize, X]`` for X = ``attention_to_linear``
   (relu), ``attention_to_sparse`` (window 256) and ``attention_to_linear`` (hybrid, window 64).
   Fidelity is not measured here (random weights; ``bench/attention_fidelity.py`` does that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Built, Case, Config, Row, environment, load_snapshot, run_case  # noqa: E402

import graphopt  # noqa: E402
import graphopt.ops.linear_attention  # noqa: E402,F401  (registers graphopt::linear_attention, hybrid_attention)
import graphopt.ops.sparse_attention  # noqa: E402,F401  (registers graphopt::window_attention)
from graphopt.ops.linear_attention.feature_maps import eager as eager_call  # noqa: E402
from graphopt.ops.linear_attention.feature_maps import features, hedgehog_init  # noqa: E402
from graphopt.ops.platform import cpu_capabilities  # noqa: E402
from graphopt.passes.attention_to_linear import AttentionToLinear  # noqa: E402
from graphopt.passes.attention_to_sparse import AttentionToSparse  # noqa: E402
from graphopt.pipeline.report import APPLIED  # noqa: E402
from graphopt.tools import zoo  # noqa: E402

HEADS, HEAD_DIM = 8, 64
OP_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
MODEL_LENGTHS = (2048, 4096, 8192)
QUICK_OP_LENGTHS = (256, 512, 1024)
QUICK_MODEL_LENGTHS = (256, 512)
MODELS = ("llama-long", "bert-long")
SPARSE_WINDOW, GLOBAL_TOKENS, HYBRID_WINDOW = 256, 1, 64
METHODS = ("SDPA", "linear (relu)", f"window {SPARSE_WINDOW} + {GLOBAL_TOKENS} global", f"hybrid (window {HYBRID_WINDOW})")
MASKS = ("causal", "bidirectional")
_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def op_rounds(length: int) -> int:
    """Timed rounds at ``length``: fewer where one SDPA call takes seconds (the section stays within minutes)."""
    return 15 if length <= 1024 else 9 if length <= 2048 else 7 if length <= 4096 else 5 if length <= 8192 else 3


def model_rounds(length: int) -> int:
    return 5 if length <= 2048 else 3


# ----------------------------------------------------------------------------- peak memory


def peak_allocated_bytes(fn: Callable[[], object]) -> int | None:
    """The peak, during ``fn()``, of the bytes torch's CPU allocator holds beyond what it held when
    the call began: the output included, the inputs (allocated before) not.

    Measured with ``torch.profiler`` (``profile_memory=True``), which records every allocation and
    free of the CPU allocator with its size and time; replaying them in time order gives the
    high-water mark exactly, whatever glibc does with freed pages (RSS-based measures see its
    caching instead). Memory outside torch's allocator (oneDNN/MKL scratch, a few KiB to MiB) is not
    counted. Returns None where this torch's profiler does not expose the records.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    except AttributeError:
        return None
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


# ----------------------------------------------------------------------------- section 1: ops


@dataclass
class OpRow:
    length: int
    mask: str
    method: str
    median_ms: float
    ratio: float  # median / SDPA's median at the same length and mask (lower is faster)
    peak_mib: float | None  # peak extra MiB allocated during one call (output included)
    peak_ratio: float | None  # peak / SDPA's peak
    rounds: int
    times_ms: list[float] = field(default_factory=list)


def op_inputs(length: int) -> dict[str, torch.Tensor]:
    """``q, k, v`` ``[1, 8, L, 64]`` (fixed seed) and the feature maps the converted ops read."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=gen) for _ in range(3))
    weight = hedgehog_init(HEADS, HEAD_DIM, gen)
    return {
        "q": q,
        "k": k,
        "v": v,
        "fq": F.relu(q),
        "fk": F.relu(k),
        "hq": features(eager_call, "hedgehog", q, weight),  # [1, 8, L, 128]: [softmax(qW), softmax(-qW)]
        "hk": features(eager_call, "hedgehog", k, weight),
        "mix": torch.zeros(HEADS),
    }


def op_methods(x: dict[str, torch.Tensor], causal: bool) -> dict[str, Callable[[], torch.Tensor]]:
    ops = torch.ops.graphopt
    q, k, v = x["q"], x["k"], x["v"]
    return {
        METHODS[0]: lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        METHODS[1]: lambda: ops.linear_attention(x["fq"], x["fk"], v, None, causal),
        METHODS[2]: lambda: ops.window_attention(q, k, v, SPARSE_WINDOW, GLOBAL_TOKENS, None, causal),
        METHODS[3]: lambda: ops.hybrid_attention(q, k, v, x["hq"], x["hk"], x["mix"], HYBRID_WINDOW, None, causal),
    }


@torch.no_grad()
def run_ops(lengths, rounds_of: Callable[[int], int], log=print) -> list[OpRow]:
    rows: list[OpRow] = []
    for length in lengths:
        x = op_inputs(length)
        for mask in MASKS:
            fns = op_methods(x, mask == "causal")
            names = list(fns)
            # the profiled call is also the warm-up: it is not timed
            peaks = {name: peak_allocated_bytes(fn) for name, fn in fns.items()}
            rounds = rounds_of(length)
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
                    t0 = time.perf_counter()
                    fns[name]()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            base_ms, base_peak = statistics.median(times[METHODS[0]]), peaks[METHODS[0]]
            for name in names:
                med, peak = statistics.median(times[name]), peaks[name]
                rows.append(
                    OpRow(
                        length,
                        mask,
                        name,
                        med,
                        med / base_ms,
                        None if peak is None else peak / 2**20,
                        None if peak is None or not base_peak else peak / base_peak,
                        rounds,
                        [round(t, 3) for t in times[name]],
                    )
                )
                mem = "" if peak is None else f", peak +{peak / 2**20:.1f} MiB"
                log(f"[ops L={length} {mask}] {name}: {med:.2f} ms ({med / base_ms:.2f}x SDPA){mem}")
        del x
    return rows


def plot_ops(rows: list[OpRow], path: Path) -> str | None:
    """Log-log time (top) and peak memory (bottom) against the length, causal and bidirectional panels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e}"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for col, mask in enumerate(MASKS):
        for method, marker in zip(METHODS, "osD^"):
            pts = sorted((r.length, r.median_ms, r.peak_mib) for r in rows if r.mask == mask and r.method == method)
            if not pts:
                continue
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
            mem = [(p[0], p[2]) for p in pts if p[2]]
            axes[1][col].plot([m[0] for m in mem], [m[1] for m in mem], marker=marker, label=method)
        axes[0][col].set_title(f"{mask}: median time per call")
        axes[1][col].set_title(f"{mask}: peak extra memory per call")
        axes[0][col].set_ylabel("ms")
        axes[1][col].set_ylabel("MiB (output included)")
        axes[1][col].set_xlabel("sequence length (tokens)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"one attention layer, batch 1, {HEADS} heads x {HEAD_DIM}, fp32, {torch.get_num_threads()} thread(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- section 2: models


def pipelines() -> dict[str, list]:
    return {
        "graphopt[canonicalize]": ["canonicalize"],
        "graphopt[canonicalize,attention_to_linear(relu)]": ["canonicalize", AttentionToLinear(feature_map="relu", transfer_steps=0, min_cosine=0.0)],
        f"graphopt[canonicalize,attention_to_sparse(window {SPARSE_WINDOW})]": [
            "canonicalize",
            AttentionToSparse(pattern="window", window=SPARSE_WINDOW, global_tokens=GLOBAL_TOKENS, min_cosine=0.0),
        ],
        f"graphopt[canonicalize,attention_to_linear(hybrid, window {HYBRID_WINDOW})]": [
            "canonicalize",
            AttentionToLinear(feature_map="hybrid", window=HYBRID_WINDOW, transfer_steps=0, min_cosine=0.0),
        ],
    }


def _pass_notes(report) -> str:
    parts = []
    for r in report.records:
        text = f"{r.name}: {r.status}"
        if r.status == APPLIED and r.name.startswith("attention_to"):
            shown = {k: v for k, v in r.stats.items() if not isinstance(v, (list, dict))}
            text += f" ({', '.join(f'{k} {v}' for k, v in shown.items())})" if shown else ""
        elif r.status != APPLIED and r.reason:
            text += f" ({r.reason[:160]})"
        parts.append(text)
    return "; ".join(parts)


def attention_ops(gm) -> str:
    """The attention ops of a graph and how they are called: ``4x graphopt.window_attention(is_causal False, attn_mask bool[s0, 1, s1, s1])``."""
    found: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = str(node.target)
        if node.op != "call_function" or not ("attention" in name and (name.startswith("graphopt.") or "scaled_dot_product" in name)):
            continue
        schema = getattr(node.target, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        args = {**dict(zip(names, node.args)), **node.kwargs}
        mask = args.get("attn_mask")
        val = getattr(mask, "meta", {}).get("val") if mask is not None else None
        mask_text = "none" if mask is None else f"{str(val.dtype).removeprefix('torch.')}[{', '.join(str(d) for d in val.shape)}]" if val is not None else "yes"
        key = f"{name.removesuffix('.default')}(is_causal {args.get('is_causal', False)}, attn_mask {mask_text})"
        found[key] = found.get(key, 0) + 1
    return "; ".join(f"{n}x {k}" for k, n in found.items())


def eager_config() -> Config:
    return Config("eager", lambda model, example: Built(model))


def shared_config(name: str, passes: list, entry: zoo.ZooEntry, log=print) -> Config:
    """A graphopt pipeline built once, on the zoo's short example with dynamic batch and sequence,
    and reused by every length (the graph takes any length up to the model's positions)."""
    built: list[Built] = []

    def build(model, case_example):
        if not built:
            t0 = time.perf_counter()
            opt = graphopt.optimize(model, list(passes), entry.example_inputs, dynamic_shapes=entry.dynamic_shapes)
            notes = f"{_pass_notes(opt.report)}; graph: {attention_ops(opt.graph_module)}"
            log(f"  built {name} on {entry.name} in {time.perf_counter() - t0:.1f} s: {notes}")
            built.append(Built(opt, notes=notes))
        return built[0]

    return Config(name, build)


def model_batch(entry: zoo.ZooEntry, length: int) -> tuple:
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, entry.model.config.vocab_size, (1, length), generator=gen)
    return (ids,) if len(entry.example_inputs) == 1 else (ids, torch.ones_like(ids))


def run_models(lengths, rounds_of: Callable[[int], int], log=print) -> list[Row]:
    rows: list[Row] = []
    for model_name in MODELS:
        entry = zoo.load(model_name)
        configs = [eager_config()] + [shared_config(name, passes, entry, log) for name, passes in pipelines().items()]
        for length in lengths:
            case = Case(f"{model_name} [1, {length}]", entry.model, [model_batch(entry, length)], configs)
            # the build call and the fidelity call before the rounds warm every configuration up
            rows += run_case(case, rounds=rounds_of(length), warmup=0, log=log)
        del entry
    return rows


# ----------------------------------------------------------------------------- results


def cpu_summary() -> dict[str, str]:
    caps = cpu_capabilities()
    flags = " ".join(f for f in _FLAGS_OF_INTEREST if f in caps.flags) or "none of " + ", ".join(_FLAGS_OF_INTEREST)
    return {"cpu model": caps.model, "cpu flags": flags, "torch CPU capability": caps.torch_capability}


def ops_table(rows: list[OpRow]) -> str:
    table = [
        [
            r.length,
            r.mask,
            r.method,
            f"{r.median_ms:.2f}",
            f"{r.ratio:.3f}x",
            "" if r.peak_mib is None else f"{r.peak_mib:.1f}",
            "" if r.peak_ratio is None else f"{r.peak_ratio:.2f}x",
            r.rounds,
        ]
        for r in rows
    ]
    headers = ["tokens", "mask", "method", "median ms", "time vs SDPA", "peak MiB", "memory vs SDPA", "rounds"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def speedup_table(rows: list[OpRow]) -> str:
    """SDPA's time over each method's, one row per length, causal and bidirectional side by side."""
    by = {(r.length, r.mask, r.method): r for r in rows}
    lengths = sorted({r.length for r in rows})
    headers = ["tokens"] + [f"{mask}: {m}" for mask in MASKS for m in METHODS[1:]]
    table = []
    for length in lengths:
        line = [length]
        for mask in MASKS:
            for m in METHODS[1:]:
                r = by.get((length, mask, m))
                line.append("" if r is None else f"{1 / r.ratio:.1f}x")
        table.append(line)
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def models_table(rows: list[Row]) -> str:
    table = [[r.case, r.config, f"{r.median_ms:.1f}", f"{r.ratio:.3f}x", f"{r.cosine:.4f}", f"{r.build_s:.1f}", r.notes] for r in rows]
    headers = ["case", "configuration", "median ms", "vs eager", "cosine vs eager (random weights!)", "build s", "passes"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def models_summary(rows: list[Row]) -> str:
    configs = list(dict.fromkeys(r.config for r in rows))
    table = []
    for case in dict.fromkeys(r.case for r in rows):
        by = {r.config: r for r in rows if r.case == case}
        table.append([case, f"{by['eager'].median_ms:.0f}"] + [f"{by[c].ratio:.2f}x" if c in by else "" for c in configs[1:]])
    short = [c.removeprefix("graphopt[").removesuffix("]").replace("canonicalize,", "+ ") for c in configs[1:]]
    return tabulate(table, headers=["case", "eager ms"] + short, tablefmt="github", disable_numparse=True)


def markdown(name: str, env: dict, run: dict, op_rows: list[OpRow], model_rows: list[Row], plot_file: str | None, plot_note: str | None) -> str:
    env_line = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    parts = [
        f"""# {name}: long-context attention on CPU

{env_line}.
CPU as graphopt sees it (`graphopt.ops.platform.cpu_capabilities()`): {run["cpu"]["cpu model"]}, flags {run["cpu"]["cpu flags"]},
torch CPU capability {run["cpu"]["torch CPU capability"]}. torch threads {run["torch threads"]} (OMP_NUM_THREADS {run["OMP_NUM_THREADS"]}), transformers {run["transformers"]}.
Machine load: before {run["load before"]}; after {run["load after"]}; the run took {run["wall s"]} s ({run["command"]}).

What this measures: how the cost of attention grows with the sequence length on a CPU, for softmax
attention (PyTorch's SDPA, whose CPU kernel is a FlashAttention-style blocked loop: no `[L, L]`
matrix, but `L²` work) and for what graphopt's `attention_to_linear` and `attention_to_sparse`
passes replace it with: linear attention (`O(L·F·Dv)`), sliding-window attention with global tokens
(`O(L·window)`), and LoLCATs' hybrid (softmax on a window plus linear attention on the rest). Every
ratio is within this one run, configurations interleaved round by round (each round runs every
configuration once, the order rotated each round), so that load on the machine hits all of them
alike; medians over rounds. Absolute milliseconds depend on the machine and its load (recorded
above); compare ratios. Fidelity is not measured here: the op inputs are random and the models
have random weights, so agreement with softmax would mean nothing (`bench/attention_fidelity.py`
measures it on trained weights).
"""
    ]
    if op_rows:
        plot = f"\n![time and memory against length]({plot_file})\n" if plot_file else f"\n({plot_note})\n"
        parts.append(
            f"""## 1. One attention layer: time and memory against the length

Batch 1, {HEADS} heads of {HEAD_DIM}, fp32, `q, k, v` `[1, {HEADS}, L, {HEAD_DIM}]` of N(0, 1) values. Methods:

- **SDPA**: `torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=...)`, the baseline.
- **linear (relu)**: `torch.ops.graphopt.linear_attention(relu(q), relu(k), v, None, is_causal)`,
  what `attention_to_linear(feature_map="relu")` emits; the ReLU features are computed beforehand and
  not timed (in a model they are one elementwise op). Bidirectional: two GEMMs; causal: chunks of 64
  with a running state.
- **window {SPARSE_WINDOW} + {GLOBAL_TOKENS} global**: `torch.ops.graphopt.window_attention(q, k, v, {SPARSE_WINDOW}, {GLOBAL_TOKENS}, None, is_causal)`,
  what `attention_to_sparse(window={SPARSE_WINDOW})` emits: each query sees its window (`|i - j| <= {SPARSE_WINDOW // 2}`, or
  the last {SPARSE_WINDOW} keys when causal) and the first token, which itself sees everything.
- **hybrid (window {HYBRID_WINDOW})**: `torch.ops.graphopt.hybrid_attention(q, k, v, φq, φk, mix, {HYBRID_WINDOW}, None, is_causal)`,
  what `attention_to_linear(feature_map="hybrid", window={HYBRID_WINDOW})` emits: softmax on the window, linear
  attention on Hedgehog features `φ = [softmax(xW), softmax(-xW)]` (128 wide, `W` at its initial
  near-identity; computed beforehand, not timed) elsewhere, one normalizer.

Time: the median over the rounds given in the table ({run["op rounds"]}: fewer at long lengths, where one
SDPA call takes seconds), after one untimed warm-up call. Memory ("peak MiB"): the high-water mark, during one
call, of the bytes torch's CPU allocator holds beyond what it held when the call began (so the
{HEADS}·L·{HEAD_DIM}·4-byte output counts; the inputs, allocated before, do not), from the allocation and free
records of `torch.profiler` (`profile_memory=True`) replayed in time order. It is exact for tensors
and independent of how glibc caches freed pages (which makes RSS deltas unreliable in one process);
scratch memory outside torch's allocator (oneDNN/MKL buffers) is not counted. The profiled call is
the warm-up call. With more than one thread, allocations made inside OpenMP worker threads may be
missed by the profiler: the default run uses one thread.

Speed-up over SDPA (SDPA's median / the method's; higher is faster):

{speedup_table(op_rows)}
{plot}
All numbers:

{ops_table(op_rows)}
"""
        )
    if model_rows:
        parts.append(
            f"""## 2. Long-context models: eager against the converted graphs

The zoo's `llama-long` (Llama decoder, 4 layers, 256 wide, 4 query / 2 KV heads of 64, RoPE,
causal) and `bert-long` (BERT encoder, 4 layers, 256 wide, 4 heads of 64, bidirectional, all-ones
attention mask), random init, transformers' default SDPA attention, one sequence of random token ids
per case. Configurations: eager PyTorch (the model as loaded), graphopt `[canonicalize]` (the
captured graph, unchanged attention: what capture alone costs or saves), and `[canonicalize, X]` with
X = `attention_to_linear(feature_map="relu", transfer_steps=0, min_cosine=0)`,
`attention_to_sparse(window={SPARSE_WINDOW}, global_tokens={GLOBAL_TOKENS}, min_cosine=0)` and
`attention_to_linear(feature_map="hybrid", window={HYBRID_WINDOW}, transfer_steps=0, min_cosine=0)` (the hybrid's
Hedgehog maps at their initial value: attention transfer would only change the values, not the
cost). Each graphopt graph is captured once per model on the zoo's short example ([2, 64]) with
dynamic batch and sequence dims and reused at every length; "build s" is the build plus the first
call, so it is large for the first length of a model and small after. Latency: the median over rounds
({run["model rounds"]}) of one call, configurations interleaved.

**The weights are random, so the converted models' outputs are not meaningful and fidelity is not
reported**: the cosine column is shown for completeness only (how far a random network's output moves
when its attention changes), not as a quality measure.

How the attentions are called (the "graph:" part of the passes column): transformers builds a
materialized `[B, 1, L, L]` boolean mask for SDPA in both models. `llama-long` is called without an
attention mask, so its mask is a function of the positions alone; `canonicalize` proves it causal
(`graphopt.ir.masks`) and calls SDPA with `is_causal=True` and no mask, as eager transformers does,
and the converted ops run causal from the flag (`attention_to_sparse`'s window is then the last
{SPARSE_WINDOW} keys of each query). `bert-long`'s mask comes from its `attention_mask` input, so it stays a
`[B, 1, L, L]` tensor the converted ops read: `linear_attention` checks that it factors per key, an
`O(L²)` pass over a bool tensor that SDPA also reads; `window_attention` applies it on the visible pairs.

Ratios against eager (lower is faster):

{models_summary(model_rows)}

All numbers:

{models_table(model_rows)}
"""
        )
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="ops,models", help="comma-separated: ops, models")
    parser.add_argument("--quick", action="store_true", help="smoke run: ops at 256-1024 tokens, models at 256-512, few rounds (about a minute)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)), help="torch intra-op threads (default 1)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results; with --quick /tmp/graphopt_bench_quick)")
    parser.add_argument("--name", default="attention", help="results are <out>/<name>.{json,md} and <name>_ops.png")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"ops", "models"})
    if unknown or not sections:
        parser.error(f"unknown section(s) {', '.join(unknown) or '(none given)'}; known: ops, models")
    out = Path(args.out) if args.out else Path("/tmp/graphopt_bench_quick") if args.quick else Path(__file__).resolve().parent / "results"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before, started = load_snapshot(), time.perf_counter()

    op_lengths, op_rounds_of = (QUICK_OP_LENGTHS, lambda n: 3) if args.quick else (OP_LENGTHS, op_rounds)
    model_lengths, model_rounds_of = (QUICK_MODEL_LENGTHS, lambda n: 1) if args.quick else (MODEL_LENGTHS, model_rounds)
    op_rows: list[OpRow] = []
    model_rows: list[Row] = []
    if "ops" in sections:
        op_rows = run_ops(op_lengths, op_rounds_of)
    if "models" in sections:
        model_rows = run_models(model_lengths, model_rounds_of)

    import transformers

    run = {
        "command": "python bench/attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sections": sections,
        "quick": args.quick,
        "op rounds": ", ".join(f"{op_rounds_of(n)} at {n}" for n in op_lengths),
        "model rounds": ", ".join(f"{model_rounds_of(n)} at {n}" for n in model_lengths),
        "cpu": cpu_summary(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "load before": load_before,
        "load after": load_snapshot(),
        "wall s": round(time.perf_counter() - started),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_file = plot_note = None
    if op_rows:
        png = out / f"{args.name}_ops.png"
        plot_note = plot_ops(op_rows, png)
        plot_file = None if plot_note else png.name
    env = environment()
    payload = {
        "environment": env,
        "run": {**run, "cpu all flags": sorted(cpu_capabilities().flags)},
        "ops": [dataclasses.asdict(r) for r in op_rows],
        "models": [dataclasses.asdict(r) for r in model_rows],
        "plot": plot_file,
    }
    json_path, md_path = out / f"{args.name}.json", out / f"{args.name}.md"
    json_path.write_text(json.dumps(payload, indent=2))
    md_path.write_text(markdown(args.name, env, run, op_rows, model_rows, plot_file, plot_note))
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}" + (f" and {out / plot_file}" if plot_file else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
