"""cast_bf16: GEMMs and attention in bf16, norms and the residual stream in fp32, only where bf16 pays."""

import torch
from quant_models import block, tokens

import graphopt
from graphopt import ir, zoo
from graphopt.ops.platform import cpu_capabilities
from graphopt.passes.cast_bf16 import CastBF16
from graphopt.pipeline.report import APPLIED, ROLLED_BACK
from graphopt.testing import assert_applies, assert_not_applicable


def test_linears_run_in_bf16_and_everything_else_in_fp32():
    model, x = block(), tokens()
    opt = assert_applies(CastBF16(require_native=False), model, (x,), other_inputs=[(tokens(seed=2),)])
    gm = opt.graph_module
    linears = ir.op_nodes(gm, ir.aten.linear)
    assert len(linears) == 3 and all(ir.get_tensor(gm, n.args[1]).dtype == torch.bfloat16 for n in linears)
    norm = ir.op_nodes(gm, ir.aten.layer_norm)[0]
    assert ir.val_of(norm).dtype == torch.float32 and ir.val_of(ir.op_nodes(gm, ir.aten.gelu)[0]).dtype == torch.float32
    assert opt.report.record("cast_bf16").stats == {"linears": 3, "attention_matmuls": 0}


def test_chosen_linears_only():
    opt = assert_applies(CastBF16(require_native=False, attention=False, layers=[1]), block(), (tokens(),))
    gm = opt.graph_module
    dtypes = [ir.get_tensor(gm, n.args[1]).dtype for n in ir.op_nodes(gm, ir.aten.linear)]
    assert dtypes == [torch.float32, torch.bfloat16, torch.float32]
    assert opt.report.record("cast_bf16").stats == {"linears": 1, "attention_matmuls": 0}


def test_minilm_attention_in_bf16_keeps_cosine_above_0_9999():
    entry = zoo.load("minilm")
    ids, mask = zoo.tokenize(entry.tokenizer, zoo.real_sentences(32))
    opt = graphopt.optimize(
        entry.model, ["canonicalize", "remove_padding", CastBF16(require_native=False)], entry.example_inputs, dynamic_shapes=entry.dynamic_shapes
    )
    assert opt.report.record("cast_bf16").status == APPLIED and opt.report.record("cast_bf16").stats["attention_matmuls"] == 6
    with torch.no_grad():
        assert zoo.cosine_similarity_rows(opt(ids, mask), entry.model(ids, mask)).min() > 0.9999


def test_not_applicable_without_native_bf16_or_gemms():
    if not cpu_capabilities().native_bf16:
        assert_not_applicable(CastBF16(), block(), (tokens(),), reason_contains="no native bf16")
    assert_not_applicable(CastBF16(), torch.nn.LayerNorm(8).eval(), (torch.randn(2, 8),), reason_contains="no fp32 linear, matmul or attention")


def test_rolls_back_when_the_budget_is_tighter_than_bf16():
    opt = graphopt.optimize(block(), [CastBF16(require_native=False, min_cosine=0.99999999)], (tokens(),))
    assert opt.report.record("cast_bf16").status == ROLLED_BACK
