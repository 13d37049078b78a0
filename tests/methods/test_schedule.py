"""Gradual pruning: cubic schedule, masks that hold through optimizer steps, LoRA recovery, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.nn.lora_linear import LoRALinear
from llmopt.nn.sparse_linear import SparseLinear
from llmopt.methods.prune.patterns import num_pruned
from llmopt.methods.prune.schedule import GradualPruner, cubic_sparsity
from llmopt.testing import ToyMLP


def _train(model, pruner, steps, *, lr=1e-2, weight_decay=0.1, seed=0, params=None):
    """AdamW with weight decay on a toy regression loss; pruner.step() after each optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    params = params if params is not None else model.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    history = []
    for _ in range(steps):
        x = torch.randn(8, 96, generator=gen)
        loss = (model(x) - 1.0).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if pruner is not None:
            pruner.step()
            history.append({name: mask.clone() for name, mask in pruner.masks.items()})
    return history


# ---------------------------------------------------------------------------------------------- schedule
def test_cubic_values_at_begin_mid_end():
    kw = dict(initial=0.1, final=0.9, begin_step=10, end_step=110)
    assert cubic_sparsity(0, **kw) == 0.1
    assert cubic_sparsity(10, **kw) == 0.1
    # mid-way: s_f + (s_i - s_f) * (1/2)^3 = 0.9 - 0.8 / 8
    assert cubic_sparsity(60, **kw) == pytest.approx(0.8)
    assert cubic_sparsity(110, **kw) == 0.9
    assert cubic_sparsity(10_000, **kw) == 0.9  # held after the end
    # frequency: the value of the last pruning step is held in between.
    assert cubic_sparsity(69, **kw, frequency=20) == cubic_sparsity(50, **kw)
    assert cubic_sparsity(70, **kw, frequency=20) == pytest.approx(0.9 - 0.8 * 0.4 ** 3)
    # one shot
    assert cubic_sparsity(5, final=0.5, begin_step=5, end_step=5) == 0.5


@settings(max_examples=50, deadline=None)
@given(final=st.floats(0.0, 0.99), begin=st.integers(0, 50), length=st.integers(1, 200),
       freq=st.integers(1, 30))
def test_cubic_is_monotone_and_bounded(final, begin, length, freq):
    kw = dict(final=final, begin_step=begin, end_step=begin + length, frequency=freq)
    values = [cubic_sparsity(t, **kw) for t in range(0, begin + length + 5)]
    assert all(0.0 <= v <= final + 1e-12 for v in values)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == final


@pytest.mark.parametrize("kwargs,match", [
    (dict(final=1.0, begin_step=0, end_step=5), "final sparsity"),
    (dict(final=-0.1, begin_step=0, end_step=5), "final sparsity"),
    (dict(initial=0.6, final=0.5, begin_step=0, end_step=5), "exceeds"),
    (dict(final=0.5, begin_step=6, end_step=5), "before begin_step"),
    (dict(final=0.5, begin_step=0, end_step=5, frequency=0), "frequency"),
])
def test_cubic_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cubic_sparsity(1, **kwargs)


# ---------------------------------------------------------------------------------------------- pruner
def test_masks_hold_through_adamw_updates_and_sparsity_is_exact():
    model = ToyMLP()
    pruner = GradualPruner(model, 0.8, begin_step=2, end_step=20, frequency=3)
    history = _train(model, pruner, 25)
    for t, masks in enumerate(history):
        target = pruner.sparsity_at(t) if t >= 2 else 0.0
        for name, mask in masks.items():
            # exact count at every pruning step (scope="layer"): round(N K s_t)
            assert int((~mask).sum()) == num_pruned(mask.numel(), target), (t, name)
    for name, layer in pruner.layers.items():
        mask = pruner.masks[name]
        assert (layer.weight[~mask] == 0).all()  # still exactly zero after the last AdamW step
        assert (layer.weight[mask] != 0).all()
    # masks are nested: once pruned, pruned for good
    for before, after in zip(history, history[1:]):
        for name in before:
            assert not (after[name] & ~before[name]).any()


def test_without_the_pruner_adamw_revives_zeros():
    # The control experiment: zero half the weights once, train with AdamW: they come back.
    model = ToyMLP()
    with torch.no_grad():
        model.up.weight[:, :48] = 0
    _train(model, None, 3)
    assert (model.up.weight[:, :48] != 0).float().mean() > 0.9


def test_mask_gradients_option_zeroes_pruned_gradients():
    model = ToyMLP()
    pruner = GradualPruner(model, 0.5, begin_step=0, end_step=0, mask_gradients=True)
    pruner.step()
    x = torch.randn(4, 96)
    model(x).sum().backward()
    for name, layer in pruner.layers.items():
        assert (layer.weight.grad[~pruner.masks[name]] == 0).all()
        assert (layer.weight.grad[pruner.masks[name]] != 0).any()
    pruner.remove_hooks()


@pytest.mark.parametrize("scope", ["row", "global"])
def test_scopes_give_exact_counts(scope):
    model = ToyMLP()
    pruner = GradualPruner(model, 0.6, begin_step=0, end_step=0, scope=scope)
    pruner.step()
    masks = pruner.masks
    if scope == "row":
        for mask in masks.values():
            assert ((~mask).sum(1) == num_pruned(mask.shape[1], 0.6)).all()
    else:
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == num_pruned(total, 0.6)


def test_2_4_schedule_steps_by_quarters_and_finalizes_to_nm_layout():
    model = ToyMLP()
    pruner = GradualPruner(model, 0.5, begin_step=0, end_step=6, frequency=2, pattern="2:4")
    seen = []
    for _ in range(8):
        pruner.step()
        mask = pruner.masks["up"]
        per_group = (~mask).reshape(mask.shape[0], -1, 4).sum(-1)
        assert (per_group == per_group.flatten()[0]).all()  # same count in every group
        seen.append(int(per_group.flatten()[0]))
    assert seen == sorted(seen) and seen[-1] == 2 and seen[0] == 0
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = model(x)
    layers = pruner.finalize(dtype=torch.bfloat16)
    assert all(layer.nm == (2, 4) for layer in layers.values())
    assert model.up is layers["up"] and isinstance(model.down, SparseLinear)
    with torch.no_grad():  # bf16 values: ~2**-8 relative
        assert torch.allclose(model(x), before, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="finalize"):
        pruner.step()


def test_finalize_converts_to_sparse_linear_and_saves(tmp_path, bit_equal):
    model = ToyMLP()
    pruner = GradualPruner(model, 0.5, begin_step=0, end_step=4, frequency=2, exclude="down")
    _train(model, pruner, 6)
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = model(x)
    layers = pruner.finalize()
    assert set(layers) == {"up"} and isinstance(model.up, SparseLinear) and isinstance(model.down, nn.Linear)
    assert model.up.sparsity() == 0.5 and model.up.nm is None
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-5, atol=1e-6)
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    assert all(bit_equal(v, skeleton.state_dict()[k]) for k, v in model.state_dict().items())


def test_lora_recovery_on_a_pruned_base():
    torch.manual_seed(0)
    model = ToyMLP()
    llmopt.core.targets.set_submodule(model, "up", LoRALinear(model.up, 8, 16.0))
    llmopt.core.targets.set_submodule(model, "down", LoRALinear(model.down, 8, 16.0))
    pruner = GradualPruner(model, 0.7, begin_step=0, end_step=0)
    assert set(pruner.layers) == {"up.base", "down.base"}  # adapters are never pruned
    pruner.step()
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.requires_grad for p in adapters)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)
    a_before = model.up.lora_B.weight.detach().clone()
    _train(model, pruner, 5, params=adapters)
    assert not torch.equal(model.up.lora_B.weight, a_before)  # the adapters trained
    for name, layer in pruner.layers.items():
        assert (layer.weight[~pruner.masks[name]] == 0).all()  # the base zeros stay
    pruner.finalize()
    # Only the bases become sparse; the (dense) adapters stay unmerged beside them.
    assert isinstance(model.up, LoRALinear) and isinstance(model.up.base, SparseLinear)
    assert model.up.base.sparsity() == pytest.approx(0.7, abs=1e-3)
    # Merging would make W + s B A dense again: refused, not silently densified.
    with pytest.raises(TypeError, match="SparseLinear"):
        model.up.merge()


def test_pruner_state_round_trip():
    model = ToyMLP()
    pruner = GradualPruner(model, 0.75, begin_step=1, end_step=9, frequency=2)
    _train(model, pruner, 5)
    state = pruner.state_dict()
    saved = {name: layer.weight.detach().clone() for name, layer in pruner.layers.items()}

    twin_model = ToyMLP()
    twin_model.load_state_dict(model.state_dict())
    twin = GradualPruner(twin_model, 0.75, begin_step=1, end_step=9, frequency=2)
    twin.load_state_dict(state)
    assert twin.step_count == pruner.step_count == 5
    assert twin.current_sparsity == pruner.current_sparsity
    for name in pruner.masks:
        assert torch.equal(twin.masks[name], pruner.masks[name])
        assert torch.equal(twin.layers[name].weight, saved[name])
    # Both continue identically.
    _train(model, pruner, 6, seed=3)
    _train(twin_model, twin, 6, seed=3)
    for name in pruner.masks:
        assert torch.equal(twin.masks[name], pruner.masks[name])
    bad = dict(state, masks={"nope": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not targeted"):
        twin.load_state_dict(bad)


def test_pruner_rejects_bad_input():
    model = ToyMLP()
    with pytest.raises(ValueError, match="final_sparsity"):
        GradualPruner(model, 1.0, begin_step=0, end_step=5)
    with pytest.raises(ValueError, match="means final_sparsity 0.5"):
        GradualPruner(model, 0.7, begin_step=0, end_step=5, pattern="2:4")
    with pytest.raises(ValueError, match="pattern"):
        GradualPruner(model, 0.5, begin_step=0, end_step=5, pattern="4:2")
    with pytest.raises(ValueError, match="scope"):
        GradualPruner(model, 0.5, begin_step=0, end_step=5, scope="model")
    with pytest.raises(ValueError, match="no nn.Linear"):
        GradualPruner(nn.Sequential(nn.ReLU()), 0.5, begin_step=0, end_step=5)
    with torch.no_grad():
        model.up.weight[0, 0] = float("nan")
    pruner = GradualPruner(model, 0.5, begin_step=0, end_step=0)
    with pytest.raises(ValueError, match="'up' has NaN/Inf"):
        pruner.step()
