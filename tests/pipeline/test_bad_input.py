"""Bad input gives a clear error that names the problem (and the layer), and leaves the model untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmopt
from llmopt import CompressionError
from llmopt.nn import QuantLinear
from llmopt.methods.base import unregister_method
from llmopt.testing import ToyMLP, ToyTransformer

MIDDLE = "layers.1.up_proj"  # later in named_modules() order than all of layers.0.*


def _transformer() -> ToyTransformer:
    torch.manual_seed(1234)
    return ToyTransformer()


def _no_compressed(model):
    return not any(getattr(m, "is_llmopt_compressed", False) for m in model.modules())


# ------------------------------------------------------------------------------ bad weights
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_in_a_middle_layer(value, snapshot):
    model = _transformer()
    with torch.no_grad():
        model.get_submodule(MIDDLE).weight[3, 5] = value
    snap = snapshot(model)
    with pytest.raises(CompressionError, match=rf"'{MIDDLE}'.*NaN/Inf") as info:
        llmopt.compress_(model, llmopt.RTN("int4", 32))
    assert isinstance(info.value.__cause__, ValueError)
    snap.check()
    assert _no_compressed(model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        QuantLinear.from_linear(model.get_submodule(MIDDLE), "int4", 32)


def test_integer_weight_is_rejected(snapshot):
    model = _transformer()
    layer = model.get_submodule(MIDDLE)
    layer.weight = nn.Parameter(torch.randint(-8, 8, tuple(layer.weight.shape), dtype=torch.int32),
                                requires_grad=False)
    snap = snapshot(model)
    with pytest.raises(CompressionError, match=rf"'{MIDDLE}'.*dtype torch.int32") as info:
        llmopt.compress_(model, llmopt.RTN("int4", 32))
    assert isinstance(info.value.__cause__, TypeError)
    snap.check()
    with pytest.raises(TypeError, match="floating"):
        QuantLinear.from_linear(layer, "int8", None)


def test_float64_weights_are_supported():
    """float64 is an accepted weight dtype: the layer keeps it (bias, dequantized weight, output)."""
    torch.manual_seed(1234)
    model = ToyMLP().double()
    llmopt.compress_(model, llmopt.RTN("nf4", 32, kernel="reference"))
    assert model.up.bias.dtype == torch.float64
    w = model.up.dequantize_weight()
    assert w.dtype == torch.float64
    x = torch.randn(3, 96, dtype=torch.float64)
    y = model.up(x)
    assert y.dtype == torch.float64
    # reference kernel in float64: the result is the float64 matmul itself (1e-12 covers summation order).
    assert torch.allclose(y, F.linear(x, w, model.up.bias), rtol=1e-12, atol=1e-12)
    # "auto" (lowbit_cpu where it is built computes in float32 with int16 activations) keeps the dtype.
    model.up.set_kernel("auto")
    y_auto = model.up(x)
    assert y_auto.dtype == torch.float64
    assert ((y_auto - y).norm() / y.norm()).item() < 1e-3


def test_meta_device_weights(snapshot):
    with torch.device("meta"):
        model = ToyTransformer()
    snap = snapshot(model)
    with pytest.raises(CompressionError, match=r"'layers\.0\.q_proj'.*meta device"):
        llmopt.compress_(model, llmopt.RTN("int4", 32))
    snap.check()
    assert _no_compressed(model)


# ------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(format="int5"), r"unknown weight format 'int5'.*int4"),
        (dict(format=4), "unknown weight format 4"),
        (dict(format="int4", group_size=0), "group_size.*got 0"),
        (dict(format="int4", group_size=-5), "group_size.*got -5"),
        (dict(format="int4", group_size=3.5), "group_size.*got 3.5"),
        (dict(format="int4", group_size=True), "group_size.*got True"),
        (dict(format="int4", group_size="32"), "group_size.*got '32'"),
        (dict(format="nf4", symmetric=True), "'nf4'.*symmetric"),
        (dict(format="fp8_e4m3", symmetric=False), "'fp8_e4m3'.*symmetric"),
        (dict(format="int4", scale_dtype="int8"), "unsupported dtype 'int8'"),
    ],
)
def test_invalid_rtn_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llmopt.RTN(**kwargs)
    data = {"method": "rtn", **kwargs}
    with pytest.raises(ValueError, match=message):
        llmopt.MethodConfig.from_dict(data)


def test_from_dict_with_unknown_method_or_option():
    with pytest.raises(ValueError, match="unknown method 'gptq9'"):
        llmopt.MethodConfig.from_dict({"method": "gptq9"})
    with pytest.raises(ValueError, match="unknown method None"):
        llmopt.MethodConfig.from_dict({"format": "int4"})
    with pytest.raises(ValueError, match=r"no option\(s\) \['bits'\]"):
        llmopt.MethodConfig.from_dict({"method": "rtn", "bits": 4})


def test_unknown_kernel_fails_before_touching_the_model(snapshot):
    model = _transformer()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"unknown kernel 'bogus'"):
        llmopt.compress_(model, llmopt.RTN("int4", 32, kernel="bogus"))
    snap.check()


def test_kernel_that_cannot_serve_a_layer_names_it(snapshot):
    model = _transformer()
    snap = snapshot(model)
    with pytest.raises(CompressionError, match=r"'layers\.0\.q_proj'.*int4pack_cpu.*not an affine"):
        llmopt.compress_(model, llmopt.RTN("nf4", 32, kernel="int4pack_cpu"))
    snap.check()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"kernel": "bogus"}, "bogus"), ({"scale_dtype": "float64"}, "float64")],
    ids=["kernel", "scale_dtype"],
)
def test_options_that_fail_later_are_rejected_by_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llmopt.RTN("int4", 32, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(include="*.mlp.*"), r"include pattern '\*\.mlp\.\*' matches no module"),
        (dict(include=["*.q_proj", "layer.*"]), r"include pattern 'layer\.\*' matches no module"),
        (dict(exclude="*"), "no uncompressed nn.Linear matches"),
        # "layers.0" covers its children, so excluding them all leaves nothing.
        (dict(include="layers.0", exclude="layers.0.*"), "no uncompressed nn.Linear matches"),
    ],
)
def test_selection_that_selects_nothing(kwargs, message, snapshot):
    model = _transformer()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        llmopt.compress_(model, llmopt.RTN("int4", 32), **kwargs)
    snap.check()


def test_model_without_linear_layers():
    with pytest.raises(ValueError, match="no uncompressed nn.Linear"):
        llmopt.compress_(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), llmopt.RTN())


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_config_list(empty, snapshot):
    model = _transformer()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="at least one method config"):
        llmopt.compress_(model, empty)
    snap.check()


@pytest.mark.parametrize(
    "bad",
    [
        [object()],
        [llmopt.RTN(), 42],
        "rtn",
        {"method": "rtn", "format": "int4"},
        42,
        None,
    ],
    ids=["object-in-list", "int-in-list", "str", "dict", "int", "None"],
)
def test_non_config_object(bad, snapshot):
    model = _transformer()
    snap = snapshot(model)
    culprit = bad[-1] if isinstance(bad, list) else bad
    with pytest.raises(TypeError, match="method config") as info:
        llmopt.compress_(model, bad)
    assert repr(culprit) in str(info.value)
    snap.check()


# ------------------------------------------------------------------------------ failing handlers
@dataclasses.dataclass(frozen=True)
class FailOn(llmopt.MethodConfig):
    """Test method: int8 on the layers it claims (all when ``claim`` is empty), raises on ``fail_on``."""

    name = "test_fail_on"
    fail_on: str = ""
    claim: tuple = ()
    interrupt: bool = False


def _fail_on_handler(linear, config, *, name):
    if name == config.fail_on:
        if config.interrupt:
            raise KeyboardInterrupt
        raise RuntimeError("simulated failure")
    if config.claim and name not in config.claim:
        return linear  # declined: a later config may take it
    return QuantLinear.from_linear(linear, "int8", None)


@pytest.fixture
def fail_on_method():
    llmopt.register_method(FailOn)(_fail_on_handler)
    yield
    unregister_method(FailOn.name)


def test_handler_failing_in_the_middle(fail_on_method, snapshot):
    model = _transformer()
    snap = snapshot(model)
    with pytest.raises(CompressionError, match=rf"'{MIDDLE}' \(test_fail_on\): simulated failure") as info:
        llmopt.compress_(model, FailOn(fail_on=MIDDLE))
    assert isinstance(info.value.__cause__, RuntimeError)
    snap.check()
    assert _no_compressed(model)


def test_failure_in_a_later_config_undoes_earlier_configs(fail_on_method, snapshot):
    model = _transformer()
    snap = snapshot(model)
    first = FailOn(claim=("layers.0.q_proj", "layers.0.k_proj", "lm_head"))
    second = FailOn(fail_on=MIDDLE)
    # Sanity: without the failure, the first config really replaces its layers within the same call.
    probe = _transformer()
    report = llmopt.compress_(probe, [first, FailOn()])
    assert isinstance(probe.layers[0].q_proj, QuantLinear) and report.methods[0] == first.to_dict()

    with pytest.raises(CompressionError, match=MIDDLE):
        llmopt.compress_(model, [first, second])
    snap.check()  # q_proj, k_proj and the tied lm_head are back, tie included
    assert model.lm_head.weight is model.embed.weight
    assert _no_compressed(model)


def test_interrupt_in_a_handler_restores_and_propagates(fail_on_method, snapshot):
    model = _transformer()
    snap = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        llmopt.compress_(model, [FailOn(claim=("layers.0.q_proj",)), FailOn(fail_on=MIDDLE, interrupt=True)])
    snap.check()


# ------------------------------------------------------------------------------ kernels and forward
@pytest.mark.parametrize(
    "shape, fmt, gs, kernel, message",
    [
        ((64, 40), "nf4", 32, "int4pack_cpu", "int4pack_cpu.*nf4"),
        ((64, 40), "int4", 32, "int4pack_cpu", "out_features=40 is not a multiple of 16"),
        ((96, 48), "int4", 48, "int4pack_cpu", "group_size=48 is not a multiple of 32"),
        ((64, 32), "int8", 32, "int8pack_cpu", "one scale per output row"),
        ((64, 32), "int4", 32, "int8pack_cpu", "not 8-bit affine"),
        ((64, 32), "int4", 32, "cuda_magic", "unknown kernel 'cuda_magic'"),
    ],
)
def test_explicit_kernel_that_cannot_serve_the_layer(shape, fmt, gs, kernel, message):
    torch.manual_seed(1234)
    lin = nn.Linear(*shape)
    with pytest.raises(ValueError, match=message):
        QuantLinear.from_linear(lin, fmt, gs, kernel=kernel)


def test_explicit_kernel_error_via_compress_names_the_layer(snapshot):
    model = _transformer()
    snap = snapshot(model)
    with pytest.raises(CompressionError, match=r"'layers\.0\.q_proj'.*int4pack_cpu"):
        llmopt.compress_(model, llmopt.RTN("nf4", 32, kernel="int4pack_cpu"))
    snap.check()


def test_failed_set_kernel_keeps_the_layer_working(expected_auto_kernel):
    torch.manual_seed(1234)
    layer = QuantLinear.from_linear(nn.Linear(64, 40), "nf4", 32)
    kernel = layer.kernel.name
    assert kernel == expected_auto_kernel(layer)  # lowbit_cpu where it is built, else reference
    canonical = {k: v.clone() for k, v in layer.canonical_state().items()}
    x = torch.randn(2, 64)
    y = layer(x)
    with pytest.raises(ValueError, match="int4pack_cpu"):
        layer.set_kernel("int4pack_cpu")
    assert layer.kernel.name == kernel
    assert all(torch.equal(v, canonical[k]) for k, v in layer.canonical_state().items())
    assert torch.equal(layer(x), y)


def test_failed_set_kernel_leaves_a_savable_layer(tmp_path):
    torch.manual_seed(1234)
    model = ToyMLP()
    model.up = QuantLinear.from_linear(model.up, "nf4", 32)
    with pytest.raises(ValueError):
        model.up.set_kernel("int4pack_cpu")
    assert model.up.config()["kernel"] == "auto"
    llmopt.save(model, tmp_path)
    llmopt.load(ToyMLP(), tmp_path)


def test_forward_with_wrong_input_width():
    layer = QuantLinear.from_linear(nn.Linear(64, 32), "int4", 32)
    with pytest.raises(ValueError, match=r"64 features, got shape \(3, 63\)"):
        layer(torch.randn(3, 63))
    with pytest.raises(ValueError, match="64 features"):
        layer(torch.randn(2, 64, 1))


@pytest.mark.parametrize("fmt, gs", [("int4", 32), ("nf4", 32), ("int8", None)])
def test_integer_activations_are_rejected(fmt, gs):
    layer = QuantLinear.from_linear(nn.Linear(64, 32), fmt, gs)
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        layer(torch.randint(-3, 3, (2, 64)))


def test_loading_a_mismatched_state_dict_into_quant_linear():
    layer = QuantLinear.from_linear(nn.Linear(64, 32), "int4", 32)
    state = layer.state_dict()
    with pytest.raises(RuntimeError, match=r"qdata has shape \(32, 16\), expected \(32, 32\)"):
        layer.load_state_dict({**state, "qdata": state["qdata"][:, :16]})
    with pytest.raises(RuntimeError, match='Missing key.*"zero_point"'):
        layer.load_state_dict({k: v for k, v in state.items() if k != "zero_point"})
    with pytest.raises(RuntimeError, match="qdata must be uint8"):
        layer.load_state_dict({**state, "qdata": state["qdata"].to(torch.int32)})
    # none of the failed loads changed the layer
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
