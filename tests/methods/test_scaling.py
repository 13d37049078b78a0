"""Source tracing by tensor identity, fold decisions, folding 1/s into norms, and clipped RTN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.calibration import run_blocks
from llmopt.calibration.graph import InputSource, SourceTracer
from llmopt.core.formats import get_format
from llmopt.core.primitives import quantize_weight, to_groups
from llmopt.methods.quant.scaling import fold_candidate, fold_inverse_scale, input_groups, relative_name
from llmopt.testing import ToyTransformer

F64 = torch.float64
P = "layers.0"
QKV = [f"{P}.q_proj", f"{P}.k_proj", f"{P}.v_proj"]
GATE_UP = [f"{P}.gate_proj", f"{P}.up_proj"]
ALL = QKV + [f"{P}.o_proj"] + GATE_UP + [f"{P}.down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def trace(block: nn.Module, x: torch.Tensor, names, prefix: str = P):
    tracer = SourceTracer(block, prefix)
    try:
        with torch.no_grad():
            block(x)
    finally:
        tracer.remove()
    sources = tracer.sources(names)
    tracer.clear()
    return sources


def toy_block_sources():
    model = ToyTransformer()
    block = model.layers[0]
    x = torch.randn(2, 8, 64, generator=_gen(3))
    return block, trace(block, x, ALL)


# ---------------------------------------------------------------------------------------------
# Toy modules for the fold decision


class OnePlusRMSNorm(nn.Module):
    """Gemma-style norm: ``x_hat * (1 + weight)``: dividing ``weight`` by s is NOT dividing the output."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_hat * (1 + self.weight)


class Attn(nn.Module):
    """A container that receives the norm output and hands it to q/k/v (as ``self_attn`` does)."""

    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))

    def forward(self, h):
        return self.q(h) + self.k(h) * torch.sigmoid(self.v(h))


class ContainerBlock(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.attn = Attn(dim)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class NonLinearConsumerBlock(nn.Module):
    """The norm output also goes to a module that is not a rescaled linear (a gate)."""

    def __init__(self, dim=32):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        h = self.norm(x)
        return x + self.q(h) + self.k(h) * self.gate(h)


class PlainBlock(nn.Module):
    """norm -> q, k only (the positive control)."""

    def __init__(self, dim=32, norm=None):
        super().__init__()
        self.norm = norm if norm is not None else nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.q(h) * self.k(h)


# ---------------------------------------------------------------------------------------------
# SourceTracer


def test_tracer_finds_producers_and_consumers_of_toy_block():
    _, src = toy_block_sources()
    assert set(src) == set(ALL)
    for name in QKV:
        assert src[name].producer == f"{P}.attn_norm"
        assert src[name].consumers == tuple(QKV)
    for name in GATE_UP:
        assert src[name].producer == f"{P}.mlp_norm"
        assert src[name].consumers == tuple(GATE_UP)
    # Made by functional ops (attention reshape; silu(gate) * up): no producer module.
    assert src[f"{P}.o_proj"] == InputSource(src[f"{P}.o_proj"].tensor, None, (f"{P}.o_proj",), producer_calls=0)
    assert src[f"{P}.down_proj"] == InputSource(src[f"{P}.down_proj"].tensor, None, (f"{P}.down_proj",), producer_calls=0)
    # One tensor index per distinct tensor read.
    assert len({src[n].tensor for n in QKV}) == 1
    assert len({src[n].tensor for n in GATE_UP}) == 1
    assert len({src[n].tensor for n in ALL}) == 4


def test_tracer_removes_its_hooks_and_clears():
    block = ToyTransformer().layers[0]
    tracer = SourceTracer(block, P)
    with torch.no_grad():
        block(torch.randn(1, 4, 64))
    tracer.remove()
    for m in block.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert tracer.sources([f"{P}.q_proj"])[f"{P}.q_proj"].producer == f"{P}.attn_norm"
    tracer.clear()
    assert tracer.sources(ALL) == {}  # nothing held any more


def test_tracer_skips_layers_that_did_not_run_and_unknown_names():
    block, _ = toy_block_sources()
    src = trace(block, torch.randn(1, 4, 64), ALL + ["layers.0.nope"])
    assert "layers.0.nope" not in src and set(src) == set(ALL)


def test_tracer_container_is_recorded_as_consumer():
    block = ContainerBlock()
    names = ["b.attn.q", "b.attn.k", "b.attn.v"]
    src = trace(block, torch.randn(2, 5, 32), names, prefix="b")
    for n in names:
        assert src[n].producer == "b.norm"
        assert src[n].consumers == ("b.attn", "b.attn.q", "b.attn.k", "b.attn.v")


def test_run_blocks_passes_sources_per_block():
    model = ToyTransformer()
    batches = [torch.randint(0, 128, (2, 8), generator=_gen(i)) for i in range(2)]
    seen = {}

    def process(i, block, stats, sources):
        seen[i] = (set(stats), sources)

    run_blocks(model, batches, process, progress=False, trace_sources=True)
    assert sorted(seen) == [0, 1]
    for i in (0, 1):
        names, sources = seen[i]
        assert set(sources) == names == {n.replace("layers.0", f"layers.{i}") for n in ALL}
        assert sources[f"layers.{i}.k_proj"].producer == f"layers.{i}.attn_norm"
        assert sources[f"layers.{i}.up_proj"].producer == f"layers.{i}.mlp_norm"
        assert sources[f"layers.{i}.down_proj"].producer is None

    calls = []
    run_blocks(model, batches, lambda *args: calls.append(len(args)), progress=False)
    assert calls == [3, 3]  # without tracing: the three-argument call


# ---------------------------------------------------------------------------------------------
# input_groups / relative_name / fold_candidate


def test_input_groups_toy_block():
    _, src = toy_block_sources()
    assert input_groups(ALL, src) == [QKV, [f"{P}.o_proj"], GATE_UP, [f"{P}.down_proj"]]
    # Order follows names; untraced layers stand alone.
    order = [f"{P}.up_proj", f"{P}.q_proj", "x.extra", f"{P}.gate_proj", f"{P}.v_proj"]
    assert input_groups(order, src) == [[f"{P}.up_proj", f"{P}.gate_proj"], [f"{P}.q_proj", f"{P}.v_proj"],
                                        ["x.extra"]]
    assert input_groups(["a", "b"], {}) == [["a"], ["b"]]


def test_relative_name():
    assert relative_name("model.layers.0.mlp.up_proj", "model.layers.0") == "mlp.up_proj"
    assert relative_name("model.layers.0", "model.layers.0") == ""
    assert relative_name("a.b", "") == "a.b"
    with pytest.raises(ValueError):
        relative_name("model.layers.10.q", "model.layers.1")


def test_fold_candidate_toy_block():
    block, src = toy_block_sources()
    assert fold_candidate(QKV, src, block, P) == f"{P}.attn_norm"
    assert fold_candidate(GATE_UP, src, block, P) == f"{P}.mlp_norm"
    assert fold_candidate([f"{P}.o_proj"], src, block, P) is None
    assert fold_candidate([f"{P}.down_proj"], src, block, P) is None
    # An excluded consumer (v_proj not rescaled): folding would change v's input too.
    assert fold_candidate(QKV[:2], src, block, P) is None
    assert fold_candidate([f"{P}.gate_proj"], src, block, P) is None
    # Layers reading different tensors never share a fold.
    assert fold_candidate([f"{P}.q_proj", f"{P}.up_proj"], src, block, P) is None
    assert fold_candidate(["elsewhere"], src, block, P) is None


def test_fold_candidate_container_consumer_is_allowed():
    block = ContainerBlock()
    names = ["b.attn.q", "b.attn.k", "b.attn.v"]
    src = trace(block, torch.randn(2, 5, 32), names, prefix="b")
    assert fold_candidate(names, src, block, "b") == "b.norm"
    assert fold_candidate(names[:2], src, block, "b") is None


def test_fold_candidate_rejects_non_linear_consumer_module():
    block = NonLinearConsumerBlock()
    src = trace(block, torch.randn(2, 5, 32), ["b.q", "b.k"], prefix="b")
    assert src["b.q"].producer == "b.norm"
    assert "b.gate" in src["b.q"].consumers
    assert fold_candidate(["b.q", "b.k"], src, block, "b") is None
    # Positive control: the same pattern without the gate module folds.
    plain = PlainBlock()
    src = trace(plain, torch.randn(2, 5, 32), ["b.q", "b.k"], prefix="b")
    assert fold_candidate(["b.q", "b.k"], src, plain, "b") == "b.norm"


def test_fold_candidate_needs_a_1d_weight_and_no_children():
    # LayerNorm without affine parameters: no weight to fold into.
    block = PlainBlock(norm=nn.LayerNorm(32, elementwise_affine=False))
    src = trace(block, torch.randn(2, 5, 32), ["b.q", "b.k"], prefix="b")
    assert src["b.q"].producer == "b.norm"
    assert fold_candidate(["b.q", "b.k"], src, block, "b") is None
    # A producer that is a Linear (2-D weight) is not a fold target either.
    block = PlainBlock(norm=nn.Linear(32, 32))
    src = trace(block, torch.randn(2, 5, 32), ["b.q", "b.k"], prefix="b")
    assert src["b.q"].producer == "b.norm"
    assert fold_candidate(["b.q", "b.k"], src, block, "b") is None


# ---------------------------------------------------------------------------------------------
# fold_inverse_scale


def _random_scale(k, seed):
    return torch.rand(k, generator=_gen(seed)) * 3.75 + 0.25  # positive scales in [0.25, 4]


def _norms():
    ln = nn.LayerNorm(48)
    rms = nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(48, generator=_gen(1)))
        ln.bias.copy_(torch.randn(48, generator=_gen(2)))
        rms.weight.copy_(torch.randn(48, generator=_gen(3)))
    return {"layernorm": ln, "rmsnorm": rms}


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fold_inverse_scale_matches_float64(kind, seed):
    module = _norms()[kind]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    s = _random_scale(48, seed)
    new = fold_inverse_scale(module, s)
    assert new is not None and new is not module and type(new) is type(module)
    for k, v in module.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    x = torch.randn(6, 7, 48, generator=_gen(10 + seed)) * 3
    expected = copy.deepcopy(module).to(F64)(x.to(F64)) / s.to(F64)
    got = new(x)
    assert got.dtype == torch.float32
    err = (got.to(F64) - expected).abs().max()
    assert err <= 1e-5 * expected.abs().max(), float(err)
    if kind == "layernorm":
        assert torch.allclose(new.bias.to(F64), module.bias.to(F64) / s.to(F64), rtol=1e-6, atol=0)


def test_fold_inverse_scale_rejects_one_plus_weight_norm():
    norm = OnePlusRMSNorm(48)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=_gen(5)) * 0.1)
    before = norm.weight.detach().clone()
    assert fold_inverse_scale(norm, _random_scale(48, 0)) is None
    assert torch.equal(norm.weight, before)
    # Zero-initialised (the usual start for this form): still not exact.
    assert fold_inverse_scale(OnePlusRMSNorm(48), _random_scale(48, 1)) is None


def test_fold_inverse_scale_shape_mismatch_gives_none():
    assert fold_inverse_scale(nn.RMSNorm(48), torch.ones(47)) is None


def test_fold_inverse_scale_unit_scale_is_identity():
    module = _norms()["layernorm"]
    new = fold_inverse_scale(module, torch.ones(48))
    assert torch.equal(new.weight, module.weight) and torch.equal(new.bias, module.bias)


# ---------------------------------------------------------------------------------------------
# End to end: folding must not change the function beyond quantization error


class _LM(nn.Module):
    def __init__(self, block_cls, n=2, dim=32, vocab=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(block_cls() for _ in range(n))
        self.head = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight[:, 3] *= 20  # one salient channel, so s is far from 1
            for layer in self.layers:
                layer.norm.weight.uniform_(0.5, 2.0, generator=_gen(7))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class NormTwiceBlock(nn.Module):
    """One norm module called twice in a block (before attention and before the MLP)."""

    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        x = x + self.q(self.norm(x))
        return x + self.down(F.silu(self.up(self.norm(x))))


class FunctionalUseBlock(NormTwiceBlock):
    """The norm output is also read by a functional op (added to the residual), not only by q."""

    def forward(self, x):
        h = self.norm(x)
        x = x + self.q(h) + h
        return x + self.down(F.silu(self.up(x)))


class OnePlusBlock(NormTwiceBlock):
    def __init__(self, dim=32, hidden=64):
        super().__init__(dim, hidden)
        self.norm = OnePlusRMSNorm(dim)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.q(h)
        return x + self.down(F.silu(self.up(x)))


def _rel_err(block_cls, cfg, seed=0):
    torch.manual_seed(seed)
    model = _LM(block_cls)
    cal = [torch.randint(0, 64, (2, 16), generator=_gen(20 + i)) for i in range(3)]
    ids = torch.randint(0, 64, (2, 16), generator=_gen(99))
    with torch.no_grad():
        ref = model(ids)
    report = llmopt.compress_(model, cfg, calibration=cal)
    with torch.no_grad():
        out = model(ids)
    return float(((out - ref) ** 2).mean() / (ref ** 2).mean()), report


FOLD_CFGS = [pytest.param(lambda fold: llmopt.AWQ("int8", None, fold=fold), id="awq-int8"),
             pytest.param(lambda fold: llmopt.SmoothQuant(0.5, fold=fold), id="smoothquant")]


@pytest.mark.parametrize("make", FOLD_CFGS)
def test_fold_into_one_plus_norm_falls_back_to_input_scale(make):
    err_fold, report = _rel_err(OnePlusBlock, make(True))
    err_nofold, _ = _rel_err(OnePlusBlock, make(False))
    assert report.rescaled == {}  # the check rejected the fold
    assert err_fold <= 3 * err_nofold + 1e-6, (err_fold, err_nofold)


BUG_TWICE = ("bug: a norm module called twice in one block is a fold candidate for both of its output "
             "tensors; the handler folds each group's 1/s into the same norm name, the second fold "
             "overwrites the first, and the first group's layers (no input_scale) read inputs divided by the "
             "other group's scale: outputs far from the float model")
BUG_FUNCTIONAL = ("bug: SourceTracer only sees module consumers; a norm output also read by a functional op "
                  "(here `x + q(h) + h`) is still folded, so that op reads h / s and the model output "
                  "changes far beyond quantization error")


@pytest.mark.parametrize("make", FOLD_CFGS)
def test_norm_called_twice_is_not_folded_twice(make):
    err_fold, _ = _rel_err(NormTwiceBlock, make(True))
    err_nofold, _ = _rel_err(NormTwiceBlock, make(False))
    assert err_fold <= 3 * err_nofold + 1e-6, (err_fold, err_nofold)


@pytest.mark.parametrize("make", FOLD_CFGS)
def test_norm_output_used_functionally_is_not_folded(make):
    err_fold, _ = _rel_err(FunctionalUseBlock, make(True))
    err_nofold, _ = _rel_err(FunctionalUseBlock, make(False))
    assert err_fold <= 3 * err_nofold + 1e-6, (err_fold, err_nofold)


# ---------------------------------------------------------------------------------------------
# quantize_weight(clip_ratio=...)


AFFINE = st.sampled_from([(2, False), (3, False), (4, False), (8, False), (3, True), (4, True), (8, True)])


def _weight_with_outliers(n, k, gs, seed):
    """Normal weights plus one positive outlier (3x the group's absmax) at the start of every group."""
    w = torch.randn(n, k, generator=_gen(seed))
    for start in range(0, k, gs):
        stop = min(start + gs, k)
        w[:, start] = 3 * w[:, start:stop].abs().amax(dim=1) + 0.1
    return w


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), k=st.integers(2, 150), gs=st.sampled_from([None, 8, 16, 32, 64, 128]),
       fmt=AFFINE | st.sampled_from(["nf4", "fp4_e2m1", "fp8_e4m3"]), seed=st.integers(0, 2**16),
       as_tensor=st.booleans())
def test_clip_ratio_one_is_exactly_no_clip(n, k, gs, fmt, seed, as_tensor):
    f = get_format(fmt) if isinstance(fmt, str) else get_format(f"int{fmt[0]}", symmetric=fmt[1])
    w = _weight_with_outliers(n, k, gs or k, seed)
    plain = quantize_weight(w, f, gs, torch.bfloat16)
    g = plain.scale.shape[1]
    ratio = torch.ones(n, g) if as_tensor else 1.0
    clipped = quantize_weight(w, f, gs, torch.bfloat16, clip_ratio=ratio)
    assert torch.equal(clipped.codes, plain.codes)
    assert torch.equal(clipped.scale, plain.scale)
    assert (clipped.zero_point is None) == (plain.zero_point is None)
    if plain.zero_point is not None:
        assert torch.equal(clipped.zero_point, plain.zero_point)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), k=st.integers(2, 150), gs=st.sampled_from([None, 8, 16, 32, 64, 128]),
       fmt=AFFINE, seed=st.integers(0, 2**16), ratio=st.floats(0.3, 0.95), per_group=st.booleans())
def test_clip_ratio_saturates_outliers(n, k, gs, fmt, seed, ratio, per_group):
    bits, symmetric = fmt
    f = get_format(f"int{bits}", symmetric=symmetric)
    gsize = gs or k
    w = _weight_with_outliers(n, k, gsize, seed)
    plain = quantize_weight(w, f, gs, torch.float32)
    g = plain.scale.shape[1]
    if per_group:
        r = 0.3 + (ratio - 0.3) * torch.rand(n, g, generator=_gen(seed + 1))
    else:
        r = torch.full((n, g), ratio)
    q = quantize_weight(w, f, gs, torch.float32, clip_ratio=r if per_group else ratio)
    # A finer grid: the shrunk range never gets a larger step.
    assert torch.all(q.scale <= plain.scale)
    assert torch.any(q.scale < plain.scale)
    qmax = (1 << bits) - 1
    groups = to_groups(w, q.group_size).to(F64)  # padded by replication: same min / max per group
    lo, hi = groups.amin(-1), groups.amax(-1)
    r64 = r.to(F64)
    clamped = torch.minimum(torch.maximum(groups, (lo * r64)[..., None]), (hi * r64)[..., None])
    cmin, cmax = clamped.amin(-1), clamped.amax(-1)
    codes = torch.nn.functional.pad(q.codes, (0, g * q.group_size - k)).view(n, g, q.group_size)
    real = (torch.arange(g * q.group_size) < k).view(g, q.group_size)
    saturated_any = False
    for i in range(n):
        for j in range(g):
            x, c, keep = groups[i, j], codes[i, j].long(), real[j]
            if symmetric:
                bound = max(abs(float(cmin[i, j])), abs(float(cmax[i, j])))
                top = keep & (x >= bound)
                bottom = keep & (x <= -bound)
                assert torch.all(c[top] == qmax)
                assert torch.all(c[bottom] <= 1)  # -(mid - 1) or the extra level -mid
            else:
                top = keep & (x >= cmax[i, j])
                bottom = keep & (x <= cmin[i, j])
                assert torch.all(c[top] == qmax)
                assert torch.all(c[bottom] == 0)
            assert bool(top[0])  # the planted outlier is clipped and sits on the last code
            saturated_any = True
    assert saturated_any


def test_clip_ratio_lowers_error_of_the_non_outliers():
    """The point of clipping: inliers get a finer step (mean error over non-outlier entries drops)."""
    w = _weight_with_outliers(16, 128, 32, seed=4)
    f = get_format("int3")
    from llmopt.core.primitives import dequantize_weight

    def deq(q):
        return dequantize_weight(q.codes, q.scale, q.zero_point, f, q.group_size)

    inliers = torch.ones_like(w, dtype=torch.bool)
    inliers[:, ::32] = False
    err_plain = (deq(quantize_weight(w, f, 32, torch.float32)) - w)[inliers].abs().mean()
    err_clip = (deq(quantize_weight(w, f, 32, torch.float32, clip_ratio=0.5)) - w)[inliers].abs().mean()
    assert err_clip < 0.8 * err_plain
