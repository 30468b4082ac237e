"""fold_repbn: each PRepBN at γ = 0 folded into an adjacent linear, or kept as one multiply and one add (exact)."""

import torch
from repbn_helpers import ThreeNorms, inputs, one_thread, randomise_repbn  # noqa: F401  (one_thread: autouse fixture)

import graphopt
from graphopt import ir
from graphopt.passes.fold_repbn import FoldRepBN
from graphopt.passes.layernorm_to_repbn import LayerNormToRepBN, prepbn_nodes
from graphopt.testing import assert_close, assert_not_applicable
from graphopt.tools import repbn, zoo


def test_fold_repbn_pass_on_a_layernorm_to_repbn_graph():
    torch.manual_seed(0)
    model = ThreeNorms().eval()
    x = inputs(2, 5, 16)
    opt = graphopt.optimize(model, [LayerNormToRepBN()], (x,))
    randomise_repbn(opt.graph_module)
    node = prepbn_nodes(opt.graph_module)[0]
    opt.graph_module.get_submodule(node.target).progress.set(1.0)  # the modules of one run share their progress
    gm = opt.graph_module
    with torch.no_grad():
        before = gm(x)
    folded, report = graphopt.PassManager([FoldRepBN()], strict=True).run(gm, (x,))
    assert report.record("fold_repbn").stats == {"folded_into_next": 1, "folded_into_previous": 1, "kept_as_scale_shift": 1}
    assert not prepbn_nodes(folded)
    with torch.no_grad():
        assert_close(folded(x), before, max_rel_err=1e-5)
    assert_not_applicable(FoldRepBN(), model, (x,), reason_contains="no PRepBN in the graph")


def test_finalize_folds_and_is_exact():
    torch.manual_seed(0)
    model = ThreeNorms().eval()
    x = inputs(2, 5, 16)
    student = repbn.prepare(model, (x,))
    randomise_repbn(student.graph_module)
    student.set_progress(1.0)
    student.eval()
    final = graphopt.finalize(student)

    record = final.report.record("fold_repbn")
    assert record.stats == {"folded_into_next": 1, "folded_into_previous": 1, "kept_as_scale_shift": 1}
    assert "norm_out (read by output; input add_1 is aten.add.Tensor)" in record.reason
    gm = final.graph_module
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    assert not ir.op_nodes(gm, ir.aten.layer_norm, ir.aten.batch_norm)
    assert ir.count_ops(gm)["aten.linear.default"] == 4  # no linear added; the kept norm is one mul and one add
    with torch.no_grad():
        for x_ in (x, inputs(2, 5, 16, seed=1)):
            assert_close(final(x_), student(x_), max_rel_err=1e-5)
    assert prepbn_nodes(student.graph_module)  # the student is unchanged


def test_finalize_on_preln_tiny_folds_every_block_norm():
    preln_tiny = zoo.load("preln-tiny")
    student = repbn.prepare(preln_tiny.model, preln_tiny.example_inputs, dynamic_shapes=preln_tiny.dynamic_shapes)
    randomise_repbn(student.graph_module)
    student.set_progress(1.0)
    final = graphopt.finalize(student)
    assert final.report.record("fold_repbn").stats == {"folded_into_next": 4, "folded_into_previous": 0, "kept_as_scale_shift": 1}
    with torch.no_grad():
        assert_close(final(*preln_tiny.example_inputs), student(*preln_tiny.example_inputs), max_rel_err=1e-5)
