"""Structured pruning (PruneChannels, PruneHeads applied by llmopt.compress_): smaller nn.Linears, coupled MLP
channels and GQA head groups, config, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.methods.prune.structured import (
    AttentionGroup,
    MLPGroup,
    PruneChannels,
    PruneHeads,
    StructuredReport,
    _adaptive_keep,
    _collect,
    _uniform_keep,
    channel_importance,
    find_groups,
    head_importance,
)
from llmopt.testing import ToyTransformer

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

TOL = 1e-12  # float64 forwards of the same maths, summed in a different order


def _prune(model, config, calibration=None) -> StructuredReport:
    """``llmopt.compress_`` with a structured config; returns the method's own report (``report.details``)."""
    report = llmopt.compress_(model, config, calibration=calibration)
    assert report.methods == [config.to_dict()] and set(report.layer_configs) == set(report.replaced)
    assert len(report.details) == 1 and isinstance(report.details[0], StructuredReport)
    return report.details[0]


def _llama(heads: int = 8, kv: int = 2, inter: int = 160, layers: int = 2,
           dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _ids(vocab: int = 96, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _linear_params(model) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear)
               for p in m.parameters(recurse=False))


def _zero_channels(model, groups, channels):
    """Zero MLP channels ``channels`` (rows of the producers, columns of the consumer) in every block."""
    with torch.no_grad():
        for b in groups:
            block = model.get_submodule(b.name)
            for g in b.mlp:
                for n in g.inputs:
                    block.get_submodule(n).weight[channels] = 0
                block.get_submodule(g.output).weight[:, channels] = 0


def _zero_kv_groups(model, groups, kv_groups):
    with torch.no_grad():
        for b in groups:
            block = model.get_submodule(b.name)
            for a in b.attention:
                rep, d = a.num_heads // a.num_kv_heads, a.head_dim
                for g in kv_groups:
                    block.get_submodule(a.k).weight[g * d:(g + 1) * d] = 0
                    block.get_submodule(a.v).weight[g * d:(g + 1) * d] = 0
                    block.get_submodule(a.q).weight[g * rep * d:(g + 1) * rep * d] = 0
                    block.get_submodule(a.o).weight[:, g * rep * d:(g + 1) * rep * d] = 0


# ---------------------------------------------------------------------------------------------------
# Coupling discovery
# ---------------------------------------------------------------------------------------------------
def test_discovery_on_llama_and_toy():
    groups = find_groups(_llama())
    assert [b.name for b in groups] == ["model.layers.0", "model.layers.1"]
    mlp, att = groups[0].mlp[0], groups[0].attention[0]
    assert mlp.inputs == ("mlp.gate_proj", "mlp.up_proj") and mlp.output == "mlp.down_proj"
    assert (att.q, att.k, att.v, att.o) == tuple(f"self_attn.{n}_proj" for n in "qkvo")
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (8, 2, 8)
    toy = find_groups(ToyTransformer())[1]
    assert toy.mlp[0].output == "down_proj" and toy.attention[0].o == "o_proj"
    assert (toy.attention[0].num_heads, toy.attention[0].num_kv_heads) == (4, 2)
    # multi-head attention: q/k/v/o all square, o picked by name
    mha = find_groups(_llama(heads=4, kv=4))[0].attention[0]
    assert mha.o == "self_attn.o_proj" and mha.num_kv_heads == 4


def test_gpt2_conv1d_is_a_clear_error(snapshot):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="Conv1D"):
        llmopt.compress_(model, PruneChannels(0.25))
    snap.check()


# ---------------------------------------------------------------------------------------------------
# Exactness: removing zeroed channels / heads changes nothing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["toy", "llama"])
def test_removing_zeroed_mlp_channels_keeps_output(kind):
    model = ToyTransformer().double() if kind == "toy" else _llama()
    groups = find_groups(model)
    n = model.get_submodule(f"{groups[0].name}.{groups[0].mlp[0].output}").in_features
    drop = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 4]
    _zero_channels(model, groups, drop)
    ids = _ids(128 if kind == "toy" else 96)
    ref = _logits(model, ids)
    report = _prune(model, PruneChannels(len(drop) / n))
    assert torch.allclose(_logits(model, ids), ref, rtol=0, atol=TOL)
    for b in groups:
        assert report.blocks[b.name]["kept"] == n - len(drop)
        down = model.get_submodule(f"{b.name}.{b.mlp[0].output}")
        assert type(down) is nn.Linear and down.in_features == n - len(drop)
        assert down.weight.dtype == torch.float64


@pytest.mark.parametrize("kind", ["toy", "llama", "llama_mha"])
def test_removing_zeroed_kv_groups_keeps_output(kind):
    model = {"toy": lambda: ToyTransformer().double(), "llama": lambda: _llama(heads=8, kv=4),
             "llama_mha": lambda: _llama(heads=4, kv=4)}[kind]()
    groups = find_groups(model)
    _zero_kv_groups(model, groups, [1] if kind == "toy" else [0, 2])
    ids = _ids(128 if kind == "toy" else 96)
    ref = _logits(model, ids)
    _prune(model, PruneHeads(0.5))
    assert torch.allclose(_logits(model, ids), ref, rtol=0, atol=TOL)


def test_gqa_groups_stay_consistent():
    """Each kv head leaves with exactly its query heads and their o columns."""
    model = _llama(heads=8, kv=4)
    att = model.model.layers[0].self_attn
    with torch.no_grad():  # make kv groups 3 and 1 the weakest, by a wide margin
        for g, scale in ((3, 1e-3), (1, 1e-2)):
            att.k_proj.weight[g * 8:(g + 1) * 8] *= scale
            att.v_proj.weight[g * 8:(g + 1) * 8] *= scale
            att.q_proj.weight[g * 16:(g + 1) * 16] *= scale
            att.o_proj.weight[:, g * 16:(g + 1) * 16] *= scale
    orig = {n: getattr(att, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    _prune(model, PruneHeads(ratios={0: 0.5}))
    att = model.model.layers[0].self_attn
    kept = [0, 2]
    q_rows = torch.cat([torch.arange(g * 16, (g + 1) * 16) for g in kept])
    kv_rows = torch.cat([torch.arange(g * 8, (g + 1) * 8) for g in kept])
    assert torch.equal(att.q_proj.weight, orig["q_proj"][q_rows])
    assert torch.equal(att.k_proj.weight, orig["k_proj"][kv_rows])
    assert torch.equal(att.v_proj.weight, orig["v_proj"][kv_rows])
    assert torch.equal(att.o_proj.weight, orig["o_proj"][:, q_rows])
    assert att.num_key_value_groups == 2  # H/KV unchanged: repeat_kv still right
    # block 1 untouched; per-block head counts differ, so the config keeps the original layout
    assert model.model.layers[1].self_attn.q_proj.out_features == 64
    assert model.config.num_attention_heads == 8
    out = model.generate(_ids()[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


# ---------------------------------------------------------------------------------------------------
# Params, config, HF generate and save/reload
# ---------------------------------------------------------------------------------------------------
def test_params_fall_exactly_and_config_follows(tmp_path):
    model = _llama(dtype=torch.float32)
    before = _linear_params(model)
    hidden, inter = 64, 160
    report = _prune(model, PruneChannels(0.25, round_to=8))
    keep = 120
    assert _linear_params(model) == before - 2 * 3 * hidden * (inter - keep)
    assert report.linear_params_before == before and report.linear_params_after == _linear_params(model)
    report_h = _prune(model, PruneHeads(0.5))
    # kv groups 2 -> 1 per block... (heads 8 -> 4, kv 2 -> 1, head_dim 8)
    assert _linear_params(model) == report.linear_params_after - 2 * (2 * 32 * hidden + 2 * 8 * hidden)
    assert report_h.removed_fraction > 0
    cfg = model.config
    layout = (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert layout == (120, 4, 1, 8)
    assert model.model.layers[0].mlp.intermediate_size == 120
    ids = _ids()[:1, :5]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    # Hugging Face round trip: the updated config rebuilds the pruned shapes
    model.save_pretrained(tmp_path / "hf")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(again, ids), _logits(model, ids))


def test_llmopt_save_load_round_trip_uniform_and_per_block(tmp_path, bit_equal):
    model = _llama(dtype=torch.float32)
    _prune(model, PruneChannels(ratios={0: 0.25, 1: 0.5}))  # per-block widths: config cannot say it
    _prune(model, PruneHeads(ratios={1: 0.5}))
    assert model.config.intermediate_size == 160
    llmopt.save(model, tmp_path / "m")
    skeleton = _llama(dtype=torch.float32)  # fresh, original shapes (HF's rotary buffers need a real device)
    loaded = llmopt.load(skeleton, tmp_path / "m")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and bit_equal(a, b), k
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    # saved again from the loaded model: the record travels
    llmopt.save(loaded, tmp_path / "m2")
    resized = llmopt.io.read_manifest(tmp_path / "m")["resized"]
    assert llmopt.io.read_manifest(tmp_path / "m2")["resized"] == resized
    assert resized["linears"]["model.layers.1.mlp.down_proj"] == [64, 80, False]


def test_toy_save_load_restores_head_attributes(tmp_path):
    model = ToyTransformer().double()
    _prune(model, PruneHeads(0.5))
    _prune(model, PruneChannels(0.3))
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyTransformer()
    loaded = llmopt.load(skeleton, tmp_path)
    assert loaded.layers[0].n_heads == 2 and loaded.layers[0].n_kv_heads == 1
    ids = _ids(128)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_failed_load_puts_skeleton_layers_back(tmp_path):
    model = ToyTransformer()
    _prune(model, PruneHeads(0.5))
    llmopt.save(model, tmp_path)
    skeleton = ToyTransformer(vocab=64)  # wrong vocab: the state dict does not fit
    modules = dict(skeleton.named_modules())
    with pytest.raises(RuntimeError):
        llmopt.load(skeleton, tmp_path)
    # the resized Linears and the head-count attributes are put back (parameter values are io's concern)
    assert all(m is modules[n] for n, m in skeleton.named_modules())
    assert skeleton.layers[0].n_heads == 4 and skeleton.layers[0].n_kv_heads == 2
    assert skeleton.layers[0].q_proj.out_features == 64


# ---------------------------------------------------------------------------------------------------
# Importance criteria and adaptive ratios
# ---------------------------------------------------------------------------------------------------
def _consumer_inputs(model, name, batches):
    xs = []
    def hook(m, a):
        xs.append(a[0].detach().reshape(-1, m.in_features))
    h = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat(xs).double()


def test_activation_aware_importance_matches_reference():
    model = ToyTransformer().double()
    batches = [_ids(128, s) for s in range(3)]
    groups = find_groups(model)
    g = groups[0].mlp[0]
    x = _consumer_inputs(model, "layers.0.down_proj", batches)
    down = model.layers[0].down_proj.weight.double()
    stats = _collect(model, batches, ["layers.0.down_proj", "layers.0.o_proj"], need_sum=True)
    ins = [model.layers[0].gate_proj, model.layers[0].up_proj]
    wanda = channel_importance(ins, model.layers[0].down_proj, "wanda", stats["layers.0.down_proj"])
    assert torch.allclose(wanda, down.abs().sum(0) * x.norm(dim=0), rtol=1e-10)
    flap = channel_importance(ins, model.layers[0].down_proj, "fluctuation", stats["layers.0.down_proj"])
    assert torch.allclose(flap, x.var(dim=0, unbiased=False) * down.pow(2).sum(0), rtol=1e-8, atol=1e-14)
    mag = channel_importance(ins, model.layers[0].down_proj, "magnitude")
    ref = (down.pow(2).sum(0) + sum(m.weight.double().pow(2).sum(1) for m in ins)).sqrt()
    assert torch.allclose(mag, ref, rtol=1e-12)
    # heads: per kv group sums of the o columns of its query heads
    a = groups[0].attention[0]
    xo = _consumer_inputs(model, "layers.0.o_proj", batches)
    wo = model.layers[0].o_proj.weight.double()
    hw = head_importance(*(model.layers[0].get_submodule(n) for n in (a.q, a.k, a.v, a.o)), a, "wanda",
                         stats["layers.0.o_proj"])
    per_col = wo.abs().sum(0) * xo.norm(dim=0)
    assert torch.allclose(hw, per_col.reshape(2, -1).sum(1), rtol=1e-10)
    del g


@pytest.mark.parametrize("importance", ["wanda", "fluctuation"])
def test_prune_with_calibration_runs_and_keeps_zeroed_exactness(importance):
    model = ToyTransformer().double()
    groups = find_groups(model)
    drop = torch.arange(0, 176, 4)  # 44 channels: zero scores under both criteria
    _zero_channels(model, groups, drop)
    ids = _ids(128)
    ref = _logits(model, ids)
    _prune(model, PruneChannels(44 / 176, importance=importance), calibration=[_ids(128, s) for s in range(2)])
    assert torch.allclose(_logits(model, ids), ref, rtol=0, atol=TOL)


def test_adaptive_keeps_overall_ratio_and_floor():
    model = ToyTransformer(n_layers=3).double()
    with torch.no_grad():  # block 1's channels matter much less in their half: it should lose more
        model.layers[1].down_proj.weight[:, :88] *= 1e-3
    report = _prune(model, PruneChannels(0.25, adaptive=True, min_keep=0.6))
    kept = {n: b["kept"] for n, b in report.blocks.items()}
    assert sum(kept.values()) == 3 * 176 - round(0.25 * 3 * 176)
    assert kept["layers.1"] < kept["layers.0"] and min(kept.values()) >= math.ceil(0.6 * 176)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), r=st.floats(0, 0.999), round_to=st.sampled_from([1, 8, 64]))
def test_kept_counts_property(n, r, round_to):
    if round_to > n:
        with pytest.raises(ValueError, match="round_to"):
            _uniform_keep(n, max(r, 0.01), round_to, "x")
        return
    keep = _uniform_keep(n, r, round_to, "x")
    assert 1 <= keep <= n
    if r > 0 and round_to > 1:
        assert keep % round_to == 0
    if round_to == 1:
        assert keep == max(1, n - round(r * n))


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(4, 60), min_size=1, max_size=4), r=st.floats(0, 0.9),
       floor=st.floats(0.05, 1.0))
def test_adaptive_allocation_property(sizes, r, floor):
    gen = torch.Generator().manual_seed(len(sizes))
    scores = {i: torch.rand(n, generator=gen, dtype=torch.float64) + 0.01 for i, n in enumerate(sizes)}
    keep = _adaptive_keep(scores, r, floor, 1)
    floors = {i: max(1, math.ceil(floor * n)) for i, n in enumerate(sizes)}
    assert all(floors[i] <= keep[i] <= n for i, n in enumerate(sizes))
    removable = sum(n - floors[i] for i, n in enumerate(sizes))
    assert sum(sizes) - sum(keep.values()) == min(round(r * sum(sizes)), removable)


# ---------------------------------------------------------------------------------------------------
# Override groups on a model discovery cannot read
# ---------------------------------------------------------------------------------------------------
class _SquareBlock(nn.Module):
    """A GLU MLP whose intermediate width equals the hidden width: ambiguous by shapes alone."""

    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.c = nn.Linear(d, d)

    def forward(self, x):
        return x + self.c(F.gelu(self.a(x)) * self.b(x))


class _SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_SquareBlock() for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def test_override_groups_on_custom_model(snapshot):
    model = _SquareNet().double()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no MLP group"):
        llmopt.compress_(model, PruneChannels(0.25))
    snap.check()
    groups = [MLPGroup(inputs=["a", "b"], output="c")]
    found = find_groups(model, groups)
    _zero_channels(model, found, torch.arange(8))
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    ref = model(x)
    _prune(model, PruneChannels(0.25, groups=groups))
    assert torch.allclose(model(x), ref, rtol=0, atol=TOL)
    assert model.blocks[0].c.in_features == 24 and model.blocks[0].c.bias.shape == (32,)
    assert model.blocks[0].a.bias.shape == (24,)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        find_groups(model, [MLPGroup(inputs=["zz"], output="c")])


def test_attention_override_checks_shapes(snapshot):
    model = ToyTransformer()
    snap = snapshot(model)
    bad = [AttentionGroup(q="q_proj", k="k_proj", v="v_proj", o="o_proj", num_heads=4, num_kv_heads=4,
                          head_dim=16)]
    with pytest.raises(ValueError, match="k_proj.*out_features"):
        llmopt.compress_(model, PruneHeads(0.5, groups=bad))
    snap.check()


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors, model untouched
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", True])
def test_bad_ratios(ratio, snapshot):
    model = ToyTransformer()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="ratio"):
        llmopt.compress_(model, PruneChannels(ratio))
    with pytest.raises(ValueError, match="ratio"):
        llmopt.compress_(model, PruneHeads(ratio))
    with pytest.raises(ValueError, match=r"ratios\[1\]"):
        llmopt.compress_(model, PruneChannels(ratios={0: 0.2, 1: ratio}))
    snap.check()


def test_other_bad_input(snapshot):
    model = ToyTransformer()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unknown importance"):
        llmopt.compress_(model, PruneChannels(0.2, importance="taylor"))
    with pytest.raises(ValueError, match="calibration"):
        llmopt.compress_(model, PruneChannels(0.2, importance="wanda"))
    with pytest.raises(ValueError, match="calibration"):
        llmopt.compress_(model, PruneHeads(0.2, importance="wanda"), calibration=[])
    with pytest.raises(ValueError, match="exactly one"):
        llmopt.compress_(model, PruneChannels())
    with pytest.raises(ValueError, match="unknown block"):
        llmopt.compress_(model, PruneChannels(ratios={7: 0.2}))
    with pytest.raises(ValueError, match="round_to"):
        llmopt.compress_(model, PruneChannels(0.2, round_to=512))
    with pytest.raises(ValueError, match="adaptive"):
        llmopt.compress_(model, PruneChannels(ratios={0: 0.2}, adaptive=True))
    snap.check()
    with torch.no_grad():
        model.layers[1].up_proj.weight[3, 4] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.1\.up_proj.*NaN"):
        llmopt.compress_(model, PruneChannels(0.2))
    snap.check()


def test_pruned_then_quantized_round_trip(tmp_path):
    """A pruned Linear quantized afterwards is saved by its wrapper; the others by the resized record."""
    model = ToyTransformer()
    _prune(model, PruneChannels(0.25, round_to=8))
    llmopt.compress_(model, llmopt.RTN("int8", None), include="layers.0.*")
    llmopt.save(model, tmp_path)
    manifest = llmopt.io.read_manifest(tmp_path)
    assert "layers.0.down_proj" in manifest["modules"]
    assert "layers.0.down_proj" not in manifest["resized"]["linears"]
    assert manifest["resized"]["linears"]["layers.1.down_proj"] == [64, 128, False]
    loaded = llmopt.load(ToyTransformer(), tmp_path)
    ids = _ids(128)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_non_finite_calibration_is_a_clear_error(snapshot):
    model = ToyTransformer()
    with torch.no_grad():  # an Inf in the embedding makes the activations non-finite
        model.embed.weight[5] = float("inf")
    snap = snapshot(model)
    ids = torch.full((1, 8), 5)
    with pytest.raises(ValueError, match="layers.0.down_proj.*NaN or Inf"):
        llmopt.compress_(model, PruneChannels(0.25, importance="wanda"), calibration=[ids])
    snap.check()


# ---------------------------------------------------------------------------------------------------
# As a method of compress_: report, include/exclude, rollback, recipes, the deprecated verbs
# ---------------------------------------------------------------------------------------------------
def test_report_lists_resized_layers_and_notes():
    model = ToyTransformer()
    report = llmopt.compress_(model, PruneChannels(0.25))
    mlp = {f"layers.{i}.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")}
    assert set(report.replaced) == mlp and report.skipped == {}
    assert report.replaced["layers.0.down_proj"] == repr(model.layers[0].down_proj)
    assert 0 < report.bytes_after < report.bytes_before
    assert report.bytes_before - report.bytes_after == 4 * 3 * 64 * 44 * 2  # float32, 44 channels x 3 layers x 2
    assert any("prune_channels" in note and "removed" in note for note in report.notes)
    assert report.details[0].to_dict() == report.to_dict()["details"][0]


def test_include_exclude_restrict_the_groups():
    model = ToyTransformer()
    report = llmopt.compress_(model, PruneHeads(0.5), include=["layers.1.*"])
    assert set(report.replaced) == {f"layers.1.{n}_proj" for n in "qkvo"}
    assert model.layers[0].n_heads == 4 and model.layers[1].n_heads == 2
    # A group with one excluded layer is left whole; none left at all is an error naming why.
    report = llmopt.compress_(model, PruneChannels(0.25), exclude=["layers.0.up_proj"])
    assert model.layers[0].down_proj.in_features == 176 and model.layers[1].down_proj.in_features == 132
    with pytest.raises(ValueError, match="excluded"):
        llmopt.compress_(model, PruneChannels(0.25), exclude=["*.down_proj"])


def test_failure_in_a_later_stage_undoes_shapes_attributes_config_and_record(snapshot):
    model = _llama(dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    snap = snapshot(model)
    config = model.config.to_dict()
    recipe = [PruneChannels(0.25), llmopt.Stage(PruneHeads(0.5), include=["model.layers.0.*"]),
              llmopt.RTN("int4", 32)]
    with pytest.raises(llmopt.CompressionError, match=r"model.layers.1.self_attn.o_proj.*NaN"):
        llmopt.compress_(model, recipe)
    snap.check()
    assert model.config.to_dict() == config and model.model.layers[0].mlp.intermediate_size == 160
    assert not hasattr(model, "_llmopt_resized") and not hasattr(model, "_llmopt_recipe")


def test_groups_are_stored_in_a_json_form_and_run_from_a_recipe(tmp_path):
    groups = [MLPGroup(inputs=["a", "b"], output="c")]
    config = PruneChannels(0.25, groups=groups)
    assert config.groups == [{"kind": "mlp", "inputs": ["a", "b"], "output": "c"}]
    assert llmopt.MethodConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PruneChannels(0.25, groups={0: groups}).groups == {"0": config.groups}
    heads = PruneHeads(0.5, groups=[AttentionGroup(q="q", k="k", v="v", o="o", num_heads=4, head_dim=8)])
    assert heads.groups[0]["num_kv_heads"] == 4 and llmopt.MethodConfig.from_dict(heads.to_dict()) == heads
    assert PruneChannels(ratios={0: 0.5}) == PruneChannels.from_dict({"ratios": {"0": 0.5}})
    path = tmp_path / "r.yaml"
    llmopt.Recipe([config]).save(path)
    model = _SquareNet().double()
    llmopt.compress_(model, llmopt.Recipe.load(path))
    assert model.blocks[1].c.in_features == 24
    with pytest.raises(llmopt.pipeline.recipe.RecipeError, match="per-layer overrides"):
        llmopt.Stage(PruneChannels(0.25), overrides={"*": "skip"})


def test_prune_channels_and_prune_heads_still_work_and_warn():
    model = ToyTransformer()
    with pytest.warns(DeprecationWarning, match=r"llmopt.compress_\(model, llmopt.PruneChannels\(ratio\)\)"):
        prune_channels = llmopt.prune_channels_
    report = prune_channels(model, 0.25, round_to=8)
    assert isinstance(report, StructuredReport) and report.blocks["layers.0"]["kept"] == 128
    with pytest.warns(DeprecationWarning, match=r"PruneHeads"):
        prune_heads = llmopt.prune_heads_
    report = prune_heads(model, ratios={0: 0.5})
    assert report.blocks["layers.0"]["kept"] == 1 and model.layers[0].n_kv_heads == 1
