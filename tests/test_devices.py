"""The GPU path: the same checks on every device, ``"cpu"`` always and ``"cuda"`` where there is one.

Every method through ``compress_`` with the model on the device, calibration on a device while the
model stays on the CPU (and its rollback), LoRA / QLoRA / QAT training steps, ``save``/``load`` across
devices, ``model.to(device)`` of a compressed model, ``torch.compile`` of a quantized model, and the
CUDA synchronization of the evaluation timers. Models are tiny toys, so the CPU variants are cheap;
their point is that the very same assertions run on CUDA when a GPU is present.

Tolerances are relative Frobenius errors of the logits. Method bounds are about 1.5x what the CPU
measures on these random toys (random weights are full rank and have no outliers, so the errors are
larger than on a trained model); a device bug (wrong tensors mixed, a layer left uncompressed or
garbled) moves them by far more than that.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import llmopt
from llmopt.nn import LoRALinear, QuantLinear
from llmopt.nn.qat_linear import QATLinear
from llmopt.testing import ToyMLP, ToyTransformer, bit_equal

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm())


def _tensors(model: nn.Module):
    return list(model.named_parameters()) + list(model.named_buffers())


def _assert_on(model: nn.Module, device: str) -> None:
    wrong = [f"{name} on {t.device}" for name, t in _tensors(model) if t.device.type != torch.device(device).type]
    assert not wrong, f"tensors not on {device}: {wrong[:5]}"


def _toy(device: str) -> ToyTransformer:
    torch.manual_seed(0)
    return ToyTransformer(tie=False).eval().to(device)


def _ids(device: str, seed: int, shape=(2, 16)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, shape, generator=gen).to(device)


def _calibration(device: str):
    return [_ids(device, 100 + i, (2, 32)) for i in range(4)]


# name -> (config, bound on the relative logit error)
METHODS = {
    "rtn": (llmopt.RTN("int4", 32), 0.26),
    "hqq": (llmopt.HQQ(format="int4", group_size=32), 0.22),
    "gptq": (llmopt.GPTQ("int4", 32), 0.17),
    "awq": (llmopt.AWQ(format="int4", group_size=32), 0.17),
    "smoothquant": (llmopt.SmoothQuant(alpha=0.5), 0.03),
    "sparsegpt": (llmopt.SparseGPT(0.25), 0.42),
    "wanda": (llmopt.Wanda(0.25), 0.47),
    "svd": (llmopt.SVD(energy=0.9), 0.43),
}


# ------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_device(device, method):
    config, bound = METHODS[method]
    model = _toy(device)
    x = _ids(device, 1)
    with torch.no_grad():
        ref = model(x)
    report = llmopt.compress_(model, config, calibration=_calibration(device) if config.needs_calibration else None,
                              exclude=["lm_head"])
    assert report.replaced, f"{method}: nothing was compressed"
    _assert_on(model, device)
    with torch.no_grad():
        out = model(x)
    assert out.device.type == torch.device(device).type
    assert torch.isfinite(out).all()
    err = _rel(out, ref)
    assert 0 < err < bound, f"{method} on {device}: relative logit error {err:.4f} (bound {bound})"


# ------------------------------------------------------------------------------------------ calibration device
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gptq", "awq"])  # a layer-scope and a block-scope (folding) method
def test_calibration_device_model_stays_on_cpu(device, method):
    config, bound = METHODS[method]
    x = _ids("cpu", 1)
    on_cpu = _toy("cpu")
    with torch.no_grad():
        ref = on_cpu(x)
    llmopt.compress_(on_cpu, config, calibration=_calibration("cpu"), exclude=["lm_head"])
    model = _toy("cpu")
    llmopt.compress_(model, config, calibration=_calibration("cpu"), exclude=["lm_head"], calibration_device=device)
    _assert_on(model, "cpu")
    with torch.no_grad():
        out, expected = model(x), on_cpu(x)
    if device == "cpu":
        assert torch.equal(out, expected)
    else:
        # Other float arithmetic on the device: some codes round the other way, or AWQ picks a
        # neighbouring scale, so the two results differ; their quality must not.
        err, err_cpu = _rel(out, ref), _rel(expected, ref)
        assert err < min(bound, 1.1 * err_cpu + 0.005), (err, err_cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_device_rollback_leaves_model_on_cpu(device, monkeypatch, snapshot):
    """A failure in the second block undoes everything; no module of the model is left on the device."""
    from llmopt.methods.quant import gptq as gptq_module

    real, calls = gptq_module.gptq_quantize, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 8:  # 7 linears per block: fails inside block 1, after block 0 was compressed
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize", failing)
    model = _toy("cpu")
    snap = snapshot(model)
    with pytest.raises(llmopt.CompressionError, match="injected failure"):
        llmopt.compress_(model, METHODS["gptq"][0], calibration=_calibration("cpu"), exclude=["lm_head"],
                         calibration_device=device)
    assert len(calls) > 8
    snap.check()
    _assert_on(model, "cpu")


# ------------------------------------------------------------------------------------------ training steps
def _train(model: nn.Module, device: str, steps: int = 6, lr: float = 1e-2) -> list:
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(3)).to(device)
    target = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        for p in params:
            assert p.grad is not None and p.grad.device.type == torch.device(device).type
            assert torch.isfinite(p.grad).all()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _mlp(device: str) -> ToyMLP:
    torch.manual_seed(0)
    return ToyMLP().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized_base", [False, True], ids=["lora", "qlora"])
def test_lora_step(device, quantized_base):
    model = _mlp(device)
    if quantized_base:
        llmopt.compress_(model, llmopt.RTN("nf4", 32))
    llmopt.compress_(model, llmopt.LoRA(rank=4, alpha=8))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2
    assert all(isinstance(m.base, QuantLinear) == quantized_base for m in layers)
    _assert_on(model, device)
    losses = _train(model, device)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(not p.requires_grad for m in layers for p in m.base.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_qat_step_then_convert(device):
    model = _mlp(device)
    llmopt.compress_(model, llmopt.QAT("int4", 32))
    assert isinstance(model.up, QATLinear)
    _assert_on(model, device)
    losses = _train(model, device)
    assert losses[-1] < 0.9 * losses[0], losses
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        fake = model(x)
    llmopt.compress_(model, llmopt.QAT(step="convert"))
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    _assert_on(model, device)
    with torch.no_grad():
        assert _rel(model(x), fake) < 1e-3  # the converted layers compute what training saw


# ------------------------------------------------------------------------------------------ save / load
def _state(model: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("load_to", ["cpu", "device"])
def test_save_on_device_load_anywhere(device, load_to, tmp_path):
    target = device if load_to == "device" else "cpu"
    model = _toy(device)
    llmopt.compress_(model, llmopt.GPTQ("int4", 32), calibration=_calibration(device), exclude=["lm_head"])
    llmopt.save(model, tmp_path / "saved")
    loaded = llmopt.load(ToyTransformer(tie=False).eval(), tmp_path / "saved", device=target)
    _assert_on(loaded, target)
    saved, got = _state(model), _state(loaded)
    assert saved.keys() == got.keys()
    for key in saved:
        assert bit_equal(got[key], saved[key]), key
    x = _ids(device, 1)
    with torch.no_grad():
        out, ref = loaded(x.to(target)), model(x)
    if target == device:
        # Same device, same kernels, same bytes (a GPU kernel may still reduce in another order per call).
        assert _rel(out, ref) < 1e-6
    else:
        assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_load_moves_non_persistent_buffers(device, tmp_path):
    """A buffer not in the files (rotary ``inv_freq`` & co) follows ``load(device=...)``."""
    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN("int8", None))
    llmopt.save(model, tmp_path / "saved")
    skeleton = ToyMLP()
    skeleton.register_buffer("inv_freq", torch.arange(4, dtype=torch.float32), persistent=False)
    llmopt.load(skeleton, tmp_path / "saved", device=device)
    _assert_on(skeleton, device)
    assert torch.equal(skeleton.inv_freq.cpu(), torch.arange(4, dtype=torch.float32))


# ------------------------------------------------------------------------------------------ moves, compile
@pytest.mark.parametrize("device", DEVICES)
def test_compressed_model_to_device_and_back(device):
    model = _toy("cpu")
    llmopt.compress_(model, [llmopt.RTN("int4", 32)], exclude=["lm_head"])
    x = _ids("cpu", 1)
    with torch.no_grad():
        ref = model(x)
    state = _state(model)
    model.to(device)
    _assert_on(model, device)
    with torch.no_grad():
        moved = model(x.to(device))
    # Another device may pick another kernel (other summation order, bf16 activations): close, not equal.
    assert _rel(moved, ref) < 1e-2
    model.to("cpu")
    back = _state(model)
    for key in state:
        assert bit_equal(back[key], state[key]), key
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_quantized_model(device):
    torch._dynamo.reset()
    try:
        model = _mlp(device).eval()
        llmopt.compress_(model, llmopt.RTN("int4", 32))
        x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(6)).to(device)
        with torch.no_grad():
            eager = model(x)
            compiled = torch.compile(model, fullgraph=True)(x)
        assert compiled.device == eager.device
        assert _rel(compiled, eager) < 1e-2  # bf16 activation kernels: a bf16 ulp or two (see tests/nn/test_compile)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ timers
def test_sync_waits_for_cuda_only(monkeypatch):
    """The evaluation timers synchronize a CUDA device (asynchronous kernels), and nothing else."""
    from llmopt import evaluate

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    evaluate.sync_device("cpu")
    evaluate.sync_device(torch.device("meta"))
    assert calls == []
    evaluate.sync_device("cuda:0")
    assert calls == [torch.device("cuda:0")]


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_timer_synchronizes(device, monkeypatch):
    from llmopt import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "sync_device", lambda device=None: calls.append(torch.device(device).type))
    model = _toy(device)
    result = evaluate.prefill_throughput(model, prompt_tokens=8, warmup=0, repeats=2, vocab_size=128)
    assert result["tokens_per_s"] > 0
    assert calls == [torch.device(device).type] * 4  # before and after each timed forward
