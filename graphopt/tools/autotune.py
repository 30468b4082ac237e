"""``passes="auto"``: the approximate passes and per-layer settings that run fastest within a budget.

Every approximate pass has settings per layer (int8, bf16 or fp32 for each linear, a keep ratio
after each attention, linear attention or not), and the best combination depends on the model, the
data and the machine. :func:`tune` measures instead of guessing, on the graph captured once (each
candidate is a pipeline run on it):

1. **Baseline.** The exact passes (:func:`~graphopt.pipeline.pass_base.default_pass_names`) are
   always on; their graph is the baseline every time and fidelity is compared with, and fidelity is
   measured against the original model's outputs.
2. **Knobs, measured one at a time.** A knob is one family's setting at one *slot*; the knobs of a
   slot exclude each other:

   * a linear (graph order) runs in one precision: ``quantize_int8``; ``smooth_quant`` (SmoothQuant's
     exact migration, then int8; tried only on the third of the linears where int8 alone loses the
     most); or ``cast_bf16`` (the pass's own check leaves the family out without native bf16);
   * after an attention, one token reduction: ``prune_tokens`` at each of ``keep_ratios``, or
     ``merge_tokens`` at each of ``merge_r``. The two passes do not combine in one graph, so only
     the family that saves more within the budget (predicted) goes on to the frontier;
   * an attention becomes ``attention_to_linear`` (asked for by name: it trains in every build).

   The passes run without their own speed checks, budgets and fallbacks: the search does those by
   measurement. A knob's *loss* is ``1 - fidelity`` (the budget's measure, e.g. the mean cosine of
   the outputs) of the baseline plus that knob alone, on the calibration inputs. Its *gain* is the
   time it saves, timed beside the baseline (rounds interleaved, medians). A single linear moves the
   model's time by about one per cent, below the timing noise, so linears are timed in groups of the
   same weight shape (the same GEMM) and precision, with three times the rounds (one group decides
   for many linears), and a group's saving is shared equally;
   SmoothQuant's scales are absorbed by the int8 op, so its gain is int8's. Other knobs are timed
   alone, and only when their loss is within the frontier's reach (4x the budget's allowance). A
   group or knob that is no faster on this machine is never chosen, so the choice is never slower
   than fp32.
3. **Order: a greedy multiple-choice knapsack.** The steps along each slot's upper convex hull of
   (loss, gain) from "off" are, from every slot together, sorted by gain per loss. Losses of
   different slots add up to first order.
4. **Measured frontier.** Prefixes of that order are built and measured for real, fidelity on the
   calibration inputs and time beside the baseline: at predicted losses spread around the budget's
   allowance (:data:`PROBES`), then bisected at the budget's edge. The prefixes within the budget
   are timed again, all together with twice the rounds (separate comparisons against the baseline
   differ by up to about 20% at 2 threads), and the fastest one is chosen and checked on the
   held-out inputs: the budget must hold for the held-out mean less two standard errors (of the
   per-row measure), so that it holds on unseen inputs of the same kind, not just on average over
   this sample; if it misses, the next fastest, down to the baseline (the report then says the
   budget holds for the exact passes only).
5. **Cache.** Knob measurements are stored in ``cache_dir()/autotune/<key>.json``; the key hashes the
   baseline graph's code and weights, the calibration inputs, the CPU, the torch version, the
   budget's metric and the timing options (not the threshold, nor the families: entries are per
   knob), so a second search on the same model and machine, for the same budget or another,
   measures only its frontier.
6. **Peers** (``peers=``): after the search, eager, inductor, torchao int8 and onnxruntime
   (:mod:`graphopt.tools.peers`) are measured on the same inputs and timed beside the exact
   passes and the choice, so the report puts their single points next to the frontier.

The choice is a pass list (:func:`~graphopt.pipeline.pass_base.pass_spec` dicts) that
``optimize(passes=...)`` accepts as is or from the file :meth:`TuneResult.save` writes, so it is
reproduced without searching again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tabulate import tabulate
from torch.fx import GraphModule

from graphopt.ir import aten, is_op, val_of
from graphopt.ir.linears import find_linears
from graphopt.ir.tokens import packed_attention
from graphopt.ops.cbuild import cache_dir
from graphopt.ops.platform import cpu_capabilities
from graphopt.pipeline.manager import PassManager
from graphopt.pipeline.pass_base import default_pass_names, make_pass, pass_spec
from graphopt.pipeline.report import APPLIED
from graphopt.frontends.capture import graph_dynamic_shapes, normalize_args, normalize_batches
from graphopt.tools import peers as peer_builders
from graphopt.tools.peers import PEERS, PeerUnavailable
from graphopt.pipeline.verify import Budget, Exact, flat_outputs

__all__ = ["FAMILIES", "FrontierPoint", "Knob", "TuneResult", "load_config", "tune"]

LINEAR_FAMILIES = ("quantize_int8", "smooth_quant", "cast_bf16")
"""One choice per linear: int8, SmoothQuant-migrated int8, or bf16 (else fp32)."""
TOKEN_FAMILIES = ("prune_tokens", "merge_tokens")
"""One choice per attention: a keep ratio, or a number of tokens merged (else all tokens go on)."""
FAMILIES = (*LINEAR_FAMILIES, *TOKEN_FAMILIES, "attention_to_linear")
"""The approximate families :func:`tune` can search, in the order they are measured."""
DEFAULT_FAMILIES = FAMILIES[:-1]
"""The families searched by default: ``attention_to_linear`` trains each converted layer's feature
map (about 25 s per layer for MiniLM on 2 cores) in every build that has it, so it is asked for by name."""

CONFIG_FORMAT = "graphopt.passes/1"
PROBES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
"""The frontier's probes: prefixes at these multiples of the budget's allowance (``1 - threshold``)."""


@dataclass(frozen=True)
class Knob:
    """One family's setting at one layer: a linear family on linear ``layer`` (graph order), a token
    family after attention ``layer`` (``value``: the keep ratio, or the tokens merged per sequence),
    or ``attention_to_linear`` on attention ``layer``."""

    family: str
    layer: int
    value: Any = True

    @property
    def slot(self) -> tuple[str, int]:
        """The knobs of one slot exclude each other (a linear runs in one precision)."""
        kind = "linear" if self.family in LINEAR_FAMILIES else "tokens" if self.family in TOKEN_FAMILIES else "attention"
        return kind, self.layer

    @property
    def label(self) -> str:
        return {
            "quantize_int8": f"int8 linear {self.layer}",
            "smooth_quant": f"smooth+int8 linear {self.layer}",
            "cast_bf16": f"bf16 linear {self.layer}",
            "prune_tokens": f"prune after attention {self.layer} keep {self.value:g}",
            "merge_tokens": f"merge after attention {self.layer} r {self.value}",
            "attention_to_linear": f"linear attention {self.layer}",
        }[self.family]


@dataclass
class FrontierPoint:
    """A measured configuration: its knobs (a prefix of the search order), fidelity and time."""

    knobs: int
    predicted_loss: float
    fidelity: float
    latency_ms: float
    speedup: float
    passes: list[dict]
    held_out: float | None = None
    settings: list[str] = field(default_factory=list)


@dataclass
class TuneResult:
    """What :func:`tune` chose and measured.

    Attributes:
        budget: the budget, described.
        passes: the chosen pipeline as :func:`~graphopt.pipeline.pass_base.pass_spec` dicts.
        settings: the same choice per layer (knob labels such as ``"int8 linear 3"``, in slot order).
        fidelity, held_out: the choice's fidelity on the calibration and held-out inputs (held_out
            None without held-out inputs).
        speedup: its time against the baseline's (the exact passes), measured side by side.
        baseline_ms, latency_ms: the two times (the timing batches, median over rounds).
        frontier: every configuration measured, in order of knobs.
        knobs: per knob label, its ``loss`` alone and ``gain_ms`` (None where it was not timed: a
            loss beyond the frontier's reach).
        notes: what was left out and why (families not applicable, groups no faster, the time limit).
        environment: the CPU and torch version the times belong to.
        seconds: the search's wall time; cached: knobs read from the cache.
        peers: per peer asked for (``eager``, ``inductor``, ... of :data:`graphopt.tools.peers.PEERS`),
            and for ``exact passes`` and ``auto`` (the choice), timed together after the search:
            ``fidelity`` on the calibration inputs, ``latency_ms``, ``vs_exact`` (speed against the
            exact passes in that same timing).
    """

    budget: str
    passes: list[dict]
    fidelity: float
    held_out: float | None
    speedup: float
    baseline_ms: float
    latency_ms: float
    frontier: list[FrontierPoint] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    knobs: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cached: int = 0
    peers: dict[str, dict[str, float]] = field(default_factory=dict)

    def config(self) -> dict:
        """The saved form: the pass list with what it was chosen for."""
        return {
            "format": CONFIG_FORMAT,
            "budget": self.budget,
            "fidelity": self.fidelity,
            "held_out": self.held_out,
            "speedup": self.speedup,
            "environment": self.environment,
            "passes": self.passes,
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`config` as JSON; ``optimize(passes=path)`` and :func:`load_config` read it."""
        path = Path(path)
        path.write_text(json.dumps(self.config(), indent=2) + "\n")
        return path

    def table(self) -> str:
        """The measured frontier as a table (the chosen row marked)."""
        rows = []
        for point in self.frontier:
            chosen = "<-" if point.passes == self.passes else ""
            held = "" if point.held_out is None else f"{point.held_out:.4f}"
            rows.append([point.knobs, f"{point.predicted_loss:.4f}", f"{point.fidelity:.4f}", held, f"{point.latency_ms:.1f}", f"{point.speedup:.2f}x", chosen])
        headers = ["knobs", "predicted loss", "fidelity", "held out", "ms", "vs exact passes", "chosen"]
        return tabulate(rows, headers=headers, tablefmt="github")

    def peer_table(self) -> str:
        """The peers' single points beside the choice's, from one side-by-side timing ("" without peers)."""
        if not self.peers:
            return ""
        eager = self.peers.get("eager", {}).get("latency_ms")
        rows = [
            [name, f"{p['fidelity']:.6f}", f"{p['latency_ms']:.1f}", f"{p['vs_exact']:.2f}x", f"{eager / p['latency_ms']:.2f}x" if eager else ""]
            for name, p in sorted(self.peers.items(), key=lambda kv: kv[1]["latency_ms"])
        ]
        return tabulate(rows, headers=["", "fidelity", "ms", "vs exact passes", "vs eager"], tablefmt="github", disable_numparse=True)

    def summary(self) -> str:
        held = "" if self.held_out is None else f", {self.held_out:.4f} held out"
        lines = [
            f"budget {self.budget}: {self.speedup:.2f}x the exact passes, fidelity {self.fidelity:.4f}{held} ({self.seconds:.0f} s, {self.cached} knobs cached)",
            f"chosen: {describe_settings(self.settings) or 'the exact passes only'}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def plot(self, path: str | Path) -> Path:
        """The frontier (speed against fidelity) as a PNG; needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - matplotlib is in the bench extra
            raise RuntimeError("plotting the frontier needs matplotlib (pip install matplotlib)") from exc
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p.fidelity for p in self.frontier], [p.speedup for p in self.frontier], "o-", label="measured frontier")
        ax.plot([self.fidelity], [self.speedup], "r*", markersize=14, label="chosen")
        for name, peer in self.peers.items():
            if name not in ("auto", "exact passes"):
                ax.plot([peer["fidelity"]], [peer["vs_exact"]], "s", label=name)
        ax.set_xlabel("fidelity (calibration inputs)")
        ax.set_ylabel("speed vs the exact passes")
        ax.invert_xaxis()
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)


def describe_settings(labels: Sequence[str]) -> str:
    """Knob labels with their layer numbers gathered into ranges: ``int8 linear 0-5, 7; merge after attention 0 r 16``."""
    groups: dict[tuple[str, str], list[int]] = {}
    for label in labels:
        head, number, tail = re.match(r"(.*?\s)(\d+)(\s.*|)$", label).groups()
        groups.setdefault((head, tail), []).append(int(number))
    parts = []
    for (head, tail), numbers in groups.items():
        runs: list[list[int]] = []
        for n in sorted(numbers):
            if runs and n == runs[-1][-1] + 1:
                runs[-1].append(n)
            else:
                runs.append([n])
        parts.append(head + ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs) + tail)
    return "; ".join(parts)


def load_config(path: str | Path) -> list[dict]:
    """The pass list of a file :meth:`TuneResult.save` wrote (``ValueError`` if it is not one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the pass configuration {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT or not isinstance(data.get("passes"), list):
        raise ValueError(f"{path} is not a graphopt pass configuration (format {CONFIG_FORMAT!r} with a 'passes' list)")
    return data["passes"]


# ----------------------------------------------------------------------------- measuring


class _Measurer:
    """Runs pipelines on the baseline graph and measures them against the original outputs."""

    def __init__(self, base: GraphModule, args, kwargs, fit, held, timing, reference_fit, reference_held, budget: Budget, rounds: int):
        self.base, self.args, self.kwargs = base, args, kwargs
        self.fit, self.held, self.timing = fit, held, timing
        self.reference_fit, self.reference_held = reference_fit, reference_held
        self.budget, self.rounds = budget, rounds

    def build(self, specs: list[dict]) -> tuple[GraphModule, list[str]]:
        """The baseline graph with ``specs`` applied; the reasons of passes that did not apply."""
        if not specs:
            return self.base, []
        manager = PassManager([make_pass(s) for s in specs], verify=False, count_flops=False)
        gm, report = manager.run(self.base, self.args, self.kwargs, calibration=[(a, k) for a, k in self.fit])
        wanted = {s["pass"] for s in specs}
        return gm, [f"{r.name}: {r.reason}" for r in report.records if r.name in wanted and r.status != APPLIED]

    def fidelity(self, gm, held: bool = False) -> float:
        """The budget's measure over ``fit`` (or ``held``), rows weighted alike across batches."""
        return self.rows(gm, held).mean().item()

    def rows(self, gm, held: bool = False) -> torch.Tensor:
        """The budget's measure per output row over ``fit`` (or ``held``)."""
        batches, references = (self.held, self.reference_held) if held else (self.fit, self.reference_fit)
        values = []
        with torch.no_grad():
            for (a, k), ref in zip(batches, references):
                for out, r in zip(flat_outputs(gm(*a, **k)), flat_outputs(ref)):
                    if isinstance(r, torch.Tensor) and r.is_floating_point():
                        values.append(self.budget.rows(out, r).double().reshape(-1))
        return torch.cat(values) if values else torch.ones(1, dtype=torch.float64)

    def time(self, candidates: dict[str, Callable], rounds: int | None = None, warmup: int = 2) -> dict[str, float]:
        """Median milliseconds of each callable over the timing batches, ``rounds`` (default: the
        search's) interleaved, after ``warmup`` passes each."""
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        with torch.no_grad():
            for fn in candidates.values():  # warm up (first-call allocations, kernels chosen by measurement per shape)
                for _ in range(warmup):
                    for a, k in self.timing:
                        fn(*a, **k)
            for round_ in range(rounds or self.rounds):
                # every other round in reverse, so that running first or second weighs on both alike
                for name, fn in list(candidates.items())[:: 1 if round_ % 2 == 0 else -1]:
                    start = time.perf_counter()
                    for a, k in self.timing:
                        fn(*a, **k)
                    samples[name].append((time.perf_counter() - start) * 1e3)
        return {name: statistics.median(s) for name, s in samples.items()}


def _specs(knobs: Sequence[Knob]) -> list[dict]:
    """The pass specs that apply ``knobs`` on top of the baseline (one pass per family).

    Their order keeps every index valid: the token passes leave the linears and attentions in
    place, bf16 linears and SmoothQuant's scales leave the linears ``find_linears`` counts, and
    ``attention_to_linear`` (whose feature maps may add linears) comes last. The search's own
    measurements replace the passes' speed checks and budgets (``min_cosine=0``, no fallback).
    """
    layers = {f: sorted((k.layer, k.value) for k in knobs if k.family == f) for f in FAMILIES}
    specs = []
    if cuts := layers["prune_tokens"]:
        specs.append({"pass": "prune_tokens", "options": {"layers": [i for i, _ in cuts], "keep_ratio": [v for _, v in cuts], "min_cosine": 0.0}})
    if merges := layers["merge_tokens"]:
        specs.append({"pass": "merge_tokens", "options": {"layers": [i for i, _ in merges], "r": [v for _, v in merges], "min_cosine": 0.0}})
    if bf16 := layers["cast_bf16"]:
        specs.append({"pass": "cast_bf16", "options": {"layers": [i for i, _ in bf16], "attention": False, "min_cosine": 0.0}})
    if smooth := layers["smooth_quant"]:
        specs.append({"pass": "smooth_quant", "options": {"layers": [i for i, _ in smooth], "where_int8_pays": False}})
    if int8 := sorted(i for i, _ in layers["quantize_int8"] + smooth):
        specs.append({"pass": "quantize_int8", "options": {"layers": int8, "min_cosine": 0.0, "require_speedup": False, "fallback": False}})
    if linear_attention := layers["attention_to_linear"]:
        specs.append({"pass": "attention_to_linear", "options": {"layers": [i for i, _ in linear_attention], "min_cosine": 0.0, "fallback": False}})
    return [pass_spec(make_pass(s)) for s in specs]  # canonical: the options that differ from the defaults


def _hull_steps(options: list[tuple[Knob, float, float]]) -> list[tuple[Knob, float, float]]:
    """The steps along the upper convex hull of one layer's (loss, gain) options from (0, 0), each as
    (knob, added loss, added gain); options with no gain are dropped."""
    points = sorted(((max(loss, 0.0), gain, knob) for knob, loss, gain in options if gain > 0), key=lambda p: (p[0], -p[1]))
    steps, at_loss, at_gain = [], 0.0, 0.0
    while points:
        # the next hull vertex: the best added gain per added loss from where we stand
        best = max((p for p in points if p[1] > at_gain), key=lambda p: (p[1] - at_gain) / max(p[0] - at_loss, 1e-9), default=None)
        if best is None:
            break
        steps.append((best[2], best[0] - at_loss, best[1] - at_gain))
        at_loss, at_gain = best[0], best[1]
        points = [p for p in points if p[0] > at_loss or (p[0] == at_loss and p[1] > at_gain)]
    return steps


def _order(measured: dict[Knob, tuple[float, float]]) -> list[tuple[Knob, float, float]]:
    """All slots' hull steps in order of gain per loss (a later step of a slot replaces its earlier knob)."""
    by_slot: dict[tuple[str, int], list] = {}
    for knob, (loss, gain) in measured.items():
        by_slot.setdefault(knob.slot, []).append((knob, loss, gain))
    steps = [step for options in by_slot.values() for step in _hull_steps(options)]
    return sorted(steps, key=lambda s: (-(s[2] / max(s[1], 1e-9)), s[0].slot, s[0].family))


def _prefix(order: list[tuple[Knob, float, float]], count: int) -> tuple[list[Knob], float]:
    """The knobs after the first ``count`` steps (the last step per slot wins) and their predicted loss."""
    chosen: dict[tuple[str, int], Knob] = {}
    for knob, _, _ in order[:count]:
        chosen[knob.slot] = knob
    return list(chosen.values()), sum(loss for _, loss, _ in order[:count])


def _saved_within(order: list[tuple[Knob, float, float]], allowance: float) -> float:
    """The predicted time saved by the longest prefix of ``order`` within ``allowance``."""
    loss = saved = 0.0
    for _, step_loss, step_gain in order:
        if loss + step_loss > allowance:
            break
        loss, saved = loss + step_loss, saved + step_gain
    return saved


# ----------------------------------------------------------------------------- the search


def _peer_points(names, model, measurer: _Measurer, chosen: GraphModule, choice: FrontierPoint, notes: list[str], rounds: int, say) -> dict[str, dict]:
    """Each peer's fidelity and time beside the exact passes and the choice, timed together."""
    candidates: dict[str, Callable] = {"exact passes": measurer.base, "auto": chosen}
    start = time.perf_counter()
    fidelity = {"exact passes": measurer.fidelity(measurer.base), "auto": choice.fidelity}
    base_seconds = time.perf_counter() - start
    slow: dict[str, Callable] = {}
    for name in names:
        say(f"peer {name}: building")
        try:
            fn = peer_builders.build(name, model, measurer.args, measurer.kwargs, graph_dynamic_shapes(measurer.base))
            fidelity[name] = measurer.fidelity(fn)  # compiled peers compile here, on first call
            start = time.perf_counter()
            measurer.fidelity(fn)
            seconds = time.perf_counter() - start
        except PeerUnavailable as exc:
            notes.append(f"peer {name} left out: {exc}")
            continue
        except Exception as exc:  # a peer failing on this model is reported, not raised
            notes.append(f"peer {name} left out: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
            continue
        if seconds > 5 * base_seconds:  # e.g. torchao's int8 on a CPU without VNNI: one round tells
            slow[name] = fn
            notes.append(f"peer {name}: {seconds / base_seconds:.0f}x the exact passes' time, timed in one round")
        else:
            candidates[name] = fn
    times = measurer.time(candidates, rounds=rounds)
    for name, fn in slow.items():
        pair = measurer.time({"exact passes": measurer.base, name: fn}, rounds=1, warmup=0)
        times[name] = pair[name] * times["exact passes"] / pair["exact passes"]  # on the joint timing's scale
    return {name: {"fidelity": fidelity[name], "latency_ms": ms, "vs_exact": times["exact passes"] / ms} for name, ms in times.items()}


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(str((part.dtype, tuple(part.shape))).encode())
            h.update(part.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes() if part.numel() else b"")
        elif isinstance(part, (list, tuple)):
            h.update(b"[")
            for p in part:
                h.update(_digest(p).encode())
            h.update(b"]")
        elif isinstance(part, dict):
            h.update(_digest(sorted(part.items(), key=lambda kv: str(kv[0]))).encode())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:20]


def _graph_digest(gm: GraphModule) -> str:
    weights = [t for _, t in sorted(gm.state_dict().items())]
    return _digest(gm.code, weights)


def tune(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    budget: Budget,
    calibration: Sequence[Any] = (),
    holdout: Sequence[Any] | None = None,
    example_kwargs: dict | None = None,
    families: Sequence[str] = DEFAULT_FAMILIES,
    keep_ratios: Sequence[float] = (0.9, 0.7, 0.5),
    merge_r: Sequence[int] = (4, 8, 16),
    time_limit: float = 600.0,
    rounds: int = 5,
    timing_batches: int = 2,
    cache: bool = True,
    peers: Sequence[str] = (),
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search the approximate passes' per-layer settings for the fastest pipeline within ``budget``;
    see the module docstring.

    Args:
        model: the model (left unchanged).
        example_inputs, example_kwargs: as :func:`graphopt.optimize`; they capture the graph.
        budget: an approximate budget, :class:`~graphopt.MinCosine` or :class:`~graphopt.MinAgreement`,
            on the model's outputs against the original's.
        calibration: the inputs fidelity is measured on (tuples of positional inputs, single
            tensors, or ``(args, kwargs)`` pairs); the example inputs when empty.
        holdout: inputs the choice is checked on and never chosen with; None: every third
            calibration batch is held out (when there are at least three).
        families: the approximate passes to search (of :data:`FAMILIES`; default
            :data:`DEFAULT_FAMILIES`). A family that does not apply (``cast_bf16`` without native
            bf16) is left out with its reason in ``notes``.
        keep_ratios: the keep ratios ``prune_tokens`` tries after each attention.
        merge_r: the tokens per sequence ``merge_tokens`` tries merging after each attention.
        time_limit: seconds; knobs still unmeasured when 60% of it is spent are left out and the
            frontier stops at 90% (both said in ``notes``).
        rounds: timing rounds per comparison; timing_batches: calibration batches per timed round.
        cache: read and write knob measurements under ``cache_dir()/autotune``.
        peers: peers (:data:`graphopt.tools.peers.PEERS`) to measure beside the choice after the
            search, outside its time limit; one that cannot be built here is left out with its
            reason in ``notes``.
        seed: seeds torch's generator for the search (pass calibration draws no randomness of its own).
        log: progress messages.

    Returns:
        a :class:`TuneResult`; its ``passes`` go to ``optimize(passes=...)`` unchanged.
    """
    from graphopt.frontends.api import optimize  # same layer; a function-level import keeps the facade light

    if isinstance(budget, Exact) or not hasattr(budget, "threshold"):
        raise ValueError(f"passes='auto' needs an approximate budget such as MinCosine(0.995) or MinAgreement(0.99), not {budget!r}")
    unknown_peers = [p for p in peers if p not in PEERS]
    if unknown_peers:
        raise ValueError(f"unknown peers {unknown_peers}; the peers are {list(PEERS)}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; the search knows {list(FAMILIES)}")
    say = log or (lambda msg: None)
    started = time.perf_counter()
    torch.manual_seed(seed)

    exact = [{"pass": name} for name in default_pass_names()]
    base_opt = optimize(model, passes=[make_pass(s) for s in exact], example_inputs=example_inputs, example_kwargs=example_kwargs, calibration=calibration)
    base = base_opt.graph_module
    args, kwargs = normalize_args(example_inputs), dict(example_kwargs or {})
    batches = normalize_batches(calibration) or [(args, kwargs)]
    if holdout is None:
        held = batches[2::3] if len(batches) >= 3 else []
        fit = [b for i, b in enumerate(batches) if len(batches) < 3 or i % 3 != 2]
    else:
        fit, held = batches, normalize_batches(holdout)
    with torch.no_grad():
        reference_fit = [model(*a, **k) for a, k in fit]
        reference_held = [model(*a, **k) for a, k in held]
    measurer = _Measurer(base, args, kwargs, fit, held, fit[:timing_batches], reference_fit, reference_held, budget, rounds)
    notes: list[str] = []
    caps = cpu_capabilities()
    environment = {"cpu": caps.describe(), "torch": torch.__version__, "threads": str(torch.get_num_threads())}

    key = _digest(
        _graph_digest(base),
        [list(a) + sorted(k.items()) for a, k in fit + held],
        environment,
        budget.metric,
        rounds,
        timing_batches,
    )
    cache_file = cache_dir() / "autotune" / f"{key}.json"
    stored: dict[str, Any] = {}
    if cache and cache_file.exists():
        try:
            stored = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
    cached = 0

    def save_cache() -> None:
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(stored, indent=1))

    # -- knobs, one at a time: the loss of each; the gain where it can matter
    allowance = 1.0 - float(budget.threshold)
    reach = PROBES[-1] * allowance
    linears = find_linears(base)
    attentions = sum(1 for n in base.graph.nodes if is_op(n, aten.scaled_dot_product_attention.default) or packed_attention(n))
    groups: dict[str, list[int]] = {}
    for i, lin in enumerate(linears):
        shape = tuple(val_of(lin.weight_node).shape)
        groups.setdefault("x".join(map(str, shape[::-1] if lin.transposed else shape)), []).append(i)
    knobs: list[Knob] = []
    for family in families:
        if family in ("quantize_int8", "cast_bf16"):
            knobs += [Knob(family, i) for i in range(len(linears))]
        elif family == "prune_tokens":
            knobs += [Knob(family, layer, ratio) for layer in range(attentions) for ratio in keep_ratios]
        elif family == "merge_tokens":
            knobs += [Knob(family, layer, r) for layer in range(attentions) for r in merge_r]
        elif family == "attention_to_linear":
            knobs += [Knob(family, layer) for layer in range(attentions)]
        if family in LINEAR_FAMILIES and not linears:
            notes.append(f"{family} left out: no linear in the graph")
        elif family not in LINEAR_FAMILIES and not attentions:
            notes.append(f"{family} left out: no attention in the graph")

    losses: dict[Knob, float] = {}
    skipped_families: set[str] = set()

    def measure(knob: Knob) -> None:
        """The knob's loss, and for a knob timed alone (not a linear) its gain when the loss is
        within ``reach`` (the frontier's widest probe; a later search with a wider budget times the rest)."""
        nonlocal cached
        if knob.family in skipped_families:
            return
        entry = stored.get(knob.label, {})
        timed_alone = knob.family not in LINEAR_FAMILIES
        wants_gain = timed_alone and entry.get("loss", 1.0) <= reach and "gain_ms" not in entry
        if "loss" in entry and not wants_gain:
            losses[knob] = entry["loss"]
            cached += 1
            return
        if time.perf_counter() > started + 0.6 * time_limit:
            raise TimeoutError
        gm, reasons = measurer.build(_specs([knob]))
        if reasons:
            skipped_families.add(knob.family)
            notes.append(f"{knob.family} left out: {reasons[0]}")
            return
        entry = stored.setdefault(knob.label, {})
        if "loss" not in entry:
            entry["loss"] = 1.0 - measurer.fidelity(gm)
        losses[knob] = entry["loss"]
        if timed_alone and entry["loss"] <= reach:
            times = measurer.time({"baseline": base, "knob": gm})
            entry["gain_ms"] = times["baseline"] - times["knob"]
        say(f"{knob.label}: loss {losses[knob]:.2e}" + (f", saves {entry['gain_ms']:.1f} ms" if "gain_ms" in entry else ""))
        save_cache()

    def smooth_knobs() -> list[Knob]:
        """SmoothQuant only where int8 costs the most: the third of the linears with the largest int8
        losses (at least one). Its scales are absorbed by the int8 op, so its gain is int8's."""
        if "smooth_quant" not in families or "quantize_int8" not in families:
            return []
        int8 = sorted(((loss, k.layer) for k, loss in losses.items() if k.family == "quantize_int8" and loss > 0), reverse=True)
        return [Knob("smooth_quant", layer) for _, layer in int8[: max(1, len(int8) // 3)]]

    try:
        for knob in knobs:
            measure(knob)
        for knob in smooth_knobs():
            measure(knob)
    except TimeoutError:
        notes.append(f"time limit: knobs measured until 60% of {time_limit:.0f} s, the rest left out")

    # -- linears: the time saved per same-shape group and precision, shared equally
    for family in ("quantize_int8", "cast_bf16"):
        for shape, members in groups.items():
            group_key = f"{family} group {shape}"
            present = [Knob(family, i) for i in members if Knob(family, i) in losses]
            if not present:
                continue
            if group_key not in stored:
                if time.perf_counter() > started + 0.6 * time_limit:
                    notes.append(f"time limit: {family} group {shape} not timed")
                    continue
                gm, _ = measurer.build(_specs(present))
                # three times the rounds: a group decides for many linears at once, and int8's gain
                # on a small GEMM without VNNI is near the timing noise
                times = measurer.time({"baseline": base, "group": gm}, rounds=3 * rounds)
                stored[group_key] = {"gain_ms": times["baseline"] - times["group"], "members": len(present)}
                save_cache()
            else:
                cached += 1
            gain = stored[group_key]["gain_ms"] / stored[group_key]["members"]
            if gain <= 0:
                notes.append(f"{family} is no faster than fp32 for the {shape} linears on {caps.describe()}: left fp32")
            for knob in present:
                stored[knob.label]["gain_ms"] = gain
                if family == "quantize_int8" and Knob("smooth_quant", knob.layer) in losses:
                    stored[Knob("smooth_quant", knob.layer).label]["gain_ms"] = gain  # the int8 op absorbs the scales
    measured: dict[Knob, tuple[float, float]] = {}
    for knob, loss in losses.items():
        gain = stored.get(knob.label, {}).get("gain_ms")
        if gain is not None:
            measured[knob] = (loss, gain)
    save_cache()
    # pruning and merging do not combine in one graph (the second reads the packed layout the first
    # left): keep the family that saves more within the budget on its own
    by_family = {f: {k: v for k, v in measured.items() if k.family == f} for f in TOKEN_FAMILIES}
    if all(by_family.values()):
        saved = {f: _saved_within(_order(m), allowance) for f, m in by_family.items()}
        kept = max(TOKEN_FAMILIES, key=lambda f: saved[f])
        for family in TOKEN_FAMILIES:
            if family != kept:
                measured = {k: v for k, v in measured.items() if k.family != family}
                notes.append(
                    f"{family} left out: it does not combine with {kept} in one graph, which saves more within the budget"
                    f" ({saved[kept]:.1f} ms against {saved[family]:.1f} ms predicted)"
                )

    # -- the measured frontier over prefixes of the greedy order
    order = _order(measured)
    cumulative = [0.0]
    for _, loss, _ in order:
        cumulative.append(cumulative[-1] + loss)
    frontier: dict[int, FrontierPoint] = {}
    graphs: dict[int, GraphModule] = {}  # each point's graph, for the held-out check

    def measure_prefix(count: int) -> FrontierPoint:
        if count not in frontier:
            chosen, predicted = _prefix(order, count)
            specs = exact + _specs(chosen)
            gm, _ = measurer.build(_specs(chosen))
            times = measurer.time({"baseline": base, "candidate": gm} if chosen else {"baseline": base})
            times.setdefault("candidate", times["baseline"])
            settings = [k.label for k in sorted(chosen, key=lambda k: k.slot)]
            point = FrontierPoint(count, predicted, measurer.fidelity(gm), times["candidate"], times["baseline"] / times["candidate"], specs, settings=settings)
            frontier[count], graphs[count] = point, gm
            say(f"{count} knobs: fidelity {point.fidelity:.4f} (predicted {1 - predicted:.4f}), {point.speedup:.2f}x")
        return frontier[count]

    def count_at(loss: float) -> int:
        return max(i for i, c in enumerate(cumulative) if c <= loss) if order else 0

    measure_prefix(0)
    targets = sorted({count_at(f * allowance) for f in PROBES} | {len(order)})
    for count in targets:
        if time.perf_counter() > started + 0.9 * time_limit:
            notes.append("time limit: the frontier was cut short")
            break
        measure_prefix(count)
    # bisect between the largest prefix within budget and the smallest one beyond it
    for _ in range(4):
        inside = [c for c, p in frontier.items() if budget.within(p.fidelity)]
        outside = [c for c, p in frontier.items() if not budget.within(p.fidelity) and c > max(inside, default=0)]
        if not inside or not outside or time.perf_counter() > started + 0.9 * time_limit:
            break
        lo, hi = max(inside), min(outside)
        if hi - lo <= 1:
            break
        measure_prefix((lo + hi) // 2)

    # -- the points within budget, timed again together with twice the rounds: one comparison of
    # all of them is worth more than separate ones against the baseline (whose noise differs)
    points = sorted(frontier.values(), key=lambda p: p.knobs)
    contenders = [p for p in points if budget.within(p.fidelity)]
    if len(contenders) > 1 and time.perf_counter() < started + time_limit:
        times = measurer.time({"baseline": base, **{str(p.knobs): graphs[p.knobs] for p in contenders if p.knobs}}, rounds=2 * rounds)
        for point in contenders:
            point.latency_ms = times.get(str(point.knobs), times["baseline"])
            point.speedup = times["baseline"] / point.latency_ms
        say("within budget, timed together: " + ", ".join(f"{p.knobs} knobs {p.speedup:.2f}x" for p in contenders))

    # -- choose: the fastest within budget on calibration that also holds on the held-out inputs,
    # with two standard errors of their mean to spare (a point chosen at the budget's very edge of
    # the calibration set would miss on unseen inputs about half the time)
    choice = points[0]
    for point in sorted((p for p in points if budget.within(p.fidelity)), key=lambda p: -p.speedup):
        if not held:
            choice = point
            break
        rows = measurer.rows(graphs[point.knobs], held=True)
        point.held_out = rows.mean().item()
        bound = point.held_out - 2 * (rows.std().item() if len(rows) > 1 else 0.0) / math.sqrt(len(rows))
        if budget.within(bound):
            choice = point
            break
        notes.append(
            f"{point.knobs} knobs: {point.fidelity:.4f} on calibration, {point.held_out:.4f} held out, whose lower bound"
            f" (mean - 2 standard errors over {len(rows)} rows) {bound:.4f} misses the budget; not chosen"
        )
    if not budget.within(points[0].fidelity):
        notes.append(f"the budget cannot be met: the exact passes alone give {points[0].fidelity:.6f}, outside {budget.describe()}")
    elif choice.knobs == 0:
        notes.append(f"no approximate setting fits {budget.describe()}: the exact passes only")
    if not held:
        notes.append("no held-out inputs (fewer than three calibration batches): the choice is checked on calibration only")
    peer_points = _peer_points(peers, model, measurer, graphs[choice.knobs], choice, notes, 2 * rounds, say) if peers else {}
    result = TuneResult(
        budget=budget.describe(),
        passes=choice.passes,
        fidelity=choice.fidelity,
        held_out=choice.held_out,
        speedup=choice.speedup,
        baseline_ms=choice.latency_ms * choice.speedup,
        latency_ms=choice.latency_ms,
        frontier=points,
        settings=choice.settings,
        knobs={k.label: {"loss": loss, "gain_ms": stored.get(k.label, {}).get("gain_ms")} for k, loss in losses.items()},
        notes=notes,
        environment=environment,
        seconds=time.perf_counter() - started,
        cached=cached,
        peers=peer_points,
    )
    say(result.summary())
    return result
