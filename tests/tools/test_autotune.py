"""passes="auto": the search's order, its budget on held-out inputs, the saved pipeline, the cache."""

import json
import re

import pytest
import torch

import graphopt
from graphopt.ir.flops import count_flops
from graphopt.pipeline.verify import row_cosines
from graphopt.tools import autotune
from graphopt.tools.autotune import Knob, TuneResult, load_config, tune
from token_models import padded_batch, tiny_embedder


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def embedder():
    return tiny_embedder(layers=3)


@pytest.fixture(scope="module")
def one_block():
    return tiny_embedder(layers=1)


CALIBRATION = [padded_batch((24, 17, 9), seed=s) for s in range(6)]
HELD_OUT = [padded_batch((20, 24, 12), seed=s) for s in range(10, 13)]


def cosine(module, model, batches) -> float:
    with torch.no_grad():
        return torch.cat([row_cosines(module(*b), model(*b)) for b in batches]).mean().item()


def flops_time(self, candidates, rounds=None):
    """A timer that is the same on every machine: FLOPs on the timing batches (MFLOP as ms), an
    int8 linear 0.4% cheaper than the graph's mean and a bf16 one 0.2%, so that every family gains something."""
    out = {}
    for name, gm in candidates.items():
        gm = gm if isinstance(gm, torch.fx.GraphModule) else self.base  # a peer: eager's FLOPs are the baseline's
        flops = sum(count_flops(gm, a, k) for a, k in self.timing) / 1e6
        int8 = sum(1 for n in gm.graph.nodes if "int8_linear" in str(n.target))
        bf16 = sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten._to_copy.default and n.kwargs.get("dtype") == torch.bfloat16)
        out[name] = flops * (1 - 0.004 * int8 - 0.002 * bf16)
    return out


@pytest.fixture
def deterministic_timer(monkeypatch):
    monkeypatch.setattr(autotune._Measurer, "time", flops_time)


@pytest.fixture(scope="module")
def tuned(embedder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        mp.setattr(autotune._Measurer, "time", flops_time)
        first = tune(embedder, CALIBRATION[0], budget=graphopt.MinCosine(0.999), calibration=CALIBRATION, time_limit=300, rounds=3)
        second = tune(embedder, CALIBRATION[0], budget=graphopt.MinCosine(0.999), calibration=CALIBRATION, time_limit=300, rounds=3)
    return first, second


def test_hull_steps_follow_the_upper_convex_hull():
    k = {r: Knob("prune_tokens", 2, r) for r in (0.9, 0.8, 0.7, 0.5)}
    options = [(k[0.9], 0.01, 5.0), (k[0.8], 0.05, 4.0), (k[0.7], 0.03, 12.0), (k[0.5], 0.2, 14.0)]
    steps = autotune._hull_steps(options)
    assert [s[0] for s in steps] == [k[0.9], k[0.7], k[0.5]]  # 0.8 is dominated by 0.7
    assert steps[1][1:] == pytest.approx((0.02, 7.0)) and steps[2][1:] == pytest.approx((0.17, 2.0))
    assert autotune._hull_steps([(k[0.9], 0.01, -1.0)]) == []  # slower: never a step


def test_order_interleaves_layers_by_gain_per_loss_and_later_steps_replace():
    a9, a5, b = Knob("prune_tokens", 0, 0.9), Knob("prune_tokens", 0, 0.5), Knob("quantize_int8", 3)
    order = autotune._order({a9: (0.01, 10.0), a5: (0.11, 12.0), b: (0.001, 0.5)})
    assert [s[0] for s in order] == [a9, b, a5]  # ratios 1000, 500, 20
    knobs, loss = autotune._prefix(order, 3)
    assert set(knobs) == {a5, b} and loss == pytest.approx(0.111)


def test_specs_are_canonical_pass_specs():
    specs = autotune._specs([Knob("quantize_int8", 4), Knob("prune_tokens", 2, 0.7), Knob("quantize_int8", 1)])
    assert specs[0] == {"pass": "prune_tokens", "options": {"keep_ratio": [0.7], "layers": [2], "min_cosine": 0.0}}
    assert specs[1]["options"]["layers"] == [1, 4] and specs[1]["options"]["require_speedup"] is False
    assert [graphopt.pass_spec(graphopt.make_pass(s)) for s in specs] == specs


def test_choice_meets_the_budget_on_inputs_it_never_saw(embedder, tuned):
    result, _ = tuned
    assert result.frontier[0].knobs == 0 and len(result.frontier) >= 3
    assert result.fidelity >= 0.999 and result.held_out is not None and result.held_out >= 0.999
    optimized = graphopt.optimize(embedder, result.passes, CALIBRATION[0])
    assert cosine(optimized, embedder, HELD_OUT) >= 0.995  # other lengths, other tokens
    # the search's own held-out batches: the budget holds with two standard errors to spare
    with torch.no_grad():
        rows = torch.cat([row_cosines(optimized(*b), embedder(*b)) for b in CALIBRATION[2::3]])
    assert rows.mean() - 2 * rows.std() / len(rows) ** 0.5 >= 0.999
    approximate = [s["pass"] for s in result.passes if s["pass"] in autotune.FAMILIES]
    assert approximate, f"nothing approximate chosen: {result.table()}"
    # the frontier measured more than the choice, and nothing within budget is faster than it
    within = [p for p in result.frontier if p.fidelity >= 0.999 and (p.held_out is None or p.held_out >= 0.999)]
    assert result.speedup == max(p.speedup for p in within)
    assert result.settings and f"chosen: {autotune.describe_settings(result.settings)}" in result.summary()


def test_saved_pipeline_reproduces_the_same_graph(embedder, tuned, tmp_path):
    result, _ = tuned
    path = result.save(tmp_path / "passes.json")
    assert load_config(path) == result.passes and json.loads(path.read_text())["budget"] == result.budget
    direct = graphopt.optimize(embedder, result.passes, CALIBRATION[0])
    from_file = graphopt.optimize(embedder, str(path), CALIBRATION[0])
    assert from_file.graph_module.code == direct.graph_module.code
    for batch in HELD_OUT:
        torch.testing.assert_close(from_file(*batch), direct(*batch), rtol=0, atol=0)


def test_second_search_reads_every_knob_from_the_cache(tuned):
    first, second = tuned
    assert first.cached == 0 and second.cached >= len(first.knobs)
    assert second.knobs == first.knobs


def test_measured_times_never_choose_a_slower_setting(embedder):
    # real timing on this machine: whatever it measures, a knob that saved no time is not chosen
    families = ("quantize_int8", "prune_tokens")  # one family timed in groups, one timed knob by knob
    result = tune(embedder, CALIBRATION[0], budget=graphopt.MinCosine(0.9), calibration=CALIBRATION, families=families, time_limit=300, rounds=3, cache=False)
    slower = {label for label, measured in result.knobs.items() if measured["gain_ms"] is None or measured["gain_ms"] <= 0}
    assert not slower & set(result.settings), result.summary()
    assert result.fidelity >= 0.9 and (result.held_out is None or result.held_out >= 0.9)


def test_one_choice_per_slot_and_pruning_or_merging_not_both(tuned):
    result, _ = tuned
    for point in result.frontier:
        # "int8 linear 3" / "smooth+int8 linear 3" / "bf16 linear 3" share a slot; so do the token cuts after one attention
        slots = [(" linear " in label, re.search(r"\s(\d+)(\s|$)", label).group(1)) for label in point.settings]
        assert len(slots) == len(set(slots)), point.settings
        assert not {"prune_tokens", "merge_tokens"} <= {s["pass"] for s in point.passes}
    # both token families were measured; the one that saves less within the budget is left out, with the reason
    assert any(label.startswith("prune") for label in result.knobs) and any(label.startswith("merge") for label in result.knobs)
    assert any("does not combine" in note for note in result.notes)


def test_smooth_quant_is_tried_where_int8_costs_the_most(tuned):
    result, _ = tuned
    int8 = {label.split()[-1]: k["loss"] for label, k in result.knobs.items() if label.startswith("int8 linear")}
    smooth = {label.split()[-1] for label in result.knobs if label.startswith("smooth+int8 linear")}
    worst = sorted(int8, key=int8.get, reverse=True)[: len(int8) // 3]
    assert smooth == set(worst)
    # SmoothQuant's scales are exact and absorbed by the int8 op: its gain is int8's
    for layer in smooth:
        assert result.knobs[f"smooth+int8 linear {layer}"]["gain_ms"] == result.knobs[f"int8 linear {layer}"]["gain_ms"]


def test_bf16_enters_by_capability_as_one_precision_per_linear(one_block, deterministic_timer, monkeypatch):
    from graphopt.ops.platform import cpu_capabilities
    from graphopt.passes import cast_bf16

    if not cpu_capabilities().native_bf16:  # without native bf16 the family is left out, with the pass's reason
        result = tune(one_block, CALIBRATION[0], budget=graphopt.MinCosine(0.99), calibration=CALIBRATION[:3], families=("cast_bf16",), cache=False)
        assert any(note.startswith("cast_bf16 left out: ") and "no native bf16" in note for note in result.notes)
        assert result.passes == [{"pass": name} for name in graphopt.default_pass_names()]
    # a CPU with native bf16 that measures it faster (as the pass's own check would find)
    monkeypatch.setattr(cast_bf16, "cpu_capabilities", lambda: type("Caps", (), {"native_bf16": True, "describe": lambda self: "bf16 CPU"})())
    monkeypatch.setattr(cast_bf16, "bf16_speedup", lambda m, n, k: 2.0)
    result = tune(one_block, CALIBRATION[0], budget=graphopt.MinCosine(0.99), calibration=CALIBRATION[:3], families=("quantize_int8", "cast_bf16"), cache=False)
    assert any(label.startswith("bf16 linear") for label in result.knobs)
    passes = {s["pass"]: s.get("options", {}) for s in result.passes}
    bf16, int8 = set(passes.get("cast_bf16", {}).get("layers", [])), set(passes.get("quantize_int8", {}).get("layers", []))
    assert int8 and not bf16 & int8
    optimized = graphopt.optimize(one_block, result.passes, CALIBRATION[0])
    assert cosine(optimized, one_block, HELD_OUT) >= 0.985


def test_linear_attention_is_searched_when_asked(one_block, deterministic_timer):
    result = tune(one_block, CALIBRATION[0], budget=graphopt.MinCosine(0.9), calibration=CALIBRATION[:3], families=("attention_to_linear",), cache=False)
    assert sorted(label for label in result.knobs if label.startswith("linear attention")) == ["linear attention 0"]
    assert all(0 < k["loss"] < 0.5 for k in result.knobs.values())


def test_peers_are_measured_beside_the_choice(one_block, deterministic_timer):
    result = tune(
        one_block, CALIBRATION[0], budget=graphopt.MinCosine(0.99), calibration=CALIBRATION[:3], families=("quantize_int8",), peers=("eager",), cache=False
    )
    assert set(result.peers) == {"eager", "exact passes", "auto"}
    assert result.peers["eager"]["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert result.peers["auto"]["fidelity"] == result.fidelity
    assert "vs eager" in result.peer_table() and "eager" in result.peer_table()
    with pytest.raises(ValueError, match="unknown peers"):
        tune(one_block, CALIBRATION[0], budget=graphopt.MinCosine(0.99), peers=("tensorrt",))


def test_a_budget_nothing_approximate_meets_keeps_the_exact_passes(embedder, deterministic_timer):
    # the mildest cut here costs about 2e-3 of cosine
    budget = graphopt.MinCosine(0.999)
    result = tune(embedder, CALIBRATION[0], budget=budget, calibration=CALIBRATION, families=("prune_tokens",), time_limit=300, cache=False)
    assert min(k["loss"] for k in result.knobs.values()) > 1e-3
    assert result.passes == [{"pass": name} for name in graphopt.default_pass_names()]
    assert any("exact passes only" in note for note in result.notes)


def test_exact_budget_and_unknown_family_are_refused(embedder):
    with pytest.raises(ValueError, match="approximate budget"):
        tune(embedder, CALIBRATION[0], budget=graphopt.Exact())
    with pytest.raises(ValueError, match="unknown families"):
        tune(embedder, CALIBRATION[0], budget=graphopt.MinCosine(0.99), families=("fp4",))


def test_optimize_auto_returns_the_tuned_module_and_leaves_the_model(one_block, deterministic_timer):
    before = {k: v.clone() for k, v in one_block.state_dict().items()}
    optimized = graphopt.optimize(one_block, "auto", CALIBRATION[0], calibration=CALIBRATION[:3], budget=graphopt.MinCosine(0.99), time_limit=300)
    assert isinstance(optimized.tuning, TuneResult)
    assert "auto" in optimized.report.final
    assert cosine(optimized, one_block, CALIBRATION) >= 0.99
    for k, v in one_block.state_dict().items():
        assert torch.equal(v, before[k])


def test_budget_outside_auto_and_bad_config_files_are_refused(embedder, tmp_path):
    with pytest.raises(ValueError, match="budget is the search's"):
        graphopt.optimize(embedder, ["canonicalize"], CALIBRATION[0], budget=graphopt.MinCosine(0.9))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"passes": []}))
    with pytest.raises(ValueError, match="not a graphopt pass configuration"):
        graphopt.optimize(embedder, str(bad), CALIBRATION[0])
