"""Budgets and output comparison."""

import math

import pytest
import torch

from graphopt.pipeline.verify import Exact, MinAgreement, MinCosine, compare, intersect_masks, relative_error, resolve_masks


def test_relative_error_is_relative_to_output_scale():
    ref = torch.tensor([100.0, -200.0, 50.0], dtype=torch.float64)
    out = ref + torch.tensor([0.0, 0.002, 0.0], dtype=torch.float64)
    assert math.isclose(relative_error(out, ref), 0.002 / 200.0, rel_tol=1e-9)


def test_exact_budget_accepts_rounding_and_rejects_real_change():
    ref = {"a": torch.randn(4, 8), "b": (torch.randn(3), torch.tensor([1, 2]))}
    near = {"a": ref["a"] * (1 + 1e-7), "b": (ref["b"][0].clone(), ref["b"][1].clone())}
    assert compare(near, ref, Exact()).ok
    off = {"a": ref["a"].clone(), "b": (ref["b"][0] + 0.1, ref["b"][1].clone())}
    check = compare(off, ref, Exact())
    assert not check.ok and check.value > 1e-3 and "output 1" in check.detail


def test_integer_outputs_must_be_equal():
    ref = (torch.tensor([1, 2, 3]),)
    assert not compare((torch.tensor([1, 2, 4]),), ref, Exact()).ok
    assert compare((torch.tensor([1, 2, 3]),), ref, Exact()).ok


def test_structure_and_shape_mismatches_fail():
    assert not compare((torch.zeros(2),), (torch.zeros(2), torch.zeros(2)), Exact()).ok
    check = compare((torch.zeros(3),), (torch.zeros(2),), Exact())
    assert not check.ok and "shape" in check.detail


def test_nan_is_never_within_budget():
    ref = torch.ones(3)
    assert not compare(torch.tensor([1.0, float("nan"), 1.0]), ref, Exact()).ok


def test_min_cosine_budget():
    ref = torch.randn(16, 32)
    scaled = ref * 3.0  # same directions
    assert compare(scaled, ref, MinCosine(0.9999)).ok
    noisy = ref + 2.0 * torch.randn(16, 32)
    check = compare(noisy, ref, MinCosine(0.99))
    assert not check.ok and check.metric == "cosine" and check.value < 0.99


def test_masks_restrict_the_comparison():
    ref = torch.zeros(2, 4, 3)
    out = ref.clone()
    out[1, 3] = 7.0  # a "pad" position
    valid = torch.ones(2, 4, 1, dtype=torch.bool)
    valid[1, 3] = False
    assert not compare(out, ref, Exact()).ok
    assert compare(out, ref, Exact(), masks=[valid]).ok
    assert compare(out, ref, Exact(), masks=lambda i, r: valid).ok


def test_intersect_masks_keeps_positions_both_compare():
    rows = torch.tensor([True, True, False])[:, None]  # [3, 1]
    cols = torch.tensor([True, False])[None, :]  # [1, 2]
    both = intersect_masks([rows, None], [cols, None])
    assert both[1] is None and both[0].tolist() == [[True, False], [True, False], [False, False]]
    assert intersect_masks(None, [rows, None])[0] is rows and intersect_masks(None, None) is None


def test_resolve_masks_calls_a_mask_function_per_tensor_leaf():
    ref = (torch.zeros(2, 3), 7)
    resolved = resolve_masks(lambda i, r: r.new_ones(r.shape[0], 1, dtype=torch.bool), ref)
    assert resolved[0].shape == (2, 1) and resolved[1] is None
    with pytest.raises(ValueError, match="1 masks for 2 outputs"):
        resolve_masks([None], ref)


def test_min_agreement_counts_rows_whose_top_class_matches():
    ref = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    out = ref.clone()
    out[2] = torch.tensor([0.6, 0.3, 0.1])  # one of four rows changes its class
    budget = MinAgreement(0.75)
    assert budget.measure(out, ref) == pytest.approx(0.75)
    assert budget.within(0.75) and not MinAgreement(0.8).within(budget.measure(out, ref))
    assert budget.worst([0.9, 0.75]) == 0.75 and "top-1 agreement >= 0.75" in budget.describe()


def test_budget_rows_average_to_the_measure():
    out, ref = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    for budget in (MinCosine(0.9), MinAgreement(0.9), Exact()):
        rows = budget.rows(out, ref)
        assert rows.shape == (15,) and rows.mean().item() == pytest.approx(budget.measure(out, ref))
    assert set(MinAgreement(0.9).rows(out, ref).tolist()) <= {0.0, 1.0}
