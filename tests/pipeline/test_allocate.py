"""llmopt.allocate: mixed precision by budget (multiple-choice knapsack over per-layer sensitivities)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt import AWQ, GPTQ, HQQ, RTN
from llmopt.pipeline.allocate import Allocation, allocate, solve_budget
from llmopt.core.measure import memory_report
from llmopt.testing import ToyTransformer

CANDIDATES = [RTN("int2", 32), RTN("int3", 32), RTN("int4", 32)]
EXCLUDE = ["lm_head"]


def toy_loss(model, batch):
    logits = model(batch)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@pytest.fixture
def toy():
    return ToyTransformer(n_layers=2)


@pytest.fixture
def batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (2, 24), generator=gen) for _ in range(3)]


def chosen_cost(a: Allocation) -> int:
    return sum(a.costs[name][a.candidates.index(cfg)] for name, cfg in a.assignments.items())


def check_budget_and_maximal(a: Allocation) -> None:
    """Never over budget, and no single layer could move to a lower-error candidate in what is left."""
    assert a.total_bytes == chosen_cost(a) <= a.budget_bytes
    left = a.budget_bytes - a.total_bytes
    for name, cfg in a.assignments.items():
        k = a.candidates.index(cfg)
        for c, e in zip(a.costs[name], a.errors[name]):
            if c is not None and e < a.errors[name][k]:
                assert c - a.costs[name][k] > left, f"{name}: an upgrade of {c - a.costs[name][k]} B fits in {left} B"


def stored_weight_bytes(model, names) -> int:
    rows = {row.name: row for row in memory_report(model).layers}
    return sum(int(round(rows[n].bits_per_weight * rows[n].num_weights / 8)) for n in names)


def uniform_cost(a: Allocation, cfg) -> tuple:
    k = a.candidates.index(cfg)
    return (sum(a.costs[n][k] for n in a.assignments), sum(a.errors[n][k] for n in a.assignments))


# ---------------------------------------------------------------------------------------------- knapsack
def brute_force(costs, errors, budget):
    best = None
    for pick in itertools.product(*[range(len(row)) for row in costs]):
        c = sum(costs[i][k] for i, k in enumerate(pick))
        if c <= budget:
            e = sum(errors[i][k] for i, k in enumerate(pick))
            best = e if best is None else min(best, e)
    return best


@st.composite
def instances(draw):
    n = draw(st.integers(1, 5))
    costs = [draw(st.lists(st.integers(0, 30), min_size=1, max_size=4)) for _ in range(n)]
    errors = [[draw(st.floats(0, 10, allow_nan=False)) for _ in row] for row in costs]
    low, high = sum(min(r) for r in costs), sum(max(r) for r in costs)
    budget = draw(st.integers(low, high + 3))
    return costs, errors, budget


@settings(max_examples=150, deadline=None)
@given(instances())
def test_solve_budget_matches_brute_force(instance):
    costs, errors, budget = instance
    pick = solve_budget(costs, errors, budget)
    spent = sum(costs[i][k] for i, k in enumerate(pick))
    assert spent <= budget
    assert sum(errors[i][k] for i, k in enumerate(pick)) == pytest.approx(brute_force(costs, errors, budget),
                                                                          abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.sampled_from([4, 64, 4096]))
def test_solve_budget_with_coarse_units(n, seed, where, max_states):
    """Many items, few DP states: within budget, maximal, and at least as good as the exact optimum at
    the budget minus one rounding unit per item (the DP's guarantee)."""
    gen = torch.Generator().manual_seed(seed)
    costs, errors = [], []
    for _ in range(n):
        size = int(torch.randint(100, 5000, (1,), generator=gen))
        bits = [2.5, 3.5, 4.5, 8.25]
        costs.append([int(size * b / 8) for b in bits])
        scale = float(torch.rand(1, generator=gen)) * 10
        errors.append([scale * 4.0 ** -b for b in bits])
    low, high = sum(r[0] for r in costs), sum(r[-1] for r in costs)
    budget = int(low + where * (high - low))
    pick = solve_budget(costs, errors, budget, max_states=max_states)
    spent = sum(costs[i][k] for i, k in enumerate(pick))
    assert spent <= budget
    for i, k in enumerate(pick):  # maximal: no single upgrade to a lower error fits
        for j in range(len(costs[i])):
            if errors[i][j] < errors[i][k]:
                assert costs[i][j] - costs[i][k] > budget - spent
    err = sum(errors[i][k] for i, k in enumerate(pick))
    unit = max(1, -(-(budget - low) // max_states))
    if budget - n * unit >= low:
        exact = solve_budget(costs, errors, budget - n * unit, max_states=1 << 18)  # 1 << 18 > extra: exact
        assert err <= sum(errors[i][k] for i, k in enumerate(exact)) + 1e-12
    exact = solve_budget(costs, errors, budget, max_states=1 << 18)
    assert sum(errors[i][k] for i, k in enumerate(exact)) <= err + 1e-12


def test_solve_budget_errors():
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_budget([[10, 20], [10, 30]], [[1.0, 0.5], [1.0, 0.1]], 19)
    with pytest.raises(ValueError, match="finite"):
        solve_budget([[1]], [[float("nan")]], 5)
    with pytest.raises(ValueError, match="no usable option"):
        solve_budget([[None]], [[None]], 5)
    assert solve_budget([[5, 9, 7]], [[3.0, 1.0, 2.0]], 8) == [2]
    assert solve_budget([[5, None, 7]], [[3.0, None, 3.0]], 8) == [0]  # dominated option never chosen


# ---------------------------------------------------------------------------------------------- allocate
@pytest.mark.parametrize("mode", ["output", "fisher", "kfac", "weight"])
def test_meets_budget_and_beats_uniform(toy, batches, snapshot, mode):
    snap = snapshot(toy)
    a = allocate(toy, candidates=CANDIDATES, target_bits=3.5, calibration=batches, exclude=EXCLUDE,
                 sensitivity=mode, loss_fn=toy_loss, progress=False)
    snap.check()  # the model is not modified
    assert a.sensitivity == mode and set(a.assignments) == {n for n in llmopt.core.targets.find_linears(toy)
                                                            if n != "lm_head"}
    check_budget_and_maximal(a)
    assert a.bits_per_weight == pytest.approx(8 * a.total_bytes / a.num_weights)
    assert a.bits_per_weight <= 3.5
    assert a.estimated_loss == pytest.approx(sum(layer.error for layer in a.layers))
    # at the bytes of uniform int3 g32, at most the uniform error (and really lower: layers differ)
    u_bytes, u_err = uniform_cost(a, RTN("int3", 32))
    b = a.with_budget(target_bytes=u_bytes)
    check_budget_and_maximal(b)
    assert b.estimated_loss <= u_err + 1e-12
    if mode != "weight":  # random toy weights all look alike without data: uniform can be optimal there
        assert b.estimated_loss < u_err
    # at the bytes of a naive half-int4 / half-int2 split (first half of the layers at int4)
    names = list(a.assignments)
    k2, k4 = a.candidates.index(RTN("int2", 32)), a.candidates.index(RTN("int4", 32))
    half = len(names) // 2
    s_bytes = sum(a.costs[n][k4] for n in names[:half]) + sum(a.costs[n][k2] for n in names[half:])
    s_err = sum(a.errors[n][k4] for n in names[:half]) + sum(a.errors[n][k2] for n in names[half:])
    c = a.with_budget(target_bytes=s_bytes)
    assert c.total_bytes <= s_bytes and c.estimated_loss < s_err


def test_more_budget_never_hurts(toy, batches):
    a = allocate(toy, candidates=CANDIDATES + [RTN("int8", None)], target_bits=3.1, calibration=batches,
                 exclude=EXCLUDE, sensitivity="output", progress=False)
    losses = [a.with_budget(target_bits=bits).estimated_loss for bits in (3.1, 3.5, 4.0, 5.0, 8.0, 9.0)]
    assert all(x >= y - 1e-12 for x, y in zip(losses, losses[1:]))
    assert a.with_budget(target_bits=100).summary().keys() == {"rtn int8 channel"}


def test_recipe_applies_exactly(toy, batches):
    cands = CANDIDATES + [GPTQ("int3", 32), HQQ("int2", 32)]
    a = allocate(toy, candidates=cands, target_bits=3.4, calibration=batches, exclude=EXCLUDE,
                 sensitivity="output", progress=False)
    recipe = a.recipe
    from llmopt.pipeline.recipe import Recipe
    assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()
    model = copy.deepcopy(toy)
    report = llmopt.compress_(model, recipe, calibration=batches)
    assert set(report.replaced) == set(a.assignments)
    for name, cfg in a.assignments.items():
        assert report.layer_configs[name] == [cfg.to_dict()], name
    assert stored_weight_bytes(model, a.assignments) == a.total_bytes
    rows = {row.name: row for row in memory_report(model).layers}
    for layer in a.layers:
        assert rows[layer.name].bits_per_weight == pytest.approx(layer.bits_per_weight)
    # the shortcut does the same; RTN/HQQ layers are bit-identical to the measured replacements
    other = copy.deepcopy(toy)
    a.apply_(other, calibration=batches)
    for name, cfg in a.assignments.items():
        if cfg.name != "gptq":
            assert torch.equal(other.get_submodule(name).dequantize_weight(),
                               model.get_submodule(name).dequantize_weight())


def test_auto_mode_and_hf_loss(batches):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    a = allocate(model, candidates=CANDIDATES, target_bits=3.5, calibration=batches, exclude=EXCLUDE,
                 progress=False)
    assert a.sensitivity == "fisher"  # a Hugging Face CausalLM returns a loss given labels
    check_budget_and_maximal(a)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    toy = ToyTransformer(n_layers=1)
    assert allocate(toy, candidates=CANDIDATES, target_bits=3.5, calibration=batches, exclude=EXCLUDE,
                    progress=False).sensitivity == "output"  # no loss: output error


def test_model_without_blocks(batches):
    model = llmopt.testing.ToyMLP()
    x = [torch.randn(4, 96) for _ in range(2)]
    a = allocate(model, candidates=[RTN("int2", 32), RTN("int4", 32)], target_bits=3.5, calibration=x,
                 sensitivity="output", progress=False)
    check_budget_and_maximal(a)
    assert set(a.assignments) == {"up", "down"}


def test_bad_input(toy, batches):
    kw = dict(calibration=batches, exclude=EXCLUDE, progress=False)
    with pytest.raises(ValueError, match="candidates is empty"):
        allocate(toy, candidates=[], target_bits=3.5, **kw)
    with pytest.raises(TypeError, match="list of method configs"):
        allocate(toy, candidates=RTN("int4"), target_bits=3.5, **kw)
    with pytest.raises(ValueError, match="exactly one of target_bits"):
        allocate(toy, candidates=CANDIDATES, **kw)
    with pytest.raises(ValueError, match="exactly one of target_bits"):
        allocate(toy, candidates=CANDIDATES, target_bits=3.5, target_bytes=1000, **kw)
    with pytest.raises(ValueError, match="target_bits must be a positive"):
        allocate(toy, candidates=CANDIDATES, target_bits=-1, **kw)
    with pytest.raises(ValueError, match="below the cheapest candidate in every layer"):
        allocate(toy, candidates=CANDIDATES, target_bits=2.0, **kw)
    with pytest.raises(ValueError, match="needs calibration data"):
        allocate(toy, candidates=[RTN("int4", 32), GPTQ("int3", 32)], target_bits=3.5, exclude=EXCLUDE,
                 sensitivity="weight")
    with pytest.raises(ValueError, match="measures on calibration data"):
        allocate(toy, candidates=CANDIDATES, target_bits=3.5, exclude=EXCLUDE, sensitivity="output")
    with pytest.raises(ValueError, match="block-scope"):
        allocate(toy, candidates=[RTN("int4", 32), AWQ()], target_bits=3.5, **kw)
    with pytest.raises(ValueError, match="sensitivity must be one of"):
        allocate(toy, candidates=CANDIDATES, target_bits=3.5, sensitivity="hessian", **kw)
    with pytest.raises(ValueError, match="needs a loss"):
        allocate(toy, candidates=CANDIDATES, target_bits=3.5, sensitivity="fisher", **kw)
    with pytest.raises(ValueError, match="matches no module"):
        allocate(toy, candidates=CANDIDATES, target_bits=3.5, include=["nope*"], **kw)


def test_layer_error_names_layer(toy, batches):
    toy.layers[1].k_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.k_proj"):
        allocate(toy, candidates=CANDIDATES, target_bits=3.5, calibration=batches, exclude=EXCLUDE,
                 sensitivity="weight", progress=False)


def test_table_and_dict(toy, batches):
    a = allocate(toy, candidates=CANDIDATES, target_bits=3.5, exclude=EXCLUDE, sensitivity="weight",
                 progress=False)
    text = str(a)
    assert "layers.0.q_proj" in text and "bits/weight" in text
    import json
    data = json.loads(json.dumps(a.to_dict()))
    assert data["total_bytes"] == a.total_bytes and len(data["layers"]) == len(a.assignments)
    assert llmopt.allocate is allocate and llmopt.Allocation is Allocation
