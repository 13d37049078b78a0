"""The OBS column-sweep solver and GPTQ quantization maths."""

from __future__ import annotations

import pytest
import torch

from llmopt.nn.quant_linear import QuantLinear
from llmopt.core.formats import CodebookFormat, get_format, register_format, unregister_format
from llmopt.methods.quant.gptq import gptq_quantize
from llmopt.core.primitives import dequantize_weight, quantize_weight
from llmopt.solvers import HessianError, act_order_permutation, obs_sweep

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# A slow, readable float64 reference of the GPTQ / OBS recurrence: full inverse Hessian, column by
# column, removing each swept column from the inverse with the OBS rank-1 downdate.

def reference_sweep(weight, hessian, decide, *, damp=0.01, order=None):
    """``decide(j, current_weight) -> new column j``; returns ``(result, loss)`` in original order."""
    w = weight.clone().to(F64)
    h = hessian.clone().to(F64)
    k = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    if order is not None:
        w, h = w[:, order], h[order][:, order]
    h = h + damp * h.diagonal().mean() * torch.eye(k, dtype=F64)
    hinv = torch.linalg.inv(h)
    result = torch.zeros_like(w)
    loss = 0.0
    for j in range(k):
        q = decide(j, w)
        d = hinv[j, j]
        loss += float(((w[:, j] - q) ** 2 / d).sum())
        err = (w[:, j] - q) / d
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]   # column j becomes q; later ones compensate
        result[:, j] = q
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / d  # column j is fixed from now on
    if order is not None:
        result = result[:, torch.argsort(order)]
    return result, loss


def correlated_inputs(samples, k, seed):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=gen, dtype=F64) / k ** 0.5 + 0.1 * torch.eye(k, dtype=F64)
    return lambda n, s: torch.randn(n, k, generator=torch.Generator().manual_seed(s), dtype=F64) @ mixing


STEP = 0.05


def fixed_grid(j, w):
    return torch.round(w[:, j] / STEP) * STEP


@pytest.mark.parametrize("block_size", [128, 3])
@pytest.mark.parametrize("order_kind", ["none", "random", "act"])
def test_solver_matches_float64_reference(block_size, order_kind):
    n, k = 6, 20
    x = correlated_inputs(40, k, seed=1)(40, 2)
    h = x.T @ x
    w = torch.randn(n, k, dtype=F64)
    order = {"none": None, "random": torch.randperm(k), "act": act_order_permutation(h)}[order_kind]

    result, info = obs_sweep(w, h, lambda block: (lambda j, col, d: torch.round(col / STEP) * STEP),
                             block_size=block_size, order=order)
    expected, loss = reference_sweep(w, h, fixed_grid, order=order)

    assert result.dtype == F64 and result.shape == (n, k)
    assert torch.allclose(result, expected, rtol=0, atol=1e-10)
    assert info["loss"] == pytest.approx(loss, rel=1e-9)
    assert info["damp"] == 0.01 and info["damp_tries"] == 1 and info["dead_columns"] == 0


@pytest.mark.parametrize("block_size", [128, 4])
def test_solver_current_gives_updated_group_weights(block_size):
    """Group parameters chosen from ``block.current`` equal the unblocked recurrence's, across blocks."""
    n, k, gs = 5, 23, 6

    def step_of(cols):
        return ((cols.amax(dim=1) - cols.amin(dim=1)) / 7).clamp_min(1e-6)

    def decide(j, w):
        if j % gs == 0:
            decide.step = step_of(w[:, j:j + gs])
        return torch.round(w[:, j] / decide.step) * decide.step

    state = {}  # the open group's step survives block boundaries

    def process_block(block):
        def column_fn(j, col, d):
            if j % gs == 0:
                state["step"] = step_of(block.current(j, min(j + gs, k)))
            return torch.round(col / state["step"]) * state["step"]
        return column_fn

    x = correlated_inputs(60, k, seed=3)(60, 4)
    h = x.T @ x
    w = torch.randn(n, k, dtype=F64)
    result, info = obs_sweep(w, h, process_block, block_size=block_size)
    expected, loss = reference_sweep(w, h, decide)
    assert torch.allclose(result, expected, rtol=0, atol=1e-10)
    assert info["loss"] == pytest.approx(loss, rel=1e-9)


def test_solver_loss_is_the_damped_quadratic_error_and_inputs_untouched():
    n, k = 8, 32
    x = correlated_inputs(100, k, seed=5)(100, 6)
    h = x.T @ x
    w = torch.randn(n, k, dtype=F64)
    h0, w0 = h.clone(), w.clone()
    result, info = obs_sweep(w, h, lambda b: (lambda j, col, d: torch.round(col * 3) / 3), block_size=7)
    dw = w - result
    exact = torch.trace(dw @ (h + info["damp_abs"] * torch.eye(k, dtype=F64)) @ dw.T)
    assert info["loss"] == pytest.approx(float(exact), rel=1e-9)
    assert torch.equal(h, h0) and torch.equal(w, w0)


def test_solver_block_view_for_mask_selection():
    """A SparseGPT-style callback: choose a mask per block from the block's weights and hinv diagonal."""
    n, k = 4, 16
    x = correlated_inputs(50, k, seed=7)(50, 8)
    h = x.T @ x
    w = torch.randn(n, k, dtype=F64)
    seen = []

    def process_block(block):
        assert block.weight.shape == (n, block.end - block.start)
        assert block.hinv.shape == (block.end - block.start,) * 2
        saliency = block.weight ** 2 / block.hinv.diagonal() ** 2
        mask = saliency <= saliency.median(dim=1, keepdim=True).values  # prune the weaker half
        seen.append((block.start, block.end))
        return lambda j, col, d: torch.where(mask[:, j - block.start], torch.zeros_like(col), col)

    result, _ = obs_sweep(w, h, process_block, block_size=8)
    assert seen == [(0, 8), (8, 16)]
    assert int((result == 0).sum()) == n * k // 2


# ---------------------------------------------------------------------------------------------
# GPTQ


class _TinyCodebook3(CodebookFormat):
    """A user format: 3-bit non-uniform codebook."""

    levels = (-1.0, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 1.0)


_USER_FORMAT = "test_gptq_codebook3"


@pytest.fixture
def user_format(request):
    register_format(_USER_FORMAT)(_TinyCodebook3)
    request.addfinalizer(lambda: unregister_format(_USER_FORMAT))
    return get_format(_USER_FORMAT)


N, K = 64, 256


@pytest.fixture(scope="module")
def layer():
    """A random layer with strongly correlated inputs (H = X^T X far from diagonal)."""
    sample = correlated_inputs(0, K, seed=11)
    x_cal, x_eval = sample(1024, 12).float(), sample(1024, 13).float()
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(14)) * 0.02
    h = (x_cal.double().T @ x_cal.double())
    return w, h, x_eval


def output_error(x, w, q):
    return float(torch.linalg.norm(x @ w.T - x @ q.T))


def dequant(q, fmt):
    return dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size)


RATIOS = {}


@pytest.mark.parametrize("spec, group_size, act_order", [
    ("int4", 128, False), ("int4", 64, False), ("int3", 64, False),
    ("int4", 128, True), ("int3", 64, True),
    ("nf4", 64, False), ("nf4", 64, True),
    ("user", 64, False), ("user", 64, True),
])
def test_gptq_beats_rtn_on_layer_output(layer, request, spec, group_size, act_order):
    w, h, x = layer
    fmt = request.getfixturevalue("user_format") if spec == "user" else get_format(spec)
    q, info = gptq_quantize(w, h, fmt, group_size, act_order=act_order)
    rtn = quantize_weight(w, fmt, group_size)
    ratio = output_error(x, w, dequant(q, fmt)) / output_error(x, w, dequant(rtn, fmt))
    RATIOS[(spec, group_size, act_order)] = ratio
    print(f"GPTQ/RTN output error {spec} g{group_size} act_order={act_order}: {ratio:.3f}")
    assert ratio < 0.85, ratio
    assert info["damp_tries"] == 1 and info["loss"] > 0


@pytest.mark.parametrize("spec", ["int4", "int3", "int8", "nf4", "fp4_e2m1", "fp8_e4m3", "user"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [64, None, 48])
def test_codes_and_params_reproduce_the_swept_weight(request, spec, act_order, group_size):
    """Returned codes/params, dequantized in ORIGINAL column order, are exactly the solver's weight."""
    n, k = 12, 200  # 200 is not a multiple of 64 or 48: ragged last group
    fmt = request.getfixturevalue("user_format") if spec == "user" else get_format(spec)
    x = correlated_inputs(0, k, seed=21)(300, 22)
    h = x.T @ x
    w = torch.randn(n, k) * 0.1
    q, info = gptq_quantize(w, h, fmt, group_size, act_order=act_order, return_weight=True)
    gs = k if group_size is None else group_size
    g = -(-k // gs)
    assert q.codes.shape == (n, k) and q.codes.dtype == torch.uint8
    assert q.scale.shape == (n, g) and q.scale.dtype == torch.bfloat16
    assert (q.zero_point is not None) == fmt.has_zero_point
    if q.zero_point is not None:
        assert q.zero_point.shape == (n, g)
    assert q.group_size == gs
    assert torch.equal(dequant(q, fmt), info["weight"])
    if act_order:  # static groups: parameters are RTN's, chosen on the original column layout
        rtn = quantize_weight(w, fmt, group_size)
        assert torch.equal(q.scale, rtn.scale)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [16, None])
def test_diagonal_hessian_gives_rtn_in_original_order(act_order, group_size):
    """No correlation -> no error feedback: GPTQ is RTN, column for column, whatever the sweep order."""
    n, k = 10, 40
    w = torch.randn(n, k)
    h = torch.diag(torch.rand(k, dtype=F64) + 0.5)  # distinct entries: act_order really permutes
    assert not torch.equal(act_order_permutation(h), torch.arange(k))
    fmt = get_format("int4")
    q, _ = gptq_quantize(w, h, fmt, group_size, act_order=act_order)
    rtn = quantize_weight(w, fmt, group_size)
    assert torch.equal(q.codes, rtn.codes)
    assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero_point, rtn.zero_point)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [16, None])
def test_clip_ratio_matches_clipped_rtn_under_a_diagonal_hessian(act_order, group_size):
    """``clip_ratio`` chooses each group's parameters for its shrunk range, as quantize_weight does:
    with no error feedback (diagonal Hessian) GPTQ then equals clipped RTN exactly; ratio 1 changes
    nothing; a ratio outside (0, 1] is refused."""
    n, k = 10, 48
    w = torch.randn(n, k)
    h = torch.diag(torch.rand(k, dtype=F64) + 0.5)
    fmt = get_format("int3")
    groups = -(-k // (group_size or k))
    ratio = 0.6 + 0.4 * torch.rand(n, groups)
    q, _ = gptq_quantize(w, h, fmt, group_size, act_order=act_order, clip_ratio=ratio)
    rtn = quantize_weight(w, fmt, group_size, clip_ratio=ratio)
    assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scale, rtn.scale)
    plain, _ = gptq_quantize(w, h, fmt, group_size, act_order=act_order)
    ones, _ = gptq_quantize(w, h, fmt, group_size, act_order=act_order, clip_ratio=1.0)
    assert torch.equal(plain.codes, ones.codes) and torch.equal(plain.scale, ones.scale)
    assert not torch.equal(q.scale, plain.scale)
    with pytest.raises(ValueError, match="clip_ratio"):
        gptq_quantize(w, h, fmt, group_size, clip_ratio=torch.full((n, groups), 1.5))


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_channel(act_order):
    n, k = 16, 64
    x = correlated_inputs(0, k, seed=31)(256, 32)
    x[:, 5] = 0
    h = x.T @ x
    assert torch.all(h[5] == 0)
    w = torch.randn(n, k)
    q, info = gptq_quantize(w, h, "int4", 32, act_order=act_order, return_weight=True)
    assert info["dead_columns"] == 1
    assert torch.isfinite(info["weight"]).all() and torch.isfinite(q.scale.float()).all()
    rtn = quantize_weight(w, get_format("int4"), 32)
    xf = x.float()
    assert output_error(xf, w, info["weight"]) < output_error(xf, w, dequant(rtn, get_format("int4")))


@pytest.mark.parametrize("act_order", [False, True])
def test_singular_hessian_fewer_samples_than_columns(act_order):
    n, k = 16, 64
    x = correlated_inputs(0, k, seed=41)(8, 42)  # rank 8 Hessian
    h = x.T @ x
    w = torch.randn(n, k)
    _, info = gptq_quantize(w, h, "int4", 32, act_order=act_order, return_weight=True)
    assert torch.isfinite(info["weight"]).all()
    rtn = quantize_weight(w, get_format("int4"), 32)
    xf = x.float()
    assert output_error(xf, w, info["weight"]) < output_error(xf, w, dequant(rtn, get_format("int4")))


def test_bad_hessians_raise_clear_errors():
    k = 16
    w = torch.randn(4, k)
    x = torch.randn(64, k, dtype=F64)
    h = x.T @ x
    nan = h.clone()
    nan[2, 3] = nan[3, 2] = float("nan")
    with pytest.raises(HessianError, match="NaN"):
        gptq_quantize(w, nan, "int4", 8)
    with pytest.raises(HessianError, match="not positive semi-definite"):
        gptq_quantize(w, -h, "int4", 8)
    for act_order in (False, True):
        with pytest.raises(HessianError, match=r"\[16, 16\]"):
            gptq_quantize(w, h[:8, :8], "int4", 8, act_order=act_order)
    # Positive diagonal but an eigenvalue of -(c*K - 1 - c) ~ -1500 * mean(diag): beyond any damping tried.
    c = 100.0
    indefinite = (1 + c) * torch.eye(k, dtype=F64) - c * torch.ones(k, k, dtype=F64)
    with pytest.raises(HessianError, match="not positive definite even with damping"):
        gptq_quantize(w, indefinite, "int4", 8)


def test_damping_is_raised_until_cholesky_succeeds():
    k = 16
    c = 0.1  # smallest eigenvalue 1 + c - c*K = -0.5: needs damping 1.0 (tries 0.01, 0.1, 1.0)
    h = (1 + c) * torch.eye(k, dtype=F64) - c * torch.ones(k, k, dtype=F64)
    _, info = gptq_quantize(torch.randn(4, k), h, "int4", 8, return_weight=True)
    assert info["damp_tries"] == 3 and info["damp"] == pytest.approx(1.0)
    assert torch.isfinite(info["weight"]).all()


def test_act_order_with_dynamic_groups_is_refused():
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), "int4", 8, act_order=True, static_groups=False)


def test_quant_linear_from_gptq_codes(layer):
    w, h, x = layer
    fmt = get_format("int4")
    q, info = gptq_quantize(w, h, fmt, 64, act_order=True, return_weight=True)
    x = x[:16]
    expected = x @ info["weight"].T
    exact = QuantLinear.from_codes(q.codes, q.scale, q.zero_point, format=fmt, group_size=q.group_size,
                                   kernel="reference")
    assert torch.allclose(exact(x), expected, rtol=1e-4, atol=1e-5)
    fast = QuantLinear.from_codes(q.codes, q.scale, q.zero_point, format=fmt, group_size=q.group_size)
    assert torch.allclose(fast(x).float(), expected, rtol=0, atol=0.02 * float(expected.abs().max()))
