"""Public API: target selection, reports, config lists, plug-in methods and formats, memory reports."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import llmopt
from llmopt.nn import QuantLinear
from llmopt.core.formats import CodebookFormat, WeightFormat, get_format, unregister_format
from llmopt.methods.base import get_method, unregister_method
from llmopt.testing import ToyMLP, ToyTransformer, sqnr

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_LINEARS = [f"layers.{i}.{p}" for i in range(2) for p in PROJ] + ["lm_head"]


def _transformer() -> ToyTransformer:
    torch.manual_seed(1234)
    return ToyTransformer()


def _compressed_names(model):
    return {name for name, m in model.named_modules() if getattr(m, "is_llmopt_compressed", False)}


def _formats(model):
    return {name: m.format.name for name, m in model.named_modules() if isinstance(m, QuantLinear)}


# Fast config for selection tests: per-channel int8 (one scale per row).
INT8 = llmopt.RTN("int8", None)


# ------------------------------------------------------------------------------ include / exclude
@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (None, None, set(ALL_LINEARS)),
        ("layers.0.*", None, {f"layers.0.{p}" for p in PROJ}),
        ("*.down_proj", None, {"layers.0.down_proj", "layers.1.down_proj"}),
        (["*.q_proj", "*.k_proj"], None,
         {"layers.0.q_proj", "layers.0.k_proj", "layers.1.q_proj", "layers.1.k_proj"}),
        (None, "lm_head", set(ALL_LINEARS) - {"lm_head"}),
        (None, ["layers.1.*", "lm_head"], {f"layers.0.{p}" for p in PROJ}),
        ("layers.*", "*_proj", set()),  # include matches modules, exclude removes every Linear: error below
        ("layers.?.*_proj", ["*.gate_proj", "*.up_proj"],
         {f"layers.{i}.{p}" for i in range(2)
          for p in ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")}),
        ("lm_head", None, {"lm_head"}),
    ],
)
def test_include_exclude_select_exactly_the_expected_layers(include, exclude, expected, snapshot):
    model = _transformer()
    if not expected:
        snap = snapshot(model)
        with pytest.raises(ValueError, match="no uncompressed nn.Linear matches"):
            llmopt.compress_(model, INT8, include=include, exclude=exclude)
        snap.check()
        return
    report = llmopt.compress_(model, INT8, include=include, exclude=exclude)
    assert set(report.replaced) == expected
    assert _compressed_names(model) == expected
    for name in set(ALL_LINEARS) - expected:
        assert type(model.get_submodule(name)) is nn.Linear


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chosen=st.sets(st.sampled_from(ALL_LINEARS), min_size=1), drop=st.sets(st.sampled_from(ALL_LINEARS)))
def test_include_and_exclude_lists_of_exact_names(chosen, drop):
    """With literal names as globs, the replaced set is exactly include minus exclude."""
    model = _transformer()
    expected = chosen - drop
    if not expected:
        with pytest.raises(ValueError):
            llmopt.compress_(model, INT8, include=sorted(chosen), exclude=sorted(drop))
        assert not _compressed_names(model)
        return
    report = llmopt.compress_(model, INT8, include=sorted(chosen), exclude=sorted(drop))
    assert set(report.replaced) == expected == _compressed_names(model)


def test_include_pattern_that_matches_nothing_is_an_error_naming_it():
    model = _transformer()
    with pytest.raises(ValueError, match=r"\*\.mlp\.\*"):
        llmopt.compress_(model, INT8, include=["*.q_proj", "*.mlp.*"])
    assert not _compressed_names(model)


# ------------------------------------------------------------------------------ report
def test_report_bytes_for_int4_are_exact_and_shrink():
    model = _transformer()
    dense_bytes = {name: sum(p.numel() * p.element_size() for p in model.get_submodule(name).parameters())
                   for name in ALL_LINEARS}
    report = llmopt.compress_(model, llmopt.RTN("int4", 32), exclude="lm_head")
    assert set(report.replaced) == set(ALL_LINEARS) - {"lm_head"}
    assert report.bytes_before == sum(dense_bytes[n] for n in report.replaced)
    assert report.bytes_after == sum(model.get_submodule(n).stored_bytes() for n in report.replaced)
    assert report.bytes_before > report.bytes_after > 0
    # float32 -> 4-bit codes + bf16 scale and zero point per 32 weights = 5 bits per weight:
    # 32/5 = 6.4x, up to the few padded columns of the 176-wide down_proj.
    assert 6.0 < report.compression_ratio <= 6.4
    assert report.compression_ratio == report.bytes_before / report.bytes_after
    assert report.seconds >= 0
    data = report.to_dict()
    assert data["replaced"] == report.replaced and data["bytes_after"] == report.bytes_after
    assert f"compressed {len(ALL_LINEARS) - 1} layer(s)" in str(report)


# ------------------------------------------------------------------------------ several configs
def test_configs_applied_by_successive_calls_with_patterns():
    model = _transformer()
    mlp = ["*.gate_proj", "*.up_proj", "*.down_proj"]
    first = llmopt.compress_(model, llmopt.RTN("int8", None), include=mlp)
    second = llmopt.compress_(model, llmopt.RTN("int4", 32), exclude="lm_head")

    mlp_names = {f"layers.{i}.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    attn_names = {f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert set(first.replaced) == mlp_names
    assert set(second.replaced) == attn_names
    assert set(second.skipped) == mlp_names
    formats = _formats(model)
    assert all(formats[n] == "int8" for n in mlp_names)
    assert all(formats[n] == "int4" for n in attn_names)
    assert type(model.lm_head) is nn.Linear


def test_config_list_is_applied_in_order_first_claim_wins():
    """Configs of one call share include/exclude: the first compresses every target, later ones see none."""
    model = _transformer()
    configs = [llmopt.RTN("int8", None), llmopt.RTN("int4", 32)]
    report = llmopt.compress_(model, configs, exclude="lm_head")
    assert set(_formats(model).values()) == {"int8"}
    assert report.methods == [c.to_dict() for c in configs]
    assert report.skipped == {}  # layers compressed earlier in the same call are not "skipped"
    assert set(report.replaced) == set(ALL_LINEARS) - {"lm_head"}


# ------------------------------------------------------------------------------ plug-in methods
@dataclasses.dataclass(frozen=True)
class OnlyNames(llmopt.MethodConfig):
    """Test method: per-channel int8 on the listed layers; declines (returns the input) elsewhere."""

    name = "test_only_names"
    names: tuple = ()
    kernel: str = "reference"


def _only_names_handler(linear, config, *, name):
    if name not in config.names:
        return linear
    return QuantLinear.from_linear(linear, "int8", None, kernel=config.kernel)


@dataclasses.dataclass(frozen=True)
class NeedsData(llmopt.MethodConfig):
    name = "test_needs_data"
    needs_calibration = True
    format: str = "int8"


def _needs_data_handler(linear, config, *, name, stats=None):
    # Calibration methods receive the statistics of the inputs this layer saw.
    assert stats is not None and stats.count > 0 and stats.absmax.shape == (linear.in_features,)
    return QuantLinear.from_linear(linear, config.format, None)


@pytest.fixture
def plugin_methods():
    llmopt.register_method(OnlyNames)(_only_names_handler)
    llmopt.register_method(NeedsData)(_needs_data_handler)
    yield
    unregister_method(OnlyNames.name)
    unregister_method(NeedsData.name)


def test_custom_method_end_to_end(plugin_methods, tmp_path):
    assert {"test_only_names", "test_needs_data"} <= set(llmopt.list_methods())
    entry = get_method("test_only_names")
    assert entry.config_cls is OnlyNames and entry.handler is _only_names_handler
    cfg = OnlyNames(names=("layers.0.q_proj", "layers.1.down_proj"))
    assert llmopt.MethodConfig.from_dict(cfg.to_dict()) == cfg

    model = _transformer()
    x = torch.randint(0, 128, (2, 8))
    report = llmopt.compress_(model, [cfg, llmopt.RTN("int4", 32)], exclude="lm_head")
    formats = _formats(model)
    assert formats.pop("layers.0.q_proj") == "int8" and formats.pop("layers.1.down_proj") == "int8"
    assert set(formats.values()) == {"int4"}
    assert report.methods == [cfg.to_dict(), llmopt.RTN("int4", 32).to_dict()]

    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyTransformer()
    llmopt.load(skeleton, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))


def test_method_needing_calibration(plugin_methods, calibration):
    model = _transformer()
    with pytest.raises(ValueError, match="test_needs_data.*calibration"):
        llmopt.compress_(model, NeedsData())
    assert not _compressed_names(model)
    report = llmopt.compress_(model, NeedsData(), calibration=calibration(model))
    assert set(report.replaced) == set(ALL_LINEARS)


def test_duplicate_or_invalid_method_registration(plugin_methods):
    with pytest.raises(ValueError, match="test_only_names.*already registered"):
        llmopt.register_method(OnlyNames)(_only_names_handler)
    with pytest.raises(ValueError, match="already registered"):
        llmopt.register_method(llmopt.RTN)(lambda linear, config, *, name: linear)
    assert get_method("rtn").config_cls is llmopt.RTN  # the original survived
    with pytest.raises(TypeError):
        llmopt.register_method(dict)

    @dataclasses.dataclass(frozen=True)
    class Nameless(llmopt.MethodConfig):
        pass

    with pytest.raises(ValueError, match="no `name`"):
        llmopt.register_method(Nameless)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_unregistered_method_is_gone():
    @dataclasses.dataclass(frozen=True)
    class Temp(llmopt.MethodConfig):
        name = "test_temp"

    llmopt.register_method(Temp)(lambda linear, config, *, name: QuantLinear.from_linear(linear, "int8"))
    try:
        assert "test_temp" in llmopt.list_methods()
    finally:
        unregister_method("test_temp")
    assert "test_temp" not in llmopt.list_methods()
    with pytest.raises(ValueError, match="unknown method"):
        llmopt.compress_(_transformer(), Temp())


# ------------------------------------------------------------------------------ plug-in formats
POW2_LEVELS = tuple(sorted([-(2.0 ** -e) for e in range(8)] + [2.0 ** -e for e in range(8)]))


class Pow2Int4(CodebookFormat):
    """Test format: 16 signed powers of two, +-1 ... +-1/128 (no zero)."""

    levels = POW2_LEVELS


class ClippedSymInt4(WeightFormat):
    """Test format written against the bare protocol, with one option (``clip``)."""

    bits = 4
    has_zero_point = False

    def __init__(self, clip: float = 1.0):
        self.clip = float(clip)

    def options(self):
        return {"clip": self.clip}

    def choose_params(self, groups):
        return (groups.abs().amax(dim=-1, keepdim=True) * self.clip / 7).clamp_min(1e-8), None

    def quantize(self, groups, scale, zero_point):
        return (torch.round(groups / scale).clamp(-7, 7) + 8).to(torch.uint8)

    def dequantize(self, codes, scale, zero_point):
        return (codes.to(torch.float32) - 8) * scale.to(torch.float32)


@pytest.fixture
def plugin_formats():
    llmopt.register_format("test_pow2_int4")(Pow2Int4)
    llmopt.register_format("test_clip_int4")(ClippedSymInt4)
    yield
    unregister_format("test_pow2_int4")
    unregister_format("test_clip_int4")


def test_user_codebook_format_with_quant_linear(plugin_formats, expected_auto_kernel):
    assert {"test_pow2_int4", "test_clip_int4"} <= set(llmopt.list_formats())
    lin = nn.Linear(64, 48)
    layer = QuantLinear.from_linear(lin, "test_pow2_int4", 32, kernel="reference")
    assert layer.format.name == "test_pow2_int4" and layer.format.bits == 4
    assert layer.canonical_state()["qdata"].shape == (48, 32)  # two 4-bit codes per byte

    # Each weight is dequantized to scale * (the level nearest w / scale), computed here in float64.
    w = lin.weight.detach().double().view(48, 2, 32)
    scale = layer.canonical_state()["scale"].double().view(48, 2, 1)
    levels = torch.tensor(POW2_LEVELS, dtype=torch.float64)
    nearest = levels[(w / scale).unsqueeze(-1).sub(levels).abs().argmin(-1)]
    expected = (nearest * scale).view(48, 64)
    # Products of a power of two and a bf16 scale are exact in float32 (no underflow here), so the
    # only admissible difference is none at all.
    assert torch.equal(layer.dequantize_weight().double(), expected)
    x = torch.randn(5, 64)
    ref = torch.nn.functional.linear(x.double(), expected, lin.bias.double())
    # reference kernel, float32 matmul of the same weights: float32 accumulation error only.
    assert torch.allclose(layer(x).double(), ref, rtol=1e-5, atol=1e-6)
    # "auto": a 16-level codebook is served by lowbit_cpu where it is built (levels as int16 steps and
    # int16 activations: ~1e-4), with the same stored state.
    auto = QuantLinear.from_linear(lin, "test_pow2_int4", 32)
    assert auto.kernel.name == expected_auto_kernel(auto)
    for key, value in layer.canonical_state().items():
        assert torch.equal(auto.canonical_state()[key], value), key
    assert ((auto(x).double() - ref).norm() / ref.norm()).item() < 1e-3


def test_user_format_through_rtn_and_save_load(plugin_formats, tmp_path):
    torch.manual_seed(1234)
    model = ToyMLP()
    x = torch.randn(4, 96)
    with torch.no_grad():
        reference = model(x)
    report = llmopt.compress_(model, llmopt.RTN("test_pow2_int4", 32))
    assert set(_formats(model).values()) == {"test_pow2_int4"}
    assert set(report.replaced) == {"up", "down"}
    # A log grid with 16 levels: measured 11.2 dB on this model; 6 dB still rules out garbage.
    with torch.no_grad():
        assert sqnr(reference, model(x)) >= 6.0

    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))
    assert skeleton.up.format == model.up.format

    unregister_format("test_pow2_int4")
    with torch.device("meta"):
        other = ToyMLP()
    with pytest.raises(ValueError, match="test_pow2_int4"):
        llmopt.load(other, tmp_path)


def test_user_format_options_survive_save_load(plugin_formats, tmp_path):
    fmt = get_format("test_clip_int4", clip=0.75)
    assert fmt.to_dict() == {"name": "test_clip_int4", "clip": 0.75}
    torch.manual_seed(1234)
    model = ToyMLP()
    model.up = QuantLinear.from_linear(model.up, fmt, 32)
    llmopt.save(model, tmp_path)
    skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    assert isinstance(skeleton.up, QuantLinear) and skeleton.up.format == fmt
    assert skeleton.up.format.clip == 0.75
    assert torch.equal(skeleton.up.dequantize_weight(), model.up.dequantize_weight())
    # With clip < 1 the group's extremes saturate at +-7 codes.
    assert int(skeleton.up.codes().max()) == 15 and int(skeleton.up.codes().min()) == 1


def test_duplicate_or_invalid_format_registration(plugin_formats):
    with pytest.raises(ValueError, match="already registered"):
        llmopt.register_format("test_pow2_int4")(Pow2Int4)
    with pytest.raises(ValueError, match="already registered"):
        llmopt.register_format("int4")(Pow2Int4)
    assert get_format("int4").bits == 4
    with pytest.raises(TypeError):
        llmopt.register_format("test_not_a_format")(dict)
    with pytest.raises(ValueError):
        llmopt.register_format("")

    class Bad(CodebookFormat):
        levels = (0.0, 1.0, 0.5, -1.0)

    llmopt.register_format("test_bad_levels")(Bad)
    try:
        with pytest.raises(ValueError, match="sorted"):
            get_format("test_bad_levels")
    finally:
        unregister_format("test_bad_levels")


# ------------------------------------------------------------------------------ tied weights
def test_tied_head_note_when_quantized():
    model = _transformer()
    embed = model.embed.weight
    report = llmopt.compress_(model, llmopt.RTN("int4", 32))
    assert "lm_head" in report.replaced
    assert any("lm_head.weight" in note and "embed.weight" in note for note in report.notes)
    assert model.embed.weight is embed and embed.dtype == torch.float32  # the embedding stays float


def test_no_tied_note_when_head_excluded():
    model = _transformer()
    report = llmopt.compress_(model, llmopt.RTN("int4", 32), exclude="lm_head")
    assert report.notes == []
    assert model.lm_head.weight is model.embed.weight


# ------------------------------------------------------------------------------ memory report
def _unique_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("exclude", [None, "lm_head"])
def test_memory_report_totals_match_saved_file_and_memory(exclude, tmp_path, expected_auto_kernel):
    model = _transformer()
    llmopt.compress_(model, [llmopt.RTN("int4", 32)], exclude=exclude)
    report = llmopt.memory_report(model)

    assert report.stored_bytes == sum(r.stored_bytes for r in report.layers) + report.other_bytes
    assert report.runtime_bytes == sum(r.runtime_bytes for r in report.layers) + report.other_bytes
    assert [r.name for r in report.layers] == ALL_LINEARS
    # stored == what llmopt.save writes (tied tensors once); runtime == what the model holds.
    llmopt.save(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        file_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert report.stored_bytes == file_bytes
    assert report.runtime_bytes == _unique_bytes(list(model.parameters()) + list(model.buffers()))

    rows = {r.name: r for r in report.layers}
    q = rows["layers.0.q_proj"]
    kernel = expected_auto_kernel(model.get_submodule("layers.0.q_proj"))
    assert kernel != "reference"
    assert (q.kind, q.num_weights, q.detail) == ("QuantLinear", 64 * 64, f"int4 g32 [{kernel}]")
    assert q.bits_per_weight == 5.0  # 4-bit codes + (bf16 scale + bf16 zero point) / 32 weights
    assert q.stored_bytes == 64 * 32 + 2 * 64 * 2 * 2
    data = report.to_dict()
    assert data["stored_bytes"] == report.stored_bytes and len(data["layers"]) == len(report.layers)
    text = str(report)
    assert "total" in text and "layers.1.down_proj" in text


def test_memory_report_counts_tied_tensors_once():
    model = _transformer()
    report = llmopt.memory_report(model)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups
    assert report.stored_bytes == report.runtime_bytes == dense
    rows = {r.name: r for r in report.layers}
    assert rows["lm_head"].bits_per_weight == 32.0
    # The shared embedding matrix is counted once: on lm_head (first Linear using it), not in other_bytes.
    embed = model.embed.weight.numel() * 4
    assert rows["lm_head"].stored_bytes == embed
    assert report.other_bytes == dense - sum(r.stored_bytes for r in report.layers) < embed

    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    pair = llmopt.memory_report(nn.Sequential(a, b))
    assert pair.stored_bytes == (64 + 8 + 8) * 4
    assert [r.stored_bytes for r in pair.layers] == [(64 + 8) * 4, 8 * 4]


def test_memory_report_of_meta_model_counts_every_tensor():
    with torch.device("meta"):
        meta_model = ToyTransformer()
    assert llmopt.memory_report(meta_model).stored_bytes == llmopt.memory_report(_transformer()).stored_bytes


# ------------------------------------------------------------------------------ sqnr
def test_sqnr_matches_float64_definition():
    x = torch.randn(1000, dtype=torch.float64)
    assert sqnr(x, x) == math.inf
    assert sqnr(x, 1.1 * x) == pytest.approx(20.0, abs=1e-9)  # noise = 0.1 * signal -> 20 dB
    assert sqnr(x, torch.zeros_like(x)) == pytest.approx(0.0, abs=1e-9)
    noise = 0.01 * torch.randn(1000, dtype=torch.float64)
    expected = 10 * math.log10(float((x ** 2).sum() / (noise ** 2).sum()))
    # float32 input rounding moves the value by far less than 1e-3 dB at this noise level.
    assert sqnr(x.float(), (x + noise).float()) == pytest.approx(expected, abs=1e-3)


def test_quant_linear_replaces_subclass_and_optional_bias():
    lin = nn.Linear(64, 32, bias=False)
    layer = QuantLinear.from_linear(lin, "int4", 32)
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert set(layer.state_dict()) == {"qdata", "scale", "zero_point"}
    sym = QuantLinear.from_linear(lin, "int4", 32, symmetric=True)
    assert set(sym.state_dict()) == {"qdata", "scale"}
    back = layer.to_linear()
    assert type(back) is nn.Linear and torch.equal(back.weight, layer.dequantize_weight())


def test_pattern_on_a_block_selects_its_linears():
    model = ToyTransformer()
    report = llmopt.compress_(model, llmopt.RTN("int4", 32), include="layers.0", exclude="layers.0.down_proj")
    expected = {f"layers.0.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")}
    assert set(report.replaced) == expected
