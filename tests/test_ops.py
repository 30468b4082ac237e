"""The graphopt:: custom-op mechanism, with its example op graphopt::rms_norm."""

import torch

import graphopt
from graphopt import ir


class UsesRmsNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        return torch.ops.graphopt.rms_norm(x, self.weight, self.bias, 1e-6) * 2


def test_reference_matches_formula():
    x = torch.randn(3, 5, 16)
    w, b = torch.rand(16), torch.randn(16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w + b
    torch.testing.assert_close(torch.ops.graphopt.rms_norm(x, w, b, 1e-6), expected)
    torch.testing.assert_close(torch.ops.graphopt.rms_norm(x, None, None, 1e-6), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_half_precision_computes_in_float32():
    x = torch.randn(4, 64) * 300
    out = torch.ops.graphopt.rms_norm(x.to(torch.bfloat16), None, None, 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.ops.graphopt.rms_norm(x.to(torch.bfloat16).float(), None, None, 1e-6), atol=1e-2, rtol=1e-2)


def test_custom_op_captures_propagates_dynamic_shapes_and_saves(tmp_path):
    model = UsesRmsNorm()
    x = torch.randn(2, 7, 16)
    dim = torch.export.Dim.AUTO
    gm = graphopt.capture(model, (x,), dynamic_shapes=({0: dim, 1: dim},))
    (node,) = ir.op_nodes(gm, torch.ops.graphopt.rms_norm)
    ir.propagate_shapes(gm)
    assert len(ir.shape_of(node)) == 3 and not isinstance(ir.shape_of(node)[1], int)  # symbolic sequence length
    path = tmp_path / "rms.pt2"
    graphopt.save(gm, str(path), (x,), dynamic_shapes=({0: dim, 1: dim},))
    loaded = graphopt.load(str(path))
    y = torch.randn(3, 4, 16)
    torch.testing.assert_close(loaded(y), model(y))


def test_crms_norm_equals_rms_norm_of_the_decompressed_vector():
    v = torch.randn(3, 7, 10, dtype=torch.float64)
    v = v - v.mean(-1, keepdim=True)  # zero-mean: the last coordinate is minus the sum of the others
    full = torch.ops.graphopt.rms_norm(v, None, None, 1e-6)
    compressed = torch.ops.graphopt.crms_norm(v[..., :-1], 1e-6)
    torch.testing.assert_close(compressed, full[..., :-1])
