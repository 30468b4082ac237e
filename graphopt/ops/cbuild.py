"""Build the C kernels shipped beside an op's module, once per machine, and load them with ``ctypes``.

An op folder may ship a ``cpu.c``: a few dozen lines of plain C (OpenMP loops, auto-vectorised by
``-O3 -march=native``) for what ATen needs several full-tensor passes to do. :func:`build_c_library`
compiles it on first use with the machine's C compiler (``$CC``, default ``cc``) into
``$XDG_CACHE_HOME/graphopt`` (``~/.cache/graphopt``), linked against the OpenMP runtime torch has
loaded (one thread pool, not two), under a name that hashes the source, the compiler, the runtime
and the CPU's flags; later processes load the cached library. A missing compiler, runtime, source
or writable cache, or a failed build, returns None (logged at INFO): every caller has an ATen
formulation to fall back on.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["build_c_library", "cache_dir", "cpu_flags", "openmp_runtime"]

log = logging.getLogger("graphopt.ops")

COMPILE_FLAGS = ("-O3", "-march=native", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
"""For this CPU, with OpenMP; ``-fno-math-errno -fno-trapping-math`` let ``rintf``, ``floorf``,
``fminf`` and ``sqrtf`` vectorise (the kernels never read ``errno`` nor trap on floating-point
exceptions). Results stay IEEE: no ``-ffast-math`` reassociation."""


def cache_dir() -> Path:
    """Where graphopt keeps what it builds and measures on this machine: ``$XDG_CACHE_HOME/graphopt``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt"


def openmp_runtime() -> str | None:
    """The OpenMP library torch runs its threads on (Linux), so the C kernels share its thread pool."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = re.search(r"(/\S*/lib(?:gomp|iomp5|omp)\b[^/\s]*\.so[^/\s]*)$", maps, re.MULTILINE)
    return found.group(1) if found else None


@functools.cache
def cpu_flags() -> str:
    """The CPU's feature-flags line of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def build_c_library(source: Path, name: str) -> ctypes.CDLL | None:
    """``source`` compiled for this CPU with OpenMP and loaded, or None where it cannot be built.

    ``name`` prefixes the cached library's file name (``<name>_<hash>.so``). Callers cache the
    result (``functools.cache``) and declare the functions' ``argtypes``.
    """
    compiler, runtime = shutil.which(os.environ.get("CC", "cc")), openmp_runtime()
    if compiler is None or runtime is None:
        log.info("graphopt C kernels %s off: %s", name, "no C compiler" if compiler is None else "no OpenMP runtime found")
        return None
    try:
        source_text = source.read_text()
    except OSError as exc:
        log.info("graphopt C kernels %s off: %s", name, exc)
        return None
    key = hashlib.sha256("\0".join([source_text, compiler, runtime, cpu_flags(), *COMPILE_FLAGS]).encode()).hexdigest()[:16]
    cache = cache_dir()
    library = cache / f"{name}_{key}.so"
    try:
        if not library.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as build:
                src, built = Path(build) / f"{name}.c", Path(build) / f"{name}.so"
                src.write_text(source_text)  # the text the key hashes, whatever happens to the file meanwhile
                # compile with OpenMP, link against torch's runtime instead of the compiler's own
                subprocess.run([compiler, *COMPILE_FLAGS, "-c", str(src), "-o", f"{built}.o"], check=True, capture_output=True)
                subprocess.run([compiler, "-shared", f"{built}.o", runtime, "-lm", "-o", str(built)], check=True, capture_output=True)
                os.replace(built, library)  # atomic: concurrent first uses never load a partial file
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace") if isinstance(exc, subprocess.CalledProcessError) else exc
        log.info("graphopt C kernels %s off: %s", name, detail)
        return None
