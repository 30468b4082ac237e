"""layernorm_to_rmsnorm: Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm, exact, with reasons when not."""

import pytest
import torch
from torch import nn

import graphopt
from graphopt import ir
from graphopt.tools import zoo
from graphopt.frontends.capture import inference_view
from graphopt.pipeline.manager import PassManager, run_graph
from graphopt.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from graphopt.pipeline.report import APPLIED
from graphopt.ir.streams import find_residual_streams
from graphopt.testing import assert_close, assert_not_applicable
from graphopt.pipeline.verify import Exact, compare

LAYER_NORM = "aten.layer_norm.default"
RMS_NORM = "graphopt.rms_norm.default"
CRMS_NORM = "graphopt.crms_norm.default"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _perturb(model: nn.Module) -> nn.Module:
    """Non-trivial norm parameters and stream means: fresh LayerNorms are the identity affine map,
    and a stream whose mean is already ~0 would hide a writer the pass forgot to recentre."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.3)
            elif isinstance(module, nn.Embedding):  # a row mean as large as the rows' spread
                std = module.weight.std()
                module.weight.add_(std * (1.0 + torch.randn(module.weight.shape[0], 1)))
            elif getattr(module, "bias", None) is not None and module.bias.dim() == 1:
                module.bias.add_(0.02)
    return model.eval()


def _convert(model, inputs, other_inputs=(), compress=False):
    """Run canonicalize + the pass; check it applied and matches the model on every input set."""
    opt = graphopt.optimize(model, ["canonicalize", LayerNormToRMSNorm(compress=compress)], inputs, strict=True)
    record = opt.report.record("layernorm_to_rmsnorm")
    assert record.status == APPLIED, record.reason
    errors = []
    for args in [inputs, *other_inputs]:
        with inference_view(model):
            reference = run_graph(model, args)
        check = compare(run_graph(opt, args), reference, Exact())
        assert check.ok, check
        errors.append(check.value)
    return opt, record, max(errors)


def _stream_widths(gm) -> set[int]:
    return {ir.shape_of(add)[-1] for stream in find_residual_streams(gm) for add in stream.adds}


# ----------------------------------------------------------------------------- small hand-written models


class _Block(nn.Module):
    def __init__(self, d, norm):
        super().__init__()
        self.norm = norm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.fc2(torch.relu(self.fc1(self.norm(h))))


class TinyPreLN(nn.Module):
    """Scaled token embedding + a sliced position table, MLP blocks, optional final norm."""

    def __init__(self, d=16, vocab=50, layers=2, norm=nn.LayerNorm, final_norm=True):
        super().__init__()
        self.d = d
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(8, d) * 0.1 + 0.2)
        self.blocks = nn.ModuleList(_Block(d, norm) for _ in range(layers))
        self.final = norm(d) if final_norm else nn.Identity()

    def forward(self, ids):
        h = self.emb(ids) * self.d**0.5 + self.pos[: ids.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.final(h)


def _ids(batch=2, seq=6, vocab=50):
    return (torch.randint(0, vocab, (batch, seq)),)


# ----------------------------------------------------------------------------- zoo models convert


def _zoo(name):
    overrides = {"image_size": 32, "num_hidden_layers": 2} if name == "vit-s" else {}
    entry = zoo.load(name, **overrides)
    _perturb(entry.model)
    example = entry.example_inputs
    other = tuple(torch.randint_like(x, 0, 1000) if not x.is_floating_point() else torch.randn_like(x) for x in example)
    if name == "preln-tiny":
        other = (other[0], example[1])  # keep the attention mask a mask
    return entry, example, other


@pytest.mark.parametrize("compress", [False, True], ids=["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("name, hidden", [("gpt2-tiny", 128), ("vit-s", 384), ("preln-tiny", 64)])
def test_zoo_pre_ln_models_convert_exactly(name, hidden, compress):
    entry, example, other = _zoo(name)
    opt, record, error = _convert(entry.model, example, [other], compress=compress)
    assert error < 1e-5
    assert record.stats["streams"] == 1 and record.stats["layer_norms"] == 5
    ops = ir.count_ops(opt.graph_module)
    assert ops[LAYER_NORM] == 0
    assert ops[CRMS_NORM if compress else RMS_NORM] == 5 and ops[RMS_NORM if compress else CRMS_NORM] == 0
    assert _stream_widths(opt.graph_module) == {hidden - 1 if compress else hidden}


def test_stats_count_writers_and_the_untied_lm_head():
    entry, example, other = _zoo("gpt2-tiny")
    _, record, _ = _convert(entry.model, example, [other])
    # writers: token + position embeddings, 2 layers x (attention + MLP) output projections
    assert record.stats == {"streams": 1, "layer_norms": 5, "writers_recentred": 6, "untied": 1}


@pytest.mark.parametrize("compress", [False, True], ids=["rmsnorm", "crmsnorm"])
def test_tied_lm_head_keeps_its_weights_and_the_embedding_is_recentred(compress):
    entry, example, other = _zoo("gpt2-tiny")
    table = entry.model.transformer.wte.weight
    assert entry.model.lm_head.weight is table
    opt, record, _ = _convert(entry.model, example, [other], compress=compress)
    assert record.stats["untied"] == 1
    gm = opt.graph_module
    embedding = next(n for n in ir.op_nodes(gm, ir.aten.embedding) if ir.get_tensor(gm, n.args[0]).shape[0] == 1000)
    new_table = ir.get_tensor(gm, embedding.args[0]).double()
    expected = table.double() - table.double().mean(dim=1, keepdim=True)
    expected = expected[:, :127] if compress else expected
    assert_close(new_table, expected, rtol=1e-5, atol=1e-6)
    head = ir.op_nodes(gm, ir.aten.linear)[-1]
    head_weight = ir.get_tensor(gm, ir.normalized_args(head)["weight"])
    if compress:  # the final norm's gain and the decompression are folded into the head
        gain = entry.model.transformer.ln_f.weight.double()
        folded = table.double() * gain
        assert_close(head_weight.double(), folded[:, :-1] - folded[:, -1:], rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(head_weight, table)
    assert table.data_ptr() == entry.model.lm_head.weight.data_ptr()  # the model itself untouched


# ----------------------------------------------------------------------------- hand-written models


@pytest.mark.parametrize("compress", [False, True], ids=["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize(
    "norm",
    [nn.LayerNorm, lambda d: nn.LayerNorm(d, elementwise_affine=False), lambda d: nn.LayerNorm(d, bias=False)],
    ids=["affine", "no-affine", "no-bias"],
)
def test_layer_norm_with_and_without_affine_parameters(norm, compress):
    model = _perturb(TinyPreLN(norm=norm))
    opt, record, error = _convert(model, _ids(), [_ids()], compress=compress)
    assert error < 1e-5 and record.stats["layer_norms"] == 3 and record.stats["writers_recentred"] == 4
    assert ir.count_ops(opt.graph_module)[LAYER_NORM] == 0
    assert _stream_widths(opt.graph_module) == {15 if compress else 16}


def test_norm_outputs_that_are_not_linear_inputs_are_decompressed_explicitly():
    model = _perturb(TinyPreLN())  # the final norm is the graph output: nothing to fold it into
    opt, _, error = _convert(model, _ids(), [_ids()], compress=True)
    gm = opt.graph_module
    final = next(iter(gm.graph.find_nodes(op="output"))).args[0][0]
    assert ir.is_op(final, ir.aten.add) and error < 1e-5  # cat([x, -sum(x)]) * g + b
    assert len(ir.op_nodes(gm, ir.aten.cat)) == 1 and ir.shape_of(final)[-1] == 16


def test_parallel_attention_and_mlp_form_one_stream():
    class Parallel(nn.Module):
        """GPT-J style: ``h + a(LN(h)) + mlp(LN(h))``, the two branch writes summed one after the other."""

        def __init__(self, d=16):
            super().__init__()
            self.emb, self.ln, self.final = nn.Embedding(50, d), nn.LayerNorm(d), nn.LayerNorm(d)
            self.a, self.up, self.down = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, ids):
            h = self.emb(ids)
            x = self.ln(h)
            return self.final(h + self.a(x) + self.down(torch.relu(self.up(x))))

    _, record, error = _convert(_perturb(Parallel()), _ids(), [_ids()], compress=True)
    assert record.stats == {"streams": 1, "layer_norms": 2, "writers_recentred": 3, "untied": 0} and error < 1e-5


# ----------------------------------------------------------------------------- not applicable


def test_post_ln_bert_is_not_applicable():
    entry = zoo.load("minilm")
    record = assert_not_applicable(LayerNormToRMSNorm(), entry.model, entry.example_inputs, reason_contains="post-LN")
    assert "reads the output of LayerNorm" in record.reason and "linear (aten.linear.default) reads the stream" in record.reason


def test_llama_is_already_rmsnorm():
    entry = zoo.load("llama-tiny")
    opt = graphopt.optimize(entry.model, ["canonicalize", "layernorm_to_rmsnorm"], entry.example_inputs)
    reason = opt.report.record("layernorm_to_rmsnorm").reason
    assert "already RMSNorm" in reason and "no LayerNorm reads it" in reason


def test_raw_residual_stream_as_output_is_not_applicable():
    model = _perturb(TinyPreLN(final_norm=False))
    assert_not_applicable(LayerNormToRMSNorm(), model, _ids(), reason_contains="the raw stream is a graph output")


def test_stream_written_by_a_graph_input_is_not_applicable():
    blocks = nn.Sequential(_Block(16, nn.LayerNorm), _Block(16, nn.LayerNorm), nn.LayerNorm(16)).eval()
    assert_not_applicable(LayerNormToRMSNorm(), blocks, (torch.randn(2, 6, 16),), reason_contains="writer input_1 is a graph input")


def test_reader_that_is_not_a_layer_norm_names_the_node():
    class ReadByLinear(TinyPreLN):
        def forward(self, ids):
            h = self.blocks[0](self.emb(ids))
            return self.final(h + self.blocks[1].fc1(h)[..., : self.d])

    model = _perturb(ReadByLinear())
    assert_not_applicable(LayerNormToRMSNorm(), model, _ids(), reason_contains="reader linear_2 (aten.linear.default) is not a LayerNorm")


def test_writer_read_outside_the_stream_is_not_recentred():
    class Leaky(TinyPreLN):
        def forward(self, ids):
            h = self.emb(ids)
            update = self.blocks[0].fc2(torch.relu(self.blocks[0].fc1(self.blocks[0].norm(h))))
            return self.final(h + update), update

    assert_not_applicable(LayerNormToRMSNorm(), _perturb(Leaky()), _ids(), reason_contains="also read outside the stream")


def test_each_stream_is_analysed_separately():
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre_ln = TinyPreLN()
            self.raw = TinyPreLN(final_norm=False)

        def forward(self, ids):
            return self.pre_ln(ids), self.raw(ids)

    model = _perturb(TwoTowers())
    opt, record, _ = _convert(model, _ids(), [_ids()])
    assert record.stats["streams"] == 1 and record.stats["layer_norms"] == 3
    assert "left 1 stream(s)" in record.reason and "graph output" in record.reason
    assert ir.count_ops(opt.graph_module)[LAYER_NORM] == 2  # the raw tower's pre-norms stay


def test_runs_after_canonicalize_whatever_the_order_given():
    assert [p.name for p in PassManager(["layernorm_to_rmsnorm", "canonicalize"]).passes] == ["canonicalize", "layernorm_to_rmsnorm"]
