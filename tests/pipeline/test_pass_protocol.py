"""The pass protocol: analyze once, then rewrite; NotApplicable; options as frozen configs; output
masks in the result, no state of a run on the pass."""

import dataclasses

import pytest
import torch
from torch import nn

import graphopt
import tests_helpers
from graphopt import ir
from graphopt.ir.weights import fold_affine_before
from graphopt.passes import layernorm_to_rmsnorm, remove_padding
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from graphopt.pipeline.manager import PassManager
from graphopt.pipeline.pass_base import NotApplicable, summarize_reasons
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, ROLLED_BACK


class CountingDoubleRelu(graphopt.Pass):
    """New-style DoubleRelu: the analysis finds the relus, the rewrite doubles exactly those."""

    name = "counting_double_relu"

    def __init__(self, **options):
        super().__init__(**options)
        self._calls = []  # what the test inspects

    def analyze(self, gm, ctx):
        self._calls.append("analyze")
        relus = ir.op_nodes(gm, ir.aten.relu)
        if not relus:
            raise NotApplicable("no relu in the graph")
        return relus

    def rewrite(self, gm, relus, ctx):
        self._calls.append("rewrite")
        assert all(n.graph is gm.graph for n in relus)  # the analysis was made on the graph it edits
        for node in relus:
            with gm.graph.inserting_after(node):
                again = gm.graph.call_function(torch.ops.aten.relu.default, (node,))
            ir.replace_node(node, again)
        return graphopt.PassResult(changed=True, stats={"doubled": len(relus)})


def test_the_analysis_runs_once_per_pipeline_run_and_feeds_the_rewrite(tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    p = CountingDoubleRelu()
    new, report = PassManager([p], strict=True).run(gm, args)
    assert p._calls == ["analyze", "rewrite"]
    assert report.records[0].status == APPLIED and report.records[0].stats == {"doubled": 1}
    assert ir.count_ops(new)["aten.relu.default"] == 2


def test_a_new_style_pass_still_answers_applicable_and_run(tiny_mlp):
    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    assert CountingDoubleRelu().applicable(gm) == (True, "")
    result = CountingDoubleRelu().run(gm, graphopt.PassContext(example_inputs=args))
    assert result.changed and ir.count_ops(gm)["aten.relu.default"] == 2
    plain = graphopt.capture(tests_helpers.Fn(lambda x: x * 2), (torch.randn(3),))
    assert CountingDoubleRelu().applicable(plain) == (False, "no relu in the graph")
    with pytest.raises(NotApplicable, match="no relu"):
        CountingDoubleRelu().run(plain, graphopt.PassContext())


def test_an_old_style_pass_runs_through_the_defaults(tiny_mlp):
    model, args = tiny_mlp
    p = tests_helpers.DoubleReluPass()  # applicable(gm) / run(gm, ctx)
    gm = graphopt.capture(model, args)
    with pytest.raises(NotApplicable, match="no relu in the graph"):
        p.analyze(graphopt.capture(tests_helpers.Fn(lambda x: x * 2), (torch.randn(3),)), graphopt.PassContext())
    assert p.analyze(gm, graphopt.PassContext()) is None
    _, report = PassManager([p]).run(gm, args)
    assert report.records[0].status == APPLIED


class PreLN(nn.Module):
    """Two Pre-LN blocks on an embedded stream: what layernorm_to_rmsnorm converts."""

    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Embedding(20, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.mlps = nn.ModuleList(nn.Linear(d, d) for _ in range(2))

    def forward(self, ids):
        h = self.embed(ids)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(torch.relu(norm(h)))
        return self.norms[-1](h)


def _tiny_bert_tokens():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50, attn_implementation="eager")
    bert = BertModel(config).eval()
    model = tests_helpers.Fn(lambda ids, mask: bert(input_ids=ids, attention_mask=mask).last_hidden_state)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 4])[:, None]).long()
    return model.eval(), (torch.randint(1, 50, (3, 6)) * mask, mask)


@pytest.mark.parametrize(
    "module, analysis, pipeline, build",
    [
        (layernorm_to_rmsnorm, "_analyse", ["layernorm_to_rmsnorm"], lambda: (PreLN().eval(), (torch.randint(0, 20, (2, 5)),))),
        (remove_padding, "_plan", ["remove_padding"], _tiny_bert_tokens),
    ],
    ids=["layernorm_to_rmsnorm", "remove_padding"],
)
def test_a_built_in_analysis_runs_once_per_pipeline_run(monkeypatch, module, analysis, pipeline, build):
    calls = []
    real = getattr(module, analysis)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, analysis, counted)
    model, inputs = build()
    optimized = graphopt.optimize(model, pipeline, inputs, strict=True)
    assert optimized.report.applied[-1] == pipeline[-1]
    assert len(calls) == 1


def test_config_is_a_frozen_dataclass_listed_by_options_and_repr():
    assert dataclasses.fields(graphopt.Pass.Config) == ()
    for name, cls in graphopt.available_passes().items():
        assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen, name
    p = LayerNormToRMSNorm(compress=True)
    assert p.config == LayerNormToRMSNorm.Config(compress=True) == LayerNormToRMSNorm(config=LayerNormToRMSNorm.Config(compress=True)).config
    assert p.options() == {"compress": True} and repr(p) == "LayerNormToRMSNorm(compress=True)"
    assert LayerNormToRMSNorm().options() == {"compress": False}
    assert FoldBatchNorm().options() == {} and repr(FoldBatchNorm()) == "FoldBatchNorm()"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.config.compress = False
    assert hash(p.config) == hash(LayerNormToRMSNorm.Config(compress=True))  # usable as a key by a search


def test_unknown_option_names_the_pass_and_its_options():
    with pytest.raises(TypeError, match=r"pass 'layernorm_to_rmsnorm' got unknown option\(s\) compres; its options: compress"):
        LayerNormToRMSNorm(compres=True)
    with pytest.raises(TypeError, match="pass 'fold_batchnorm' got unknown option.*level; it takes no options"):
        graphopt.make_pass("fold_batchnorm", level=2)
    with pytest.raises(TypeError, match="config or options, not both"):
        LayerNormToRMSNorm(config=LayerNormToRMSNorm.Config(), compress=True)
    with pytest.raises(TypeError, match="expects a LayerNormToRMSNorm.Config"):
        LayerNormToRMSNorm(config=FoldBatchNorm.Config())
    with pytest.raises(TypeError, match="must be a frozen dataclass"):

        class Mutable(graphopt.Pass):
            @dataclasses.dataclass
            class Config:
                level: int = 0


def test_a_pass_written_before_config_reports_its_attributes():
    class Thresholded(graphopt.Pass):
        name = "thresholded"

        def __init__(self, threshold=0.5):
            self.threshold = threshold

    assert Thresholded(0.25).options() == {"threshold": 0.25} and repr(Thresholded(0.25)) == "Thresholded(threshold=0.25)"


class SpoilRowZero(graphopt.Pass):
    """Adds 1 to row 0 of the [4, 3] output and declares, in its result, that rows 1-3 are compared."""

    name = "spoil_row_zero"

    def analyze(self, gm, ctx):
        return gm.graph.output_node()

    def rewrite(self, gm, output, ctx):
        (result,) = output.args[0]
        delta = torch.zeros(4, 3)
        delta[0] = 1.0
        with gm.graph.inserting_before(output):
            spoiled = gm.graph.call_function(torch.ops.aten.add.Tensor, (result, ir.add_constant(gm, delta, "delta", before=output)))
        output.replace_input_with(result, spoiled)
        return graphopt.PassResult(changed=True, output_masks=_rows_one_to_three)


def _rows_one_to_three(reference, ctx):
    rows = torch.ones(4, 1, dtype=torch.bool)
    rows[0] = False
    return [rows]


def test_output_masks_come_with_the_result_and_the_pass_keeps_no_state():
    x = torch.randn(4, 3)
    gm = graphopt.capture(tests_helpers.Fn(lambda t: t * 2), (x,))
    p = SpoilRowZero()
    _, report = PassManager([p], strict=True).run(gm, (x,))
    record = report.records[0]
    assert record.status == APPLIED and record.error == 0.0
    assert record.output_masks is _rows_one_to_three
    assert report.final["error vs original"] == "rel_err 0.00e+00 (at the output positions declared by spoil_row_zero)"
    assert vars(p) == {"config": graphopt.Pass.Config()}
    assert "output_masks" not in report.to_dict()["records"][0]
    _, undeclared = PassManager([type("Spoil", (SpoilRowZero,), {"name": "spoil", "rewrite": _without_masks(SpoilRowZero.rewrite)})()]).run(gm, (x,))
    assert undeclared.records[0].status == ROLLED_BACK


def _without_masks(rewrite):
    def wrapped(self, gm, output, ctx):
        return dataclasses.replace(rewrite(self, gm, output, ctx), output_masks=None)

    return wrapped


def test_remove_padding_keeps_no_state_of_a_run():
    model, inputs = _tiny_bert_tokens()
    p = graphopt.get_pass("remove_padding")()
    optimized = graphopt.optimize(model, [p], inputs, strict=True)
    assert vars(p) == {"config": p.Config()}
    assert optimized.report.record("remove_padding").output_masks is not None


def test_not_applicable_from_an_ir_helper_surfaces_as_the_reason(tiny_mlp):
    class FoldIntoRelu(graphopt.Pass):
        name = "fold_into_relu"

        def analyze(self, gm, ctx):
            (relu,) = ir.op_nodes(gm, ir.aten.relu)
            fold_affine_before(gm, relu, torch.ones(16), torch.zeros(16))  # raises: a relu is no linear

        def rewrite(self, gm, analysis, ctx):
            raise AssertionError("not reached")

    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    (relu,) = ir.op_nodes(gm, ir.aten.relu)
    with pytest.raises(NotApplicable) as caught:
        fold_affine_before(gm, relu, torch.ones(16), torch.zeros(16))
    assert caught.value.node is relu and caught.value.reason == str(caught.value)
    _, report = PassManager([FoldIntoRelu()], strict=True).run(gm, args)
    assert (report.records[0].status, report.records[0].reason) == (NOT_APPLICABLE, f"{relu.name} is aten.relu.default, not a linear")


def test_not_applicable_found_by_the_rewrite_drops_the_copy(tiny_mlp):
    class Late(graphopt.Pass):
        name = "late"

        def rewrite(self, gm, analysis, ctx):
            ir.op_nodes(gm, ir.aten.relu)[0].target = torch.ops.aten.sigmoid.default  # half-done edit
            raise NotApplicable("found out late")

    model, args = tiny_mlp
    gm = graphopt.capture(model, args)
    new, report = PassManager([Late()], strict=True).run(gm, args)
    assert (report.records[0].status, report.records[0].reason) == (NOT_APPLICABLE, "found out late")
    assert new is gm and ir.count_ops(gm)["aten.sigmoid.default"] == 0


def test_an_analysis_that_raises_is_reported_as_before(tiny_mlp):
    class Broken(graphopt.Pass):
        name = "broken"

        def analyze(self, gm, ctx):
            raise KeyError("oops")

    model, args = tiny_mlp
    _, report = PassManager([Broken()]).run(graphopt.capture(model, args), args)
    assert (report.records[0].status, report.records[0].reason) == (NOT_APPLICABLE, "applicability check raised KeyError: 'oops'")


def test_summarize_reasons_shows_three_then_counts():
    assert summarize_reasons([]) == ""
    assert summarize_reasons(["a", "b"]) == "a; b"
    assert summarize_reasons(["a", "b", "c", "d", "e"]) == "a; b; c (+2 more)"
    assert summarize_reasons(["a", "b", "c"], shown=1) == "a (+2 more)"


def test_report_records_each_pass_options():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).eval()
    fast = graphopt.optimize(model, [graphopt.get_pass("layernorm_to_rmsnorm")(compress=True)], (torch.randn(2, 8),))
    record = fast.report.record("layernorm_to_rmsnorm")
    assert record.options == {"compress": True}
    assert fast.report.to_dict()["records"][0]["options"] == {"compress": True}


def test_the_default_pipeline_is_the_exact_passes_that_stand_alone():
    names = graphopt.default_pass_names()
    assert {"canonicalize", "fold_batchnorm", "layernorm_to_rmsnorm", "remove_padding"} <= set(names)
    assert "smooth_quant" not in names and graphopt.get_pass("smooth_quant").exact  # exact, but only a quantize_int8 preparation
    assert all(graphopt.get_pass(n).exact for n in names)


@pytest.mark.parametrize("name", sorted(graphopt.available_passes()))
def test_pass_spec_round_trips_through_json(name):
    import json

    cls = graphopt.get_pass(name)
    defaults = cls()
    assert graphopt.pass_spec(defaults) == {"pass": name}
    # every option changed from its default where a simple change exists, tuples included
    changed = {}
    for f in dataclasses.fields(cls.Config):
        value = getattr(defaults.config, f.name)
        if isinstance(value, bool):
            changed[f.name] = not value
        elif isinstance(value, float) and 0 < value < 1:
            changed[f.name] = value / 2
    p = cls(**changed)
    spec = json.loads(json.dumps(graphopt.pass_spec(p)))
    again = graphopt.make_pass(spec)
    assert type(again) is cls and again.config == p.config


def test_pass_spec_keeps_tuples_as_tuples():
    from graphopt.passes.prune_tokens import PruneTokens

    p = PruneTokens(keep_ratio=(0.9, 0.5), layers=(1, 3))
    spec = graphopt.pass_spec(p)
    assert spec == {"pass": "prune_tokens", "options": {"keep_ratio": [0.9, 0.5], "layers": [1, 3]}}
    assert graphopt.make_pass(spec).config == p.config
    with pytest.raises(TypeError, match="a pass spec is"):
        graphopt.make_pass({"name": "prune_tokens"})
