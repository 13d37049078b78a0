"""Contract every registered compression method must satisfy.

Parametrized over ``llmopt.list_methods()`` and each method's ``config_cls.examples()``, so a method
registered later (in ``llmopt`` itself) is covered without touching this file.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmopt
from llmopt.core.primitives import fake_quantize_activations
from llmopt.methods.base import get_method
from llmopt.testing import CustomLinear, ToyMLP, ToyTransformer, sqnr


def _config_id(index: int, cfg: llmopt.MethodConfig) -> str:
    fields = {k: v for k, v in cfg.to_dict().items() if k != "method"}
    return f"{cfg.name}{index}-" + "-".join(f"{v}" for v in fields.values())


CASES = [
    pytest.param(cfg, id=_config_id(i, cfg))
    for name in llmopt.list_methods()
    for i, cfg in enumerate(get_method(name).config_cls.examples())
]
MODELS = ["mlp", "transformer"]


def _build(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    return ToyMLP() if kind == "mlp" else ToyTransformer()


def _linear_names(model: nn.Module):
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _compressed(model: nn.Module):
    return {name: m for name, m in model.named_modules() if getattr(m, "is_llmopt_compressed", False)}


@pytest.fixture
def run(calibration):
    """``run(model, cfg, **kw)``: compress_ with calibration data when the method needs it."""

    def _run(model, cfg, **kwargs):
        calib = calibration(model) if cfg.needs_calibration else None
        return llmopt.compress_(model, cfg, calibration=calib, **kwargs)

    return _run


def _weight_bits(layer: nn.Module) -> int:
    fmt = getattr(layer, "format", None)
    if fmt is not None and hasattr(fmt, "bits"):
        return int(fmt.bits)
    return int(layer.bits_per_weight())


def _is_number_format(layer: nn.Module) -> bool:
    """Quantized layers have a number ``format``; others (``LowRankLinear``) lose precision by other means."""
    return getattr(layer, "format", None) is not None


# Minimum end-to-end SQNR (dB) of the compressed model against the float model, by weight bits.
# Round-to-nearest gains ~6 dB per bit; on these seeded toy models RTN measures (MLP / transformer):
# 8-bit int 43.5/40.7, fp8 28.8/25.4; 4-bit int 19.8-21.0/15.5-17.1, nf4 17.6/13.8, fp4 16.2/13.9;
# 3-bit 13.6/9.5; 2-bit 6.1/3.2 (bf16 models within 0.3 dB of these). Every threshold sits >= 2 dB
# (mostly >= 4 dB) below the worst measured value, and far above what a broken quantizer gives
# (a wrong scale or permuted codes gives <= 0 dB).
SQNR_MIN = {
    "mlp": {2: 3.0, 3: 9.0, 4: 12.0, 8: 22.0},
    "transformer": {2: 1.0, 3: 5.0, 4: 8.0, 8: 20.0},
}


# Layers without a number format (low-rank factors: their error depends on the rank, not on bits):
# random toy weights have flat spectra, so a rank that saves parameters keeps little of them. The
# SVD examples measure (MLP / transformer, float32 and bf16 within 0.03 dB): plain rank 0.4 x
# min(N, K) 2.31 / 1.35, ASVD same rank 2.33 / 1.11, whitened 20% fewer parameters 4.27 / 3.60.
# Broken layers give <= 0 dB (zeroed weights 0.05 / -1.3, row-permuted weights -2.9 / -1.8).
SQNR_MIN_OTHER = {"mlp": 1.0, "transformer": 0.5}


def _sqnr_threshold(kind: str, bits: int) -> float:
    table = SQNR_MIN[kind]
    usable = [b for b in table if b <= bits]
    return table[max(usable)] if usable else 0.0


def _min_sqnr(kind: str, layers) -> float:
    layers = list(layers)
    if all(_is_number_format(layer) for layer in layers):
        return _sqnr_threshold(kind, min(_weight_bits(layer) for layer in layers))
    return SQNR_MIN_OTHER[kind]


# --------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("cfg", CASES)
def test_every_targeted_linear_is_replaced_and_reported(cfg, kind, run):
    model = _build(kind)
    targets = _linear_names(model)
    originals = {name: model.get_submodule(name) for name in targets}
    report = run(model, cfg)

    compressed = _compressed(model)
    assert set(compressed) == targets
    assert set(report.replaced) == targets
    for name, layer in compressed.items():
        assert layer is not originals[name]
        assert report.replaced[name] == repr(layer)
        assert layer.in_features == originals[name].in_features
        assert layer.out_features == originals[name].out_features
    assert report.skipped == {}
    assert report.methods == [cfg.to_dict()]
    # A compression method must actually make the targeted layers smaller than float32.
    assert 0 < report.bytes_after < report.bytes_before


# --------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("cfg", CASES)
def test_layer_forward_matches_its_dequantized_weight(cfg, kind, run):
    model = _build(kind)
    run(model, cfg)
    gen = torch.Generator().manual_seed(7)
    for name, layer in _compressed(model).items():
        x = torch.randn(2, 5, layer.in_features, generator=gen)
        y = layer(x)
        assert y.shape == (2, 5, layer.out_features) and y.dtype == x.dtype
        weight = layer.dequantize_weight()
        assert weight.shape == (layer.out_features, layer.in_features)
        bias = layer.bias.double() if layer.bias is not None else None
        x_eff = x.double()
        if getattr(layer, "act_bits", None):
            # W8A8: the layer multiplies the per-token int8 image of its (rescaled) input; the
            # dequantized weight already contains the input scale, so divide it back out here.
            s = layer.input_scale if layer.input_scale is not None else torch.ones(layer.in_features)
            x_eff = fake_quantize_activations(x * s, layer.act_bits).double() / s.double()
        ref = F.linear(x_eff, weight.double(), bias)  # float64 oracle
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        kernel = getattr(getattr(layer, "kernel", None), "name", "reference")
        # reference kernel: the same float32 weight times float32 activations, so only float32
        # accumulation error (~1e-7 norm-wise measured; 1e-5 bounds K=208 sums comfortably).
        # Fast CPU kernels cast activations (and scales) to bfloat16 (unit roundoff 2**-8 = 3.9e-3):
        # norm-wise error measures ~2.5e-3; 1e-2 leaves margin yet catches any layout/permutation
        # mistake, which gives O(1) error.
        tol = 1e-5 if kernel == "reference" else 1e-2
        assert rel <= tol, f"{name} [{kernel}]: relative error {rel:.2e} > {tol:.0e}"


# --------------------------------------------------------------------------------------------- (c)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("cfg", CASES)
def test_compressed_model_stays_close_to_float_model(cfg, kind, run, toy_input):
    model = _build(kind)
    x = toy_input(model)
    with torch.no_grad():
        reference = model(x)
    run(model, cfg)
    with torch.no_grad():
        out = model(x)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    threshold = _min_sqnr(kind, _compressed(model).values())
    db = sqnr(reference, out)
    assert threshold <= db < float("inf"), f"SQNR {db:.1f} dB, need >= {threshold} dB"


# --------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("cfg", CASES)
def test_save_load_into_meta_skeleton_is_bit_exact(cfg, kind, run, toy_input, tmp_path, bit_equal):
    model = _build(kind)
    # Leave the tied head dense so the tie must survive the round trip.
    run(model, cfg, exclude="lm_head" if kind == "transformer" else None)
    llmopt.save(model, tmp_path)

    with torch.device("meta"):
        skeleton = ToyMLP() if kind == "mlp" else ToyTransformer()
    loaded = llmopt.load(skeleton, tmp_path)
    assert loaded is skeleton

    expected, got = model.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert bit_equal(expected[key], got[key]), key
    for name, layer in _compressed(model).items():
        twin = skeleton.get_submodule(name)
        assert type(twin) is type(layer)
        assert repr(twin) == repr(layer)
    assert not any(t.is_meta for t in list(skeleton.parameters()) + list(skeleton.buffers()))
    x = toy_input(model)
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))
    if kind == "transformer":
        assert skeleton.lm_head.weight is skeleton.embed.weight


# --------------------------------------------------------------------------------------------- (e)
@pytest.mark.parametrize("cfg", CASES)
def test_repr_names_format_group_size_and_kernel(cfg, run):
    model = _build("mlp")
    run(model, cfg)
    for name, layer in _compressed(model).items():
        text = repr(layer)
        if not _is_number_format(layer):
            # No number format (LowRankLinear): the repr still names the layer's shape.
            assert f"in_features={layer.in_features}" in text and f"out_features={layer.out_features}" in text
            continue
        fmt = layer.format.name
        assert fmt, f"{name}: format has no name"
        if hasattr(cfg, "format"):
            assert fmt == cfg.format
        if getattr(cfg, "group_size", None) is not None:
            assert layer.group_size == min(cfg.group_size, layer.in_features)
        assert f"format={fmt}" in text
        assert f"group_size={layer.group_size}" in text
        assert f"kernel={layer.kernel.name}" in text


# --------------------------------------------------------------------------------------------- (f)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("cfg", CASES)
def test_compressing_twice_does_not_double_compress(cfg, kind, run, snapshot):
    model = _build(kind)
    run(model, cfg)
    before = snapshot(model)
    names = set(_compressed(model))

    again = run(model, cfg)
    before.check()  # same module objects, same tensors
    assert again.replaced == {}
    # Every compressed layer is skipped; so are the plain Linears inside a compressed layer (the
    # factors of a LowRankLinear) that the method refuses to compress again.
    assert names <= set(again.skipped)
    assert all(name in names or any(name.startswith(n + ".") for n in names) for name in again.skipped)
    assert all("already compressed" in reason for reason in again.skipped.values())
    assert again.bytes_before == again.bytes_after == 0


# --------------------------------------------------------------------------------------------- (g)
@pytest.mark.parametrize("cfg", CASES)
def test_config_dict_round_trip(cfg):
    data = cfg.to_dict()
    assert data["method"] == cfg.name
    rebuilt = llmopt.MethodConfig.from_dict(data)
    assert type(rebuilt) is type(cfg) and rebuilt == cfg
    # The dict must survive JSON (it is written into reports and manifests).
    via_json = llmopt.MethodConfig.from_dict(json.loads(json.dumps(data)))
    assert via_json == cfg
    assert data == cfg.to_dict()  # from_dict must not consume its input


# --------------------------------------------------------------------------------------------- (h)
@pytest.mark.parametrize("cfg", CASES)
def test_user_linear_subclass_keeps_bias_and_dtype(cfg, run, toy_input):
    model = _build("mlp")
    original = model.down
    assert isinstance(original, CustomLinear)
    bias = original.bias.detach().clone()
    run(model, cfg)

    layer = model.down
    assert getattr(layer, "is_llmopt_compressed", False)
    assert torch.equal(layer.bias, bias)  # the bias is copied, never quantized
    assert layer.bias.dtype == torch.float32
    assert layer.dequantize_weight().dtype == torch.float32
    assert layer.dequantize_weight().shape == original.weight.shape
    assert model(toy_input(model)).dtype == torch.float32


# --------------------------------------------------------------------------------------------- (i)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("cfg", CASES)
def test_bfloat16_model_compresses_and_runs(cfg, kind, run, toy_input):
    model = _build(kind)
    x = toy_input(model)
    with torch.no_grad():
        reference = model(x)  # float32 model, float32 input
    model = copy.deepcopy(model).to(torch.bfloat16)
    run(model, cfg)
    for layer in _compressed(model).values():
        assert layer.dequantize_weight().dtype == torch.bfloat16
        if layer.bias is not None:
            assert layer.bias.dtype == torch.bfloat16
    x_bf16 = x if kind == "transformer" else x.to(torch.bfloat16)
    with torch.no_grad():
        out = model(x_bf16)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # bf16 activations add noise at ~40 dB, far below the quantization noise: same thresholds.
    assert sqnr(reference, out) >= _min_sqnr(kind, _compressed(model).values())
