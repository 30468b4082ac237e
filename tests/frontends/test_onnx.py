"""ONNX export of rewritten graphs: every ``graphopt::`` op translated, run by onnxruntime at other shapes.

Each model is optimized and exported once per module (a few seconds each); onnxruntime then runs the
file at two batch/sequence shapes other than the example's, against the optimized graph itself.
"""

import re
import subprocess
import sys

import onnx
import pytest
import torch
from torch.export import Dim

import graphopt
from graphopt import ir
from graphopt.frontends import dump as gdump
from graphopt.frontends import onnx_export
from graphopt.tools import zoo
from graphopt.testing import assert_close

ort = pytest.importorskip("onnxruntime")

# fp32 all the way; the ONNX graph computes the same ops in another order (its own matmuls and
# reductions, and the block-diagonal masked softmax for varlen attention).
FP32 = {"rtol": 1e-4, "atol": 1e-5}
SHAPES = ((3, 11), (1, 20))  # (batch, sequence), neither the example's


def _run_onnx(path, inputs: dict) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    return [torch.from_numpy(a) for a in session.run(None, {k: v.numpy() for k, v in inputs.items()})]


def _custom_nodes(path) -> set[str]:
    """``domain::op`` of the main graph's nodes outside the standard domain."""
    model = onnx.load(str(path))
    return {f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}


def _padded_ids(batch: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 4 :] = 0  # one padded row, the others full
    return ids, mask


# ----------------------------------------------------------------------------- norms: standard ONNX ops


@pytest.fixture(scope="module", params=[False, True], ids=["rms_norm", "crms_norm"])
def gpt2_norm_export(request, tmp_path_factory):
    """gpt2-tiny after layernorm_to_rmsnorm (``compress=True``: crms_norm), saved with format="onnx"."""
    entry = zoo.load("gpt2-tiny")
    fast = graphopt.optimize(
        entry.model, [graphopt.get_pass("layernorm_to_rmsnorm")(compress=request.param)], entry.example_inputs, dynamic_shapes=entry.dynamic_shapes
    )
    op = "graphopt.crms_norm.default" if request.param else "graphopt.rms_norm.default"
    assert ir.count_ops(fast.graph_module)[op] == 5
    path = tmp_path_factory.mktemp("onnx") / "gpt2.onnx"
    graphopt.save(fast, str(path), entry.example_inputs, format="onnx")
    return entry, fast, path


def test_norms_export_as_standard_ops_with_dynamic_axes(gpt2_norm_export):
    entry, fast, path = gpt2_norm_export
    onnx.checker.check_model(str(path))
    assert _custom_nodes(path) == set() and not onnx.load(str(path)).functions  # decomposed, no custom domain
    model = onnx.load(str(path))
    batch, seq = (d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim)
    assert batch and seq and batch != seq  # both axes symbolic, and distinct
    for b, s in SHAPES:
        ids = torch.randint(0, 1000, (b, s), generator=torch.Generator().manual_seed(b * s))
        (logits,) = _run_onnx(path, {"input_ids": ids})
        with torch.no_grad():
            assert_close(logits, fast(ids).logits, **FP32, msg=f"[{b}, {s}]")
            assert_close(logits, entry.model(ids).logits, **FP32, msg=f"[{b}, {s}] vs the original")


def test_export_prints_nothing(gpt2_norm_export, tmp_path, capfd):
    entry, fast, _ = gpt2_norm_export
    capfd.readouterr()
    assert onnx_export.export_onnx(fast, entry.example_inputs, tmp_path / "m.onnx") == "torch.export-based exporter"
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ----------------------------------------------------------------------------- remove_padding: graphopt-domain functions


@pytest.fixture(scope="module")
def bert_padding_export(tmp_path_factory):
    """A 2-layer BERT (random init, eager attention) after remove_padding, exported."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    assert model.config._attn_implementation == "eager"
    example = _padded_ids(4, 16, 120, seed=0)
    fast = graphopt.optimize(model, ["remove_padding"], example, dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},) * 2)
    counts = ir.count_ops(fast.graph_module)
    assert counts["graphopt.pack_tokens.default"] == 1 and counts["graphopt.unpack_tokens.default"] == 1
    assert counts["graphopt.varlen_attention.default"] == 2
    path = tmp_path_factory.mktemp("onnx") / "bert.onnx"
    assert onnx_export.export_onnx(fast, example, path) == "torch.export-based exporter"
    return model, fast, path


def test_remove_padding_ops_export_as_graphopt_functions(bert_padding_export):
    model, fast, path = bert_padding_export
    onnx.checker.check_model(str(path))
    # the graphopt-domain functions arrive inlined (the exporter's opset conversion inlines): standard ops only
    assert _custom_nodes(path) == set()
    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"NonZero", "GatherND", "ScatterND", "Softmax", "Where"} <= op_types  # pack, unpack, block-diagonal attention
    for b, s in SHAPES:
        ids, mask = _padded_ids(b, s, 120, seed=b + s)
        (hidden,) = _run_onnx(path, {"input_ids": ids, "attention_mask": mask})
        valid = mask.bool()
        with torch.no_grad():
            assert_close(hidden[valid], fast(ids, mask).last_hidden_state[valid], **FP32, msg=f"[{b}, {s}]")
            assert_close(hidden[valid], model(ids, mask).last_hidden_state[valid], **FP32, msg=f"[{b}, {s}] vs the original")


def test_varlen_attention_translation_matches_the_op_on_empty_and_single_token_sequences(tmp_path):
    class Attend(torch.nn.Module):
        def forward(self, q, k, v, cu):
            return torch.ops.graphopt.varlen_attention(q, k, v, cu, 0.3)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 3, 3, 4, 7])  # lengths 3, 0, 1, 3
    onnx_export.export_onnx(Attend(), (q, k, v, cu), tmp_path / "a.onnx")
    (out,) = _run_onnx(tmp_path / "a.onnx", {"q": q, "k": k, "v": v, "cu": cu})
    assert_close(out, torch.ops.graphopt.varlen_attention(q, k, v, cu, 0.3), **FP32)


def test_pooling_translations_match_the_ops_on_empty_left_padded_and_holed_sequences(tmp_path):
    class Pool(torch.nn.Module):
        def forward(self, packed, mask):
            return torch.ops.graphopt.sum_tokens(packed, mask), torch.ops.graphopt.select_token(packed, mask, 0), torch.ops.graphopt.select_token(packed, mask, 2)

    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    packed = torch.randn(int(mask.sum()), 3, generator=torch.Generator().manual_seed(0))
    dims = ({0: Dim.AUTO}, {0: Dim.AUTO, 1: Dim.AUTO})
    onnx_export.export_onnx(Pool(), (packed, mask), tmp_path / "p.onnx", dynamic_shapes=dims)
    for m in (mask, torch.zeros(2, 3, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64)):
        p = torch.randn(int(m.sum()), 3)
        outs = _run_onnx(tmp_path / "p.onnx", {"packed": p, "mask": m})
        for out, ref in zip(outs, Pool()(p, m), strict=True):
            assert_close(out, ref, **FP32)


def test_every_graphopt_op_declares_an_onnx_translation():
    records = [r for r in ir.oprecord.op_records() if r.name.startswith("graphopt::")]
    assert {r.name for r in records} >= {
        "graphopt::rms_norm",
        "graphopt::crms_norm",
        "graphopt::pack_tokens",
        "graphopt::unpack_tokens",
        "graphopt::varlen_attention",
        "graphopt::sum_tokens",
        "graphopt::select_token",
        "graphopt::int8_linear",
        "graphopt::weight_only_linear",
        "graphopt::linear_attention",
        "graphopt::hybrid_attention",
        "graphopt::varlen_linear_attention",
        "graphopt::varlen_hybrid_attention",
        "graphopt::window_attention",
        "graphopt::block_sparse_attention",
        "graphopt::varlen_window_attention",
    }
    assert all(r.onnx is not None and callable(r.onnx()) for r in records)
    table = onnx_export.onnx_translation_table()
    assert torch.ops.graphopt.rms_norm.default in table and torch.ops.graphopt.varlen_attention.default in table


# ----------------------------------------------------------------------------- errors: whole, without colours, quiet


def test_a_failed_export_keeps_the_whole_error_without_ansi_codes_and_prints_nothing(bert_padding_export, tmp_path, monkeypatch, capfd):
    _, fast, _ = bert_padding_export
    monkeypatch.setattr(onnx_export, "onnx_translation_table", lambda: {})  # as before the op records declared translations
    capfd.readouterr()
    example = _padded_ids(2, 8, 120, seed=1)
    with pytest.raises(onnx_export.OnnxExportError) as info:
        onnx_export.export_onnx(fast, example, tmp_path / "m.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the TorchScript exporter's IR listing was captured, not printed
    assert "\n" not in str(info.value) and "graphopt::pack_tokens" in str(info.value)
    details = info.value.details
    assert "\x1b" not in details and "== torch.export-based exporter ==" in details and "== TorchScript exporter ==" in details
    assert "Torch IR graph at exception" in details  # what the fallback printed is part of the story
    assert len(details.splitlines()) > 20 and not (tmp_path / "m.onnx").exists()


def test_ansi_codes_are_stripped_and_multi_line_errors_kept_whole(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("\x1b[1m\x1b[31mcannot export\x1b[0m\nsecond line\n" + "x" * 500)

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(onnx_export.OnnxExportError) as info:
        onnx_export.export_onnx(torch.nn.ReLU(), (torch.randn(2),), tmp_path / "m.onnx")
    assert str(info.value) == "torch.export-based exporter: RuntimeError: cannot export; TorchScript exporter: RuntimeError: cannot export"
    assert "\x1b" not in info.value.details and "second line\n" + "x" * 500 in info.value.details


def test_dump_saves_each_whole_error_beside_the_one_line_reasons(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("\x1b[31mno\x1b[0m\n" + "detail " * 100 + "end")

    monkeypatch.setattr(torch.onnx, "export", broken)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    result = gdump.dump(model, [], (torch.randn(2, 4),), tmp_path, svg=False)
    assert (tmp_path / "onnx_error.txt").read_text().splitlines()[
        0
    ] == "model_before.onnx: torch.export-based exporter: RuntimeError: no; TorchScript exporter: RuntimeError: no"
    whole = (tmp_path / "model_after.onnx_error.txt").read_text()
    assert "\x1b" not in whole and whole.count("detail " * 100 + "end") == 2
    assert result.onnx["model_after.onnx"].endswith("(whole error: model_after.onnx_error.txt)")
    assert "model_after.onnx_error.txt" in result.files


# ----------------------------------------------------------------------------- dump and CLI


def test_dump_of_gpt2_after_rmsnorm_writes_model_after_onnx(tmp_path, capfd):
    entry = zoo.load("gpt2-tiny")
    capfd.readouterr()
    result = gdump.dump(entry.model, ["layernorm_to_rmsnorm"], entry.example_inputs, tmp_path, dynamic_shapes=entry.dynamic_shapes, svg=False)
    assert capfd.readouterr().out == ""
    assert result.onnx == {"model_before.onnx": "torch.export-based exporter", "model_after.onnx": "torch.export-based exporter"}
    assert not (tmp_path / "onnx_error.txt").exists()
    ids = torch.randint(0, 1000, (3, 7))
    (logits,) = _run_onnx(tmp_path / "model_after.onnx", {"input_ids": ids})
    with torch.no_grad():
        assert_close(logits, result.module(ids).logits, **FP32)


# test_cli_export_end_to_end runs the command as users do, in a process of its own (no exporter chatter
# from a fresh torch.onnx); the other command tests call its entry point here (graphopt_main, tests/conftest.py).
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "graphopt", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_export_end_to_end(tmp_path):
    out = tmp_path / "gpt2.onnx"
    done = _cli("export", "zoo:gpt2-tiny", "--passes", "layernorm_to_rmsnorm", "--onnx", out, "-q")
    assert done.returncode == 0, done.stderr
    assert "layernorm_to_rmsnorm" in done.stdout and done.stdout.rstrip().endswith(f"wrote {out} (torch.export-based exporter)")
    assert "graph(" not in done.stdout + done.stderr and "[torch.onnx]" not in done.stdout + done.stderr  # no IR listing, no exporter chatter
    entry = zoo.load("gpt2-tiny")
    ids = torch.randint(0, 1000, (2, 5))
    (logits,) = _run_onnx(out, {"input_ids": ids})
    with torch.no_grad():
        assert_close(logits, entry.model(ids).logits, **FP32)


def test_cli_export_of_an_hf_folder_builds_the_example_batch_from_text(tmp_path, graphopt_main):
    from transformers import AutoModel, AutoTokenizer

    from tests_helpers import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "bert")
    texts = ["A short one.", "This second sentence is a good deal longer than the first one."]
    out = tmp_path / "bert.onnx"
    done = graphopt_main("export", f"hf:{folder}", "--passes", "canonicalize", "--text", texts[0], "--text", texts[1], "--onnx", out)
    assert done.returncode == 0, done.stderr
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    ids, mask = zoo.tokenize(AutoTokenizer.from_pretrained(folder, local_files_only=True), texts)
    assert f"example batch: 2 sentences, padded to {ids.shape[1]} tokens" in done.stderr
    hidden, pooled = _run_onnx(out, {"input_ids": ids, "attention_mask": mask})
    fast = graphopt.optimize(model, ["canonicalize"], (ids, mask))  # the graph the command exported
    with torch.no_grad():
        graph, original = fast(ids, mask), model(ids, mask)
    assert_close(hidden, graph.last_hidden_state, **FP32)
    assert_close(pooled, graph.pooler_output, **FP32)
    assert_close(hidden, original.last_hidden_state, **FP32, msg="vs the original")


@pytest.mark.parametrize("writer", ["graphopt.save", "torch.export.save"])
def test_cli_dump_and_export_of_an_archive(tmp_path, writer, graphopt_main):
    entry = zoo.load("convnet-bn")
    model, (x,) = entry.model, entry.example_inputs
    path = tmp_path / "convbn.pt2"
    if writer == "graphopt.save":
        graphopt.save(graphopt.optimize(model, [], (x,)), str(path), (x,))
    else:
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO},)), str(path))  # no graphopt record

    done = graphopt_main("dump", path, "--passes", "fold_batchnorm", "--out", tmp_path / "dump", "--no-onnx")
    assert done.returncode == 0, done.stderr
    assert f"loaded {path}: a torch.export program, 1 input" in done.stderr
    assert re.search(r"^\| fold_batchnorm \| exact +\| applied ", (tmp_path / "dump" / "report.md").read_text(), flags=re.M)
    assert re.search(r"^x: f32\[s\d+, 3, 32, 32\] = input$", (tmp_path / "dump" / "00_captured.txt").read_text(), flags=re.M)

    out = tmp_path / "convbn.onnx"
    done = graphopt_main("export", path, "--passes", "fold_batchnorm", "--onnx", out, "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(f"wrote {out} (torch.export-based exporter)")
    other = torch.randn(5, 3, 32, 32)  # the archive's batch stayed dynamic through the re-capture and the export
    (y,) = _run_onnx(out, {"x": other})
    with torch.no_grad():
        assert_close(y, model(other), **FP32)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--onnx", "{tmp}/missing/m.onnx"], r"--onnx .*/missing/m\.onnx: directory .*/missing does not exist"),
        (["--onnx", "{tmp}"], r"--onnx .* is a directory; give a file name such as model\.onnx"),
        (["--onnx", "{tmp}/m.onnx", "--passes", "no_such_pass"], r"no_such_pass"),
    ],
    ids=["missing-directory", "a-directory", "unknown-pass"],
)
def test_cli_export_bad_input_is_one_line(tmp_path, args, message, graphopt_main):
    done = graphopt_main("export", "zoo:gpt2-tiny", *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: ") and re.search(message, lines[0]), done.stderr
    assert not list(tmp_path.glob("*.onnx"))


def test_cli_export_needs_onnx(tmp_path, graphopt_main):
    done = graphopt_main("export", "zoo:gpt2-tiny")
    assert done.returncode == 2 and "--onnx" in done.stderr


def test_save_rejects_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'tflite'"):
        graphopt.save(torch.fx.symbolic_trace(torch.nn.ReLU()), str(tmp_path / "m"), (torch.randn(2),), format="tflite")
