"""Low-rank compensation of quantization error (``QuantLowRank`` -> ``CompensatedLinear``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmopt
from llmopt.core.errors import CompressionError
from llmopt.calibration import LayerStats, StatsSpec, collect_stats
from llmopt.solvers.decompose import whitened_svd
from llmopt.methods.lowrank.compensation import (
    CompensatedLinear,
    QuantLowRank,
    compensation_factors,
    compensation_to_lora_,
)
from llmopt.nn import LoRALinear, QuantLinear
from llmopt.methods.quant.awq import output_error
from llmopt.methods.quant.hqq import hqq_quantize
from llmopt.methods.base import get_method
from llmopt.testing import ToyTransformer, sqnr


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def _apply(linear: nn.Module, cfg: QuantLowRank, stats=None) -> CompensatedLinear:
    return get_method(cfg).handler(linear, cfg, name="layer", stats=stats)


def _linear(n: int = 48, k: int = 80, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        # a few large input columns, as in LLM weights, so the error is not flat noise
        layer.weight.mul_(1 + 4 * (torch.rand(k, dtype=dtype) > 0.9))
    return layer


def _correlated_inputs(rows: int, k: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen, dtype=dtype) / k ** 0.5
    scales = torch.logspace(0, 1.5, k, dtype=dtype)[torch.randperm(k, generator=gen)]
    return (torch.randn(rows, 8, generator=gen, dtype=dtype) @ torch.randn(8, k, generator=gen, dtype=dtype)
            + 0.3 * torch.randn(rows, k, generator=gen, dtype=dtype) @ mix) * scales


def _stats(x: torch.Tensor) -> LayerStats:
    st = LayerStats(x.shape[-1], StatsSpec(hessian=True, dtype=torch.float64))
    st.update(x)
    return st


# --------------------------------------------------------------------------------------------------
# The layer: effective weight, error reduction
# --------------------------------------------------------------------------------------------------
def test_effective_weight_is_rtn_base_plus_factors():
    linear = _linear()
    cfg = QuantLowRank("int3", 32, rank=8, kernel="reference")
    layer = _apply(linear, cfg)
    assert isinstance(layer, CompensatedLinear) and isinstance(layer, QuantLinear)
    # The quantized part is exactly the layer RTN builds (same tensors under the same keys).
    rtn = get_method("rtn").handler(linear, llmopt.RTN("int3", 32, kernel="reference"), name="layer")
    state = layer.state_dict()
    assert set(state) == set(rtn.state_dict()) | {"down", "up"}
    for key, value in rtn.state_dict().items():
        assert torch.equal(state[key], value), key
    assert torch.equal(layer.dequantize_base(), rtn.dequantize_weight())
    plain = layer.to_quant_linear()
    assert type(plain) is QuantLinear and repr(plain) == repr(rtn)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in rtn.state_dict().items())
    assert layer.down.shape == (8, 80) and layer.up.shape == (48, 8)
    assert layer.down.dtype == torch.bfloat16 and not layer.down.requires_grad
    # float64 oracle: deq(Q) + up @ down
    weight = rtn.dequantize_weight(torch.float64) + layer.up.double() @ layer.down.double()
    assert torch.allclose(layer.dequantize_weight(torch.float64), weight, rtol=0, atol=1e-6)
    x = torch.randn(3, 5, 80)
    ref = F.linear(x.double(), weight, linear.bias.double())
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 48)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
    assert torch.equal(layer.bias, linear.bias)
    # A fast kernel (bfloat16 activations for Q x; the correction stays in float32) computes the same.
    fast = _apply(linear, QuantLowRank("int3", 32, rank=8))
    assert ((fast(x).double() - ref).norm() / ref.norm()).item() < 1e-2


def test_plain_compensation_removes_exactly_the_top_singular_values():
    linear = _linear(dtype=torch.float64)
    r = 12
    layer = _apply(linear, QuantLowRank("int3", 32, rank=r, factor_dtype=None))
    assert layer.down.dtype == torch.float64
    w = linear.weight.detach()
    residual = w - layer.dequantize_base(torch.float64)
    sigma = torch.linalg.svdvals(residual)
    after = (w - layer.dequantize_weight(torch.float64)).pow(2).sum()
    expected = residual.pow(2).sum() - sigma[:r].pow(2).sum()
    assert torch.allclose(after, expected, rtol=1e-9, atol=0)
    assert torch.allclose(after, sigma[r:].pow(2).sum(), rtol=1e-9, atol=0)
    # ... and more rank removes more
    assert after < residual.pow(2).sum() * (1 - r / 48 * 0.5)


def test_compensation_factors_validate_rank():
    residual = torch.randn(16, 24)
    for bad in (0, -1, 17, 2.0, True):
        with pytest.raises(ValueError, match="rank"):
            compensation_factors(residual, bad)
    down, up = compensation_factors(residual, 16)  # full rank: exact
    assert torch.allclose(up @ down, residual, atol=1e-5)


def test_activation_aware_beats_plain_on_output_error():
    linear = _linear(dtype=torch.float64)
    x = _correlated_inputs(512, 80)
    stats = _stats(x)
    r = 8

    def output_error(layer):
        return (x @ (linear.weight.detach() - layer.dequantize_weight(torch.float64)).T).pow(2).sum().item()

    plain = _apply(linear, QuantLowRank("int3", 32, rank=r, factor_dtype=None))
    aware = _apply(linear, QuantLowRank("int3", 32, rank=r, factor_dtype=None, activation_aware=True, damp=0.0),
                   stats=stats)
    rtn_error = (x @ (linear.weight.detach() - plain.dequantize_base(torch.float64)).T).pow(2).sum().item()
    assert torch.equal(plain.codes(), aware.codes())  # same Q, different correction
    assert output_error(plain) < rtn_error
    assert output_error(aware) < 0.7 * output_error(plain), (output_error(aware), output_error(plain))
    # Truncation-aware: the output error left is the sum of the discarded whitened sigma^2.
    residual = linear.weight.detach() - aware.dequantize_base(torch.float64)
    dec = whitened_svd(residual, stats.mean_hessian(), damp=0.0)
    assert dec.info["damp_tries"] == 1
    assert output_error(aware) / x.shape[0] == pytest.approx(dec.sigma[r:].pow(2).sum().item(), rel=1e-6)


def test_activation_aware_needs_statistics():
    cfg = QuantLowRank(rank=4, activation_aware=True)
    assert cfg.needs_calibration and not QuantLowRank().needs_calibration
    with pytest.raises(ValueError, match="calibration statistics"):
        _apply(_linear(), cfg, stats=None)
    with pytest.raises(ValueError, match="needs calibration data"):
        llmopt.compress_(nn.Sequential(_linear()), cfg)


def test_hqq_base():
    linear = _linear()
    layer = _apply(linear, QuantLowRank("int3", 64, rank=8, base="hqq"))
    q = hqq_quantize(linear.weight.detach(), "int3", 64, round_zero=True)
    assert torch.equal(layer.codes(), q.codes)
    plain_rtn = _apply(linear, QuantLowRank("int3", 64, rank=8))
    assert not torch.equal(layer.codes(), plain_rtn.codes())


# --------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(rank=-3), "rank"), (dict(rank=2.5), "rank"), (dict(rank=True), "rank"),
    (dict(base="gptq"), "base"), (dict(base="hqq", symmetric=True), None), (dict(format="nf4", base="hqq"), None),
    (dict(format="int5x"), None), (dict(factor_dtype="int8"), "dtype"), (dict(damp=1.0), "damp"),
    (dict(propagate="both"), "propagate"), (dict(kernel="nope"), "kernel"),
])
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        QuantLowRank(**kwargs)


def test_rank_above_layer_size_fails_naming_the_layer_and_leaves_model_untouched(snapshot):
    torch.manual_seed(0)
    model = ToyTransformer()
    before = snapshot(model)
    with pytest.raises(CompressionError, match=r"k_proj.*rank 48 exceeds min"):
        llmopt.compress_(model, QuantLowRank(rank=48))
    before.check()


def test_label_and_dict_round_trip():
    cfg = QuantLowRank(rank=16, activation_aware=True)
    assert cfg.label() == "rtn int3 g64 + rank 16 whitened"
    assert QuantLowRank().label() == "rtn int3 g64 + rank 32 plain"
    assert llmopt.MethodConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------------------------------
# End to end on a toy transformer
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(1234)
    return ToyTransformer()


@pytest.mark.parametrize("aware", [False, True], ids=["plain", "whitened"])
def test_end_to_end_beats_rtn_and_counts_factor_bits(toy, aware, toy_input, calibration):
    x = toy_input(toy)
    with torch.no_grad():
        reference = toy(x)
    rtn_model = copy.deepcopy(toy)
    llmopt.compress_(rtn_model, llmopt.RTN("int3", 64), exclude="lm_head")
    model = copy.deepcopy(toy)
    cfg = QuantLowRank("int3", 64, rank=16, activation_aware=aware)
    report = llmopt.compress_(model, cfg, exclude="lm_head", calibration=calibration(model) if aware else None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompensatedLinear)}
    assert set(layers) == set(report.replaced) and len(layers) == 14 and not report.skipped
    with torch.no_grad():
        db_rtn, db = sqnr(reference, rtn_model(x)), sqnr(reference, model(x))
    assert db > db_rtn + 1.0, (db, db_rtn)

    mem = llmopt.memory_report(model)
    rows = {row.name: row for row in mem.layers}
    assert set(rows) == set(layers) | {"lm_head"}
    rtn_rows = {row.name: row for row in llmopt.memory_report(rtn_model).layers}
    for name, layer in layers.items():
        n, k = layer.out_features, layer.in_features
        rtn_row = rtn_rows[name]  # same codes and scales: the factors are the whole difference
        assert rows[name].bits_per_weight == pytest.approx(rtn_row.bits_per_weight + 16 * 16 * (n + k) / (n * k))
        assert rows[name].stored_bytes == rtn_row.stored_bytes + 2 * 16 * (n + k)
        assert "rank 16 bfloat16" in rows[name].detail
    assert report.bytes_after == sum(rows[name].stored_bytes for name in layers)


def test_whitened_end_to_end_minimises_each_layers_output_error(toy, calibration):
    """End to end, each first-block layer (whose inputs the compressed and float models share) has the
    least output error on the calibration inputs: whitened <= plain under the (damped) Hessian."""
    batches = calibration(toy)
    stats = collect_stats(toy, batches, StatsSpec(hessian=True, dtype=torch.float64), include="layers.0.*")
    models = {}
    for aware in (False, True):
        models[aware] = copy.deepcopy(toy)
        llmopt.compress_(models[aware], QuantLowRank("int2", 32, rank=8, activation_aware=aware),
                         include="layers.0.*", calibration=batches if aware else None)
    assert len(stats) == 7
    for name, st in stats.items():
        h = st.mean_hessian()
        h = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
        w = toy.get_submodule(name).weight.detach().double()
        errors = {aware: output_error(w - m.get_submodule(name).dequantize_weight(torch.float64), h).item()
                  for aware, m in models.items()}
        assert errors[True] <= errors[False] * (1 + 1e-6), (name, errors)


def test_save_load_is_bit_exact(toy, toy_input, calibration, tmp_path, bit_equal):
    model = copy.deepcopy(toy)
    llmopt.compress_(model, QuantLowRank("int3", 64, rank=16, activation_aware=True), exclude="lm_head",
                     calibration=calibration(model))
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyTransformer()
    llmopt.load(skeleton, tmp_path)
    expected, got = model.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys()
    assert "layers.0.q_proj.down" in got and "layers.0.q_proj.qdata" in got
    for key in expected:
        assert bit_equal(expected[key], got[key]), key
    twin = skeleton.layers[1].down_proj
    assert type(twin) is CompensatedLinear
    assert repr(twin) == repr(model.layers[1].down_proj)
    assert not twin.down.requires_grad
    x = toy_input(model)
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))
    assert skeleton.lm_head.weight is skeleton.embed.weight


def test_compressing_again_skips_the_layers(toy):
    model = copy.deepcopy(toy)
    llmopt.compress_(model, QuantLowRank("int3", 64, rank=8))
    again = llmopt.compress_(model, llmopt.RTN("int4", 64))
    assert again.replaced == {}
    assert all("already compressed" in reason for reason in again.skipped.values())
    assert set(again.skipped) == {n for n, m in model.named_modules() if isinstance(m, CompensatedLinear)}


def test_bfloat16_model(toy, toy_input):
    model = copy.deepcopy(toy).to(torch.bfloat16)
    llmopt.compress_(model, QuantLowRank("int3", 64, rank=8, factor_dtype=None), exclude="lm_head")
    layer = model.layers[0].up_proj
    assert layer.down.dtype == torch.bfloat16 and layer.dequantize_weight().dtype == torch.bfloat16
    with torch.no_grad():
        out = model(toy_input(model))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# QLoRA from the compensated layer
# --------------------------------------------------------------------------------------------------
def test_to_lora_starts_at_the_same_function_and_trains():
    linear = _linear()
    layer = _apply(linear, QuantLowRank("int3", 32, rank=8, factor_dtype="float32"))
    lora = layer.to_lora(alpha=16)
    assert isinstance(lora, LoRALinear) and type(lora.base) is QuantLinear and lora.scaling == 2.0
    assert torch.equal(lora.base.dequantize_weight(), layer.dequantize_base())
    x = torch.randn(4, 80)
    with torch.no_grad():
        assert torch.allclose(lora(x), layer(x), atol=1e-5)
    assert lora.lora_A.weight.requires_grad and lora.lora_B.weight.requires_grad
    lora(x).pow(2).sum().backward()
    assert lora.lora_A.weight.grad is not None
    assert all(p.grad is None for p in lora.base.parameters())


def test_compensation_to_lora_on_a_model(toy, toy_input):
    model = copy.deepcopy(toy)
    llmopt.compress_(model, QuantLowRank("int3", 64, rank=8, factor_dtype="float32"), exclude="lm_head")
    x = toy_input(model)
    with torch.no_grad():
        before = model(x)
    converted = compensation_to_lora_(model)
    assert len(converted) == 14 and isinstance(model.layers[0].q_proj, LoRALinear)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="no CompensatedLinear"):
        compensation_to_lora_(model)
