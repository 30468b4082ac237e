"""Token pruning (Zero-TPrune) and merging (ToMe): the speed-fidelity frontier, zero-shot and recovered.

    python bench/token_pruning.py                  # writes bench/results/token_pruning.{json,md,png}
    python bench/token_pruning.py --quick --out /tmp/q   # a smoke run: fewer settings, rounds and steps

Models and data (nothing is downloaded):

* ``vit-digits``: the zoo's ViT trained here on scikit-learn's digits (65 tokens, 4 layers; its
  weights come from ``bench/train_vit_digits.py``'s cache, trained on first use). Top-1 on the 400
  test images, and agreement with the unreduced model's predictions; recovery trains on the 1397
  training images without their labels.
* ``vit-s``: the zoo's DeiT-S-sized ViT (197 tokens, 12 layers, random weights) under CLS pooling:
  speed at DeiT-S's token count. Its weights are random, so its cosine says nothing about quality.
* ``minilm``: the real all-MiniLM-L6-v2 on real text: the zoo's 128 sentences (docstrings of
  standard-library callables) in batches of 32 padded to their longest, and long passages (whole
  module docstrings, 200-512 tokens) in batches of 4. Mean and min cosine of the embeddings against
  the original, nearest-neighbour agreement over the sentences. Recovery trains on text of the
  same kind from other modules: sentences of their docstrings for the sentences, 250-word passages
  of their module, class and function docstrings (``train_passages``, 186 of them) for the passages.

Per configuration: GFLOPs (``graphopt.ir.flops.count_flops`` on the timing batch, the data-dependent
token counts as they fell), latency (median over rounds of running the timing batch; configurations
interleaved round by round, so load hits all alike), throughput, the speedup over the graphopt
baseline of the same model (the captured graph: canonicalize, and remove_padding for text), and
"time/FLOPs": the share of the FLOPs cut that turned into time saved. Every ratio is within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphopt  # noqa: E402
from graphopt.ir.flops import count_flops  # noqa: E402
from graphopt.passes.merge_tokens import MergeTokens  # noqa: E402
from graphopt.passes.prune_tokens import PruneTokens  # noqa: E402
from graphopt.tools import zoo  # noqa: E402
from graphopt.tools.token_recovery import recover  # noqa: E402
from harness import environment, load_snapshot, results_header  # noqa: E402

from attention_fidelity import batches_of, long_passages, train_passages, train_sentences  # noqa: E402


@dataclass
class Result:
    model: str
    config: str
    passes: str
    gflops: float
    median_ms: float
    items_per_s: float
    speedup: float = float("nan")
    flops_cut: float = float("nan")
    time_per_flops: float = float("nan")  # share of the FLOPs cut that is time saved
    fidelity: dict[str, float] = field(default_factory=dict)
    recovery_s: float | None = None
    kept_tokens: float | None = None


class CLSPooled(torch.nn.Module):
    """A ViT's final CLS token, what its classifier reads."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values):
        return self.vit(pixel_values).last_hidden_state[:, 0]


def build(model, reduction, example, text: bool):
    passes = ["canonicalize", "remove_padding"] if text else ["canonicalize"]
    if reduction is not None:
        passes.append(reduction)
    return graphopt.optimize(model, passes, example)


def describe(reduction) -> str:
    if reduction is None:
        return "baseline"
    if isinstance(reduction, MergeTokens):
        layers = "" if reduction.config.layers is None else f" layers {list(reduction.config.layers)}"
        return f"merge r={reduction.config.r}{layers}"
    ratio = reduction.config.keep_ratio
    layers = "default layers" if reduction.config.layers is None else f"layers {list(reduction.config.layers)}"
    return f"prune keep={ratio} {layers}{'' if reduction.config.similarity else ' (no S-stage)'}"


def timed(configs: dict[str, Callable], batch: tuple, rounds: int) -> dict[str, float]:
    times = {name: [] for name in configs}
    names = list(configs)
    with torch.no_grad():
        for name in names:  # warm-up
            configs[name](*batch)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                configs[name](*batch)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def gflops(opt, batch) -> float:
    return count_flops(opt.graph_module, batch) / 1e9


def kept_share(opt) -> float | None:
    for record in opt.report.records:
        if record.name in ("prune_tokens", "merge_tokens") and "kept" in record.stats:
            return record.stats["kept"]
    return None


# ----------------------------------------------------------------------------- fidelity


def vit_digits_fidelity(model, reference_logits, images, labels) -> dict[str, float]:
    with torch.no_grad():
        logits = torch.cat([model(images[i : i + 100]) for i in range(0, len(images), 100)])
    predicted = logits.argmax(1)
    return {
        "top1": (predicted == labels).float().mean().item(),
        "agreement": (predicted == reference_logits.argmax(1)).float().mean().item(),
        "mean cosine": F.cosine_similarity(logits, reference_logits).mean().item(),
    }


def embeddings(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*b) for b in batches])


def text_fidelity(model, reference: torch.Tensor, batches, neighbours: bool) -> dict[str, float]:
    out = embeddings(model, batches)
    cos = F.cosine_similarity(out, reference)
    scores = {"mean cosine": cos.mean().item(), "min cosine": cos.min().item()}
    if neighbours:
        scores["NN agreement"] = zoo.nearest_neighbour_agreement(out, reference)
    return scores


# ----------------------------------------------------------------------------- sections


def frontier(name, model, reductions, example, timing_batch, fidelity, *, text, rounds, items, recovered=(), recovery=None, log=print) -> list[Result]:
    """Build every configuration, measure fidelity, FLOPs and (interleaved) latency; recover some."""
    built = {}
    for reduction in [None, *reductions]:
        label = describe(reduction)
        opt = build(model, reduction, example, text)
        record = opt.report.record(reduction.name) if reduction is not None else None
        if record is not None and record.status != "applied":
            log(f"{name} {label}: {record.status}: {record.reason}")
            continue
        built[label] = (reduction, opt)
    latency = timed({"eager": model, **{label: opt for label, (_, opt) in built.items()}}, timing_batch, rounds)
    base = built["baseline"][1]
    base_flops = gflops(base, example)  # at the example's batch: a dynamic batch dim counts at its hint
    results = [Result(name, "eager", "(the model as loaded)", float("nan"), latency["eager"], items / latency["eager"] * 1e3)]
    for label, (_, opt) in built.items():
        passes = " + ".join(r.name for r in opt.report.records if r.status == "applied")
        res = Result(name, label, passes, gflops(opt, example), latency[label], items / latency[label] * 1e3, kept_tokens=kept_share(opt))
        res.fidelity = fidelity(opt)
        results.append(res)
        log(f"{name} {label}: {res.gflops:.3f} GFLOPs, {res.median_ms:.1f} ms, {res.fidelity}")
    for label in recovered:
        if label not in built:
            continue
        reduction, _ = built[label]
        opt = build(model, reduction, example, text)
        start = time.perf_counter()
        recovery(opt)
        seconds = time.perf_counter() - start
        res = Result(name, f"{label} + recovery", "as above, then token_recovery.recover", gflops(opt, example), float("nan"), float("nan"))
        res.fidelity, res.recovery_s, res.kept_tokens = fidelity(opt), seconds, kept_share(opt)
        # timed beside the baseline again, and scaled to the baseline's time in the main rounds
        again = timed({"baseline": base, "recovered": opt}, timing_batch, max(3, rounds // 2))
        res.median_ms = again["recovered"] * latency["baseline"] / again["baseline"]
        res.items_per_s = items / res.median_ms * 1e3
        results.append(res)
        log(f"{name} {label} + recovery ({seconds:.0f} s): {res.fidelity}")
    for res in results:
        res.speedup = latency["baseline"] / res.median_ms
        if not math.isnan(res.gflops):
            res.flops_cut = 1 - res.gflops / base_flops
            time_cut = 1 - res.median_ms / latency["baseline"]
            res.time_per_flops = time_cut / res.flops_cut if res.flops_cut > 0.02 else float("nan")
    return results


def vit_digits_section(args, log) -> list[Result]:
    entry = zoo.load("vit-digits")
    model = entry.model
    images, labels = zoo.digits_data("test")
    train_images, _ = zoo.digits_data("train")
    with torch.no_grad():
        reference = torch.cat([model(images[i : i + 100]) for i in range(0, len(images), 100)])
    example = (images[:32],)
    ratios = (0.9, 0.7) if args.quick else (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    reductions = [PruneTokens(keep_ratio=r, min_cosine=0.0) for r in ratios]
    reductions += [PruneTokens(keep_ratio=r, layers=(0,), min_cosine=0.0) for r in (ratios if args.quick else (0.7, 0.5, 0.4, 0.3))]
    reductions += [MergeTokens(r=r, min_cosine=0.0) for r in ((4, 8) if args.quick else (2, 4, 6, 8, 10, 12))]
    batches = [(train_images[i : i + 64],) for i in range(0, len(train_images), 64)]

    def recovery(opt):
        recover(opt.graph_module, model, batches, 5 if args.quick else args.recovery_steps, lr=args.lr)

    recovered = ["prune keep=0.4 layers [0]", "prune keep=0.5 default layers", "merge r=12"] if not args.quick else ["prune keep=0.7 layers [0]"]
    return frontier(
        "vit-digits",
        model,
        reductions,
        example,
        (images[:128],),
        lambda opt: vit_digits_fidelity(opt, reference, images, labels),
        text=False,
        rounds=args.rounds,
        items=128,
        recovered=recovered,
        recovery=recovery,
        log=log,
    )


def vit_s_section(args, log) -> list[Result]:
    entry = zoo.load("vit-s", num_hidden_layers=4 if args.quick else 12)
    model = CLSPooled(entry.model).eval()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 3, 224, 224, generator=gen),)
    with torch.no_grad():
        reference = model(*batch)

    def fidelity(opt):
        with torch.no_grad():
            return {"mean cosine (random weights)": F.cosine_similarity(opt(*batch), reference).mean().item()}

    reductions = [PruneTokens(keep_ratio=r, min_cosine=0.0) for r in ((0.7,) if args.quick else (0.8, 0.7, 0.6, 0.5))]
    reductions += [MergeTokens(r=r, min_cosine=0.0) for r in ((8,) if args.quick else (4, 8, 13))]
    return frontier("vit-s", model, reductions, batch, batch, fidelity, text=False, rounds=max(3, args.rounds // 2), items=8, log=log)


def minilm_sections(args, log) -> list[Result]:
    entry = zoo.load("minilm")
    model, tokenizer = entry.model, entry.tokenizer
    sentences = batches_of(tokenizer, zoo.real_sentences(32 if args.quick else 128), 32)
    passages = batches_of(tokenizer, long_passages(tokenizer, 4 if args.quick else 12), 4, 512)
    # recovery trains on text like the evaluation's: sentences for sentences, whole passages for passages
    train = {
        "minilm sentences": batches_of(tokenizer, train_sentences(32 if args.quick else 256), 16),
        "minilm passages": batches_of(tokenizer, train_passages(8 if args.quick else 10_000), 4, 512),
    }
    results = []
    for section, data, neighbours in (("minilm sentences", sentences, True), ("minilm passages", passages, False)):
        reference = embeddings(model, data)

        def recovery(opt, section=section):
            steps = 5 if args.quick else args.recovery_steps if section == "minilm sentences" else args.passage_recovery_steps
            recover(opt.graph_module, model, train[section], steps, lr=args.text_lr)

        reductions = [PruneTokens(keep_ratio=r, min_cosine=0.0) for r in ((0.8,) if args.quick else (0.95, 0.9, 0.8, 0.7, 0.5))]
        one_cut = (3,) if section == "minilm sentences" else (2, 3)  # on passages the best single cuts at cosine 0.98
        reductions += [PruneTokens(keep_ratio=r, layers=(layer,), min_cosine=0.0) for layer in one_cut for r in ((0.7,) if args.quick else (0.9, 0.7, 0.5))]
        merges = (1, 2, 4, 8) if section == "minilm sentences" else (2, 8, 16, 32, 48)
        reductions += [MergeTokens(r=r, min_cosine=0.0) for r in ((2,) if args.quick else merges)]
        if section == "minilm sentences":
            recovered = ["prune keep=0.7 default layers", "merge r=4"]
        else:
            recovered = ["prune keep=0.5 layers [2]", "merge r=32"]
        recovered = [] if args.quick else recovered
        results += frontier(
            section,
            model,
            reductions,
            data[0],
            data[0],
            lambda opt, ref=reference, d=data, nn=neighbours: text_fidelity(opt, ref, d, nn),
            text=True,
            rounds=args.rounds,
            items=data[0][0].shape[0],
            recovered=recovered,
            recovery=recovery,
            log=log,
        )
    return results


def stacked_section(args, log) -> list[Result]:
    """remove_padding, token pruning and int8 quantization on the long passages."""
    entry = zoo.load("minilm")
    model, tokenizer = entry.model, entry.tokenizer
    passages = batches_of(tokenizer, long_passages(tokenizer, 4 if args.quick else 12), 4, 512)
    reference = embeddings(model, passages)
    example = passages[0]
    plans = {
        "baseline": ["canonicalize", "remove_padding"],
        "int8": ["canonicalize", "remove_padding", "quantize_int8"],
        "prune keep=0.7": ["canonicalize", "remove_padding", PruneTokens(keep_ratio=0.7, min_cosine=0.0)],
        "prune keep=0.7 + int8": ["canonicalize", "remove_padding", PruneTokens(keep_ratio=0.7, min_cosine=0.0), "quantize_int8"],
    }
    built = {label: graphopt.optimize(model, passes, example) for label, passes in plans.items()}
    latency = timed({"eager": model, **built}, example, args.rounds)
    base_flops = gflops(built["baseline"], example)
    results = [Result("minilm passages, stacked", "eager", "(the model as loaded)", float("nan"), latency["eager"], 4 / latency["eager"] * 1e3)]
    for label, opt in built.items():
        passes = " + ".join(r.name for r in opt.report.records if r.status == "applied")
        res = Result("minilm passages, stacked", label, passes, gflops(opt, example), latency[label], 4 / latency[label] * 1e3, kept_tokens=kept_share(opt))
        res.fidelity = text_fidelity(opt, reference, passages, False)
        results.append(res)
    for res in results:
        res.speedup = latency["baseline"] / res.median_ms
        if not math.isnan(res.gflops):
            res.flops_cut = 1 - res.gflops / base_flops
    log(f"stacked: {[(r.config, round(r.speedup, 2)) for r in results]}")
    return results


# ----------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(results: list[Result]) -> str:
    keys = []
    for r in results:
        keys += [k for k in r.fidelity if k not in keys]
    rows = [
        [
            r.config,
            _fmt(r.gflops, ".3f"),
            _fmt(r.flops_cut, ".0%"),
            _fmt(r.kept_tokens, ".0%"),
            _fmt(r.median_ms, ".1f"),
            _fmt(r.items_per_s, ".1f"),
            _fmt(r.speedup, ".2f") + ("x" if not math.isnan(r.speedup) else ""),
            _fmt(r.time_per_flops, ".0%"),
            *[_fmt(r.fidelity.get(k), ".4f") for k in keys],
            _fmt(r.recovery_s, ".0f"),
        ]
        for r in results
    ]
    headers = ["configuration", "GFLOPs", "FLOPs cut", "tokens left", "median ms", "items/s", "vs baseline", "time/FLOPs", *keys, "recovery s"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("vit-digits", "top1", "top-1 (test, 400 images)"),
        ("minilm sentences", "mean cosine", "mean cosine (128 sentences)"),
        ("minilm passages", "mean cosine", "mean cosine (long passages)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (model, key, label) in zip(axes, panels):
        rows = [r for r in results if r.model == model and key in r.fidelity]
        for kind, marker in (("prune", "o"), ("merge", "s"), ("baseline", "*")):
            for recovered in (False, True):
                pts = [(r.speedup, r.fidelity[key]) for r in rows if r.config.startswith(kind) and ("recovery" in r.config) == recovered]
                if pts:
                    ax.scatter(*zip(*pts), marker=marker, facecolors="none" if recovered else None, label=f"{kind}{' + recovery' if recovered else ''}")
        ax.set_xlabel("speedup over the captured graph")
        ax.set_ylabel(label)
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", default="vit-digits,vit-s,minilm,stacked")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--recovery-steps", type=int, default=300)
    parser.add_argument("--passage-recovery-steps", type=int, default=150, help="recovery steps on passages (4 x up to 512 tokens)")
    parser.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate, ViT")
    parser.add_argument("--text-lr", type=float, default=2e-5, help="recovery learning rate, MiniLM")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="token_pruning")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before, started = load_snapshot(), time.perf_counter()
    sections = {"vit-digits": vit_digits_section, "vit-s": vit_s_section, "minilm": minilm_sections, "stacked": stacked_section}
    results = []
    for name in args.sections.split(","):
        results += sections[name](args, lambda line: print(line, flush=True))
    after, seconds = load_snapshot(), time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / f"{args.name}.json").write_text(
        json.dumps({"environment": env, "load": {"before": before, "after": after}, "seconds": seconds, "results": [asdict(r) for r in results]}, indent=2)
    )
    plot(results, out / f"{args.name}.png")
    parts = results_header(f"{args.name}: token pruning and merging, speed against fidelity", env, before, after, seconds, "bench/token_pruning.py", __doc__)
    for model in dict.fromkeys(r.model for r in results):
        parts += [f"## {model}\n", table([r for r in results if r.model == model]) + "\n"]
    parts.append(f"![frontier]({args.name}.png)\n")
    (out / f"{args.name}.md").write_text("\n".join(parts))
    print(f"wrote {out / args.name}.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
