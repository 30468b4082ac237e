"""quantize_weights: weight-only int8 (per channel) and group-wise int4 linears."""

import pytest
import torch
from quant_models import block, tokens
from torch import nn

import graphopt
from graphopt import ir
from graphopt.ops.quant.reference import dequantize_int4, quantize_int4_groupwise
from graphopt.passes.quantize_weights import QuantizeWeights
from graphopt.pipeline.report import ROLLED_BACK
from graphopt.testing import assert_applies, assert_not_applicable

LINEAR, WEIGHT_ONLY = "aten.linear.default", "graphopt.weight_only_linear.default"


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32), (4, 64)])
def test_quantizes_every_linear_within_the_weights_error(bits, group, int8_pays):
    int8_pays(True)
    model, x = block(), tokens()
    opt = assert_applies(QuantizeWeights(bits=bits, group_size=group), model, (x,), gone=[LINEAR], present=[WEIGHT_ONLY], other_inputs=[(tokens(1, 1, seed=3),)])
    nodes = ir.op_nodes(opt.graph_module, torch.ops.graphopt.weight_only_linear.default)
    assert len(nodes) == 3 and {n.args[4] for n in nodes} == {0 if bits == 8 else group}
    stored = ir.get_tensor(opt.graph_module, nodes[0].args[1])
    assert stored.dtype == (torch.int8 if bits == 8 else torch.uint8) and stored.numel() == model.fc1.weight.numel() // (1 if bits == 8 else 2)
    record = opt.report.record("quantize_weights")
    assert record.param_bytes_after < record.param_bytes_before * (0.4 if bits == 8 else 0.3)


def test_int4_layer_equals_the_dequantized_weights():
    torch.manual_seed(0)
    linear = nn.Linear(128, 24).eval()
    x = torch.randn(5, 128)
    opt = graphopt.optimize(linear, [QuantizeWeights(bits=4, group_size=32, require_speedup=False, min_cosine=0.9)], (x,))
    packed, scale, zero = quantize_int4_groupwise(linear.weight, 32)
    with torch.no_grad():
        expected = nn.functional.linear(x, dequantize_int4(packed, scale, zero, 32), linear.bias)
        torch.testing.assert_close(opt(x), expected, rtol=1e-5, atol=1e-5)


def test_not_applicable_reasons(int8_pays):
    assert_not_applicable(QuantizeWeights(bits=4, group_size=64), nn.Linear(96, 8).eval(), (torch.randn(2, 96),), reason_contains="groups of 64 do not divide its 96 input features")
    int8_pays(False)
    assert_not_applicable(QuantizeWeights(), block(), (tokens(),), reason_contains="no faster than fp32")
    with pytest.raises(ValueError, match="bits"):
        QuantizeWeights(bits=3)


def test_rolls_back_when_int4_breaks_the_budget():
    model, x = block(), tokens()
    opt = graphopt.optimize(model, [QuantizeWeights(bits=4, group_size=128, require_speedup=False, min_cosine=0.99999)], (x,))
    assert opt.report.record("quantize_weights").status == ROLLED_BACK
    assert not ir.op_nodes(opt.graph_module, torch.ops.graphopt.weight_only_linear.default)


def test_saved_archive_holds_int4_weights(tmp_path):
    model, x = block(), tokens()
    opt = graphopt.optimize(model, [QuantizeWeights(bits=4, group_size=32, require_speedup=False, min_cosine=0.9)], (x,))
    path = tmp_path / "int4.pt2"
    graphopt.save(opt, str(path), (x,))
    loaded = graphopt.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens(seed=4)), opt(tokens(seed=4)))
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size < fp32_bytes


@pytest.mark.parametrize("bits", [8, 4])
def test_exports_to_onnx(tmp_path, bits):
    ort = pytest.importorskip("onnxruntime")
    model, x = block(), tokens()
    opt = graphopt.optimize(model, [QuantizeWeights(bits=bits, group_size=32, require_speedup=False, min_cosine=0.9)], (x,))
    graphopt.save(opt, str(tmp_path / "w.onnx"), (x,), format="onnx")
    session = ort.InferenceSession(str(tmp_path / "w.onnx"))
    (out,) = session.run(None, {session.get_inputs()[0].name: tokens(2, 5, seed=7).numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), opt(tokens(2, 5, seed=7)), rtol=1e-5, atol=1e-5)
