"""The CompressedLinear contract, checked for every wrapper ``llmopt.load`` can rebuild.

``EXAMPLES`` has one or more rows per registered wrapper type: a small example built from a seeded
``nn.Linear`` by the wrapper's usual constructor. Adding a wrapper is adding its module under
``llmopt/nn/`` (a subclass of ``CompressedLinear`` registers itself) plus one row here;
``test_every_registered_wrapper_has_an_example`` fails until the row exists.
"""

from __future__ import annotations

import json
from typing import Callable, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmopt
import llmopt.nn.base as base
from llmopt.core.targets import set_submodule
from llmopt.nn import (
    CompensatedLinear,
    CompressedLinear,
    LoRALinear,
    LowRankLinear,
    QATLinear,
    QuantLinear,
    SparseLinear,
)
from llmopt.nn.base import module_types
from llmopt.testing import bit_equal

IN, OUT, RANK = 64, 24, 8
# Everything below computes in float32 with reference kernels: a forward differs from the float64
# product of dequantize_weight() only by float32 accumulation over K=64 (~1e-7 norm-wise).
FORWARD_TOL = 1e-5


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _linear(bias: bool = True) -> nn.Linear:
    """The seeded float32 ``nn.Linear`` every example starts from."""
    linear = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_randn(OUT, IN, seed=0) / IN ** 0.5)
        if bias:
            linear.bias.copy_(_randn(OUT, seed=1) * 0.1)
    return linear


def _quant(linear: nn.Linear) -> QuantLinear:
    return QuantLinear.from_linear(linear, "int4", 32, kernel="reference")


def _nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = weight.abs().reshape(weight.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def _with_adapters(layer: LoRALinear) -> LoRALinear:
    """Nonzero adapters, so the contract sees them (B starts at zero)."""
    with torch.no_grad():
        layer.lora_B.weight.copy_(_randn(*layer.lora_B.weight.shape, seed=2) * 0.1)
    return layer


def _compensated(linear: nn.Linear) -> CompensatedLinear:
    down, up = _randn(RANK, IN, seed=3) * 0.1, _randn(OUT, RANK, seed=4) * 0.1
    return CompensatedLinear.from_quantized(_quant(linear), down.bfloat16(), up.bfloat16())


def _low_rank(linear: nn.Linear) -> LowRankLinear:
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    return LowRankLinear.from_factors(vh[:RANK] * s[:RANK, None], u[:, :RANK], linear.bias.detach())


def _low_rank_int4_up(linear: nn.Linear) -> LowRankLinear:
    layer = _low_rank(linear)
    layer.up = QuantLinear.from_linear(layer.up, "int4", 8, kernel="reference")
    return layer


def _sparse(linear: nn.Linear) -> SparseLinear:
    weight = linear.weight.detach()
    return SparseLinear.from_dense(weight, weight.abs() > weight.abs().median(), linear.bias.detach())


def _sparse_24_int4(linear: nn.Linear) -> SparseLinear:
    weight = linear.weight.detach()
    layer = SparseLinear.from_dense(weight, _nm_mask(weight, 2, 4), linear.bias.detach(), nm=(2, 4))
    return layer.quantize("int4", 32)


# row id -> builder from the seeded Linear. One row per wrapper at least (more for its main variants).
EXAMPLES: Dict[str, Callable[[nn.Linear], nn.Module]] = {
    "QuantLinear": _quant,
    "CompensatedLinear": _compensated,
    "SparseLinear-bitmask-f32": _sparse,
    "SparseLinear-2:4-int4": _sparse_24_int4,
    "LowRankLinear": _low_rank,
    "LowRankLinear-int4-up": _low_rank_int4_up,
    "LoRALinear": lambda linear: _with_adapters(LoRALinear(linear, 4, 8.0)),
    "LoRALinear-dora-int4-base": lambda linear: _with_adapters(
        LoRALinear(_quant(linear), 4, 8.0, use_dora=True)),
    "QATLinear": lambda linear: QATLinear(linear, "int4", 32),
    "QATLinear-no-bias": lambda _: QATLinear(_linear(bias=False), "nf4", 16),
}

ROWS = list(EXAMPLES)

def _example(row: str) -> nn.Module:
    return EXAMPLES[row](_linear()).eval()


def _rebuild(layer: nn.Module) -> nn.Module:
    """An empty twin of ``layer`` on the meta device, rebuilt as ``llmopt.load`` does: the layer from its
    ``config()``, then each wrapper nested in it (a quantized factor of a LowRankLinear) from its own."""
    twin = type(layer).from_config(json.loads(json.dumps(layer.config())), device="meta")
    for name, sub in layer.named_modules():
        if name and module_types().get(type(sub).__name__) is type(sub):
            set_submodule(twin, name, type(sub).from_config(sub.config(), device="meta"))
    return twin


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _randn(3, 5, IN, seed=9).to(dtype)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


# ---------------------------------------------------------------------------------------------- coverage
def test_every_registered_wrapper_has_an_example():
    covered = {type(_example(row)).__name__ for row in EXAMPLES}
    # Linear stand-ins only: QuantEmbedding (registered for save/load, not a Linear) has its own matrix in
    # tests/nn/test_quant_embedding.py.
    ours = {name for name, cls in module_types().items()
            if cls.__module__.startswith("llmopt.") and issubclass(cls, CompressedLinear)}
    assert ours <= covered, f"wrappers without a row in EXAMPLES: {sorted(ours - covered)}"


@pytest.mark.parametrize("row", ROWS)
def test_is_a_registered_compressed_linear(row):
    layer = _example(row)
    assert isinstance(layer, CompressedLinear)
    assert module_types()[type(layer).__name__] is type(layer)
    assert (layer.in_features, layer.out_features) == (IN, OUT)


# ---------------------------------------------------------------------------------------------- config, state
@pytest.mark.parametrize("row", ROWS)
def test_config_is_json_and_rebuilds_the_same_layer_on_meta(row):
    layer = _example(row)
    config = layer.config()
    assert json.loads(json.dumps(config)) == config
    twin = _rebuild(layer)
    assert type(twin) is type(layer)
    assert (twin.in_features, twin.out_features) == (layer.in_features, layer.out_features)
    assert set(twin.state_dict()) == set(layer.state_dict())


@pytest.mark.parametrize("row", ROWS)
def test_state_dict_round_trips_bit_exactly(row):
    layer = _example(row)
    state = layer.state_dict()
    twin = _rebuild(layer)
    twin.load_state_dict(state, assign=True)
    twin.eval()
    got = twin.state_dict()
    assert list(got) == list(state)
    for key, value in state.items():
        assert bit_equal(got[key], value), key
    assert twin.config() == layer.config()
    with torch.no_grad():
        assert torch.equal(twin(_x()), layer(_x()))


@pytest.mark.parametrize("row", ROWS)
def test_llmopt_save_load_into_a_meta_skeleton_is_bit_exact(row, tmp_path):
    layer = _example(row)
    llmopt.save(nn.Sequential(layer), tmp_path)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(IN, OUT))
    llmopt.load(skeleton, tmp_path)
    assert type(skeleton[0]) is type(layer)
    expected, got = layer.state_dict(), skeleton[0].state_dict()
    assert list(got) == list(expected)
    assert all(bit_equal(got[key], value) for key, value in expected.items())
    with torch.no_grad():
        assert torch.equal(skeleton.eval()(_x()), layer(_x()))


# ---------------------------------------------------------------------------------------------- maths
@pytest.mark.parametrize("row", ROWS)
def test_dequantize_weight_is_what_the_forward_multiplies_by(row):
    layer = _example(row)
    weight = layer.dequantize_weight()
    assert weight.shape == (OUT, IN) and weight.dtype == torch.float32
    with torch.no_grad():
        bias = layer.bias.double() if layer.bias is not None else None
        assert _rel(layer(_x()), F.linear(_x().double(), weight.double(), bias)) < FORWARD_TOL


@pytest.mark.parametrize("row", ROWS)
def test_to_linear_computes_the_same_function(row):
    layer = _example(row)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and torch.equal(linear.weight, layer.dequantize_weight())
    assert (linear.bias is None) == (layer.bias is None)
    with torch.no_grad():
        assert _rel(linear(_x()), layer(_x())) < FORWARD_TOL


# ---------------------------------------------------------------------------------------------- reports
@pytest.mark.parametrize("row", ROWS)
def test_bytes_are_positive_and_consistent(row):
    layer = _example(row)
    state_bytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert layer.stored_bytes() == state_bytes  # what llmopt.save writes
    assert layer.runtime_bytes() > 0
    bias_bytes = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
    weight_bits = layer.bits_per_weight() * IN * OUT
    assert 0 < weight_bits <= 8 * (layer.stored_bytes() - bias_bytes) + 1e-6
    if isinstance(layer, CompressedLinear):
        assert layer.bits_per_weight() == pytest.approx(8.0 * layer.weight_bytes() / (IN * OUT), rel=1e-12)


@pytest.mark.parametrize("row", ROWS)
def test_describe_and_repr(row):
    layer = _example(row)
    assert isinstance(layer.describe(), str) and layer.describe()
    assert f"in_features={IN}" in repr(layer) and f"out_features={OUT}" in repr(layer)


# ------------------------------------------------------------------------------------------- the base itself
def test_subclasses_register_themselves_unless_opted_out(monkeypatch):
    monkeypatch.setattr(base, "_MODULE_TYPES", dict(base._MODULE_TYPES))

    class AbstractProbe(CompressedLinear, register=False):
        pass

    class ProbeLinear(AbstractProbe):
        def config(self):
            return {}

    assert module_types()["ProbeLinear"] is ProbeLinear
    assert "AbstractProbe" not in module_types()
    with pytest.raises(NotImplementedError):
        ProbeLinear().stored_bytes()


def test_lora_is_a_compressed_linear_that_methods_do_not_compress():
    layer = _example("LoRALinear")
    assert isinstance(layer, CompressedLinear) and layer.is_llmopt_compressed is False
