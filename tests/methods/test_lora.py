"""LoRA / DoRA / QLoRA adapters (llmopt.nn.lora_linear, the LoRA method applied by llmopt.compress_,
llmopt.pipeline.lora merge verbs)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.io.adapters import load_adapters, lora_state_dict, save_adapters
from llmopt.methods.lowrank.lora import LoRA, LoRAError, LoRALinear, lora_layers, trainable_parameters
from llmopt.nn import QuantLinear
from llmopt.pipeline.lora import merge_lora_, unmerge_lora_
from llmopt.testing import CustomLinear, ToyMLP, ToyTransformer, bit_equal


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def _randomize_adapters(layer: LoRALinear, seed: int = 0) -> None:
    """Give B (zero at init) values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)


def _quant(linear: nn.Linear, fmt: str = "int4", gs: int = 32) -> QuantLinear:
    return QuantLinear.from_linear(linear, format=fmt, group_size=gs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs", [
    {"rank": 0}, {"rank": -2}, {"rank": 1.5}, {"rank": True}, {"alpha": 0}, {"alpha": float("nan")},
    {"dropout": 1.0}, {"dropout": -0.1}, {"init": "svd"}, {"init": "loftq"}, {"loftq_iters": 0},
    {"quantize_base": "int5"}, {"quant_group_size": 0}, {"use_dora": 1},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        LoRA(**kwargs)


def test_config_round_trips_through_json():
    cfg = LoRA(rank=4, alpha=8, use_dora=True, init="loftq", quantize_base="nf4", loftq_iters=2)
    assert LoRA.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LoRA(rank=4, alpha=8).scaling == 2.0
    assert LoRA(rank=4, alpha=8, use_rslora=True).scaling == 4.0


# ----------------------------------------------------------------------------------------------- maths
def test_forward_is_base_plus_scaled_update_and_rslora_scaling():
    base = nn.Linear(24, 16, dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64)
    for rslora, expected in [(False, 12 / 4), (True, 12 / 2)]:
        layer = LoRALinear(base, 4, 12, use_rslora=rslora)
        assert layer.scaling == expected
        assert torch.equal(layer(x), base(x))  # B = 0 at init: unchanged
        _randomize_adapters(layer)
        ref = base(x) + expected * x @ (layer.lora_B.weight @ layer.lora_A.weight).T
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)


def test_base_is_frozen_and_only_adapters_train():
    base = CustomLinear(16, 8)
    layer = LoRALinear(base, 2, 4)
    assert layer.base is base and not any(p.requires_grad for p in base.parameters())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}
    assert trainable_parameters(layer) == 2 * 16 + 8 * 2


def _grad_cases():
    torch.manual_seed(0)
    yield "linear", nn.Linear(64, 32), torch.float32
    yield "custom", CustomLinear(64, 32, bias=False), torch.float32
    yield "qlora", _quant(nn.Linear(64, 32)), torch.float32
    yield "qlora_bf16", _quant(nn.Linear(64, 32).to(torch.bfloat16)), torch.bfloat16


@pytest.mark.parametrize("case", list(_grad_cases()), ids=lambda c: c[0])
def test_gradients_reach_only_adapters(case, expected_auto_kernel):
    _, base, dtype = case
    reference = copy.deepcopy(base)
    layer = LoRALinear(base, 4, 8, use_dora=False)
    _randomize_adapters(layer)
    x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
    layer(x).float().square().sum().backward()
    for p in layer.base.parameters():
        assert p.grad is None
    for key, p in layer.adapter_parameters().items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if isinstance(base, QuantLinear):
        # The input gradient went through the fast kernel "auto" picked (lowbit_cpu, or int4pack_cpu).
        assert base.kernel.name == expected_auto_kernel(base)
        # Same input gradient as the reference (dequantize + matmul) kernel.
        reference.set_kernel("reference")
        ref_layer = LoRALinear(reference, 4, 8)
        ref_layer.load_state_dict(layer.state_dict())
        x2 = x.detach().clone().requires_grad_(True)
        ref_layer(x2).float().square().sum().backward()
        assert _rel(x.grad, x2.grad) < 5e-2  # int4pack_cpu rounds activations to bf16


class TwoFactor(nn.Module):
    """A low-rank layer of two nn.Linear factors (not an nn.Linear, no weight attribute)."""

    def __init__(self, n_in: int, n_out: int, rank: int):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.down, self.up = nn.Linear(n_in, rank, bias=False), nn.Linear(rank, n_out)

    def forward(self, x):
        return self.up(self.down(x))

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            linear.weight.copy_(self.up.weight @ self.down.weight)
            linear.bias.copy_(self.up.bias)
        return linear


class MaskedLinear(nn.Linear):
    """A pruned layer: the forward multiplies the weight by a fixed mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", (torch.rand(self.weight.shape) > 0.5).to(self.weight.dtype))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


@pytest.mark.parametrize("make", [lambda: TwoFactor(32, 16, 4), lambda: MaskedLinear(32, 16)],
                         ids=["low_rank", "masked"])
def test_any_linear_like_base(make):
    base = make()
    x = torch.randn(5, 32, requires_grad=True)
    for dora in (False, True):
        layer = LoRALinear(base, 4, 8, use_dora=dora)
        assert torch.equal(layer(x), base(x))
        _randomize_adapters(layer)
        layer(x).square().sum().backward()
        assert all(p.grad is None for p in base.parameters())
        assert all(p.grad is not None for p in layer.adapter_parameters().values())
    # Merging cannot be exact: the low-rank layer has no dense weight to write, the mask would drop
    # part of the update. Both are clear errors, and merge_lora_ changes nothing.
    model = nn.Sequential(LoRALinear(nn.Linear(32, 32), 2, 4), LoRALinear(base, 2, 4))
    for layer in model:
        _randomize_adapters(layer)
    before = dict(model.named_modules())
    with pytest.raises(LoRAError, match="'1'"):
        merge_lora_(model)
    assert dict(model.named_modules()) == before


def test_dora_output_equals_base_at_init_and_merges():
    dense = nn.Linear(48, 32, dtype=torch.float64)
    for base in (dense, _quant(nn.Linear(64, 32))):
        x = torch.randn(4, base.in_features, dtype=torch.float64 if base is dense else torch.float32)
        layer = LoRALinear(base, 4, 8, use_dora=True)
        assert torch.equal(layer(x), base(x))
        w = base.weight if base is dense else base.dequantize_weight()
        torch.testing.assert_close(layer.lora_magnitude.detach(), w.norm(dim=1))  # per output row
    layer = LoRALinear(dense, 4, 8, use_dora=True)
    _randomize_adapters(layer)
    x = torch.randn(4, 48, dtype=torch.float64)
    w = dense.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    expected = x @ (layer.lora_magnitude[:, None] * w / w.norm(dim=1, keepdim=True)).T + dense.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.merge()(x), expected, rtol=0, atol=1e-12)


def test_dora_gradients_match_detached_norm_formula():
    base = nn.Linear(16, 8, dtype=torch.float64)
    layer = LoRALinear(base, 2, 4, use_dora=True)
    _randomize_adapters(layer)
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x).square().sum().backward()
    got = {k: p.grad.clone() for k, p in layer.adapter_parameters().items()}
    params = {k: p.detach().clone().requires_grad_(True) for k, p in layer.adapter_parameters().items()}
    w = base.weight + layer.scaling * params["lora_B.weight"] @ params["lora_A.weight"]
    scale = params["lora_magnitude"] / w.norm(dim=1).detach()
    (x @ (scale[:, None] * w).T + base.bias).square().sum().backward()
    for key, p in params.items():
        torch.testing.assert_close(got[key], p.grad, rtol=1e-10, atol=1e-12)


def test_merge_unmerge_round_trip_float64_dense():
    model = nn.Sequential(CustomLinear(20, 12, dtype=torch.float64), nn.GELU(), nn.Linear(12, 6, dtype=torch.float64))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    llmopt.compress_(model, LoRA(rank=3, alpha=6))
    for layer in lora_layers(model).values():
        _randomize_adapters(layer)
    x = torch.randn(7, 20, dtype=torch.float64)
    adapted = model(x)
    bases = {name: layer.base for name, layer in lora_layers(model).items()}

    report = merge_lora_(model, keep_adapters=True)
    assert set(report.replaced) == {"0", "2"} and all(e < 1e-15 for e in report.merge_errors.values())
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert unmerge_lora_(model) == ["0", "2"]
    for name, layer in lora_layers(model).items():
        assert layer.base is bases[name] and not layer.merged
    for key, value in original.items():
        assert bit_equal(model.state_dict()[f"{key[:1]}.base{key[1:]}"], value)
    assert torch.equal(model(x), adapted)

    merge_lora_(model)
    assert not lora_layers(model)
    assert type(model[0]) is CustomLinear and model[0].tag == "custom" and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)


def test_merge_into_quantized_base_requantizes_same_format():
    base = QuantLinear.from_linear(nn.Linear(64, 32), format="nf4", group_size=32, scale_dtype=torch.float32)
    model = nn.Sequential(base)
    llmopt.compress_(model, LoRA(rank=4, alpha=4))
    layer = model[0]
    _randomize_adapters(layer)
    x = torch.randn(5, 64)
    adapted = model(x)
    report = merge_lora_(model)
    merged = model[0]
    assert isinstance(merged, QuantLinear)
    assert (merged.format, merged.group_size, merged.scale_dtype) == (base.format, 32, torch.float32)
    error = report.merge_errors["0"]
    assert 0 < error < 0.2
    assert _rel(merged(x), adapted) < 0.2


def test_merge_lora_without_adapters_is_an_error():
    with pytest.raises(ValueError, match="no LoRALinear"):
        merge_lora_(ToyMLP())


# ----------------------------------------------------------------------------------------------- PiSSA / LoftQ
def test_pissa_dense_keeps_output_and_uses_principal_directions():
    base = nn.Linear(40, 24, dtype=torch.float64)
    weight = base.weight.detach().clone()
    layer = LoRALinear(base, 5, 10, init="pissa")
    assert bit_equal(base.weight.detach(), weight)  # the layer passed in is not modified
    x = torch.randn(6, 40, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-12)
    u, s, vh = torch.linalg.svd(weight)
    top = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    torch.testing.assert_close(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight, top, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.base.weight, weight - top, rtol=0, atol=1e-12)


def _structured_linear(n_in: int = 128, n_out: int = 64, bias: bool = True) -> nn.Linear:
    """A weight with a few strong directions, as trained models have (random init has none)."""
    dense = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        dense.weight.add_(torch.randn(n_out, 4) @ torch.randn(4, n_in) * 0.2)
    return dense


@pytest.mark.parametrize("structured", [False, True])
def test_qpissa_requantized_residual_matches_original_up_to_quantization(structured):
    torch.manual_seed(1)
    dense = _structured_linear() if structured else nn.Linear(128, 64)
    w = dense.weight.detach()
    quantized = _quant(dense, "int4", 32)
    one_rounding = _rel(quantized.dequantize_weight(), w)  # error of one int4 quantization of W
    layer = LoRALinear(quantized, 8, 16, init="pissa")
    assert isinstance(layer.base, QuantLinear) and layer.base.format == quantized.format
    assert layer.base.group_size == 32 and layer.base.kernel.name == quantized.kernel.name
    # deq(Q') + s B A reproduces the quantized layer up to one more (smaller) rounding of the residual.
    assert _rel(layer.merged_weight(torch.float32), quantized.dequantize_weight()) < 1.2 * one_rounding
    x = torch.randn(16, 128)
    assert _rel(layer(x), quantized(x)) < 1.2 * one_rounding
    # QPiSSA from the float weight: the principal part stays in float, only the residual is rounded.
    qpissa = LoRALinear(dense, 8, 16, init="pissa", quantize_base="int4", quant_group_size=32)
    error = _rel(qpissa.merged_weight(torch.float32), w)
    # Only a weight with dominant directions gains (a random init has a flat spectrum).
    assert error < (0.5 if structured else 1.05) * one_rounding


def test_loftq_reduces_reconstruction_error_vs_qlora():
    torch.manual_seed(2)
    dense = _structured_linear(bias=False)
    w = dense.weight.detach()
    qlora = LoRALinear(dense, 8, 16, quantize_base="int4", quant_group_size=64)
    assert isinstance(qlora.base, QuantLinear)
    qlora_error = _rel(qlora.base.dequantize_weight(), w)
    errors = []
    for iters in (1, 4):
        layer = LoRALinear(dense, 8, 16, init="loftq", loftq_iters=iters, quantize_base="int4", quant_group_size=64)
        assert isinstance(layer.base, QuantLinear) and layer.base.group_size == 64
        # deq(Q) + s B A, the weight the adapted layer computes with
        errors.append(_rel(layer.merged_weight(torch.float32), w))
    assert max(errors) < qlora_error
    x = torch.randn(8, 128)
    assert _rel(layer(x), dense(x)) < _rel(qlora(x), dense(x))


def test_loftq_on_quantized_base_is_a_clear_error():
    with pytest.raises(ValueError, match="float weights"):
        LoRALinear(_quant(nn.Linear(64, 32)), 4, 8, init="loftq", quantize_base="int4")


# ----------------------------------------------------------------------------------------------- compress_(model, LoRA(...))
def test_lora_bad_rank_is_all_or_nothing(snapshot):
    model = ToyMLP()  # up 96 -> 208, down 208 -> 64
    flags = [p.requires_grad for p in model.parameters()]
    snap = snapshot(model)
    with pytest.raises(LoRAError, match="'down'"):
        llmopt.compress_(model, LoRA(rank=80))
    snap.check()
    assert [p.requires_grad for p in model.parameters()] == flags


def test_lora_failure_in_a_later_layer_rolls_back(snapshot):
    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN(format="int4", group_size=32), include=["down"])
    flags = [p.requires_grad for p in model.parameters()]
    snap = snapshot(model)
    with pytest.raises(LoRAError, match="'down'.*already a QuantLinear"):
        llmopt.compress_(model, LoRA(rank=4, quantize_base="int4"))  # 'up' is wrapped first, then 'down' fails
    snap.check()
    assert [p.requires_grad for p in model.parameters()] == flags


def test_include_exclude_and_never_twice():
    model = ToyTransformer()
    report = llmopt.compress_(model, LoRA(rank=4), include=["*q_proj", "*v_proj"], exclude=["layers.1.*"])
    assert set(report.replaced) == {"layers.0.q_proj", "layers.0.v_proj"}
    assert isinstance(model.layers[0].q_proj, LoRALinear) and isinstance(model.layers[1].q_proj, nn.Linear)
    assert report.trainable_parameters == trainable_parameters(model) == 4 * (64 + 64) + 4 * (64 + 32)
    assert not model.embed.weight.requires_grad  # freeze_base: everything but the adapters
    assert any(f"trainable parameters {report.trainable_parameters:,}" in note for note in report.notes)
    assert report.methods == [LoRA(rank=4).to_dict()] and report.bytes_after > report.bytes_before
    again = llmopt.compress_(model, LoRA(rank=4), include=["layers.0.*"])
    assert "layers.0.q_proj" in again.skipped and "layers.0.q_proj" not in again.replaced
    assert not any(isinstance(m.base, LoRALinear) for m in lora_layers(model).values())
    assert set(again.replaced) == {f"layers.0.{p}" for p in ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    with pytest.raises(ValueError):  # the adapters' own lora_A/lora_B are never targets
        llmopt.compress_(model, LoRA(rank=2), include=["*lora_A", "*lora_B"])


def test_add_lora_still_works_and_warns():
    """The old verb, kept for one release: same layers, same freezing, a DeprecationWarning naming compress_."""
    model = ToyTransformer()
    with pytest.warns(DeprecationWarning, match=r"compress_\(model, llmopt\.LoRA"):
        add_lora = llmopt.add_lora_
    report = add_lora(model, LoRA(rank=4), include=["*q_proj", "*v_proj"], exclude=["layers.1.*"])
    assert set(report.replaced) == {"layers.0.q_proj", "layers.0.v_proj"}
    assert report.trainable_parameters == trainable_parameters(model) and not model.embed.weight.requires_grad
    other = ToyMLP()
    add_lora(other, LoRA(rank=4), include=["up"], freeze_base=False)
    assert other.down.weight.requires_grad and not other.up.base.weight.requires_grad


def test_compress_after_lora_never_touches_adapters():
    model = ToyMLP()
    llmopt.compress_(model, LoRA(rank=4))
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    report = llmopt.compress_(model, llmopt.RTN(format="int4", group_size=32))
    assert set(report.replaced) == {"up.base", "down.base"}  # the bases become QLoRA bases
    assert "up.lora_A" in report.skipped
    for name, layer in lora_layers(model).items():
        assert isinstance(layer.base, QuantLinear) and type(layer.lora_A) is nn.Linear, name
    for key, value in lora_state_dict(model).items():
        assert bit_equal(value, adapters[key]), key
    model(torch.randn(2, 96)).sum().backward()


def test_training_reduces_loss_and_base_stays_bit_identical():
    torch.manual_seed(3)
    model = ToyMLP(d_in=32, d_hidden=64, d_out=16)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # the target differs from the model by a low-rank change LoRA can learn
        teacher.down.weight.add_(torch.randn(16, 2) @ torch.randn(2, 64) * 0.3)
    llmopt.compress_(model, llmopt.RTN(format="int4", group_size=32), include=["up"])  # QLoRA + LoRA
    llmopt.compress_(model, LoRA(rank=4, alpha=8, dropout=0.05))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(64, 32)
    y = teacher(x).detach()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    state = model.state_dict()
    for key, value in frozen.items():
        assert bit_equal(state[key], value), key


# ----------------------------------------------------------------------------------------------- save / load
def test_adapter_save_load_round_trip_bit_exact(tmp_path):
    torch.manual_seed(4)
    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN(format="int4", group_size=32), include=["up"])
    fresh = copy.deepcopy(model)
    llmopt.compress_(model, LoRA(rank=4, alpha=8, use_dora=True))
    for layer in lora_layers(model).values():
        _randomize_adapters(layer)
    x = torch.randn(3, 96)
    expected = model(x)
    save_adapters(model, tmp_path)
    manifest = json.loads((tmp_path / "adapters.json").read_text())
    assert set(manifest["layers"]) == {"up", "down"} and manifest["layers"]["up"]["use_dora"]

    report = load_adapters(fresh, tmp_path)  # plain layers: wrapped, then loaded
    assert set(report.replaced) == {"up", "down"}
    for key, value in lora_state_dict(model).items():
        assert bit_equal(lora_state_dict(fresh)[key], value), key
    assert torch.equal(fresh(x), expected)
    assert trainable_parameters(fresh) == trainable_parameters(model)

    other = copy.deepcopy(fresh)  # existing LoRALinear layers: values replaced in place
    for layer in lora_layers(other).values():
        _randomize_adapters(layer, seed=9)
    load_adapters(other, tmp_path)
    assert torch.equal(other(x), expected)


def test_load_adapters_mismatch_is_all_or_nothing(tmp_path, snapshot):
    model = ToyMLP()
    llmopt.compress_(model, LoRA(rank=4))
    save_adapters(model, tmp_path)
    target = ToyMLP()
    llmopt.compress_(target, LoRA(rank=4), include=["up"])
    llmopt.compress_(target, LoRA(rank=2), include=["down"])
    snap = snapshot(target)
    with pytest.raises(LoRAError, match="'down'.*rank"):
        load_adapters(target, tmp_path)
    snap.check()


@pytest.mark.parametrize("dora", [False, True])
def test_llmopt_save_load_with_lora_layers(tmp_path, dora):
    torch.manual_seed(5)
    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN(format="int4", group_size=32), include=["up"])
    llmopt.compress_(model, LoRA(rank=4, alpha=8, use_dora=dora))
    for layer in lora_layers(model).values():
        _randomize_adapters(layer)
    x = torch.randn(3, 96)
    expected = model(x)
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyMLP()
    loaded = llmopt.load(skeleton, tmp_path)
    assert isinstance(loaded.up, LoRALinear) and isinstance(loaded.up.base, QuantLinear)
    assert torch.equal(loaded(x), expected)
    for key, value in model.state_dict().items():
        assert bit_equal(loaded.state_dict()[key], value), key
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_llmopt_load_failure_restores_skeleton(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN(format="int4", group_size=32), include=["up"])
    llmopt.compress_(model, LoRA(rank=4))
    llmopt.save(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["up.lora_A.weight"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        header = f.metadata()
    save_file(tensors, tmp_path / "model.safetensors", metadata=header)  # same save id: a consistent save
    manifest = json.loads((tmp_path / "llmopt.json").read_text())
    manifest["tensor_bytes"] = (tmp_path / "model.safetensors").stat().st_size
    (tmp_path / "llmopt.json").write_text(json.dumps(manifest))
    skeleton = ToyMLP()
    before = dict(skeleton.named_modules())
    with pytest.raises(RuntimeError, match="lora_A"):
        llmopt.load(skeleton, tmp_path)
    assert dict(skeleton.named_modules()) == before


# ----------------------------------------------------------------------------------------------- property
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_in=st.integers(1, 24), n_out=st.integers(1, 24), rank=st.integers(1, 30), bias=st.booleans(),
       rslora=st.booleans(), dora=st.booleans())
def test_any_shape_and_rank(n_in, n_out, rank, bias, rslora, dora):
    base = nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)
    if rank > min(n_in, n_out):
        with pytest.raises(ValueError, match="exceeds"):
            LoRALinear(base, rank, 2.0)
        return
    layer = LoRALinear(base, rank, 2.0, use_rslora=rslora, use_dora=dora)
    x = torch.randn(3, n_in, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))
    _randomize_adapters(layer)
    torch.testing.assert_close(layer.merge()(x), layer(x), rtol=0, atol=1e-10)
    pissa = LoRALinear(base, rank, 2.0, init="pissa", use_rslora=rslora)
    torch.testing.assert_close(pissa(x), base(x), rtol=0, atol=1e-10)
