"""Passes shared by several core tests (a module, not a conftest, so tests can import them)."""

import torch
from torch import nn

import graphopt
from graphopt import ir


@graphopt.register_pass
class DoubleReluPass(graphopt.Pass):
    """Exact: relu(x) == relu(relu(x)); inserts one relu after each relu."""

    name = "double_relu_for_tests"

    def applicable(self, gm):
        found = bool(ir.op_nodes(gm, ir.aten.relu))
        return found, "" if found else "no relu in the graph"

    def run(self, gm, ctx):
        for node in ir.op_nodes(gm, ir.aten.relu):
            with gm.graph.inserting_after(node):
                again = gm.graph.call_function(torch.ops.aten.relu.default, (node,))
            ir.replace_node(node, again)  # node stays: again reads it
        return True


class Fn(nn.Module):
    """A module running ``fn`` on its inputs: one written form (or one op) per module."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def save_tiny_bert(folder, *, tokenizer: bool = True):
    """A random-init 2-layer BERT (transformers' default attention) and, if asked, MiniLM's real
    tokenizer, saved into ``folder`` as users save them; returns ``folder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from graphopt.tools import zoo

    minilm_tokenizer = AutoTokenizer.from_pretrained(zoo.minilm_dir(), local_files_only=True)
    config = BertConfig(
        vocab_size=minilm_tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    if tokenizer:
        minilm_tokenizer.save_pretrained(folder)
    return folder


def run_onnx(path, args) -> list[torch.Tensor]:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) on the tensors ``args``, in the graph's input order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(args)
    return [torch.from_numpy(out) for out in session.run(None, {name: a.numpy() for name, a in zip(names, args, strict=True)})]


def export_and_compare(tmp_path, fn, args, dynamic_shapes=None, others=(), tolerance=None):
    """Export ``fn`` (returning a tuple: several cases share one export) with graphopt's ONNX exporter,
    check that only standard ONNX ops are left, run it in onnxruntime on ``args`` and each of
    ``others`` and compare every output with ``fn``'s (``tolerance``: :func:`graphopt.testing.assert_close` options)."""
    import onnx

    from graphopt.frontends import onnx_export
    from graphopt.testing import assert_close

    path = tmp_path / "op.onnx"
    dims = None if dynamic_shapes is None else (tuple(dynamic_shapes),)  # forward(*args) takes one tuple
    exporter = onnx_export.export_onnx(Fn(fn), args, path, dynamic_shapes=dims)
    assert exporter == "torch.export-based exporter"
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "the graphopt functions are inlined: standard ops only"
    for inputs in (args, *others):
        outs, refs = run_onnx(path, inputs), fn(*inputs)
        assert len(outs) == len(refs)
        for case, (out, ref) in enumerate(zip(outs, refs, strict=True)):
            assert out.shape == ref.shape and out.dtype == ref.dtype, case
            assert_close(out, ref, **(tolerance or {}), msg=f"output {case}")
