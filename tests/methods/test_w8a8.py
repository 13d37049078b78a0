"""W8A8 (dynamic per-token int8 activations, ``int8_dynamic_cpu``) and the float32 ``input_scale``.

References are float64 and built by hand (per-token absmax / 127 rounding of the activations, codes
times scales for the weight); tolerances are stated next to each comparison.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.kernels import get_kernel
from llmopt.nn import QuantLinear
from llmopt.core.cpu import cpu_info
from llmopt.core.formats import get_format
from llmopt.core.primitives import fake_quantize_activations, quantize_activations, quantize_weight
from llmopt.testing import ToyMLP

INT8_SYM = get_format("int8", symmetric=True)
INT4 = get_format("int4")
EPS32 = 2.0 ** -24  # float32 unit roundoff
# Kernels that round activations to bf16 (int4pack_cpu, int8pack_cpu) or compute in bf16: norm-wise
# relative error against float64, as in test_kernels.py.
BF16_TOL = 1e-2


# ------------------------------------------------------------------------------------------ helpers

# Both W8A8 kernels compute the same arithmetic; "auto" prefers the prepacked oneDNN one on CPUs with
# AMX-INT8, the only ones where it is fast (the suite runs "auto" without its speed probe: conftest).
W8A8_KERNELS = ("int8_dynamic_cpu", "int8_onednn_cpu")
AUTO_W8A8 = "int8_onednn_cpu" if cpu_info().has("amx_int8") else "int8_dynamic_cpu"


@pytest.fixture(params=W8A8_KERNELS, scope="module")  # module scope: hypothesis tests use it too
def w8a8_kernel(request):
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight_codes(n, k, fmt=INT8_SYM, group_size=None, seed=0, scale_dtype=torch.bfloat16):
    weight = torch.randn(n, k, generator=_gen(seed)) / k ** 0.5
    return quantize_weight(weight, fmt, group_size, scale_dtype)


def _bias(n, seed=0):
    return torch.randn(n, generator=_gen(seed + 1))


def _layer(n, k, kernel="auto", *, fmt=INT8_SYM, group_size=None, bias=True, act_bits=8, input_scale=None,
           seed=0, scale_dtype=torch.bfloat16, dtype=torch.float32):
    q = _weight_codes(n, k, fmt, group_size, seed, scale_dtype)
    return QuantLinear.from_codes(q.codes, q.scale, q.zero_point, format=fmt, group_size=q.group_size,
                                  bias=_bias(n, seed) if bias else None, dtype=dtype, kernel=kernel,
                                  input_scale=input_scale, act_bits=act_bits)


def _int8_weight64(n, k, seed=0, scale_dtype=torch.bfloat16):
    """The symmetric int8 per-channel weight by hand: (code - 128) * scale, in float64."""
    q = _weight_codes(n, k, INT8_SYM, None, seed, scale_dtype)
    return (q.codes.double() - 128) * q.scale.double()


def _quantize_rows64(x):
    """Per-token symmetric int8 in float64: scale = absmax / 127 (1 for an all-zero row), codes rounded."""
    x64 = x.double()
    absmax = x64.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    return torch.round(x64 / scale).clamp(-127, 127), scale


def _assert_codes_match_reference(x, codes, scale):
    """Codes equal the float64 ones except where x / scale is within float32 rounding of a tie."""
    ref_codes, ref_scale = _quantize_rows64(x)
    # absmax / 127 in float32 is the correctly rounded float64 quotient: within one float32 ulp.
    assert torch.allclose(scale.double(), ref_scale, rtol=2 * EPS32, atol=0)
    t = x.double() / ref_scale
    near_tie = ((t - t.floor()) - 0.5).abs() < 1e-4  # float32 quotient error <= 127 * 2**-24 ~ 8e-6
    diff = (codes.double() - ref_codes).abs()
    assert diff.max().item() <= 1
    assert torch.equal(codes.double()[~near_tie], ref_codes[~near_tie])


def _tie_free_rows(m, k, seed=0):
    """Activations whose per-token quantization is unambiguous: row r is ``(c + u) * 2**e_r`` with
    integer codes ``c`` in [-126, 126], ``|u| <= 0.4`` and one entry exactly ``+-127 * 2**e_r``, so the
    scale is exactly ``2**e_r`` and the codes are exactly ``c`` (no float32 rounding tie anywhere).
    Returns ``(x float32, c float64, e)``."""
    gen = _gen(seed)
    c = torch.randint(-126, 127, (m, k), generator=gen).double()
    u = (torch.rand(m, k, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    col = torch.randint(0, k, (m,), generator=gen)
    sign = torch.where(torch.rand(m, generator=gen) < 0.5, -1.0, 1.0).double()
    c[torch.arange(m), col] = 127 * sign
    u[torch.arange(m), col] = 0
    e = torch.randint(-8, 8, (m, 1), generator=gen).double()
    x = ((c + u) * 2.0 ** e).float()
    return x, c, e


def _magnitude(xq64, w64, bias):
    """|x_q| @ |W|.T (+ |bias|): the scale of float32 rounding errors of a W8A8 output."""
    mag = xq64.abs() @ w64.abs().T
    return mag + bias.double().abs() if bias is not None else mag


def _rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


# ------------------------------------------------------------------------- quantize_activations
def test_quantize_activations_matches_float64_reference():
    # Rows spanning twelve orders of magnitude: the scale is per token.
    x = torch.randn(64, 300, generator=_gen(1)) * torch.logspace(-6, 6, 64).unsqueeze(1)
    codes, scale = quantize_activations(x, 8)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (64, 1)
    _assert_codes_match_reference(x, codes, scale)
    # Round to nearest: every value within half a step of its code (plus float32 rounding).
    err = (x.double() - codes.double() * scale.double()).abs()
    assert (err <= scale.double() * (0.5 + 1e-5)).all()
    # fake_quantize_activations is exactly codes * scale, in the input dtype.
    fq = fake_quantize_activations(x, 8)
    assert fq.dtype == torch.float32 and torch.equal(fq, codes.float() * scale)


def test_quantize_activations_exact_on_tie_free_rows():
    x, c, e = _tie_free_rows(16, 50, seed=3)
    codes, scale = quantize_activations(x)
    assert torch.equal(scale.double(), 2.0 ** e)
    assert torch.equal(codes.double(), c)


def test_quantize_activations_zero_rows():
    x = torch.randn(5, 33, generator=_gen(2))
    x[1] = 0.0
    x[3] = -0.0
    codes, scale = quantize_activations(x)
    for row in (1, 3):
        assert scale[row].item() == 1.0
        assert not codes[row].any()
    # The other rows are quantized as if alone.
    for row in (0, 2, 4):
        alone_codes, alone_scale = quantize_activations(x[row:row + 1])
        assert torch.equal(codes[row:row + 1], alone_codes) and torch.equal(scale[row:row + 1], alone_scale)
    fq = fake_quantize_activations(x)
    assert torch.isfinite(fq).all() and not fq[1].any() and not fq[3].any()
    all_zero_codes, all_zero_scale = quantize_activations(torch.zeros(2, 7))
    assert not all_zero_codes.any() and torch.equal(all_zero_scale, torch.ones(2, 1))


@pytest.mark.parametrize("shape", [(17,), (1, 17), (2, 3, 17), (2, 3, 5, 17), (0, 17)])
def test_quantize_activations_leading_dims(shape):
    x = torch.randn(*shape, generator=_gen(4))
    codes, scale = quantize_activations(x)
    assert codes.shape == x.shape and codes.dtype == torch.int8
    assert scale.shape == (*shape[:-1], 1) and scale.dtype == torch.float32
    flat_codes, flat_scale = quantize_activations(x.reshape(-1, 17))
    assert torch.equal(codes.reshape(-1, 17), flat_codes)
    assert torch.equal(scale.reshape(-1, 1), flat_scale)
    assert fake_quantize_activations(x).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_quantize_activations_other_dtypes(dtype):
    x = torch.randn(6, 40, generator=_gen(5)).to(dtype)
    codes, scale = quantize_activations(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    if dtype != torch.float64:  # bf16/fp16 values are exact in float32: same result as float32 input
        ref_codes, ref_scale = quantize_activations(x.float())
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    assert fake_quantize_activations(x).dtype == dtype


@pytest.mark.parametrize("bits", [0, 1, 4, 7, 16, None])
def test_quantize_activations_invalid_bits(bits):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="bits"):
        quantize_activations(x, bits)
    with pytest.raises(ValueError, match="bits"):
        fake_quantize_activations(x, bits)


@pytest.mark.parametrize("bits", [4, 16, 0])
def test_quant_linear_rejects_invalid_act_bits(bits):
    with pytest.raises(ValueError, match="act_bits"):
        QuantLinear(32, 16, format=INT8_SYM, group_size=None, act_bits=bits)
    q = _weight_codes(16, 32)
    with pytest.raises(ValueError, match="act_bits"):
        QuantLinear.from_codes(q.codes, q.scale, None, format=INT8_SYM, group_size=None, act_bits=bits)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), k=st.integers(1, 96), log_mag=st.integers(-30, 30), seed=st.integers(0, 10_000),
       zero_row=st.booleans())
def test_quantize_activations_properties(m, k, log_mag, seed, zero_row):
    x = torch.randn(m, k, generator=_gen(seed)) * 2.0 ** log_mag
    if zero_row:
        x[m // 2] = 0
    codes, scale = quantize_activations(x, 8)
    assert codes.shape == (m, k) and scale.shape == (m, 1)
    assert codes.abs().max().item() <= 127
    assert (scale > 0).all() and torch.isfinite(scale).all()
    # Every non-zero row uses the full grid: its absmax entry maps to +-127.
    nonzero = x.abs().amax(dim=-1) > 0
    assert (codes.abs().amax(dim=-1)[nonzero] == 127).all()
    err = (x.double() - codes.double() * scale.double()).abs()
    assert (err <= scale.double() * (0.5 + 1e-5)).all()
    _assert_codes_match_reference(x, codes, scale)


# ---------------------------------------------------------------- int8_dynamic_cpu vs references
# (N, K): K not a multiple of 8 or 16 in most cases, N odd in some, N = 1, K = 1.
SHAPES = [(64, 96), (40, 77), (24, 13), (17, 2), (17, 1), (1, 5), (33, 200), (48, 130)]


def _exact_w8a8(layer_x, n, k, bias, seed=0):
    """float64 output from the layer's own activation codes/scales and the hand-built weight."""
    codes, scale = quantize_activations(layer_x.reshape(-1, k))
    xq64 = codes.double() * scale.double()
    w64 = _int8_weight64(n, k, seed)
    ref = xq64 @ w64.T
    if bias is not None:
        ref = ref + bias.double()
    return ref, _magnitude(xq64, w64, bias)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_int8_dynamic_equals_reference_kernel_float32(n, k, bias, lead, w8a8_kernel):
    fast = _layer(n, k, w8a8_kernel, bias=bias)
    ref = _layer(n, k, "reference", bias=bias)
    assert fast.kernel.name == w8a8_kernel and ref.kernel.name == "reference"
    x = torch.randn(*lead, k, generator=_gen(7))
    y, y_ref = fast(x), ref(x)
    assert y.shape == (*lead, n) and y.dtype == torch.float32 and y_ref.shape == y.shape
    exact, mag = _exact_w8a8(x, n, k, fast.bias)
    exact, mag = exact.reshape(*lead, n), mag.reshape(*lead, n)
    # int8_dynamic_cpu: the int32 accumulation is exact; then two float32 products and the bias add
    # (3 roundings): |error| <= 4 * u * (|x_q| @ |W|.T + |b|).
    assert ((y.double() - exact).abs() <= 4 * EPS32 * mag + 1e-30).all()
    # Reference kernel (fake-quantized x, float32 F.linear): accumulation error <= (K + 2) * u * mag.
    assert ((y_ref.double() - exact).abs() <= (k + 2) * EPS32 * mag + 1e-30).all()
    assert ((y.double() - y_ref.double()).abs() <= (k + 6) * EPS32 * mag + 1e-30).all()


@pytest.mark.parametrize("n,k", [(64, 96), (40, 77), (24, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_dynamic_matches_hand_float64_reference(n, k, bias, w8a8_kernel):
    """Against a reference that owes nothing to the library: float64 per-token quantization of x."""
    layer = _layer(n, k, w8a8_kernel, bias=bias)
    x, c, e = _tie_free_rows(9, k, seed=11)
    codes64, scale64 = _quantize_rows64(x)
    assert torch.equal(codes64, c) and torch.equal(scale64, 2.0 ** e)  # the reference itself is exact
    w64 = _int8_weight64(n, k)
    xq64 = codes64 * scale64
    b = _bias(n) if bias else None
    expected = xq64 @ w64.T + (b.double() if bias else 0)
    mag = _magnitude(xq64, w64, b)
    y = layer(x)
    # Exact int32 accumulation (K * 127 * 127 < 2**24, so also exact in float32), then the scales
    # and the bias: 3 roundings.
    assert ((y.double() - expected).abs() <= 4 * EPS32 * mag + 1e-30).all()
    # 1-D input: the same row, same bits.
    assert torch.equal(layer(x[3]), y[3])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)])
def test_int8_dynamic_bfloat16_inputs(bias, lead, w8a8_kernel):
    n, k = 48, 77
    fast = _layer(n, k, w8a8_kernel, bias=bias)
    ref = _layer(n, k, "reference", bias=bias)
    x = torch.randn(*lead, k, generator=_gen(8)).to(torch.bfloat16)
    y = fast(x)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, n)
    # bf16 values are exact in float32, and the kernel quantizes and accumulates in float32: the bf16
    # output is the float32 output rounded once.
    assert torch.equal(y, fast(x.float()).to(torch.bfloat16))
    # Against the reference kernel on the same (float32) values: one bf16 output rounding (2**-9
    # relative) on top of the float32 tolerance.
    y_ref32 = ref(x.float())
    exact, mag = _exact_w8a8(x.float(), n, k, fast.bias)
    exact, mag = exact.reshape(*lead, n), mag.reshape(*lead, n)
    assert ((y.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + (k + 6) * EPS32 * mag + 1e-30).all()
    assert ((y.double() - y_ref32.double()).abs() <= 2.0 ** -8 * exact.abs() + (k + 6) * EPS32 * mag).all()
    # The reference kernel run in bf16 rounds activations, weights and output to bf16.
    y_ref16 = ref(x)
    assert y_ref16.dtype == torch.bfloat16 and _rel_err(y_ref16, exact) < BF16_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_int8_dynamic_layer_cast_to_other_dtypes(dtype, w8a8_kernel):
    n, k = 32, 45
    fast = _layer(n, k, w8a8_kernel).to(dtype)
    ref = _layer(n, k, "reference").to(dtype)
    assert fast.kernel.name == w8a8_kernel and fast.bias.dtype == dtype
    x = torch.randn(3, k, generator=_gen(9)).to(dtype)
    y = fast(x)
    assert y.dtype == dtype
    exact, mag = _exact_w8a8(x, n, k, fast.bias)
    tol = 2.0 ** -8 if dtype != torch.float64 else 4 * EPS32
    assert ((y.double() - exact).abs() <= tol * exact.abs() + (k + 6) * EPS32 * mag + 1e-30).all()
    assert _rel_err(ref(x), exact) < BF16_TOL


def test_int8_dynamic_zero_input_gives_bias_and_empty_batch(w8a8_kernel):
    layer = _layer(24, 40, w8a8_kernel)
    y = layer(torch.zeros(3, 40))
    assert torch.equal(y, layer.bias.expand(3, 24))
    assert layer(torch.zeros(0, 40)).shape == (0, 24)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 70), m=st.integers(1, 9), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_int8_dynamic_equals_reference_any_shape(n, k, m, bias, seed, w8a8_kernel):
    fast = _layer(n, k, w8a8_kernel, bias=bias, seed=seed)
    ref = _layer(n, k, "reference", bias=bias, seed=seed)
    x = torch.randn(m, k, generator=_gen(seed + 2))
    y, y_ref = fast(x), ref(x)
    exact, mag = _exact_w8a8(x, n, k, fast.bias, seed=seed)
    assert ((y.double() - exact).abs() <= 4 * EPS32 * mag + 1e-30).all()
    assert ((y.double() - y_ref.double()).abs() <= (k + 6) * EPS32 * mag + 1e-30).all()


@pytest.mark.parametrize("n", [1, 2, 17])
def test_int8_dynamic_in_features_one(n, w8a8_kernel):
    # Regression: with K == 1 the transposed weight [1, N] kept strides (1, 1) (.t().contiguous() is a
    # no-op on it) and torch._int_mm on CPU returned garbage.
    fast = _layer(n, 1, w8a8_kernel)
    x = torch.randn(3, 1, generator=_gen(14))
    exact, mag = _exact_w8a8(x, n, 1, fast.bias)
    assert ((fast(x).double() - exact).abs() <= 4 * EPS32 * mag + 1e-30).all()


def test_int8_dynamic_runtime_layout_and_bytes():
    n, k = 40, 77
    layer = _layer(n, k, "int8_dynamic_cpu", bias=False)
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"qdata", "scale"}
    assert buffers["qdata"].dtype == torch.int8 and buffers["qdata"].shape == (k, n)
    assert buffers["scale"].dtype == torch.float32 and buffers["scale"].shape == (n,)
    assert layer.stored_bytes() == n * k + 2 * n  # canonical: uint8 codes + one bf16 scale per row
    assert layer.runtime_bytes() == n * k + 4 * n  # kernel layout: float32 scales
    assert layer.bits_per_weight() == pytest.approx(8 + 16 / k)


def test_int8_onednn_runtime_layout_and_bytes():
    n, k = 48, 100
    layer = _layer(n, k, "int8_onednn_cpu", bias=False)
    buffers = dict(layer.named_buffers())
    # One opaque prepacked copy of the int8 codes, [K, N]; to_dense() gives them back exactly.
    assert buffers["qdata"].is_mkldnn and buffers["qdata"].dtype == torch.int8
    assert tuple(buffers["qdata"].shape) == (k, n)
    assert torch.equal(buffers["qdata"].to_dense().t().contiguous().view(torch.uint8) ^ 0x80, layer.codes())
    assert buffers["scale"].dtype == torch.float32 and buffers["scale"].shape == (n,)
    assert layer.stored_bytes() == n * k + 2 * n
    assert layer.runtime_bytes() == n * k + 4 * n + 8 * n  # + int64 zero weight zero points oneDNN asks for
    assert set(layer.state_dict()) == {"qdata", "scale"}  # state_dict stays canonical
    assert layer.state_dict()["qdata"].dtype == torch.uint8 and not layer.state_dict()["qdata"].is_mkldnn


def test_int8_onednn_deepcopy_and_clone_module():
    import copy
    layer = _layer(32, 64, "int8_onednn_cpu")
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 64, generator=_gen(50))
    assert twin.kernel.name == "int8_onednn_cpu" and torch.equal(twin(x), layer(x))


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_dynamic_layout_round_trip_exact(scale_dtype, bit_equal, w8a8_kernel):
    fast = _layer(40, 77, w8a8_kernel, scale_dtype=scale_dtype)
    ref = _layer(40, 77, "reference", scale_dtype=scale_dtype)
    assert fast.kernel.name == w8a8_kernel
    for key, value in ref.canonical_state().items():
        assert bit_equal(fast.canonical_state()[key], value), key
    assert torch.equal(fast.codes(), ref.codes())
    assert torch.equal(fast.dequantize_weight(torch.float64), ref.dequantize_weight(torch.float64))
    by_hand = _int8_weight64(40, 77, scale_dtype=scale_dtype)
    if scale_dtype == torch.float32:  # code * scale needs up to 31 bits: one float32 rounding
        assert torch.allclose(fast.dequantize_weight(torch.float64), by_hand, rtol=EPS32, atol=0)
    else:  # 7-bit code times an 8/11-bit mantissa: exact in float32
        assert torch.equal(fast.dequantize_weight(torch.float64), by_hand)
    kernel = get_kernel(w8a8_kernel)
    canonical = ref.canonical_state()
    back = kernel.to_canonical(ref.kernel_spec, kernel.to_runtime(ref.kernel_spec, canonical))
    for key in canonical:
        assert bit_equal(back[key], canonical[key]), key


def test_int8_dynamic_set_kernel_round_trip(bit_equal):
    layer = _layer(48, 100, "auto")
    assert layer.kernel.name == AUTO_W8A8
    canonical = {k: v.clone() for k, v in layer.canonical_state().items()}
    x = torch.randn(4, 100, generator=_gen(12))
    fast = layer(x)
    layer.set_kernel("reference")
    assert layer.kernel.name == "reference" and layer.act_bits == 8
    _, mag = _exact_w8a8(x, 48, 100, layer.bias)
    assert ((layer(x).double() - fast.double()).abs() <= 106 * EPS32 * mag).all()  # (K + 6) * u
    layer.set_kernel("auto")
    assert layer.kernel.name == AUTO_W8A8
    for key, value in layer.canonical_state().items():
        assert bit_equal(value, canonical[key]), key
    assert torch.equal(layer(x), fast)


# -------------------------------------------------------------------------------- kernel choice
def test_auto_picks_int8_dynamic_for_w8a8_layers():
    assert _layer(64, 96).kernel.name == AUTO_W8A8
    assert _layer(17, 13).kernel.name == AUTO_W8A8  # no alignment requirement
    # Scales of any dtype: the kernel holds them in float32 (exact for bf16/fp16/fp32).
    assert _layer(64, 96, scale_dtype=torch.float32).kernel.name == AUTO_W8A8
    assert _layer(64, 96, bias=False, input_scale=torch.ones(96)).kernel.name == AUTO_W8A8


INT8_ASYM = get_format("int8")
NOT_W8A8 = [
    # (format, group_size, act_bits, why int8_dynamic_cpu cannot serve it)
    (INT8_SYM, None, None, "act_bits"),
    (INT8_ASYM, None, 8, "symmetric"),
    (INT8_SYM, 32, 8, "group_size"),
    (get_format("int4", symmetric=True), 32, 8, "symmetric 8-bit"),
    (get_format("int4"), None, 8, "symmetric 8-bit"),
    (get_format("nf4"), 32, 8, "symmetric 8-bit"),
]


@pytest.mark.parametrize("fmt,gs,act_bits,reason", NOT_W8A8,
                         ids=["no-act-bits", "int8-asym", "int8-g32", "int4-sym", "int4-pc", "nf4"])
def test_int8_dynamic_not_chosen_otherwise(fmt, gs, act_bits, reason, w8a8_kernel):
    n, k = 64, 96
    auto = _layer(n, k, "auto", fmt=fmt, group_size=gs, act_bits=act_bits)
    assert auto.kernel.name not in W8A8_KERNELS
    # Whatever kernel serves it, the layer computes the same function as the reference kernel
    # (with fake-quantized activations when act_bits is set).
    ref = _layer(n, k, "reference", fmt=fmt, group_size=gs, act_bits=act_bits)
    x = torch.randn(5, k, generator=_gen(13))
    xq = fake_quantize_activations(x) if act_bits else x
    expected = F.linear(xq.double(), ref.dequantize_weight(torch.float64), ref.bias.double())
    assert torch.allclose(ref(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert _rel_err(auto(x), expected) < (BF16_TOL if auto.kernel.name != "reference" else 1e-6)
    # Naming the kernel explicitly is an error that says why.
    with pytest.raises(ValueError, match=w8a8_kernel + ".*" + reason):
        _layer(n, k, w8a8_kernel, fmt=fmt, group_size=gs, act_bits=act_bits)


def test_set_kernel_int8_dynamic_refused_leaves_layer_intact(bit_equal, w8a8_kernel, expected_auto_kernel):
    layer = _layer(64, 96, "auto", act_bits=None)
    kernel = layer.kernel.name
    assert kernel == expected_auto_kernel(layer) and kernel in ("lowbit_cpu", "int8pack_cpu")
    before = {k: v.clone() for k, v in layer.canonical_state().items()}
    with pytest.raises(ValueError, match="act_bits"):
        layer.set_kernel(w8a8_kernel)
    assert layer.kernel.name == kernel and layer.requested_kernel == "auto"
    for key, value in layer.canonical_state().items():
        assert bit_equal(value, before[key]), key


def test_int8_dynamic_needs_cpu(w8a8_kernel):
    layer = _layer(16, 32, "reference")
    reason = get_kernel(w8a8_kernel).unsupported_reason(layer.kernel_spec, torch.device("meta"))
    assert reason is not None and "CPU" in reason
    layer.to("meta")
    assert layer.kernel.name == "reference"


# ----------------------------------------------------------------------------------- input_scale
def _input_scale(k, seed=20):
    return torch.rand(k, generator=_gen(seed)) * 3.75 + 0.25  # AWQ-like positive scales in [0.25, 4]


def _scaled_pair(n, k, kernel, fmt=INT4, gs=32, act_bits=None, bias=True):
    """A layer with input_scale and its twin without (same codes)."""
    s = _input_scale(k)
    scaled = _layer(n, k, kernel, fmt=fmt, group_size=gs, act_bits=act_bits, bias=bias, input_scale=s)
    plain = _layer(n, k, kernel, fmt=fmt, group_size=gs, act_bits=act_bits, bias=bias)
    return scaled, plain, s


@pytest.mark.parametrize("fmt,gs", [(get_format("int4"), 32), (INT8_SYM, None), (get_format("nf4"), 64)])
def test_input_scale_forward_reference_kernel(fmt, gs):
    n, k = 48, 160
    scaled, plain, s = _scaled_pair(n, k, "reference", fmt, gs)
    assert scaled.input_scale.dtype == torch.float32 and torch.equal(scaled.input_scale, s)
    x = torch.randn(2, 5, k, generator=_gen(21))
    w_q = plain.dequantize_weight(torch.float64)
    expected = F.linear(x.double() * s.double(), w_q, scaled.bias.double())
    # float32: x * s rounded once, then a float32 matmul: 1e-5 as in test_quant_linear.py.
    assert torch.allclose(scaled(x).double(), expected, rtol=1e-5, atol=1e-5)
    # dequantize_weight is the equivalent weight W_q * s (one float32 product).
    assert torch.allclose(scaled.dequantize_weight(torch.float64), w_q * s.double(), rtol=2 * EPS32, atol=0)
    assert scaled.dequantize_weight().dtype == torch.float32
    assert torch.allclose(scaled.to_linear()(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,gs,kernel", [(get_format("int4"), 32, "int4pack_cpu"),
                                           (INT8_SYM, None, "int8pack_cpu"),
                                           (get_format("int4"), 32, "auto"),  # lowbit_cpu where built
                                           (INT8_SYM, None, "auto")])
def test_input_scale_forward_fast_kernels(fmt, gs, kernel, expected_auto_kernel):
    n, k = 64, 160
    scaled, plain, s = _scaled_pair(n, k, kernel, fmt, gs)
    expected_kernel = expected_auto_kernel(plain) if kernel == "auto" else kernel
    assert scaled.kernel.name == plain.kernel.name == expected_kernel != "reference"
    x = torch.randn(3, k, generator=_gen(22))
    expected = F.linear(x.double() * s.double(), plain.dequantize_weight(torch.float64), scaled.bias.double())
    assert _rel_err(scaled(x), expected) < BF16_TOL
    assert torch.equal(scaled(x), plain(x * s))  # the scale is applied to the input, then the same kernel


def test_input_scale_applied_before_activation_quantization(w8a8_kernel):
    n, k = 48, 77
    scaled, plain, s = _scaled_pair(n, k, w8a8_kernel, INT8_SYM, None, act_bits=8)
    assert scaled.kernel.name == w8a8_kernel
    x = torch.randn(4, k, generator=_gen(23))
    # (x * s) is quantized per token, not x: same bits as the plain layer fed x * s.
    assert torch.equal(scaled(x), plain(x * s))
    ref = _layer(n, k, "reference", act_bits=8, input_scale=s)
    exact, mag = _exact_w8a8(x * s, n, k, ref.bias)
    assert ((ref(x).double() - exact).abs() <= (k + 2) * EPS32 * mag + 1e-30).all()
    assert ((scaled(x).double() - exact).abs() <= 4 * EPS32 * mag + 1e-30).all()


@pytest.mark.parametrize("bad", [
    pytest.param(lambda k: torch.ones(k + 1), id="too-long"),
    pytest.param(lambda k: torch.ones(k - 1), id="too-short"),
    pytest.param(lambda k: torch.ones(1, k), id="2-D"),
    pytest.param(lambda k: torch.ones(k, 1), id="column"),
    pytest.param(lambda k: torch.tensor(1.0), id="scalar"),
    pytest.param(lambda k: torch.ones(k).index_fill_(0, torch.tensor([3]), 0.0), id="zero"),
    pytest.param(lambda k: torch.ones(k).index_fill_(0, torch.tensor([3]), -0.0), id="negative-zero"),
    pytest.param(lambda k: torch.ones(k).index_fill_(0, torch.tensor([5]), float("nan")), id="nan"),
    pytest.param(lambda k: torch.ones(k).index_fill_(0, torch.tensor([0]), float("inf")), id="inf"),
    pytest.param(lambda k: torch.ones(k).index_fill_(0, torch.tensor([0]), float("-inf")), id="-inf"),
    pytest.param(lambda k: torch.full((k,), 1e39, dtype=torch.float64), id="overflows-float32"),
])
def test_set_input_scale_rejects(bad, bit_equal):
    k = 32
    layer = _layer(16, k, "reference", input_scale=_input_scale(k))
    before = layer.input_scale.clone()
    with pytest.raises(ValueError, match="input_scale"):
        layer.set_input_scale(bad(k))
    assert bit_equal(layer.input_scale, before)


def test_set_input_scale_accepts_and_converts(w8a8_kernel):
    k = 32
    layer = _layer(16, k, w8a8_kernel, input_scale=torch.ones(k))
    s = _input_scale(k).double()
    layer.set_input_scale(s)
    assert layer.input_scale.dtype == torch.float32 and torch.equal(layer.input_scale, s.float())
    s[0] = 123.0  # the layer holds its own copy
    assert layer.input_scale[0].item() != 123.0
    negative = -_input_scale(k)  # only zero is forbidden, not a sign
    layer.set_input_scale(negative)
    assert torch.equal(layer.input_scale, negative)
    plain = _layer(16, k, "reference")
    assert plain.input_scale is None
    with pytest.raises(ValueError, match="input_scale=True"):
        plain.set_input_scale(torch.ones(k))


def test_input_scale_in_state_dict_config_and_bytes():
    n, k = 48, 96
    scaled, plain, s = _scaled_pair(n, k, "auto", INT8_SYM, None, act_bits=8)
    sd = scaled.state_dict()
    assert set(sd) == {"qdata", "scale", "bias", "input_scale"}
    assert sd["input_scale"].dtype == torch.float32 and torch.equal(sd["input_scale"], s)
    assert "input_scale" not in plain.state_dict()
    assert scaled.config()["input_scale"] is True and plain.config()["input_scale"] is False
    assert scaled.config()["act_bits"] == 8 and _layer(n, k, act_bits=None).config()["act_bits"] is None
    assert scaled.stored_bytes() == plain.stored_bytes() + 4 * k
    assert scaled.runtime_bytes() == plain.runtime_bytes() + 4 * k
    assert scaled.bits_per_weight() == plain.bits_per_weight()  # weights only
    fresh = QuantLinear.from_config(scaled.config())
    fresh.load_state_dict(sd)
    assert fresh.kernel.name == AUTO_W8A8 and torch.equal(fresh.input_scale, s)
    x = torch.randn(3, k, generator=_gen(24))
    assert torch.equal(fresh(x), scaled(x))
    with pytest.raises(RuntimeError, match="input_scale"):  # strict: a scaled layer needs its scale
        QuantLinear.from_config(scaled.config()).load_state_dict(plain.state_dict())


def test_load_state_dict_with_unexpected_input_scale_is_reported():
    n, k = 48, 96
    scaled, plain, _ = _scaled_pair(n, k, "reference", INT8_SYM, None)
    # Loading a scaled layer's state into a layer without an input scale would silently change the
    # function it computes: strict loading must complain about the extra key.
    with pytest.raises(RuntimeError, match="input_scale"):
        plain.load_state_dict(scaled.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_cast_keeps_input_scale_float32(dtype, bit_equal):
    n, k = 48, 96
    scaled, _, s = _scaled_pair(n, k, "auto", INT8_SYM, None, act_bits=8)
    canonical = {key: v.clone() for key, v in scaled.canonical_state().items()}
    assert scaled.to(dtype) is scaled
    assert scaled.input_scale.dtype == torch.float32 and bit_equal(scaled.input_scale, s)
    assert scaled.state_dict()["input_scale"].dtype == torch.float32
    assert scaled.bias.dtype == dtype and scaled.kernel.name == AUTO_W8A8
    assert scaled.dequantize_weight().dtype == dtype
    for key, value in scaled.canonical_state().items():
        assert bit_equal(value, canonical[key]), key
    assert scaled(torch.randn(2, k).to(dtype)).dtype == dtype
    scaled.float()
    assert scaled.input_scale.dtype == torch.float32 and bit_equal(scaled.input_scale, s)
    assert scaled.bias.dtype == torch.float32


# --------------------------------------------------------------------------------- save / load
def _w8a8_toy_model():
    """ToyMLP with ``up`` = W8A8 + input_scale (int8_dynamic_cpu) and ``down`` = int4 g32 + act_bits +
    input_scale (int4pack_cpu fed fake-quantized activations)."""
    torch.manual_seed(1234)
    model = ToyMLP()
    up, down = model.up, model.down
    q = quantize_weight(up.weight.detach(), INT8_SYM, None)
    model.up = QuantLinear.from_codes(q.codes, q.scale, None, format=INT8_SYM, group_size=None,
                                      bias=up.bias.detach(), input_scale=_input_scale(96, 30), act_bits=8)
    int4 = get_format("int4")
    q = quantize_weight(down.weight.detach(), int4, 32)
    model.down = QuantLinear.from_codes(q.codes, q.scale, q.zero_point, format=int4, group_size=32,
                                        bias=down.bias.detach(), input_scale=_input_scale(208, 31), act_bits=8)
    return model


@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_save_load_round_trip_bit_exact(where, tmp_path, bit_equal):
    model = _w8a8_toy_model()
    assert model.up.kernel.name == AUTO_W8A8 and model.down.kernel.name == "int4pack_cpu"
    llmopt.save(model, tmp_path)
    manifest = json.loads((tmp_path / "llmopt.json").read_text())
    for name in ("up", "down"):
        cfg = manifest["modules"][name]["config"]
        assert cfg["input_scale"] is True and cfg["act_bits"] == 8
    torch.manual_seed(999)
    with torch.device(where):
        skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    sa, sb = model.state_dict(), skeleton.state_dict()
    assert sa.keys() == sb.keys() and "up.input_scale" in sa and "down.input_scale" in sa
    for key in sa:
        assert bit_equal(sa[key], sb[key]), key
    for name in ("up", "down"):
        a, b = model.get_submodule(name), skeleton.get_submodule(name)
        assert a.config() == b.config() and b.act_bits == 8
        assert b.kernel.name == a.kernel.name and b.input_scale.device.type == "cpu"
    x = torch.randn(2, 7, 96, generator=_gen(32))
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))


def test_save_load_bfloat16_model_keeps_float32_input_scale(tmp_path, bit_equal):
    model = _w8a8_toy_model().to(torch.bfloat16)
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyMLP()
    llmopt.load(skeleton, tmp_path)
    assert skeleton.up.input_scale.dtype == torch.float32 and skeleton.up.bias.dtype == torch.bfloat16
    assert bit_equal(skeleton.up.input_scale, model.up.input_scale)
    x = torch.randn(2, 96, generator=_gen(33)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("kernel", ["int8_dynamic_cpu", "int8_onednn_cpu", "reference"])
@pytest.mark.parametrize("with_scale", [False, True])
def test_act_bits_input_gradient_finite(kernel, with_scale):
    n, k = 48, 77
    layer = _layer(n, k, kernel, input_scale=_input_scale(k) if with_scale else None)
    x = torch.randn(2, 3, k, generator=_gen(40)).requires_grad_(True)
    y = layer(x)
    assert y.shape == (2, 3, n)
    y.backward(torch.randn(2, 3, n, generator=_gen(41)))
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype
    assert torch.isfinite(x.grad).all()
    assert all(not p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("fmt,gs,kernel", [(get_format("int4"), 32, "reference"),
                                           (get_format("int4"), 32, "int4pack_cpu"),
                                           (INT8_SYM, None, "int8pack_cpu"),
                                           (get_format("nf4"), 64, "reference")])
def test_input_scale_gradient_matches_float64(fmt, gs, kernel):
    n, k = 64, 160
    scaled, plain, s = _scaled_pair(n, k, kernel, fmt, gs)
    assert scaled.kernel.name == kernel
    x = torch.randn(3, k, generator=_gen(42)).requires_grad_(True)
    grad_y = torch.randn(3, n, generator=_gen(43))
    scaled(x).backward(grad_y)
    expected = grad_y.double() @ (plain.dequantize_weight(torch.float64) * s.double())
    # float32 product with the float32 dequantized weight, then times s: 1e-5 (test_kernels.py).
    assert torch.allclose(x.grad.double(), expected, rtol=1e-5, atol=1e-5)
