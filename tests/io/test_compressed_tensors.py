"""compressed-tensors ``pack-quantized`` export (loaded back by transformers + the compressed-tensors
package on CPU) and import, and GPTQ (v1 / v2) checkpoint import, on a tiny random Llama.

Tolerances: symmetric layers decompress to the bit-identical weight (compressed-tensors computes
``q * scale`` in the scale dtype, llmopt ``(code - mid) * scale`` in float32; both products are exact
for the scale dtypes used here), so the logits are compared exactly. Asymmetric layers differ in the
order of the float32 operations (``(q - zp) * s`` against ``(code - mid) * s + zero_point``), so their
weights agree to 1 ulp (rtol 1e-6) and the logits to 1e-5 relative. These comparisons are about the
format, not kernel arithmetic: llmopt's side runs on the reference kernel (dequantize + matmul, what
transformers computes), since "auto"'s fast CPU kernels approximate the activations
(:func:`_reference_logits`)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import llmopt
from llmopt.core.files import LoadError
from llmopt.io.compressed_tensors import (ExportError, export_compressed_tensors, load_compressed_tensors, load_gptq,
                                          load_quantized)
from llmopt.nn import QuantLinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from llmopt.models import speed_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 300]])


def _model(dtype=torch.float32):
    return speed_model("tiny", dtype=dtype, seed=0)


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _hf_load(directory, dequantize=True):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


def _logits(model):
    with torch.no_grad():
        return model(PROMPT).logits.float()


def _reference_logits(model):
    """Logits with every QuantLinear on the reference kernel; each layer's kernel request is restored."""
    layers = _quant_layers(model)
    requested = {name: layer.config()["kernel"] for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.set_kernel("reference")
        return _logits(model)
    finally:
        for name, layer in layers.items():
            layer.set_kernel(requested[name])


def _assert_same_layers(a, b):
    la, lb = _quant_layers(a), _quant_layers(b)
    assert sorted(la) == sorted(lb) and la
    for name, x in la.items():
        y = lb[name]
        assert (x.format.bits, x.format.symmetric, x.group_size) == (y.format.bits, y.format.symmetric, y.group_size)
        assert torch.equal(x.codes(), y.codes()), name
        sx, sy = x.canonical_state(), y.canonical_state()
        assert torch.equal(sx["scale"].double(), sy["scale"].double()), name
        if "zero_point" in sx:
            assert torch.equal(sx["zero_point"].double(), sy["zero_point"].double()), name


@pytest.fixture(scope="module")
def symmetric_export(tmp_path_factory):
    """int4 g32 symmetric (float32 scales) everywhere but down_proj, which is int8 per channel: two
    config groups targeting their layers by name."""
    model = _model()
    llmopt.compress_(model, llmopt.RTN("int4", 32, symmetric=True, scale_dtype="float32"),
                     exclude=["lm_head", "*down_proj"])
    llmopt.compress_(model, llmopt.RTN("int8", None, symmetric=True, scale_dtype="float32"), include=["*down_proj"])
    directory = str(tmp_path_factory.mktemp("ct_sym"))
    report = export_compressed_tensors(model, directory)
    return model, directory, report


def test_export_config_is_the_compressed_tensors_spec(symmetric_export):
    from compressed_tensors.quantization import QuantizationConfig

    _, directory, report = symmetric_export
    with open(os.path.join(directory, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "pack-quantized"
    assert qc["ignore"] == ["lm_head"] and report["config_groups"] == 2
    strategies = sorted((g["weights"]["num_bits"], g["weights"]["strategy"]) for g in qc["config_groups"].values())
    assert strategies == [(4, "group"), (8, "channel")]
    assert report["quantized"]["model.layers.0.mlp.down_proj"] == "int8 channel sym"
    assert report["files"] == ["model.safetensors"]


def _ct_decompress(directory):
    """Every packed layer decompressed by the compressed-tensors package itself, with its own config group."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as f:
        qc = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    weights = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key[: -len(".weight_packed")]
        (scheme,) = [g for g in qc.config_groups.values()
                     if "Linear" in g.targets or any(re.match(t[3:], name) for t in g.targets)]
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        weights[name] = compressor.decompress(local, scheme)["weight"]
    return weights


def test_compressed_tensors_decompresses_bit_identical(symmetric_export):
    model, directory, _ = symmetric_export
    weights = _ct_decompress(directory)
    layers = _quant_layers(model)
    assert sorted(weights) == sorted(layers)
    for name, layer in layers.items():
        assert torch.equal(weights[name], layer.dequantize_weight()), name
    # transformers' compressed-tensors route (the layers stay packed; each gets its own config group)
    assert torch.equal(_logits(_hf_load(directory, dequantize=False)), _reference_logits(model))


def test_transformers_dequantize_single_scheme_bit_identical(tmp_path):
    """``dequantize=True`` (dense weights at load): transformers 5 applies one scheme to every dense
    layer there, so this route is checked on a single-scheme export (int8 per channel)."""
    model = _model()
    llmopt.compress_(model, llmopt.RTN("int8", None, symmetric=True, scale_dtype="float32"), exclude=["lm_head"])
    export_compressed_tensors(model, tmp_path)
    hf = _hf_load(tmp_path)
    for name, layer in _quant_layers(model).items():
        assert torch.equal(hf.get_submodule(name).weight, layer.dequantize_weight()), name
    assert torch.equal(_logits(hf), _reference_logits(model))


def test_import_gives_back_identical_layers(symmetric_export):
    model, directory, _ = symmetric_export
    loaded, tokenizer = load_compressed_tensors(directory)
    assert tokenizer is None
    _assert_same_layers(model, loaded)
    assert torch.equal(_logits(loaded), _logits(model))
    again, _ = load_quantized(directory)  # detection by quant_method
    _assert_same_layers(model, again)


def test_bf16_model_bf16_scales_bit_identical(tmp_path):
    model = _model(torch.bfloat16)
    llmopt.compress_(model, llmopt.RTN("int4", 32, symmetric=True), exclude=["lm_head"])
    export_compressed_tensors(model, tmp_path)
    hf = _hf_load(tmp_path)
    for name, layer in _quant_layers(model).items():
        assert layer.scale_dtype == torch.bfloat16
        assert torch.equal(hf.get_submodule(name).weight, layer.dequantize_weight()), name
    loaded, _ = load_compressed_tensors(tmp_path)
    _assert_same_layers(model, loaded)
    assert all(m.scale_dtype == torch.bfloat16 for m in _quant_layers(loaded).values())


def _integer_zero_points_(model, short_scales):
    """Replace every asymmetric QuantLinear by one whose zero point lies on the integer grid. With
    ``short_scales`` the (float32) scales are bfloat16 values, so ``-zp * scale`` is exact in float32."""
    for name, layer in list(_quant_layers(model).items()):
        state = layer.canonical_state()
        scale = state["scale"].float()
        if short_scales:
            scale = scale.to(torch.bfloat16).float()
        zp = (-state["zero_point"].double() / scale.double()).round().clamp(-layer.format.mid, layer.format.mid - 1)
        new = QuantLinear.from_codes(layer.codes(), scale, (-zp * scale.double()).float(), format=layer.format,
                                     group_size=layer.group_size, dtype=layer.weight_dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)


@pytest.mark.parametrize("short_scales", [True, False])
def test_asymmetric_integer_zero_point_is_exact(tmp_path, short_scales):
    model = _model()
    llmopt.compress_(model, llmopt.RTN("int4", 32, scale_dtype="float32"), exclude=["lm_head"])
    _integer_zero_points_(model, short_scales)
    report = export_compressed_tensors(model, tmp_path)
    assert report["requantized"] == [] and set(report["quantized"].values()) == {"int4 g32 asym"}
    # llmopt's float32 zero point is -zp * scale exactly, or that product rounded to float32 (~1 ulp)
    assert (report["zero_point_rounding"] == 0) if short_scales else (0 < report["zero_point_rounding"] < 1e-7)
    hf = _hf_load(tmp_path)
    for name, layer in _quant_layers(model).items():
        torch.testing.assert_close(hf.get_submodule(name).weight, layer.dequantize_weight(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_logits(hf), _reference_logits(model), rtol=1e-5, atol=1e-5)
    loaded, _ = load_compressed_tensors(tmp_path)
    _assert_same_layers(model, loaded)


def test_asymmetric_float_zero_point_refused_or_requantized(tmp_path):
    model = _model()
    llmopt.compress_(model, llmopt.RTN("int4", 32), exclude=["lm_head"])  # float zero points
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: .* not on the integer grid"):
        export_compressed_tensors(model, tmp_path / "refused")
    assert not os.path.exists(tmp_path / "refused" / "config.json")
    report = export_compressed_tensors(model, tmp_path / "rq", requantize=True)
    assert len(report["requantized"]) == len(_quant_layers(model))
    for entry, layer in zip(report["requantized"], _quant_layers(model).values()):
        step = float(layer.canonical_state()["scale"].float().max())
        assert 0 < entry["max_abs_error"] <= step  # at most one grid step
    hf = _hf_load(tmp_path / "rq")
    assert torch.isfinite(_logits(hf)).all()


def test_export_refuses_what_it_cannot_write(tmp_path):
    model = _model()
    with pytest.raises(ExportError, match="no QuantLinear"):
        export_compressed_tensors(model, tmp_path)
    llmopt.compress_(model, llmopt.RTN("int3", 32, symmetric=True), exclude=["lm_head"])
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: 3-bit"):
        export_compressed_tensors(model, tmp_path)
    nf4 = _model()
    llmopt.compress_(nf4, llmopt.RTN("nf4", 32), exclude=["lm_head"])
    with pytest.raises(ExportError, match="not an integer grid"):
        export_compressed_tensors(nf4, tmp_path)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ GPTQ
def _pack_gptq_rows(values, bits):
    """Reference packer, written independently of llmopt's: ``values [R, C]`` unsigned, packed along dim 0
    (R * bits / 32 int32 rows), value ``r`` at bit ``(r % f) * bits`` of row ``r // f``."""
    f = 32 // bits
    v = values.to(torch.int64)
    out = torch.zeros(v.shape[0] // f, v.shape[1], dtype=torch.int64)
    for j in range(f):
        out |= (v[j::f] & ((1 << bits) - 1)) << (bits * j)
    return (out - ((out >> 31) << 32)).to(torch.int32)


def _write_gptq(directory, *, bits=4, group=32, v2=False, sym=True, g_idx_fn=None, seed=0, extra_qc=None):
    """A synthetic AutoGPTQ-layout checkpoint of the tiny Llama; returns the float64 reference weights,
    the codes [in, out] and the real zero points per layer."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model = _model()
    g = torch.Generator().manual_seed(seed)
    tensors, reference = {}, {}
    mid = 1 << (bits - 1)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name == "lm_head":
            tensors["lm_head.weight"] = module.weight.detach().clone()
            continue
        k, n = module.in_features, module.out_features
        gs = k if group == -1 else group
        codes = torch.randint(0, 1 << bits, (k, n), generator=g)
        scales = (torch.rand(k // gs, n, generator=g) * 0.02 + 0.001).half()
        zeros = (torch.full((k // gs, n), mid) if sym
                 else torch.randint(0 if v2 else 1, 1 << bits, (k // gs, n), generator=g))
        stored = zeros if v2 else (zeros - 1) & ((1 << bits) - 1)
        g_idx = torch.arange(k, dtype=torch.int32) // gs if g_idx_fn is None else g_idx_fn(k, gs)
        tensors[f"{name}.qweight"] = _pack_gptq_rows(codes, bits)
        tensors[f"{name}.qzeros"] = _pack_gptq_rows(stored.t(), bits).t().contiguous()
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = g_idx
        tensors[f"{name}.bias"] = torch.zeros(n, dtype=torch.float16)  # AutoGPTQ writes one for bias-free layers
        gi = g_idx.long()
        w = (codes.double() - zeros[gi].double()) * scales[gi].double()  # [in, out]
        reference[name] = (w.t(), codes.t(), zeros.t())
    for key, t in model.state_dict().items():
        if not any(key == f"{n}.weight" for n in reference) and key not in tensors:
            tensors[key] = t.clone()
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
                                     "sym": sym, "checkpoint_format": "gptq_v2" if v2 else "gptq", **(extra_qc or {})}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return reference


@pytest.mark.parametrize("bits,group,v2,sym", [(4, 32, False, True), (4, 32, False, False), (4, 32, True, True),
                                               (4, 32, True, False), (8, -1, True, False), (2, 32, False, False)])
def test_gptq_import_exact(tmp_path, bits, group, v2, sym):
    reference = _write_gptq(tmp_path, bits=bits, group=group, v2=v2, sym=sym)
    model, _ = load_quantized(tmp_path)
    layers = _quant_layers(model)
    assert sorted(layers) == sorted(reference)
    for name, (w, codes, zeros) in reference.items():
        layer = layers[name]
        assert layer.format.bits == bits and layer.format.symmetric == sym
        assert layer.group_size == (layer.in_features if group == -1 else group)
        assert torch.equal(layer.codes().long(), codes), name
        scale = layer.canonical_state()["scale"]
        if sym:
            assert layer.scale_dtype == torch.float16
        else:  # zero_point = (mid - z) * scale held exactly: float32
            zp = layer.canonical_state()["zero_point"].double()
            assert torch.equal(zp, (layer.format.mid - zeros.double()) * scale.double())
        torch.testing.assert_close(layer.dequantize_weight(torch.float64), w, rtol=1e-7, atol=0)
    assert torch.isfinite(_logits(model)).all()


def test_gptq_v1_v2_differ_by_the_historic_offset(tmp_path):
    _write_gptq(tmp_path, v2=False, sym=False)
    v1, _ = load_gptq(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    v2, _ = load_gptq(tmp_path)  # the same files read as v2: every zero point one lower
    a = v1.model.layers[0].self_attn.q_proj
    b = v2.model.layers[0].self_attn.q_proj
    scale = a.canonical_state()["scale"].double()
    diff = (b.canonical_state()["zero_point"].double() - a.canonical_state()["zero_point"].double()) / scale
    assert torch.equal(diff, torch.ones_like(diff))


def test_gptq_act_order_g_idx_refused(tmp_path):
    def shuffled(k, gs):
        return (torch.arange(k, dtype=torch.int32) % (k // gs))

    _write_gptq(tmp_path, g_idx_fn=shuffled, extra_qc={"desc_act": True})
    with pytest.raises(LoadError, match=r"model\.layers\.\d+\.\S+: g_idx is not the trivial grouping i // group_size"):
        load_gptq(tmp_path)


def test_export_of_gptq_import_round_trips(tmp_path):
    """A community-style GPTQ checkpoint, imported and re-exported: compressed-tensors reads the same weights."""
    reference = _write_gptq(tmp_path / "gptq", v2=True, sym=True)
    model, _ = load_gptq(tmp_path / "gptq")
    export_compressed_tensors(model, tmp_path / "ct")
    again, _ = load_compressed_tensors(tmp_path / "ct")
    _assert_same_layers(model, again)
    name = next(iter(reference))
    torch.testing.assert_close(again.get_submodule(name).dequantize_weight(torch.float64), reference[name][0],
                               rtol=1e-7, atol=0)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs(symmetric_export, tmp_path):
    import shutil

    _, directory, _ = symmetric_export
    work = tmp_path / "ct"
    shutil.copytree(directory, work)
    config = json.loads((work / "config.json").read_text())

    def write(c):
        (work / "config.json").write_text(json.dumps(c))

    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    write(plain)
    with pytest.raises(LoadError, match="no quantization_config"):
        load_compressed_tensors(work)
    with pytest.raises(LoadError, match="quant_method is None"):
        load_quantized(work)
    with pytest.raises(LoadError, match="not a GPTQ checkpoint"):
        load_gptq(work)
    bad = json.loads(json.dumps(config))
    next(iter(bad["quantization_config"]["config_groups"].values()))["weights"]["num_bits"] = 3
    write(bad)
    with pytest.raises(LoadError, match="num_bits=3"):
        load_compressed_tensors(work)
    bad = json.loads(json.dumps(config))
    bad["quantization_config"]["quant_method"] = "awq"
    write(bad)
    with pytest.raises(LoadError, match="'awq'"):
        load_quantized(work)
    write(config)
    # a sharded index naming a file outside the directory
    outside = tmp_path / "outside.safetensors"
    shutil.copy(work / "model.safetensors", outside)
    (work / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../outside.safetensors"}}))
    with pytest.raises(LoadError, match="not a plain file name"):
        load_compressed_tensors(work)
    os.symlink(outside, work / "link.safetensors")
    (work / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "link.safetensors"}}))
    with pytest.raises(LoadError, match="outside the directory"):
        load_compressed_tensors(work)


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_integer_zero_point_mode_exports_exactly(tmp_path, method):
    """``zero_point="int"`` (the quantizers' integer zero-point mode) makes asymmetric layers map onto
    compressed-tensors without requantize: no zero-point rounding, weights bit-identical after
    compressed-tensors/transformers decompress them, and import gives back the same codes."""
    model = _model()
    fields = dict(format="int4", group_size=32, scale_dtype="bfloat16", zero_point="int")
    config = {"rtn": llmopt.RTN(**fields), "gptq": llmopt.GPTQ(**fields), "hqq": llmopt.HQQ(**fields)}[method]
    calibration = [torch.randint(0, 512, (2, 16))] if config.needs_calibration else None
    llmopt.compress_(model, config, calibration=calibration, exclude=["lm_head"])
    report = export_compressed_tensors(model, tmp_path)
    assert not report["requantized"]
    assert report["zero_point_rounding"] == 0.0
    hf = _hf_load(tmp_path)
    for name, layer in _quant_layers(model).items():
        assert torch.equal(hf.get_submodule(name).weight, layer.dequantize_weight()), name
    loaded, _ = load_compressed_tensors(tmp_path)
    for name, layer in _quant_layers(model).items():
        assert torch.equal(loaded.get_submodule(name).codes(), layer.codes()), name
