"""LearnedRound: the learnable quantized layer (start, stored form, gradients against float64
references), the runner's block data, and the method end to end on a toy transformer."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.calibration import run_blocks
from llmopt.core.formats import AffineFormat, get_format
from llmopt.core.primitives import dequantize_weight, quantize_weight
from llmopt.methods.quant import learned_round as lr_module
from llmopt.methods.quant.learned_round import LearnedRound, RoundingLinear
from llmopt.nn import QuantLinear
from llmopt.testing import ToyTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread

F64 = torch.float64
FORMATS = {
    "int4": lambda: get_format("int4"),
    "int3": lambda: get_format("int3"),
    "int2": lambda: get_format("int2"),
    "int4-sym": lambda: AffineFormat(4, symmetric=True),
    "int4-sym-full": lambda: AffineFormat(4, symmetric=True, full_range=True),
    "int4-intzero": lambda: AffineFormat(4, zero_point="int"),
    "int4-min": lambda: AffineFormat(4, zero_point="min"),
    "nf4": lambda: get_format("nf4"),
    "fp4": lambda: get_format("fp4_e2m1"),
    "fp8": lambda: get_format("fp8_e4m3"),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer(fmt, n, k, gs, seed, scale_dtype=torch.bfloat16, bias=True):
    w = torch.randn(n, k, generator=_gen(seed))
    q = quantize_weight(w, fmt, gs, scale_dtype)
    b = torch.randn(n, generator=_gen(seed + 1)) if bias else None
    return w, q, RoundingLinear(q, fmt, scale_dtype, b, None)


def _perturb(m: RoundingLinear, seed: int) -> None:
    g = _gen(seed)
    with torch.no_grad():
        m.offset.add_(torch.rand(m.offset.shape, generator=g) * 2 - 1)
        m.log_scale.add_((torch.rand(m.log_scale.shape, generator=g) - 0.5) * 0.6)
        if m.zero_shift is not None:
            m.zero_shift.add_(torch.rand(m.zero_shift.shape, generator=g) - 0.5)
    m.clamp_()


# ---------------------------------------------------------------------------------------------
# RoundingLinear


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), n=st.integers(1, 9), k=st.integers(1, 150),
       gs=st.sampled_from([16, 32, 64, None]), seed=st.integers(0, 2**16))
def test_start_reproduces_the_starting_quantization(name, n, k, gs, seed):
    fmt = FORMATS[name]()
    _w, q, m = _layer(fmt, n, k, gs, seed)
    got = m.quantized()
    # Codes may differ only where they give the same value (a constant group's tiny scale).
    assert torch.equal(dequantize_weight(got.codes, got.scale, got.zero_point, fmt, got.group_size),
                       dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size))
    assert torch.equal(got.scale, q.scale)
    assert (got.zero_point is None) == (q.zero_point is None)
    if q.zero_point is not None:
        assert torch.equal(got.zero_point, q.zero_point)
    expected = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size)
    assert torch.equal(m.compute_weight().detach(), expected)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), n=st.integers(1, 9), k=st.integers(1, 150),
       gs=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16))
def test_training_weight_is_exactly_what_is_stored(name, n, k, gs, seed):
    """After any (clamped) change of the parameters, the forward's weight is the stored layer's weight:
    training never optimises a weight that cannot be stored (bf16 scales, integer or GGUF zero points)."""
    fmt = FORMATS[name]()
    _w, _q, m = _layer(fmt, n, k, gs, seed)
    _perturb(m, seed + 7)
    got = m.quantized()
    assert got.codes.dtype == torch.uint8 and int(got.codes.max()) < 2 ** fmt.bits
    stored = dequantize_weight(got.codes, got.scale, got.zero_point, fmt, got.group_size)
    assert torch.equal(m.compute_weight().detach(), stored)
    if isinstance(fmt, AffineFormat) and fmt.zero_point_mode == "int":
        # "int" zero points stay codes: (mid - zp) / scale is an integer in [0, qmax]
        zp = fmt.mid - got.zero_point.to(F64) / got.scale.to(F64)
        assert torch.equal(zp, zp.round()) and float(zp.min()) >= 0 and float(zp.max()) <= fmt.qmax


def test_parameters_stay_in_their_ranges():
    fmt = get_format("int3")
    w = torch.randn(8, 64, generator=_gen(0))
    q = quantize_weight(w, fmt, 32, torch.bfloat16)
    m = RoundingLinear(q, fmt, torch.bfloat16, None, None, max_offset=0.75, scale_range=0.2)
    with torch.no_grad():
        m.offset.add_(5.0)
        m.log_scale.add_(3.0)
        m.zero_shift.sub_(4.0)
    m.clamp_()
    assert torch.allclose(m.offset, torch.full_like(m.offset, 0.75))
    assert torch.allclose(m.log_scale.exp(), torch.full_like(m.log_scale, 1.2))
    assert torch.allclose(m.zero_shift, torch.full_like(m.zero_shift, -0.75))


def test_gradients_match_the_straight_through_float64_reference():
    """d loss / d offset = (d loss / d W_hat) * scale0 (straight through the rounding); d loss / d scale
    and d loss / d zero through the dequantization (codes held), checked against float64."""
    fmt = get_format("int4")
    w, q, m = _layer(fmt, 5, 48, 16, 3, scale_dtype=torch.float32, bias=False)
    x = torch.randn(7, 48, generator=_gen(9))
    target = torch.randn(7, 5, generator=_gen(10))
    loss = ((m(x) - target) ** 2).sum()
    loss.backward()
    w_hat = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, 16, F64)
    x64, t64 = x.to(F64), target.to(F64)
    grad_w = 2 * (x64 @ w_hat.T - t64).T @ x64  # dL/dW_hat [N, K]
    scale = q.scale.to(F64).repeat_interleave(16, dim=1)
    # (the layer keeps its parameters per group: offsets [N, G, gs], group parameters [N, G, 1])
    offset_grad = m.offset.grad.reshape(5, -1)[:, :48].to(F64)
    assert torch.allclose(offset_grad, grad_w * scale, rtol=1e-4, atol=1e-4 * float(grad_w.abs().max()))
    centred = q.codes.to(F64) - fmt.mid
    grad_scale = (grad_w * centred).view(5, 3, 16).sum(-1) * q.scale.to(F64)  # d/d log_scale
    assert torch.allclose(m.log_scale.grad.squeeze(-1).to(F64), grad_scale, rtol=1e-4, atol=1e-3)
    grad_zero = grad_w.view(5, 3, 16).sum(-1) * q.scale.to(F64)  # zero shift in units of scale0
    assert torch.allclose(m.zero_shift.grad.squeeze(-1).to(F64), grad_zero, rtol=1e-4, atol=1e-3)


def test_input_scale_and_bias_are_applied():
    fmt = get_format("int4")
    w = torch.randn(6, 32, generator=_gen(1))
    q = quantize_weight(w, fmt, 32, torch.bfloat16)
    s = torch.rand(32, generator=_gen(2)) + 0.5
    b = torch.randn(6, generator=_gen(3))
    m = RoundingLinear(q, fmt, torch.bfloat16, b, s)
    x = torch.randn(4, 32, generator=_gen(4))
    w_hat = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, 32, F64)
    expected = (x.to(F64) * s.to(F64)) @ w_hat.T + b.to(F64)
    assert torch.allclose(m(x).to(F64), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The runner's block data


def _batches(n=3, seed=100, batch=2, seq=16, vocab=128):
    return [torch.randint(0, vocab, (batch, seq), generator=_gen(seed + i)) for i in range(n)]


def _float_hidden(model, batches):
    """The float model's hidden states after each block, per batch."""
    outs = {i: [] for i in range(len(model.layers))}
    hooks = [layer.register_forward_hook(lambda mod, a, out, i=i: outs[i].append(out.detach().clone()))
             for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("teacher", ["local", "float"])
def test_block_io_targets(teacher):
    torch.manual_seed(0)
    model = ToyTransformer(n_layers=3)
    batches = _batches()
    reference = _float_hidden(model, batches)
    seen = []

    def process(i, block, stats, io):
        assert len(io) == len(batches) and io.dtype is None
        for j in range(len(io)):
            # the block as it is now reproduces the local targets; run() passes the batch's other arguments
            if teacher == "local":
                assert torch.allclose(io.run(block, j), io.targets[j], atol=1e-6)
            else:
                assert torch.allclose(io.targets[j], reference[i][j], atol=1e-5)
        seen.append(i)
        # compress the block (crudely) so that the quantized stream departs from the float one
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.05 * torch.randn_like(p))

    run_blocks(model, batches, process, block_io=teacher, progress=False)
    assert seen == [0, 1, 2]


def test_block_io_refuses_unknown_teacher():
    with pytest.raises(ValueError, match="block_io"):
        run_blocks(ToyTransformer(), _batches(), lambda *a, **k: None, block_io="teacher", progress=False)


# ---------------------------------------------------------------------------------------------
# The method


def _logit_error(model, reference, batches):
    with torch.no_grad():
        return sum(float(((model(b) - reference(b)) ** 2).mean()) for b in batches)


def test_training_lowers_the_error_and_stores_plain_quantlinears():
    torch.manual_seed(0)
    base = ToyTransformer(n_layers=2, tie=False)
    calib = _batches(n=8, seed=200, batch=4, seq=32)
    held_out = _batches(n=4, seed=900, batch=4, seq=32)
    results = {}
    for iters in (0, 40):
        model = copy.deepcopy(base)
        llmopt.compress_(model, llmopt.Stage(LearnedRound("int2", 32, iters=iters, batch_size=2), exclude=["lm_head"]),
                         calibration=calib)
        assert isinstance(model.layers[0].q_proj, QuantLinear) and isinstance(model.layers[1].down_proj, QuantLinear)
        results[iters] = (_logit_error(model, base, calib), _logit_error(model, base, held_out))
    assert results[40][0] < 0.95 * results[0][0]  # calibration data
    assert results[40][1] < results[0][1]  # and data it never saw


def test_keeps_the_start_when_training_does_not_help(monkeypatch):
    torch.manual_seed(0)
    base = ToyTransformer(n_layers=2)
    calib = _batches(n=4)
    start = copy.deepcopy(base)
    llmopt.compress_(start, llmopt.Stage(LearnedRound("int3", 32, iters=0), exclude=["lm_head"]), calibration=calib)

    def worse(train, modules, io, config):
        for m in modules:  # wreck the parameters, then report a higher loss
            with torch.no_grad():
                m.offset.add_(1.0)
        return 1.0, 2.0

    monkeypatch.setattr(lr_module, "_train_block", worse)
    trained = copy.deepcopy(base)
    llmopt.compress_(trained, llmopt.Stage(LearnedRound("int3", 32, iters=5), exclude=["lm_head"]), calibration=calib)
    a, b = start.state_dict(), trained.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = ToyTransformer(n_layers=2)
    calib = _batches(n=4)
    llmopt.compress_(model, llmopt.Stage(LearnedRound("int4", 32, iters=5, batch_size=2), exclude=["lm_head"]),
                     calibration=calib)
    llmopt.save(model, tmp_path / "m")
    loaded = llmopt.load(ToyTransformer(n_layers=2), tmp_path / "m")
    with torch.no_grad():
        for b in calib:
            assert torch.equal(model(b), loaded(b))


@pytest.mark.parametrize("kwargs, match", [
    ({"init": "magic"}, "init"), ({"iters": -1}, "iters"), ({"teacher": "self"}, "teacher"),
    ({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr"), ({"scale_range": 1.0}, "scale_range"),
    ({"max_offset": -1}, "max_offset"), ({"damp": 0}, "damp"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedRound("int4", 64, **kwargs)


def test_needs_calibration():
    model = ToyTransformer()
    with pytest.raises(Exception, match="calibration"):
        llmopt.compress_(model, LearnedRound("int4", 32))


def test_config_round_trip():
    cfg = LearnedRound("int3", 64, iters=7, init="gptq", teacher="local", lr=0.01)
    again = llmopt.MethodConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.block_io == "local"
    assert isinstance(cfg.start_config(), llmopt.AWQ) and cfg.start_config().rounding == "gptq"
    rtn_start = LearnedRound("int4", 64, init="rtn").start_config()
    assert rtn_start.rounding == "rtn" and not rtn_start.clip


def test_layers_outside_blocks_warn_and_keep_the_start():
    """A model without repeated blocks has no block data to train on: LearnedRound says so and gives
    exactly its starting quantization."""
    torch.manual_seed(0)
    from llmopt.testing import ToyMLP

    base = ToyMLP()
    calib = [torch.randn(4, 96, generator=_gen(i)) for i in range(4)]
    start = copy.deepcopy(base)
    llmopt.compress_(start, LearnedRound("int4", 32, iters=0), calibration=calib)
    trained = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="outside the model's repeated blocks"):
        llmopt.compress_(trained, LearnedRound("int4", 32, iters=5), calibration=calib)
    a, b = start.state_dict(), trained.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
