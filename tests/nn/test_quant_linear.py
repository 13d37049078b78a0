"""QuantLinear: maths, storage sizes, dtype/device handling, state dict."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.nn import QuantLinear
from llmopt.testing import CustomLinear


@pytest.mark.parametrize("fmt,gs", [("int4", 64), ("int3", 32), ("nf4", 64), ("fp4_e2m1", 32),
                                    ("fp8_e4m3", 128), ("int8", 64), ("int2", 16)])
def test_reference_forward_equals_linear_with_dequantized_weight(fmt, gs):
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 48)
    q = QuantLinear.from_linear(lin, fmt, gs, kernel="reference")
    x = torch.randn(5, 200)
    expected = F.linear(x.double(), q.dequantize_weight(torch.float64), lin.bias.double())
    # Reference kernel: float32 dequantize + matmul vs float64: 1e-5 relative.
    assert torch.allclose(q(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(q.to_linear()(x), q(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt,gs,bits", [("int4", 64, 4.5), ("int4", 128, 4.25), ("int3", 64, 3.5),
                                         ("int2", 32, 3.0), ("nf4", 64, 4.25), ("int8", None, 8 + 32 / 4096)])
def test_stored_bits_match_theory(fmt, gs, bits):
    # bf16 scale (16 bits) per group, plus a bf16 zero point for asymmetric affine formats.
    q = QuantLinear.from_linear(torch.nn.Linear(4096, 64, bias=False), fmt, gs)
    assert q.bits_per_weight() == pytest.approx(bits, abs=1e-9)


def test_int8_per_channel_bytes():
    q = QuantLinear.from_linear(torch.nn.Linear(1000, 32, bias=False), "int8", None, symmetric=True)
    assert q.stored_bytes() == 32 * 1000 + 32 * 2  # one bf16 scale per row
    # The int8 kernel needs K % 16 == 0: in memory, K is padded to 1008 columns.
    assert q.runtime_bytes() == 32 * 1008 + 32 * 2
    aligned = QuantLinear.from_linear(torch.nn.Linear(1024, 32, bias=False), "int8", None, symmetric=True)
    assert aligned.runtime_bytes() == aligned.stored_bytes() == 32 * 1024 + 32 * 2


def test_int4_runtime_holds_one_copy(expected_auto_kernel):
    lin = torch.nn.Linear(4096, 256, bias=False)
    q = QuantLinear.from_linear(lin, "int4", 64, kernel="int4pack_cpu")
    assert q.kernel.name == "int4pack_cpu"
    assert q.runtime_bytes() == q.stored_bytes()  # kernel layout replaces, never duplicates
    names = {n for n, _ in q.named_buffers()}
    assert "scale" not in names and "scale_and_zero" in names
    # Whatever "auto" picks holds one copy too (lowbit_cpu: the canonical bytes themselves).
    auto = QuantLinear.from_linear(lin, "int4", 64)
    assert auto.kernel.name == expected_auto_kernel(auto) != "reference"
    assert auto.runtime_bytes() == auto.stored_bytes()


def test_keeps_bias_dtype_and_subclass_input():
    torch.manual_seed(0)
    lin = CustomLinear(64, 32).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, "int4", 32)
    assert q.bias.dtype == torch.bfloat16 and torch.equal(q.bias, lin.bias)
    assert q.dequantize_weight().dtype == torch.bfloat16
    y = q(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert not q.bias.requires_grad


def test_dtype_cast_keeps_quantized_data(expected_auto_kernel):
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), "int4", 32)
    before = {k: v.clone() for k, v in q.canonical_state().items()}
    kernel = q.kernel.name
    assert kernel == expected_auto_kernel(q) != "reference"
    q = q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16 and q.kernel.name == kernel
    for key, value in q.canonical_state().items():
        assert torch.equal(value, before[key])
    q = q.float()
    assert q.bias.dtype == torch.float32 and q.dequantize_weight().dtype == torch.float32


def test_state_dict_is_canonical_and_loads_exactly(expected_auto_kernel):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(576, 192), "int4", 128)
    sd = q.state_dict()
    assert set(sd) == {"qdata", "scale", "zero_point", "bias"}
    assert sd["qdata"].shape == (192, 288) and sd["scale"].shape == (192, 5)
    fresh = QuantLinear(576, 192, format="int4", group_size=128)
    fresh.load_state_dict(sd)
    assert fresh.kernel.name == q.kernel.name == expected_auto_kernel(fresh) != "reference"
    x = torch.randn(2, 576)
    assert torch.equal(fresh(x), q(x))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, sd[key])


def test_load_state_dict_shape_mismatch_is_reported():
    q = QuantLinear(64, 32, format="int4", group_size=32)
    sd = QuantLinear(64, 32, format="int4", group_size=16).state_dict()
    with pytest.raises(RuntimeError, match="scale"):
        q.load_state_dict(sd)


def test_codes_match_manual_quantization():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0] * 8])
    lin = torch.nn.Linear(32, 1, bias=False)
    lin.weight.data = w
    q = QuantLinear.from_linear(lin, "int2", 32)
    # 4 levels over [0, 3]: codes are exactly 0, 1, 2, 3.
    assert torch.equal(q.codes()[0], torch.tensor([0, 1, 2, 3] * 8, dtype=torch.uint8))
    assert torch.equal(q.dequantize_weight(), w)


def test_repr_names_format_group_kernel(expected_auto_kernel):
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), "int4", 32)
    text = repr(q)
    assert "format=int4" in text and "group_size=32" in text and f"kernel={expected_auto_kernel(q)}" in text
    named = repr(QuantLinear.from_linear(torch.nn.Linear(64, 32), "int4", 32, kernel="int4pack_cpu"))
    assert "kernel=int4pack_cpu" in named


@pytest.mark.parametrize("kernel", ["reference", "auto"])  # auto: lowbit_cpu where it is built
def test_input_gradient_flows_through_reference(kernel):
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), "nf4", 32, kernel=kernel)
    x = torch.randn(2, 64, requires_grad=True)
    q(x).sum().backward()
    expected = q.dequantize_weight().sum(0).expand(2, 64)
    assert torch.allclose(x.grad, expected, atol=1e-5)
    assert all(not p.requires_grad for p in q.parameters())


def test_from_linear_takes_a_whole_scheme():
    """A method config's WeightQuant gives the format, group size, symmetry, scale dtype and kernel at once."""
    from llmopt.core.scheme import WeightQuant

    linear = nn.Linear(96, 32)
    scheme = WeightQuant("int4", 32, symmetric=True, scale_dtype="float16", kernel="reference")
    a = QuantLinear.from_linear(linear, scheme)
    b = QuantLinear.from_linear(linear, "int4", 32, symmetric=True, scale_dtype=torch.float16, kernel="reference")
    assert a.format == b.format == scheme.weight_format() and a.group_size == 32 and a.scale_dtype == torch.float16
    assert a.kernel.name == "reference"
    for key, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[key], value), key
