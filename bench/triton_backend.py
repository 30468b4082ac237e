"""The ``triton`` backend against eager PyTorch and inductor on a GPU, side by side in one run.

    python bench/triton_backend.py            # needs CUDA; writes bench/results/triton_backend.{json,md}
    TRITON_INTERPRET=1 python bench/triton_backend.py --smoke   # CPU: runs every configuration once
                                                                # on tiny inputs, writes nothing

Each case runs the model in fp32 and in fp16 on the GPU, after graphopt's exact passes; the
configurations are eager PyTorch, ``torch.compile`` with inductor, graphopt's rewritten graph on
inductor, and graphopt's rewritten graph on the ``triton`` backend (generated kernels for every
fused region and attention call, library GEMMs for lone matmuls). Ratios are to eager in the
same run; the device is recorded with the numbers. The memory traffic the fusion saves is counted
analytically, without a GPU, by ``bench/fusion.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Case, eager, graphopt_pipeline, inductor, run_case, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt.tools import zoo  # noqa: E402

EXACT = graphopt.default_pass_names()


def _configs(smoke: bool, dtype: torch.dtype):
    # The passes' exact checks hold in fp32; fp16 fidelity is what the harness reports against eager.
    options = {"verify": dtype == torch.float32, **({"backend_options": {"interpret": True}} if smoke else {})}
    configs = [graphopt_pipeline(EXACT, "triton", name="graphopt/triton", **options)]
    if not smoke:
        configs = [inductor(), graphopt_pipeline(EXACT, "inductor", name="graphopt/inductor", verify=options["verify"]), *configs]
    return [eager(), *configs]


def _cases(device: str, dtype: torch.dtype, smoke: bool) -> list[Case]:
    generator = torch.Generator().manual_seed(0)
    batch, length, image = (1, 8, 32) if smoke else (8, 128, 224)
    gpt2 = zoo.load("gpt2-tiny")
    vit = zoo.load("vit-s", image_size=image, **({"num_hidden_layers": 1} if smoke else {}))
    minilm = zoo.load("minilm")
    ids, mask = zoo.tokenize(minilm.tokenizer, zoo.real_sentences(4 if smoke else 32), max_length=length)
    cases = [
        ("gpt2-tiny", gpt2.model, (torch.randint(0, 1000, (batch, length), generator=generator),)),
        ("vit-s", vit.model, (torch.randn(batch, 3, image, image, generator=generator),)),
        ("minilm", minilm.model, (ids, mask)),
    ]
    out = []
    for name, model, inputs in cases:
        model = model.to(device=device, dtype=dtype)
        inputs = tuple(x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype) for x in inputs)
        out.append(Case(f"{name} {str(dtype).removeprefix('torch.')} {tuple(inputs[0].shape)}", model, [inputs], _configs(smoke, dtype)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter: run each configuration once, write nothing")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print(
            "bench/triton_backend.py times the triton backend on a GPU and this machine has no CUDA device; bench/fusion.py counts what fusion saves without one"
        )
        return 2
    rows = []
    for dtype in (torch.float32,) if args.smoke else (torch.float32, torch.float16):
        for case in _cases("cpu" if args.smoke else "cuda", dtype, args.smoke):
            rows += run_case(case, rounds=1 if args.smoke else args.rounds, warmup=0 if args.smoke else 3)
    if not args.smoke:
        write_results(rows, Path(__file__).resolve().parent / "results", "triton_backend", {"passes": EXACT})
    return 0


if __name__ == "__main__":
    sys.exit(main())
