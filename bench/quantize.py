"""graphopt's quantization passes (``quantize_int8``, ``smooth_quant``, ``quantize_weights``, ``cast_bf16``) against the peers.

    python bench/quantize.py                                   # writes bench/results/quantize.{json,md}
    python bench/quantize.py --quick --name quantize_quick     # a smoke run: 1 thread, few batches, 1 round (~3 min)
    python bench/quantize.py --threads 1                       # one thread count only (default: 1,2; --quick: 1)

Every part runs at each thread count of ``--threads`` (torch and onnxruntime intra-op threads; the
configurations are built again at each, since inductor's kernels and onnxruntime's sessions fix
their thread count when built and graphopt picks its int8 kernels by timing them at the current
one). Cases run side by side in this one process (bench/harness.py: configurations timed
interleaved round by round, ratios against eager PyTorch in the same case, fidelity against eager):

1. The real all-MiniLM-L6-v2 (``zoo.load("minilm")``) on the zoo's real sentences, batches of 8
   padded to each batch's longest sentence and to 128 tokens: eager, inductor, torchao int8 +
   inductor, onnxruntime fp32 and int8 (its ``quantize_dynamic``, per channel), torch.ao
   ``quantize_dynamic`` (deprecated), and graphopt pipelines: ``[canonicalize]``, ``+quantize_int8``,
   ``+smooth_quant+quantize_int8``, ``+quantize_int8(outlier_threshold=6.0)``, ``+remove_padding``,
   ``+remove_padding+smooth_quant+quantize_int8`` (eager and inductor backends) and
   ``+remove_padding+cast_bf16`` where that pass exists. graphopt pipelines are built once per
   thread count on one padded-to-longest batch (dynamic shapes, a few other batches as calibration)
   and reused by both cases. Fidelity over all 128 real sentences (``--fidelity-sentences``): mean
   and min cosine of the sentence embeddings against eager, nearest-neighbour agreement; and the
   size on disk (graphopt: ``graphopt.save`` .pt2 archive; torch peers: ``torch.save(state_dict)``;
   onnxruntime: the .onnx file).
2. ViT-S (``zoo.load("vit-s")``, random init), one 224x224 image per batch: eager, inductor,
   torchao int8 + inductor, torch.ao ``quantize_dynamic``, graphopt ``[canonicalize, quantize_int8]``.
3. gpt2-tiny: prefill on its example inputs ([2, 16]) with ``quantize_int8``; batch-1 decode (one
   token, ``[1, 1]``: memory-bound linears) with ``quantize_weights`` (int8; int4 with group sizes
   32/64/128) where that pass exists; against eager and torch.ao ``quantize_dynamic``; size on disk.
4. Per-linear microbenchmark on MiniLM's linear shapes (N x K = 384x384, 1536x384, 384x1536) at
   M in {1, 16, 128, 1024, 4096} tokens: fp32 ``F.linear``, each graphopt int8 path
   (``int8_linear_cpu(..., path=p)``), ``torch.ops.quantized.linear_dynamic`` (fbgemm and onednn
   prepacked weights), and ``torch._int_mm`` only on CPUs with VNNI (elsewhere ATen runs it as a
   reference loop). ms, GOP/s, and % of the fp32 and int8 peaks *measured* in the same run
   (the fastest fp32 / int8 GEMM at 2048^3 here, not datasheet peaks).

The markdown ends with the issue's targets, each marked met / NOT met / not measured with the numbers.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    Built,
    Case,
    Config,
    eager,
    inductor,
    markdown_table,
    load_snapshot,
    onnxruntime_cpu,
    onnxruntime_int8,
    run_case,
    torchao_int8,
    write_results,
)  # noqa: E402

import graphopt  # noqa: E402
from graphopt.frontends.capture import inference_view  # noqa: E402
from graphopt.ir.flops import count_flops, param_bytes  # noqa: E402
from graphopt.ops.platform import cpu_capabilities  # noqa: E402
from graphopt.ops.quant import cpu as quant_cpu  # noqa: E402
from graphopt.ops.quant.reference import quantize_per_channel  # noqa: E402
from graphopt.pipeline.report import APPLIED  # noqa: E402
from graphopt.tools import zoo  # noqa: E402

BATCH = 8
MICRO_SHAPES = ((384, 384), (1536, 384), (384, 1536))  # (N, K) of MiniLM's linears: q/k/v/o, FFN up, FFN down
MICRO_M = (1, 16, 128, 1024, 4096)
PEAK_SIZE = 2048

Q8 = "graphopt[canonicalize,quantize_int8]"
RP_Q8 = "graphopt[canonicalize,remove_padding,smooth_quant,quantize_int8]"
RP_BF16 = "graphopt[canonicalize,remove_padding,cast_bf16]"
TORCHAO = "torchao int8 + inductor"
ORT = "onnxruntime (CPU)"

PASS_REPORTS: dict[str, list[dict]] = {}
"""``"<threads>/<case group>/<configuration>"`` -> the pass records of that graphopt build (name, status, reason, stats)."""
DISK: dict[str, int | str] = {}
"""``"<case group>/<configuration>"`` -> size on disk in bytes (or why it is unknown); measured at the first thread count."""
TO_SAVE: dict[str, tuple] = {}
"""graphopt builds whose ``.pt2`` size is still to measure (after the timings, so that saving is not counted as building)."""


def measure_saved_sizes() -> None:
    for key, (opt, example_inputs) in list(TO_SAVE.items()):
        DISK.setdefault(key, _saved_bytes(opt, example_inputs))
    TO_SAVE.clear()


# ----------------------------------------------------------------------------- configurations


def has_pass(name: str) -> bool:
    return name in graphopt.available_passes()


def _available(module: str) -> str | None:
    """Why ``module`` cannot be used here (None when it imports)."""
    try:
        __import__(module)
    except Exception as e:  # a broken install raises more than ImportError
        return f"{type(e).__name__}: {e}"
    return None


def state_dict_bytes(module: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def reused(config: Config, group: str, size: Callable[[Built], int | None] | None = None) -> Config:
    """``config`` built once (on the first case that asks) and reused by every later case of the
    same thread count; records its size on disk once per ``group``."""
    built: list[Built] = []

    def build(model, example):
        if not built:
            b = config.build(model, example)
            key = f"{group}/{config.name}"
            if key not in DISK:
                try:
                    DISK[key] = b.disk_bytes if b.disk_bytes is not None else (size(b) if size else state_dict_bytes(model))
                except Exception as e:  # a size is a side note: never lose the timings to it
                    DISK[key] = f"not measured ({type(e).__name__}: {str(e)[:120]})"
            built.append(b)
        return built[0]

    return Config(config.name, build)


def torch_ao_dynamic() -> Config:
    """``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` of a copy (fbgemm/x86 engine),
    recording its deprecation warning."""

    def build(model, example):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        deprecated = next((str(w.message) for w in caught if "deprecat" in str(w.message).lower()), "")
        n = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules())
        notes = f"{n} nn.Linear quantized" + (f"; warns: {deprecated.splitlines()[0][:110]}" if deprecated else "")
        return Built(quantized, notes=notes, disk_bytes=state_dict_bytes(quantized))

    return Config("torch.ao quantize_dynamic", build)


def _compiled_state_bytes(b: Built) -> int:
    return state_dict_bytes(b.fn)  # torch.compile's wrapper holds the (quantized) module's state


def _pass_summary(report) -> tuple[str, list[dict]]:
    records = [{"name": r.name, "status": r.status, "reason": r.reason, "stats": r.stats} for r in report.records]
    parts = []
    for r in report.records:
        text = f"{r.name}: {r.status}"
        if r.name == "quantize_int8" and r.status == APPLIED:
            s = r.stats
            text += f" (quantized {s.get('quantized')}, fp32_slower {s.get('fp32_slower')}, fp32_sensitive {s.get('fp32_sensitive')}, paths {s.get('paths')})"
        elif r.name == "quantize_weights" and r.status == APPLIED:
            text += f" ({', '.join(f'{k} {v}' for k, v in r.stats.items())})"
        elif r.status != APPLIED and r.reason:
            text += f" ({r.reason[:160]})"
        parts.append(text)
    return "; ".join(parts), records


def graphopt_config(passes: list, name: str, group: str, threads: int, *, example=None, backend: str = "eager", **optimize_kwargs) -> Config:
    """A graphopt pipeline built once (on ``example``, else the case's first batch) and reused;
    its pass records go to :data:`PASS_REPORTS`, its ``.pt2`` size to :data:`DISK`."""
    built: list[Built] = []

    def build(model, case_example):
        if built:
            return built[0]
        example_inputs = example or case_example
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = graphopt.optimize(model, list(passes), example_inputs, backend=backend, **optimize_kwargs)
        gm = opt.graph_module
        try:
            flops = count_flops(gm) or None
        except ValueError:  # data-dependent (remove_padding's token count)
            flops = None
        notes, records = _pass_summary(opt.report)
        PASS_REPORTS[f"{threads}/{group}/{name}"] = records
        if f"{group}/{name}" not in DISK:
            TO_SAVE[f"{group}/{name}"] = (opt, example_inputs)
        built.append(Built(opt, flops=flops, param_bytes=param_bytes(gm), notes=notes))
        return built[0]

    return Config(name, build)


def _saved_bytes(opt, example_inputs) -> int | str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt2"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graphopt.save(opt, str(path), example_inputs)
        except Exception as e:
            return f"not saved ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        return path.stat().st_size


def peer_configs(
    group: str, onnx_dynamic_shapes, unavailable: dict[str, str], *, onnx: bool = True, torchao: bool = True, dynamic: bool | None = None
) -> list[Config]:
    configs = [reused(eager(), group), reused(inductor(dynamic), group)]
    if torchao:
        reason = _available("torchao")
        if reason is None:
            configs.append(reused(torchao_int8(dynamic), group, _compiled_state_bytes))
        else:
            unavailable[TORCHAO] = reason
    if onnx:
        reason = _available("onnxruntime")
        for config in (onnxruntime_cpu(onnx_dynamic_shapes), onnxruntime_int8(onnx_dynamic_shapes)):
            if reason is None:
                configs.append(reused(config, group))
            else:
                unavailable[config.name] = reason
    configs.append(reused(torch_ao_dynamic(), group))
    return configs


def run_cases(cases: list[Case], rounds: int, warmup: int, unavailable: dict[str, str]) -> list:
    """:func:`run_case` on cases that share (reused) configurations: each is built once first, on
    the first case's first batch, and one that fails to build is left out of every case, the
    failure recorded in ``unavailable``; "build s" is that first build (and first call)."""
    first = cases[0]
    build_s, failed = {}, set()
    with inference_view(first.model), torch.no_grad():
        for cfg in first.configs:
            t0 = time.perf_counter()
            try:
                cfg.build(first.model, first.batches[0]).fn(*first.batches[0])
            except Exception as e:  # a failing configuration is a result, not the end of the run
                failed.add(cfg.name)
                message = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
                unavailable[f"{first.name.split(':')[0]} / {cfg.name}"] = f"build failed: {type(e).__name__}: {message[:200]}"
                print(f"[{first.name}] {cfg.name}: build failed ({type(e).__name__})", flush=True)
                continue
            build_s[cfg.name] = time.perf_counter() - t0
    rows = []
    for case in cases:
        case.configs = [cfg for cfg in case.configs if cfg.name not in failed]
        rows += run_case(case, rounds=rounds, warmup=warmup)
    for row in rows:
        row.build_s = build_s.get(row.config, row.build_s)
    return rows


# ----------------------------------------------------------------------------- part 1: MiniLM


def minilm_configs(entry, example, calibration, threads: int, notes: dict[str, str]) -> list[Config]:
    group = "MiniLM"
    q8 = graphopt.get_pass("quantize_int8")
    common = dict(example=example, dynamic_shapes=entry.dynamic_shapes, calibration=calibration)
    pipelines = [
        (["canonicalize"], "graphopt[canonicalize]", "eager"),
        (["canonicalize", "quantize_int8"], Q8, "eager"),
        (["canonicalize", "smooth_quant", "quantize_int8"], "graphopt[canonicalize,smooth_quant,quantize_int8]", "eager"),
        (["canonicalize", q8(outlier_threshold=6.0)], "graphopt[canonicalize,quantize_int8(outlier_threshold=6.0)]", "eager"),
        (["canonicalize", "remove_padding"], "graphopt[canonicalize,remove_padding]", "eager"),
        (["canonicalize", "remove_padding", "smooth_quant", "quantize_int8"], RP_Q8, "eager"),
        (["canonicalize", "remove_padding", "smooth_quant", "quantize_int8"], RP_Q8 + "/inductor", "inductor"),
    ]
    if has_pass("cast_bf16"):
        pipelines.append((["canonicalize", "remove_padding", "cast_bf16"], RP_BF16, "eager"))
    else:
        notes["cast_bf16"] = "not available: no pass registered as cast_bf16 in this checkout (graphopt.available_passes())"
    return [graphopt_config(passes, name, group, threads, backend=backend, **common) for passes, name, backend in pipelines]


def minilm_part(entry, sentences, args, threads: int, unavailable, notes) -> tuple[list, list[dict]]:
    chunks = [sentences[i : i + BATCH] for i in range(0, len(sentences), BATCH)]
    longest = [zoo.tokenize(entry.tokenizer, c) for c in chunks[: args.sentences // BATCH]]
    padded = [zoo.tokenize(entry.tokenizer, c, pad_to=128) for c in chunks[: args.padded_sentences // BATCH]]
    # calibration: batches of sentences outside the timed ones (the example is longest[0])
    rest = chunks[args.sentences // BATCH :] or chunks[1:]
    calibration = [zoo.tokenize(entry.tokenizer, c) for c in rest[: args.calibration_batches]]
    configs = peer_configs("MiniLM", entry.dynamic_shapes, unavailable) + minilm_configs(entry, longest[0], calibration, threads, notes)
    tokens = lambda batch: batch[1].bool()  # noqa: E731
    cases = [
        Case(f"MiniLM {threads}T padded to longest: {_describe(longest)}", entry.model, longest, configs, valid_tokens=tokens),
        Case(f"MiniLM {threads}T padded to 128: {_describe(padded)}", entry.model, padded, configs, valid_tokens=tokens),
    ]
    rows = run_cases(cases, args.rounds, args.warmup, unavailable)
    fidelity = minilm_fidelity(entry, sentences[: args.fidelity_sentences], cases[0].configs, threads)
    return rows, fidelity


def _describe(batches) -> str:
    total = sum(mask.numel() for _, mask in batches)
    pads = 1 - sum(int(mask.sum()) for _, mask in batches) / total
    widths = sorted({ids.shape[1] for ids, _ in batches})
    width = f"{widths[0]}" if len(widths) == 1 else f"{widths[0]}..{widths[-1]}"
    return f"{len(batches)} x [{BATCH}, {width}], {pads:.0%} pads"


def minilm_fidelity(entry, sentences, configs: list[Config], threads: int) -> list[dict]:
    """Every configuration's embeddings of all ``sentences`` (batches of 8, padded to the longest)
    against eager's: mean and min cosine, nearest-neighbour agreement."""
    batches = zoo.tokenize_batches(entry.tokenizer, sentences, BATCH)
    out = []
    with inference_view(entry.model), torch.no_grad():
        reference = torch.cat([entry.model(*b) for b in batches])
        for cfg in configs:
            fn = cfg.build(entry.model, batches[0]).fn  # already built: reused
            emb = torch.cat([fn(*b) for b in batches]).float()
            cos = zoo.cosine_similarity_rows(emb, reference)
            out.append(
                {
                    "threads": threads,
                    "config": cfg.name,
                    "sentences": len(sentences),
                    "mean_cosine": cos.mean().item(),
                    "min_cosine": cos.min().item(),
                    "nn_agreement": zoo.nearest_neighbour_agreement(emb, reference),
                }
            )
    return out


# ----------------------------------------------------------------------------- parts 2 and 3: ViT-S, gpt2-tiny


def vit_part(args, threads: int, unavailable) -> list:
    overrides = {"num_hidden_layers": 2} if args.quick else {}
    entry = zoo.load("vit-s", **overrides)
    gen = torch.Generator().manual_seed(0)
    batches = [entry.example_inputs] + [(torch.randn(1, 3, 224, 224, generator=gen),) for _ in range(args.vit_batches - 1)]
    group = "vit-s"
    configs = peer_configs(group, None, unavailable, onnx=False, dynamic=False)
    configs.append(graphopt_config(["canonicalize", "quantize_int8"], Q8, group, threads, dynamic_shapes=None))
    layers = entry.model.config.num_hidden_layers
    case = Case(f"vit-s ({layers} layers) {threads}T: {len(batches)} x [1, 3, 224, 224]", entry.model, batches, configs)
    return run_cases([case], args.rounds, args.warmup, unavailable)


def gpt2_part(args, threads: int, unavailable, notes) -> list:
    entry = zoo.load("gpt2-tiny")
    group = "gpt2-tiny"
    prefill_configs = [
        reused(eager(), group + " prefill"),
        reused(torch_ao_dynamic(), group + " prefill"),
        graphopt_config(["canonicalize", "quantize_int8"], Q8, group + " prefill", threads, dynamic_shapes=None),
    ]
    gen = torch.Generator().manual_seed(1)
    vocab = entry.model.config.vocab_size
    decode_batches = [(torch.randint(0, vocab, (1, 1), generator=gen),) for _ in range(args.decode_batches)]
    decode_configs = [
        reused(eager(), group + " decode"),
        reused(torch_ao_dynamic(), group + " decode"),
        graphopt_config(["canonicalize", "quantize_int8"], Q8, group + " decode", threads, dynamic_shapes=None),
    ]
    if has_pass("quantize_weights"):
        qw = graphopt.get_pass("quantize_weights")
        for options in ({"bits": 8}, {"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 64}, {"bits": 4, "group_size": 128}):
            label = ",".join(f"{k}={v}" for k, v in options.items())
            decode_configs.append(
                graphopt_config(
                    ["canonicalize", qw(**options)], f"graphopt[canonicalize,quantize_weights({label})]", group + " decode", threads, dynamic_shapes=None
                )
            )
    else:
        notes["quantize_weights"] = "not available: no pass registered as quantize_weights in this checkout (graphopt.available_passes())"
    cases = [
        Case(f"gpt2-tiny {threads}T prefill: 1 x {list(entry.example_inputs[0].shape)}", entry.model, [entry.example_inputs], prefill_configs),
        Case(f"gpt2-tiny {threads}T decode: {len(decode_batches)} x [1, 1]", entry.model, decode_batches, decode_configs),
    ]
    return run_cases(cases[:1], args.decode_rounds, 2, unavailable) + run_cases(cases[1:], args.decode_rounds, 2, unavailable)


# ----------------------------------------------------------------------------- part 4: per-linear microbenchmark


def median_ms(candidates: dict[str, Callable], budget_s: float, min_reps: int = 3, max_reps: int = 200) -> dict[str, float]:
    """Median ms of each candidate, run interleaved (one call of each per round) after one warm-up
    call; the number of rounds fits ``budget_s`` per candidate (at least ``min_reps``)."""
    first = {}
    for name, fn in candidates.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget_s / max(max(first.values()), 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _prepacked_dynamic(qweight, scale, bias, engine: str):
    """``torch.ops.quantized.linear_dynamic``'s packed weight for ``engine`` (the same ±63 int8 codes)."""
    saved = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zeros = torch.zeros(qweight.shape[0], dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(qw, bias)
    finally:
        torch.backends.quantized.engine = saved


def linear_candidates(x, w, bias, qweight, scale, vnni: bool) -> dict[str, tuple[str, Callable]]:
    """name -> (kind "fp32" | "int8", fn) for one ``[M, K] x [N, K]ᵀ`` linear."""
    m, k = x.shape
    n = w.shape[0]
    out: dict[str, tuple[str, Callable]] = {"fp32 F.linear": ("fp32", lambda: F.linear(x, w, bias))}
    for p in quant_cpu.int8_paths_available(m, n, k):
        kind = "fp32" if p == "fp32" else "int8"  # graphopt's "fp32" path: the int8 function on an fp32 GEMM
        out[f"graphopt {p}"] = (kind, lambda p=p: quant_cpu.int8_linear_cpu(x, qweight, scale, bias, path=p))
    for engine in ("fbgemm", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            try:
                packed = _prepacked_dynamic(qweight, scale, bias, engine)
                torch.ops.quantized.linear_dynamic(x, packed, False)
            except Exception:
                continue
            out[f"linear_dynamic {engine}"] = ("int8", lambda packed=packed: torch.ops.quantized.linear_dynamic(x, packed, False))
    if vnni:
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        wq = qweight.t()
        if m > 16:
            out["torch._int_mm"] = ("int8", lambda: torch._int_mm(xq, wq))
    return out


def measure_peaks(budget_s: float, vnni: bool) -> dict:
    """The fastest fp32 and int8 GEMM at PEAK_SIZE³ on this machine now (measured peaks)."""
    s = PEAK_SIZE
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(s, s, generator=gen), torch.randn(s, s, generator=gen) * 0.02
    qweight, scale = quantize_per_channel(w, 63)
    candidates = linear_candidates(x, w, None, qweight, scale, vnni)
    candidates["fp32 torch.mm"] = ("fp32", lambda: torch.mm(x, w.t()))
    candidates.pop("graphopt fp32", None)
    ms = median_ms({name: fn for name, (_, fn) in candidates.items()}, budget_s, min_reps=3, max_reps=10)
    gops = {name: 2 * s**3 / (t * 1e-3) / 1e9 for name, t in ms.items()}
    peaks = {}
    for kind in ("fp32", "int8"):
        best = max((name for name, (k, _) in candidates.items() if k == kind), key=lambda name: gops[name])
        peaks[kind] = {"gops": gops[best], "by": best, "ms": ms[best]}
    peaks["all"] = {name: round(g, 1) for name, g in gops.items()}
    return peaks


def micro_part(args, threads: int) -> tuple[list[dict], dict]:
    vnni = cpu_capabilities().vnni
    peaks = measure_peaks(args.micro_budget * 3, vnni)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n, k in MICRO_SHAPES:
        w, bias = torch.randn(n, k, generator=gen) * 0.05, torch.randn(n, generator=gen) * 0.01
        qweight, scale = quantize_per_channel(w, 63)
        for m in args.micro_m:
            x = torch.randn(m, k, generator=gen)
            candidates = linear_candidates(x, w, bias, qweight, scale, vnni)
            ms = median_ms({name: fn for name, (_, fn) in candidates.items()}, args.micro_budget)
            for name, (kind, _) in candidates.items():
                gops = 2 * m * n * k / (ms[name] * 1e-3) / 1e9
                rows.append(
                    {
                        "threads": threads,
                        "N x K": f"{n}x{k}",
                        "M": m,
                        "kernel": name,
                        "ms": round(ms[name], 4),
                        "GOP/s": round(gops, 1),
                        "vs fp32 F.linear": round(ms[name] / ms["fp32 F.linear"], 3),
                        "% of peak": round(100 * gops / peaks[kind]["gops"], 1),
                        "peak": kind,
                    }
                )
    return rows, peaks


# ----------------------------------------------------------------------------- summaries and targets


def minilm_summary(rows, fidelity) -> list[dict]:
    by_key = {}
    for r in (r for r in rows if r.case.startswith("MiniLM")):
        kind = "longest" if "padded to longest" in r.case else "128"
        threads = r.case.split()[1]
        by_key[(threads, kind, r.config)] = r
    table = []
    for f in fidelity:
        t = f"{f['threads']}T"
        longest, p128 = by_key.get((t, "longest", f["config"])), by_key.get((t, "128", f["config"]))
        size = DISK.get(f"MiniLM/{f['config']}")
        table.append(
            {
                "threads": f["threads"],
                "configuration": f["config"],
                "longest ms (vs eager)": f"{longest.median_ms:.1f} ({longest.ratio:.2f}x)" if longest else "",
                "128 ms (vs eager)": f"{p128.median_ms:.1f} ({p128.ratio:.2f}x)" if p128 else "",
                "mean cosine": f"{f['mean_cosine']:.6f}",
                "min cosine": f"{f['min_cosine']:.6f}",
                "NN agreement": f"{f['nn_agreement']:.3f}",
                "size MiB": _mib(size),
            }
        )
    return table


def _mib(size) -> str:
    return f"{size / 2**20:.1f}" if isinstance(size, int) else (size or "")


def targets(rows, fidelity, micro, peaks_by_threads, notes) -> list[str]:
    """The issue's targets against what this run measured; never more than the numbers show."""
    vnni = cpu_capabilities().vnni
    by_key = {(r.case, r.config): r for r in rows}
    fid = {(f["threads"], f["config"]): f for f in fidelity}
    lines = []
    minilm_cases = [c for c in dict.fromkeys(r.case for r in rows) if c.startswith("MiniLM")]

    def get(case, config):
        return by_key.get((case, config))

    for case in minilm_cases:
        threads = int(case.split()[1].rstrip("T"))
        e, q, ao, ort = get(case, "eager"), get(case, Q8), get(case, TORCHAO), get(case, ORT)
        f = fid.get((threads, Q8))
        if q is None or f is None:
            continue
        cos = f["mean_cosine"]
        parts = [f"{q.median_ms:.1f} ms, speedup {e.median_ms / q.median_ms:.2f}x over eager ({e.median_ms:.1f} ms)"]
        if ao:
            parts.append(f"{ao.median_ms / q.median_ms:.2f}x over torchao+inductor ({ao.median_ms:.1f} ms)")
        if ort:
            parts.append(f"{ort.median_ms / q.median_ms:.2f}x over onnxruntime fp32 ({ort.median_ms:.1f} ms)")
        parts.append(f"mean cosine {cos:.5f} ({'meets' if cos >= 0.999 else 'below'} 0.999)")
        if vnni:
            met = ao is not None and q.median_ms <= ao.median_ms and cos >= 0.999
            clause = "VNNI CPU: >= torchao+inductor speed at mean cosine >= 0.999"
        else:
            met = q.median_ms < e.median_ms and (ort is None or q.median_ms < ort.median_ms) and cos >= 0.999
            clause = "AVX2-only CPU: faster than fp32 eager and onnxruntime (at mean cosine >= 0.999)"
            if ort is None:
                clause += "; onnxruntime not measured"
        lines.append(f"- quantize_int8 alone, {case}: {_verdict(met)} ({clause}): " + ", ".join(parts))

    for case in [c for c in minilm_cases if "padded to longest" in c]:
        threads = int(case.split()[1].rstrip("T"))
        e, ao = get(case, "eager"), get(case, TORCHAO)
        for name in (RP_Q8, RP_Q8 + "/inductor"):
            r = get(case, name)
            if r is None:
                continue
            speedup = e.median_ms / r.median_ms
            vs_ao = ao.median_ms / r.median_ms if ao else None
            met = speedup >= 5 and vs_ao is not None and vs_ao >= 1.7
            f = fid.get((threads, name))
            cos = f" (mean cosine {f['mean_cosine']:.5f})" if f else ""
            ao_text = f", {vs_ao:.2f}x over torchao+inductor (target 1.7x)" if vs_ao else ", torchao not measured"
            lines.append(f"- int8 + remove_padding {name}, {case}: {_verdict(met)}: speedup {speedup:.2f}x over eager (target 5x){ao_text}{cos}")

    bf16_rows = [(c, get(c, RP_BF16)) for c in minilm_cases if get(c, RP_BF16)]
    if not bf16_rows:
        lines.append(f"- bf16 + remove_padding >= 3x eager at cosine >= 0.9999: not measured ({notes.get('cast_bf16', 'no cast_bf16 configuration ran')})")
    for case, r in bf16_rows:
        threads = int(case.split()[1].rstrip("T"))
        records = PASS_REPORTS.get(f"{threads}/MiniLM/{RP_BF16}", [])
        status = next((f"{x['status']}" + (f" ({x['reason'][:160]})" if x["reason"] else "") for x in records if x["name"] == "cast_bf16"), "unknown")
        f = fid.get((threads, RP_BF16))
        speedup = get(case, "eager").median_ms / r.median_ms
        applied = status.startswith(APPLIED)
        met = applied and speedup >= 3 and f is not None and f["mean_cosine"] >= 0.9999
        cos = f"mean cosine {f['mean_cosine']:.6f}" if f else "cosine not measured"
        lines.append(f"- bf16 + remove_padding, {case}: {_verdict(met)}: cast_bf16 {status}; {speedup:.2f}x over eager (target 3x), {cos} (target 0.9999)")

    for threads, peaks in peaks_by_threads.items():
        if not micro:
            break
        big = max(r["M"] for r in micro if r["threads"] == threads)
        for shape in dict.fromkeys(r["N x K"] for r in micro):
            points = [
                r
                for r in micro
                if r["threads"] == threads and r["N x K"] == shape and r["M"] == big and r["kernel"].startswith("graphopt") and r["peak"] == "int8"
            ]
            if not points:
                lines.append(f"- int8 linear >= 70% of the int8 peak, {threads}T {shape} M={big}: not measured (no graphopt int8 path here)")
                continue
            best = max(points, key=lambda r: r["GOP/s"])
            met = best["% of peak"] >= 70
            lines.append(
                f"- int8 linear >= 70% of the measured int8 peak, {threads}T, {shape}, M={big}: {_verdict(met)}: {best['kernel']} {best['GOP/s']:.1f} GOP/s = "
                f"{best['% of peak']:.0f}% of {peaks['int8']['gops']:.1f} GOP/s ({peaks['int8']['by']} at {PEAK_SIZE}^3)"
            )
    return lines


def _verdict(met: bool) -> str:
    return "**met**" if met else "**NOT met**"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 thread, few batches, 1 round, 2-layer ViT, 3 microbench M values")
    parser.add_argument(
        "--threads", default=None, help="comma-separated torch/onnxruntime thread counts; every part runs at each (default 1,2; 1 with --quick)"
    )
    parser.add_argument("--sentences", type=int, default=64, help="real sentences timed padded to the longest (batches of 8)")
    parser.add_argument("--padded-sentences", type=int, default=32, help="real sentences timed padded to 128 (batches of 8)")
    parser.add_argument("--fidelity-sentences", type=int, default=128, help="real sentences whose embeddings are compared with eager")
    parser.add_argument("--calibration-batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds before timing (MiniLM, ViT)")
    parser.add_argument("--vit-batches", type=int, default=4)
    parser.add_argument("--decode-batches", type=int, default=16)
    parser.add_argument("--decode-rounds", type=int, default=20)
    parser.add_argument("--micro-budget", type=float, default=0.3, help="seconds per kernel and point in the microbenchmark")
    parser.add_argument("--parts", default="minilm,vit,gpt2,micro")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="quantize")
    args = parser.parse_args(argv)
    args.micro_m = MICRO_M
    if args.quick:
        args.sentences, args.padded_sentences, args.fidelity_sentences, args.calibration_batches = 16, 8, 16, 1
        args.threads = args.threads or "1"
        args.warmup = 0  # the fidelity check has already run every batch once
        args.rounds, args.vit_batches, args.decode_batches, args.decode_rounds, args.micro_budget = 1, 1, 4, 3, 0.03
        args.micro_m = (1, 128, 1024)
    thread_counts = [int(t) for t in (args.threads or "1,2").split(",")]
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    load_before, started = load_snapshot(), time.perf_counter()

    entry = zoo.load("minilm")
    sentences = zoo.real_sentences(max(128, args.fidelity_sentences))
    unavailable: dict[str, str] = {}
    notes: dict[str, str] = {}
    rows, fidelity, micro, peaks = [], [], [], {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"=== {threads} thread(s) ===", flush=True)
        if "minilm" in parts:
            r, f = minilm_part(entry, sentences, args, threads, unavailable, notes)
            rows += r
            fidelity += f
        if "vit" in parts:
            rows += vit_part(args, threads, unavailable)
        if "gpt2" in parts:
            rows += gpt2_part(args, threads, unavailable, notes)
        if "micro" in parts:
            m, p = micro_part(args, threads)
            micro += m
            peaks[threads] = p
            print(
                f"[micro {threads}T] peaks: fp32 {p['fp32']['gops']:.1f} GOP/s ({p['fp32']['by']}), int8 {p['int8']['gops']:.1f} GOP/s ({p['int8']['by']})",
                flush=True,
            )
        measure_saved_sizes()

    summary = minilm_summary(rows, fidelity)
    target_lines = targets(rows, fidelity, micro, peaks, notes)
    run = {
        "threads": thread_counts,
        "quick": args.quick,
        "load before": load_before,
        "load after": load_snapshot(),
        "wall s": round(time.perf_counter() - started),
        "versions": {m: getattr(sys.modules.get(m), "__version__", None) for m in ("torchao", "onnxruntime", "transformers")},
        "cpu capabilities": cpu_capabilities().describe(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }
    extra = {
        "run": run,
        "unavailable": unavailable,
        "notes": notes,
        "minilm_fidelity": fidelity,
        "minilm_summary": summary,
        "disk_bytes": DISK,
        "pass_reports": PASS_REPORTS,
        "micro": micro,
        "peaks": {str(k): v for k, v in peaks.items()},
        "targets": target_lines,
    }
    json_path, md_path = write_results(rows, args.out, args.name, extra=extra)
    env_line = md_path.read_text().split("\n\n")[1]
    md_path.write_text(_markdown(args, env_line, rows, summary, micro, peaks, run, unavailable, notes, target_lines))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


def _table(rows) -> str:
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) if rows else "(none)"


def _markdown(args, env_line, rows, summary, micro, peaks, run, unavailable, notes, target_lines) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items() if v)
    env_line = env_line.replace(f"threads {torch.get_num_threads()}, ", "")  # the thread count is per row here
    missing = "".join(f"\n- **{name}: not measured.** {reason}" for name, reason in {**unavailable, **notes}.items())
    part = lambda prefix: [r for r in rows if r.case.startswith(prefix)]  # noqa: E731
    peak_lines = "\n".join(
        f"- {t} thread(s): fp32 peak {p['fp32']['gops']:.1f} GOP/s ({p['fp32']['by']}), int8 peak {p['int8']['gops']:.1f} GOP/s ({p['int8']['by']}); all: {p['all']}"
        for t, p in peaks.items()
    )
    quick = (
        " **Quick smoke run** (one thread count unless --threads is given, few batches, 1 round without warm-up, 2-layer ViT, fewer microbench points):"
        " it checks the script works; its numbers are indicative only."
        if args.quick
        else ""
    )
    return f"""# {args.name}

{env_line}, {versions}; threads {", ".join(map(str, run["threads"]))} (each part at each; the case names say which: "1T", "2T"); {run["cpu capabilities"]}.
Machine load (2 cores shared with other engineers): before {run["load before"]}; after {run["load after"]}; the run took {run["wall s"]} s.{quick}

What is measured: latency is the median over rounds of running every batch of a case once, the
configurations interleaved round by round in one process (bench/harness.py); "vs first" is the
ratio to eager PyTorch in the same case and at the same thread count (lower is faster). "max rel
err" and "min cosine" in the harness tables are against eager on the timed batches (sentence
embeddings for MiniLM, hidden states for ViT, logits for gpt2). Sizes on disk: graphopt, the
`graphopt.save` .pt2 archive; torch peers, `torch.save(state_dict)`; onnxruntime, the .onnx file.
Peers: torchao `quantize_(copy, Int8DynamicActivationInt8WeightConfig())` + inductor; onnxruntime
fp32 (`torch.onnx.export(dynamo=True)`, CPUExecutionProvider) and int8 (`onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)`
on that export); torch.ao `quantize_dynamic({{nn.Linear}}, qint8)`, which warns that it is
deprecated (the warning is in its notes). Everything on CPU; onnxruntime's intra-op threads =
torch's.{missing}

## 1. MiniLM (real all-MiniLM-L6-v2), real sentences, batches of 8

graphopt pipelines are built once per thread count on the first padded-to-longest batch (dynamic
batch and sequence), calibrated on {args.calibration_batches} other batch(es), and reused for the padded-to-128
case; inductor and torchao use torch.compile's default dynamic handling; onnxruntime is exported
with dynamic batch and sequence. Fidelity over {args.fidelity_sentences} real sentences (batches of 8 padded to
their longest): the embeddings of all of them against eager's.

{_table(summary)}

{markdown_table(part("MiniLM"))}

## 2. ViT-S (random init)

{markdown_table(part("vit-s"))}

## 3. gpt2-tiny: prefill and batch-1 decode

gpt2's attention and MLP use transformers' `Conv1D`, not `nn.Linear`: torch.ao `quantize_dynamic`
(and torchao) only quantize its `lm_head` (tied to the embedding; the copy unties nothing on disk
only because `torch.save` stores shared storage once). Decode is one token without a KV cache
(the captured function runs with `use_cache=False`): memory-bound linears at M = 1.

{markdown_table(part("gpt2-tiny"))}

Sizes on disk: {"; ".join(f"{k}: {_mib(v)} MiB" if isinstance(v, int) else f"{k}: {v}" for k, v in DISK.items() if k.startswith(("gpt2", "vit")))}

## 4. Per-linear microbenchmark (MiniLM's linear shapes)

Median of interleaved calls (one warm-up each). Peaks are **measured in this run** (the fastest
fp32 and int8 GEMM at {PEAK_SIZE}x{PEAK_SIZE}x{PEAK_SIZE} here, including quantizing the activations for the
int8 ones), not datasheet peaks; "% of peak" is against the fp32 peak for fp32 kernels and the int8
peak for int8 ones. graphopt's weights are int8 at ±63 (`quantize_per_channel(w, 63)`, what
`quantize_int8` stores on CPUs without VNNI); `linear_dynamic` gets the same codes prepacked per
engine, `reduce_range=False`.
{"`torch._int_mm` is timed (this CPU has VNNI)." if cpu_capabilities().vnni else "`torch._int_mm` is not timed: this CPU has no VNNI (AVX2 only), where ATen runs it as a reference loop about 30x slower than fp32."}

{peak_lines}

{_table(micro)}

## Targets

{chr(10).join(target_lines)}
"""


if __name__ == "__main__":
    sys.exit(main())
