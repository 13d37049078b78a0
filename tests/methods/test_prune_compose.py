"""Pruning composes with quantization in one ``compress_`` call: ``[Wanda(2:4), RTN(int4)]``."""

from __future__ import annotations

import torch

import llmopt
from llmopt.nn import SparseLinear
from llmopt.testing import ToyTransformer


def _calibration():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (1, 32), generator=gen) for _ in range(4)]


def test_prune_then_rtn_in_one_call_keeps_masks_and_round_trips(tmp_path):
    torch.manual_seed(0)
    pruned_only = ToyTransformer(tie=False)
    both = ToyTransformer(tie=False)
    both.load_state_dict(pruned_only.state_dict())
    llmopt.compress_(pruned_only, llmopt.Wanda(sparsity=0.5, pattern="2:4"), calibration=_calibration(),
                     exclude=["lm_head"])
    report = llmopt.compress_(both, [llmopt.Wanda(sparsity=0.5, pattern="2:4"), llmopt.RTN("int4", 32)],
                              calibration=_calibration(), exclude=["lm_head"])
    layers = {n: m for n, m in both.named_modules() if isinstance(m, SparseLinear)}
    assert layers and report.skipped == {}
    for name, layer in layers.items():
        reference = pruned_only.get_submodule(name)
        assert layer.quantized and layer.format.name == "int4" and layer.nm == (2, 4)
        assert torch.equal(layer.mask(), reference.mask())  # quantization keeps the pruning mask
        weight = layer.dequantize_weight(torch.float32)
        assert bool((weight[~layer.mask()] == 0).all())
        # int4 g32 RTN of the kept weights: error at most half a step of each group's scale.
        err = (weight - reference.dequantize_weight(torch.float32)).abs().max()
        assert err <= reference.dequantize_weight(torch.float32).abs().max() / 15 + 1e-6
        assert layer.bits_per_weight() < reference.bits_per_weight()
    llmopt.save(both, tmp_path)
    skeleton = ToyTransformer(tie=False)
    llmopt.load(skeleton, tmp_path)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(skeleton(ids), both(ids))


def test_rtn_skips_already_quantized_sparse_layers():
    torch.manual_seed(0)
    model = ToyTransformer(tie=False)
    llmopt.compress_(model, [llmopt.Magnitude(sparsity=0.5), llmopt.RTN("int4", 32)], exclude=["lm_head"])
    report = llmopt.compress_(model, llmopt.RTN("int8", None), exclude=["lm_head"])
    assert report.replaced == {} and report.skipped
    assert all("already compressed" in reason for reason in report.skipped.values())
