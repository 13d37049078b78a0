"""Quantization-aware training (llmopt.methods.quant.qat, llmopt.nn.qat_linear): QATLinear, and the QAT method's
prepare and convert steps applied by llmopt.compress_."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.core.cpu import cpu_info
from llmopt.core.errors import CompressionError
from llmopt.core.formats import WeightFormat, get_format, list_formats, unregister_format
from llmopt.core.primitives import fake_quantize, fake_quantize_activations, quantize_weight
from llmopt.methods.quant.qat import QAT
from llmopt.nn import QuantLinear
from llmopt.nn.qat_linear import QATLinear, qat_layers
from llmopt.testing import ToyMLP, ToyTransformer

BUILTIN_FORMATS = list_formats()  # every format registered at import time (the built-ins)
GROUPS = [None, 16, 32, 48, 64]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def _linear(k: int, n: int, bias: bool = True, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------ parity
@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(BUILTIN_FORMATS), gs=st.sampled_from(GROUPS), n=st.integers(1, 24),
       k=st.integers(1, 130), bias=st.booleans(), act=st.sampled_from([None, 8]), seed=st.integers(0, 1000))
def test_convert_matches_fake_quant_reference_kernel(fmt, gs, n, k, bias, act, seed):
    """Every format x group size (ragged last groups included): the converted layer is the same function."""
    qat = QATLinear(_linear(k, n, bias, seed), fmt, gs, act_bits=act)
    quant = qat.to_quant_linear(kernel="reference")
    assert quant.kernel.name == "reference" and quant.act_bits == act
    assert torch.equal(quant.dequantize_weight(torch.float32), qat.dequantize_weight(torch.float32))
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, got = qat(x), quant(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt,gs,sym,act,kernel", [
    ("int4", 32, False, None, "int4pack_cpu"), ("int4", 64, True, None, "int4pack_cpu"),
    ("int3", 64, False, None, "int4pack_cpu"), ("int2", 128, False, None, "int4pack_cpu"),
    ("int8", None, False, None, "int8pack_cpu"), ("int8", None, True, 8,
                                               "int8_onednn_cpu" if cpu_info().has("amx_int8") else "int8_dynamic_cpu"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("choice", ["named", "auto"])
def test_convert_matches_fake_quant_fast_kernels(fmt, gs, sym, act, kernel, dtype, choice, expected_auto_kernel):
    """Each fast kernel named explicitly, and whatever "auto" picks (lowbit_cpu where it is built)."""
    lin = _linear(192, 48, seed=3, dtype=dtype)
    qat = QATLinear(lin, fmt, gs, symmetric=sym, act_bits=act)
    if choice == "auto":
        quant = qat.to_quant_linear()
        assert quant.kernel.name == expected_auto_kernel(quant) != "reference"
    else:
        try:
            quant = qat.to_quant_linear(kernel=kernel)
        except ValueError as error:  # e.g. a PyTorch without the op
            pytest.skip(f"{kernel} not available here: {error}")
        assert quant.kernel.name == kernel
    x = torch.randn(7, 192).to(dtype)
    with torch.no_grad():
        expected, got = qat(x), quant(x)
    assert got.dtype == dtype
    assert _rel_err(got, expected) < 1e-2  # bf16 activations / bf16 accumulation in the fast kernels
    if dtype == torch.float32:
        with torch.no_grad():
            torch.testing.assert_close(quant.set_kernel("reference")(x), expected, rtol=1e-5, atol=1e-6)


def test_forward_is_linear_of_fake_quantized_weight():
    lin = _linear(100, 12, seed=1)  # 100 = 3 x 32 + a ragged group of 4
    qat = QATLinear(lin, "int4", 32, scale_dtype="float16")
    w_q = fake_quantize(lin.weight.detach(), get_format("int4"), 32, torch.float16)
    x = torch.randn(4, 100)
    torch.testing.assert_close(qat(x), F.linear(x, w_q, lin.bias), rtol=0, atol=0)
    q = quantize_weight(lin.weight.detach(), get_format("int4"), 32, torch.float16)
    assert q.scale.dtype == torch.float16 and q.scale.shape == (12, 4)
    assert qat.to_quant_linear().scale_dtype == torch.float16


def test_bf16_weights_with_float32_activations_match_quant_linear():
    qat = QATLinear(_linear(64, 16, seed=2, dtype=torch.bfloat16), "nf4", 32)
    quant = qat.to_quant_linear(kernel="reference")
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(quant(x), qat(x), rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()
    with torch.no_grad():
        assert torch.equal(quant(xb), qat(xb))


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("fmt,gs", [("int4", 32), ("int3", None), ("nf4", 48), ("fp8_e4m3", 16), ("int2", 64)])
@pytest.mark.parametrize("act", [None, 8])
def test_ste_gradients(fmt, gs, act):
    """Plain STE: dL/dW = grad_y^T x_q at the fake-quantized weight, dL/dx = grad_y W_q, dL/db = sum grad_y."""
    lin = _linear(80, 24, seed=4)
    qat = QATLinear(lin, fmt, gs, act_bits=act)
    x = torch.randn(2, 6, 80, requires_grad=True)
    grad_y = torch.randn(2, 6, 24)
    qat(x).backward(grad_y)
    w_q = qat.dequantize_weight(torch.float32)
    x_q = fake_quantize_activations(x.detach(), 8) if act else x.detach()
    g2, x2 = grad_y.reshape(-1, 24), x_q.reshape(-1, 80)
    torch.testing.assert_close(lin.weight.grad, g2.T @ x2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, grad_y @ w_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, g2.sum(0), rtol=1e-5, atol=1e-5)
    # The same as the float gradient of a dense layer holding W_q.
    dense = nn.Linear(80, 24)
    with torch.no_grad():
        dense.weight.copy_(w_q)
        dense.bias.copy_(lin.bias)
    dense(x_q).backward(grad_y)
    torch.testing.assert_close(lin.weight.grad, dense.weight.grad, rtol=1e-5, atol=1e-5)


def test_parameters_are_the_original_objects():
    lin = _linear(32, 8)
    qat = QATLinear(lin, "int4", 32)
    assert qat.weight is lin.weight and qat.bias is lin.bias
    assert [p for p in qat.parameters()] == [lin.weight, lin.bias]


@pytest.mark.parametrize("fmt,gs", [("int4", 32), ("int3", 64), ("nf4", 32)])
def test_sgd_on_representable_target_reduces_fake_quant_loss(fmt, gs):
    torch.manual_seed(5)
    k, n = 64, 16
    f = get_format(fmt)
    target = fake_quantize(torch.randn(n, k) * 0.1, f, gs)  # on the grid of its own parameters
    x = torch.randn(256, k)
    y = x @ target.T
    start = target + 0.03 * torch.randn(n, k)
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(start)
    model = nn.Sequential(lin)
    llmopt.compress_(model, QAT(fmt, gs))
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.mse_loss(model(x), y).item()
    assert final < 0.01 * losses[0], (final, losses)  # observed: 1e-4 or less (the grid point is found)
    llmopt.compress_(model, QAT(step="convert", kernel="reference"))
    with torch.no_grad():
        assert F.mse_loss(model(x), y).item() == pytest.approx(final, rel=1e-5)


# ------------------------------------------------------------------------------------------ model level
def test_prepare_and_convert_report_and_targets():
    model = ToyTransformer()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    report = llmopt.compress_(model, QAT("int4", 32), exclude=["lm_head"])
    layers = qat_layers(model)
    assert len(layers) == n_linear - 1 and "lm_head" not in layers
    assert set(report.replaced) == set(layers)
    assert report.bytes_before == report.bytes_after > 0
    assert report.methods[0]["method"] == "qat" and report.methods[0]["step"] == "prepare"
    assert "qat int4 g32" in llmopt.memory_report(model).layers[0].detail
    # compress_ does not quantize a QAT layer as if it were float.
    rtn = llmopt.compress_(model, llmopt.RTN("int8", None))
    assert set(rtn.replaced) == {"lm_head"}
    assert all("QATLinear" in reason for name, reason in rtn.skipped.items() if name in layers)
    report = llmopt.compress_(model, QAT(step="convert"))
    assert not qat_layers(model)
    assert set(report.replaced) == set(layers)
    assert report.bytes_after < report.bytes_before / 4
    assert all(isinstance(model.get_submodule(name), QuantLinear) for name in layers)


def test_prepare_validates_before_touching(snapshot):
    model = ToyMLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unknown weight format"):
        llmopt.compress_(model, QAT("int5"))
    with pytest.raises(ValueError, match="group_size"):
        llmopt.compress_(model, QAT("int4", 0))
    with pytest.raises(ValueError, match="act_bits"):
        llmopt.compress_(model, QAT("int4", act_bits=4))
    with pytest.raises(ValueError, match="scale_dtype"):
        llmopt.compress_(model, QAT("int4", scale_dtype="int8"))
    with pytest.raises(ValueError, match="does not accept"):
        llmopt.compress_(model, QAT("nf4", symmetric=True))
    with pytest.raises(ValueError, match="matches no module"):
        llmopt.compress_(model, QAT("int4"), include="nothing*")
    with pytest.raises(ValueError, match="step"):
        llmopt.compress_(model, QAT(step="train"))
    snap.check()


def test_prepare_all_or_nothing_on_nan_layer(snapshot):
    model = ToyMLP()
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model.get_submodule(names[-1]).weight[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(CompressionError, match=f"layer '{names[-1]}'.*NaN"):
        llmopt.compress_(model, QAT("int4", 32))
    snap.check()
    assert not qat_layers(model)


def test_prepare_names_layer_where_user_format_fails(snapshot):
    class NeedsEvenGroups(WeightFormat):
        bits = 4

        def choose_params(self, groups):
            if groups.shape[-1] % 2:
                raise ValueError("odd group size")
            return groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 7, None

        def quantize(self, groups, scale, zero_point):
            return (torch.round(groups / scale).clamp(-7, 7) + 8).to(torch.uint8)

        def dequantize(self, codes, scale, zero_point):
            return (codes.float() - 8) * scale.float()

    llmopt.register_format("test_qat_even")(NeedsEvenGroups)
    try:
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 7), nn.ReLU(), nn.Linear(7, 5))
        snap = snapshot(model)
        with pytest.raises(CompressionError, match="layer '4'.*odd group size"):
            llmopt.compress_(model, QAT("test_qat_even", None))
        snap.check()
        # The same user format works end to end where it can.
        llmopt.compress_(model, QAT("test_qat_even", 32), exclude=["4"])
        x = torch.randn(3, 64)
        with torch.no_grad():
            expected = model(x)
        llmopt.compress_(model, QAT(step="convert", kernel="reference"))
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        assert model[0].format.name == "test_qat_even"
    finally:
        unregister_format("test_qat_even")


def test_convert_all_or_nothing():
    model = ToyMLP()
    llmopt.compress_(model, QAT("int4", 32))
    names = list(qat_layers(model))
    with torch.no_grad():
        model.get_submodule(names[-1]).weight[1, 2] = float("inf")
    with pytest.raises(CompressionError, match=f"layer '{names[-1]}'.*NaN/Inf"):
        llmopt.compress_(model, QAT(step="convert"))
    assert list(qat_layers(model)) == names  # nothing converted
    with torch.no_grad():
        model.get_submodule(names[-1]).weight[1, 2] = 0.0
    # An explicit kernel that cannot serve a layer (nf4 has no int4pack path): named, nothing converted.
    model2 = ToyMLP()
    llmopt.compress_(model2, QAT("nf4", 32))
    with pytest.raises(CompressionError, match="int4pack_cpu"):
        llmopt.compress_(model2, QAT(step="convert", kernel="int4pack_cpu"))
    assert len(qat_layers(model2)) == len(names)
    with pytest.raises(ValueError, match="unknown kernel"):
        llmopt.compress_(model2, QAT(step="convert", kernel="nope"))
    with pytest.raises(ValueError, match="no QATLinear"):
        llmopt.compress_(nn.Sequential(nn.Linear(4, 4)), QAT(step="convert"))


def test_train_convert_save_load_round_trip(tmp_path, bit_equal):
    torch.manual_seed(7)
    model = ToyTransformer()
    llmopt.compress_(model, QAT("int3", 32), exclude=["lm_head"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(2):
        opt.zero_grad()
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
        opt.step()
    # A training checkpoint (QATLinear layers) saves and loads too.
    llmopt.save(model, tmp_path / "ckpt")
    torch.manual_seed(1)
    ckpt = llmopt.load(ToyTransformer(), tmp_path / "ckpt")
    assert set(qat_layers(ckpt)) == set(qat_layers(model))
    with torch.no_grad():
        assert bit_equal(ckpt(ids), model(ids))
        expected = model(ids)
    llmopt.compress_(model, QAT(step="convert"))
    with torch.no_grad():
        assert _rel_err(model(ids), expected) < 1e-2
    llmopt.save(model, tmp_path / "final")
    torch.manual_seed(2)
    loaded = llmopt.load(ToyTransformer(), tmp_path / "final")
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(bit_equal(sa[key], sb[key]) for key in sa)
    with torch.no_grad():
        assert bit_equal(loaded(ids), model(ids))


def test_w8a8_path():
    model = ToyMLP()
    report = llmopt.compress_(model, QAT("int8", None, symmetric=True, act_bits=8))
    assert report.methods[0]["act_bits"] == 8
    layer = next(iter(qat_layers(model).values()))
    assert "a8" in layer.describe() and "act_bits=8" in repr(layer)
    x = torch.randn(5, 96)
    y = model(x)
    y.sum().backward()  # gradients flow through the activation STE
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        expected = model(x)
        # The activations are fake-quantized per token before the fake-quantized weight.
        first = model.get_submodule(next(iter(qat_layers(model))))
        torch.testing.assert_close(first(x), F.linear(fake_quantize_activations(x, 8),
                                                      first.dequantize_weight(), first.bias), rtol=0, atol=0)
    llmopt.compress_(model, QAT(step="convert"))  # auto: int8_dynamic_cpu (torch._int_mm) where available
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant and all(m.act_bits == 8 for m in quant)
    with torch.no_grad():
        assert _rel_err(model(x), expected) < 1e-2
        for m in quant:
            m.set_kernel("reference")
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_prepared_layer_repr_and_dtype_moves():
    model = ToyMLP()
    llmopt.compress_(model, QAT("fp4_e2m1", 32, scale_dtype="float32"))
    layer = next(iter(qat_layers(model).values()))
    assert "format=fp4_e2m1" in repr(layer) and "scale_dtype=float32" in repr(layer)
    model.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    llmopt.compress_(model, QAT(step="convert", kernel="reference"))
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_convert_uses_each_layer_own_settings_not_the_config_fields():
    """A convert config's format fields are not used: every layer converts with what it trained with
    (here per-layer overrides at prepare), so the converted model computes the same function."""
    model = ToyMLP()
    llmopt.compress_(model, llmopt.Stage(QAT("int4", 32), overrides={"down": {"format": "int8", "group_size": None}}))
    assert model.down.format.name == "int8" and model.up.format.name == "int4"
    x = torch.randn(3, 96)
    with torch.no_grad():
        expected = model(x)
    report = llmopt.compress_(model, QAT("nf4", 128, step="convert", kernel="reference"))
    assert (model.up.format.name, model.up.group_size) == ("int4", 32)
    assert (model.down.format.name, model.down.group_size) == ("int8", model.down.in_features)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert report.layer_configs["up"] == [QAT("nf4", 128, step="convert", kernel="reference").to_dict()]


def test_qat_in_a_recipe_and_shared_weight_note():
    """QAT is a recipe stage like any method; a tied head's shared weight is noted at prepare."""
    recipe = llmopt.Recipe.from_dict({"stages": [{"method": "qat", "format": "int4", "group_size": 32}]})
    model = ToyTransformer()
    report = llmopt.compress_(model, recipe)
    assert isinstance(model.lm_head, QATLinear) and model.lm_head.weight is model.embed.weight
    assert any("lm_head.weight is shared with embed.weight" in note for note in report.notes)
    assert not any("memory grows" in note for note in report.notes)  # same Parameter: nothing duplicated
    assert llmopt.Recipe.from_dict(model._llmopt_recipe) == recipe


def test_prepare_qat_and_convert_qat_still_work_and_warn():
    model = ToyMLP()
    with pytest.warns(DeprecationWarning, match=r"compress_\(model, llmopt\.QAT\(format, group_size\)\)"):
        prepare = llmopt.prepare_qat_
    report = prepare(model, get_format("int4", symmetric=True), 32, scale_dtype=torch.float32)
    assert set(report.replaced) == {"up", "down"} and model.up.format == get_format("int4", symmetric=True)
    assert model.up.scale_dtype == torch.float32
    with pytest.warns(DeprecationWarning, match=r"QAT\(step='convert'\)"):
        convert = llmopt.convert_qat_
    report = convert(model, kernel="reference")
    assert set(report.replaced) == {"up", "down"} and isinstance(model.up, QuantLinear)
