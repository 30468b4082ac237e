"""The ``graphopt`` command line.

Most tests call its entry point, ``graphopt.frontends.cli.main(argv)``, in this process, with the
file descriptors captured (``capfd``): the same parser, commands, exit status and stdout/stderr a
user gets, without a subprocess that imports torch (several seconds each). The tests that need a
user's own process run the command as a user runs it, in a subprocess: the installed console
script, ``python -m graphopt``'s exit status and stderr end to end (errors and ``--debug``), ``demo``
(its default pipeline is every registered exact pass, and tests register passes of their own) and the
Triton interpreter, which must be chosen before triton is imported.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pydot
import pytest
import torch

import graphopt
from graphopt.tools import zoo
from graphopt.frontends.dump import CREATED_COLOR, ERASED_COLOR
from graphopt.testing import assert_close
from graphopt.tools.autotune import load_config
from tests_helpers import save_tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore:'setParseAction' deprecated")  # pydot's parser, reading DOT back

FACTORIES = """
import torch


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def build():
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 3, 8, 8)


def broken():
    raise ValueError("weights not found")


def data_dependent():
    return DataDependent(), (torch.randn(3),)


def gated():
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 16)
    return torch.nn.Sequential(torch.nn.SiLU(), fc, torch.nn.GELU()).eval(), (torch.randn(6, 16),)
"""


def graphopt_cli(*args, cwd=None):
    """``python -m graphopt ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "graphopt", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("factories")
    (folder / "models.py").write_text(FACTORIES)
    (folder / "bad_syntax.py").write_text("def build(:\n")
    (folder / "bad_config").mkdir()
    (folder / "bad_config" / "config.json").write_text("{}")
    (folder / "corrupt.pt2").write_text("not a zip archive")
    torch.save({"weight": torch.ones(2)}, folder / "checkpoint.pt2")  # a zip, but not a torch.export archive
    program = torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    program.example_inputs = None  # as in archives written by older torch versions
    torch.export.save(program, str(folder / "no_examples.pt2"))
    return folder


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _hf_reference(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(folder, local_files_only=True).eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _node_names(graph_text: str) -> set[str]:
    return {line.split(":")[0].split(" =")[0] for line in graph_text.splitlines()[1:] if not line.startswith("return ")}


def _fills(dot_path: Path) -> dict[str, str]:
    graph = pydot.graph_from_dot_data(dot_path.read_text())[0]
    return {n.get_name().strip('"'): n.get("fillcolor") for n in graph.get_nodes() if n.get("fillcolor")}


def test_passes_listed_by_the_installed_console_script():
    exe = shutil.which("graphopt", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert exe, "the graphopt console script is not installed"
    lines = {line.split()[0]: line for line in ok(subprocess.run([exe, "passes"], capture_output=True, text=True, timeout=120)).stdout.splitlines()}
    # the built-in passes: tests in this process register passes of their own
    registered = {n: c for n, c in graphopt.available_passes().items() if c.__module__.startswith("graphopt.passes.")}
    assert set(lines) == set(registered)
    for name, cls in registered.items():
        kind = "exact" if cls.exact else cls.budget.describe()
        assert lines[name].split(None, 1)[1].startswith(kind)
        assert cls.__doc__.strip().splitlines()[0] in lines[name]
    assert lines["canonicalize"].split()[1] == "exact"
    assert lines["fold_batchnorm"].split()[1] == "exact"


def test_passes_lists_each_option_with_its_default(graphopt_main):
    lines = {line.split()[0]: line for line in ok(graphopt_main("passes")).stdout.splitlines()}
    assert lines["layernorm_to_rmsnorm"].rstrip().endswith("options: compress=False")
    assert "schedule=linear_schedule" in lines["layernorm_to_repbn"]
    assert "options:" not in lines["canonicalize"]


def test_models_lists_the_zoo(graphopt_main):
    lines = ok(graphopt_main("models")).stdout.splitlines()
    assert [line.split()[0] for line in lines] == [f"zoo:{name}" for name in zoo.MODELS]
    for line, description in zip(lines, zoo.MODELS.values()):
        assert line.endswith(description)


def test_dump_convnet_fold_batchnorm(tmp_path, graphopt_main):
    out = tmp_path / "dump"
    result = ok(graphopt_main("dump", "zoo:convnet-bn", "--passes", "fold_batchnorm", "--out", out))
    assert "fold_batchnorm" in result.stdout and "applied" in result.stdout
    assert "[fold_batchnorm] running" in result.stderr  # progress

    step = out / "01_fold_batchnorm"
    for name in ("before.txt", "after.txt", "diff.patch", "before.dot", "after.dot"):
        assert (step / name).is_file(), name
    before, after = (step / "before.txt").read_text(), (step / "after.txt").read_text()
    assert before.count("aten.batch_norm.default(") == 7 and "batch_norm" not in after
    assert "aten.batch_norm.default(" in (out / "00_captured.txt").read_text()

    erased, created = _node_names(before) - _node_names(after), _node_names(after) - _node_names(before)
    assert {f"batch_norm{s}" for s in ("", "_1", "_2", "_3", "_4", "_5", "_6")} <= erased and created
    before_fills, after_fills = _fills(step / "before.dot"), _fills(step / "after.dot")
    assert {n for n, c in before_fills.items() if c == ERASED_COLOR} == erased
    assert {n for n, c in after_fills.items() if c == CREATED_COLOR} == created

    diff = (step / "diff.patch").read_text()
    assert diff.startswith("--- before.txt") and any(line.startswith("-batch_norm:") for line in diff.splitlines())
    assert "fold_batchnorm" in (out / "report.md").read_text()
    assert (out / "report.json").is_file()
    exported = [out / "model_before.onnx", out / "model_after.onnx"]
    assert all(p.is_file() for p in exported) or (out / "onnx_error.txt").is_file()
    for path in exported:
        if path.is_file():
            onnx.checker.check_model(str(path))


def test_dump_of_a_factory_file_quietly_without_onnx(tmp_path, factories, graphopt_main):
    out = tmp_path / "dump"
    result = ok(graphopt_main("dump", f"{factories}/models.py:build", "--passes", "fold_batchnorm", "--out", out, "--no-onnx", "-q"))
    assert result.stderr == ""
    after = (out / "01_fold_batchnorm/after.txt").read_text()
    assert "aten.conv2d.default(" in after and "batch_norm" not in after
    assert "x: f32[2, 3, 8, 8] = input" in after  # the factory's single tensor became the one input
    assert not list(out.glob("*.onnx")) and not (out / "onnx_error.txt").exists()


def test_dump_minilm_canonicalize_shows_the_real_graph(tmp_path, graphopt_main):
    out = tmp_path / "minilm"
    ok(graphopt_main("dump", "zoo:minilm", "--passes", "canonicalize", "--out", out, "-q"))
    captured = (out / "00_captured.txt").read_text()
    assert "bert.encoder.layer.5" in captured and "input_ids: i64[" in captured
    step = out / "01_canonicalize"
    assert (step / "before.txt").read_text().splitlines()[1:] == captured.splitlines()[1:]
    applied = (step / "after.txt").exists()
    if applied:
        assert (step / "diff.patch").read_text() and (step / "before.dot").is_file() and (step / "after.dot").is_file()
    else:
        assert (step / "status.txt").read_text().strip()
    assert "canonicalize" in (out / "report.md").read_text()
    assert (out / "model_after.onnx").is_file() or (out / "onnx_error.txt").is_file()


def test_optimize_save_then_load_the_archive(tmp_path, graphopt_main):
    path = tmp_path / "convnet.pt2"
    result = ok(graphopt_main("optimize", "zoo:convnet-bn", "--passes", "fold_batchnorm", "--save", path, "-q"))
    assert "fold_batchnorm" in result.stdout and f"saved {path} (" in result.stdout and " MB)" in result.stdout

    program = torch.export.load(str(path))
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    entry = zoo.load("convnet-bn")
    loaded = program.module()
    for images in (entry.example_inputs[0], torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))):
        with torch.no_grad():
            assert_close(loaded(images), entry.model(images))


def test_dump_hf_folder_canonicalize(tmp_path, hf_bert, graphopt_main):
    out = tmp_path / "dump"
    result = ok(graphopt_main("dump", f"hf:{hf_bert}", "--passes", "canonicalize", "--out", out, "--no-onnx"))
    assert f"loaded hf:{hf_bert}: BertModel (bert, " in result.stderr and "sdpa attention" in result.stderr
    captured = (out / "00_captured.txt").read_text()
    assert captured.startswith(f"# captured hf:{hf_bert}")
    assert "encoder.layer.1" in captured and "scaled_dot_product_attention" in captured  # the default (SDPA) model
    # 8 built-in sentences padded to the longest, captured with symbolic batch and sequence dims
    assert re.search(r"^input_ids: i64\[s\d+, s\d+\] = input$", captured, flags=re.M)
    assert "canonicalize" in (out / "report.md").read_text()
    assert (out / "01_canonicalize" / "after.txt").is_file() or (out / "01_canonicalize" / "status.txt").is_file()


def test_optimize_hf_folder_remove_padding_then_the_archive_matches_the_model(tmp_path, hf_bert, graphopt_main):
    path = tmp_path / "bert.pt2"
    result = ok(graphopt_main("optimize", f"hf:{hf_bert}", "--passes", "remove_padding", "--save", path, "-q"))
    assert re.search(r"^remove_padding +exact +applied ", result.stdout, flags=re.M) and f"saved {path} (" in result.stdout

    model, tokenizer = _hf_reference(hf_bert)
    program = torch.export.load(str(path))
    (ids, mask), kwargs = program.example_inputs
    expected_ids, expected_mask = zoo.tokenize(tokenizer, zoo.real_sentences(8))
    assert not kwargs and torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    loaded = program.module()
    # the example batch, and another batch size and length (the archive kept the dims dynamic)
    for batch in ((ids, mask), zoo.tokenize(tokenizer, zoo.real_sentences(11)[8:])):
        with torch.no_grad():
            ours, theirs = loaded(*batch), model(*batch)
        valid = batch[1].bool()  # padded positions hold nothing a user reads
        assert_close(ours.last_hidden_state[valid], theirs.last_hidden_state[valid])
        assert_close(ours.pooler_output, theirs.pooler_output)


def test_hf_text_makes_the_example_batch(tmp_path, hf_bert, graphopt_main):
    texts = ["A short one.", "This second sentence is a good deal longer than the first one."]
    path = tmp_path / "bert.pt2"
    args = ["optimize", f"hf:{hf_bert}", "--passes", "canonicalize", "--text", texts[0], "--text", texts[1], "--save", path, "-q"]
    ok(graphopt_main(*args))
    (ids, mask), _ = torch.export.load(str(path)).example_inputs
    _, tokenizer = _hf_reference(hf_bert)
    expected_ids, expected_mask = zoo.tokenize(tokenizer, texts)
    assert ids.shape[0] == 2 and torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)


def test_dump_of_a_pt2_saved_by_optimize(tmp_path, graphopt_main):
    path = tmp_path / "convnet.pt2"
    ok(graphopt_main("optimize", "zoo:convnet-bn", "--passes", "canonicalize", "--save", path, "-q"))
    out = tmp_path / "dump"
    result = ok(graphopt_main("dump", path, "--passes", "fold_batchnorm", "--out", out, "--no-onnx"))
    assert f"loaded {path}: a torch.export program, 1 input" in result.stderr
    assert "fold_batchnorm" in result.stdout and "applied" in result.stdout
    captured = (out / "00_captured.txt").read_text()
    # the archive's dynamic batch stays dynamic; the other dims are the stored example's
    assert re.search(r"^x: f32\[s\d+, 3, 32, 32\] = input$", captured, flags=re.M), captured
    before, after = (out / "01_fold_batchnorm" / "before.txt").read_text(), (out / "01_fold_batchnorm" / "after.txt").read_text()
    assert before.count("aten.batch_norm.default(") == 7 and "batch_norm" not in after


def test_dump_of_an_hf_pt2_archive(tmp_path, hf_bert, graphopt_main):
    path = tmp_path / "bert.pt2"
    ok(graphopt_main("optimize", f"hf:{hf_bert}", "--passes", "canonicalize", "--save", path, "-q"))
    out = tmp_path / "dump"
    ok(graphopt_main("dump", path, "--passes", "remove_padding", "--out", out, "--no-onnx", "-q"))
    # the reloaded program is a graph the passes work on: remove_padding packs the tokens of the default (SDPA) BERT
    assert re.search(r"^\| remove_padding \| exact +\| applied ", (out / "report.md").read_text(), flags=re.M)
    after = (out / "02_remove_padding" / "after.txt").read_text()
    assert after.count("graphopt.pack_tokens") == 1 and after.count("graphopt.varlen_attention") == 2  # one per layer
    assert "scaled_dot_product_attention" not in after
    assert re.search(r"^input_ids: i64\[s\d+, s\d+\] = input$", (out / "00_captured.txt").read_text(), flags=re.M)


def test_hf_folder_without_a_tokenizer_is_one_line(tmp_path, graphopt_main):
    folder = save_tiny_bert(tmp_path / "no_tokenizer", tokenizer=False)
    result = graphopt_main("optimize", f"hf:{folder}", "--passes", "canonicalize")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"graphopt: error: {folder} has no tokenizer: ") and "tokenizer.json" in lines[-1]
    assert not [line for line in lines if line.startswith("graphopt: error")][:-1]


ERRORS = [  # (arguments, exit status, what the one line says); {f} is the factory folder
    (["optimize", "zoo:convnet-bn", "--passes", "fold_batchnorn"], 2, "unknown pass 'fold_batchnorn'; did you mean fold_batchnorm?"),
    (["optimize", "zoo:resnet9000"], 2, "unknown zoo model 'resnet9000'"),
    (["optimize", "{f}/missing.py:build"], 2, "no such file: {f}/missing.py"),
    (["optimize", "{f}/models.py:biuld"], 2, "{f}/models.py has no function 'biuld'; did you mean build?"),
    (["optimize", "convnet-bn"], 2, "MODEL must be zoo:NAME or path/to/file.py:factory, got 'convnet-bn'"),
    (["optimize", "{f}/bad_syntax.py:build"], 1, "cannot import {f}/bad_syntax.py: SyntaxError"),
    (["optimize", "zoo:convnet-bn", "--passes", "fold_batchnorm", "--option", "fold_batchnorm"], 2, "--option must look like PASS.KEY=VALUE"),
    (
        ["optimize", "zoo:convnet-bn", "--passes", "fold_batchnorm", "--option", "fold_batchnorm.level=2"],
        2,
        "pass 'fold_batchnorm' does not accept options level",
    ),
    (["optimize", "{f}/models.py:broken"], 1, "{f}/models.py:broken() raised ValueError: weights not found"),
    (["optimize", "{f}/models.py:data_dependent", "--passes", "fold_batchnorm", "-q"], 1, "cannot capture DataDependent"),
    (["dump", "zoo:convnet-bn", "--out", "{f}/models.py"], 2, "--out {f}/models.py exists and is not a directory"),
    (["optimize", "hf:{f}/nowhere", "-q"], 2, "no such folder: {f}/nowhere"),
    (["optimize", "hf:{f}", "-q"], 2, "{f} is not a Hugging Face model folder: it has no config.json"),
    (["optimize", "hf:{f}/bad_config", "-q"], 2, "transformers cannot load the model in {f}/bad_config: ValueError: "),
    (["optimize", "hf:{f}/models.py", "-q"], 2, "{f}/models.py is a file, not a Hugging Face model folder"),
    (
        ["optimize", "{f}/bad_config", "-q"],
        2,
        "MODEL must be zoo:NAME or path/to/file.py:factory, got '{f}/bad_config' (or hf:PATH, FILE.pt2); for the Hugging Face model in that folder, give hf:{f}/bad_config",
    ),
    (["optimize", "zoo:convnet-bn", "--text", "hello", "-q"], 2, "--text builds the example inputs of an hf:PATH model; 'zoo:convnet-bn' brings its own"),
    (
        ["export", "zoo:convnet-bn", "--text", "hello", "--onnx", "{f}/x.onnx", "-q"],
        2,
        "--text builds the example inputs of an hf:PATH model; 'zoo:convnet-bn' brings its own",
    ),
    (["optimize", "{f}/missing.pt2", "-q"], 2, "no such file: {f}/missing.pt2"),
    (["dump", "{f}/corrupt.pt2", "--out", "{f}/corrupt_dump", "-q"], 1, "cannot load {f}/corrupt.pt2: not a torch.export archive (BadZipFile: "),
    (
        ["export", "{f}/checkpoint.pt2", "--onnx", "{f}/checkpoint.onnx", "-q"],
        1,
        "cannot load {f}/checkpoint.pt2: not a torch.export archive (a zip file without the archive_format entry torch.export.save writes)",
    ),
    (["optimize", "{f}/no_examples.pt2", "-q"], 1, "{f}/no_examples.pt2 stores no example inputs to capture and verify it with"),
    (["tune", "zoo:convnet-bn", "--budget", "cosine=0.99", "-q"], 2, "--budget must look like cos=0.995 or top1=0.99 (a value in (0, 1]), got 'cosine=0.99'"),
    (["tune", "zoo:convnet-bn", "--budget", "cos=1.5", "-q"], 2, "--budget must look like cos=0.995 or top1=0.99"),
    (["tune", "zoo:convnet-bn", "--time-limit", "soon", "-q"], 2, "--time-limit must look like 10m, 90s or 600, got 'soon'"),
    (["tune", "zoo:convnet-bn", "--out", "{f}/nowhere/x.json", "-q"], 2, "--out {f}/nowhere/x.json: directory {f}/nowhere does not exist"),
    (["tune", "zoo:convnet-bn", "--peers", "eager,tensorrt", "-q"], 2, "--peers: unknown tensorrt; the peers are eager, inductor"),
    (["optimize", "zoo:convnet-bn", "--passes", "{f}/bad_config/config.json", "-q"], 2, "{f}/bad_config/config.json is not a graphopt pass configuration"),
]


ERROR_IDS = [
    "unknown-pass",
    "unknown-model",
    "missing-file",
    "missing-factory",
    "bad-model-syntax",
    "file-syntax-error",
    "bad-option-syntax",
    "unaccepted-option",
    "factory-raises",
    "capture-fails",
    "bad-out",
    "hf-missing-folder",
    "hf-not-a-model-folder",
    "hf-config-transformers-rejects",
    "hf-a-file",
    "hf-folder-without-prefix",
    "text-for-a-non-hf-model",
    "export-text-for-a-non-hf-model",
    "pt2-missing",
    "pt2-corrupt",
    "pt2-not-an-archive",
    "pt2-without-example-inputs",
    "tune-budget-syntax",
    "tune-budget-range",
    "tune-time-limit",
    "tune-out-folder",
    "tune-unknown-peer",
    "passes-file-not-a-config",
]


def test_tune_writes_a_pipeline_that_optimize_reproduces(tmp_path, factories, graphopt_main):
    out = tmp_path / "gated.json"
    result = ok(graphopt_main("tune", f"{factories}/models.py:gated", "--budget", "cos=0.99", "--time-limit", "2m", "--out", out, "--peers", "eager", "-q"))
    assert "vs exact passes" in result.stdout and f"wrote {out}" in result.stdout
    assert "vs eager" in result.stdout and "chosen: " in result.stdout  # the peers' table, the choice per layer
    saved = load_config(out)
    assert [s["pass"] for s in saved][:1] == ["canonicalize"]
    # no attention: nothing to prune, and the report says so
    for family in ("prune_tokens", "merge_tokens"):
        assert f"{family} left out: no attention in the graph" in result.stdout
    again = ok(graphopt_main("optimize", f"{factories}/models.py:gated", "--passes", out, "-q"))
    for spec in saved:
        assert spec["pass"] in again.stdout


def _assert_one_error_line(result, status, message):
    assert result.returncode == status
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("graphopt: error: " + message)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, status, message", ERRORS, ids=ERROR_IDS)
def test_errors_are_one_line_without_traceback(factories, args, status, message, graphopt_main):
    result = graphopt_main(*(a.format(f=factories) for a in args))
    _assert_one_error_line(result, status, message.format(f=factories))


# End to end, in a process of their own as users run them: a usage error (status 2), a failure while
# working (status 1) that torch logs and prints about before raising, and the first import of
# transformers. Output a process prints only once (at an import) or through a logging handler bound
# to the stderr of its start would escape the in-process cases above.
@pytest.mark.parametrize("case", ["unknown-pass", "capture-fails", "hf-config-transformers-rejects"])
def test_errors_are_one_line_without_traceback_in_a_fresh_process(factories, case):
    args, status, message = ERRORS[ERROR_IDS.index(case)]
    result = graphopt_cli(*(a.format(f=factories) for a in args))
    _assert_one_error_line(result, status, message.format(f=factories))


def test_debug_shows_the_traceback():
    result = graphopt_cli("optimize", "zoo:convnet-bn", "--passes", "fold_batchnorn", "--debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "UnknownPassError" in result.stderr


def test_demo_reports_fidelity_and_latency_on_real_minilm():
    # a process of its own: the default pipeline is every registered exact pass, and tests register passes here
    result = ok(graphopt_cli("demo", "--repeats", "1", "-q"))
    out = result.stdout
    lines = out.splitlines()
    assert lines[0] == "graphopt report for zoo:minilm"
    table = lines[lines.index(next(line for line in lines if line.startswith("----"))) + 1 :]
    rows = table[: next(i for i, line in enumerate(table) if line.startswith("end to end"))]
    ran = [line.split()[0] for line in rows if not line.startswith(" ")]  # indented lines continue a wrapped reason
    builtin = {n: c for n, c in graphopt.available_passes().items() if c.__module__.startswith("graphopt.passes.")}
    assert sorted(ran) == sorted(name for name, cls in builtin.items() if cls.exact and cls.default_pipeline)
    assert "smooth_quant" not in ran  # exact, but it only prepares quantize_int8
    mean, low = map(float, re.search(r"cosine similarity: mean ([\d.]+), min ([\d.]+)", out).groups())
    assert low >= 0.9999 and mean >= low
    assert re.search(r"nearest-neighbour agreement: ([\d.]+) \((\d+)/64\)", out).groups() == ("1.0000", "64")
    original = float(re.search(r"original \(eager\): ([\d.]+) ms", out).group(1))
    optimized = float(re.search(r"optimized \(eager\): ([\d.]+) ms", out).group(1))
    ratio = float(re.search(r"speed-up: ([\d.]+)x", out).group(1))
    assert original > 0 and optimized > 0
    assert ratio == pytest.approx(original / optimized, rel=0.01)
    assert "median of 8 runs" in out  # 64 sentences in batches of 8, one timed round


def test_dump_triton_backend_writes_kernels_under_the_interpreter(tmp_path, factories, interpreted_python):
    out = tmp_path / "dump"
    args = ["dump", f"{factories}/models.py:gated", "--passes", "fold_batchnorm", "--backend", "triton", "--out", out, "--no-onnx", "-q"]
    result = interpreted_python("-m", "graphopt", *args)
    kernels = sorted(p.name for p in (out / "kernels").glob("*.py"))
    assert kernels and f"{len(kernels)} generated kernels in {out}/kernels/ (index: kernels/README.md)" in result.stdout
    index = (out / "kernels/README.md").read_text()
    for name in kernels:
        text = (out / "kernels" / name).read_text()
        assert "@triton.jit" in text and "def aten_region(" in text and "INPUTS = [" in text
        assert f"Triton: [{name}]({name})" in index
    assert "silu" in index  # the pointwise SiLU region, whatever runs it


def test_triton_backend_without_cuda_is_one_line_before_loading_the_model(tmp_path, graphopt_main):
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the triton backend can run here")
    out = tmp_path / "dump"
    for args in (["dump", "zoo:minilm", "--backend", "triton", "--out", out], ["optimize", "zoo:minilm", "--backend", "triton"]):
        result = graphopt_main(*args)
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0].startswith("graphopt: error: backend 'triton' needs a CUDA device")
        assert "eager" in lines[0] and "inductor" in lines[0]
        assert not out.exists()  # it failed before loading the model, so dump left no half-written folder
