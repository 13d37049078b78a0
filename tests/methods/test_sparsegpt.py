"""SparseGPT: the OBS sweep with mask selection against a float64 reference, exact densities, N:M,
joint sparsity + int4 (save / load bit-exact), and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import llmopt
from llmopt.core.errors import CompressionError
from llmopt.nn.sparse_linear import SparseLinear
from llmopt.methods.prune.criteria import magnitude_scores, wanda_scores
from llmopt.methods.prune.patterns import select_mask
from llmopt.methods.prune.sparsegpt import SparseGPT, sparsegpt_prune
from llmopt.core.primitives import dequantize_weight, quantize_weight
from llmopt.core.formats import get_format
from llmopt.methods.quant.gptq import gptq_quantize
from llmopt.solvers.obs import HessianError
from llmopt.testing import ToyMLP, ToyTransformer


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _problem(n=6, k=32, rows=200, seed=0, correlated=True):
    """Weight, inputs with unequal and correlated features, and H = X^T X (float64)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    x = torch.randn(rows, k, generator=gen, dtype=torch.float64)
    if correlated:
        mix = torch.eye(k, dtype=torch.float64) + 0.3 * torch.randn(k, k, generator=gen, dtype=torch.float64) / k ** 0.5
        x = (x @ mix) * torch.exp(torch.randn(k, generator=gen, dtype=torch.float64))
    return w, x, x.T @ x


def _reference(w, h, *, sparsity=None, nm=None, scope="layer", block_size=8, damp=0.01, mask=None):
    """Textbook SparseGPT in float64, no factorization tricks: at column j the free columns are
    F = {j..K-1}; their inverse Hessian inv(H[F, F]) gives both the saliency w^2 / [H_F^-1]_jj and the
    OBS update. Masks: per block of ``block_size`` columns (layer or row budget with cumulative
    rounding), or per group of M columns for N:M, from the current weights."""
    w = w.clone()
    n, k = w.shape
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    keep = torch.ones(n, k, dtype=torch.bool) if mask is None else mask.clone()
    d2 = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(k)])
    for j in range(k):
        if mask is None and nm is None and j % block_size == 0:
            a, b = j, min(j + block_size, k)
            sal = w[:, a:b] ** 2 / d2[a:b]
            if scope == "layer":
                count = _round_half_up(n * b * sparsity) - _round_half_up(n * a * sparsity)
                order = torch.argsort(sal.flatten(), stable=True)[:count]
                block = torch.ones(sal.numel(), dtype=torch.bool)
                block[order] = False
                keep[:, a:b] = block.view(n, b - a)
            else:
                count = _round_half_up(b * sparsity) - _round_half_up(a * sparsity)
                for r in range(n):
                    keep[r, a:b] = True
                    keep[r, a + torch.argsort(sal[r], stable=True)[:count]] = False
        if nm is not None and j % nm[1] == 0:
            sal = w[:, j:j + nm[1]] ** 2 / d2[j:j + nm[1]]
            for r in range(n):
                keep[r, j:j + nm[1]] = False
                keep[r, j + torch.argsort(sal[r], descending=True, stable=True)[:nm[0]]] = True
        hinv = torch.linalg.inv(h[j:, j:])
        q = torch.where(keep[:, j], w[:, j], torch.zeros((), dtype=w.dtype))
        err = (w[:, j] - q) / hinv[0, 0]
        w[:, j:] -= err[:, None] * hinv[0][None, :]
        w[:, j] = q
    return w, keep


# Float64 throughout; the two computations differ only in rounding order (explicit inverses vs one
# Cholesky factor), ~1e-13 relative on these well-conditioned problems; 1e-9 leaves margin.
TOL = 1e-9


@pytest.mark.parametrize("kwargs", [dict(sparsity=0.5, scope="layer"), dict(sparsity=0.3, scope="row"),
                                    dict(sparsity=0.7, scope="layer"),
                                    dict(nm=(2, 4)), dict(nm=(1, 4))])
def test_sparsegpt_matches_float64_reference(kwargs):
    w, _, h = _problem()
    ref_w, ref_keep = _reference(w, h, **kwargs)
    res, info = sparsegpt_prune(w, h, block_size=8, **kwargs)
    assert torch.equal(res.mask, ref_keep)
    assert ((res.weight - ref_w).norm() / ref_w.norm()).item() < TOL
    assert (res.weight[~res.mask] == 0).all()
    # the solver's loss is the layer's output error trace(dW H_damped dW^T)
    dw = w - res.weight
    hd = h.clone()
    hd.diagonal().add_(info["damp_abs"])
    assert info["loss"] == pytest.approx(torch.trace(dw @ hd @ dw.T).item(), rel=1e-9)


def test_fixed_mask_gives_least_squares_solution_when_pruned_columns_come_first():
    """With the mask fixed and every row's pruned columns before its kept ones, each OBS step is the
    exact conditional optimum: the result is the closed-form least-squares fit of the kept weights,
    q_S = H_SS^-1 H_S: w, per row."""
    w, _, h = _problem(n=5, k=24)
    mask = torch.ones(5, 24, dtype=torch.bool)
    for r in range(5):
        mask[r, :3 + 2 * r] = False
    res, info = sparsegpt_prune(w, h, mask=mask, damp=1e-3)
    hd = h.clone()
    hd.diagonal().add_(info["damp_abs"])
    for r in range(5):
        s = mask[r]
        ls = torch.linalg.solve(hd[s][:, s], hd[s] @ w[r])
        assert torch.allclose(res.weight[r, s], ls, rtol=0, atol=TOL * ls.abs().max().item())
        assert (res.weight[r, ~s] == 0).all()


@pytest.mark.parametrize("k, block_size", [(50, 16), (64, 128), (37, 5)])
def test_density_exact_per_layer_and_per_row(k, block_size):
    w, _, h = _problem(n=7, k=k, correlated=False)
    for sparsity in (0.5, 0.33, 0.9):
        res, _ = sparsegpt_prune(w.float(), h, sparsity, scope="layer", block_size=block_size)
        assert int((~res.mask).sum()) == _round_half_up(7 * k * sparsity)
        res, _ = sparsegpt_prune(w.float(), h, sparsity, scope="row", block_size=block_size)
        assert ((~res.mask).sum(1) == _round_half_up(k * sparsity)).all()


def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs():
    w, x, h = _problem(n=32, k=128, rows=512)

    def err(q):
        return ((x @ (w - q).T).norm() / (x @ w.T).norm()).item()

    mag = err(w * select_mask(magnitude_scores(w), 0.5))
    wanda = err(w * select_mask(wanda_scores(w, x.norm(dim=0)), 0.5, scope="row"))
    sgpt = err(sparsegpt_prune(w, h, 0.5)[0].weight)
    assert sgpt < wanda < mag and sgpt < 0.5 * mag, (sgpt, wanda, mag)
    mag24 = err(w * select_mask(magnitude_scores(w), nm=(2, 4)))
    sgpt24 = err(sparsegpt_prune(w, h, nm=(2, 4))[0].weight)
    assert sgpt24 < 0.5 * mag24, (sgpt24, mag24)


def test_joint_int4_is_exactly_representable_and_reduces_to_gptq():
    w, x, h = _problem(n=16, k=128, rows=512)
    w32 = w.float()
    res, info = sparsegpt_prune(w32, h, 0.5, fmt="int4", group_size=32)
    q = res.quantized
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (16, 128) and q.scale.shape == (16, 4)
    fmt = get_format("int4")
    deq = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, 32, torch.float32)
    assert torch.equal(torch.where(res.mask, deq, torch.zeros(())), res.weight)  # bit for bit
    assert int((~res.mask).sum()) == 16 * 64

    # Nothing pruned: the same solver with the same group rule is GPTQ, code for code.
    dense, _ = sparsegpt_prune(w32, h, 0.0, fmt="int4", group_size=32)
    g, _ = gptq_quantize(w32, h, "int4", 32)
    assert torch.equal(dense.quantized.codes, g.codes) and torch.equal(dense.quantized.scale, g.scale)
    assert torch.equal(dense.quantized.zero_point, g.zero_point)

    def err(wq):
        return ((x @ (w - wq.double()).T).norm() / (x @ w.T).norm()).item()

    # Versus pruning first and rounding the kept weights afterwards: the pruning error dominates and
    # part of the rounding compensation flows into columns pruned later, so the joint sweep measures
    # about the same here (0.103 vs 0.103, 0.098 vs 0.102, 0.099 vs 0.100 over three seeds); it
    # must not be worse by more than 5%.
    pruned, _ = sparsegpt_prune(w32, h, 0.5)
    rtn = quantize_weight(pruned.weight, fmt, 32)
    rtn_w = dequantize_weight(rtn.codes, rtn.scale, rtn.zero_point, fmt, 32, torch.float32) * pruned.mask
    assert err(res.weight) < 1.05 * err(rtn_w), (err(res.weight), err(rtn_w))
    assert err(pruned.weight) < err(res.weight)


def test_joint_int4_on_transformer_saves_and_loads_bit_exact(calibration, toy_input, tmp_path, bit_equal):
    model = ToyTransformer()
    cfg = SparseGPT(0.5, format="int4", group_size=32)
    report = llmopt.compress_(model, cfg, calibration=calibration(model), exclude="lm_head")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert set(layers) == set(report.replaced) and len(layers) == 14
    for layer in layers.values():
        assert layer.format.name == "int4" and layer.group_size == 32
        assert int((~layer.mask()).sum()) == _round_half_up(layer.mask().numel() * 0.5)
        assert (layer.dequantize_weight()[~layer.mask()] == 0).all()
    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyTransformer()
    loaded = llmopt.load(skeleton, tmp_path)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert bit_equal(expected[key], got[key]), key
    x = toy_input(model)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_sparsegpt_nm_on_mlp_and_bfloat16_model(calibration, toy_input):
    model = ToyMLP().to(torch.bfloat16)
    llmopt.compress_(model, SparseGPT(pattern="2:4"), calibration=calibration(model))
    for layer in (model.up, model.down):
        assert isinstance(layer, SparseLinear) and layer.nm == (2, 4)
        assert (layer.mask().reshape(layer.out_features, -1, 4).sum(-1) == 2).all()
        assert layer.dequantize_weight().dtype == torch.bfloat16
    assert torch.isfinite(model(toy_input(model))).all()


def test_bad_arguments_are_clear_errors(snapshot, calibration):
    w, _, h = _problem()
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        sparsegpt_prune(w, h, 1.0)
    with pytest.raises(ValueError, match="0 < N < M"):
        sparsegpt_prune(w, h, nm=(4, 2))
    with pytest.raises(ValueError, match="divisible by 8"):
        sparsegpt_prune(w[:, :30], h[:30, :30], nm=(4, 8))
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(w, h, nm=(2, 4), block_size=6)
    with pytest.raises(ValueError, match="not both"):
        sparsegpt_prune(w, h, 0.5, mask=torch.ones_like(w, dtype=torch.bool))
    with pytest.raises(ValueError, match="group_size"):
        sparsegpt_prune(w, h, 0.5, group_size=16)
    with pytest.raises(HessianError, match="\\[K, K\\]"):
        sparsegpt_prune(w, h[:4, :4], 0.5)
    with pytest.raises(ValueError, match="NaN/Inf"):
        sparsegpt_prune(w.masked_fill(w > 2, float("nan")), h, 0.5)
    for bad in (dict(sparsity=-0.1), dict(sparsity=1.0), dict(pattern="5:4"), dict(pattern="2:4", sparsity=0.3),
                dict(pattern="2:4", block_size=6), dict(damp=0.0), dict(group_size=32),
                dict(format="int4", value_dtype="bfloat16"), dict(format="int9"), dict(propagate="x")):
        with pytest.raises(ValueError):
            SparseGPT(**bad)
    # a NaN weight: the error names the layer and the model is left as it was
    model = ToyMLP()
    with torch.no_grad():
        model.up.weight[1, 2] = float("inf")
    before = snapshot(model)
    with pytest.raises(CompressionError, match="'up'.*NaN/Inf"):
        llmopt.compress_(model, SparseGPT(0.5), calibration=calibration(model))
    before.check()


def test_config_label_and_round_trip():
    cfg = SparseGPT(0.5, format="int4", group_size=64)
    assert cfg.label() == "sparsegpt 50% per-row + int4 g64"
    assert SparseGPT(0.5, scope="layer").label() == "sparsegpt 50%"
    assert llmopt.MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert SparseGPT(pattern="2:4").label() == "sparsegpt 2:4"
    assert SparseGPT.stats_spec().hessian
