"""graphopt.tools.token_recovery: a short self-distillation raises the fidelity of a token-reduced model."""

import pytest
import torch

import graphopt
from graphopt.passes.merge_tokens import MergeTokens
from graphopt.passes.prune_tokens import PruneTokens
from graphopt.tools.token_recovery import recover
from token_models import padded_batch, tiny_embedder

pytest.importorskip("transformers")


def _fidelity(opt, model, batches) -> float:
    with torch.no_grad():
        return float(torch.cat([torch.nn.functional.cosine_similarity(opt(*b), model(*b)) for b in batches]).mean())


def test_recovery_raises_held_out_fidelity_and_keeps_the_ops():
    model = tiny_embedder()
    reduction = PruneTokens(keep_ratio=0.3, layers=(0, 1), min_cosine=0.0)  # zero-shot about 0.84 on held-out batches
    train = [padded_batch(seed=s) for s in range(4)]
    held_out = [padded_batch(lengths=(20, 13, 24), seed=s) for s in range(10, 13)]
    opt = graphopt.optimize(model, ["canonicalize", reduction], train[0])
    before_ops = [n.target for n in opt.graph_module.graph.nodes]
    before = _fidelity(opt, model, held_out)
    history = recover(opt.graph_module, model, train, 40, lr=1e-3)
    after = _fidelity(opt, model, held_out)
    assert after > before + 0.02, (before, after)
    assert history.fidelity[-1] > history.fidelity[0]
    assert [n.target for n in opt.graph_module.graph.nodes] == before_ops
    assert not any(p.requires_grad for p in opt.graph_module.parameters())
    # the original keeps its weights
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, tiny_embedder().bert.encoder.layer[0].attention.self.query.weight)


def test_recovery_refuses_a_graph_without_reduction():
    model = tiny_embedder(layers=1)
    opt = graphopt.optimize(model, ["canonicalize"], padded_batch())
    with pytest.raises(ValueError, match="no token reduction"):
        recover(opt.graph_module, model, [padded_batch()], 1)


def test_recovery_trains_through_merged_tokens():
    """Gradients reach the weights through merge_tokens and proportional attention: the training fidelity rises."""
    model = tiny_embedder()
    train = [padded_batch(seed=s) for s in range(2)]
    opt = graphopt.optimize(model, ["canonicalize", MergeTokens(r=8, min_cosine=0.0)], train[0])
    weight = opt.graph_module.get_parameter(next(n for n, _ in opt.graph_module.named_parameters() if "query" in n)).clone()
    history = recover(opt.graph_module, model, train, 20, lr=1e-3)
    assert history.fidelity[-1] > history.fidelity[0]
    assert not torch.equal(weight, opt.graph_module.get_parameter(next(n for n, _ in opt.graph_module.named_parameters() if "query" in n)))
