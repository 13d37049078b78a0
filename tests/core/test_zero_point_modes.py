"""Zero-point modes of the affine formats (issue 14): "int" (an integer zero point, as GPTQ/AWQ
checkpoints and compressed-tensors store it) and "min" (GGUF Q4_1's minimum in the scale dtype).

The stored parameters must map bit for bit onto those conventions: ``w = (q - zp) * s`` with an
integer ``zp`` in ``[0, 2**bits)``, and ``w = q * s + m`` with ``m`` representable in the scale dtype,
checked against a float64 evaluation of the target formula.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.core.formats import get_format
from llmopt.core.primitives import dequantize_weight, quantize_weight
from llmopt.testing import ToyMLP

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE_DTYPES = [torch.float16, torch.bfloat16]


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 6), groups=st.integers(1, 4),
       group_size=st.sampled_from([8, 32, 64]), dtype=st.sampled_from(SCALE_DTYPES),
       offset=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_int_mode_is_an_integer_zero_point_exactly(bits, rows, groups, group_size, dtype, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * group_size, generator=gen) + offset
    fmt = get_format(f"int{bits}", zero_point="int")
    q = quantize_weight(w, fmt, group_size, dtype)
    assert q.scale.dtype == dtype and q.zero_point.dtype == torch.float32
    s = q.scale.to(torch.float64)
    zp = fmt.mid - q.zero_point.to(torch.float64) / s
    assert torch.equal(zp, zp.round()) and zp.min() >= 0 and zp.max() <= fmt.qmax
    ours = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, group_size, torch.float32)
    codes = q.codes.to(torch.float64).view(rows, groups, group_size)
    reference = ((codes - zp.unsqueeze(-1)) * s.unsqueeze(-1)).view(rows, -1)
    assert torch.equal(ours.to(torch.float64), reference)  # exact: no rounding anywhere
    # 0.0 is on the grid (the range includes it), so the error is at most half a step plus what the
    # scale's rounding to its dtype shifts the far end of the grid (qmax steps of half an ulp).
    step = s.repeat_interleave(group_size, dim=1)
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert bool(((ours.double() - w.double()).abs() <= step * (0.5 + fmt.qmax * ulp) + 1e-6).all())


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 6), groups=st.integers(1, 4),
       group_size=st.sampled_from([8, 32, 64]), dtype=st.sampled_from(SCALE_DTYPES),
       offset=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_min_mode_stores_a_representable_minimum(bits, rows, groups, group_size, dtype, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * group_size, generator=gen) * 0.05 + offset
    fmt = get_format(f"int{bits}", zero_point="min")
    q = quantize_weight(w, fmt, group_size, dtype)
    s = q.scale.to(torch.float32)
    m = q.zero_point - fmt.mid * s
    assert torch.equal(m.to(dtype).to(torch.float32), m)  # the minimum fits the scale dtype
    ours = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, group_size, torch.float32)
    codes = q.codes.to(torch.float64).view(rows, groups, group_size)
    reference = (codes * s.double().unsqueeze(-1) + m.double().unsqueeze(-1)).view(rows, -1)
    assert torch.allclose(ours.double(), reference, rtol=0, atol=0)


def test_float_mode_is_unchanged_and_not_written():
    assert get_format("int4").to_dict() == {"name": "int4"}
    assert get_format("int4", zero_point="float").to_dict() == {"name": "int4"}
    assert get_format("int4", zero_point="int").to_dict() == {"name": "int4", "zero_point": "int"}
    w = torch.randn(8, 64)
    a = quantize_weight(w, get_format("int4"), 32, torch.bfloat16)
    b = quantize_weight(w, get_format("int4", zero_point="float"), 32, torch.bfloat16)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zero_point, b.zero_point)
    assert a.zero_point.dtype == torch.bfloat16
    assert "zero_point" not in llmopt.RTN("int4", 32).to_dict()
    assert llmopt.RTN("int4", 32, zero_point="int").to_dict()["zero_point"] == "int"


@pytest.mark.parametrize("bad", [dict(symmetric=True, zero_point="int"), dict(zero_point="integer")])
def test_invalid_modes_are_refused(bad):
    with pytest.raises(ValueError, match="zero_point"):
        llmopt.RTN("int4", 32, **bad)
    with pytest.raises(ValueError, match="zero_point|does not accept"):
        llmopt.RTN("nf4", 64, zero_point="int")


def _calibration():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, ToyMLP().up.in_features, generator=gen) for _ in range(2)]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "hqq"])
@pytest.mark.parametrize("mode", ["int", "min"])
def test_methods_produce_mappable_parameters_and_round_trip(tmp_path, method, mode):
    torch.manual_seed(0)
    model = ToyMLP()
    kwargs = dict(format="int4", group_size=32, scale_dtype="float16", zero_point=mode)
    config = {"rtn": llmopt.RTN, "gptq": llmopt.GPTQ, "awq": llmopt.AWQ, "hqq": llmopt.HQQ}[method](**kwargs)
    calibration = _calibration() if config.needs_calibration else None
    llmopt.compress_(model, config, calibration=calibration)
    for name in ("up", "down"):
        layer = getattr(model, name)
        state = layer.canonical_state()
        s, z = state["scale"].to(torch.float32), state["zero_point"]
        assert z.dtype == torch.float32
        if mode == "int":
            zp = 8 - z / s
            assert torch.equal(zp, zp.round()), name
        else:
            m = z - 8 * s
            assert torch.equal(m.half().float(), m), name
    llmopt.save(model, tmp_path)
    loaded = llmopt.load(ToyMLP(), tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.up.format.to_dict() == {"name": "int4", "zero_point": mode}


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 6), group_size=st.sampled_from([8, 32]),
       seed=st.integers(0, 2**16))
def test_full_range_puts_the_extreme_on_the_lowest_code(bits, rows, group_size, seed):
    """llama.cpp's Q4_0 grid: scale = -w_extreme / 2**(bits-1), so the extreme weight is exact on code 0."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 2 * group_size, generator=gen)
    fmt = get_format(f"int{bits}", symmetric=True, full_range=True)
    q = quantize_weight(w, fmt, group_size, torch.float32)
    groups = w.view(rows, 2, group_size).double()
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(q.scale.double(), -extreme / fmt.mid, rtol=1e-6)
    ours = dequantize_weight(q.codes, q.scale, None, fmt, group_size, torch.float32).double()
    reference = ((q.codes.double().view(rows, 2, group_size) - fmt.mid) * q.scale.double().unsqueeze(-1))
    assert torch.allclose(ours, reference.view(rows, -1), rtol=1e-6, atol=0)
    assert bool((q.codes.view(rows, 2, group_size).gather(-1, groups.abs().argmax(-1, keepdim=True)) == 0).all())


def test_full_range_has_less_error_than_absmax_grid_on_gaussian_weights():
    """Not a per-group property (the side opposite the extreme can clip by one step), but on a large
    Gaussian matrix the finer step wins: measured about 21% less squared error at int4 g32."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    errors = {}
    for full in (False, True):
        fmt = get_format("int4", symmetric=True, full_range=full)
        q = quantize_weight(w, fmt, 32, torch.float32)
        errors[full] = float((dequantize_weight(q.codes, q.scale, None, fmt, 32) - w).square().mean())
    assert errors[True] < 0.85 * errors[False]


def test_full_range_needs_symmetric():
    with pytest.raises(ValueError, match="full_range"):
        llmopt.RTN("int4", 32, full_range=True)
    assert "full_range" not in llmopt.RTN("int4", 32, symmetric=True).to_dict()
    assert llmopt.RTN("int4", 32, symmetric=True, full_range=True).scheme.label() == "int4 sym full g32"

