"""Pruning criteria, mask patterns, Magnitude and Wanda (SparseGPT: tests/test_sparsegpt.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.core.errors import CompressionError
from llmopt.calibration import LayerStats, StatsSpec
from llmopt.nn.sparse_linear import SparseLinear
from llmopt.methods.prune.criteria import input_norms, magnitude_scores, wanda_scores
from llmopt.methods.prune.magnitude import Magnitude, plan_global_sparsity
from llmopt.core.checks import check_nm
from llmopt.methods.prune.patterns import global_sparsities, parse_pattern, select_mask
from llmopt.methods.prune.wanda import Wanda
from llmopt.testing import ToyMLP, ToyTransformer


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _sparse_layers(model: nn.Module):
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


# ----------------------------------------------------------------------------------------------
# criteria


def test_magnitude_scores_are_abs_weight():
    w = torch.randn(5, 7)
    assert torch.equal(magnitude_scores(w), w.abs())
    assert magnitude_scores(w.double()).dtype == torch.float64
    assert magnitude_scores(w.bfloat16()).dtype == torch.float32


def test_wanda_scores_and_input_norms_match_float64_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 12, generator=gen) * torch.linspace(0.1, 5, 12)
    w = torch.randn(6, 12, generator=gen)
    for spec in (StatsSpec(hessian=False), StatsSpec(hessian=True)):
        stats = LayerStats(12, spec)
        stats.update(x[:2])
        stats.update(x[2:])
        norm = input_norms(stats)
        ref_norm = x.double().reshape(-1, 12).norm(dim=0)
        # float64 sums of squares of float32 inputs: exact to float64 rounding.
        assert torch.allclose(norm.double(), ref_norm, rtol=1e-12, atol=0)
    ref = w.double().abs() * ref_norm[None, :]
    assert torch.allclose(wanda_scores(w, norm).double(), ref, rtol=1e-6, atol=0)  # float32 product


def test_criteria_reject_bad_input():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="NaN/Inf"):
        magnitude_scores(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        magnitude_scores(torch.randn(4))
    with pytest.raises(ValueError, match="in_features"):
        wanda_scores(w, torch.ones(5))
    with pytest.raises(ValueError, match="negative"):
        wanda_scores(w, -torch.ones(6))
    with pytest.raises(ValueError, match="NaN/Inf"):
        wanda_scores(w, torch.full((6,), float("inf")))
    with pytest.raises(ValueError, match="no inputs"):
        input_norms(LayerStats(6, StatsSpec(hessian=False)))
    with pytest.raises(ValueError, match="no inputs"):
        input_norms(None)


# ----------------------------------------------------------------------------------------------
# patterns


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), sparsity=st.floats(0, 0.999),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_select_mask_exact_counts_and_lowest_scores_removed(rows, cols, sparsity, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, cols, generator=gen)
    if ties:
        scores = scores.round()  # many equal scores
    row_mask = select_mask(scores, sparsity, scope="row")
    assert row_mask.dtype == torch.bool and row_mask.shape == scores.shape
    assert (row_mask.sum(dim=1) == cols - _round_half_up(cols * sparsity)).all()
    for r in range(rows):  # every removed score <= every kept score of its row
        kept, gone = scores[r][row_mask[r]], scores[r][~row_mask[r]]
        if kept.numel() and gone.numel():
            assert gone.max() <= kept.min()
    layer_mask = select_mask(scores, sparsity, scope="layer")
    assert int(layer_mask.sum()) == rows * cols - _round_half_up(rows * cols * sparsity)
    kept, gone = scores[layer_mask], scores[~layer_mask]
    if kept.numel() and gone.numel():
        assert gone.max() <= kept.min()
    # deterministic: the same scores give the same masks
    assert torch.equal(select_mask(scores.clone(), sparsity, scope="layer"), layer_mask)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 8),
                                                                              (2, 32)]),
       seed=st.integers(0, 2**16))
def test_select_mask_nm_pattern_holds_in_every_group(rows, groups, nm, seed):
    n, m = nm
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = select_mask(scores, nm=nm)
    g_mask = mask.reshape(rows, groups, m)
    g_scores = scores.reshape(rows, groups, m)
    assert (g_mask.sum(-1) == n).all()
    kept = torch.where(g_mask, g_scores, torch.tensor(float("inf"))).amin(-1)
    gone = torch.where(~g_mask, g_scores, torch.tensor(float("-inf"))).amax(-1)
    assert (gone <= kept).all()
    assert torch.equal(select_mask(scores, nm=f"{n}:{m}"), mask)  # "N:M" string form, same mask


def test_select_mask_breaks_ties_by_index():
    scores = torch.ones(2, 8)
    row = select_mask(scores, 0.25, scope="row")
    assert row[:, :2].logical_not().all() and row[:, 2:].all()  # lower index pruned first
    layer = select_mask(scores, 0.25, scope="layer")
    assert layer[0, :4].logical_not().all() and layer[0, 4:].all() and layer[1].all()
    nm = select_mask(scores, nm=(2, 4))
    assert torch.equal(nm[0], torch.tensor([False, False, True, True] * 2))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_bad_sparsity_is_a_clear_error(sparsity):
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        select_mask(torch.randn(3, 8), sparsity)
    with pytest.raises(ValueError, match="sparsity"):
        Magnitude(sparsity)
    with pytest.raises(ValueError, match="sparsity"):
        Wanda(sparsity)


@pytest.mark.parametrize("nm, message", [((5, 4), "0 < N < M"), ((4, 4), "0 < N < M"), ((0, 4), "0 < N < M"),
                                         ((2, 512), "M must be <= 256"), ("2/4", "look like"), ((2.0, 4), "pair")])
def test_bad_nm_is_a_clear_error(nm, message):
    with pytest.raises(ValueError, match=message):
        check_nm(nm)
    with pytest.raises(ValueError, match=message):
        select_mask(torch.randn(2, 8), nm=nm)


def test_bad_pattern_arguments():
    with pytest.raises(ValueError, match="divisible by 4"):
        select_mask(torch.randn(2, 10), nm=(2, 4))
    with pytest.raises(ValueError, match="pattern 2:4 removes 0.5"):
        select_mask(torch.randn(2, 8), 0.3, nm=(2, 4))
    with pytest.raises(ValueError, match="scope"):
        select_mask(torch.randn(2, 8), 0.5, scope="global")
    with pytest.raises(ValueError, match="NaN"):
        select_mask(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        select_mask(torch.randn(8), 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        select_mask(torch.randn(2, 8))
    with pytest.raises(ValueError, match="unstructured"):
        parse_pattern("dense")
    with pytest.raises(ValueError, match="0 < N < M"):
        Magnitude(pattern="5:4")
    with pytest.raises(ValueError, match="scope"):
        Magnitude(0.5, scope="global")
    with pytest.raises(ValueError, match="N:M"):
        Magnitude(pattern="2:4", sparsities={"up": 0.5})
    with pytest.raises(ValueError, match="sparsities\\['up'\\]"):
        Magnitude(sparsities={"up": 1.0})


def test_select_mask_count_per_row():
    scores = torch.randn(3, 10)
    mask = select_mask(scores, scope="row", count=torch.tensor([0, 3, 10]))
    assert mask.sum(1).tolist() == [10, 7, 0]
    with pytest.raises(ValueError, match="count"):
        select_mask(scores, scope="layer", count=31)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 12)), min_size=1, max_size=4),
       sparsity=st.floats(0, 0.99), seed=st.integers(0, 2**16), ties=st.booleans())
def test_global_sparsities_one_threshold_exact_total(sizes, sparsity, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    scores = {f"l{i}": torch.randn(r, c, generator=gen) * (i + 1) for i, (r, c) in enumerate(sizes)}
    if ties:
        scores = {k: v.round() for k, v in scores.items()}
    plan = global_sparsities(scores, sparsity)
    total = sum(s.numel() for s in scores.values())
    # a layer may lose everything (plan 1.0, which select_mask refuses as a sparsity): use its count
    masks = {k: select_mask(s, scope="layer", count=_round_half_up(plan[k] * s.numel())) for k, s in scores.items()}
    assert all(torch.equal(masks[k], select_mask(s, plan[k], scope="layer")) for k, s in scores.items() if plan[k] < 1)
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == _round_half_up(total * sparsity)
    kept = torch.cat([s[masks[k]] for k, s in scores.items()])
    gone = torch.cat([s[~masks[k]] for k, s in scores.items()])
    if kept.numel() and gone.numel():
        assert gone.max() <= kept.min()  # one threshold for all layers


# ----------------------------------------------------------------------------------------------
# Magnitude


def test_magnitude_on_toy_mlp_exact_density_and_kept_weights():
    model = ToyMLP()
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = llmopt.compress_(model, Magnitude(0.5))
    assert set(report.replaced) == set(dense)
    for name, layer in _sparse_layers(model).items():
        w = dense[name]
        mask = layer.mask()
        assert int((~mask).sum()) == _round_half_up(w.numel() * 0.5)
        assert torch.equal(mask, select_mask(w.abs(), 0.5, scope="layer"))
        assert torch.equal(layer.dequantize_weight(), torch.where(mask, w, torch.zeros(())))
        assert layer.sparsity() == pytest.approx(1 - int(mask.sum()) / w.numel())


@pytest.mark.parametrize("config, check", [
    (Magnitude(0.3, scope="row"), "row"),
    (Magnitude(pattern="2:4"), (2, 4)),
    (Magnitude(pattern="4:8", value_dtype="bfloat16"), (4, 8)),
])
def test_magnitude_row_scope_and_nm(config, check):
    model = ToyMLP()
    llmopt.compress_(model, config)
    for layer in _sparse_layers(model).values():
        mask = layer.mask()
        if check == "row":
            assert (mask.sum(1) == layer.in_features - _round_half_up(layer.in_features * 0.3)).all()
        else:
            n, m = check
            assert (mask.reshape(layer.out_features, -1, m).sum(-1) == n).all()
            assert layer.nm == check


def test_magnitude_global_plan_feeds_per_layer_sparsities():
    model = ToyTransformer()
    plan = plan_global_sparsity(model, 0.5, exclude="lm_head")
    assert "lm_head" not in plan and len(plan) == 14
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in plan}
    total = sum(w.numel() for w in weights.values())
    report = llmopt.compress_(model, Magnitude(sparsities=plan), exclude="lm_head")
    assert set(report.replaced) == set(plan)
    removed = sum(int((~model.get_submodule(name).mask()).sum()) for name in plan)
    assert removed == _round_half_up(total * 0.5)
    # a plan that leaves a layer out keeps it dense, reported as skipped
    model2 = ToyTransformer()
    partial = {k: v for k, v in plan.items() if "layers.0" in k}
    report = llmopt.compress_(model2, Magnitude(sparsities=partial), exclude="lm_head")
    assert set(report.replaced) == set(partial)
    assert all("not in the sparsity plan" in reason for reason in report.skipped.values())
    with pytest.raises(ValueError, match="criterion"):
        plan_global_sparsity(model2, 0.5, criterion="wanda")


def test_magnitude_nan_weight_names_layer_and_leaves_model_untouched(snapshot):
    model = ToyMLP()
    with torch.no_grad():
        model.down.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(CompressionError, match="'down'.*NaN"):
        llmopt.compress_(model, Magnitude(0.5))
    before.check()


def test_magnitude_config_round_trip_with_plan():
    cfg = Magnitude(sparsities={"a.b": 0.25, "c": 0.5})
    assert llmopt.MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(Magnitude(sparsities={"c": 0.5, "a.b": 0.25}))
    assert Magnitude().target_sparsity == 0.5 and Magnitude(pattern="1:4").target_sparsity == 0.75


# ----------------------------------------------------------------------------------------------
# Wanda


def _layer_inputs(model: nn.Module, batches):
    """Inputs of every Linear of the (unmodified) model: {name: [rows, in_features] float64}."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(
        args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_wanda_masks_match_reference_scores(kind, calibration):
    model = ToyMLP() if kind == "mlp" else ToyTransformer()
    batches = calibration(model)
    inputs = _layer_inputs(model, batches)
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    # float propagation: every layer's statistics come from the unpruned model, like the reference
    llmopt.compress_(model, Wanda(0.5, propagate="float"), calibration=batches, exclude="lm_head")
    layers = _sparse_layers(model)
    assert len(layers) == (2 if kind == "mlp" else 14)
    for name, layer in layers.items():
        w = weights[name]
        ref_scores = w.double().abs() * inputs[name].norm(dim=0)[None, :]
        mask = layer.mask()
        assert (mask.sum(1) == w.shape[1] - _round_half_up(w.shape[1] * 0.5)).all()  # per row, exact
        # same mask as the float64 reference scores (scores are far apart: no rounding ties)
        assert torch.equal(mask, select_mask(ref_scores, 0.5, scope="row")), name


def test_wanda_nm_and_quantized_propagation_on_transformer(calibration, toy_input):
    model = ToyTransformer()
    llmopt.compress_(model, Wanda(pattern="2:4"), calibration=calibration(model), exclude="lm_head")
    layers = _sparse_layers(model)
    assert len(layers) == 14
    for layer in layers.values():
        assert (layer.mask().reshape(layer.out_features, -1, 4).sum(-1) == 2).all()
    assert torch.isfinite(model(toy_input(model))).all()


def test_wanda_beats_magnitude_with_outlier_features():
    """Inputs with a few large features (as in LLMs): Wanda keeps the weights those features use."""
    gen = torch.Generator().manual_seed(0)
    k = 64
    scale = torch.ones(k)
    scale[:6] = 20.0
    x = torch.randn(256, k, generator=gen) * scale
    w = torch.randn(32, k, generator=gen)
    stats = LayerStats(k, Wanda.stats_spec())
    stats.update(x)
    wanda = select_mask(wanda_scores(w, input_norms(stats)), 0.5, scope="row")
    mag = select_mask(magnitude_scores(w), 0.5, scope="row")
    err = {name: ((x @ (w * m).T - x @ w.T).norm() / (x @ w.T).norm()).item() for name, m in
           (("wanda", wanda), ("magnitude", mag))}
    assert err["wanda"] < 0.5 * err["magnitude"], err


def test_wanda_needs_calibration_and_uses_cheap_stats(snapshot):
    assert Wanda.needs_calibration and Wanda.stats_spec().hessian is False
    model = ToyMLP()
    before = snapshot(model)
    with pytest.raises(ValueError, match="needs calibration data"):
        llmopt.compress_(model, Wanda(0.5))
    with pytest.raises(ValueError, match="needs calibration data"):
        llmopt.compress_(model, Wanda(0.5), calibration=[])
    before.check()
    with pytest.raises(ValueError, match="propagate"):
        Wanda(propagate="sideways")
