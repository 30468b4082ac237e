"""Train (or load from the cache) the zoo's ``vit-digits`` classifier and report its top-1 and speed.

    python bench/train_vit_digits.py           # uses the cached weights if present, else trains them
    python bench/train_vit_digits.py --force   # retrains and overwrites the cache

``vit-digits`` is a small Hugging Face ``ViTForImageClassification`` trained here on scikit-learn's
handwritten digits (see ``graphopt.tools.zoo._build_vit_digits`` for the model and the recipe), the
zoo's model with a measurable accuracy for token pruning / merging benchmarks.  The weights are
cached under ``$GRAPHOPT_CACHE`` (default ``~/.cache/graphopt``) in a file named by a hash of the
config and the recipe.  Reported: the training time (of the run that produced the cached weights),
test top-1 on the 400 held-out digits, and eager throughput at batch 32 (median over rounds);
written to ``bench/results/vit_digits.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment  # noqa: E402

from graphopt.tools import zoo  # noqa: E402

BATCH = 32


@torch.no_grad()
def throughput(model: torch.nn.Module, images: torch.Tensor, rounds: int, warmup: int = 3) -> tuple[float, list[float]]:
    """Median images/s of ``model`` on ``images`` (one batch) over ``rounds`` timed calls, and every round's value."""
    for _ in range(warmup):
        model(images)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        model(images)
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates), rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="retrain even if cached weights exist")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of the throughput measurement")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    parser.add_argument("--name", default="vit_digits", help="results file name (without extension)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    trained = zoo.train_vit_digits(force=args.force)
    entry = zoo.load("vit-digits")  # reads the cache just written or found
    model = entry.model
    test_images, test_labels = zoo.digits_data("test")
    train_images, train_labels = zoo.digits_data("train")
    test_top1 = zoo.top1(model, test_images, test_labels)
    train_top1 = zoo.top1(model, train_images, train_labels)
    rate, rates = throughput(model, test_images[:BATCH], args.rounds)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    config = model.vit.config
    params = sum(p.numel() for p in model.parameters())
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    results = {
        "model": "vit-digits",
        "description": entry.description,
        "config": dict(zoo.VIT_DIGITS_CONFIG),
        "attn_implementation": config._attn_implementation,
        "tokens": tokens,
        "parameters": params,
        "recipe": trained["recipe"],
        "cache_file": str(trained["path"]),
        "trained_now": trained["trained_now"],
        "train_seconds": trained["train_seconds"],
        "train_threads": trained["threads"],
        "test_top1": test_top1,
        "train_top1": train_top1,
        "test_images": len(test_images),
        "train_images": len(train_images),
        "throughput_batch": BATCH,
        "throughput_images_per_s": rate,
        "throughput_rounds": rates,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "environment": environment(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    env = results["environment"]
    env_line = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    load_line = ""
    if load_before and load_after:
        load_line = (
            f"Machine load (shared): load average before {', '.join(f'{x:.2f}' for x in load_before)}; after {', '.join(f'{x:.2f}' for x in load_after)}.\n"
        )
    table = tabulate(
        [
            ["config", f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, MLP {config.intermediate_size}"],
            ["input", f"1 x {config.image_size} x {config.image_size}, patch {config.patch_size}: {tokens - 1} patches + CLS = {tokens} tokens"],
            ["parameters", f"{params / 1e6:.2f} M"],
            ["attention", config._attn_implementation],
            ["training", f"{trained['train_seconds']:.0f} s on {trained['threads']} threads ({'this run' if trained['trained_now'] else 'cached weights'})"],
            ["test top-1", f"{test_top1:.2%} ({len(test_images)} images)"],
            ["train top-1", f"{train_top1:.2%} ({len(train_images)} images)"],
            [f"eager throughput, batch {BATCH}", f"{rate:.0f} images/s (median of {args.rounds} rounds, {torch.get_num_threads()} threads)"],
            ["cache file", f"`{Path(trained['path']).name}`"],
        ],
        headers=["", "vit-digits"],
        tablefmt="github",
    )
    recipe = ", ".join(f"{k} {v}" for k, v in trained["recipe"].items())
    (out / f"{args.name}.md").write_text(
        f"# {args.name}\n\n{env_line}\n{load_line}\n"
        '`zoo.load("vit-digits")`: a Hugging Face `ViTForImageClassification` trained here on scikit-learn\'s digits '
        "(8x8 grey, 1397 train / 400 test, stratified, `random_state=0`), upsampled bilinearly; weights cached by a hash "
        f"of config + recipe. Recipe: AdamW, warmup then cosine, label smoothing, random +-1 pixel shifts at 8x8; {recipe}.\n\n"
        f"{table}\n"
    )
    print(table)
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
