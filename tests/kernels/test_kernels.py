"""Fast kernels against the pure-torch reference, and exact layout round trips."""

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.kernels import get_kernel, list_kernels, log_once
from llmopt.kernels.int4_cpu import int4_nibble_sources, unpack_int4_cpu
from llmopt.nn import QuantLinear


def _layer(n, k, fmt, gs, kernel="auto", bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    return QuantLinear.from_linear(lin, fmt, gs, kernel=kernel, **kw)


def _rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def test_kernels_listed():
    assert {"reference", "int4pack_cpu", "int8pack_cpu"} <= set(list_kernels())


# The fast CPU kernels round activations to bfloat16 (8 significant bits) and return bf16 outputs,
# so against a float64 reference on the *rounded* activations the output differs by bf16 output
# rounding and accumulation order: relative error <= 1e-2 (measured ~3e-3).
FAST_TOL = 1e-2


@pytest.mark.parametrize("fmt,gs,sym", [("int4", 32, False), ("int4", 64, True), ("int4", 128, False),
                                        ("int4", None, False), ("int3", 64, False), ("int2", 32, True),
                                        ("int4", 256, False), ("int4", 192, False)])
@pytest.mark.parametrize("n,k", [(64, 576), (192, 576), (48, 256)])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_int4pack_matches_reference(fmt, gs, sym, n, k, m):
    # Named: "auto" prefers lowbit_cpu for these layers where it is built (see expected_auto_kernel).
    layer = _layer(n, k, fmt, gs, kernel="int4pack_cpu", symmetric=sym)
    assert layer.kernel.name == "int4pack_cpu"
    x = torch.randn(m, k).to(torch.bfloat16).to(torch.float32)
    ref = F.linear(x.double(), layer.dequantize_weight(torch.float64), layer.bias.double())
    assert _rel_err(layer(x), ref) < FAST_TOL


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8pack_matches_reference(sym, dtype):
    layer = _layer(96, 200, "int8", None, kernel="int8pack_cpu", symmetric=sym)
    assert layer.kernel.name == "int8pack_cpu"
    x = torch.randn(3, 7, 200).to(torch.bfloat16).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 7, 96)
    ref = F.linear(x.double(), layer.dequantize_weight(torch.float64), layer.bias.double())
    assert _rel_err(y, ref) < FAST_TOL


@pytest.mark.parametrize("fmt,gs", [("int4", 64), ("int8", None), ("int3", 32)])
def test_fast_equals_reference_kernel(fmt, gs, expected_auto_kernel):
    fast = _layer(128, 320, fmt, gs)
    assert fast.kernel.name != "reference" and fast.kernel.name == expected_auto_kernel(fast)
    slow = _layer(128, 320, fmt, gs, kernel="reference")
    x = torch.randn(4, 320, dtype=torch.bfloat16)
    assert _rel_err(fast(x).float(), slow(x.float())) < FAST_TOL
    # Same stored bits, whatever the kernel.
    for key, value in slow.canonical_state().items():
        assert torch.equal(fast.canonical_state()[key], value)


@settings(max_examples=25, deadline=None)
@given(n16=st.integers(1, 8), k=st.integers(1, 300), gs=st.sampled_from([32, 64, 96, 128, 256, None]),
       bits=st.sampled_from([2, 3, 4]), sym=st.booleans(), seed=st.integers(0, 1000))
def test_int4_layout_roundtrip_exact(n16, k, gs, bits, sym, seed):
    """Runtime layout -> canonical is the exact inverse, for any shape the kernel serves."""
    layer = _layer(16 * n16, k, f"int{bits}", gs, kernel="reference", seed=seed, symmetric=sym)
    canonical = layer.canonical_state()
    kernel = get_kernel("int4pack_cpu")
    spec = layer.kernel_spec
    if kernel.unsupported_reason(spec, torch.device("cpu")) is not None:
        return
    back = kernel.to_canonical(spec, kernel.to_runtime(spec, canonical))
    assert set(back) == set(canonical)
    for key in canonical:
        assert torch.equal(back[key], canonical[key]), key


@pytest.mark.parametrize("n,k", [(64, 64), (16, 32), (208, 96), (48, 128)])
def test_int4_fast_unpack_agrees_with_generic_probe(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_int4_cpu(packed, n, k).to(torch.int32), codes)
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(-1)
    generic = torch.empty(n * k, dtype=torch.uint8)
    generic[int4_nibble_sources(n, k, torch.device("cpu"))] = nibbles
    assert torch.equal(generic.view(n, k).to(torch.int32), codes)


@pytest.mark.parametrize("fmt,gs", [("int4", 32), ("int8", None)])
def test_fast_kernels_give_input_gradients(fmt, gs, expected_auto_kernel):
    layer = _layer(64, 96, fmt, gs)
    assert layer.kernel.name != "reference" and layer.kernel.name == expected_auto_kernel(layer)
    x = torch.randn(3, 96, requires_grad=True)
    grad_out = torch.randn(3, 64)
    layer(x).backward(grad_out)
    expected = grad_out.double() @ layer.dequantize_weight(torch.float64)
    assert torch.allclose(x.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_int8_layout_roundtrip_exact():
    layer = _layer(40, 77, "int8", None, kernel="reference")
    kernel = get_kernel("int8pack_cpu")
    canonical = layer.canonical_state()
    back = kernel.to_canonical(layer.kernel_spec, kernel.to_runtime(layer.kernel_spec, canonical))
    for key in canonical:
        assert torch.equal(back[key], canonical[key])


def test_explicit_kernel_that_cannot_serve_is_an_error():
    with pytest.raises(ValueError, match="int4pack_cpu.*not an affine format"):
        _layer(64, 64, "nf4", 32, kernel="int4pack_cpu")
    with pytest.raises(ValueError, match="multiple of 16"):
        _layer(40, 64, "int4", 32, kernel="int4pack_cpu")
    with pytest.raises(ValueError, match="unknown kernel"):
        _layer(64, 64, "int4", 32, kernel="nope")


def test_fallback_logged_once(caplog, expected_auto_kernel):
    log_once.cache_clear()
    # nf4 with groups of 16: no fast kernel serves it (lowbit_cpu needs groups of a multiple of 32).
    assert expected_auto_kernel("nf4", 16, in_features=64) == "reference"
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        for _ in range(3):
            layer = _layer(64, 64, "nf4", 16)
            assert layer.kernel.name == "reference"
    messages = [r.getMessage() for r in caplog.records if "no fast kernel" in r.getMessage()]
    assert len(messages) == 1 and "nf4" in messages[0]


def test_unaligned_out_features_skip_int4pack(expected_auto_kernel):
    """40 rows is not a multiple of 16: never int4pack_cpu; lowbit_cpu where it is built (no row
    alignment), else the reference kernel. Either way the layer computes what it stores."""
    layer = _layer(40, 64, "int4", 32)
    assert layer.kernel.name == expected_auto_kernel(layer) != "int4pack_cpu"
    x = torch.randn(2, 64)
    ref = F.linear(x.double(), layer.dequantize_weight(torch.float64), layer.bias.double())
    # reference: float32 rounding only; lowbit_cpu: int16 activations (~1e-4, see test_lowbit_cpu.py).
    assert _rel_err(layer(x), ref) < (1e-6 if layer.kernel.name == "reference" else 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path(expected_auto_kernel):
    """Moving to CUDA re-selects the kernel (PyTorch's tinygemm for int4) and back again on CPU."""
    layer = _layer(128, 256, "int4", 64)
    cpu_out = layer(torch.ones(2, 256))
    layer = layer.to("cuda")
    assert layer.kernel.name == "int4_tinygemm_cuda" and layer.device.type == "cuda"
    out = layer(torch.ones(2, 256, device="cuda"))
    assert _rel_err(out.cpu(), cpu_out) < FAST_TOL
    back = layer.to("cpu")
    assert back.kernel.name == expected_auto_kernel(back) != "reference"
