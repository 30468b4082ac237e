"""Fusion partitioning: op kinds, regions on small known graphs, the fused graph's numerics, stats."""

import pytest
import torch
import torch.nn.functional as F
from tests_helpers import Fn
from torch import nn
from torch.utils._pytree import tree_leaves

from graphopt.tools import zoo
from graphopt.backends import partition as P
from graphopt.frontends.capture import capture
from graphopt.ir import aten, op_nodes
from graphopt.testing import assert_close


def _capture(fn, *shapes):
    inputs = tuple(torch.randn(*s) for s in shapes)
    module = fn if isinstance(fn, nn.Module) else Fn(fn)
    return capture(module, inputs), inputs


def _kind(fn, target, *shapes):
    gm, _ = _capture(fn, *shapes)
    (node,) = op_nodes(gm, target)
    return P.op_kind(node)


def _assert_same_outputs(gm, fused, inputs):
    expected, got = tree_leaves(gm(*inputs)), tree_leaves(fused(*inputs))
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert_close(g, e, rtol=0, atol=0)


def _region_names(regions):
    return [(r.kind, [n.name for n in r.nodes]) for r in regions]


def _fused_modules(fused):
    return [n for n in fused.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize(
    "fn, target, shape, kind",
    [
        (lambda x: x.sum(-1), aten.sum, (2, 3, 4), "reduction"),
        (lambda x: x.sum(1), aten.sum, (2, 3, 4), "opaque"),
        (lambda x: x.mean(2, keepdim=True), aten.mean, (2, 3, 4), "reduction"),
        (lambda x: x.amax(0), aten.amax, (2, 3, 4), "opaque"),
        (lambda x: x.softmax(-1), aten.softmax, (2, 4), "norm"),
        (lambda x: x.softmax(0), aten.softmax, (2, 4), "opaque"),
        (lambda x: F.layer_norm(x, (4,)), aten.layer_norm, (2, 3, 4), "norm"),
        (lambda x: F.layer_norm(x, (3, 4)), aten.layer_norm, (2, 3, 4), "opaque"),
        (lambda x: F.rms_norm(x, (4,)), aten.rms_norm, (2, 3, 4), "norm"),
        (lambda x: torch.ops.graphopt.rms_norm(x, None, None, 1e-6), torch.ops.graphopt.rms_norm, (2, 4), "norm"),
        (lambda x: F.gelu(x, approximate="tanh"), aten.gelu, (4,), "pointwise"),
        (lambda x: F.gelu(x), aten.gelu, (4,), "pointwise"),
        (lambda x: torch.where(x > 0, x, -x), aten.where, (4,), "pointwise"),
        (lambda x: x.to(torch.float16), aten.to, (4,), "pointwise"),
        (lambda x: x.transpose(0, 1), aten.transpose, (2, 4), "view"),
        (lambda x: x.cumsum(-1), aten.cumsum, (4,), "opaque"),
        (lambda x, w: F.linear(x, w), aten.linear, (2, 4), "heavy"),
    ],
)
def test_op_kind_table(fn, target, shape, kind):
    shapes = (shape, (3, 4)) if target is aten.linear else (shape,)
    assert _kind(fn, target, *shapes) == kind


def _dropout_node(train):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 4)
    return graph.call_function(aten.dropout.default, (x, 0.1, train))


def test_dropout_is_pointwise_only_in_eval():
    assert P.op_kind(_dropout_node(train=False)) == "pointwise"
    assert P.op_kind(_dropout_node(train=True)) == "opaque"


def test_register_kind_extends_the_table(monkeypatch):
    monkeypatch.setattr(P, "_TABLE", dict(P._TABLE))
    fn = lambda x: x.cumsum(-1)  # noqa: E731
    P.register_kind(aten.cumsum, lambda node: "reduction")
    assert _kind(fn, aten.cumsum, (4,)) == "reduction"
    with pytest.raises(ValueError, match="unknown kind"):
        P.register_kind(aten.cumsum, "elementwise")


def test_pointwise_chain_is_one_region():
    gm, inputs = _capture(lambda x, y: torch.sigmoid((x + y).relu() * 2).view(8), (2, 4), (2, 4))
    regions = P.partition(gm)
    assert _region_names(regions) == [("pointwise", ["add", "relu", "mul", "sigmoid", "view"])]
    assert regions[0].inputs == [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in regions[0].outputs] == ["view"]
    fused = P.fuse_regions(gm, regions)
    assert len(_fused_modules(fused)) == 1 and not op_nodes(fused, aten.add, aten.sigmoid)
    _assert_same_outputs(gm, fused, inputs)


def test_add_layer_norm_mul_is_one_norm_region():
    ln = nn.LayerNorm(4)
    gm, inputs = _capture(lambda x, r: ln(x + r) * 3.0, (2, 3, 4), (2, 3, 4))
    regions = P.partition(gm)
    assert _region_names(regions) == [("norm", ["add", "layer_norm", "mul"])]
    _assert_same_outputs(gm, P.fuse_regions(gm, regions), inputs)


def test_linear_bias_gelu_is_one_matmul_epilogue():
    w, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
    module = Fn(lambda x: F.gelu(F.linear(x, w) + b))
    module.w, module.b = w, b
    gm, inputs = _capture(module, (2, 4))
    regions = P.partition(gm)
    assert _region_names(regions) == [("matmul_epilogue", ["linear", "add", "gelu"])]
    assert sorted(n.op for n in regions[0].inputs) == ["get_attr", "get_attr", "placeholder"]
    _assert_same_outputs(gm, P.fuse_regions(gm, regions), inputs)


def test_lone_matmul_and_pointwise_before_it_are_not_an_epilogue():
    w = nn.Parameter(torch.randn(6, 4))
    module = Fn(lambda x: F.linear(x.relu(), w).transpose(0, 1))
    module.w = w
    gm, _ = _capture(module, (2, 4))
    # relu may not sit before the matmul head; linear + a view is no kernel of its own.
    assert _region_names(P.partition(gm)) == [("pointwise", ["relu"])]


def test_two_reductions_in_a_row_are_two_regions():
    gm, inputs = _capture(lambda x: x.exp().sum(-1).amax(-1) + 1, (2, 3, 4))
    regions = P.partition(gm)
    assert _region_names(regions) == [("reduction", ["exp", "sum_1"]), ("reduction", ["amax", "add"])]
    fused = P.fuse_regions(gm, regions)
    assert [n.meta["region_kind"] for n in _fused_modules(fused)] == ["reduction", "reduction"]
    _assert_same_outputs(gm, fused, inputs)


def test_diamond_through_an_opaque_op_is_split():
    # relu -> cumsum (opaque) -> add <- relu: relu and add in one kernel would need cumsum both
    # before and after it.
    def diamond(x):
        r = x.relu()
        return (r + r.cumsum(-1)).neg()

    gm, inputs = _capture(diamond, (2, 4))
    regions = P.partition(gm)
    assert _region_names(regions) == [("pointwise", ["relu"]), ("pointwise", ["add", "neg"])]
    fused = P.fuse_regions(gm, regions)
    assert len(op_nodes(fused, aten.cumsum)) == 1  # left to ATen, between the two kernels
    assert len(_fused_modules(fused)) == 2
    _assert_same_outputs(gm, fused, inputs)


def test_unknown_ops_stay_aten_calls():
    gm, inputs = _capture(lambda x: torch.flip(x * 2, [0]).cumsum(-1) + 1, (3, 4))
    regions = P.partition(gm)
    assert _region_names(regions) == [("pointwise", ["mul"]), ("pointwise", ["add"])]
    fused = P.fuse_regions(gm, regions)
    assert len(op_nodes(fused, aten.flip)) == len(op_nodes(fused, aten.cumsum)) == 1
    _assert_same_outputs(gm, fused, inputs)


@pytest.mark.parametrize("name", ["gpt2-tiny", "preln-tiny"])
def test_fusion_stats_on_zoo_models(name):
    entry = zoo.load(name)
    gm = capture(entry.model, entry.example_inputs)
    regions = P.partition(gm)
    stats = P.fusion_stats(gm, regions)
    assert 0 < stats["kernels"] == len(regions) < stats["aten_ops"]
    assert stats["kernels"] + stats["ops_left_to_aten"] < stats["aten_ops"]
    assert sum(stats["regions_by_kind"].values()) == stats["kernels"]
    assert {"norm", "matmul_epilogue"} <= set(stats["regions_by_kind"])
    assert 0 < stats["bytes_fused"] < stats["bytes_unfused"]
    assert stats["bytes_saved"] == stats["bytes_unfused"] - stats["bytes_fused"]
    for region in regions:  # disjoint, in graph order, nothing opaque inside
        assert all(P.op_kind(n) != "opaque" for n in region.nodes)
    assert len({n for r in regions for n in r.nodes}) == sum(len(r.nodes) for r in regions)
    fused = P.fuse_regions(gm, regions)
    assert len(_fused_modules(fused)) == stats["kernels"]
    _assert_same_outputs(gm, fused, entry.example_inputs)
