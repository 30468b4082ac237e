"""graphopt.dump: graph text, diffs, created/erased detection, DOT highlighting, SVG and ONNX branches."""

import json
import sys
from pathlib import Path

import onnx
import pydot
import pytest
import torch

import graphopt
from graphopt.backends import CompiledGraph
from graphopt.frontends import dump as gdump
from graphopt import ir
from graphopt.testing import assert_close

# pydot's DOT parser (used here to read the files back) trips pyparsing's deprecation warnings
pytestmark = pytest.mark.filterwarnings("ignore:'setParseAction' deprecated")


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ReluToClampMin(graphopt.Pass):
    """relu(x) == clamp_min(x, 0): erases every relu node and creates a clamp_min node."""

    name = "relu_to_clamp_min"

    def run(self, gm, ctx):
        for relu in ir.op_nodes(gm, ir.aten.relu):
            with gm.graph.inserting_after(relu):
                clamp = gm.graph.call_function(torch.ops.aten.clamp_min.default, (relu.args[0], 0.0))
            ir.replace_node(relu, clamp)
        return True


class NothingToDo(graphopt.Pass):
    name = "nothing_to_do"

    def applicable(self, gm):
        return False, "no such pattern in the graph"


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(2, 4),)


@pytest.fixture
def before_after(mlp):
    """The captured MLP graph and the graph ReluToClampMin makes of it (on a clone)."""
    gm = graphopt.capture(*mlp)
    after = ir.clone_graph_module(gm)
    ReluToClampMin().run(after, graphopt.PassContext())
    ir.cleanup(after)
    ir.propagate_shapes(after, list(mlp[1]))
    return gm, after


def _fill(dot_text: str, name: str) -> str | None:
    graph = pydot.graph_from_dot_data(dot_text)[0]
    (node,) = graph.get_node(f'"{name}"')
    return node.get("fillcolor")


def test_graph_text_has_one_line_per_node_with_shapes(before_after):
    gm, _ = before_after
    text = gdump.graph_text(gm, "mlp")
    lines = text.splitlines()
    assert lines[0] == "# mlp: 3 ops, 4 constants, 1 inputs"
    assert len(lines) == 1 + len(gm.graph.nodes)
    assert "x: f32[2, 4] = input" in lines
    assert "fc1_weight: f32[8, 4] = constant fc1.weight" in lines
    assert "relu: f32[2, 8] = aten.relu.default(linear)" in lines
    assert lines[-1] == "return (linear_1,)"


def test_compare_graphs_finds_created_erased_and_rewired_nodes(before_after):
    change = gdump.compare_graphs(*before_after)
    assert change.created == {"clamp_min_default"}
    assert change.erased == {"relu"}
    assert change.modified == {"linear_1"}  # fc2's linear now reads clamp_min
    assert change.summary() == "1 created, 1 erased, 1 modified"


def test_compare_graphs_sees_a_constant_given_a_new_tensor(mlp):
    gm = graphopt.capture(*mlp)
    after = ir.clone_graph_module(gm)
    weight = next(n for n in after.graph.nodes if n.op == "get_attr" and n.target == "fc2.weight")
    ir.set_tensor(after, weight, ir.get_tensor(after, weight) * 2)
    change = gdump.compare_graphs(gm, after)
    assert (change.created, change.erased, change.modified) == (set(), set(), {weight.name})


def test_graph_diff_shows_removed_and_added_lines(before_after):
    before, after = (gdump.graph_text(g) for g in before_after)
    diff = gdump.graph_diff(before, after)
    assert diff.startswith("--- before.txt\n+++ after.txt\n")
    removed = {line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")}
    added = {line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")}
    assert "relu: f32[2, 8] = aten.relu.default(linear)" in removed
    assert "clamp_min_default: f32[2, 8] = aten.clamp_min.default(linear, 0.0)" in added
    assert "linear_1: f32[2, 3] = aten.linear.default(clamp_min_default, fc2_weight, fc2_bias)" in added
    assert gdump.graph_diff(before, before) == ""


def test_dot_colours_exactly_the_named_nodes(before_after):
    _, after = before_after
    text = gdump.graph_to_dot(after, "after", {"clamp_min_default": gdump.CREATED_COLOR}).to_string()
    assert _fill(text, "clamp_min_default") == gdump.CREATED_COLOR
    assert _fill(text, "linear") is None  # drawn with the graph's node default, white
    graph = pydot.graph_from_dot_data(text)[0]
    names = {n.get_name().strip('"') for n in graph.get_nodes()} - {"node", "edge"}
    assert names == {n.name for n in after.graph.nodes}
    edges = {(e.get_source().strip('"'), e.get_destination().strip('"')) for e in graph.get_edges()}
    assert ("linear", "clamp_min_default") in edges and ("clamp_min_default", "linear_1") in edges
    label = graph.get_node('"clamp_min_default"')[0].get("label")
    assert label == '"clamp_min\\nf32[2, 8]"'  # op name and shape, as a DOT line break


def _fake_dot(tmp_path):
    """A stand-in for Graphviz's ``dot -Tsvg IN -o OUT`` that wraps the DOT text in <svg>."""
    script = tmp_path / "dot"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "args = sys.argv[1:]\n"
        "assert args[0] == '-Tsvg' and args[2] == '-o', args\n"
        "open(args[3], 'w').write('<svg>' + open(args[1]).read() + '</svg>')\n"
    )
    script.chmod(0o755)
    return script


def test_dumper_renders_svg_only_when_dot_is_installed(mlp, tmp_path, monkeypatch):
    fake = _fake_dot(tmp_path)
    monkeypatch.setattr(gdump.shutil, "which", lambda name: str(fake) if name == "dot" else None)
    graphopt.optimize(mlp[0], [ReluToClampMin()], mlp[1], observers=[gdump.PassDumper(tmp_path / "with")])
    svg = (tmp_path / "with/01_relu_to_clamp_min/after.svg").read_text()
    assert svg.startswith("<svg>digraph G {") and '"clamp_min_default"' in svg
    assert (tmp_path / "with/01_relu_to_clamp_min/before.svg").exists()

    monkeypatch.setattr(gdump.shutil, "which", lambda name: None)
    graphopt.optimize(mlp[0], [ReluToClampMin()], mlp[1], observers=[gdump.PassDumper(tmp_path / "without")])
    folder = tmp_path / "without/01_relu_to_clamp_min"
    assert (folder / "after.dot").exists() and not list(folder.glob("*.svg"))


def test_dump_writes_the_documented_layout(mlp, tmp_path, monkeypatch):
    monkeypatch.setattr(gdump.shutil, "which", lambda name: None)
    result = gdump.dump(mlp[0], [NothingToDo(), ReluToClampMin()], mlp[1], tmp_path, name="mlp")

    skipped, applied = tmp_path / "01_nothing_to_do", tmp_path / "02_relu_to_clamp_min"
    assert sorted(p.name for p in skipped.iterdir()) == ["before.txt", "status.txt"]
    assert (skipped / "status.txt").read_text().startswith("not applicable: no such pattern in the graph\n")
    assert sorted(p.name for p in applied.iterdir()) == ["after.dot", "after.txt", "before.dot", "before.txt", "diff.patch"]
    assert _fill((applied / "before.dot").read_text(), "relu") == gdump.ERASED_COLOR
    assert _fill((applied / "after.dot").read_text(), "clamp_min_default") == gdump.CREATED_COLOR
    assert _fill((applied / "after.dot").read_text(), "linear_1") == gdump.MODIFIED_COLOR
    assert "aten.relu" in (tmp_path / "00_captured.txt").read_text()
    assert "aten.relu" not in (applied / "after.txt").read_text()

    for name in ("model_before.onnx", "model_after.onnx"):
        onnx.checker.check_model(str(tmp_path / name))
        assert result.onnx[name] == "torch.export-based exporter"
    after_ops = {n.op_type for n in onnx.load(str(tmp_path / "model_after.onnx")).graph.node}
    assert "Relu" not in after_ops and "Relu" in {n.op_type for n in onnx.load(str(tmp_path / "model_before.onnx")).graph.node}

    assert result.files == sorted(result.files[:-2]) + ["report.md", "report.json"]
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == set(result.files)
    markdown = (tmp_path / "report.md").read_text()
    assert "relu_to_clamp_min" in markdown and "`02_relu_to_clamp_min/`: 1 created, 1 erased, 1 modified" in markdown
    assert all(f"`{f}`" in markdown for f in result.files)
    assert "Graphviz is not installed, so there are no .svg files" in markdown
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["status"] for r in data["records"]] == ["not applicable", "applied"]
    assert data["files"] == result.files


def test_onnx_falls_back_to_torchscript_then_reports_both_failures(mlp, tmp_path, monkeypatch):
    gm = graphopt.capture(*mlp)
    real_export = torch.onnx.export

    def dynamo_broken(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("no dynamo today")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    assert gdump.export_onnx(gm, mlp[1], tmp_path / "m.onnx") == "TorchScript exporter"
    onnx.checker.check_model(str(tmp_path / "m.onnx"))

    def always_broken(*args, **kwargs):
        open(args[2], "w").write("half-written")
        raise RuntimeError("cannot export\nmore detail on a second line")

    monkeypatch.setattr(torch.onnx, "export", always_broken)
    with pytest.raises(gdump.OnnxExportError) as info:
        gdump.export_onnx(gm, mlp[1], tmp_path / "n.onnx")
    assert str(info.value) == "torch.export-based exporter: RuntimeError: cannot export; TorchScript exporter: RuntimeError: cannot export"
    assert not (tmp_path / "n.onnx").exists()

    result = gdump.dump(mlp[0], [], mlp[1], tmp_path / "dump")
    error_lines = (tmp_path / "dump/onnx_error.txt").read_text().splitlines()
    assert error_lines == [
        "model_before.onnx: torch.export-based exporter: RuntimeError: cannot export; TorchScript exporter: RuntimeError: cannot export",
        "model_after.onnx: torch.export-based exporter: RuntimeError: cannot export; TorchScript exporter: RuntimeError: cannot export",
    ]
    assert result.onnx["model_after.onnx"].startswith("not exported: ")
    assert not list((tmp_path / "dump").glob("*.onnx"))


# ----------------------------------------------------------------------------- kernels/ (code-generating backends)


class Gated(torch.nn.Module):
    """A pointwise region (x * sigmoid(x) + 1) before a linear: the partitioner makes it its own region."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = x * torch.sigmoid(x) + 1.0
        return torch.nn.functional.gelu(self.fc(h)) + h


class FakeKernel(torch.nn.Module):
    """What the triton backend puts in place of a lowered region (``.source``, ``.region``), running the region."""

    def __init__(self, source, region):
        super().__init__()
        self.source, self.region = source, region

    def forward(self, *inputs):
        return self.region(*inputs)


FAKE_SOURCE = "@triton.jit\ndef fused_pointwise_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):\n    pass\n"


def test_write_kernels_files_and_index_without_a_gpu(tmp_path):
    from graphopt.backends.partition import fuse_regions

    torch.manual_seed(0)
    model, x = Gated().eval(), torch.randn(16, 4).t()  # a permuted input: INPUTS must keep its strides
    runner = fuse_regions(graphopt.capture(model, (x,)))
    kinds = {n.target: n.meta["region_kind"] for n in runner.graph.nodes if n.op == "call_module"}
    assert kinds == {"fused_0": "pointwise", "fused_1": "matmul_epilogue"}
    runner.add_submodule("fused_0", FakeKernel(FAKE_SOURCE, runner.get_submodule("fused_0")))
    compiled = CompiledGraph(
        runner, "triton", kernels={"fused_0": FAKE_SOURCE}, left_to_aten={"fused_1": "no matmul template here"}, regions=kinds, generates_code=True
    )

    rows = gdump.write_kernels(compiled, tmp_path, (x,), model="gated")
    assert rows == [
        ["fused_0", "pointwise", "sigmoid, mul, add", "Triton: [fused_0.py](fused_0.py)"],
        ["fused_1", "matmul_epilogue", "linear, gelu, add", "ATen: no matmul template here"],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "fused_0.py"]
    index = (tmp_path / "README.md").read_text()
    assert "1 of 2 fused regions run as generated Triton kernels" in index
    assert "| fused_1  | matmul_epilogue | linear, gelu, add | ATen: no matmul template here" in index

    text = (tmp_path / "fused_0.py").read_text()
    assert FAKE_SOURCE.strip() in text and "ATen ops fused: sigmoid, mul, add" in text
    assert "Inputs when the dump ran the model: f32[4, 16] strides (1, 4)" in text
    assert "    sigmoid: f32[4, 16] = aten.sigmoid.default(x)" in text  # the region's graph, in the docstring
    assert "= None" not in text.split("def aten_region(")[1]

    sys.path.insert(0, str(tmp_path))
    try:
        kernel_file = __import__("fused_0")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fused_0", None)
    assert kernel_file.INPUTS == [gdump.TensorSpec(torch.float32, (4, 16), (1, 4))]
    inputs = kernel_file.example_inputs(device="cpu")
    assert inputs[0].stride() == (1, 4)
    assert_close(kernel_file.aten_region(*inputs), runner.fused_0.region(*inputs), rtol=0, atol=0)


def test_tensor_spec_makes_permuted_broadcast_and_integer_inputs():
    generator = torch.Generator().manual_seed(0)
    broadcast = gdump.TensorSpec(torch.float16, (3, 5), (0, 1)).make(generator=generator)
    assert broadcast.stride() == (0, 1) and broadcast.dtype == torch.float16 and torch.equal(broadcast[0], broadcast[2])
    assert broadcast.float().std() > 0
    ints = gdump.TensorSpec(torch.int64, (2, 3, 4), (1, 8, 2)).make(generator=generator)
    assert ints.stride() == (1, 8, 2) and ints.min() >= 1 and ints.max() < 8
    assert gdump.example_inputs([gdump.TensorSpec(torch.bool, (0, 2), (2, 1)), 7], device="cpu")[1] == 7


DUMP_INTERPRETED = r"""
import importlib.util, json, re, sys, torch
from graphopt.frontends import dump as gdump
from graphopt.testing import assert_close
sys.path.insert(0, sys.argv[2])
from test_dump import Gated

torch.manual_seed(0)
model = Gated().eval()
result = gdump.dump(model, [], (torch.randn(6, 16),), sys.argv[1], backend="triton", onnx=False, name="gated")
compiled = result.module.compiled
runner = compiled.runner
checked = {}
for name in compiled.kernels:
    spec = importlib.util.spec_from_file_location(name, f"{sys.argv[1]}/kernels/{name}.py")
    kernel_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_file)
    inputs = kernel_file.example_inputs()
    kernel = runner.get_submodule(name)
    with torch.no_grad():
        got, want = kernel(*inputs), kernel_file.aten_region(*inputs)
    assert_close(got, want)
    jitted = re.search(r"@triton.jit\ndef (\w+)\(", open(kernel_file.__file__).read()).group(1)
    checked[name] = {"fallback": kernel.fallback_reason, "module": type(kernel).__name__, "jit": type(getattr(kernel_file, jitted)).__name__}
print(json.dumps({"kernels": sorted(compiled.kernels), "checked": checked, "files": result.files}))
"""


def test_dump_with_the_triton_backend_under_the_interpreter(tmp_path, interpreted_python):
    """Each kernel file imports under the interpreter, and its ``aten_region`` on its ``example_inputs()``
    gives what the backend's kernel computes on them."""
    done = interpreted_python("-c", DUMP_INTERPRETED, tmp_path, Path(__file__).parent)
    summary = json.loads(done.stdout.splitlines()[-1])
    assert "fused_0" in summary["kernels"]  # the pointwise prologue at least
    assert set(summary["checked"]) == set(summary["kernels"])
    for name, seen in summary["checked"].items():
        assert seen == {"fallback": None, "module": "TritonKernel", "jit": "InterpretedFunction"}, name
    assert {f"kernels/{name}.py" for name in summary["kernels"]} | {"kernels/README.md"} <= set(summary["files"])
    index = (tmp_path / "kernels/README.md").read_text()
    assert "| fused_0  | pointwise" in index and "Triton: [fused_0.py](fused_0.py)" in index
    assert "## Kernels" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["kernels"][0]["region"] == "fused_0"
