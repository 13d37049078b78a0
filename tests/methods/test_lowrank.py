"""Low-rank factorization (llmopt.lowrank, llmopt.nn.LowRankLinear, the SVD method)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt import RTN, SVD
from llmopt.methods.lowrank import plan_ranks
from llmopt.core.errors import CompressionError
from llmopt.methods.lowrank import allocate_ranks, rank_from, saves_parameters
from llmopt.solvers.decompose import asvd_scales, scaled_svd, truncated_svd, whitened_svd, whitening_factor
from llmopt.nn import LowRankLinear, QuantLinear
from llmopt.testing import ToyMLP, ToyTransformer, sqnr

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def _tokens(n: int = 4, seq: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, seq), generator=gen) for _ in range(n)]


def _transformer(seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer(tie=False)


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows with strongly correlated, unevenly scaled channels (like LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64)
    scale = torch.logspace(0, -3, k, dtype=torch.float64)
    return (torch.randn(n, k, generator=gen, dtype=torch.float64) * scale) @ mix


def _output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ (weight - approx).T) ** 2).sum() / x.shape[0])


# ---------------------------------------------------------------------------------------- maths
def test_truncated_svd_error_is_the_discarded_singular_values():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    sigma = torch.linalg.svdvals(w)
    for r in (1, 5, 23, 24):
        down, up = truncated_svd(w, r)
        assert down.shape == (r, 24) and up.shape == (40, r) and down.dtype == torch.float64
        err = float(((w - up @ down) ** 2).sum())
        assert err == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-9, abs=1e-9)
        # sqrt(sigma) on both sides: row r of down and column r of up have the same norm
        torch.testing.assert_close(down.norm(dim=1), up.norm(dim=0), rtol=1e-9, atol=1e-12)
    # float32 and bfloat16 weights: computed in float32, returned in the weight's dtype
    for dtype in (torch.float32, torch.bfloat16):
        down, up = truncated_svd(w.to(dtype), 5)
        assert down.dtype == up.dtype == dtype
        err = float(((w - (up @ down).double()) ** 2).sum())
        reference = float((sigma[5:] ** 2).sum())
        assert err == pytest.approx(reference, rel=1e-4 if dtype == torch.float32 else 5e-2)


def test_whitened_truncation_error_equals_output_error():
    """SVD-LLM's truncation-awareness: discarded sigma^2 of W L == ||X (W - W_r)^T||^2 / n."""
    x = _correlated_inputs(256, 32)
    h = x.T @ x / x.shape[0]
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dec = whitened_svd(w, h, damp=0.0)
    assert dec.kind == "whiten" and dec.info["damp_tries"] == 1
    for r in (1, 4, 16, 31):
        down, up = dec.factors(r)
        err = _output_error(x, w, up @ down)
        assert err == pytest.approx(float((dec.sigma[r:] ** 2).sum()), rel=1e-8)
    down, up = dec.factors(32)  # full rank: exact
    torch.testing.assert_close(up @ down, w, rtol=1e-8, atol=1e-8)


def test_activation_aware_beats_plain_svd_on_correlated_inputs():
    x = _correlated_inputs(512, 64, seed=2)
    h = x.T @ x / x.shape[0]
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whiten = whitened_svd(w, h)
    asvd = scaled_svd(w, asvd_scales(x.abs().mean(0)))
    for r in (8, 16, 32):
        down, up = truncated_svd(w, r)
        plain = _output_error(x, w, up @ down)
        white = _output_error(x, w, torch.matmul(*reversed(whiten.factors(r))))
        scaled = _output_error(x, w, torch.matmul(*reversed(asvd.factors(r))))
        assert white < 0.5 * plain, (r, white, plain)
        assert scaled < plain, (r, scaled, plain)
        assert white <= scaled * 1.0001


def test_dead_channel_and_singular_hessian_still_factorize():
    k = 32
    x = _correlated_inputs(16, k, seed=4)  # 16 rows < 32 channels: X^T X is singular
    x[:, 5] = 0  # a dead input channel
    h = x.T @ x / x.shape[0]
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for damp in (0.01, 0.0):  # 0: the first Cholesky fails, damping grows from 1e-6
        dec = whitened_svd(w, h, damp=damp)
        down, up = dec.factors(8)
        assert torch.isfinite(down).all() and torch.isfinite(up).all()
        assert dec.info["dead_columns"] == 1
        plain_down, plain_up = truncated_svd(w, 8)
        assert _output_error(x, w, up @ down) < _output_error(x, w, plain_up @ plain_down)
    assert whitened_svd(w, h, damp=0.0).info["damp_tries"] > 1
    # ASVD: the dead channel's scale is floored, no division by zero
    dec = scaled_svd(w, asvd_scales(x.abs().mean(0)))
    down, up = dec.factors(8)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    # a layer that only ever saw zeros: plain SVD
    dec = whitened_svd(w, torch.zeros(k, k, dtype=torch.float64))
    assert dec.kind == "plain"
    assert torch.equal(asvd_scales(torch.zeros(k)), torch.ones(k, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        whitening_factor(torch.full((k, k), float("nan")))


# ---------------------------------------------------------------------------------------- rank rules
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), k=st.integers(1, 80), ratio=st.floats(0.01, 0.99), energy=st.floats(0.01, 1.0),
       seed=st.integers(0, 1000))
def test_rank_rules(n, k, ratio, energy, seed):
    m = min(n, k)
    sigmas = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).sort(
        descending=True).values
    r = rank_from(sigmas, (n, k), rank_ratio=ratio)
    assert 1 <= r <= m and abs(r - ratio * m) <= 0.5 + 1e-9 or r == 1
    r = rank_from(sigmas, (n, k), energy=energy)
    fraction = torch.cumsum(sigmas ** 2, 0) / (sigmas ** 2).sum()
    assert 1 <= r <= m
    assert fraction[r - 1] >= energy - 1e-9
    assert r == 1 or fraction[r - 2] < energy
    keep = (1 - ratio) * n * k
    if keep < n + k:
        with pytest.raises(ValueError, match="fewer than rank 1"):
            rank_from(None, (n, k), param_ratio=ratio)
    else:
        r = rank_from(None, (n, k), param_ratio=ratio)
        assert 1 <= r <= m and r * (n + k) <= keep + 1e-6
        assert r == m or (r + 1) * (n + k) > keep
        assert saves_parameters(r, (n, k))
    assert rank_from(None, (n, k), rank=m) == m


def test_rank_rules_reject_bad_values():
    s = torch.ones(8)
    with pytest.raises(ValueError, match="exactly one"):
        rank_from(s, (8, 8))
    with pytest.raises(ValueError, match="exactly one"):
        rank_from(s, (8, 8), rank=2, energy=0.5)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        rank_from(s, (8, 8), rank=0)
    with pytest.raises(ValueError, match="exceeds min"):
        rank_from(s, (8, 12), rank=9)
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="rank_ratio"):
            rank_from(s, (8, 8), rank_ratio=bad)
    with pytest.raises(ValueError, match="param_ratio"):
        rank_from(s, (8, 8), param_ratio=1.0)
    with pytest.raises(ValueError):
        truncated_svd(torch.randn(8, 6), 0)
    with pytest.raises(ValueError, match="exceeds min"):
        truncated_svd(torch.randn(8, 6), 7)


def _cost(ranks, shapes):
    return sum(n * k if ranks[name] is None else ranks[name] * (n + k) for name, (n, k) in shapes.items())


@pytest.mark.parametrize("param_ratio", [0.1, 0.3, 0.6])
def test_allocate_ranks_meets_the_budget_and_prefers_fast_decaying_spectra(param_ratio):
    gen = torch.Generator().manual_seed(0)
    shapes = {"fast": (64, 64), "flat": (64, 64), "wide": (32, 128), "tall": (96, 48)}
    idx = torch.arange(64, dtype=torch.float64)
    spectra = {"fast": torch.exp(-idx / 4), "flat": torch.linspace(1.0, 0.8, 64, dtype=torch.float64),
               "wide": torch.rand(32, generator=gen, dtype=torch.float64).sort(descending=True).values,
               "tall": torch.rand(48, generator=gen, dtype=torch.float64).sort(descending=True).values}
    ranks = allocate_ranks(spectra, shapes, param_ratio)
    total = sum(n * k for n, k in shapes.values())
    assert _cost(ranks, shapes) <= (1 - param_ratio) * total
    assert ranks["fast"] is not None
    assert ranks["flat"] is None or ranks["fast"] < ranks["flat"]
    for name, r in ranks.items():
        assert r is None or (1 <= r and saves_parameters(r, shapes[name]))


def test_allocate_ranks_keeps_a_layer_dense_when_that_is_worth_it():
    # One small layer with a flat spectrum in a model of large easy layers: the budget left after
    # the easy layers lets it go back to dense, the best outcome for it.
    shapes = {"easy": (256, 256), "small": (16, 16)}
    idx = torch.arange(256, dtype=torch.float64)
    spectra = {"easy": torch.exp(-idx / 2), "small": torch.ones(16, dtype=torch.float64) * 10}
    ranks = allocate_ranks(spectra, shapes, 0.5)
    assert ranks["small"] is None and ranks["easy"] >= 1
    assert _cost(ranks, shapes) <= 0.5 * (256 * 256 + 256)
    with pytest.raises(ValueError, match="fewer than rank 1"):
        allocate_ranks(spectra, shapes, 0.999)
    with pytest.raises(ValueError, match="param_ratio"):
        allocate_ranks(spectra, shapes, 0.0)


# ---------------------------------------------------------------------------------------- config
def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="exactly one rank rule"):
        SVD()
    with pytest.raises(ValueError, match="exactly one rank rule"):
        SVD(rank=4, param_ratio=0.2)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        SVD(rank=0)
    with pytest.raises(ValueError, match="rank_ratio"):
        SVD(rank_ratio=1.5)
    with pytest.raises(ValueError, match="activation_aware=True"):
        SVD(rank=4, variant="asvd")
    with pytest.raises(ValueError, match="variant"):
        SVD(rank=4, activation_aware=True, variant="pca")
    with pytest.raises(ValueError, match=r"ranks\['a'\]"):
        SVD(ranks={"a": 0})
    assert SVD(rank=4).needs_calibration is False
    assert SVD(rank=4, activation_aware=True).needs_calibration is True
    plan = {"layers.0.q_proj": 8, "layers.0.k_proj": None}
    cfg = SVD(ranks=plan, activation_aware=True)
    assert llmopt.MethodConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert hash(cfg) == hash(SVD(ranks=dict(plan), activation_aware=True))
    assert SVD(param_ratio=0.2, activation_aware=True).label() == "svd 20% params whitened"
    assert SVD(rank=8).label() == "svd rank 8 plain"
    with pytest.raises(ValueError, match="needs calibration data"):
        llmopt.compress_(ToyMLP(), SVD(rank=4, activation_aware=True))


def test_bad_rank_names_the_layer_and_leaves_the_model_untouched(snapshot):
    model = ToyMLP()
    snap = snapshot(model)
    with pytest.raises(CompressionError, match=r"layer 'down' \(svd\).*rank 100 exceeds min"):
        llmopt.compress_(model, SVD(rank=100), include="down")
    snap.check()


# ---------------------------------------------------------------------------------------- module
def test_low_rank_linear_module(tmp_path):
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(6, 20, generator=gen), torch.randn(12, 6, generator=gen)
    bias = torch.randn(12, generator=gen)
    layer = LowRankLinear.from_factors(down, up, bias)
    assert isinstance(layer.down, nn.Linear) and isinstance(layer.up, nn.Linear) and layer.down.bias is None
    assert "rank=6" in repr(layer) and layer.rank == 6
    x = torch.randn(3, 20, generator=gen)
    torch.testing.assert_close(layer(x), x @ (up @ down).T + bias)
    dense = layer.to_linear()
    torch.testing.assert_close(dense(x), layer(x))
    assert layer.config() == {"in_features": 20, "out_features": 12, "rank": 6, "bias": True, "dtype": "float32"}
    twin = LowRankLinear.from_config(layer.config(), device="meta")
    assert repr(twin) == repr(layer)
    report = llmopt.memory_report(nn.Sequential(layer))
    assert [(row.name, row.kind) for row in report.layers] == [("0", "LowRankLinear")]
    assert report.layers[0].stored_bytes == (6 * (20 + 12) + 12) * 4
    assert report.layers[0].bits_per_weight == pytest.approx(32 * 6 * 32 / (20 * 12))
    assert report.stored_bytes == layer.stored_bytes()
    half = LowRankLinear.from_factors(down, up).to(torch.bfloat16)
    assert half.dequantize_weight().dtype == torch.bfloat16 and half.config()["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(20, 12, 13)


# ---------------------------------------------------------------------------------------- end to end
def test_compress_plain_and_activation_aware_on_a_transformer(tmp_path, bit_equal):
    calibration = _tokens(6)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))
    results = {}
    for aware in (False, True):
        model = _transformer()
        with torch.no_grad():
            reference = model(x)
        report = llmopt.compress_(model, SVD(param_ratio=0.3, activation_aware=aware),
                                  calibration=calibration if aware else None, exclude="lm_head")
        assert len(report.replaced) == 14 and report.skipped == {}
        assert all(isinstance(m, LowRankLinear) for name, m in model.named_modules() if name.endswith("_proj"))
        assert report.bytes_after <= 0.7 * report.bytes_before
        with torch.no_grad():
            results[aware] = sqnr(reference, model(x))
        if aware:
            llmopt.save(model, tmp_path)
            with torch.device("meta"):
                skeleton = ToyTransformer(tie=False)
            llmopt.load(skeleton, tmp_path)
            expected, got = model.state_dict(), skeleton.state_dict()
            assert expected.keys() == got.keys()
            assert all(bit_equal(expected[key], got[key]) for key in expected)
            assert isinstance(skeleton.layers[0].q_proj, LowRankLinear)
            with torch.no_grad():
                assert torch.equal(skeleton(x), model(x))
    assert results[True] > results[False] + 1.0, results  # whitening helps end to end


def test_plan_ranks_then_compress_meets_the_model_budget():
    calibration = _tokens(4)
    for aware in (False, True):
        model = _transformer()
        plan = plan_ranks(model, 0.4, exclude="lm_head", calibration=calibration, activation_aware=aware)
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}
        assert set(plan) == set(linears)
        shapes = {name: tuple(m.weight.shape) for name, m in linears.items()}
        assert _cost(plan, shapes) <= 0.6 * sum(n * k for n, k in shapes.values())
        report = llmopt.compress_(model, SVD(ranks=plan, activation_aware=aware),
                                  calibration=calibration if aware else None, exclude="lm_head")
        dense = {name for name, r in plan.items() if r is None}
        assert set(report.replaced) == set(linears) - dense
        assert set(report.skipped) == dense
        for name, r in plan.items():
            if r is not None:
                assert model.get_submodule(name).rank == r


def test_svd_then_rtn_quantizes_the_factors(tmp_path, bit_equal):
    model = _transformer()
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    llmopt.compress_(model, SVD(rank_ratio=0.4), exclude="lm_head")
    with torch.no_grad():
        low_rank_out = model(x)
    def factor_bytes(m):
        return sum(row.stored_bytes for row in llmopt.memory_report(m).layers if row.kind == "LowRankLinear")

    float_factor_bytes = factor_bytes(model)

    # a second SVD pass factorizes nothing again, and says why
    again = llmopt.compress_(model, SVD(rank_ratio=0.4), exclude="lm_head")
    assert again.replaced == {}
    assert again.skipped["layers.0.q_proj"] == "already compressed (LowRankLinear)"
    assert "'down' factor of a LowRankLinear" in again.skipped["layers.0.q_proj.down"]

    report = llmopt.compress_(model, RTN("int8", None), exclude="lm_head")
    assert set(report.replaced) == {f"layers.{i}.{p}.{f}" for i in range(2) for p in
                                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                                    for f in ("down", "up")}
    q = model.layers[0].q_proj
    assert isinstance(q, LowRankLinear) and isinstance(q.down, QuantLinear) and isinstance(q.up, QuantLinear)
    with torch.no_grad():
        assert sqnr(low_rank_out, model(x)) > 30  # int8 on the factors: small extra error
    memory = llmopt.memory_report(model)
    rows = {row.name: row for row in memory.layers}
    assert "layers.0.q_proj.down" not in rows and rows["layers.0.q_proj"].kind == "LowRankLinear"
    assert factor_bytes(model) < 0.35 * float_factor_bytes  # int8 codes + bf16 scales instead of float32
    assert "int8" in rows["layers.0.q_proj"].detail

    llmopt.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = ToyTransformer(tie=False)
    llmopt.load(skeleton, tmp_path)
    expected, got = model.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys() and all(bit_equal(expected[k], got[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))

    # one call with both methods: bytes are counted once per original layer
    fresh = _transformer()
    before = llmopt.memory_report(fresh).stored_bytes
    both = llmopt.compress_(fresh, [SVD(rank_ratio=0.4), RTN("int8", None)], exclude="lm_head")
    assert both.bytes_before == sum(llmopt.memory_report(m).stored_bytes
                                    for name, m in _transformer().named_modules()
                                    if name.endswith("_proj"))
    assert before - llmopt.memory_report(fresh).stored_bytes == both.bytes_before - both.bytes_after


def test_layer_that_would_not_save_parameters_is_left_dense_and_reported():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    second = model[1]
    report = llmopt.compress_(model, SVD(rank=8))
    assert isinstance(model[0], LowRankLinear) and model[1] is second
    assert list(report.replaced) == ["0"]
    assert "would not save parameters" in report.skipped["1"] and report.skipped["1"].startswith("svd: ")
    # energy close to 1 on a random weight needs nearly full rank: every layer stays dense
    model = nn.Sequential(nn.Linear(32, 32))
    report = llmopt.compress_(model, SVD(energy=0.999))
    assert report.replaced == {} and "energy 0.999" in report.skipped["0"]


def test_nan_weight_rolls_back_the_whole_model(snapshot):
    model = _transformer()
    with torch.no_grad():
        model.layers[1].down_proj.weight[0, 0] = float("nan")
    snap = snapshot(model)
    for cfg, calibration in ((SVD(rank_ratio=0.25), None), (SVD(rank=4, activation_aware=True), _tokens(2))):
        with pytest.raises(CompressionError, match=r"layers\.1\.down_proj.*NaN"):
            llmopt.compress_(model, cfg, calibration=calibration, exclude="lm_head")
        snap.check()

