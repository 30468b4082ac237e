"""passes="auto": the search's order, its budget on held-out inputs, the saved pipeline, the cache."""

import json

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


CALIBRATION = [padded_batch((24, 17, 9), seed=s) for s in range(6)]
HELD_OUT = [padded_batch((20, 24, 12), seed=s) for s in range(10, 13)]


def cosine(module, model, batches) -> float:
    with torch.no_grad():
        return torch.cat([row_cosines(module(*b), model(*b)) for b in batches]).mean().item()


def flops_time(self, candidates, rounds=None):
    """A timer that is the same on every machine: FLOPs on the timing batches (MFLOP as ms), an
    int8 linear 0.4% cheaper than the graph's mean, so that both families gain something."""
    out = {}
    for name, gm in candidates.items():
        flops = sum(count_flops(gm, a, k) for a, k in self.timing) / 1e6
        int8 = sum(1 for n in gm.graph.nodes if "int8_linear" in str(n.target))
        out[name] = flops * (1 - 0.004 * int8)
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
        first = tune(embedder, CALIBRATION[0], budget=graphopt.MinCosine(0.99), calibration=CALIBRATION, time_limit=300, rounds=3)
        second = tune(embedder, CALIBRATION[0], budget=graphopt.MinCosine(0.99), calibration=CALIBRATION, time_limit=300, rounds=3)
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
    assert result.fidelity >= 0.99 and result.held_out is not None and result.held_out >= 0.99
    optimized = graphopt.optimize(embedder, result.passes, CALIBRATION[0])
    assert cosine(optimized, embedder, HELD_OUT) >= 0.985  # other lengths, other tokens
    approximate = [s["pass"] for s in result.passes if s["pass"] in autotune.FAMILIES]
    assert approximate, f"nothing approximate chosen: {result.table()}"
    # the frontier measured more than the choice, and nothing within budget is faster than it
    within = [p for p in result.frontier if p.fidelity >= 0.99 and (p.held_out is None or p.held_out >= 0.99)]
    assert result.speedup == max(p.speedup for p in within)


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
    result = tune(embedder, CALIBRATION[0], budget=graphopt.MinCosine(0.9), calibration=CALIBRATION, time_limit=300, rounds=3, cache=False)
    options = {s["pass"]: s.get("options", {}) for s in result.passes}
    int8 = set(options.get("quantize_int8", {}).get("layers", []))
    prune = options.get("prune_tokens", {})
    cuts = set(zip(prune.get("layers", []), prune.get("keep_ratio", [])))
    for label, measured in result.knobs.items():
        if measured["gain_ms"] <= 0:
            numbers = [float(x) for x in label.replace("keep", "").split() if x.replace(".", "").isdigit()]
            assert (int(numbers[0]) not in int8) if label.startswith("int8") else ((int(numbers[0]), numbers[1]) not in cuts), label
    assert result.fidelity >= 0.9 and (result.held_out is None or result.held_out >= 0.9)


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
        tune(embedder, CALIBRATION[0], budget=graphopt.MinCosine(0.99), families=("cast_bf16",))


def test_optimize_auto_returns_the_tuned_module_and_leaves_the_model(embedder, deterministic_timer):
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    optimized = graphopt.optimize(embedder, "auto", CALIBRATION[0], calibration=CALIBRATION, budget=graphopt.MinCosine(0.99), time_limit=300)
    assert isinstance(optimized.tuning, TuneResult)
    assert "auto" in optimized.report.final
    assert cosine(optimized, embedder, CALIBRATION) >= 0.99
    for k, v in embedder.state_dict().items():
        assert torch.equal(v, before[k])


def test_budget_outside_auto_and_bad_config_files_are_refused(embedder, tmp_path):
    with pytest.raises(ValueError, match="budget is the search's"):
        graphopt.optimize(embedder, ["canonicalize"], CALIBRATION[0], budget=graphopt.MinCosine(0.9))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"passes": []}))
    with pytest.raises(ValueError, match="not a graphopt pass configuration"):
        graphopt.optimize(embedder, str(bad), CALIBRATION[0])
