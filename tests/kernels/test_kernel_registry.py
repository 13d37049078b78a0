"""The kernel registry: registration, names, priorities, and how "auto" chooses."""

import logging

import pytest
import torch
import torch.nn.functional as F

from llmopt.core.formats import get_format
from llmopt.kernels import (
    Kernel,
    KernelSpec,
    auto_order,
    get_kernel,
    list_kernels,
    log_once,
    register_kernel,
    select_kernel,
    unregister_kernel,
)
from llmopt.kernels import registry
from llmopt.kernels.lowbit_cpu import lowbit_available
from llmopt.kernels.reference import ReferenceKernel
from llmopt.nn import QuantLinear

CPU = torch.device("cpu")


def _spec(fmt="nf4", k=64, n=32, group_size=32, **kw):
    return KernelSpec(format=get_format(fmt), in_features=k, out_features=n, group_size=group_size, **kw)


class Toy(ReferenceKernel):
    """The reference maths under another name, serving only the formats it is given."""

    def __init__(self, name, formats=("nf4",)):
        self.name = name
        self.formats = formats

    def unsupported_reason(self, spec, device):
        return None if spec.format.name in self.formats else f"only serves {', '.join(self.formats)}"


@pytest.fixture
def cleanup():
    """Names registered by a test, unregistered afterwards whatever happens."""
    names = []
    yield names
    for name in names:
        if name in list_kernels():
            unregister_kernel(name)


BUILTINS = ["reference", "int4pack_cpu", "int8pack_cpu", "int8_dynamic_cpu", "int8_onednn_cpu", "lowbit_cpu",
            "int4_tinygemm_cuda", "lowbit_triton"]
# Priorities 40 > 35 > 33 > 30 > 25 > 20 > 10 (see each kernel's file). The two CUDA kernels only ever
# compete on CUDA (Kernel.auto_device_types), so their rank among the CPU kernels changes nothing there.
BUILTIN_AUTO_ORDER = ["int8_onednn_cpu", "int4_tinygemm_cuda", "lowbit_triton", "int8_dynamic_cpu", "lowbit_cpu",
                      "int8pack_cpu", "int4pack_cpu"]


def test_builtins_registered_in_order(cleanup):
    assert list_kernels()[:8] == BUILTINS
    assert auto_order()[:7] == BUILTIN_AUTO_ORDER
    assert "reference" not in auto_order()
    assert isinstance(get_kernel("int4pack_cpu"), Kernel)
    # lowbit_cpu's priority is exactly 25: between toys at 26 and 24, and 24 still beats int8pack_cpu (20).
    cleanup += ["toy_26", "toy_24"]
    register_kernel(Toy("toy_26"), priority=26)
    register_kernel(Toy("toy_24"), priority=24)
    order = auto_order()
    assert (order.index("int8_dynamic_cpu") < order.index("toy_26") < order.index("lowbit_cpu")
            < order.index("toy_24") < order.index("int8pack_cpu"))


def test_register_as_call_and_unregister(cleanup):
    kernel = Toy("toy_call")
    cleanup.append("toy_call")
    assert register_kernel(kernel, priority=3) is kernel
    assert get_kernel("toy_call") is kernel and "toy_call" in list_kernels() and "toy_call" in auto_order()
    unregister_kernel("toy_call")
    assert "toy_call" not in list_kernels() and "toy_call" not in auto_order()
    with pytest.raises(ValueError, match="unknown kernel 'toy_call'"):
        get_kernel("toy_call")
    with pytest.raises(ValueError, match="no kernel named 'toy_call'"):
        unregister_kernel("toy_call")


def test_register_on_a_class_bare_and_called(cleanup):
    cleanup += ["toy_bare", "toy_called"]

    @register_kernel
    class Bare(ReferenceKernel):
        name = "toy_bare"

    @register_kernel(priority=None)
    class Called(ReferenceKernel):
        name = "toy_called"

    assert isinstance(Bare, type) and isinstance(get_kernel("toy_bare"), Bare)
    assert isinstance(get_kernel("toy_called"), Called)
    assert "toy_bare" in auto_order() and "toy_called" not in auto_order()  # priority None: by name only


def test_duplicate_name_is_an_error_unless_replace(cleanup):
    cleanup.append("toy_dup")
    first, second = Toy("toy_dup"), Toy("toy_dup")
    register_kernel(first)
    with pytest.raises(ValueError, match="'toy_dup' is already registered.*replace=True"):
        register_kernel(second)
    assert get_kernel("toy_dup") is first
    register_kernel(second, replace=True)
    assert get_kernel("toy_dup") is second
    with pytest.raises(ValueError, match="already registered"):
        register_kernel(ReferenceKernel, priority=None)  # built-ins are protected the same way


@pytest.mark.parametrize("bad, error, match", [
    (object(), TypeError, "needs a Kernel subclass or instance"),
    (Toy(""), ValueError, "non-empty string"),
    (Toy("auto"), ValueError, "other than 'auto'"),
])
def test_register_rejects_bad_kernels(bad, error, match):
    with pytest.raises(error, match=match):
        register_kernel(bad)


def test_register_rejects_bad_priorities_and_protects_reference():
    with pytest.raises(TypeError, match="priority must be an integer or None"):
        register_kernel(Toy("toy_bad_priority"), priority=True)
    with pytest.raises(TypeError, match="priority must be an integer or None"):
        register_kernel(Toy("toy_bad_priority"), priority=1.5)
    assert "toy_bad_priority" not in list_kernels()
    with pytest.raises(ValueError, match="register it with priority=None"):
        register_kernel(ReferenceKernel(), priority=5, replace=True)
    with pytest.raises(ValueError, match="cannot be unregistered"):
        unregister_kernel("reference")
    assert type(get_kernel("reference")) is ReferenceKernel


def test_priorities_decide_auto_order(cleanup, expected_auto_kernel):
    cleanup += ["toy_low", "toy_high", "toy_tie"]
    register_kernel(Toy("toy_low"), priority=5)
    register_kernel(Toy("toy_high"), priority=7)
    register_kernel(Toy("toy_tie"), priority=5)  # equal priority: after the earlier registered toy_low
    order = auto_order()
    assert order.index("toy_high") < order.index("toy_low") < order.index("toy_tie")
    # nf4 in groups of 16: no built-in serves it, so the toys (below every built-in) decide.
    spec = _spec("nf4", group_size=16)
    assert expected_auto_kernel(spec) == "reference"
    assert select_kernel(spec, "auto", CPU).name == "toy_high"
    unregister_kernel("toy_high")
    assert select_kernel(spec, "auto", CPU).name == "toy_low"


def test_a_higher_priority_kernel_beats_a_builtin(cleanup, expected_auto_kernel):
    cleanup.append("toy_int4_first")
    spec = _spec("int4", n=64)
    builtin = expected_auto_kernel(spec)  # lowbit_cpu where it is built, else int4pack_cpu
    assert builtin in ("lowbit_cpu", "int4pack_cpu")
    assert select_kernel(spec, "auto", CPU).name == builtin
    register_kernel(Toy("toy_int4_first", formats=("int4",)), priority=1000)
    assert select_kernel(spec, "auto", CPU).name == "toy_int4_first"
    # A default-priority kernel (0) comes after the built-ins.
    unregister_kernel("toy_int4_first")
    register_kernel(Toy("toy_int4_first", formats=("int4",)))
    assert select_kernel(spec, "auto", CPU).name == builtin


def test_explicit_unsupported_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="kernel 'int4pack_cpu' cannot serve this layer: format 'nf4'"):
        select_kernel(_spec("nf4"), "int4pack_cpu", CPU)
    with pytest.raises(ValueError, match="unknown kernel 'nope'; available: reference, int4pack_cpu"):
        select_kernel(_spec("nf4"), "nope", CPU)


def test_fallback_to_reference_logged_once_with_reasons(caplog):
    log_once.cache_clear()
    spec = _spec("fp8_e4m3", group_size=16)
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        for _ in range(3):
            assert select_kernel(spec, "auto", CPU).name == "reference"
    messages = [r.getMessage() for r in caplog.records if "no fast kernel" in r.getMessage()]
    assert len(messages) == 1
    assert "format='fp8_e4m3' group_size=16 on cpu" in messages[0]
    assert "int4pack_cpu: format 'fp8_e4m3' is not an affine format" in messages[0]
    assert "lowbit_cpu: group_size=16 is not a multiple of 32" in messages[0]


def test_meta_device_fallback_is_silent(caplog):
    log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        assert select_kernel(_spec("int4", n=64), "auto", torch.device("meta")).name == "reference"
    assert not caplog.records


def test_every_auto_choice_goes_through_fast_enough(monkeypatch, caplog):
    """The hook of issue 13: a kernel judged slower than dense is skipped by "auto", not when named."""
    seen = []
    slow = {"int4pack_cpu", "lowbit_cpu"}

    def never_int4(kernel, spec, device):
        seen.append(kernel.name)
        return kernel.name not in slow

    monkeypatch.setattr(registry, "_fast_enough", never_int4)
    log_once.cache_clear()
    spec = _spec("int4", n=64)
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        assert select_kernel(spec, "auto", CPU).name == "reference"
    # Asked only about kernels that can serve the spec, in auto order (lowbit_cpu: when it is built;
    # its CPU-flag gate lives in the hook being replaced here).
    assert seen == (["lowbit_cpu"] if lowbit_available() else []) + ["int4pack_cpu"]
    for name in seen:
        assert f"{name}: slower than a dense matmul here" in caplog.text
        assert select_kernel(spec, name, CPU).name == name


def test_quant_linear_uses_a_registered_kernel(cleanup, expected_auto_kernel):
    cleanup.append("toy_layer")
    register_kernel(Toy("toy_layer", formats=("nf4",)), priority=1)
    lin = torch.nn.Linear(64, 32)
    # Groups of 16: no built-in serves the layer, so auto reaches the low-priority toy.
    assert expected_auto_kernel("nf4", 16, in_features=64, out_features=32) == "reference"
    named = QuantLinear.from_linear(lin, "nf4", 16, kernel="toy_layer")
    auto = QuantLinear.from_linear(lin, "nf4", 16)
    ref = QuantLinear.from_linear(lin, "nf4", 16, kernel="reference")
    assert named.kernel.name == auto.kernel.name == "toy_layer"
    assert "kernel=toy_layer" in repr(named) and named.describe() == "nf4 g16 [toy_layer]"
    x = torch.randn(3, 64)
    assert torch.equal(named(x), ref(x)) and torch.equal(auto(x), ref(x))
    with pytest.raises(ValueError, match="'toy_layer' cannot serve this layer: only serves nf4"):
        QuantLinear.from_linear(lin, "int4", 32, kernel="toy_layer")


def test_kernel_spec_of_a_layer():
    layer = QuantLinear.from_linear(torch.nn.Linear(72, 48), "int4", 32)
    spec = layer.kernel_spec
    assert spec == KernelSpec(format=get_format("int4"), in_features=72, out_features=48, group_size=32,
                              scale_dtype=torch.bfloat16, act_bits=None, has_bias=True)
    assert spec.num_groups == 3 and spec.has_zero_point and hash(spec) == hash(layer.kernel_spec)
    assert {spec: "usable as a cache key"}[layer.kernel_spec]
    per_channel = QuantLinear.from_linear(torch.nn.Linear(72, 48, bias=False), "int8", None, symmetric=True)
    assert per_channel.kernel_spec.group_size == 72 and not per_channel.kernel_spec.has_bias
    assert not per_channel.kernel_spec.has_zero_point
    with pytest.raises(AttributeError):
        spec.group_size = 64  # frozen


@pytest.mark.parametrize("kwargs, error, match", [
    ({"format": "int4"}, TypeError, "must be a WeightFormat"),
    ({"in_features": 0}, ValueError, "in_features must be a positive integer"),
    ({"group_size": 128}, ValueError, "exceeds in_features"),
    ({"group_size": True}, ValueError, "group_size must be a positive integer"),
    ({"scale_dtype": torch.int8}, TypeError, "floating torch.dtype"),
    ({"act_bits": 4}, ValueError, "act_bits must be None or one of"),
])
def test_kernel_spec_rejects_bad_values(kwargs, error, match):
    args = dict(format=get_format("int4"), in_features=64, out_features=32, group_size=32)
    with pytest.raises(error, match=match):
        KernelSpec(**{**args, **kwargs})


def test_base_kernel_methods_to_implement():
    kernel = Kernel()
    spec = _spec("int4")
    with pytest.raises(NotImplementedError):
        kernel.unsupported_reason(spec, CPU)
    with pytest.raises(NotImplementedError):
        kernel.forward(spec, {}, torch.zeros(1, 64), None)


def test_reference_kernel_forward_matches_dense():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), "int4", 32, kernel="reference")
    x = torch.randn(2, 64)
    y = get_kernel("reference").forward(layer.kernel_spec, layer._buffers, x, layer.bias)
    assert torch.equal(y, F.linear(x, layer.dequantize_weight(torch.float32), layer.bias))
