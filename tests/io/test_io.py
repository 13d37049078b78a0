"""Save / load: mixed models, skeletons on CPU and meta, manifest, no pickle, dtype and kernel moves."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import llmopt
from llmopt.nn import QuantLinear
from llmopt.core.formats import AffineFormat
from llmopt.testing import ToyMLP, ToyTransformer

MIXED_FORMATS = {
    # name -> (format, group size); the kernel "auto" picks on CPU comes from expected_auto_kernel
    # (lowbit_cpu for all of them where it is built, else int8pack_cpu / int4pack_cpu / reference).
    "layers.0.q_proj": ("int8", None),
    "layers.0.k_proj": ("int8", None),
    "layers.0.v_proj": ("int8", None),
    "layers.0.o_proj": ("int8", None),
    "layers.0.gate_proj": ("int4", 32),
    "layers.0.up_proj": ("int4", 32),
    "layers.1.gate_proj": ("int4", 32),
    "layers.1.up_proj": ("int4", 32),
    "layers.0.down_proj": ("nf4", 64),
    "layers.1.down_proj": ("nf4", 64),
    "layers.1.q_proj": ("fp8_e4m3", 64),
    "layers.1.k_proj": ("int3", 64),
}
DENSE = {"layers.1.v_proj", "layers.1.o_proj", "lm_head"}  # lm_head stays tied to the embedding


def _mixed_model() -> ToyTransformer:
    torch.manual_seed(1234)
    model = ToyTransformer()
    llmopt.compress_(model, llmopt.RTN("int8", None), include="layers.0.[qkvo]_proj")
    llmopt.compress_(model, llmopt.RTN("int4", 32), include=["*.gate_proj", "*.up_proj"])
    llmopt.compress_(model, llmopt.RTN("nf4", 64), include="*.down_proj")
    llmopt.compress_(model, llmopt.RTN("fp8_e4m3", 64), include="layers.1.q_proj")
    llmopt.compress_(model, llmopt.RTN("int3", 64), include="layers.1.k_proj")
    return model


def _layout(model):
    return {name: (m.format.name, m.group_size, m.kernel.name) for name, m in model.named_modules()
            if isinstance(m, QuantLinear)}


def _assert_same_state(a: nn.Module, b: nn.Module, bit_equal) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert bit_equal(sa[key], sb[key]), key


def test_mixed_model_layout(expected_auto_kernel):
    model = _mixed_model()
    shapes = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, QuantLinear)}
    expected = {}
    for name, (fmt, group) in MIXED_FORMATS.items():
        k, n = shapes[name]
        expected[name] = (fmt, group if group is not None else 64,
                          expected_auto_kernel(fmt, group, in_features=k, out_features=n))
    assert _layout(model) == expected
    for name in DENSE:
        assert type(model.get_submodule(name)) is nn.Linear


@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_mixed_model_round_trip(where, tmp_path, toy_input, bit_equal):
    model = _mixed_model()
    llmopt.save(model, tmp_path)
    torch.manual_seed(999)  # a CPU skeleton starts from different random weights: all must be overwritten
    with torch.device(where):
        skeleton = ToyTransformer()
    assert llmopt.load(skeleton, tmp_path) is skeleton

    _assert_same_state(model, skeleton, bit_equal)
    assert _layout(skeleton) == _layout(model)
    for name in DENSE:
        assert type(skeleton.get_submodule(name)) is nn.Linear
    assert skeleton.lm_head.weight is skeleton.embed.weight
    assert all(t.device.type == "cpu" for t in list(skeleton.parameters()) + list(skeleton.buffers()))
    x = toy_input(model)
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))


def test_manifest_and_tensor_file_content(tmp_path):
    model = _mixed_model()
    out = llmopt.save(model, tmp_path, metadata={"note": "mixed", "step": 3})
    assert out == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llmopt.json", "model.safetensors"]
    manifest = json.loads((tmp_path / "llmopt.json").read_text())

    assert manifest["format_version"] == 1
    assert manifest["llmopt_version"] == llmopt.__version__
    recipe = manifest["metadata"].pop("recipe")  # what compress_ applied, recorded for `llmopt report`
    assert manifest["metadata"] == {"note": "mixed", "step": 3}
    assert [(s["method"], s["format"]) for s in recipe["stages"]] == [
        ("rtn", "int8"), ("rtn", "int4"), ("rtn", "nf4"), ("rtn", "fp8_e4m3"), ("rtn", "int3")]
    assert manifest["aliases"] == {"lm_head.weight": "embed.weight"}
    assert set(manifest["modules"]) == set(MIXED_FORMATS)
    for name, (fmt, gs) in MIXED_FORMATS.items():
        entry = manifest["modules"][name]
        assert entry["type"] == "QuantLinear"
        cfg = entry["config"]
        assert cfg["format"]["name"] == fmt
        assert cfg["group_size"] == (gs if gs is not None else 64)
        assert cfg["kernel"] == "auto" and cfg["dtype"] == "float32" and cfg["scale_dtype"] == "bfloat16"
        layer = model.get_submodule(name)
        assert (cfg["out_features"], cfg["in_features"]) == (layer.out_features, layer.in_features)

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # Canonical form only: no kernel runtime tensors, no duplicated tied tensor.
    assert keys == set(model.state_dict()) - {"lm_head.weight"}
    assert not any(k.endswith("scale_and_zero") for k in keys)
    assert "layers.0.gate_proj.qdata" in keys and "layers.0.gate_proj.zero_point" in keys
    assert "layers.0.down_proj.zero_point" not in keys  # nf4 has no zero point


def test_load_never_unpickles(tmp_path, monkeypatch, toy_input):
    model = _mixed_model()
    llmopt.save(model, tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("llmopt.load must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    with torch.device("meta"):
        skeleton = ToyTransformer()
    llmopt.load(skeleton, tmp_path)
    monkeypatch.undo()
    x = toy_input(model)
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))


def test_load_without_manifest_is_a_clear_error(tmp_path):
    torch.manual_seed(1234)
    model = ToyMLP()
    llmopt.save(model, tmp_path)
    (tmp_path / "llmopt.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"llmopt\.json.*llmopt\.save"):
        llmopt.load(ToyMLP(), tmp_path)
    with pytest.raises(FileNotFoundError, match="llmopt.json"):
        llmopt.load(ToyMLP(), tmp_path / "does_not_exist")


def _edit_manifest(directory, edit):
    path = directory / "llmopt.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_naming_missing_module_is_a_clear_error(tmp_path, snapshot):
    torch.manual_seed(1234)
    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN("int4", 32))
    llmopt.save(model, tmp_path)
    _edit_manifest(tmp_path, lambda m: m["modules"].__setitem__("blocks.3.proj", m["modules"]["up"]))
    skeleton = ToyMLP()
    snap = snapshot(skeleton)
    with pytest.raises((KeyError, ValueError), match=r"blocks\.3\.proj"):
        llmopt.load(skeleton, tmp_path)
    snap.check()


def test_manifest_with_unknown_type_or_newer_version(tmp_path, snapshot):
    torch.manual_seed(1234)
    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN("int4", 32))
    llmopt.save(model, tmp_path)
    _edit_manifest(tmp_path, lambda m: m["modules"]["down"].__setitem__("type", "NoSuchLinear"))
    skeleton = ToyMLP()
    snap = snapshot(skeleton)
    with pytest.raises(ValueError, match="'down'.*NoSuchLinear"):
        llmopt.load(skeleton, tmp_path)
    snap.check()
    _edit_manifest(tmp_path, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99"):
        llmopt.load(skeleton, tmp_path)
    snap.check()


def test_save_rejects_meta_tensors(tmp_path):
    with torch.device("meta"):
        model = ToyMLP()
    with pytest.raises(ValueError, match="meta"):
        llmopt.save(model, tmp_path)


def test_bfloat16_compressed_model_round_trip(tmp_path, toy_input):
    torch.manual_seed(1234)
    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN("int4", 32))
    model.to(torch.bfloat16)
    llmopt.save(model, tmp_path)
    manifest = json.loads((tmp_path / "llmopt.json").read_text())
    assert manifest["modules"]["up"]["config"]["dtype"] == "bfloat16"
    with torch.device("meta"):
        skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    assert skeleton.up.bias.dtype == torch.bfloat16
    assert skeleton.up.dequantize_weight().dtype == torch.bfloat16
    x = toy_input(model)
    with torch.no_grad():
        out = skeleton(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, model(x))


# ------------------------------------------------------------------------------ dtype and kernel moves
# Each format with a kernel named explicitly (each built-in layout family) and with "auto" (lowbit_cpu
# where it is built; see expected_auto_kernel).
_FORMAT_KERNELS = [("int4", 32, "int4pack_cpu"), ("int8", None, "int8pack_cpu"), ("nf4", 32, "reference"),
                   ("int3", 64, "int4pack_cpu"), ("fp8_e4m3", 64, "reference")]
LAYER_CASES = _FORMAT_KERNELS + [(fmt, gs, "auto") for fmt, gs, _ in _FORMAT_KERNELS]


def _layer(fmt, gs, kernel="auto"):
    torch.manual_seed(1234)
    return QuantLinear.from_linear(nn.Linear(128, 48), fmt, gs, kernel=kernel)


def _resolved(kernel, layer, expected_auto_kernel):
    return expected_auto_kernel(layer) if kernel == "auto" else kernel


@pytest.mark.parametrize("fmt, gs, kernel", LAYER_CASES)
def test_dtype_cast_keeps_quantized_buffers(fmt, gs, kernel, bit_equal, expected_auto_kernel):
    layer = _layer(fmt, gs, kernel)
    kernel = _resolved(kernel, layer, expected_auto_kernel)
    assert layer.kernel.name == kernel
    canonical = {k: v.clone() for k, v in layer.canonical_state().items()}
    runtime = {k: v.clone() for k, v in layer.named_buffers()}
    bias = layer.bias.detach().clone()

    assert layer.to(torch.bfloat16) is layer
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.bias, bias.to(torch.bfloat16))
    for key, value in layer.canonical_state().items():
        assert bit_equal(value, canonical[key]), key
    for key, value in layer.named_buffers():
        assert bit_equal(value, runtime[key]), key  # no dtype cast of codes/scales in memory
    assert layer.kernel.name == kernel
    assert layer.dequantize_weight().dtype == torch.bfloat16
    assert layer(torch.randn(3, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16

    layer.float()
    assert layer.bias.dtype == torch.float32
    for key, value in layer.canonical_state().items():
        assert bit_equal(value, canonical[key]), key


@pytest.mark.parametrize("fmt, gs, kernel", LAYER_CASES)
def test_set_kernel_round_trip_keeps_canonical_state(fmt, gs, kernel, bit_equal, expected_auto_kernel):
    layer = _layer(fmt, gs, kernel)
    name = _resolved(kernel, layer, expected_auto_kernel)
    assert layer.kernel.name == name
    canonical = {k: v.clone() for k, v in layer.canonical_state().items()}
    x = torch.randn(4, 128)
    fast = layer(x)

    assert layer.set_kernel("reference") is layer
    assert layer.kernel.name == "reference"
    for key, value in layer.canonical_state().items():
        assert bit_equal(value, canonical[key]), key
    slow = layer(x)
    # int4pack_cpu/int8pack_cpu use bf16 activations (unit roundoff 3.9e-3): norm-wise relative
    # difference to the float32 reference kernel measures ~2.5e-3; 1e-2 still catches any layout
    # mistake. lowbit_cpu's int16 activations: ~1e-4. The reference kernel against itself: exact.
    tol = {"reference": 0.0, "lowbit_cpu": 1e-3}.get(name, 1e-2)
    assert ((fast - slow).norm() / slow.norm()).item() <= tol

    layer.set_kernel(kernel)
    assert layer.kernel.name == name
    for key, value in layer.canonical_state().items():
        assert bit_equal(value, canonical[key]), key
    assert torch.equal(layer(x), fast)  # same kernel, same data: same bits


def test_move_to_meta_device_falls_back_to_reference_kernel(expected_auto_kernel):
    layer = _layer("int4", 32)
    assert layer.kernel.name == expected_auto_kernel(layer) != "reference"
    layer.to("meta")
    assert layer.device.type == "meta" and layer.kernel.name == "reference"
    assert layer.canonical_state()["qdata"].is_meta


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("fmt, gs", [("int4", 32), ("int8", None)])
def test_kernel_choice_never_changes_stored_parameters(fmt, gs, scale_dtype, bit_equal, expected_auto_kernel):
    # Whatever kernel serves a layer with float32/float16 scales, its canonical (stored) state stays
    # bit-identical, scales in their own dtype: lowbit_cpu keeps them exactly (so "auto" may pick it),
    # while int4pack_cpu/int8pack_cpu hold bf16 scales and must refuse the layer when named.
    torch.manual_seed(1234)
    lin = nn.Linear(128, 48)
    layer = QuantLinear.from_linear(lin, fmt, gs, scale_dtype=scale_dtype, kernel="reference")
    expected = {k: v.clone() for k, v in layer.canonical_state().items()}
    assert expected["scale"].dtype == getattr(torch, scale_dtype)
    x = torch.randn(4, 128)
    ref_out = layer(x)

    def unchanged():
        for key, value in layer.canonical_state().items():
            assert bit_equal(value, expected[key]), key

    layer.set_kernel("auto")
    auto = expected_auto_kernel(layer)
    assert auto in ("lowbit_cpu", "reference")  # never a bf16-scale kernel
    assert layer.kernel.name == auto
    unchanged()
    if auto == "lowbit_cpu":
        assert ((layer(x) - ref_out).norm() / ref_out.norm()).item() <= 1e-3
    bf16_only = "int4pack_cpu" if fmt == "int4" else "int8pack_cpu"
    with pytest.raises(ValueError, match="bfloat16 scales"):
        layer.set_kernel(bf16_only)
    assert layer.kernel.name == auto
    unchanged()
    # Round trips through every kernel that serves the layer leave the stored bits alone.
    for name in ("reference", "lowbit_cpu", "auto"):
        if name == "lowbit_cpu" and auto != "lowbit_cpu":
            continue
        layer.set_kernel(name)
        unchanged()
    assert layer.kernel.name == auto and layer.config()["kernel"] == "auto"
    assert torch.equal(layer.set_kernel("reference")(x), ref_out)


def test_directly_constructed_format_either_rejected_or_round_trips(tmp_path):
    torch.manual_seed(1234)
    model = ToyMLP()
    try:
        model.up = QuantLinear.from_linear(model.up, AffineFormat(4), 32)
        llmopt.save(model, tmp_path)
    except ValueError:
        return  # rejected early with a clear error: acceptable
    with torch.device("meta"):
        skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    assert torch.equal(skeleton.up.dequantize_weight(), model.up.dequantize_weight())
