"""Side-by-side benchmark harness: one model, several configurations, one process.

A *configuration* turns ``(model, example_inputs)`` into a callable (eager PyTorch, ``torch.compile``
with inductor, a graphopt pipeline on some backend, and, in later cases, onnxruntime or torchao).
:func:`run_case` builds every configuration, checks each against eager on every input batch, then
times them *interleaved* — round after round, each configuration once per batch — so that machine
noise hits all of them alike, and reports median latency and its ratio to the first configuration.

Results are :class:`Row` records; :func:`write_results` saves them as JSON and as a markdown table
(``bench/results/<name>.json`` and ``.md``), the files the README's numbers come from.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tabulate import tabulate

import graphopt
from graphopt.frontends.capture import inference_view
from graphopt.ir.flops import count_flops, param_bytes
from graphopt.pipeline.verify import Exact, MinCosine, compare
from graphopt.tools import peers

Builder = Callable[[torch.nn.Module, tuple], "Built"]


@dataclass
class Built:
    """A configuration ready to run, with what is known about its graph."""

    fn: Callable
    flops: int | None = None
    param_bytes: int | None = None
    notes: str = ""
    disk_bytes: int | None = None
    """The size of what the configuration saves to disk (e.g. its ``.onnx`` file), where it records one."""


@dataclass
class Config:
    name: str
    build: Builder


@dataclass
class Row:
    case: str
    config: str
    median_ms: float
    ratio: float  # median latency / the first configuration's median latency (lower is faster)
    flops: int | None
    param_bytes: int | None
    rel_err: float
    cosine: float
    build_s: float
    notes: str = ""


def _graph_stats(gm) -> dict[str, int]:
    return {"flops": count_flops(gm), "param_bytes": param_bytes(gm)}


def eager() -> Config:
    def build(model, example):
        gm = graphopt.capture(model, example)
        return Built(model, **_graph_stats(gm))

    return Config("eager", build)


def inductor(dynamic: bool | None = False) -> Config:
    """``torch.compile`` with inductor (:func:`graphopt.tools.peers.inductor`); ``dynamic=None`` is
    torch's default (static first, then one dynamic recompile), for batches of varying shapes."""

    def build(model, example):
        gm = graphopt.capture(model, example)
        return Built(peers.inductor(model, dynamic), **_graph_stats(gm))

    return Config("inductor", build)


def torchao_int8(dynamic: bool | None = False) -> Config:
    """torchao dynamic int8 activations + int8 weights on every ``nn.Linear`` (a copy of the model),
    compiled with inductor (:func:`graphopt.tools.peers.torchao_int8`)."""
    return Config("torchao int8 + inductor", lambda model, example: Built(peers.torchao_int8(model, dynamic)))


def onnxruntime_cpu(dynamic_shapes: Any = None) -> Config:
    """The model exported by ``torch.onnx.export`` (the dynamo exporter) and run by onnxruntime's
    CPUExecutionProvider (:func:`graphopt.tools.peers.onnxruntime`). ``dynamic_shapes`` is a
    ``torch.export`` spec for inputs of varying shapes."""

    def build(model, example):
        run, size = peers.onnxruntime(model, example, dynamic_shapes)
        return Built(run, disk_bytes=size)

    return Config("onnxruntime (CPU)", build)


def onnxruntime_int8(dynamic_shapes: Any = None) -> Config:
    """As :func:`onnxruntime_cpu`, with the exported model quantized by onnxruntime's own dynamic
    quantizer: ``quantize_dynamic(..., per_channel=True, weight_type=QuantType.QInt8)`` (int8
    weights per output channel, activations quantized per tensor at run time)."""

    def build(model, example):
        run, size = peers.onnxruntime(model, example, dynamic_shapes, quantize=True)
        return Built(run, disk_bytes=size)

    return Config("onnxruntime int8 (CPU)", build)


def graphopt_pipeline(passes: Sequence[str], backend: str = "eager", name: str | None = None, **optimize_kwargs) -> Config:
    def build(model, example):
        opt = graphopt.optimize(model, list(passes), example, backend=backend, **optimize_kwargs)
        applied = ",".join(opt.report.applied) or "none applied"
        return Built(opt, notes=f"applied: {applied}", **_graph_stats(opt.graph_module))

    return Config(name or f"graphopt[{'+'.join(passes)}]/{backend}", build)


@dataclass
class Case:
    """A model and the input batches it is timed and checked on."""

    name: str
    model: torch.nn.Module
    batches: list[tuple]
    configs: list[Config]
    notes: dict[str, Any] = field(default_factory=dict)
    valid_tokens: Callable[[tuple], torch.Tensor] | None = None
    """For encoders whose outputs carry tokens: ``batch -> [B, S]`` bool, True at real tokens.
    Fidelity then compares ``[B, S, ...]`` outputs at real tokens only (at pads the original values
    mean nothing and ``remove_padding`` gives zeros)."""


def _leaves(out, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if valid is None:
        return leaves
    return [x[valid] if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(valid.shape) else x for x in leaves]


def run_case(case: Case, *, rounds: int = 10, warmup: int = 2, log: Callable[[str], None] = print) -> list[Row]:
    """Build, check and time every configuration of ``case``; the first is the baseline.

    Everything runs on the function graphopt captures (eval mode, KV cache off), so that eager
    decoders are not timed building a cache the optimized graphs do not return.
    """
    with inference_view(case.model):
        return _run_case(case, rounds, warmup, log)


def _run_case(case: Case, rounds: int, warmup: int, log: Callable[[str], None]) -> list[Row]:
    built: list[tuple[Config, Built, float]] = []
    for cfg in case.configs:
        log(f"[{case.name}] building {cfg.name}")
        t0 = time.perf_counter()
        b = cfg.build(case.model, case.batches[0])
        with torch.no_grad():
            b.fn(*case.batches[0])  # compile-on-first-call backends pay their build cost here
        built.append((cfg, b, time.perf_counter() - t0))

    with torch.no_grad():
        valid = [case.valid_tokens(batch) if case.valid_tokens else None for batch in case.batches]
        refs = [_leaves(case.model(*batch), v) for batch, v in zip(case.batches, valid)]
        fidelity = []
        for _, b, _ in built:
            outs = [_leaves(b.fn(*batch), v) for batch, v in zip(case.batches, valid)]
            rel = max(compare(o, r, Exact()).value for o, r in zip(outs, refs))
            cos = min(compare(o, r, MinCosine()).value for o, r in zip(outs, refs))
            fidelity.append((rel, cos))

        for _ in range(warmup):
            for _, b, _ in built:
                for batch in case.batches:
                    b.fn(*batch)
        times: list[list[float]] = [[] for _ in built]
        for _ in range(rounds):
            for i, (_, b, _) in enumerate(built):
                _synchronize()
                t0 = time.perf_counter()
                for batch in case.batches:
                    b.fn(*batch)
                _synchronize()  # GPU kernels run asynchronously: time them to completion
                times[i].append((time.perf_counter() - t0) * 1e3)

    medians = [statistics.median(t) for t in times]
    rows = []
    for (cfg, b, build_s), med, (rel, cos) in zip(built, medians, fidelity):
        rows.append(Row(case.name, cfg.name, med, med / medians[0], b.flops, b.param_bytes, rel, cos, build_s, b.notes))
        log(f"[{case.name}] {cfg.name}: {med:.2f} ms ({med / medians[0]:.2f}x), rel_err {rel:.1e}, cosine {cos:.6f}")
    return rows


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# the instruction-set flags fast paths depend on (int8 dot products, bf16, AMX tiles)
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu() -> dict[str, Any]:
    """The CPU's model name and which of the flags that decide fast paths it has (``/proc/cpuinfo``)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": model, "cpu flags": " ".join(f for f in _CPU_FLAGS if f in flags) or "none of " + ", ".join(_CPU_FLAGS)}


def environment() -> dict[str, Any]:
    return {
        **cpu(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown_table(rows: Sequence[Row]) -> str:
    table = [
        [
            r.case,
            r.config,
            f"{r.median_ms:.2f}",
            f"{r.ratio:.2f}x",
            "" if r.flops is None else f"{r.flops / 1e9:.3f}",
            "" if r.param_bytes is None else f"{r.param_bytes / 2**20:.1f}",
            f"{r.rel_err:.1e}",
            f"{r.cosine:.6f}",
            f"{r.build_s:.1f}",
            r.notes,
        ]
        for r in rows
    ]
    headers = ["case", "configuration", "median ms", "vs first", "GFLOPs", "params MiB", "max rel err", "min cosine", "build s", "notes"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def write_results(rows: Sequence[Row], out_dir: str | Path, name: str, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"environment": env, "rows": [dataclasses.asdict(r) for r in rows], **(extra or {})}
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2))
    env_line = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    md_path.write_text(
        f"# {name}\n\n{env_line}\n\nLatency is the median over rounds of running every batch once; ratios are against the first configuration of each case.\n\n{markdown_table(rows)}\n"
    )
    return json_path, md_path


def load_snapshot() -> str:
    """The time and the load average, for a results file's "Machine load" line (before and after a run)."""
    one, five, fifteen = os.getloadavg()
    return f"{time.strftime('%H:%M:%S')} load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


def results_header(title: str, env: dict[str, Any], before: str, after: str, seconds: float, script: str, doc: str | None) -> list[str]:
    """The first paragraphs of a results ``.md``: the title, the environment, the machine load and
    the command, then the script's docstring after its first paragraph (what is measured)."""
    args = " ".join(sys.argv[1:])
    return [
        f"# {title}\n",
        ", ".join(f"{k} {v}" for k, v in env.items() if v is not None) + ".",
        f"Machine load: before {before}; after {after}; the run took {seconds:.0f} s (python {script}{' ' + args if args else ''}).\n",
        (doc or "").split("\n\n", 1)[1].strip() + "\n",
    ]
