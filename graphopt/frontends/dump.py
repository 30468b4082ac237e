"""Dump what every pass of a pipeline did to the graph: text, diffs, Graphviz pictures, ONNX.

:func:`dump` runs :func:`graphopt.optimize` with a :class:`PassDumper` observer and writes::

    OUT/
      00_captured.txt            the captured graph, one node per line with its shape
      01_<pass>/                 one folder per pass, in the order the passes ran
        before.txt               the graph the pass received
        after.txt                the graph it produced                      (applied passes only)
        diff.patch               unified diff of before.txt -> after.txt    (applied passes only)
        before.dot, after.dot    Graphviz; erased nodes red in before.dot, created nodes green in
                                 after.dot, rewired/retargeted nodes yellow in both
        before.svg, after.svg    rendered when the ``dot`` program is installed
        status.txt               instead of after.*: why the pass left the graph as it was
      model_before.onnx          ONNX export of the captured graph (open it in Netron)
      model_after.onnx           ONNX export of the final graph
      onnx_error.txt             instead of a .onnx file that could not be exported: the reason, one line
      model_*.onnx_error.txt     ... and each exporter's whole error (no colour codes) and output
      report.md, report.json     the pipeline report and the list of files
      kernels/                   backends that generate code (``triton``), see :func:`write_kernels`:
        README.md                one row per fused region: kind, ATen ops, kernel file or why ATen runs it
        <region>.py              the generated kernel with the ATen region it computes

Nodes are matched across a pass by name. That is sound because the pass manager runs each pass on
a deep copy of the graph, which keeps every node's name, and a ``torch.fx`` graph never hands out a
name twice (its namespace remembers erased names): a name only in the output graph is a node the
pass created, a name only in the input graph a node it erased.

``torch.fx.passes.graph_transform_observer.GraphTransformObserver`` records created/erased nodes
with hooks instead, but it does not fit here: it is a context manager that must wrap the code
editing the graph (the pass manager edits a private clone; observers only see the graphs before
and after), it is switched on by inductor's trace configuration, and it writes its own file names.
``FxGraphDrawer`` is not used either: its record-shaped labels list every argument and tensor
attribute, which makes a 400-node transformer graph unreadable; :func:`graph_to_dot` draws one
small box per node (op name and shape) with pydot instead.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pydot
import torch
from tabulate import tabulate
from torch.fx import GraphModule, Node
from torch.fx.graph import _custom_builtins, dtype_abbrs

from graphopt.backends import CompiledGraph
from graphopt.frontends.api import OptimizedModule, optimize
from graphopt.frontends.capture import normalize_args
from graphopt.frontends.onnx_export import OnnxExportError, export_onnx
from graphopt.ir import count_ops, describe_value, get_tensor, op_name
from graphopt.pipeline.manager import run_graph
from graphopt.pipeline.pass_base import Pass
from graphopt.pipeline.report import APPLIED, PassRecord

__all__ = [
    "CREATED_COLOR",
    "ERASED_COLOR",
    "MODIFIED_COLOR",
    "DumpResult",
    "GraphChange",
    "OnnxExportError",
    "PassDumper",
    "TensorSpec",
    "compare_graphs",
    "describe_value",
    "dump",
    "export_onnx",
    "graph_diff",
    "graph_text",
    "graph_to_dot",
    "render_svg",
    "write_kernels",
]

CREATED_COLOR = "palegreen"
ERASED_COLOR = "lightcoral"
MODIFIED_COLOR = "khaki"

# ----------------------------------------------------------------------------- text


def _format_arg(arg: Any) -> str:
    if isinstance(arg, Node):
        return arg.name
    if isinstance(arg, tuple):
        return "(" + ", ".join(_format_arg(a) for a in arg) + ("," if len(arg) == 1 else "") + ")"
    if isinstance(arg, list):
        return "[" + ", ".join(_format_arg(a) for a in arg) + "]"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v)}" for k, v in arg.items()) + "}"
    return repr(arg)


def _call_text(node: Node) -> str:
    """What a node computes, without its name and shape: ``aten.linear.default(x, w, b)``."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return f"constant {node.target}"
    if node.op == "output":
        return "return " + _format_arg(node.args[0])
    target = op_name(node.target) if node.op == "call_function" else str(node.target)
    parts = [_format_arg(a) for a in node.args] + [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
    prefix = "" if node.op == "call_function" else f"{node.op} "
    return f"{prefix}{target}({', '.join(parts)})"


def _node_line(node: Node) -> str:
    if node.op == "output":
        return _call_text(node)
    shape = describe_value(node.meta.get("val"))
    return f"{node.name}{': ' + shape if shape else ''} = {_call_text(node)}"


def graph_text(gm: GraphModule, title: str = "") -> str:
    """The graph as text, one node per line: ``name: shape = op(args)``, diff-friendly.

    Unlike ``gm.print_readable()``, a line depends only on its own node (no ``x = None`` cleanups
    that move when a later use disappears), so a diff shows exactly the nodes a pass touched.
    """
    nodes = list(gm.graph.nodes)
    counts = {op: sum(1 for n in nodes if n.op == op) for op in ("placeholder", "get_attr", "call_function")}
    header = f"# {title + ': ' if title else ''}{counts['call_function']} ops, {counts['get_attr']} constants, {counts['placeholder']} inputs"
    return "\n".join([header, *(_node_line(n) for n in nodes)]) + "\n"


def graph_diff(before: str, after: str, before_name: str = "before.txt", after_name: str = "after.txt") -> str:
    """Unified diff (``difflib``) of two :func:`graph_text` outputs; empty when they are equal."""
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True), before_name, after_name))


# ----------------------------------------------------------------------------- what a pass changed


@dataclass
class GraphChange:
    """Node names a pass created, erased, or kept but rewired/retargeted (see the module docstring)."""

    created: set[str] = field(default_factory=set)
    erased: set[str] = field(default_factory=set)
    modified: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return f"{len(self.created)} created, {len(self.erased)} erased, {len(self.modified)} modified"


def _same_computation(gm_a: GraphModule, a: Node, gm_b: GraphModule, b: Node) -> bool:
    if _call_text(a) != _call_text(b):
        return False
    if a.op == "get_attr":  # set_tensor may give an attribute a new tensor under the same name
        return get_tensor(gm_a, a) is get_tensor(gm_b, b)
    return True


def compare_graphs(before: GraphModule, after: GraphModule) -> GraphChange:
    """Which nodes of ``before`` a pass erased, which of ``after`` it created, and which it modified.

    A node is *modified* when it exists on both sides under one name but calls another target,
    reads other inputs, or (for a constant) holds another tensor.
    """
    old = {n.name: n for n in before.graph.nodes}
    new = {n.name: n for n in after.graph.nodes}
    modified = {name for name in old.keys() & new.keys() if not _same_computation(before, old[name], after, new[name])}
    return GraphChange(created=set(new) - set(old), erased=set(old) - set(new), modified=modified)


# ----------------------------------------------------------------------------- Graphviz

_OP_STYLE = {
    "placeholder": {"shape": "box", "fillcolor": "lightblue"},
    "get_attr": {"shape": "note", "fillcolor": "gray95", "fontsize": "8"},
    "output": {"shape": "box", "fillcolor": "lightblue"},
}


def _dot_id(name: str) -> str:
    return f'"{name}"'  # always quoted: a node called "graph" or "node" would be a DOT keyword


def _dot_text(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', "'").replace("\n", "\\n") + '"'


def _dot_label(node: Node) -> str:
    if isinstance(node.target, torch._ops.OpOverload):  # the packet name; the tooltip has the overload
        packet = node.target._schema.name.split("::")[-1]
        head = packet if node.target.namespace == "aten" else f"{node.target.namespace}.{packet}"
    elif node.op == "call_function":
        head = op_name(node.target)
    elif node.op == "get_attr":
        head = str(node.target)
    elif node.op == "placeholder":
        head = f"input {node.name}"
    else:
        head = node.op if node.op == "output" else f"{node.op} {node.target}"
    shape = describe_value(node.meta.get("val"))
    return head + (f"\n{shape}" if shape and node.op != "output" else "")


def graph_to_dot(gm: GraphModule, title: str = "", fill: Mapping[str, str] | None = None) -> pydot.Dot:
    """A Graphviz graph of ``gm``: one box per node (op name and shape), edges along data flow.

    Args:
        gm: the graph to draw.
        title: drawn above the graph.
        fill: node name -> fill colour, for highlighting (e.g. ``{name: CREATED_COLOR}``).
    The node's full text line (name, shape, arguments) is its tooltip in rendered SVG.
    """
    fill = fill or {}
    dot = pydot.Dot(graph_name="G", graph_type="digraph", rankdir="TB", label=_dot_text(title), labelloc="t", fontname="Helvetica")
    dot.set_node_defaults(shape="box", style='"rounded,filled"', fillcolor="white", fontname="Helvetica", fontsize="10")
    dot.set_edge_defaults(arrowsize="0.5", color="gray40")
    for node in gm.graph.nodes:
        attrs = dict(_OP_STYLE.get(node.op, {}))
        if node.name in fill:
            attrs.update(fillcolor=fill[node.name], penwidth="2")
        dot.add_node(pydot.Node(_dot_id(node.name), label=_dot_text(_dot_label(node)), tooltip=_dot_text(_node_line(node)), **attrs))
        for source in node.all_input_nodes:
            dot.add_edge(pydot.Edge(_dot_id(source.name), _dot_id(node.name)))
    return dot


def render_svg(dot_path: Path, svg_path: Path, timeout: float = 120.0) -> bool:
    """Render a DOT file to SVG with Graphviz's ``dot`` if it is installed; returns whether it did."""
    program = shutil.which("dot")
    if program is None:
        return False
    try:
        done = subprocess.run([program, "-Tsvg", str(dot_path), "-o", str(svg_path)], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # a picture is not worth failing or stalling the dump for
        return False
    return done.returncode == 0 and svg_path.exists()


# ----------------------------------------------------------------------------- ONNX


# export_onnx and OnnxExportError live in graphopt.frontends.onnx_export (also behind `graphopt export`
# and graphopt.save(format="onnx")); they stay importable from here.


# ----------------------------------------------------------------------------- generated kernels


@dataclass(frozen=True)
class TensorSpec:
    """The dtype, shape and strides of a tensor a region was called with (a kernel file's ``INPUTS``)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))

    def make(self, device: str | torch.device = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """A random tensor with exactly this layout: the same strides, so that a permuted or
        broadcast (stride 0) input reaches the kernel as it did in the model."""
        storage = 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride)) if all(self.shape) else 0
        if self.dtype.is_floating_point:
            flat = torch.randn(storage, generator=generator).to(self.dtype)
        elif self.dtype == torch.bool:
            flat = torch.rand(storage, generator=generator) < 0.5
        else:  # small positive integers: valid as divisors, counts and indices into small dims
            flat = torch.randint(1, 8, (storage,), generator=generator).to(self.dtype)
        return flat.to(device).as_strided(self.shape, self.stride)


def example_inputs(specs: Iterable[Any], device: str | torch.device | None = None, seed: int = 0) -> list:
    """Random inputs for a kernel file's ``INPUTS``: a tensor per :class:`TensorSpec`, other values as
    they are (sizes a region takes as ints). ``device`` defaults to CUDA when there is one."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(seed)
    return [spec.make(device, generator) if isinstance(spec, TensorSpec) else spec for spec in specs]


def _spec_text(value: Any) -> str:
    if isinstance(value, TensorSpec):
        return f"{dtype_abbrs.get(value.dtype, str(value.dtype))}{list(value.shape)} strides {value.stride}"
    return repr(value)


def _region_nodes(compiled: CompiledGraph) -> list[Node]:
    """The runner's ``call_module`` nodes that are regions: lowered to a kernel or left to ATen."""
    regions = set(compiled.regions) | set(compiled.kernels) | set(compiled.left_to_aten)
    return [n for n in compiled.runner.graph.nodes if n.op == "call_module" and n.target in regions]


def _region_inputs(compiled: CompiledGraph, example_inputs: Any, example_kwargs: dict | None) -> dict[str, list]:
    """What each region was called with on the example inputs (one run of the runner)."""
    runner = compiled.runner
    seen: dict[str, list] = {}

    def record(name: str):
        def hook(module, args):
            seen.setdefault(name, [TensorSpec.of(a) if isinstance(a, torch.Tensor) else a for a in args])

        return hook

    handles = [runner.get_submodule(n.target).register_forward_pre_hook(record(n.target)) for n in _region_nodes(compiled)]
    try:
        run_graph(runner, normalize_args(example_inputs), example_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _short_ops(region: GraphModule) -> str:
    """``sigmoid, mul x2, add``: the region's ops by name (``aten.`` and overload dropped), in graph order."""
    counts = count_ops(region)
    short = {name: name.removeprefix("aten.").rsplit(".", 1)[0] for name in counts}
    return ", ".join(short[n] + (f" x{counts[n]}" if counts[n] > 1 else "") for n in counts)


def _aten_function(region: GraphModule) -> str:
    """The region's ATen code as a plain function ``aten_region(...)``, after the imports it needs."""
    code = region.graph.python_code(root_module="self")
    src = code.src.strip("\n")
    head = "def forward(self, "
    if not src.startswith(head):
        raise ValueError(f"a region graph with no inputs or unexpected code: {src.splitlines()[0]!r}")
    # fx frees each value after its last use (`;  x = y = None`): noise in code meant for reading
    lines = [re.sub(r";  (\w+ = )+None$", "", line).rstrip() for line in src[len(head) :].splitlines()]
    body = "def aten_region(" + "\n".join(lines).rstrip()
    used = [name for name in code.globals if name in _custom_builtins and name != "torch" and re.search(rf"\b{name}\b", body)]
    return "\n".join([_custom_builtins[name].import_str for name in used] + ([""] if used else []) + [body])


def _kernel_file(name: str, kind: str, model: str, source: str, region: GraphModule, inputs: list | None) -> str:
    """A kernel file: docstring (region, ops, inputs), the kernel, ``aten_region``, ``example_inputs``."""
    kernel = re.search(r"def (\w+)\(", source)
    seen = "; ".join(_spec_text(v) for v in inputs) if inputs is not None else "not recorded"
    doc = [
        f"Triton kernel for the {kind} region {name} of {model or 'the model'}, generated by graphopt's triton backend.",
        "",
        f"ATen ops fused: {_short_ops(region)}",
        f"Inputs when the dump ran the model: {seen}",
        "",
        f"`{kernel.group(1) if kernel else 'the kernel'}` is the kernel as generated; `aten_region` is the ATen code it computes",
        "(the reference it must reproduce); `example_inputs()` gives random inputs with the dtypes, shapes and",
        "strides in INPUTS. The region, one ATen node per line:",
        "",
        *("    " + line for line in graph_text(region, name).splitlines()),
    ]
    docstring = '"""' + "\n".join(doc).replace("\\", "\\\\").replace('"""', "'''") + '\n"""'
    listed = "".join(f"    {value!r},\n" for value in inputs or ())
    inputs_text = f"[\n{listed}]" if inputs is not None else "None  # the dump did not see this region run"
    imports = "import torch\nimport triton\nimport triton.language as tl\n\nfrom graphopt.frontends.dump import TensorSpec\nfrom graphopt.frontends.dump import example_inputs as _example_inputs"
    definitions = [
        source.strip("\n"),
        _aten_function(region),
        'def example_inputs(device=None, seed=0):\n    """Random tensors laid out like INPUTS (on CUDA when there is one)."""\n    return _example_inputs(INPUTS, device, seed)',
    ]
    return f"{docstring}\n\n{imports}\n\nINPUTS = {inputs_text}\n\n\n" + "\n\n\n".join(definitions) + "\n"


def write_kernels(compiled: CompiledGraph, out_dir: Path | str, example_inputs: Any, example_kwargs: dict | None = None, model: str = "") -> list[list[str]]:
    """Write ``out_dir/<region>.py`` for each generated kernel and ``out_dir/README.md``, the index.

    ``compiled`` is what a code-generating backend returned (``generates_code``): its ``runner``
    is a ``GraphModule`` with a submodule per region (a lowered one keeps its ATen graph as
    ``.region``), ``kernels`` maps region name -> kernel source and ``left_to_aten`` region name ->
    why ATen runs it. The runner is run once on the example inputs to record the dtypes, shapes and
    strides each region receives. Returns the index rows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runner, kernels, left_to_aten = compiled.runner, compiled.kernels, compiled.left_to_aten
    inputs = _region_inputs(compiled, example_inputs, example_kwargs)
    rows = []
    for node in _region_nodes(compiled):
        name, module = node.target, runner.get_submodule(node.target)
        kind = compiled.regions.get(name) or node.meta.get("region_kind") or name.rsplit("_", 1)[0]
        region = getattr(module, "region", module)
        if name in kernels:
            (out / f"{name}.py").write_text(_kernel_file(name, kind, model, kernels[name], region, inputs.get(name)))
            runs = f"Triton: [{name}.py]({name}.py)"
        else:
            runs = f"ATen: {left_to_aten[name]}"
        rows.append([name, kind, _short_ops(region), runs])
    table = tabulate(rows, headers=["region", "kind", "ATen ops", "runs as"], tablefmt="github") if rows else "(no fused regions)"
    (out / "README.md").write_text(
        f"# Generated kernels of {model or 'the model'}\n\n"
        f"{len(kernels)} of {len(rows)} fused regions run as generated Triton kernels{'; the others as ATen ops' if len(kernels) < len(rows) else ''}.\n"
        "Each `<region>.py` holds the kernel, the ATen code of its region (`aten_region`, the reference) and\n"
        "`example_inputs()` (random inputs laid out as the model passed them): import it under\n"
        "`TRITON_INTERPRET=1` on a CPU.\n\n" + table + "\n"
    )
    return rows


# ----------------------------------------------------------------------------- the dump


class PassDumper:
    """Pass-manager observer writing one ``NN_<pass>/`` folder per pass into ``out_dir``.

    Use it as ``optimize(..., observers=[PassDumper(out_dir)])``; :func:`dump` does that and more.
    """

    def __init__(self, out_dir: Path | str, svg: bool = True):
        self.out_dir = Path(out_dir)
        self.svg = svg
        self.captured: GraphModule | None = None  # the first graph the observer saw
        self.passes: list[tuple[str, PassRecord, GraphChange | None]] = []  # (folder, record, change)

    def __call__(self, record: PassRecord, before: GraphModule, after: GraphModule) -> None:
        if self.captured is None:
            self.captured = before
        folder = self.out_dir / f"{len(self.passes) + 1:02d}_{record.name}"
        folder.mkdir(parents=True, exist_ok=True)
        before_text = graph_text(before, f"before {record.name}")
        (folder / "before.txt").write_text(before_text)
        if record.status != APPLIED:
            (folder / "status.txt").write_text(
                f"{record.status}: {record.reason or 'no reason given'}\n"
                "The pass left the graph as it was, so this folder has no after.txt, diff.patch or pictures.\n"
            )
            self.passes.append((folder.name, record, None))
            return
        change = compare_graphs(before, after)
        after_text = graph_text(after, f"after {record.name}")
        (folder / "after.txt").write_text(after_text)
        (folder / "diff.patch").write_text(graph_diff(before_text, after_text))
        before_fill = {**dict.fromkeys(change.modified, MODIFIED_COLOR), **dict.fromkeys(change.erased, ERASED_COLOR)}
        after_fill = {**dict.fromkeys(change.modified, MODIFIED_COLOR), **dict.fromkeys(change.created, CREATED_COLOR)}
        pictures = (
            ("before", before, before_fill, f"before {record.name}: red = erased ({len(change.erased)}), yellow = modified ({len(change.modified)})"),
            ("after", after, after_fill, f"after {record.name}: green = created ({len(change.created)}), yellow = modified ({len(change.modified)})"),
        )
        for stem, gm, fill, title in pictures:
            dot_path = folder / f"{stem}.dot"
            dot_path.write_text(graph_to_dot(gm, title, fill).to_string())
            if self.svg:
                render_svg(dot_path, folder / f"{stem}.svg")
        self.passes.append((folder.name, record, change))


@dataclass
class DumpResult:
    """What :func:`dump` produced: the optimized module and the files written (relative to the folder)."""

    module: OptimizedModule
    out_dir: Path
    files: list[str]
    onnx: dict[str, str]  # file name -> exporter used, or the error


def dump(
    model: torch.nn.Module,
    passes: Iterable[str | Pass | type[Pass]],
    example_inputs: Any,
    out_dir: Path | str,
    *,
    example_kwargs: dict | None = None,
    dynamic_shapes: Any = None,
    backend: str = "eager",
    backend_options: dict | None = None,
    verify: bool = True,
    strict: bool = False,
    log: Callable[[str], None] | None = None,
    name: str = "",
    onnx: bool = True,
    svg: bool = True,
) -> DumpResult:
    """Optimize ``model`` with ``passes`` and write what each pass did into ``out_dir`` (layout: module docstring).

    The arguments are those of :func:`graphopt.optimize`, plus ``onnx`` (export the graphs before
    and after the pipeline) and ``svg`` (render pictures when Graphviz is installed). A backend that
    generates kernels (``triton``) also gets ``kernels/`` (:func:`write_kernels`). An ONNX export
    that fails never fails the dump: the reason goes to ``onnx_error.txt``. ``out_dir`` should be
    new or empty (the CLI insists): files already there would be listed as part of the dump.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: None)
    dumper = PassDumper(out, svg=svg)
    module = optimize(
        model,
        passes,
        example_inputs,
        example_kwargs=example_kwargs,
        dynamic_shapes=dynamic_shapes,
        backend=backend,
        backend_options=backend_options,
        verify=verify,
        strict=strict,
        log=log,
        observers=[dumper],
        name=name,
    )
    kernel_rows = None
    if module.compiled.generates_code:
        say("writing the generated kernels")
        kernel_rows = write_kernels(module.compiled, out / "kernels", example_inputs, example_kwargs, name)
    captured = dumper.captured if dumper.captured is not None else module.graph_module
    (out / "00_captured.txt").write_text(graph_text(captured, f"captured {name}".rstrip()))
    onnx_status: dict[str, str] = {}
    if onnx:
        errors = []
        for file_name, gm in (("model_before.onnx", captured), ("model_after.onnx", module.graph_module)):
            say(f"exporting {file_name}")
            try:
                onnx_status[file_name] = export_onnx(gm, example_inputs, out / file_name, example_kwargs)
            except OnnxExportError as e:
                # the one-line reasons in onnx_error.txt, each exporter's whole error beside it
                details = f"{Path(file_name).stem}.onnx_error.txt"
                (out / details).write_text(e.details)
                onnx_status[file_name] = f"not exported: {e} (whole error: {details})"
                errors.append(f"{file_name}: {e}\n")
        if errors:
            (out / "onnx_error.txt").write_text("".join(errors))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name not in ("report.md", "report.json"))
    files += ["report.md", "report.json"]
    report = module.report
    (out / "report.md").write_text(_markdown(report.to_markdown(), dumper, onnx_status, files, kernel_rows))
    kernels = {} if kernel_rows is None else {"kernels": [dict(zip(("region", "kind", "ops", "runs_as"), row)) for row in kernel_rows]}
    (out / "report.json").write_text(json.dumps({**report.to_dict(), "onnx": onnx_status, **kernels, "files": files}, indent=2, default=str))
    return DumpResult(module=module, out_dir=out, files=files, onnx=onnx_status)


def _markdown(report_md: str, dumper: PassDumper, onnx_status: Mapping[str, str], files: list[str], kernel_rows: list | None) -> str:
    lines = [report_md, "## Graph changes", ""]
    for folder, record, change in dumper.passes:
        what = change.summary() if change is not None else f"{record.status}" + (f": {record.reason}" if record.reason else "")
        lines.append(f"- `{folder}/`: {what}")
    if not dumper.passes:
        lines.append("(no passes ran)")
    elif dumper.svg and any(change is not None for _, _, change in dumper.passes) and shutil.which("dot") is None:
        lines += ["", "Graphviz is not installed, so there are no .svg files: render one with `dot -Tsvg after.dot -o after.svg`."]
    if kernel_rows is not None:
        generated = sum(1 for row in kernel_rows if row[3].startswith("Triton"))
        lines += ["", "## Kernels", "", f"{generated} of {len(kernel_rows)} fused regions run as generated kernels: see `kernels/README.md`."]
    if onnx_status:
        lines += ["", "## ONNX", ""] + [f"- `{f}`: {status}" for f, status in onnx_status.items()]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    return "\n".join(lines) + "\n"
