"""HQQ (half-quadratic zero-point refinement): maths, config, handler, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
import llmopt.methods.quant.hqq  # noqa: F401  (registers the "hqq" method)
from llmopt.nn import QuantLinear
from llmopt.core.formats import get_format
from llmopt.methods.quant.hqq import HQQ, hqq_quantize
from llmopt.core.primitives import dequantize_weight, quantize_weight, to_groups
from llmopt.methods.base import get_method
from llmopt.testing import ToyMLP, ToyTransformer, sqnr


def _deq(q, fmt):
    return dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, torch.float64)


def _errors(weight, q, fmt):
    """(mean |W - deq|, relative Frobenius error), float64 reference."""
    e = weight.double() - _deq(q, fmt)
    return e.abs().mean().item(), (e.norm() / weight.double().norm()).item()


def _group_l1(weight, q, fmt):
    """Mean absolute error of every group, float64, ``[N, G]`` (real columns only)."""
    e = (weight.double() - _deq(q, fmt)).abs()
    n, k = e.shape
    gs = q.group_size
    g = -(-k // gs)
    pad = g * gs - k
    mask = torch.ones(n, g * gs, dtype=torch.float64)
    if pad:
        mask[:, k:] = 0
        e = F.pad(e, (0, pad))
    return (e.reshape(n, g, gs).sum(-1) / mask.reshape(n, g, gs).sum(-1))


def _heavy_tailed(n, k, seed):
    """Student-t(3) weights (std ~0.017) plus a few large outliers; depends on ``seed`` only."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        w = torch.distributions.StudentT(3.0).sample((n, k)) * 0.01
    # plus a sprinkling of large outliers, as in real LLM weights
    idx = torch.randint(0, n * k, (n * k // 500,), generator=gen)
    w.view(-1)[idx] += torch.randn(idx.numel(), generator=gen) * 0.2
    return w


# ------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("fmt_name", ["int4", "int3"])
def test_beats_rtn_on_heavy_tailed_weights(fmt_name):
    w = _heavy_tailed(256, 1024, seed=1)
    fmt = get_format(fmt_name)
    l1_rtn, fro_rtn = _errors(w, quantize_weight(w, fmt, 64), fmt)
    l1_hqq, fro_hqq = _errors(w, hqq_quantize(w, fmt, 64), fmt)
    # Measured (this seed): int4 L1 -3.7%, Frobenius -3.9%; int3 L1 -8.0%, Frobenius -11.4%.
    assert l1_hqq < 0.98 * l1_rtn, (l1_hqq, l1_rtn)
    assert fro_hqq < 0.98 * fro_rtn, (fro_hqq, fro_rtn)


@pytest.mark.parametrize("fmt_name, group_size", [("int4", 64), ("int4", 128), ("int3", 64), ("int2", 32),
                                                  ("int8", None), ("int4", 48)])
def test_never_worse_than_rtn_group_by_group(fmt_name, group_size):
    # Plain Gaussian weights, K = 200 (ragged for every group size here). The first iterate of every
    # group is RTN's stored parameters and each group keeps its best iterate, so no group's mean
    # absolute error may exceed RTN's beyond float32-vs-float64 evaluation noise.
    w = torch.randn(64, 200) * 0.02
    fmt = get_format(fmt_name)
    rtn, hqq = quantize_weight(w, fmt, group_size), hqq_quantize(w, fmt, group_size)
    g_rtn, g_hqq = _group_l1(w, rtn, fmt), _group_l1(w, hqq, fmt)
    assert torch.all(g_hqq <= g_rtn * (1 + 1e-5) + 1e-12), (g_hqq - g_rtn).max()
    assert g_hqq.mean() < g_rtn.mean()  # and it does improve on average
    assert _errors(w, hqq, fmt)[1] < _errors(w, rtn, fmt)[1]


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_zero_iterations_is_exactly_rtn(scale_dtype):
    w = torch.randn(16, 100)
    fmt = get_format("int4")
    rtn = quantize_weight(w, fmt, 32, scale_dtype)
    hqq = hqq_quantize(w, fmt, 32, iters=0, scale_dtype=scale_dtype)
    assert torch.equal(rtn.codes, hqq.codes)
    assert torch.equal(rtn.scale, hqq.scale) and torch.equal(rtn.zero_point, hqq.zero_point)


def test_scale_is_rtn_scale_and_only_zero_moves():
    w = _heavy_tailed(32, 256, seed=2)
    fmt = get_format("int4")
    rtn, hqq = quantize_weight(w, fmt, 64), hqq_quantize(w, fmt, 64)
    assert torch.equal(rtn.scale, hqq.scale)
    assert not torch.equal(rtn.zero_point, hqq.zero_point)


def test_more_iterations_without_early_stop_do_not_hurt():
    w = _heavy_tailed(64, 512, seed=3)
    fmt = get_format("int3")
    early = _group_l1(w, hqq_quantize(w, fmt, 64), fmt)
    full = _group_l1(w, hqq_quantize(w, fmt, 64, early_stop=False, iters=30), fmt)
    assert full.mean() <= early.mean() * (1 + 1e-6)


# ------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_shapes_dtypes_and_code_range(dtype):
    w = (torch.randn(24, 100) * 0.05).to(dtype).requires_grad_()
    for fmt_name, bits in [("int2", 2), ("int3", 3), ("int4", 4), ("int8", 8)]:
        q = hqq_quantize(w, get_format(fmt_name), 32)
        assert q.codes.shape == (24, 100) and q.codes.dtype == torch.uint8
        assert int(q.codes.max()) < 2 ** bits
        assert q.scale.shape == q.zero_point.shape == (24, 4)
        assert q.scale.dtype == q.zero_point.dtype == torch.bfloat16
        assert q.group_size == 32
    q = hqq_quantize(w, "int4", None, scale_dtype=torch.float32)
    assert q.scale.shape == (24, 1) and q.scale.dtype == torch.float32 and q.group_size == 100
    assert hqq_quantize(w, "int4", 1000).group_size == 100  # clamped like RTN


def test_ragged_last_group_is_optimised_on_its_real_columns_only():
    w = _heavy_tailed(48, 100, seed=4)  # groups of 64: one full group + 36 real columns
    fmt = get_format("int3")
    full = hqq_quantize(w, fmt, 64)
    head = hqq_quantize(w[:, :64], fmt, 64)
    tail = hqq_quantize(w[:, 64:], fmt, None)  # the last group's 36 columns alone, per-channel
    assert torch.equal(full.codes[:, :64], head.codes)
    assert torch.equal(full.codes[:, 64:], tail.codes)
    assert torch.equal(full.scale[:, :1], head.scale) and torch.equal(full.zero_point[:, :1], head.zero_point)
    assert torch.equal(full.scale[:, 1:], tail.scale) and torch.equal(full.zero_point[:, 1:], tail.zero_point)
    # and the tail group did get optimised (not left at RTN)
    assert not torch.equal(full.zero_point[:, 1:], quantize_weight(w[:, 64:], fmt, None).zero_point)


def test_groups_are_independent_of_their_neighbours():
    w = _heavy_tailed(8, 256, seed=5)
    fmt = get_format("int4")
    base = hqq_quantize(w, fmt, 64)
    w2 = w.clone()
    w2[:, :64] *= 7.0  # change group 0 only (and make it converge differently)
    other = hqq_quantize(w2, fmt, 64)
    assert torch.equal(base.codes[:, 64:], other.codes[:, 64:])
    assert torch.equal(base.zero_point[:, 1:], other.zero_point[:, 1:])


def test_degenerate_rows_stay_finite():
    w = torch.randn(6, 64)
    w[0] = 0.0
    w[1] = 0.37
    w[2, :] = torch.tensor([1e-3, -1e-3]).repeat(32)
    for fmt_name in ["int2", "int4", "int8"]:
        fmt = get_format(fmt_name)
        q = hqq_quantize(w, fmt, 32)
        d = _deq(q, fmt)
        assert torch.isfinite(d).all()
        assert torch.allclose(d[:2], w[:2].double(), atol=1e-2)


@pytest.mark.parametrize("fmt_name", ["nf4", "fp4_e2m1", "fp8_e4m3"])
def test_non_affine_formats_are_refused_by_name(fmt_name):
    with pytest.raises(ValueError, match=fmt_name):
        hqq_quantize(torch.randn(4, 32), get_format(fmt_name), 32)
    with pytest.raises(ValueError, match=fmt_name):
        HQQ(fmt_name, 32)


def test_symmetric_affine_format_is_refused():
    with pytest.raises(ValueError, match="zero point"):
        hqq_quantize(torch.randn(4, 32), get_format("int4", symmetric=True), 32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(iters=-1), "iters"), (dict(iters=2.5), "iters"), (dict(lp_norm=0.0), "lp_norm"),
    (dict(lp_norm=1.5), "lp_norm"), (dict(beta=0.0), "beta"), (dict(kappa=0.5), "kappa"),
    (dict(scale_dtype=torch.float64), "scale_dtype"),
])
def test_function_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hqq_quantize(torch.randn(4, 32), "int4", 32, **kwargs)


def test_function_input_errors():
    with pytest.raises(ValueError, match="2-D"):
        hqq_quantize(torch.randn(4, 4, 4), "int4", 32)
    with pytest.raises(TypeError, match="dtype"):
        hqq_quantize(torch.ones(4, 32, dtype=torch.int32), "int4", 32)
    with pytest.raises(ValueError, match="group_size"):
        hqq_quantize(torch.randn(4, 32), "int4", 0)


# ------------------------------------------------------------------------------------ property
@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([None, 1, 3, 8, 16, 32, 64]),
    n=st.integers(1, 6),
    k=st.integers(1, 80),
    log_std=st.floats(-4, 1),
    seed=st.integers(0, 2 ** 16),
    scale_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_dequantized_values_lie_on_the_stored_affine_grid(bits, group_size, n, k, log_std, seed, scale_dtype):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (10.0 ** log_std)
    fmt = get_format(f"int{bits}")
    q = hqq_quantize(w, fmt, group_size, scale_dtype=scale_dtype)
    gs = q.group_size
    assert q.codes.shape == (n, k) and q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2 ** bits
    assert q.scale.dtype == q.zero_point.dtype == scale_dtype
    assert torch.isfinite(q.scale.float()).all() and torch.isfinite(q.zero_point.float()).all()
    # on the grid: (deq - zero_point) / scale + mid is an integer code in range
    deq = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, gs)
    idx = torch.arange(k) // gs
    s, z = q.scale.float()[:, idx], q.zero_point.float()[:, idx]
    # exactly one grid point per value, within float32 rounding of the affine map
    grid = (q.codes.double() - fmt.mid) * s.double() + z.double()
    eps = torch.finfo(torch.float32).eps
    assert torch.all((deq.double() - grid).abs() <= 2 * eps * (z.double().abs() + grid.abs()) + 1e-30)
    well_conditioned = s > 1e-4 * (z.abs() + deq.abs())  # a step float32 can resolve around z
    level = (deq - z) / s + fmt.mid
    assert torch.allclose(level[well_conditioned], level[well_conditioned].round(), atol=1e-3)
    assert level[well_conditioned].round().min() >= 0 if well_conditioned.any() else True
    assert level[well_conditioned].round().max() <= fmt.qmax if well_conditioned.any() else True
    # values inside the grid's range decode to within half a step of the weight
    inner = (q.codes > 0) & (q.codes < fmt.qmax)
    assert torch.all(((w - deq).abs() - s / 2)[inner] <= 4 * eps * (w.abs() + z.abs())[inner] + 1e-30)
    # and the codes are the nearest ones for the stored parameters
    groups = to_groups(w, gs)
    g = groups.shape[1]
    nearest = fmt.quantize(groups, q.scale.float().reshape(n, g, 1), q.zero_point.float().reshape(n, g, 1))
    assert torch.equal(nearest.reshape(n, -1)[:, :k], q.codes)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs", [
    dict(format="int5"), dict(format="nf4"), dict(format="fp8_e4m3"), dict(group_size=0), dict(group_size=-2),
    dict(group_size=1.5), dict(group_size=True), dict(iters=-1), dict(iters=True), dict(iters=2.0),
    dict(lp_norm=0), dict(lp_norm=2.0), dict(lp_norm="0.7"), dict(scale_dtype="int8"),
    dict(scale_dtype="float64"), dict(kernel="nope"), dict(round_zero="yes"),
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        HQQ(**kwargs)


def test_config_basics():
    cfg = HQQ()
    fields = (cfg.format, cfg.group_size, cfg.iters, cfg.lp_norm, cfg.scale_dtype, cfg.kernel, cfg.round_zero)
    # round_zero defaults to True since issue 17 (measured better on SmolLM2); hqq_quantize keeps False.
    assert fields == ("int4", 64, 20, 0.7, "bfloat16", "auto", True)
    assert cfg.name == "hqq" and HQQ.needs_calibration is False
    assert get_method("hqq").config_cls is HQQ
    assert cfg.label() == "hqq int4 g64 rz" and HQQ(round_zero=False).label() == "hqq int4 g64"
    assert HQQ("int3", None).label() == "hqq int3 channel rz"
    assert HQQ("int4", 128, iters=5, lp_norm=1.0).label() == "hqq int4 g128 it5 p1 rz"
    assert llmopt.MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert [c.label() for c in HQQ.benchmark_configs()] == ["hqq int4 g64 rz", "hqq int4 g128 rz", "hqq int3 g64 rz"]
    assert all(isinstance(c, HQQ) for c in HQQ.examples())
    HQQ(group_size=None)
    HQQ(group_size=-1)


# ------------------------------------------------------------------------------------ handler
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_compress_replaces_every_linear_with_hqq_codes(kind):
    model = ToyMLP() if kind == "mlp" else ToyTransformer()
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules()
                 if isinstance(m, nn.Linear)}
    biases = {name: m.bias.detach().clone() for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.bias is not None}
    cfg = HQQ("int4", 32)
    report = llmopt.compress_(model, cfg)
    assert set(report.replaced) == set(originals)
    assert report.methods == [cfg.to_dict()]
    gen = torch.Generator().manual_seed(3)
    for name, weight in originals.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.format.name == "int4" and layer.group_size == 32
        expect = hqq_quantize(weight, get_format("int4"), 32, round_zero=True)  # the config's default
        assert torch.equal(layer.codes(), expect.codes)
        deq = dequantize_weight(expect.codes, expect.scale, expect.zero_point, get_format("int4"), 32)
        assert torch.equal(layer.dequantize_weight(), deq)
        if name in biases:
            assert torch.equal(layer.bias, biases[name])
        x = torch.randn(3, layer.in_features, generator=gen)
        ref = F.linear(x.double(), deq.double(), layer.bias.double() if layer.bias is not None else None)
        assert ((layer(x).double() - ref).norm() / ref.norm()).item() < 1e-2


def test_handler_accepts_extra_kwargs_and_keeps_dtype():
    lin = nn.Linear(64, 16).to(torch.bfloat16)
    layer = get_method("hqq").handler(lin, HQQ("int3", 32), name="x", stats={"anything": 1})
    assert isinstance(layer, QuantLinear)
    assert layer.bias.dtype == torch.bfloat16 and layer.dequantize_weight().dtype == torch.bfloat16
    assert torch.equal(layer.bias, lin.bias)
    bad = nn.Linear(8, 4)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        get_method("hqq").handler(bad, HQQ("int4", 8))


def test_hqq_model_is_at_least_as_close_as_rtn_on_heavy_tailed_mlp(toy_input):
    model = ToyMLP(d_in=128, d_hidden=256, d_out=64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(_heavy_tailed(*m.weight.shape, seed=6) * 5)
    x = toy_input(model)
    with torch.no_grad():
        ref = model(x)
        rtn_model, hqq_model = ToyMLP(128, 256, 64), ToyMLP(128, 256, 64)
    rtn_model.load_state_dict(model.state_dict())
    hqq_model.load_state_dict(model.state_dict())
    llmopt.compress_(rtn_model, llmopt.RTN("int3", 64))
    llmopt.compress_(hqq_model, HQQ("int3", 64))
    with torch.no_grad():
        assert sqnr(ref, hqq_model(x)) > sqnr(ref, rtn_model(x))


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_save_load_round_trip_is_bit_exact(kind, tmp_path, bit_equal, toy_input):
    model = ToyMLP() if kind == "mlp" else ToyTransformer()
    llmopt.compress_(model, HQQ("int3", 64), exclude="lm_head" if kind == "transformer" else None)
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyMLP() if kind == "mlp" else ToyTransformer()
    llmopt.load(skeleton, tmp_path)
    expected, got = model.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert bit_equal(expected[key], got[key]), key
    x = toy_input(model)
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))


# ------------------------------------------------------------------------------------ shrinkage
@pytest.mark.parametrize("p", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("beta", [1.0, 10.0, 123.0])
def test_shrinkage_is_zero_below_its_threshold_and_shrinks_above(p, beta):
    from llmopt.methods.quant.hqq import _shrink

    t0 = beta ** (-1.0 / (2.0 - p))  # the optimiser skips the shrink step when every |e| is below this
    below = torch.linspace(-t0, t0, 2001) * (1 - 1e-3)
    assert torch.all(_shrink(below, beta, p) == 0)
    above = torch.tensor([-10 * t0, -2 * t0, 2 * t0, 10 * t0])
    out = _shrink(above, beta, p)
    assert torch.all(out.sign() == above.sign()) and torch.all(out.abs() < above.abs())
    # soft threshold for p = 1: |x| - 1/beta
    if p == 1.0:
        assert torch.allclose(out.abs(), above.abs() - 1 / beta)


def test_lp_norm_matters_when_errors_reach_the_shrinkage_threshold():
    # Unit-scale heavy-tailed weights: int2 errors exceed beta^(-1/(2-p)), so the shrinkage is active.
    w = _heavy_tailed(64, 256, seed=7) * 100
    fmt = get_format("int2")
    rtn = _group_l1(w, quantize_weight(w, fmt, 64), fmt)
    a, b = hqq_quantize(w, fmt, 64, lp_norm=0.7), hqq_quantize(w, fmt, 64, lp_norm=1.0)
    assert not torch.equal(a.zero_point, b.zero_point)
    for q in (a, b):
        g = _group_l1(w, q, fmt)
        assert torch.all(g <= rtn * (1 + 1e-5)) and g.mean() < rtn.mean()


# ------------------------------------------------------------------------------------ round_zero
def test_round_zero_starts_on_a_whole_code_and_improves_from_there():
    w = _heavy_tailed(64, 512, seed=8)
    fmt = get_format("int4")
    start = hqq_quantize(w, fmt, 64, iters=0, round_zero=True, scale_dtype=torch.float32)
    code_of_zero = fmt.mid - start.zero_point / start.scale  # the code that decodes to the value 0
    assert torch.allclose(code_of_zero, code_of_zero.round(), atol=1e-3)
    assert torch.equal(start.scale, quantize_weight(w, fmt, 64, torch.float32).scale)
    final = hqq_quantize(w, fmt, 64, round_zero=True, scale_dtype=torch.float32)
    g0, g1 = _group_l1(w, start, fmt), _group_l1(w, final, fmt)
    assert torch.all(g1 <= g0 * (1 + 1e-5)) and g1.mean() < g0.mean()
    # and it still beats RTN on heavy-tailed weights (measured: L1 -2.7%, Frobenius -3.9%)
    rtn = quantize_weight(w, fmt, 64)
    assert _errors(w, hqq_quantize(w, fmt, 64, round_zero=True), fmt)[1] < 0.98 * _errors(w, rtn, fmt)[1]


def test_round_zero_config():
    cfg = HQQ("int3", 64, round_zero=True)
    assert cfg.label() == "hqq int3 g64 rz"
    assert llmopt.MethodConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="round_zero"):
        HQQ(round_zero=1)
    model = ToyMLP()
    up = model.up.weight.detach().clone()
    llmopt.compress_(model, cfg)
    expect = hqq_quantize(up, get_format("int3"), 64, round_zero=True)
    assert torch.equal(model.up.codes(), expect.codes)
