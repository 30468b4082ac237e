"""graphopt.weights: folding per-channel affine maps into linear / convolution weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt import capture, ir
from graphopt.ir import NotApplicable
from graphopt.ir.weights import affine_after, affine_before, fold_affine_after, fold_affine_before, output_channel_dim
from graphopt.testing import assert_close


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _attr(gm, node):
    return ir.get_tensor(gm, node)


# ----------------------------------------------------------------------------- tensor arithmetic


def test_affine_after_linear_matches_scaling_the_output():
    w, b, s, t, x = torch.randn(6, 4), torch.randn(6), torch.rand(6) + 0.5, torch.randn(6), torch.randn(3, 4)
    new_w, new_b = affine_after(w, b, s, t)
    assert_close(F.linear(x, new_w, new_b), F.linear(x, w, b) * s + t, max_rel_err=1e-6)


def test_affine_after_grouped_conv_without_bias():
    w, x = torch.randn(8, 2, 3, 3), torch.randn(2, 4, 7, 7)  # groups=2: in 4 channels, out 8
    s, t = torch.randn(8), torch.randn(8)
    new_w, new_b = affine_after(w, None, s, t)
    expected = F.conv2d(x, w, groups=2) * s[:, None, None] + t[:, None, None]
    assert_close(F.conv2d(x, new_w, new_b, groups=2), expected, max_rel_err=1e-6)
    assert new_b.dtype == w.dtype


def test_affine_after_computes_in_float64_and_keeps_dtypes():
    w, b = torch.randn(5, 3).bfloat16(), torch.randn(5).half()
    s, t = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    new_w, new_b = affine_after(w, b, s, t)
    assert (new_w.dtype, new_b.dtype) == (torch.bfloat16, torch.float16)
    assert torch.equal(new_w, (w.double() * s[:, None]).bfloat16())  # one rounding, at the end
    assert torch.equal(new_b, (b.double() * s + t).half())


def test_affine_after_broadcasts_scalars_and_rejects_wrong_channel_counts():
    w = torch.randn(4, 3)
    new_w, new_b = affine_after(w, None, torch.tensor(2.0), torch.tensor(0.5))
    assert torch.equal(new_w, 2 * w) and torch.equal(new_b, torch.full((4,), 0.5))
    with pytest.raises(NotApplicable, match="3 channels, the weight 4 output channels"):
        affine_after(w, None, torch.ones(3), torch.zeros(3))


def test_affine_before_linear_matches_scaling_the_input():
    w, b, s, t, x = torch.randn(6, 4), torch.randn(6), torch.randn(4), torch.randn(4), torch.randn(3, 4)
    new_w, new_b = affine_before(w, b, s, t)
    assert_close(F.linear(x, new_w, new_b), F.linear(x * s + t, w, b), max_rel_err=1e-6)
    new_w, new_b = affine_before(w, None, s, t)
    assert_close(F.linear(x, new_w, new_b), F.linear(x * s + t, w), max_rel_err=1e-6)


def test_affine_before_rejects_non_linear_weights_and_wrong_sizes():
    with pytest.raises(NotApplicable, match="linear weight"):
        affine_before(torch.randn(4, 3, 3, 3), None, torch.ones(3), torch.zeros(3))
    with pytest.raises(NotApplicable, match="5 channels, the weight 4 input features"):
        affine_before(torch.randn(6, 4), None, torch.ones(5), torch.zeros(5))


# ----------------------------------------------------------------------------- graph edits


class LinearThenConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.conv = nn.Conv1d(6, 5, 3, padding=1, bias=False)

    def forward(self, x):  # x [N, L, 4]
        return self.conv(self.fc(x).transpose(1, 2))


def _only(gm, target):
    (node,) = ir.op_nodes(gm, target)
    return node


def test_fold_affine_after_rewrites_the_layer_and_leaves_old_tensors():
    model, x = LinearThenConv().eval(), torch.randn(2, 7, 4)
    gm = capture(model, (x,))
    linear, conv = _only(gm, ir.aten.linear), _only(gm, ir.aten.conv1d)
    old_w = _attr(gm, linear.args[1])
    old_w_copy = old_w.clone()
    s, t = torch.rand(6) + 0.5, torch.randn(6)
    fold_affine_after(gm, linear, s, t)
    s5, t5 = torch.rand(5) + 0.5, torch.randn(5)
    fold_affine_after(gm, conv, s5, t5)  # no bias: one is added
    ir.cleanup(gm)
    with torch.no_grad():
        h = model.fc(x) * s + t
        expected = model.conv(h.transpose(1, 2)) * s5[:, None] + t5[:, None]
        assert_close(gm(x), expected, max_rel_err=1e-6)
    assert torch.equal(old_w, old_w_copy)  # replaced, not edited in place
    assert ir.normalized_args(conv)["bias"].op == "get_attr"


def test_fold_affine_after_copies_a_weight_shared_with_another_layer():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.a(x), self.b(x)

    model, x = Shared().eval(), torch.randn(1, 3, 5, 5)
    gm = capture(model, (x,))
    first, second = ir.op_nodes(gm, ir.aten.conv2d)
    assert first.args[1] is second.args[1]  # export reads the shared weight through one node
    s, t = torch.rand(4) + 0.5, torch.randn(4)
    fold_affine_after(gm, first, s, t)
    ir.cleanup(gm)
    assert first.args[1] is not second.args[1]
    out_a, out_b = gm(x)
    with torch.no_grad():
        assert_close(out_a, model.a(x) * s[:, None, None] + t[:, None, None], max_rel_err=1e-6)
        assert torch.equal(out_b, model.b(x))


def test_fold_affine_before_linear_in_a_graph():
    model, x = nn.Linear(4, 3).eval(), torch.randn(2, 4)
    gm = capture(model, (x,))
    s, t = torch.randn(4), torch.randn(4)
    fold_affine_before(gm, _only(gm, ir.aten.linear), s, t)
    ir.cleanup(gm)
    with torch.no_grad():
        assert_close(gm(x), model(x * s + t), max_rel_err=1e-6)


def test_not_foldable_leaves_the_graph_unchanged():
    class RuntimeWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 1, 1))

        def forward(self, x):
            return F.conv2d(x, self.w * 2), F.conv_transpose2d(x[:, :3], self.w[:3])

    gm = capture(RuntimeWeight().eval(), (torch.randn(1, 3, 4, 4),))
    before = gm.graph.python_code("self").src
    conv = _only(gm, ir.aten.conv2d)
    with pytest.raises(NotApplicable, match=r"weight of conv2d is not a constant \(it comes from aten.mul.Tensor\)"):
        fold_affine_after(gm, conv, torch.ones(4), torch.zeros(4))
    with pytest.raises(NotApplicable, match="not a linear"):
        fold_affine_before(gm, conv, torch.ones(3), torch.zeros(3))
    with pytest.raises(NotApplicable, match="not a linear or convolution"):
        fold_affine_after(gm, ir.op_nodes(gm, ir.aten.conv_transpose2d)[0], torch.ones(3), torch.zeros(3))
    assert gm.graph.python_code("self").src == before


def test_fold_affine_after_refuses_a_transposed_convolution():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, 2, 2))

        def forward(self, x):
            return torch.ops.aten.convolution(x, self.w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1)

    gm = capture(Transposed().eval(), (torch.randn(1, 3, 4, 4),))
    with pytest.raises(NotApplicable, match="transposed convolution"):
        fold_affine_after(gm, _only(gm, ir.aten.convolution), torch.ones(4), torch.zeros(4))


def test_output_channel_dim():
    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.conv = nn.Conv1d(4, 4, 1)

        def forward(self, x, seq, unbatched):
            return self.fc(x), self.fc(seq), self.conv(seq), self.conv(unbatched), torch.relu(x)

    gm = capture(Layers().eval(), (torch.randn(2, 4), torch.randn(2, 4, 4), torch.randn(4, 5)))
    linear_2d, linear_3d = ir.op_nodes(gm, ir.aten.linear)
    conv_batched, conv_unbatched = ir.op_nodes(gm, ir.aten.conv1d)
    assert [output_channel_dim(n) for n in (linear_2d, linear_3d, conv_batched, conv_unbatched)] == [1, 2, 1, 0]
    assert output_channel_dim(_only(gm, ir.aten.relu)) is None
