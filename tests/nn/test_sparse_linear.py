"""SparseLinear: compressed layouts, exact bytes, bit-exact round trips, runtimes, casts and errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.core.measure import memory_report
from llmopt.nn.sparse_linear import SparseLinear, nm_index_bits
from llmopt.core.formats import get_format
from llmopt.core.packing import packed_row_bytes
from llmopt.core.primitives import dequantize_weight as dequantize_codes
from llmopt.core.primitives import quantize_weight
from llmopt.testing import ToyMLP, ToyTransformer


# ---------------------------------------------------------------------------------------------- helpers
def _weight(n=24, k=64, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen).to(dtype)


def _random_mask(shape, sparsity, seed=1):
    """Exactly round(numel * sparsity) pruned positions, at random."""
    gen = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    mask = torch.ones(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen)[: int(round(numel * sparsity))]] = False
    return mask.reshape(shape)


def _nm_mask(weight, n, m):
    """Keep the n largest |w| of every group of m consecutive inputs."""
    rows, cols = weight.shape
    groups = weight.abs().float().reshape(rows, cols // m, m)
    idx = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


def _quantized(weight, mask, fmt="int4", group_size=64, nm=None, bias=None):
    f = get_format(fmt)
    q = quantize_weight(weight, f, group_size, torch.bfloat16)
    layer = SparseLinear.from_quantized(q.codes, q.scale, q.zero_point, mask, bias, format=f,
                                        group_size=q.group_size, nm=nm, dtype=weight.dtype)
    return layer, q


def _layers():
    """One layer of each kind: bitmask / 2:4, float / int4 g64 values."""
    w, b = _weight(), _weight(1, 24, seed=5)[0]
    mask, mask24 = _random_mask(w.shape, 0.5), _nm_mask(w, 2, 4)
    return {
        "bitmask-f32": SparseLinear.from_dense(w, mask, b),
        "bitmask-bf16": SparseLinear.from_dense(w, mask, b, dtype=torch.bfloat16),
        "2:4-bf16": SparseLinear.from_dense(w, mask24, b, nm=(2, 4), dtype=torch.bfloat16),
        "bitmask-int4": _quantized(w, mask, bias=b)[0],
        "2:4-int4": _quantized(w, mask24, nm=(2, 4), bias=b)[0],
        "bitmask-nf4": _quantized(w, mask, fmt="nf4", group_size=32)[0],
    }


KINDS = list(_layers())


def _sparse_model(kind: str, *, nm=None, quant=False, model=None, exclude=()):
    """A toy model whose Linears (except ``exclude``) are replaced by SparseLinear layers."""
    torch.manual_seed(0)
    model = model if model is not None else ToyMLP()
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear) or name in exclude:
            continue
        w = lin.weight.detach()
        mask = _nm_mask(w, *nm) if nm else _random_mask(w.shape, 0.5)
        bias = lin.bias.detach() if lin.bias is not None else None
        layer = (_quantized(w, mask, nm=nm, bias=bias)[0] if quant
                 else SparseLinear.from_dense(w, mask, bias, nm=nm, dtype=torch.bfloat16))
        llmopt.core.targets.set_submodule(model, name, layer)
    return model


# ---------------------------------------------------------------------------------------------- maths
def test_dense_values_are_exact_and_mask_round_trips():
    w = _weight()
    mask = _random_mask(w.shape, 0.5)
    layer = SparseLinear.from_dense(w, mask)
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(layer.dequantize_weight(), w * mask)
    assert layer.values.shape == (int(mask.sum()),)
    assert torch.equal(layer.values, w[mask])  # row-major order of the kept weights
    assert layer.sparsity() == pytest.approx(0.5)
    assert torch.equal(layer.to_linear().weight, w * mask)


def test_nm_layout_stores_positions_in_two_bits():
    w = _weight()
    mask = _nm_mask(w, 2, 4)
    layer = SparseLinear.from_dense(w, mask, nm=(2, 4))
    assert set(layer.state_dict()) == {"values", "indices"}
    assert layer.values.shape == (24, 32) and layer.indices.shape == (24, 32 * 2 // 8)
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(layer.dequantize_weight(), w * mask)
    assert layer.sparsity() == 0.5


def test_quantized_values_are_dequantized_codes_times_mask():
    w = _weight()
    mask = _random_mask(w.shape, 0.6)
    layer, q = _quantized(w, mask)
    expected = dequantize_codes(q.codes, q.scale.float(), q.zero_point.float(), get_format("int4"), 64) * mask
    assert torch.equal(layer.dequantize_weight(), expected)
    assert torch.equal(layer.codes(), q.codes * mask)
    assert (layer.dequantize_weight()[~mask] == 0).all()
    assert torch.equal(layer.scale, q.scale) and torch.equal(layer.zero_point, q.zero_point)
    assert layer.qdata.shape == (packed_row_bytes(int(mask.sum()), 4),)


@pytest.mark.parametrize("kind", ["bitmask-f32", "2:4-bf16"])
def test_quantize_kept_values_keeps_mask_and_layout(kind, tmp_path, bit_equal):
    layer = _layers()[kind]
    q = layer.quantize("int4", 64)
    assert q.nm == layer.nm and torch.equal(q.mask(), layer.mask())
    assert q.format.name == "int4" and q.group_size == 64 and q.weight_dtype == layer.weight_dtype
    assert q.bits_per_weight() == 3.5  # 1 bit of mask or 2-bit indices at 50%, codes, bf16 scale + zero
    ref = layer.dequantize_weight(torch.float64)
    err = ((q.dequantize_weight(torch.float64) - ref).norm() / ref.norm()).item()
    assert err < 0.15  # int4 g64 round to nearest on Gaussian weights: ~0.1 relative
    assert (q.dequantize_weight()[~layer.mask()] == 0).all()
    with pytest.raises(ValueError, match="already quantized"):
        q.quantize()


@pytest.mark.parametrize("runtime", ["dense", "compressed"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_float64_reference(kind, runtime):
    layer = _layers()[kind].set_runtime(runtime)
    x = torch.randn(3, 5, layer.in_features)
    y = layer(x)
    bias = layer.bias.double() if layer.bias is not None else None
    ref = F.linear(x.double(), layer.dequantize_weight(torch.float64), bias)
    # float32 weight and activations: only float32 accumulation error over K=64 (~1e-7 norm-wise).
    assert y.dtype == x.dtype and y.shape == (3, 5, layer.out_features)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    # Any input dtype: the output follows the input (bf16 activations: ~2**-8 relative).
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert ((y16.double() - ref).norm() / ref.norm()).item() < 2e-2


def test_forward_gives_input_gradients():
    layer = _layers()["bitmask-f32"]
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    expected = layer.dequantize_weight().sum(0).expand(4, -1)
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bytes
def test_bytes_bitmask_bf16_half_sparse_is_0_5625_of_dense():
    n, k = 32, 128
    w = _weight(n, k, dtype=torch.bfloat16)
    layer = SparseLinear.from_dense(w, _random_mask(w.shape, 0.5), torch.zeros(n, dtype=torch.bfloat16),
                                    runtime="compressed")
    weight_bytes = n * k // 8 + (n * k // 2) * 2  # mask bits + bf16 values
    assert layer.stored_bytes() == weight_bytes + n * 2
    assert layer.bits_per_weight() == 9.0
    assert weight_bytes / (n * k * 2) == 0.5625
    assert layer.runtime_bytes() == layer.stored_bytes()  # compressed runtime: nothing else held


def test_bytes_2_4_bf16_values_plus_2bit_indices():
    n, k = 32, 128
    w = _weight(n, k, dtype=torch.bfloat16)
    layer = SparseLinear.from_dense(w, _nm_mask(w, 2, 4), nm=(2, 4))
    assert layer.stored_bytes() == n * k // 2 * 2 + n * k // 2 * 2 // 8
    assert layer.bits_per_weight() == 9.0
    # dense runtime: says honestly that it holds a full dense bf16 copy too.
    assert layer.runtime_bytes() == layer.stored_bytes() + n * k * 2


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_bytes_int4_g64_sparse(nm):
    n, k = 16, 128
    w = _weight(n, k)
    mask = _nm_mask(w, 2, 4) if nm else _random_mask(w.shape, 0.5)
    layer, _ = _quantized(w, mask, nm=nm)
    nnz = n * k // 2
    codes = nnz * 4 // 8
    meta = n * k // 8 if nm is None else nnz * 2 // 8
    params = 2 * n * (k // 64) * 2  # bf16 scale and zero_point
    assert layer.stored_bytes() == codes + meta + params
    assert layer.bits_per_weight() == pytest.approx(8 * (codes + meta + params) / (n * k))


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_nm_index_bits(m):
    assert nm_index_bits(m) == math.ceil(math.log2(m))


def test_memory_report_counts_compressed_bytes_and_meets_target():
    model = _sparse_model("bf16", model=ToyMLP().to(torch.bfloat16))
    report = memory_report(model)
    for row in report.layers:
        layer = model.get_submodule(row.name)
        assert row.stored_bytes == layer.stored_bytes() and row.runtime_bytes == layer.runtime_bytes()
        dense_weight_bytes = layer.in_features * layer.out_features * 2
        # Issue target: 50% unstructured, compressed storage <= 0.6x dense bf16 (here ~0.5625x).
        assert row.bits_per_weight * row.num_weights / 8 <= 0.6 * dense_weight_bytes


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_into_meta_skeleton_is_bit_exact(kind, bit_equal):
    layer = _layers()[kind]
    state = layer.state_dict()
    assert "dense_weight" not in state and "mask_bits" not in state
    twin = SparseLinear.from_config(layer.config(), device="meta")
    twin.load_state_dict(state, assign=True)
    for key, value in twin.state_dict().items():
        assert bit_equal(value, state[key]), key
    assert repr(twin) == repr(layer)
    x = torch.randn(2, layer.in_features)
    assert torch.equal(twin(x), layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_into_existing_layer_copies(kind, bit_equal):
    layer = _layers()[kind]
    twin = SparseLinear.from_config(layer.config())  # empty CPU layer: every weight pruned
    assert twin.sparsity() == (1.0 if layer.nm is None else 0.5)
    state = layer.state_dict()
    twin.load_state_dict(state)
    assert torch.equal(twin.dequantize_weight(), layer.dequantize_weight())
    got = twin.state_dict()
    assert all(bit_equal(got[k], state[k]) for k in state)
    assert all(got[k].data_ptr() != state[k].data_ptr() for k in state)


@pytest.mark.parametrize("nm,quant", [(None, False), ((2, 4), False), (None, True), ((2, 4), True)])
def test_llmopt_save_load_meta_skeleton_bit_exact(nm, quant, tmp_path, bit_equal, toy_input):
    model = _sparse_model("x", nm=nm, quant=quant)
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    expected, got = model.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys()
    assert all(bit_equal(expected[k], got[k]) for k in expected)
    for name in ("up", "down"):
        assert type(skeleton.get_submodule(name)) is SparseLinear
        assert repr(skeleton.get_submodule(name)) == repr(model.get_submodule(name))
    x = toy_input(model)
    assert torch.equal(model(x), skeleton(x))


def test_sparsity_plus_int4_in_a_transformer_saves_and_loads(tmp_path, bit_equal, toy_input):
    model = _sparse_model("x", quant=True, model=ToyTransformer(), exclude=("lm_head",))
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyTransformer()
    llmopt.load(skeleton, tmp_path)
    expected, got = model.state_dict(), skeleton.state_dict()
    assert all(bit_equal(expected[k], got[k]) for k in expected)
    x = toy_input(model)
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))
    assert skeleton.lm_head.weight is skeleton.embed.weight


def test_load_rejects_inconsistent_tensors():
    layer = _layers()["bitmask-f32"]
    state = dict(layer.state_dict())
    state["values"] = state["values"][:-1]
    twin = SparseLinear.from_config(layer.config(), device="meta")
    with pytest.raises(RuntimeError, match="values has shape"):
        twin.load_state_dict(state, assign=True)
    state = dict(layer.state_dict())
    del state["mask"]
    with pytest.raises(RuntimeError, match="mask"):
        SparseLinear.from_config(layer.config()).load_state_dict(state)


# ------------------------------------------------------------------------------------------ runtimes, casts
def test_runtime_switch_keeps_function_and_frees_dense_copy():
    layer = _layers()["2:4-bf16"]
    x = torch.randn(3, 64)
    y = layer(x)
    dense_bytes = layer.runtime_bytes()
    layer.set_runtime("compressed")
    assert "dense_weight" not in dict(layer.named_buffers())
    assert layer.runtime_bytes() == layer.stored_bytes() < dense_bytes
    assert torch.equal(layer(x), y)
    assert "kernel=compressed" in repr(layer)
    with pytest.raises(ValueError, match="runtime must be one of"):
        layer.set_runtime("fast")
    with pytest.raises(ValueError, match="CUDA|semi_structured"):
        layer.set_runtime("semi_structured")
    assert layer.runtime == "compressed"  # a refused switch leaves the layer as it was


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (2:4 semi-structured kernels)")
def test_semi_structured_runtime_on_cuda():
    n, k = 128, 256
    w = _weight(n, k).to(torch.float16)
    layer = SparseLinear.from_dense(w, _nm_mask(w, 2, 4), nm=(2, 4)).cuda()
    try:
        layer.set_runtime("semi_structured")
    except (RuntimeError, ValueError) as exc:  # no sparse kernels on this GPU / build
        pytest.skip(f"semi-structured sparsity unavailable: {exc}")
    x = torch.randn(4, 32, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x.double(), layer.dequantize_weight(torch.float64))
    y = layer(x)
    assert y.shape == (4, 32, n) and y.dtype == torch.float16
    # fp16 products accumulated in fp32: ~1e-3 relative.
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_dtype_cast_float_values_follow_quantized_codes_stay():
    layer = _layers()["bitmask-f32"]
    x = torch.randn(2, 64)
    layer.to(torch.bfloat16)
    assert layer.values.dtype == layer.bias.dtype == layer.dense_weight.dtype == torch.bfloat16
    assert layer.dequantize_weight().dtype == torch.bfloat16
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert layer.config()["value_dtype"] == "bfloat16" and layer.config()["dtype"] == "bfloat16"

    q = _layers()["bitmask-int4"]
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    w32 = q.dequantize_weight()
    q.to(torch.float16)
    assert q.dense_weight.dtype == q.bias.dtype == torch.float16
    for key, value in before.items():
        # codes, mask and scales keep their dtype and bits
        assert torch.equal(getattr(q, "mask_bits" if key == "mask" else key), value), key
    assert torch.equal(q.dequantize_weight(torch.float32), w32)
    q.double()
    assert q.dequantize_weight().dtype == torch.float64


def test_device_move_and_deepcopy():
    layer = _layers()["2:4-int4"]
    x = torch.randn(2, 64)
    y = layer(x)
    moved = layer.to("cpu")
    assert moved is layer and torch.equal(layer(x), y)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), y)
    assert clone.qdata.data_ptr() != layer.qdata.data_ptr()


def test_repr_names_layout_format_and_sparsity():
    layers = _layers()
    text = repr(layers["2:4-int4"])
    assert "layout=2:4" in text and "format=int4" in text and "group_size=64" in text
    assert "sparsity=0.5000" in text and "kernel=dense" in text
    text = repr(layers["bitmask-bf16"])
    assert "layout=bitmask" in text and "value_dtype=bfloat16" in text
    assert layers["bitmask-f32"].is_llmopt_compressed
    assert "sparse" in layers["bitmask-f32"].describe()


def test_lora_on_a_sparse_base_saves_and_loads(tmp_path, bit_equal):
    from llmopt.nn.lora_linear import LoRALinear

    model = _sparse_model("x")
    model.up = LoRALinear(model.up, 4, 8.0)
    with torch.no_grad():
        model.up.lora_B.weight.normal_()
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    assert isinstance(skeleton.up.base, SparseLinear)
    expected, got = model.state_dict(), skeleton.state_dict()
    assert all(bit_equal(expected[k], got[k]) for k in expected)


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    w = _weight()
    mask = _random_mask(w.shape, 0.5)
    with pytest.raises(ValueError, match="mask has shape"):
        SparseLinear.from_dense(w, mask[:, :-1])
    bad = w.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        SparseLinear.from_dense(bad, mask)
    bad[3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        SparseLinear.from_dense(bad, mask)
    with pytest.raises(ValueError, match="violates the 2:4 pattern"):
        SparseLinear.from_dense(w, mask, nm=(2, 4))
    for nm in [(2, 2), (4, 2), (0, 4)]:
        with pytest.raises(ValueError, match="0 < N < M"):
            SparseLinear.from_dense(w, _nm_mask(w, 2, 4), nm=nm)
    with pytest.raises(ValueError, match="multiple of M"):
        SparseLinear.from_dense(_weight(4, 10), torch.ones(4, 10, dtype=torch.bool), nm=(2, 4))
    with pytest.raises(TypeError, match="mask must be bool"):
        SparseLinear.from_dense(w, mask.float() * 0.5)
    with pytest.raises(ValueError, match="bias has shape"):
        SparseLinear.from_dense(w, mask, torch.zeros(3))
    with pytest.raises(ValueError, match="meta"):
        SparseLinear.from_dense(w.to("meta"), mask)
    q = quantize_weight(w, get_format("int4"), 64)
    with pytest.raises(ValueError, match="codes must lie in"):
        SparseLinear.from_quantized(q.codes + 16, q.scale, q.zero_point, mask, format="int4", group_size=64)
    with pytest.raises(ValueError, match="needs zero_point"):
        SparseLinear.from_quantized(q.codes, q.scale, None, mask, format="int4", group_size=64)
    with pytest.raises(ValueError, match="scale has shape"):
        SparseLinear.from_quantized(q.codes, q.scale[:, :1], q.zero_point, mask, format="int4", group_size=32)
    layer = SparseLinear.from_dense(w, mask)
    with pytest.raises(ValueError, match="64 features"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 64, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(1, 10),
       nm=st.sampled_from([None, (1, 2), (2, 4), (4, 8), (3, 8)]),
       sparsity=st.floats(0.0, 0.95), quant=st.booleans(), seed=st.integers(0, 2**16))
def test_property_round_trip_and_bytes(rows, groups, nm, sparsity, quant, seed):
    m = nm[1] if nm else 1
    cols = groups * (m if nm else 3)
    w = _weight(rows, cols, seed=seed)
    mask = _nm_mask(w, *nm) if nm else _random_mask(w.shape, sparsity, seed=seed + 1)
    if quant:
        layer, _ = _quantized(w, mask, group_size=8, nm=nm)
    else:
        layer = SparseLinear.from_dense(w, mask, nm=nm)
    assert torch.equal(layer.mask(), mask)
    if not quant:
        assert torch.equal(layer.dequantize_weight(), w * mask)
    assert (layer.dequantize_weight()[~mask] == 0).all()
    nnz = int(mask.sum())
    value_bytes = packed_row_bytes(nnz, 4) if quant and nm is None else (
        rows * packed_row_bytes(nnz // rows, 4) if quant else nnz * 4)
    if nm is None:
        meta_bytes = rows * packed_row_bytes(cols, 1)
    else:
        meta_bytes = rows * packed_row_bytes(nnz // rows, nm_index_bits(m))
    param_bytes = 2 * rows * math.ceil(cols / min(8, cols)) * 2 if quant else 0
    assert layer.stored_bytes() == value_bytes + meta_bytes + param_bytes
    twin = SparseLinear.from_config(layer.config(), device="meta")
    twin.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(twin.dequantize_weight(), layer.dequantize_weight())
    assert torch.equal(twin.mask(), mask)


# ---------------------------------------------------------------------------------------------- stable format
# What llmopt.save writes for each mode, pinned literally: directories saved by earlier versions must keep
# loading bit-exactly, so these keys (in this order), dtypes, shapes, manifest configs and bit orders only
# change with a format version.
_FORMAT_MODES = {
    # kind: (state-dict (key, dtype, shape) in order, config)
    "bitmask-f32": (
        [("bias", torch.float32, (24,)), ("mask", torch.uint8, (24, 8)), ("values", torch.float32, (768,))],
        {"nm": None, "format": None, "group_size": None, "scale_dtype": "bfloat16", "value_dtype": "float32"}),
    "bitmask-bf16": (
        [("bias", torch.float32, (24,)), ("mask", torch.uint8, (24, 8)), ("values", torch.bfloat16, (768,))],
        {"nm": None, "format": None, "group_size": None, "scale_dtype": "bfloat16", "value_dtype": "bfloat16"}),
    "2:4-bf16": (
        [("bias", torch.float32, (24,)), ("values", torch.bfloat16, (24, 32)), ("indices", torch.uint8, (24, 8))],
        {"nm": [2, 4], "format": None, "group_size": None, "scale_dtype": "bfloat16", "value_dtype": "bfloat16"}),
    "bitmask-int4": (
        [("bias", torch.float32, (24,)), ("mask", torch.uint8, (24, 8)), ("qdata", torch.uint8, (384,)),
         ("scale", torch.bfloat16, (24, 1)), ("zero_point", torch.bfloat16, (24, 1))],
        {"nm": None, "format": {"name": "int4"}, "group_size": 64, "scale_dtype": "bfloat16", "value_dtype": None}),
    "2:4-int4": (
        [("bias", torch.float32, (24,)), ("qdata", torch.uint8, (24, 16)), ("indices", torch.uint8, (24, 8)),
         ("scale", torch.bfloat16, (24, 1)), ("zero_point", torch.bfloat16, (24, 1))],
        {"nm": [2, 4], "format": {"name": "int4"}, "group_size": 64, "scale_dtype": "bfloat16", "value_dtype": None}),
    "bitmask-nf4": (
        [("mask", torch.uint8, (24, 8)), ("qdata", torch.uint8, (384,)), ("scale", torch.bfloat16, (24, 2))],
        {"nm": None, "format": {"name": "nf4"}, "group_size": 32, "scale_dtype": "bfloat16", "value_dtype": None}),
}


@pytest.mark.parametrize("kind", list(_FORMAT_MODES))
def test_stable_format_keys_dtypes_shapes_and_manifest_config(kind, tmp_path):
    layer = _layers()[kind]
    expected_state, expected_config = _FORMAT_MODES[kind]
    assert [(k, v.dtype, tuple(v.shape)) for k, v in layer.state_dict().items()] == expected_state
    config = {"in_features": 64, "out_features": 24, "bias": kind != "bitmask-nf4", **expected_config,
              "dtype": "float32", "runtime": "dense"}
    assert layer.config() == config and list(layer.config()) == list(config)
    llmopt.save(nn.Sequential(layer), tmp_path)
    manifest = json.loads((tmp_path / "llmopt.json").read_text())
    assert manifest["modules"]["0"] == {"type": "SparseLinear", "config": config}


def test_stable_format_bit_order_of_packed_tensors():
    """Mask bits, 2-bit positions and 4-bit codes are packed little-endian within each byte."""
    weight = torch.arange(1.0, 17.0).reshape(2, 8)
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1], [0, 1, 1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    layer = SparseLinear.from_dense(weight, mask)
    assert layer.state_dict()["mask"].tolist() == [[0b10000001], [0b00010110]]
    assert layer.state_dict()["values"].tolist() == [1.0, 8.0, 10.0, 11.0, 13.0]
    mask24 = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1], [0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    layer24 = SparseLinear.from_dense(weight, mask24, nm=(2, 4))
    # positions (0, 2, 1, 3) and (1, 3, 0, 2), two bits each, first in the low bits
    assert layer24.state_dict()["indices"].tolist() == [[0b11_01_10_00], [0b10_00_11_01]]
    assert layer24.state_dict()["values"].tolist() == [[1.0, 3.0, 6.0, 8.0], [10.0, 12.0, 13.0, 15.0]]
    codes = (torch.arange(16) % 16).reshape(2, 8).to(torch.uint8)
    scale, zero = torch.ones(2, 1), torch.zeros(2, 1)
    q = SparseLinear.from_quantized(codes, scale, zero, mask, format="int4", group_size=8)
    assert q.state_dict()["qdata"].tolist() == [0 | 7 << 4, 9 | 10 << 4, 12]
    q24 = SparseLinear.from_quantized(codes, scale, zero, mask24, nm=(2, 4), format="int4", group_size=8)
    assert q24.state_dict()["qdata"].tolist() == [[0 | 2 << 4, 5 | 7 << 4], [9 | 11 << 4, 12 | 14 << 4]]


def test_quantize_takes_a_whole_scheme():
    from llmopt.core.scheme import WeightQuant

    weight = torch.randn(16, 64)
    layer = SparseLinear.from_dense(weight, weight.abs() > 0.5)
    a = layer.quantize(WeightQuant("int4", 32, scale_dtype="float32"))
    b = layer.quantize("int4", 32, scale_dtype=torch.float32)
    for key, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[key], value), key
