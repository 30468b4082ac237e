"""The pass manager: ordering, verification, rollback, strict mode, records."""

import pytest
import torch

import graphopt
import tests_helpers
from graphopt import ir
from graphopt.tools import zoo
from graphopt.pipeline.manager import PassManager, PassOrderError, order_passes
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, ROLLED_BACK, UNCHANGED
from graphopt.pipeline.verify import Exact, compare
from graphopt.testing import assert_close
from tests_helpers import DoubleReluPass as DoubleRelu


class SwapReluForGelu(graphopt.Pass):
    """Deliberately wrong: changes the function (gelu != relu)."""

    name = "swap_relu_for_gelu"

    def run(self, gm, ctx):
        for node in ir.op_nodes(gm, ir.aten.relu):
            node.target = torch.ops.aten.gelu.default
        return True


class Raises(graphopt.Pass):
    name = "raises"

    def run(self, gm, ctx):
        ir.op_nodes(gm, ir.aten.relu)[0].target = torch.ops.aten.sigmoid.default  # half-done edit
        raise RuntimeError("boom")


class NoOp(graphopt.Pass):
    name = "no_op"

    def run(self, gm, ctx):
        return graphopt.PassResult(changed=False, message="nothing matched")


def _named(name, requires=(), after=()):
    return type(name, (NoOp,), {"name": name, "requires": tuple(requires), "after": tuple(after)})()


def test_order_respects_after_and_keeps_given_order_otherwise():
    a, b, c = _named("a"), _named("b", after=("c",)), _named("c")
    assert [p.name for p in order_passes([a, b, c])] == ["a", "c", "b"]
    assert [p.name for p in order_passes([c, a, b])] == ["c", "a", "b"]


def test_requires_adds_missing_registered_pass():
    @graphopt.register_pass
    class Prerequisite(NoOp):
        name = "test_prerequisite"

    needy = _named("needy", requires=("test_prerequisite",))
    assert [p.name for p in order_passes([needy])] == ["test_prerequisite", "needy"]


def test_cycle_is_a_clear_error():
    with pytest.raises(PassOrderError, match="cycle: .*x.*y.*x|cycle: .*y.*x.*y"):
        order_passes([_named("x", after=("y",)), _named("y", after=("x",))])


def test_broken_pass_is_rolled_back_and_later_passes_still_run(tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    before = ir.count_ops(gm)
    new, report = PassManager([SwapReluForGelu(), DoubleRelu()]).run(gm, args)
    bad, good = report.records
    assert bad.status == ROLLED_BACK and "verification failed" in bad.reason and bad.error > 1e-3
    assert good.status == APPLIED and good.error <= 1e-5
    after = ir.count_ops(new)
    assert after["aten.gelu.default"] == 0
    assert after["aten.relu.default"] == before["aten.relu.default"] + 1
    assert good.nodes_after == good.nodes_before + 1
    # the input graph is untouched (passes ran on clones)
    assert ir.count_ops(gm) == before
    assert_close(new(*args), model(*args))


def test_raising_pass_is_rolled_back_with_reason(tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    new, report = PassManager([Raises()]).run(gm, args)
    assert report.records[0].status == ROLLED_BACK
    assert "RuntimeError: boom" in report.records[0].reason
    assert_close(new(*args), model(*args))


def test_strict_raises(tiny_mlp):
    model, args = tiny_mlp
    with pytest.raises(graphopt.PassFailedError, match="swap_relu_for_gelu.*verification failed"):
        PassManager([SwapReluForGelu()], strict=True).run(graphopt.capture(model, args), args)


def test_not_applicable_and_unchanged_are_recorded(tiny_mlp):
    class NoRelu(torch.nn.Module):
        def forward(self, x):
            return x * 2

    x = torch.randn(3)
    _, report = PassManager([DoubleRelu(), NoOp()]).run(graphopt.capture(NoRelu(), (x,)), (x,))
    assert [(r.status, r.reason) for r in report.records] == [(NOT_APPLICABLE, "no relu in the graph"), (UNCHANGED, "nothing matched")]


def test_without_verify_a_wrong_pass_is_kept(tiny_mlp):
    model, args = tiny_mlp
    new, report = PassManager([SwapReluForGelu()], verify=False).run(graphopt.capture(model, args), args)
    assert report.records[0].status == APPLIED
    assert ir.count_ops(new)["aten.gelu.default"] == 1


def test_records_flops_and_param_bytes(tiny_mlp):
    model, args = tiny_mlp
    _, report = PassManager([DoubleRelu()]).run(graphopt.capture(model, args), args)
    r = report.records[0]
    tokens = 2 * 5
    assert r.flops_before == r.flops_after == 2 * tokens * (8 * 16 + 16 * 8)
    params = sum(p.numel() for p in model.parameters()) * 4
    assert r.param_bytes_before == r.param_bytes_after == params
    assert r.seconds > 0
    text = str(report)
    assert "double_relu_for_tests" in text and "applied" in text


def test_flop_counts_can_be_turned_off_without_changing_the_graph(tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    counted, _ = PassManager([SwapReluForGelu()], verify=False).run(gm, args)
    lean, report = PassManager([SwapReluForGelu()], verify=False, count_flops=False).run(gm, args)
    assert report.records[0].status == APPLIED and report.records[0].flops_before == report.records[0].flops_after == 0
    assert lean.code == counted.code and report.records[0].param_bytes_after > 0


def test_observers_see_every_pass(tiny_mlp):
    model, args = tiny_mlp
    seen = []
    PassManager([DoubleRelu(), NoOp()], observers=[lambda rec, a, b: seen.append((rec.name, rec.status, a is b))]).run(graphopt.capture(model, args), args)
    assert seen == [("double_relu_for_tests", APPLIED, False), ("no_op", UNCHANGED, True)]


def test_approximate_pass_uses_its_budget(tiny_mlp):
    class ScaleOutput(graphopt.Pass):
        """Multiplies the hidden activations by 1.001: off by 0.1%, direction unchanged."""

        name = "scale_output"
        exact = False
        budget = graphopt.MinCosine(0.999)

        def run(self, gm, ctx):
            relu = ir.op_nodes(gm, ir.aten.relu)[0]
            with gm.graph.inserting_after(relu):
                scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (relu, 1.001))
            relu.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
            return True

    model, args = tiny_mlp
    _, report = PassManager([ScaleOutput()]).run(graphopt.capture(model, args), args)
    r = report.records[0]
    assert r.status == APPLIED and r.metric == "cosine" and r.error > 0.999
    _, strict_report = PassManager([ScaleOutput()]).run(graphopt.capture(model, args), args)
    assert "error vs original" in strict_report.final


def test_approximate_pass_without_budget_cannot_register():
    with pytest.raises(TypeError, match="fidelity budget"):

        @graphopt.register_pass
        class Loose(graphopt.Pass):
            name = "loose"
            exact = False


def test_unknown_pass_name_suggests():
    with pytest.raises(graphopt.UnknownPassError, match="unknown pass 'no_such_pass'"):
        graphopt.get_pass("no_such_pass")


class SpoilRow(graphopt.Pass):
    """Adds 1 to row ``row`` of the [4, 3] output; declares the rows in ``compares`` (None: all)."""

    row: int = 0
    compares: tuple[int, ...] | None = None

    def run(self, gm, ctx):
        output = gm.graph.output_node()
        (result,) = output.args[0]
        delta = torch.zeros(4, 3)
        delta[self.row] = 1.0
        with gm.graph.inserting_before(output):
            spoiled = gm.graph.call_function(torch.ops.aten.add.Tensor, (result, ir.add_constant(gm, delta, "delta", before=output)))
        output.replace_input_with(result, spoiled)
        return True

    def output_masks(self, reference, ctx):
        if self.compares is None:
            return None
        rows = torch.zeros(4, 1, dtype=torch.bool)
        rows[list(self.compares)] = True
        return [rows]


def _spoiler(name, row, compares):
    return type(name, (SpoilRow,), {"name": name, "row": row, "compares": compares})()


def _doubling():
    x = torch.randn(4, 3)
    return graphopt.capture(tests_helpers.Fn(lambda t: t * 2), (x,)), (x,)


def test_positions_compared_are_those_every_pass_declares():
    gm, args = _doubling()
    first, second = _spoiler("spoil_row_0", 0, (1, 2, 3)), _spoiler("spoil_row_3", 3, (0, 1, 2))
    new, report = PassManager([first, second], strict=True).run(gm, args)
    assert [r.error for r in report.records] == [0.0, 0.0]
    assert (new(*args) - gm(*args)).abs().amax(1).gt(0.5).tolist() == [True, False, False, True]  # rows both passes spoiled
    # end to end, only rows 1 and 2 are meaningful: row 0 is not compared again after the second pass
    assert report.final["error vs original"] == "rel_err 0.00e+00 (at the output positions declared by spoil_row_0, spoil_row_3)"


def test_a_later_pass_may_change_positions_an_earlier_pass_made_meaningless():
    gm, args = _doubling()
    undeclared = _spoiler("spoil_row_0_again", 0, None)  # compares everything it is asked to
    _, alone = PassManager([undeclared]).run(gm, args)
    assert alone.records[0].status == ROLLED_BACK
    _, after_first = PassManager([_spoiler("spoil_row_0", 0, (1, 2, 3)), _spoiler("spoil_row_0_again", 0, None)]).run(gm, args)
    assert [r.status for r in after_first.records] == [APPLIED, APPLIED]
    assert after_first.final["error vs original"].startswith("rel_err 0.00e+00")


class TokenStates(torch.nn.Module):
    """A BERT encoder's per-token outputs (last hidden states, pads included)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _end_to_end(report) -> float:
    return float(report.final["error vs original"].split()[1])


def test_end_to_end_error_of_minilm_token_states_on_real_sentences():
    entry = zoo.load("minilm")
    ids, mask = zoo.tokenize(entry.tokenizer, zoo.real_sentences(8))  # padded to the longest
    model = TokenStates(entry.model.bert).eval()
    optimized = graphopt.optimize(model, ["remove_padding"], (ids, mask), dynamic_shapes=entry.dynamic_shapes)
    assert optimized.report.applied == ["canonicalize", "remove_padding"]
    assert _end_to_end(optimized.report) < 1e-5 and "declared by remove_padding" in optimized.report.final["error vs original"]
    with torch.no_grad():
        out, ref = optimized(ids, mask), model(ids, mask)
    assert not compare(out, ref, Exact()).ok  # pad positions differ: comparing them would fail
    assert torch.all(out[mask == 0] == 0)


def test_end_to_end_error_of_a_tiny_bert_with_per_token_outputs():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50, attn_implementation="eager")
    model = TokenStates(BertModel(config).eval()).eval()
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 2, 5])[:, None]).long()
    ids = torch.randint(1, 50, (3, 7)) * mask
    _, report = PassManager(["canonicalize", "remove_padding"]).run(graphopt.capture(model, (ids, mask)), (ids, mask))
    assert [r.status for r in report.records] == [APPLIED, APPLIED]
    assert _end_to_end(report) < 1e-5
