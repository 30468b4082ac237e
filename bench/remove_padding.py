"""Padding-free execution (``remove_padding``, ByteTransformer) on the real MiniLM as users load it, and default RoBERTa and DistilBERT, against the peers.

    OMP_NUM_THREADS=1 python bench/remove_padding.py           # writes bench/results/remove_padding.{json,md}
    python bench/remove_padding.py --quick --name remove_padding_quick   # a smoke run: few batches, few rounds

Three parts, each run side by side in this one process (bench/harness.py: configurations timed
interleaved, ratios against eager PyTorch in the same run, fidelity against eager on every batch):

1. Batches of 8 real sentences (``zoo.real_sentences``) padded to 128 tokens, as the peers are
   usually run, and padded only to each batch's longest sentence: eager, inductor, torchao int8
   (dynamic int8 activations, int8 weights) + inductor, onnxruntime (CPU), and graphopt
   ``[canonicalize]`` (the baseline graph) and ``[canonicalize, remove_padding]`` on the eager and
   inductor backends; then the same against eager and inductor for a default RoBERTa and a
   DistilBERT built from their configs (``--other-sentences``).
2. Scaling with the padding fraction: the same 8 sentences of 12-13 tokens padded to lengths that
   make 10% to 90% of the batch pads, and the overhead when nothing is padded (sentences truncated
   to a common length): eager against the canonical graph with and without ``remove_padding``.
3. Stacking: what ``remove_padding`` adds on top of each other exact pass pipeline (the pipelines
   of part 1, and every exact pass with and without it, with the reasons the others do not apply).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Built, Case, Config, eager, inductor, load_snapshot, markdown_table, onnxruntime_cpu, run_case, torchao_int8, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt import default_pass_names  # noqa: E402
from graphopt.tools import zoo
from graphopt.ir.flops import count_flops, param_bytes  # noqa: E402
from graphopt.ir import count_ops  # noqa: E402
from graphopt.pipeline.report import APPLIED  # noqa: E402

BATCH = 8
CANONICAL = ["canonicalize"]
REMOVE_PADDING = ["canonicalize", "remove_padding"]
EXACT = [name for name in default_pass_names() if name != "remove_padding"]
PAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
MIN_COSINE = 0.99995  # remove_padding is exact on valid tokens: the embeddings must match eager


def _pass_notes(report) -> str:
    applied = ",".join(report.applied) or "none applied"
    skipped = [f"{r.name} {r.status}" for r in report.records if r.status != APPLIED]
    return f"applied: {applied}" + (f"; {', '.join(skipped)}" if skipped else "")


def graphopt_config(passes, backend: str, name: str, example=None, **optimize_kwargs) -> Config:
    """A graphopt pipeline; with ``example`` it is built once, on that batch, and reused by every
    case (its graph has dynamic shapes). FLOPs are left blank where they depend on the data
    (``remove_padding``'s token count) and the counter cannot tell them."""
    built: list[Built] = []

    def build(model, case_example):
        if built:
            return built[0]
        opt = graphopt.optimize(model, list(passes), example or case_example, backend=backend, **optimize_kwargs)
        gm = opt.graph_module
        try:
            flops = count_flops(gm) or None
        except ValueError:
            flops = None
        result = Built(opt, flops=flops, param_bytes=param_bytes(gm), notes=_pass_notes(opt.report))
        if example is not None:
            built.append(result)
        return result

    return Config(name, build)


def _available(module: str) -> str | None:
    """Why ``module`` cannot be used here (None when it imports)."""
    try:
        __import__(module)
    except Exception as e:  # a broken install raises more than ImportError
        return f"{type(e).__name__}: {e}"
    return None


def peer_configs(dynamic: bool | None, onnx_dynamic_shapes, unavailable: dict[str, str]) -> list[Config]:
    configs = [eager(), inductor(dynamic)]
    for module, config in (("torchao", torchao_int8(dynamic)), ("onnxruntime", onnxruntime_cpu(onnx_dynamic_shapes))):
        reason = _available(module)
        if reason is None:
            configs.append(config)
        else:
            unavailable[config.name] = reason
    return configs


def graphopt_configs(dynamic_shapes, inductor_options: dict) -> list[Config]:
    return [
        graphopt_config(CANONICAL, "eager", "graphopt[canonicalize]/eager", dynamic_shapes=dynamic_shapes),
        graphopt_config(REMOVE_PADDING, "eager", "graphopt[canonicalize,remove_padding]/eager", dynamic_shapes=dynamic_shapes),
        graphopt_config(CANONICAL, "inductor", "graphopt[canonicalize]/inductor", dynamic_shapes=dynamic_shapes, backend_options=inductor_options),
        graphopt_config(
            REMOVE_PADDING, "inductor", "graphopt[canonicalize,remove_padding]/inductor", dynamic_shapes=dynamic_shapes, backend_options=inductor_options
        ),
    ]


def pad_fraction(batches) -> float:
    total = sum(mask.numel() for _, mask in batches)
    return 1 - sum(int(mask.sum()) for _, mask in batches) / total


def _describe(batches) -> str:
    shapes = sorted({tuple(ids.shape) for ids, _ in batches})
    lengths = f"{shapes[0][1]}" if len(shapes) == 1 else f"{shapes[0][1]}..{shapes[-1][1]}"
    return f"{len(batches)} x [{BATCH}, {lengths}], {pad_fraction(batches):.0%} pads"


def peer_cases(entry, sentences, padded_sentences: int, unavailable, *, label: str = "", all_peers: bool = True, model=None) -> list[Case]:
    """Part 1: the first ``padded_sentences`` padded to 128 (static shapes), and all ``sentences``
    padded to each batch's longest (dynamic shapes), tokenized by ``entry``'s tokenizer and run
    through ``model`` (default ``entry.model``). Without ``all_peers`` only eager and inductor are
    the peers (torchao and onnxruntime are measured on MiniLM)."""
    model = entry.model if model is None else model
    chunks = [sentences[i : i + BATCH] for i in range(0, len(sentences), BATCH)]
    padded = [zoo.tokenize(entry.tokenizer, c, max_length=128, pad_to=128) for c in chunks[: padded_sentences // BATCH]]
    longest = [zoo.tokenize(entry.tokenizer, c, max_length=128) for c in chunks]
    if all_peers:
        static, dynamic = peer_configs(False, None, unavailable), peer_configs(None, entry.dynamic_shapes, unavailable)
    else:
        static, dynamic = [eager(), inductor(False)], [eager(), inductor(None)]
    static += graphopt_configs(None, {"dynamic": False})
    dynamic += graphopt_configs(entry.dynamic_shapes, {})
    tokens = lambda batch: batch[1].bool()  # noqa: E731  (outputs that carry tokens are compared at real tokens)
    return [
        Case(f"{label}padded to 128: {_describe(padded)}", model, padded, static, valid_tokens=tokens),
        Case(f"{label}padded to longest: {_describe(longest)}", model, longest, dynamic, valid_tokens=tokens),
    ]


def config_encoders(seed: int = 0) -> dict[str, torch.nn.Module]:
    """A default RoBERTa (``RobertaModel(RobertaConfig())``, roberta-base sizes) and DistilBERT
    (``DistilBertModel(DistilBertConfig())``) as users load them (SDPA attention, pooler where the
    model has one), random init: there are no weights to download. Their inputs are the real
    sentences tokenized by MiniLM's WordPiece tokenizer, whose ids fit both vocabularies; the
    weights being random, only the lengths and the padding matter to the speed."""
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {"roberta-base": RobertaModel(RobertaConfig()).eval(), "distilbert-base": DistilBertModel(DistilBertConfig()).eval()}


def scaling_cases(entry, sentences, quick: bool) -> tuple[list[Case], list[dict]]:
    """Part 2: one batch of 8 sentences of similar length (12-13 tokens) padded to lengths giving
    each padding fraction, plus batches without any padding (truncated to a common length)."""
    lengths = [len(ids) for ids in entry.tokenizer(sentences)["input_ids"]]
    similar = sorted(range(len(sentences)), key=lambda i: (abs(lengths[i] - 12.5), i))[:BATCH]
    longest = sorted(range(len(sentences)), key=lambda i: (-lengths[i], i))[:BATCH]
    chosen = [sentences[i] for i in similar]
    valid = sum(lengths[i] for i in similar)
    fractions = PAD_FRACTIONS[::2] if quick else PAD_FRACTIONS
    points = [("no pads (truncated)", chosen, min(lengths[i] for i in similar))]
    points.append(("no pads (truncated)", [sentences[i] for i in longest], min(lengths[i] for i in longest)))
    for f in fractions:
        points.append((f"{f:.0%} target", chosen, max(max(lengths[i] for i in similar), round(valid / (BATCH * (1 - f))))))
    # every case shares the graphopt builds: one capture with dynamic shapes, made on the 50% batch
    example = zoo.tokenize(entry.tokenizer, chosen, max_length=128, pad_to=round(valid / (BATCH * 0.5)))
    configs = [
        eager(),
        graphopt_config(CANONICAL, "eager", "graphopt[canonicalize]/eager", example, dynamic_shapes=entry.dynamic_shapes),
        graphopt_config(REMOVE_PADDING, "eager", "graphopt[canonicalize,remove_padding]/eager", example, dynamic_shapes=entry.dynamic_shapes),
    ]
    cases, meta = [], []
    for label, batch_sentences, width in points:
        batch = zoo.tokenize(entry.tokenizer, batch_sentences, max_length=128, pad_to=width)
        fraction = pad_fraction([batch])
        name = f"scaling: [{BATCH}, {width}], {fraction:.0%} pads"
        cases.append(Case(name, entry.model, [batch], configs))
        meta.append({"case": name, "point": label, "width": width, "pad_fraction": round(fraction, 4), "valid_tokens": int(batch[1].sum())})
    return cases, meta


def stacking_builds(entry, example) -> list[dict]:
    """Part 3: every exact pass with and without remove_padding, built on one batch: what applies,
    why the others do not, and whether the graph differs from the two-pass pipelines of part 1."""
    graphs = {}
    for passes in (CANONICAL, REMOVE_PADDING, EXACT, EXACT + ["remove_padding"]):
        opt = graphopt.optimize(entry.model, passes, example, dynamic_shapes=entry.dynamic_shapes)
        graphs[tuple(passes)] = opt
    rows = []
    for passes, same_as in ((EXACT, CANONICAL), (EXACT + ["remove_padding"], REMOVE_PADDING)):
        report = graphs[tuple(passes)].report
        rows.append(
            {
                "pipeline": "+".join(passes),
                "applied": ",".join(report.applied),
                "not applied (reason)": "; ".join(
                    f"{r.name}: {r.status}{' (' + r.reason + ')' if r.reason else ''}" for r in report.records if r.status != APPLIED
                ),
                "same graph (op counts) as": f"[{'+'.join(same_as)}]: "
                + ("yes" if count_ops(graphs[tuple(passes)].graph_module) == count_ops(graphs[tuple(same_as)].graph_module) else "no"),
            }
        )
    return rows


def stacking_table(rows) -> list[dict]:
    """What remove_padding adds on top of [canonicalize], per part-1 case and backend."""
    by_key = {(r.case, r.config): r for r in rows}
    table = []
    for case in dict.fromkeys(r.case for r in rows):
        for backend in ("eager", "inductor"):
            base = by_key.get((case, f"graphopt[canonicalize]/{backend}"))
            stacked = by_key.get((case, f"graphopt[canonicalize,remove_padding]/{backend}"))
            if base and stacked:
                table.append(
                    {
                        "case": case,
                        "backend": backend,
                        "[canonicalize] ms": f"{base.median_ms:.1f}",
                        "+ remove_padding ms": f"{stacked.median_ms:.1f}",
                        "speedup from remove_padding": f"{base.median_ms / stacked.median_ms:.2f}x",
                    }
                )
    return table


def scaling_table(rows, meta) -> list[dict]:
    by_key = {(r.case, r.config): r for r in rows}
    table = []
    for m in meta:
        t_eager = by_key[(m["case"], "eager")].median_ms
        t_canonical = by_key[(m["case"], "graphopt[canonicalize]/eager")].median_ms
        t_packed = by_key[(m["case"], "graphopt[canonicalize,remove_padding]/eager")].median_ms
        table.append(
            {
                "batch": m["case"].removeprefix("scaling: "),
                "point": m["point"],
                "valid tokens": m["valid_tokens"],
                "eager ms": f"{t_eager:.2f}",
                "[canonicalize] ms": f"{t_canonical:.2f}",
                "+ remove_padding ms": f"{t_packed:.2f}",
                "vs eager": f"{t_packed / t_eager:.2f}x",
                "vs [canonicalize]": f"{t_packed / t_canonical:.2f}x",
                "token share computed": f"{1 - m['pad_fraction']:.0%}",
            }
        )
    return table


def fidelity_failures(rows) -> list[str]:
    return [f"{r.case} / {r.config}: min cosine {r.cosine:.6f}" for r in rows if "remove_padding" in r.config and r.cosine < MIN_COSINE]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 sentences (8 padded to 128), 1 round, 5 scaling points: checks the script works")
    parser.add_argument("--sentences", type=int, default=64, help="real sentences in part 1 (batches of 8)")
    parser.add_argument("--padded-sentences", type=int, default=64, help="of those, how many in the (slow) padded-to-128 case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--other-sentences", type=int, default=16, help="real sentences for the default RoBERTa and DistilBERT (0: skip them)")
    parser.add_argument("--other-rounds", type=int, default=3)
    parser.add_argument("--scaling-rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)), help="torch and onnxruntime intra-op threads")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="remove_padding")
    args = parser.parse_args(argv)
    if args.quick:
        args.sentences, args.padded_sentences, args.rounds, args.scaling_rounds, args.other_sentences, args.other_rounds = 16, 8, 1, 2, 8, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before, started = load_snapshot(), time.perf_counter()

    entry = zoo.load("minilm")
    sentences = zoo.real_sentences(64)
    unavailable: dict[str, str] = {}
    padded_case, longest_case = peer_cases(entry, sentences[: args.sentences], args.padded_sentences, unavailable, label="MiniLM ")
    peer_rows = run_case(padded_case, rounds=args.rounds, warmup=1) + run_case(longest_case, rounds=args.rounds, warmup=1)
    for name, model in config_encoders().items() if args.other_sentences else ():
        for case in peer_cases(entry, sentences[: args.other_sentences], args.other_sentences, unavailable, label=f"{name} ", all_peers=False, model=model):
            peer_rows += run_case(case, rounds=args.other_rounds, warmup=1)

    cases, scaling_meta = scaling_cases(entry, sentences, args.quick)
    scaling_rows = [row for case in cases for row in run_case(case, rounds=args.scaling_rounds, warmup=1)]
    stacking = stacking_table(peer_rows)
    stacking_passes = stacking_builds(entry, longest_case.batches[0])

    rows = peer_rows + scaling_rows
    failures = fidelity_failures(rows)
    load_after = load_snapshot()
    environment = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch threads": torch.get_num_threads(),
        "load before": load_before,
        "load after": load_after,
        "wall s": round(time.perf_counter() - started),
        "versions": {m: getattr(sys.modules.get(m), "__version__", None) for m in ("torchao", "onnxruntime", "transformers")},
    }
    scaling = scaling_table(scaling_rows, scaling_meta)
    extra = {
        "run": environment,
        "unavailable": unavailable,
        "scaling": scaling,
        "stacking": stacking,
        "stacking_passes": stacking_passes,
        "fidelity_failures": failures,
    }
    json_path, md_path = write_results(rows, args.out, args.name, extra=extra)
    md_path.write_text(_markdown(md_path.read_text().split("\n\n")[1], peer_rows, scaling, stacking, stacking_passes, environment, unavailable, failures))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 1 if failures else 0


def _markdown(env_line, peer_rows, scaling, stacking, stacking_passes, run, unavailable, failures) -> str:
    def table(rows) -> str:
        return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) if rows else "(none)"

    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items() if v)
    peers_missing = "".join(f"\n- **{name}: not measured.** {reason}" for name, reason in unavailable.items())
    fidelity = "all remove_padding configurations match eager (min cosine >= 0.99995)" if not failures else "FAILED: " + "; ".join(failures)
    return f"""# remove_padding

{env_line}, {versions}; OMP_NUM_THREADS {run["OMP_NUM_THREADS"]}, torch threads {run["torch threads"]}.
Machine load (2 cores shared with other engineers): before {run["load before"]}; after {run["load after"]}; the run took {run["wall s"]} s.

What is measured: the real all-MiniLM-L6-v2 as users load it (`zoo.load("minilm")`: transformers'
default SDPA attention, forward = normalized mean-pooled sentence embeddings, which `remove_padding`
pools from the packed tokens) on the zoo's real sentences (`zoo.real_sentences`); and, in part 1,
a default RoBERTa and DistilBERT built from their configs (random init, SDPA, outputs
`last_hidden_state` and RoBERTa's pooler; tokens compared at real tokens only) on the same
sentences.
Latency is the median over rounds of running every batch of a case once, configurations
interleaved round by round in one process; "vs first" is the ratio to eager PyTorch in the same
case (lower is faster). Fidelity is against eager on every batch: max relative error over the
output and the min cosine similarity of embeddings. Fidelity check: {fidelity}.

## 1. Against the peers: batches of 8, padded to 128 and to the batch's longest sentence

Padded to 128, every configuration has static shapes (inductor `dynamic=False`, ONNX exported at
[8, 128]); padded to the longest, shapes vary per batch: inductor and torchao use torch.compile's
default (static for the first shape, then one dynamic recompile), ONNX is exported with dynamic
batch and sequence, graphopt captures with dynamic shapes. torchao: `quantize_(copy, Int8DynamicActivationInt8WeightConfig())`
then inductor (approximate: cosine below 1). onnxruntime: `torch.onnx.export(dynamo=True)`,
CPUExecutionProvider, default graph optimizations, intra-op threads = torch threads. GFLOPs are
those of a case's first batch as graphopt counts them (for `remove_padding` graphs, on its valid
tokens), blank for peers whose graph graphopt does not see; "build s" includes compiling on the
first batch.{peers_missing}

{markdown_table(peer_rows)}

## 2. Scaling with the padding fraction, and no padding at all

One batch of the 8 real sentences closest to 12.5 tokens, padded to widths that make the given
share of the batch pads; "no pads" rows truncate sentences to the shortest one's length (the
same 8, and the 8 longest sentences), so the mask is all ones and `remove_padding` only adds its
pack/unpack and offsets. The graphopt graphs are built once (dynamic shapes, on the 50% batch)
and reused for every row. "token share computed" is the share of positions that are real tokens:
the fraction of linear/norm/GELU work `remove_padding` keeps (attention keeps less, being
quadratic per sequence).

{table(scaling)}

## 3. Stacking with the other exact passes

What `remove_padding` adds on top of `[canonicalize]` (part 1's timings):

{table(stacking)}

Every exact pass with and without `remove_padding` on MiniLM (built on the first padded-to-longest
batch). `layernorm_to_rmsnorm` does not apply to MiniLM, which is Post-LN (BERT): a linear reads
the residual stream itself, not only through a LayerNorm (the pass's reason, below); and
`fold_batchnorm` finds no BatchNorm. The full exact pipelines therefore produce the same graphs as
the two-pass pipelines of part 1 and their timings are those rows. (`layernorm_to_repbn` is not
exact, it needs retraining, so it is not stacked here.)

{table(stacking_passes)}

Threads: 1 by default. On these 2 cores shared with other engineers, a 2-thread run stalls at
OpenMP's barriers whenever another process holds a core: in one probe the same eager [8, 30]
batch took 220 ms to 1,276 ms per call with 2 threads (32 ms when the machine was quiet), and
57-64 ms per call with 1 thread, on the same machine a few seconds apart.

Caveats: shared cores, so absolute milliseconds move with the other engineers' load (recorded
above); ratios within a case are comparable because configurations are interleaved, but a burst
of load during one configuration's turn still moves its median. Other bench results (e.g.
foundation.md) ran with 2 threads: compare ratios, not milliseconds. onnxruntime gets int64
numpy inputs and returns numpy converted to torch (a copy of [8, 384], negligible); its exporter
prints "Evaluation failed: cannot reshape ..." while constant-folding the static [8, 128]
export, which does not affect the model (cosine 1.000000).
"""


if __name__ == "__main__":
    sys.exit(main())
