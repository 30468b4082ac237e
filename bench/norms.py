"""Norm benchmark: LayerNorm against the RMSNorm that replaces it, eager and inductor, side by side.

    python bench/norms.py                     # writes bench/results/norms.{json,md}
    python bench/norms.py --rounds 100 --shapes 8x128x384 --threads 1

``layernorm_to_rmsnorm`` swaps ``aten.layer_norm`` for ``graphopt::rms_norm`` (with the
LayerNorm's bias). This measures whether the swap pays on each backend, for the norm alone and for
the residual add + norm of a Pre-LN block (which returns the stream too), at transformer shapes.
The inputs are centred rows (as the stream is after the pass recentres its writers), so every
configuration computes the same function and the harness's check against the first one (eager
LayerNorm) is meaningful. Configurations:

* ``layer_norm``: ``aten.layer_norm`` with gain and bias (the baseline);
* ``aten.rms_norm + bias``: what a naive swap runs (``aten.rms_norm`` has no bias);
* ``graphopt::rms_norm``: the custom op; eager CPU runs its C kernel (fp32), CUDA its Triton
  kernel, inductor its decomposition (fused into the generated kernel);
* ``ATen formulation``: :func:`graphopt.ops.norms.rms_norm_torch`, the op's CPU fallback (other dtypes,
  strided inputs, no C compiler), called directly, eager only;
* ``reference formula``: the op's reference written out (what the op ran on CPU before), eager only;
* ``layer_norm of [x, -x]``: the only exact route from RMSNorm to LayerNorm's fused kernel (a row
  and its negation have mean 0 and variance ``mean(x²)``), eager only, for the record. (On centred
  rows ``layer_norm`` itself equals RMSNorm: that is the baseline row.)

Shapes: three transformer activations and a batch of short sentences (8x24x384), where fixed
per-call costs show: a call of a graphopt op costs ~7 us more Python dispatch (the custom-op
machinery) than an ATen op. Ratios are to eager ``layer_norm`` of the same case; the summary table below the results gives
``graphopt::rms_norm`` against ``layer_norm`` on the same backend. Compile caches are off, so the
inductor graphs are built with the decompositions of this checkout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Built, Case, Config, Row, run_case, write_results  # noqa: E402

from graphopt.ops.norms import c_kernels, rms_norm_reference, rms_norm_torch  # noqa: E402

SHAPES = [(8, 128, 384), (1, 2048, 768), (32, 64, 384), (8, 24, 384)]  # the last: a batch of short sentences
EPS = 1e-5


def _layer_norm(h, w, b):
    return F.layer_norm(h, h.shape[-1:], w, b, EPS)


def _aten_rms_norm_plus_bias(h, w, b):
    return torch.rms_norm(h, h.shape[-1:], w, EPS) + b


def _graphopt_rms_norm(h, w, b):
    return torch.ops.graphopt.rms_norm(h, w, b, EPS)


def _reference_formula(h, w, b):
    return rms_norm_reference(h, w, b, EPS)


def _aten_formulation(h, w, b):
    return rms_norm_torch(h, w, b, EPS)


def _layer_norm_of_mirrored(h, w, b):
    d = h.shape[-1]
    return torch.addcmul(b, F.layer_norm(torch.cat([h, -h], -1), (2 * d,), None, None, EPS)[..., :d], w)


NORMS = {
    "layer_norm": _layer_norm,
    "aten.rms_norm + bias": _aten_rms_norm_plus_bias,
    "graphopt::rms_norm": _graphopt_rms_norm,
    "ATen formulation": _aten_formulation,
    "reference formula": _reference_formula,
    "layer_norm of [x, -x]": _layer_norm_of_mirrored,
}
COMPILED_NORMS = ["layer_norm", "aten.rms_norm + bias", "graphopt::rms_norm"]


class Norm(torch.nn.Module):
    """``norm(x)``, or with ``residual``: ``h = x + residual`` and ``(norm(h), h)`` (a Pre-LN block's add + norm)."""

    def __init__(self, norm, d: int, residual: bool):
        super().__init__()
        self.norm, self.residual = norm, residual
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(d))

    def forward(self, x, r=None):
        if not self.residual:
            return self.norm(x, self.weight, self.bias)
        h = x + r
        return self.norm(h, self.weight, self.bias), h


def _config(name: str, norm, backend: str, d: int, residual: bool, device: str) -> Config:
    def build(model, example):
        module = Norm(norm, d, residual).to(device)
        module.load_state_dict(model.state_dict())
        fn = module if backend == "eager" else torch.compile(module, backend="inductor", dynamic=False)
        if device == "cuda":
            return Built(_synchronized(fn), notes="Triton kernel" if name == "graphopt::rms_norm" and backend == "eager" else "")
        return Built(fn)

    return Config(f"{backend} {name}", build)


def _synchronized(fn):
    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


def norm_case(shape: tuple[int, ...], residual: bool, device: str, calls_per_round: int) -> Case:
    torch.manual_seed(0)
    d = shape[-1]

    def centred():
        x = torch.randn(shape, device=device)
        return x - x.mean(-1, keepdim=True)

    inputs = (centred(), centred()) if residual else (centred(),)
    configs = [_config(name, NORMS[name], "eager", d, residual, device) for name in NORMS]
    configs += [_config(name, NORMS[name], "inductor", d, residual, device) for name in COMPILED_NORMS]
    name = f"{'add + norm' if residual else 'norm'} {'x'.join(map(str, shape))} {device}"
    return Case(name, Norm(_layer_norm, d, residual).to(device), [inputs] * calls_per_round, configs)


def summary(rows: list[Row]) -> list[dict[str, object]]:
    """Per case and backend: graphopt::rms_norm and aten.rms_norm + bias over layer_norm on that backend."""
    median = {(r.case, r.config): r.median_ms for r in rows}
    return [
        {
            "case": case,
            "backend": backend,
            "graphopt::rms_norm / layer_norm": round(median[(case, f"{backend} graphopt::rms_norm")] / median[(case, f"{backend} layer_norm")], 2),
            "aten.rms_norm + bias / layer_norm": round(median[(case, f"{backend} aten.rms_norm + bias")] / median[(case, f"{backend} layer_norm")], 2),
        }
        for case in dict.fromkeys(r.case for r in rows)
        for backend in ("eager", "inductor")
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES), help="comma-separated, e.g. 8x128x384")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--calls", type=int, default=10, help="calls of each configuration per round")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="norms")
    parser.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    torch.compiler.config.force_disable_caches = True
    rows = []
    with torch.no_grad():
        for device in devices:
            for residual in (False, True):
                for shape in shapes:
                    rows += run_case(norm_case(shape, residual, device, args.calls), rounds=args.rounds)
    triton_note = (
        "Triton: on CUDA, eager graphopt::rms_norm runs the Triton kernel."
        if "cuda" in devices
        else ("Triton: not measured, no CUDA device on this machine (the kernels are tested under the Triton interpreter).")
    )
    notes = (
        f"Each round runs every configuration {args.calls} times on the same batch: 'median ms' is for {args.calls} calls "
        f"(median over {args.rounds} rounds). "
        f"The eager graphopt::rms_norm CPU kernel: {'C (built)' if c_kernels() else 'ATen formulation (no C compiler)'}. "
        "Inputs are centred rows, so all configurations compute the same function. " + triton_note
    )
    ratios = summary(rows)
    json_path, md_path = write_results(rows, args.out, args.name, extra={"notes": notes, "summary": ratios})
    table = tabulate(ratios, headers="keys", tablefmt="github", floatfmt=".2f")
    md_path.write_text(md_path.read_text() + f"\n{notes}\n\n## graphopt::rms_norm against layer_norm, same backend (lower is faster)\n\n{table}\n")
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
