"""Calibration options: forwards in another dtype, x^T x products in bf16, what feeds the next block."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import llmopt
from llmopt.calibration import StatsSpec, run_blocks
from llmopt.calibration.stats import compute_increment
from llmopt.testing import ToyTransformer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def _model(seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer(n_layers=3, tie=False)


def _batches(n: int = 4, seq: int = 24):
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (1, seq), generator=gen) for _ in range(n)]


def _rel_err(model: nn.Module, ref: nn.Module) -> float:
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y, r = model(x).double(), ref(x).double()
    return float((y - r).norm() / r.norm())


def test_bf16_products_match_float64_hessian():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=gen).to(torch.bfloat16)  # bf16 activations: exact in bf16
    exact = compute_increment(x, 96, StatsSpec(dtype=torch.float64)).xtx
    fast = compute_increment(x, 96, StatsSpec(dtype=torch.float64, product_dtype=torch.bfloat16)).xtx
    assert fast.dtype == torch.float64
    # One bf16 rounding of each entry of the product: relative 2**-8 of the entry, at most.
    err = (fast - exact).abs().max() / exact.abs().max()
    assert 0 < err <= 2 ** -8


def test_stats_spec_rejects_bad_product_dtype():
    with pytest.raises(ValueError, match="product_dtype"):
        StatsSpec(product_dtype=torch.int8)


@pytest.mark.parametrize("cfg", [llmopt.GPTQ("int4", 32), llmopt.AWQ("int4", 32), llmopt.SmoothQuant()],
                         ids=["gptq", "awq", "smoothquant"])
def test_bf16_calibration_keeps_weights_and_quality(cfg):
    base = _model()
    ref32, ref16 = copy.deepcopy(base), copy.deepcopy(base)
    llmopt.compress_(ref32, cfg, calibration=_batches(), exclude=["lm_head"])
    llmopt.compress_(ref16, cfg, calibration=_batches(), exclude=["lm_head"], calibration_dtype=torch.bfloat16)
    # The model's own float tensors are never cast: embedding and head are bit-identical, norms
    # float32 (folded copies are float32 too).
    assert torch.equal(ref16.embed.weight, base.embed.weight)
    assert torch.equal(ref16.lm_head.weight, base.lm_head.weight)
    assert all(p.dtype == torch.float32 for n, p in ref16.named_parameters() if "norm" in n)
    e32, e16 = _rel_err(ref32, base), _rel_err(ref16, base)
    # bf16 statistics are a slightly different calibration, not a worse one: within 25% of float32's
    # error (measured within ~5% on these models) and far from a broken run (errors near 1).
    assert e16 <= 1.25 * e32 + 1e-3, (e16, e32)


def test_propagate_float_runs_each_block_once():
    model = _model()
    calls = []
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    n = len(_batches())
    run_blocks(model, _batches(), lambda *a: None, propagate="float", progress=False)
    assert calls.count(0) == n and calls.count(2) == n  # one statistics pass per block, no output pass
    calls.clear()
    run_blocks(model, _batches(), lambda *a: None, propagate="quantized", progress=False)
    assert calls.count(0) == 2 * n and calls.count(2) == n  # the last block's outputs feed nothing


def test_propagate_float_feeds_float_outputs():
    """With propagate='float', block 1 sees the uncompressed block 0's outputs even if block 0 changed."""
    model = _model()
    seen = {}

    def process(i, block, stats):
        seen[i] = stats["layers.%d.q_proj" % i].hessian.clone()
        with torch.no_grad():  # wreck the block: with 'float' propagation nobody downstream notices
            for p in block.parameters():
                p.mul_(0.0)

    reference = {}
    run_blocks(copy.deepcopy(model), _batches(), lambda i, b, s: reference.__setitem__(
        i, s["layers.%d.q_proj" % i].hessian.clone()), propagate="float", progress=False)
    run_blocks(model, _batches(), process, propagate="float", progress=False)
    for i in reference:
        torch.testing.assert_close(seen[i], reference[i])


def test_bad_propagate_is_refused():
    with pytest.raises(ValueError, match="propagate"):
        run_blocks(_model(), _batches(), lambda *a: None, propagate="sideways", progress=False)
    with pytest.raises(ValueError, match="propagate"):
        llmopt.GPTQ("int4", 32, propagate="sideways")


def test_calibration_device_cpu_round_trip():
    model = _model()
    report = llmopt.compress_(model, llmopt.GPTQ("int4", 32), calibration=_batches(), exclude=["lm_head"],
                              calibration_device="cpu")
    assert len(report.replaced) == 21
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_bad_calibration_dtype_is_refused_before_anything_changes():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration_dtype"):
        llmopt.compress_(model, llmopt.GPTQ("int4", 32), calibration=_batches(), calibration_dtype=torch.int8)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("rows_per_product", [1, 20, 10**6])
def test_buffered_statistics_equal_float64_sums(rows_per_product):
    """However the rows are grouped into products, the sums are those of all rows (float64 oracle),
    layers sharing an input share them, and an in-place change after a layer read its input is not seen."""
    from llmopt.calibration.runner import _StatsHooks

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 5), nn.Linear(12, 3)

        def forward(self, x):
            y = self.a(x) + self.b(x).sum(-1, keepdim=True)
            x.mul_(100.0)  # modifies the input the layers read, after they read it
            return y

    model = Shared()
    hooks = _StatsHooks({"a": model.a, "b": model.b}, StatsSpec(dtype=torch.float64), rows_per_product)
    gen = torch.Generator().manual_seed(3)
    seen = []
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(2, 7, 12, generator=gen)
            seen.append(x.clone().reshape(-1, 12).double())
            model(x)
            hooks.new_pass()
    hooks.remove()
    rows = torch.cat(seen)
    for name in ("a", "b"):
        st = hooks.stats[name]
        assert st.count == rows.shape[0]
        torch.testing.assert_close(st.hessian, rows.T @ rows, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(st.col_abs_sum, rows.abs().sum(0), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(st.absmax, rows.abs().amax(0).float())
