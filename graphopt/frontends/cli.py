"""The ``graphopt`` command-line tool (also ``python -m graphopt``).

Commands::

    graphopt passes                                 registered passes: exact or approximate, summary
    graphopt models                                 the zoo models
    graphopt dump MODEL --out DIR [--passes a,b]    what every pass did: text, diffs, DOT, ONNX
    graphopt optimize MODEL [--passes a,b] [--save FILE.pt2]
    graphopt export MODEL [--passes a,b] --onnx FILE.onnx
    graphopt tune MODEL [--budget cos=0.995] [--time-limit 10m] [--out FILE.json]
                                                    the fastest approximate passes within a budget
    graphopt demo [--passes a,b] [--batch 8]        the real MiniLM: report, fidelity, latency

``--passes`` also takes the ``.json`` file ``tune`` wrote: the pipeline it chose, reproduced.

MODEL is one of:

- ``zoo:NAME`` (see ``graphopt models``);
- ``hf:PATH``, a local Hugging Face model folder (``config.json``, weights, tokenizer files):
  ``AutoModel`` and ``AutoTokenizer`` as users load them, nothing downloaded; the example inputs
  are ``(input_ids, attention_mask)`` for the ``--text`` sentences (repeatable) or 8 built-in real
  sentences, padded to the longest, with dynamic batch and sequence dims;
- ``FILE.pt2``, an archive written by ``graphopt optimize --save``, ``graphopt.save`` or
  ``torch.export.save``: the program and the example inputs stored in it, its dynamic dims kept;
- ``path/to/file.py:factory``, where ``factory()`` returns ``(model, example_inputs)`` or
  ``(model, example_inputs, dynamic_shapes)``.

``--backend triton`` runs the pointwise/row/matmul/attention regions as generated Triton kernels;
it needs CUDA, or ``TRITON_INTERPRET=1`` in the environment to run them in the Triton interpreter on
the CPU (slow: tiny models only). ``dump`` then also writes ``kernels/``: one file per kernel with
the ATen region it computes, and an index.

Errors are one line on stderr, ``graphopt: error: ...``, exit status 2 for a wrong argument
(unknown pass or model, missing file or factory, malformed option) and 1 for a failure while
working (the factory raised, capture failed, a pass failed under ``--strict``). ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import importlib.util
import inspect
import io
import logging
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

import graphopt
from graphopt.tools import zoo
from graphopt.backends import available_backends, get_backend
from graphopt.frontends.api import ArchiveError
from graphopt.frontends.capture import graph_dynamic_shapes, one_line
from graphopt.frontends.dump import dump
from graphopt.frontends.onnx_export import OnnxExportError, export_onnx
from graphopt.pipeline import pass_base
from graphopt.pipeline.manager import run_graph
from graphopt.pipeline.verify import Budget, Exact, MinAgreement, MinCosine, compare, row_cosines
from graphopt.tools.autotune import load_config, tune
from graphopt.tools.peers import PEERS

PROG = "graphopt"

_EPILOG = """\
pass options:
  --passes takes a comma-separated list of registered pass names (see `graphopt passes`); without
  it, every exact pass runs. --option PASS.KEY=VALUE (repeatable) passes KEY=VALUE to that pass's
  constructor; VALUE is read as a Python literal (0.5, 3, True, [1, 2], 'text') and otherwise
  taken as a string. Example:
    graphopt optimize zoo:convnet-bn --passes fold_batchnorm --save convnet.pt2
    graphopt dump zoo:minilm --passes canonicalize --out dump/
    graphopt optimize hf:path/to/bert-folder --passes remove_padding --text "One sentence." --text "And another."
    graphopt dump convnet.pt2 --passes canonicalize --out dump2/
    graphopt optimize my_model.py:build --passes some_pass --option some_pass.threshold=0.999
"""


class UsageError(Exception):
    """Something the user typed names nothing that exists or is malformed (exit status 2)."""


class CommandError(Exception):
    """The command could not do its work (exit status 1)."""


# ----------------------------------------------------------------------------- progress


class Progress:
    """Progress messages on ``stream``, stamped with the seconds since the command started."""

    def __init__(self, quiet: bool, stream):
        self.quiet = quiet
        self.stream = stream
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"{time.perf_counter() - self.start:6.1f}s  {message}", file=self.stream, flush=True)


# ----------------------------------------------------------------------------- models


@dataclass
class Workload:
    """A model to optimize and the inputs to capture and verify it with."""

    name: str
    model: Any
    example_inputs: tuple
    dynamic_shapes: Any = None
    example_kwargs: dict | None = None
    tokenizer: Any = None  # text models (zoo, hf:PATH): `graphopt tune` tokenizes its calibration sentences with it


def load_model(spec: str, log: Callable[[str], None], texts: list[str] | None = None) -> Workload:
    """Build the model a ``MODEL`` argument names: ``zoo:NAME``, ``hf:PATH``, ``FILE.pt2`` or ``path/to/file.py:factory``.

    ``texts`` (``--text``) are the sentences of an ``hf:PATH`` model's example batch; they mean
    nothing to the other forms, which say so rather than ignore them.
    """
    if texts and not spec.startswith("hf:"):
        raise UsageError(f"--text builds the example inputs of an hf:PATH model; {spec!r} brings its own")
    if spec.startswith("hf:"):
        entry = zoo.load_hf(spec[len("hf:") :], texts=texts or None)
        batch, length = entry.example_inputs[0].shape
        log(f"loaded {spec}: {entry.description}; example batch: {batch} sentence{'' if batch == 1 else 's'}, padded to {length} tokens")
        return Workload(spec, entry.model, tuple(entry.example_inputs), entry.dynamic_shapes, tokenizer=entry.tokenizer)
    if spec.startswith("zoo:"):
        entry = zoo.load(spec[len("zoo:") :])
        log(f"loaded {spec}: {entry.description}")
        return Workload(spec, entry.model, tuple(entry.example_inputs), entry.dynamic_shapes, tokenizer=entry.tokenizer)
    if spec.endswith(".pt2"):
        return _load_archive(spec, log)
    path_text, sep, factory_name = spec.rpartition(":")
    if not sep or not path_text or not factory_name:
        hint = f"; for the Hugging Face model in that folder, give hf:{spec}" if (Path(spec) / "config.json").is_file() else ""
        raise UsageError(f"MODEL must be zoo:NAME or path/to/file.py:factory, got {spec!r} (or hf:PATH, FILE.pt2){hint}")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"no such file: {path_text}")
    module = _import_file(path)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        functions = [name for name, value in vars(module).items() if inspect.isfunction(value) and not name.startswith("_")]
        close = difflib.get_close_matches(factory_name, functions, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; functions there: {', '.join(functions) or 'none'}"
        raise UsageError(f"{path_text} has no function {factory_name!r}{hint}")
    try:
        made = factory()
    except Exception as e:  # noqa: BLE001 - whatever the user's code raises is reported in one line
        raise CommandError(f"{spec}() raised {one_line(e)}") from e
    return _workload_from_factory(spec, made, log)


def _load_archive(spec: str, log: Callable[[str], None]) -> Workload:
    """The program in a ``.pt2`` archive, with the example inputs stored in it and its dynamic dims."""
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"no such file: {spec}")
    try:
        program = graphopt.load_program(spec)
        module = program.module()
    except ArchiveError as e:  # its message starts with the path
        raise CommandError(f"cannot load {e}") from e
    except Exception as e:  # noqa: BLE001 - a damaged archive, a missing custom op
        raise CommandError(f"cannot load {spec}: {one_line(e)}") from e
    if not program.example_inputs:
        raise CommandError(
            f"{spec} stores no example inputs to capture and verify it with (archives written by older torch versions lack them); "
            "save the program again with graphopt.save or graphopt optimize --save"
        )
    args, kwargs = program.example_inputs
    count = len(args) + len(kwargs)
    log(f"loaded {spec}: a torch.export program, {count} input{'' if count == 1 else 's'}")
    # Without the spec the program would be re-captured at the example's shapes, and what was
    # saved to take any batch would come back fixed to one.
    return Workload(spec, module, tuple(args), graph_dynamic_shapes(module), dict(kwargs) or None)


def _import_file(path: Path):
    module_name = "graphopt_user_" + re.sub(r"\W", "_", path.stem)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    sys.path.insert(0, str(path.resolve().parent))  # like `python file.py`: the file may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a syntax error or a failing import in the user's file
        raise CommandError(f"cannot import {path}: {one_line(e)}") from e
    return module


def _workload_from_factory(spec: str, made: Any, log: Callable[[str], None]) -> Workload:
    if not (isinstance(made, (tuple, list)) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module)):
        raise CommandError(f"{spec}() must return (model, example_inputs) or (model, example_inputs, dynamic_shapes), got {type(made).__name__}")
    model, example_inputs = made[0], made[1]
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    log(f"loaded {spec}: {type(model).__name__}")
    return Workload(spec, model, example_inputs, made[2] if len(made) == 3 else None)


# ----------------------------------------------------------------------------- passes


def default_pass_names() -> list[str]:
    """What runs when ``--passes`` is not given: every exact pass of the default pipeline
    (:func:`graphopt.pipeline.pass_base.default_pass_names`)."""
    return pass_base.default_pass_names()


def parse_options(options: list[str]) -> dict[str, dict[str, Any]]:
    """``["p.key=value", ...]`` -> ``{"p": {"key": value}}``, values read as Python literals when they are."""
    parsed: dict[str, dict[str, Any]] = {}
    for option in options:
        match = re.fullmatch(r"(\w+)\.(\w+)=(.*)", option, flags=re.DOTALL)
        if match is None:
            raise UsageError(f"--option must look like PASS.KEY=VALUE, got {option!r}")
        pass_name, key, text = match.groups()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        parsed.setdefault(pass_name, {})[key] = value
    return parsed


def build_pipeline(passes: str | None, options: list[str]) -> list:
    """Pass instances for ``--passes`` (names, or a ``.json`` file ``graphopt tune`` wrote) and
    ``--option``; fails before any model is loaded."""
    if passes is not None and passes.endswith(".json"):
        if options:
            raise UsageError("--option cannot change a saved pipeline (--passes FILE.json); edit the file")
        try:
            return [graphopt.make_pass(spec) for spec in load_config(passes)]
        except (ValueError, TypeError) as e:
            raise UsageError(str(e).strip().splitlines()[0]) from e
    names = default_pass_names() if passes is None else [n.strip() for n in passes.split(",") if n.strip()]
    by_pass = parse_options(options)
    stray = sorted(set(by_pass) - set(names))
    if stray:
        raise UsageError(f"--option given for {', '.join(stray)}, which is not among the passes ({', '.join(names) or 'none'})")
    pipeline = []
    for name in names:
        cls = graphopt.get_pass(name)
        kwargs = by_pass.get(name, {})
        try:
            pipeline.append(cls(**kwargs))
        except TypeError as e:
            raise UsageError(f"pass {name!r} does not accept options {', '.join(kwargs)} ({e})") from e
    return pipeline


def _pipeline_flags(args) -> dict:
    """The keywords of ``optimize`` / ``dump`` that every pipeline command takes from its flags."""
    return {"backend": args.backend, "verify": not args.no_verify, "strict": args.strict, "log": args.log}


def check_backend_runs_here(name: str) -> None:
    """Fail before the slow part when backend ``name`` cannot run on this machine.

    A backend checks that when it is made (``triton`` raises ``RuntimeError`` without CUDA or the
    interpreter), but it is made after capture and the passes, and ``dump`` would have filled its
    folder by then; making one for an empty graph finds out at once.
    """
    graph = torch.fx.Graph()
    graph.output(())
    try:
        get_backend(name)(torch.fx.GraphModule(torch.nn.Module(), graph), (), {})
    except RuntimeError as e:
        raise CommandError(str(e).strip().splitlines()[0]) from e


# ----------------------------------------------------------------------------- commands


def cmd_passes(args) -> int:
    rows = []
    for name, cls in graphopt.available_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Config) if f.default is not dataclasses.MISSING}
        options = ", ".join(f"{k}={getattr(v, '__name__', None) if callable(v) else repr(v)}" for k, v in defaults.items())
        rows.append([name, "exact" if cls.exact else cls.budget.describe(), doc[0] if doc else "", f"options: {options}" if options else ""])
    print(tabulate(rows, tablefmt="plain") if rows else "no passes registered")
    return 0


def cmd_models(args) -> int:
    print(tabulate([[f"zoo:{name}", description] for name, description in zoo.MODELS.items()], tablefmt="plain"))
    return 0


def _prepare_out_dir(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {text} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {text} is not empty; give a new or empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {text}: {e.strerror or e}") from e
    return out


def cmd_dump(args) -> int:
    pipeline = build_pipeline(args.passes, args.option)
    check_backend_runs_here(args.backend)
    out = _prepare_out_dir(args.out)
    workload = load_model(args.model, args.log, args.text)
    result = dump(
        workload.model,
        pipeline,
        workload.example_inputs,
        out,
        example_kwargs=workload.example_kwargs,
        dynamic_shapes=workload.dynamic_shapes,
        **_pipeline_flags(args),
        name=workload.name,
        onnx=not args.no_onnx,
    )
    print(result.module.report)
    for file_name, status in result.onnx.items():
        print(f"{file_name}: {status}")
    kernels = [f for f in result.files if f.startswith("kernels/") and f.endswith(".py")]
    if "kernels/README.md" in result.files:
        print(f"{len(kernels)} generated kernels in {out}/kernels/ (index: kernels/README.md)")
    print(f"wrote {len(result.files)} files to {out}/ (start with report.md)")
    return 0


def _optimize_and_report(args):
    """Load ``args.model``, run the pipeline the arguments name on it and print the report: the
    shared first half of ``graphopt optimize`` and ``graphopt export``. Returns (module, workload)."""
    pipeline = build_pipeline(args.passes, args.option)
    check_backend_runs_here(args.backend)
    workload = load_model(args.model, args.log, args.text)
    module = graphopt.optimize(
        workload.model,
        pipeline,
        workload.example_inputs,
        example_kwargs=workload.example_kwargs,
        dynamic_shapes=workload.dynamic_shapes,
        **_pipeline_flags(args),
        name=workload.name,
    )
    print(module.report)
    return module, workload


def cmd_optimize(args) -> int:
    save = Path(args.save) if args.save else None
    if save is not None and not save.parent.is_dir():
        raise UsageError(f"--save {args.save}: directory {save.parent} does not exist")
    module, workload = _optimize_and_report(args)
    if save is not None:
        _save_and_check(module, workload, save, args.log)
    return 0


def cmd_export(args) -> int:
    target = Path(args.onnx)
    if target.is_dir():
        raise UsageError(f"--onnx {args.onnx} is a directory; give a file name such as model.onnx")
    if not target.parent.is_dir():
        raise UsageError(f"--onnx {args.onnx}: directory {target.parent} does not exist")
    module, workload = _optimize_and_report(args)
    args.log(f"exporting {target}")
    try:
        exporter = export_onnx(module, workload.example_inputs, target, workload.example_kwargs, dynamic_shapes=workload.dynamic_shapes)
    except OnnxExportError as e:
        details = target.with_name(target.name + ".error.txt")
        details.write_text(e.details)
        raise CommandError(f"ONNX export failed: {e} (whole error in {details})") from e
    print(f"wrote {target} ({exporter})")
    return 0


def _save_and_check(module, workload: Workload, path: Path, log: Callable[[str], None]) -> None:
    """Save a ``torch.export`` archive, load it back with ``torch.export.load`` and compare outputs."""
    log(f"saving {path}")
    try:
        graphopt.save(module, str(path), workload.example_inputs, workload.example_kwargs, dynamic_shapes=workload.dynamic_shapes)
    except Exception as e:  # noqa: BLE001 - export of the optimized graph failed
        raise CommandError(f"cannot save {path}: {one_line(e)}") from e
    reloaded = torch.export.load(str(path)).module()
    kwargs = workload.example_kwargs or {}
    check = compare(run_graph(reloaded, workload.example_inputs, kwargs), run_graph(module.graph_module, workload.example_inputs, kwargs), Exact(1e-5))
    if not check.ok:
        raise CommandError(f"{path} does not reproduce the optimized graph after torch.export.load: {check}")
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB); reloaded with torch.export.load, outputs match the optimized graph ({check})")


def cmd_demo(args) -> int:
    pipeline = build_pipeline(args.passes, args.option)
    check_backend_runs_here(args.backend)
    entry = zoo.load("minilm")  # the zoo's default form of MiniLM, whatever attention it uses
    args.log(f"loaded zoo:minilm: {entry.description}")
    optimized = graphopt.optimize(
        entry.model,
        pipeline,
        entry.example_inputs,
        dynamic_shapes=entry.dynamic_shapes,
        **_pipeline_flags(args),
        name="zoo:minilm",
    )
    print(optimized.report)
    ids, mask = entry.example_inputs
    print(f"(ops, FLOPs and errors above: the example batch, {ids.shape[0]} sentences x {ids.shape[1]} tokens, {mask.float().mean().item():.0%} real tokens)")

    sentences = zoo.real_sentences(64)
    batches = zoo.tokenize_batches(entry.tokenizer, sentences, args.batch)
    args.log(f"embedding {len(sentences)} sentences in {len(batches)} batches of up to {args.batch}")
    with torch.no_grad():  # this first pass over the batches is also the warm-up of both models
        original = torch.cat([entry.model(*batch) for batch in batches])
        rewritten = torch.cat([optimized(*batch) for batch in batches])
    cosine = row_cosines(rewritten, original)
    agreement = zoo.nearest_neighbour_agreement(rewritten, original)
    print(f"\nfidelity on {len(sentences)} real sentences (optimized vs original embeddings):")
    print(f"  cosine similarity: mean {cosine.mean().item():.8f}, min {cosine.min().item():.8f}")
    print(f"  nearest-neighbour agreement: {agreement:.4f} ({round(agreement * len(sentences))}/{len(sentences)})")

    args.log(f"timing {args.repeats} rounds")
    seconds: dict[str, list[float]] = {"original": [], "optimized": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            for batch in batches:  # alternate the two models so that both see the same machine load
                for label, model in (("original", entry.model), ("optimized", optimized)):
                    start = time.perf_counter()
                    model(*batch)
                    seconds[label].append(time.perf_counter() - start)
    before, after = statistics.median(seconds["original"]) * 1e3, statistics.median(seconds["optimized"]) * 1e3
    runs = len(seconds["original"])
    print(f"\nlatency per batch of up to {args.batch} (median of {runs} runs, torch threads: {torch.get_num_threads()}):")
    print(f"  original (eager): {before:.2f} ms")
    print(f"  optimized ({optimized.backend}): {after:.2f} ms")
    print(f"  speed-up: {before / after:.2f}x")
    return 0


def parse_budget(text: str) -> Budget:
    """``cos=0.995`` -> ``MinCosine(0.995)``, ``top1=0.99`` -> ``MinAgreement(0.99)``."""
    match = re.fullmatch(r"(cos|top1)=([0-9.]+)", text.strip())
    value = float(match.group(2)) if match and match.group(2).count(".") <= 1 and match.group(2) != "." else None
    if match is None or value is None or not 0.0 < value <= 1.0:
        raise UsageError(f"--budget must look like cos=0.995 or top1=0.99 (a value in (0, 1]), got {text!r}")
    return MinCosine(value) if match.group(1) == "cos" else MinAgreement(value)


def parse_duration(text: str) -> float:
    """``10m``, ``90s``, ``1h`` or plain seconds -> seconds."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)\s*([smh]?)", text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise UsageError(f"--time-limit must look like 10m, 90s or 600, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def cmd_tune(args) -> int:
    budget = parse_budget(args.budget)
    limit = parse_duration(args.time_limit)
    peers = list(PEERS) if args.peers.strip() == "all" else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise UsageError(f"--peers: unknown {', '.join(unknown)}; the peers are {', '.join(PEERS)} (or all)")
    out = Path(args.out)
    for path, flag in ((out, "--out"), (Path(args.plot) if args.plot else None, "--plot")):
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"{flag} {path}: directory {path.parent} does not exist")
    workload = load_model(args.model, args.log, args.text)
    calibration: list = [workload.example_inputs]
    if workload.tokenizer is not None:
        sentences = zoo.real_sentences(args.sentences)
        calibration = zoo.tokenize_batches(workload.tokenizer, sentences, args.batch)
        args.log(f"calibration: {len(sentences)} real sentences in {len(calibration)} batches of up to {args.batch} (every third batch held out)")
    result = tune(
        workload.model,
        workload.example_inputs,
        budget=budget,
        calibration=calibration,
        example_kwargs=workload.example_kwargs,
        time_limit=limit,
        peers=peers,
        log=args.log,
    )
    print(result.table())
    if result.peers:
        print(result.peer_table())
    print(result.summary())
    result.save(out)
    print(f"wrote {out}: graphopt optimize {args.model} --passes {out}  (or graphopt.optimize(model, passes={str(out)!r}, ...))")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


# ----------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress messages on stderr")
    common.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")

    pipeline = argparse.ArgumentParser(add_help=False)
    pipeline.add_argument("--passes", metavar="A,B", help="comma-separated pass names (default: every exact pass)")
    pipeline.add_argument("--option", metavar="PASS.KEY=VALUE", action="append", default=[], help="a pass constructor option (repeatable)")
    pipeline.add_argument(
        "--backend",
        choices=available_backends(),
        default="eager",
        help="what runs the optimized graph (default: eager; triton needs CUDA, or TRITON_INTERPRET=1 to run its kernels in the interpreter)",
    )
    pipeline.add_argument("--no-verify", action="store_true", help="do not check each pass numerically")
    pipeline.add_argument("--strict", action="store_true", help="fail on a pass that fails instead of rolling it back")

    model_help = (
        "zoo:NAME (see `graphopt models`), hf:PATH (a local Hugging Face model folder with its tokenizer), "
        "FILE.pt2 (a torch.export archive) or path/to/file.py:factory returning (model, example_inputs[, dynamic_shapes])"
    )
    text_help = "a sentence of an hf:PATH model's example batch (repeatable; default: 8 built-in real sentences)"
    model_args = argparse.ArgumentParser(add_help=False)  # what load_model takes, the same for every command that takes a MODEL
    model_args.add_argument("model", metavar="MODEL", help=model_help)
    model_args.add_argument("--text", metavar="TEXT", action="append", default=[], help=text_help)
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description="Verified graph rewrites for PyTorch models.", epilog=_EPILOG, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {graphopt.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("passes", parents=[common], help="list the registered passes")
    p.set_defaults(run=cmd_passes)
    p = commands.add_parser("models", parents=[common], help="list the zoo models")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser(
        "dump",
        parents=[common, pipeline, model_args],
        epilog=_EPILOG,
        formatter_class=formatter,
        help="write what every pass did (text, diff, DOT, ONNX) into a folder",
        description="Writes into DIR: 00_captured.txt; per pass NN_<pass>/ with before.txt and either "
        "after.txt, diff.patch, before.dot, after.dot (erased nodes red, created green; .svg too when "
        "Graphviz is installed) or status.txt; model_before.onnx and model_after.onnx (or onnx_error.txt); "
        "report.md and report.json; with --backend triton also kernels/: README.md (each fused region: kind, "
        "ATen ops, its kernel file or why it stayed ATen) and <region>.py (the kernel, its ATen region as "
        "aten_region, example_inputs()).",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX exports of the graphs before and after")
    p.set_defaults(run=cmd_dump)

    p = commands.add_parser(
        "optimize", parents=[common, pipeline, model_args], epilog=_EPILOG, formatter_class=formatter, help="optimize a model and print the report"
    )
    p.add_argument("--save", metavar="FILE.pt2", help="write a torch.export archive of the result and check it loads")
    p.set_defaults(run=cmd_optimize)

    p = commands.add_parser(
        "export",
        parents=[common, pipeline, model_args],
        epilog=_EPILOG,
        formatter_class=formatter,
        help="optimize a model and write the optimized graph as an ONNX model",
        description="Optimizes MODEL, prints the report and writes the optimized graph to --onnx: graphopt:: ops "
        "become standard ONNX ops or graphopt-domain functions of standard ops; the batch and sequence axes stay dynamic.",
    )
    p.add_argument("--onnx", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser(
        "tune",
        parents=[common, model_args],
        formatter_class=formatter,
        help="search the approximate passes' per-layer settings for the fastest pipeline within a fidelity budget",
        description="Measures each approximate setting (int8 per linear, a token-pruning keep ratio per attention) "
        "on calibration inputs and on this machine, builds the fastest pipeline within --budget, checks it on held-out "
        "inputs and writes it to --out, a file that `graphopt optimize MODEL --passes FILE.json` and "
        "graphopt.optimize(passes=FILE) reproduce without searching. Text models calibrate on real sentences; other "
        "models on their example inputs alone.",
    )
    p.add_argument("--budget", default="cos=0.995", help="cos=X: mean cosine of the outputs >= X; top1=X: top-1 agreement >= X (default: cos=0.995)")
    p.add_argument("--time-limit", default="10m", help="the search's limit: 10m, 90s, 600 (default: 10m)")
    p.add_argument("--out", default="graphopt_passes.json", metavar="FILE.json", help="where the chosen pipeline goes (default: graphopt_passes.json)")
    p.add_argument("--plot", metavar="FILE.png", help="also plot the measured frontier (needs matplotlib)")
    p.add_argument(
        "--peers",
        metavar="A,B",
        default="",
        help=f"peers to time beside the choice after the search: {','.join(PEERS)}, or all (default: none)",
    )
    p.add_argument("--sentences", type=_positive_int, default=96, help="text models: real sentences to calibrate on (default: 96)")
    p.add_argument("--batch", type=_positive_int, default=32, help="text models: sentences per batch, padded to the longest (default: 32)")
    p.set_defaults(run=cmd_tune)

    p = commands.add_parser(
        "demo",
        parents=[common, pipeline],
        epilog=_EPILOG,
        formatter_class=formatter,
        help="the real MiniLM: optimize, then fidelity and latency on 64 real sentences",
    )
    p.add_argument("--batch", type=_positive_int, default=8, help="sentences per batch (default: 8)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed rounds over the batches (default: 5)")
    p.set_defaults(run=cmd_demo)
    return parser


def _error_line_and_status(exc: BaseException) -> tuple[str, int]:
    """The one-line message for a failure and the exit status it earns."""
    wrong_argument = (UsageError, graphopt.UnknownPassError, zoo.ZooError, graphopt.PassOrderError)
    own_message = (*wrong_argument, CommandError, graphopt.CaptureError, graphopt.PassFailedError)  # already say what went wrong
    lines = str(exc).strip().splitlines()
    message = lines[0] if isinstance(exc, own_message) and lines else one_line(exc)
    return message, 2 if isinstance(exc, wrong_argument) else 1


@contextlib.contextmanager
def _libraries_silenced(stderr: io.StringIO):
    """Library warnings off, torch's logs off, and whatever else goes to stderr into ``stderr``.

    Warnings are not the user's business; torch logs an error before raising it (and torch.export
    prints a partial graph to stderr), but the raised error is what the command reports.
    """
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the ``graphopt`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and argparse's own usage errors
        return e.code if isinstance(e.code, int) else 2
    args.log = Progress(args.quiet, sys.stderr)
    if args.debug:
        return args.run(args)
    library_output = io.StringIO()
    try:
        with _libraries_silenced(library_output):
            status = args.run(args)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (or a traceback with --debug)
        message, status = _error_line_and_status(e)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return status
    sys.stderr.write(library_output.getvalue())  # after a success, nothing libraries said is lost
    return status
