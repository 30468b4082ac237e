"""fold_batchnorm: eval-mode BatchNorm folded into the preceding conv / linear."""

import pytest
import torch
from torch import nn
from torch.export import Dim

import graphopt
from graphopt import capture, ir
from graphopt.tools import zoo
from graphopt.pipeline.manager import PassManager, run_graph
from graphopt.passes.fold_batchnorm import BATCH_NORM_OPS, FoldBatchNorm
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, UNCHANGED
from graphopt.testing import assert_close


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics (fresh ones are mean 0, var 1: folding them is nearly a no-op)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
    return model.eval()


def _batch_norms(gm) -> list:
    return ir.op_nodes(gm, *BATCH_NORM_OPS)


def _fold(model, *inputs, **kwargs):
    return graphopt.optimize(model, ["fold_batchnorm"], inputs, strict=True, **kwargs)


def _assert_folds(model, x, folded):
    opt = _fold(model, x)
    record = opt.report.record("fold_batchnorm")
    assert record.status == APPLIED and record.stats == {"folded": folded, "left": 0}
    assert not _batch_norms(opt.graph_module)
    with torch.no_grad():
        assert_close(opt(x), model(x), max_rel_err=1e-5)
        other = torch.randn_like(x)
        assert_close(opt(other), model(other), max_rel_err=1e-5)
    return opt


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- folded


@pytest.mark.parametrize(
    "layers, shape",
    [
        ((nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), (2, 3, 9, 9)),
        ((nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 9, 9)),
        ((nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.BatchNorm2d(8)), (2, 8, 9, 9)),  # depthwise
        ((nn.Conv2d(8, 6, 1, groups=2, bias=False), nn.BatchNorm2d(6)), (2, 8, 5, 5)),  # grouped
        ((nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6)), (2, 4, 11)),
        ((nn.Linear(5, 7), nn.BatchNorm1d(7)), (3, 5)),
        ((nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7, affine=False)), (3, 5)),
        ((nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (1, 2, 5, 5, 5)),
    ],
    ids=["conv2d", "conv2d-no-bias", "depthwise", "grouped", "conv1d", "linear", "linear-no-affine", "conv3d"],
)
def test_folds_layer_then_batchnorm(layers, shape):
    model = _randomise(nn.Sequential(*layers))
    opt = _assert_folds(model, torch.randn(shape), folded=1)
    layer = ir.op_nodes(opt.graph_module, ir.aten.linear, ir.aten.conv1d, ir.aten.conv2d, ir.aten.conv3d)
    assert len(layer) == 1 and ir.normalized_args(layer[0])["bias"] is not None


def test_folds_two_batchnorms_in_a_row_into_one_conv():
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    _assert_folds(model, torch.randn(2, 3, 7, 7), folded=2)


def test_folds_the_tuple_returning_no_training_form():
    class NativeBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            bn = self.bn
            return torch.ops.aten._native_batch_norm_legit_no_training.default(self.conv(x), bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, 1e-3)[0]

    model, x = _randomise(NativeBN()), torch.randn(2, 3, 8, 8)
    assert ir.op_nodes(capture(model, (x,)), ir.aten._native_batch_norm_legit_no_training)
    opt = _assert_folds(model, x, folded=1)
    assert "getitem" not in ir.count_ops(opt.graph_module)


def test_model_in_training_mode_is_captured_in_eval_mode_and_folded():
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    x = torch.randn(2, 3, 7, 7)
    opt = _fold(model, x)
    assert opt.report.record("fold_batchnorm").stats == {"folded": 1, "left": 0}
    assert model.training  # capture restored the caller's mode
    with torch.no_grad():
        assert_close(opt(x), model.eval()(x), max_rel_err=1e-5)


def test_shared_conv_weight_is_copied_not_changed():
    class SharedWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    _assert_folds(_randomise(SharedWeight()), torch.randn(2, 3, 5, 5), folded=1)


# ----------------------------------------------------------------------------- convnet-bn


@pytest.fixture(scope="module")
def convnet():
    return zoo.load("convnet-bn")


def test_convnet_bn_folds_every_batchnorm(convnet):
    model, (x,) = convnet.model, convnet.example_inputs
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(model, (x,))
    opt = _fold(model, x)
    gm = opt.graph_module
    record = opt.report.record("fold_batchnorm")
    assert record.stats == {"folded": 7, "left": 0}
    assert len(_batch_norms(captured)) == 7 and not _batch_norms(gm)
    conv_ops = ("aten.conv1d.default", "aten.conv2d.default", "aten.linear.default")
    assert [ir.count_ops(gm)[op] for op in conv_ops] == [ir.count_ops(captured)[op] for op in conv_ops]
    assert sum(ir.count_ops(gm).values()) == sum(ir.count_ops(captured).values()) - 7
    with torch.no_grad():
        assert_close(opt(x), model(x), max_rel_err=1e-5)
        other = torch.randn(3, 3, 32, 32)
        assert_close(opt(other), model(other), max_rel_err=1e-5)
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())


def test_graph_before_the_pass_keeps_its_tensors(convnet):
    model, (x,) = convnet.model, convnet.example_inputs
    captured = capture(model, (x,))
    tensors_before = {k: v.clone() for k, v in captured.state_dict().items()}
    folded, _ = PassManager(["fold_batchnorm"], strict=True).run(captured, (x,))
    assert not _batch_norms(folded) and len(_batch_norms(captured)) == 7
    assert all(torch.equal(v, tensors_before[k]) for k, v in captured.state_dict().items())


def test_convnet_bn_with_dynamic_batch(convnet):
    model, (x,) = convnet.model, convnet.example_inputs
    opt = _fold(model, x, dynamic_shapes=({0: Dim.AUTO},))
    assert not _batch_norms(opt.graph_module)
    with torch.no_grad():
        for batch in (1, 5):
            other = torch.randn(batch, 3, 32, 32)
            assert_close(opt(other), model(other), max_rel_err=1e-5)


# ----------------------------------------------------------------------------- not applicable / left alone


def test_not_applicable_without_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    opt = _fold(model, torch.randn(1, 3, 6, 6))
    record = opt.report.record("fold_batchnorm")
    assert (record.status, record.reason) == (NOT_APPLICABLE, "no BatchNorm in the graph")


def _left_alone_reason(model, *inputs) -> str:
    """Run the pass directly and return its message; the graph must keep all its BatchNorms."""
    gm = capture(model, inputs)
    count = len(_batch_norms(gm))
    assert FoldBatchNorm().applicable(gm) == (True, "")
    result = FoldBatchNorm().run(gm, graphopt.PassContext(example_inputs=inputs))
    assert not result.changed and result.stats == {"folded": 0, "left": count}
    assert len(_batch_norms(gm)) == count
    return result.message


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_left_alone_when_layer_output_has_another_user():
    message = _left_alone_reason(_randomise(TwoUsers()), torch.randn(1, 3, 6, 6))
    assert message == "left 1 BatchNorm(s): batch_norm: the output of conv2d is also read by add"


def test_left_alone_after_relu():
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    message = _left_alone_reason(model, torch.randn(1, 3, 6, 6))
    assert message == "left 1 BatchNorm(s): batch_norm: it follows aten.relu.default, not a convolution or linear"


def test_left_alone_on_a_graph_input():
    message = _left_alone_reason(_randomise(nn.BatchNorm1d(4)), torch.randn(2, 4))
    assert message.endswith("is a graph input, not a convolution or linear")


def test_left_alone_linear_over_channels_dim_of_3d_input():
    class LinearOnSequence(nn.Module):  # [N, C, L]: BatchNorm1d normalises C, the linear writes L
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x))

    message = _left_alone_reason(_randomise(LinearOnSequence()), torch.randn(2, 4, 6))
    assert message.endswith("it normalises dim 1 of linear's output [2, 4, 6], but linear's output channels are dim 2")


def test_left_alone_with_batch_statistics():
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    message = _left_alone_reason(model, torch.randn(2, 3, 6, 6))
    assert message.endswith("normalises with batch statistics (training mode or track_running_stats=False)")


def test_left_alone_when_conv_weight_is_computed():
    class ScaledWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(nn.functional.conv2d(x, self.conv.weight * 0.5, self.conv.bias))

    message = _left_alone_reason(_randomise(ScaledWeight()), torch.randn(1, 3, 6, 6))
    assert message.endswith("the weight of conv2d is not a constant (it comes from aten.mul.Tensor)")


def test_folds_what_it_can_and_reports_the_rest():
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 7, 7)
    opt = _fold(model, x)
    record = opt.report.record("fold_batchnorm")
    assert record.status == APPLIED and record.stats == {"folded": 1, "left": 1}
    assert record.reason == "left 1 BatchNorm(s): batch_norm_1: it follows aten.relu.default, not a convolution or linear"
    assert len(_batch_norms(opt.graph_module)) == 1
    with torch.no_grad():
        assert_close(opt(x), model(x), max_rel_err=1e-5)


def test_unchanged_record_through_the_manager():
    opt = _fold(_randomise(TwoUsers()), torch.randn(1, 3, 6, 6))
    record = opt.report.record("fold_batchnorm")
    assert record.status == UNCHANGED and "also read by add" in record.reason
    assert run_graph(opt.graph_module, (torch.zeros(1, 3, 6, 6),)).shape == (1, 4, 4, 4)
