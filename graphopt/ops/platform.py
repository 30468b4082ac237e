"""What this CPU can do, and which kernel is fastest on it: capability probes and measured choices.

CPUs differ more than their instruction sets suggest. On an AVX-512 VNNI CPU ``torch._int_mm`` is
5-6x faster than an fp32 GEMM; on an AVX2-only one it falls back to a reference loop 30x *slower*,
and bf16 GEMMs are emulated (9x slower). A kernel is therefore chosen in two steps:

1. :func:`cpu_capabilities` rules out candidates the CPU cannot run natively (no VNNI: no
   ``_int_mm``; no ``avx512_bf16``/AMX: no bf16), from ``/proc/cpuinfo`` and torch's own probe;
2. :func:`fastest` times the remaining candidates once, on the real shapes, and caches the result
   in ``$XDG_CACHE_HOME/graphopt/kernel_timings.json`` under a key naming the CPU model, its flags,
   torch's version and the thread count, so later runs and processes reuse the measurement.

Every choice keeps an fp32 candidate in the race, so a path slower than fp32 is never taken.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from graphopt.ops.cbuild import cache_dir, cpu_flags

__all__ = ["CpuCapabilities", "cpu_capabilities", "fastest", "forget_timings", "timings_file"]


@dataclass(frozen=True)
class CpuCapabilities:
    """The facts about this CPU that decide kernel paths.

    Attributes:
        model: the CPU's model name (``/proc/cpuinfo``), "unknown" where there is none.
        flags: its feature flags.
        torch_capability: ``torch.backends.cpu.get_cpu_capability()`` ("AVX2", "AVX512", ...).
    """

    model: str
    flags: frozenset[str]
    torch_capability: str

    @property
    def vnni(self) -> bool:
        """An int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX): int8 GEMMs accumulate without int16 saturation."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX-512 BF16 or AMX); elsewhere torch emulates it, slower than fp32."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def amx(self) -> bool:
        return "amx_int8" in self.flags

    def describe(self) -> str:
        """One line for reports: ``"AMD EPYC (AVX2; no VNNI, no native bf16)"``."""
        features = [self.torch_capability]
        features.append("VNNI" if self.vnni else "no VNNI")
        features.append("native bf16" if self.native_bf16 else "no native bf16")
        if self.amx:
            features.append("AMX")
        return f"{self.model} ({features[0]}; {', '.join(features[1:])})"

    def key(self) -> str:
        """A short key of everything that changes a kernel's speed: model, flags, torch, threads."""
        text = "|".join([self.model, " ".join(sorted(self.flags)), torch.__version__, str(torch.get_num_threads())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def cpu_capabilities() -> CpuCapabilities:
    """This machine's :class:`CpuCapabilities` (read once per process)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = frozenset(cpu_flags().split(":", 1)[-1].split())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an older torch without the probe
        capability = "unknown"
    return CpuCapabilities(model, flags, capability)


def timings_file() -> Path:
    """Where measured choices are cached: ``$XDG_CACHE_HOME/graphopt/kernel_timings.json``."""
    return cache_dir() / "kernel_timings.json"


_lock = threading.Lock()
_memory: dict[str, dict[str, Any]] = {}


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _store(path: Path, key: str, entry: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load(path)
        data[key] = entry
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement in the next process


def _race(candidates: Mapping[str, Callable[[], Any]], budget_s: float) -> dict[str, float]:
    """Median seconds per candidate, timed round-robin (a load change on the machine hits all alike)."""
    for fn in candidates.values():
        fn()  # warm-up: first-call packing and allocation
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    while min(map(len, runs.values())) < 3 or (time.perf_counter() - start < budget_s * len(candidates) and min(map(len, runs.values())) < 25):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    return {name: statistics.median(seconds) for name, seconds in runs.items()}


def fastest(kind: str, shape: tuple, candidates: Mapping[str, Callable[[], Any]], budget_s: float = 0.05) -> tuple[str, dict[str, float]]:
    """The fastest of ``candidates`` (name -> zero-argument callable) for ``kind`` at ``shape``, and all timings (s).

    Measured once per CPU, torch version and thread count (medians of a few runs within about
    ``budget_s`` per candidate, the candidates taking turns) and cached in memory and in :func:`timings_file`; a later call with the same
    key returns the cached answer without running anything, as long as the cached winner is still
    among ``candidates``.
    """
    key = f"{cpu_capabilities().key()}|{kind}|{'x'.join(map(str, shape))}"
    with _lock:
        entry = _memory.get(key)
        if entry is None:
            entry = _load(timings_file()).get(key)
        if entry is not None and entry.get("best") in candidates:
            _memory[key] = entry
            return entry["best"], dict(entry["seconds"])
        seconds = _race(candidates, budget_s)
        best = min(seconds, key=seconds.__getitem__)
        entry = {"best": best, "seconds": seconds, "cpu": cpu_capabilities().describe(), "threads": torch.get_num_threads()}
        _memory[key] = entry
        _store(timings_file(), key, entry)
        return best, dict(seconds)


def forget_timings() -> None:
    """Drop the in-memory cache (tests; the file stays)."""
    with _lock:
        _memory.clear()
