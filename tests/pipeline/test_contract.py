"""Contract every registered method must satisfy.

Parametrized over ``llmopt.list_methods()`` and each method's ``config_cls.examples()``, so a method
registered later (in ``llmopt`` itself) is covered without touching this file. No method is named
here: what a test may expect of a result comes from what the config declares (``SCOPE``,
``adds_adapters``, ``changes_shapes``, ``reduces_stored_bytes``, ``lossless``, ``example_setup()``).

* A layer/block-scope method replaces every targeted Linear; a model-scope method (it edits the
  architecture: blocks, heads) picks some of them, and runs on the transformer only (the plain MLP
  has no blocks).
* The replacement is an llmopt wrapper (``is_llmopt_compressed``), unless the method adds adapters
  (an adapter wrapper: its adapters train, the wrapped layer is frozen) or changes shapes (a plain,
  smaller layer).
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
from llmopt.core.targets import is_compressed
from llmopt.methods.base import get_method
from llmopt.testing import CustomLinear, ToyMLP, ToyTransformer, sqnr


def _config_id(index: int, cfg: llmopt.MethodConfig) -> str:
    fields = {k: v for k, v in cfg.to_dict().items() if k != "method"}
    return f"{cfg.name}{index}-" + "-".join(f"{v}" for v in fields.values())


CONFIGS = [(_config_id(i, cfg), cfg) for name in llmopt.list_methods()
           for i, cfg in enumerate(get_method(name).config_cls.examples())]
MODELS = ["mlp", "transformer"]


def _kinds(cfg) -> list:
    """The toy models a config runs on: a model-scope method needs repeated blocks (the transformer)."""
    return ["transformer"] if cfg.SCOPE == "model" else MODELS


CASES = [pytest.param(cfg, id=cid) for cid, cfg in CONFIGS]
# (cfg, kind) pairs; the ids are those two stacked parametrizations gave ("<config>-<kind>").
KIND_CASES = [pytest.param(cfg, kind, id=f"{cid}-{kind}") for cid, cfg in CONFIGS for kind in _kinds(cfg)]
# Cases on the plain MLP, whose ``down`` is a user's nn.Linear subclass.
MLP_CASES = [pytest.param(cfg, id=cid) for cid, cfg in CONFIGS if "mlp" in _kinds(cfg)]
# A method that leaves plain smaller layers may shrink them again by design; every other method
# must leave what it made alone.
ONCE_CASES = [pytest.param(cfg, kind, id=f"{cid}-{kind}") for cid, cfg in CONFIGS for kind in _kinds(cfg)
              if not cfg.changes_shapes]


def _build(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    return ToyMLP() if kind == "mlp" else ToyTransformer()


def _linear_names(model: nn.Module):
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _compressed(model: nn.Module):
    return {name: m for name, m in model.named_modules() if getattr(m, "is_llmopt_compressed", False)}


@pytest.fixture
def run(calibration):
    """``run(model, cfg, **kw)``: compress_ with calibration data when the method needs it, after the
    configs the method declares it applies to the result of (``example_setup()``; ``setup=False``: not)."""

    def _run(model, cfg, setup=True, **kwargs):
        for first in (cfg.example_setup() if setup else []):
            llmopt.compress_(model, first, calibration=calibration(model) if first.needs_calibration else None,
                             **kwargs)
        calib = calibration(model) if cfg.needs_calibration else None
        return llmopt.compress_(model, cfg, calibration=calib, **kwargs)

    return _run


def _changed(model: nn.Module, report) -> dict:
    """``{name: module}`` of the layers the report says were replaced."""
    return {name: model.get_submodule(name) for name in report.replaced}


def _effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer multiplies by: a wrapper's dequantized weight, else its ``weight``."""
    return layer.dequantize_weight() if hasattr(layer, "dequantize_weight") else layer.weight


def _assert_replacement_kind(cfg, layer: nn.Module, original: nn.Module) -> None:
    """What the replacement of ``original`` must be, from the config's declarations."""
    if cfg.adds_adapters:
        trainable = [p for p in layer.parameters() if p.requires_grad]
        assert trainable and not any(p.requires_grad for p in original.parameters())
    elif cfg.changes_shapes:
        assert not is_compressed(layer)
        assert layer.in_features <= original.in_features and layer.out_features <= original.out_features
        assert layer.in_features * layer.out_features < original.in_features * original.out_features
    else:
        assert is_compressed(layer)


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
# Structured pruning (transformer only, float32 and bf16 alike) measures: 25% of MLP channels 12.6
# (magnitude) / 11.5 (wanda), half the kv groups of block 1 6.7, of both blocks (fluctuation) 3.1.
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


# A method declaring itself lossless (zero-initialised adapters) must leave the model's function
# unchanged up to float rounding: float32 rounding gives > 100 dB, anything broken < 20 dB.
LOSSLESS_MIN_DB = 60.0


# --------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("cfg, kind", KIND_CASES)
def test_every_targeted_linear_is_replaced_and_reported(cfg, kind, run):
    model = _build(kind)
    targets = _linear_names(model)
    originals = {name: model.get_submodule(name) for name in targets}
    report = run(model, cfg)

    changed = _changed(model, report)
    if cfg.SCOPE == "model":  # the method picks which of the targeted layers it changes
        assert changed and set(changed) <= targets
    else:
        assert set(changed) == targets
    if not (cfg.adds_adapters or cfg.changes_shapes):
        assert set(_compressed(model)) == targets
    for name, layer in changed.items():
        assert layer is not originals[name]
        assert report.replaced[name] == repr(layer)
        _assert_replacement_kind(cfg, layer, originals[name])
        if not cfg.changes_shapes:
            assert layer.in_features == originals[name].in_features
            assert layer.out_features == originals[name].out_features
    assert report.skipped == {}
    assert report.methods == [cfg.to_dict()]
    if cfg.reduces_stored_bytes:
        # A compression method must actually make the targeted layers smaller than float32.
        assert 0 < report.bytes_after < report.bytes_before
    else:  # adapters add bytes; QAT's prepare step keeps the float weights
        assert report.bytes_after >= report.bytes_before > 0


# --------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("cfg, kind", KIND_CASES)
def test_layer_forward_matches_its_dequantized_weight(cfg, kind, run):
    model = _build(kind)
    report = run(model, cfg)
    gen = torch.Generator().manual_seed(7)
    for name, layer in _changed(model, report).items():
        x = torch.randn(2, 5, layer.in_features, generator=gen)
        y = layer(x)
        assert y.shape == (2, 5, layer.out_features) and y.dtype == x.dtype
        weight = _effective_weight(layer)
        assert weight.shape == (layer.out_features, layer.in_features)
        bias = layer.bias.double() if layer.bias is not None else None
        x_eff = x.double()
        if getattr(layer, "act_bits", None):
            # W8A8: the layer multiplies the per-token int8 image of its (rescaled) input; the
            # dequantized weight already contains the input scale, so divide it back out here.
            scale = getattr(layer, "input_scale", None)
            s = scale if scale is not None else torch.ones(layer.in_features)
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
@pytest.mark.parametrize("cfg, kind", KIND_CASES)
def test_compressed_model_stays_close_to_float_model(cfg, kind, run, toy_input):
    model = _build(kind)
    x = toy_input(model)
    with torch.no_grad():
        reference = model(x)
    report = run(model, cfg)
    with torch.no_grad():
        out = model(x)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    db = sqnr(reference, out)
    if cfg.lossless:
        assert db >= LOSSLESS_MIN_DB, f"SQNR {db:.1f} dB, a lossless method needs >= {LOSSLESS_MIN_DB} dB"
        return
    threshold = _min_sqnr(kind, _changed(model, report).values())
    assert threshold <= db < float("inf"), f"SQNR {db:.1f} dB, need >= {threshold} dB"


# --------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("cfg, kind", KIND_CASES)
def test_save_load_into_meta_skeleton_is_bit_exact(cfg, kind, run, toy_input, tmp_path, bit_equal):
    model = _build(kind)
    # Leave the tied head dense so the tie must survive the round trip.
    report = run(model, cfg, exclude="lm_head" if kind == "transformer" else None)
    llmopt.save(model, tmp_path)

    with torch.device("meta"):
        skeleton = ToyMLP() if kind == "mlp" else ToyTransformer()
    loaded = llmopt.load(skeleton, tmp_path)
    assert loaded is skeleton

    expected, got = model.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert bit_equal(expected[key], got[key]), key
    for name, layer in _changed(model, report).items():
        twin = skeleton.get_submodule(name)
        assert type(twin) is type(layer)
        if cfg.adds_adapters:
            # The adapter wrapper keeps the user's own layer (a CustomLinear) as its base; the file does
            # not know that class, so llmopt.load rebuilds a plain nn.Linear computing the same function
            # (checked below with the outputs): compare the wrapper's own settings.
            assert twin.extra_repr() == layer.extra_repr()
        else:
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
    model = _build(_kinds(cfg)[0])
    report = run(model, cfg)
    for name, layer in _changed(model, report).items():
        text = repr(layer)
        if not _is_number_format(layer):
            # No number format (LowRankLinear, an adapter wrapper, a smaller nn.Linear): the repr
            # still names the layer's shape.
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
        if hasattr(layer, "kernel"):  # a training layer (fake quantization) runs no kernel
            assert f"kernel={layer.kernel.name}" in text


# --------------------------------------------------------------------------------------------- (f)
@pytest.mark.parametrize("cfg, kind", ONCE_CASES)
def test_compressing_twice_does_not_double_compress(cfg, kind, run, snapshot):
    model = _build(kind)
    first = run(model, cfg)
    before = snapshot(model)
    names = set(first.replaced)

    again = run(model, cfg, setup=False)
    before.check()  # same module objects, same tensors
    assert again.replaced == {}
    # Every replaced layer is skipped; so are the plain Linears inside a compressed layer (the
    # factors of a LowRankLinear) that the method refuses to compress again.
    assert names <= set(again.skipped)
    assert all(name in names or any(name.startswith(n + ".") for n in names) for name in again.skipped)
    already = "already adapted" if cfg.adds_adapters else "already compressed"
    assert all(already in reason for reason in again.skipped.values())
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
@pytest.mark.parametrize("cfg", MLP_CASES)
def test_user_linear_subclass_keeps_bias_and_dtype(cfg, run, toy_input):
    model = _build("mlp")
    original = model.down
    assert isinstance(original, CustomLinear)
    bias = original.bias.detach().clone()
    report = run(model, cfg)

    layer = model.down
    assert "down" in report.replaced and layer is not original
    _assert_replacement_kind(cfg, layer, original)
    assert torch.equal(layer.bias, bias)  # the bias is copied, never quantized
    assert layer.bias.dtype == torch.float32
    assert _effective_weight(layer).dtype == torch.float32
    assert _effective_weight(layer).shape == original.weight.shape
    assert model(toy_input(model)).dtype == torch.float32


# --------------------------------------------------------------------------------------------- (i)
@pytest.mark.parametrize("cfg, kind", KIND_CASES)
def test_bfloat16_model_compresses_and_runs(cfg, kind, run, toy_input):
    model = _build(kind)
    x = toy_input(model)
    with torch.no_grad():
        reference = model(x)  # float32 model, float32 input
    model = copy.deepcopy(model).to(torch.bfloat16)
    report = run(model, cfg)
    changed = _changed(model, report)
    for layer in changed.values():
        assert _effective_weight(layer).dtype == torch.bfloat16
        if layer.bias is not None:
            assert layer.bias.dtype == torch.bfloat16
    x_bf16 = x if kind == "transformer" else x.to(torch.bfloat16)
    with torch.no_grad():
        out = model(x_bf16)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # bf16 activations add noise at ~40 dB, far below the quantization noise: same thresholds.
    threshold = 30.0 if cfg.lossless else _min_sqnr(kind, changed.values())
    assert sqnr(reference, out) >= threshold
