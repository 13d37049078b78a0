"""``torch.compile(module, fullgraph=True)`` of every llmopt wrapper, on CPU (inductor).

Each case compiles one tiny layer with ``fullgraph=True`` (any graph break is an error) and checks the
compiled output against eager and against a float64 product with the layer's dequantized weight.
Tolerances are max-norm errors relative to the largest output magnitude:

* float32 paths: compiled vs eager ``1e-5`` (the matmuls are the same external kernels; inductor may
  reorder the fused pointwise work around them), vs float64 ``1e-4``;
* bfloat16 activations (``int4pack_cpu`` / ``int8pack_cpu`` round the input to bf16, or the model runs
  in bf16): compiled vs eager ``1e-2`` (inductor keeps fused bf16 intermediates such as the bias add
  in float32 and rounds once, eager rounds after each op: one or two bf16 ulps), vs float64 ``2e-2``.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn as nn

from llmopt.kernels import get_kernel
from llmopt.nn import CompensatedLinear, LoRALinear, LowRankLinear, QuantLinear, SparseLinear
from llmopt.core.formats import get_format
from llmopt.core.primitives import fake_quantize_activations, quantize_weight
from llmopt.nn.qat_linear import QATLinear

F32_EAGER, F32_REF = 1e-5, 1e-4
BF16_EAGER, BF16_REF = 1e-2, 2e-2
K, N = 128, 64  # tiny: compiling on two cores costs seconds per case


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every case compiles from scratch (no graphs or guards left by another case)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=_gen(seed)) / K ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=_gen(seed + 1)) * 0.1)
    return lin


def _x(dtype: torch.dtype = torch.float32, seed: int = 7, shape=(2, 3), requires_grad: bool = False):
    x = torch.randn(*shape, K, generator=_gen(seed)).to(dtype)
    return x.requires_grad_(requires_grad)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-norm error of ``a`` against ``b``, relative to ``b``'s largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _compiled(module: nn.Module, **kwargs):
    return torch.compile(module, fullgraph=True, **kwargs)


def _check(module: nn.Module, x: torch.Tensor, weight64: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           eager_tol: float, ref_tol: float, x_ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Compile ``module``, run it on ``x`` and compare with eager and with ``x_ref @ weight64.T + bias``."""
    with torch.no_grad():
        got = _compiled(module)(x)
        eager = module(x)
    assert got.dtype == eager.dtype == x.dtype and got.shape == eager.shape
    assert _rel(got, eager) <= eager_tol, f"compiled vs eager: {_rel(got, eager):.3g}"
    if weight64 is not None:
        xr = (x if x_ref is None else x_ref).double()
        ref = xr @ weight64.T
        if bias is not None:
            ref = ref + bias.double()
        assert _rel(got, ref) <= ref_tol, f"compiled vs float64: {_rel(got, ref):.3g}"
    return got


def _w8a8(kernel: str, seed: int = 0) -> QuantLinear:
    fmt = get_format("int8", symmetric=True)
    lin = _linear(seed)
    q = quantize_weight(lin.weight.detach(), fmt, None)
    return QuantLinear.from_codes(q.codes, q.scale, q.zero_point, format=fmt, group_size=None,
                                  bias=lin.bias.detach(), kernel=kernel, act_bits=8)


def _skip_unless_kernel(name: str, layer_factory) -> None:
    probe = layer_factory("reference")
    reason = get_kernel(name).unsupported_reason(probe.kernel_spec, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


# ------------------------------------------------------------------------------------------ QuantLinear
# (format, group_size, kernel, activation dtype); the first rows form the fast default set.
QUANT_CASES = [
    ("int4", 32, "reference", torch.float32),
    ("int4", 64, "int4pack_cpu", torch.bfloat16),
    ("int8", None, "int8pack_cpu", torch.bfloat16),
    pytest.param("nf4", 64, "reference", torch.bfloat16, marks=pytest.mark.slow),
    pytest.param("fp8_e4m3", 32, "reference", torch.float32, marks=pytest.mark.slow),
    pytest.param("int3", 32, "reference", torch.float32, marks=pytest.mark.slow),
    pytest.param("int2", 64, "reference", torch.float32, marks=pytest.mark.slow),
    pytest.param("int3", 32, "int4pack_cpu", torch.float32, marks=pytest.mark.slow),
    pytest.param("int2", 128, "int4pack_cpu", torch.bfloat16, marks=pytest.mark.slow),
    pytest.param("int8", 128, "reference", torch.float32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fmt,group_size,kernel,dtype", QUANT_CASES)
def test_quant_linear_compiles_fullgraph(fmt, group_size, kernel, dtype):
    q = QuantLinear.from_linear(_linear(), format=fmt, group_size=group_size, kernel=kernel)
    assert q.kernel.name == kernel
    x = _x(dtype)
    bf16 = dtype == torch.bfloat16 or kernel != "reference"
    # The fast CPU kernels multiply bf16 activations: the float64 reference gets the same rounded input.
    x_ref = x.to(torch.bfloat16) if kernel != "reference" else x
    _check(q, x, q.dequantize_weight(torch.float64), q.bias, *(
        (BF16_EAGER, BF16_REF) if bf16 else (F32_EAGER, F32_REF)), x_ref=x_ref)


@pytest.mark.parametrize("kernel", [
    "int8_onednn_cpu",
    pytest.param("int8_dynamic_cpu", marks=pytest.mark.slow),
    pytest.param("reference", marks=pytest.mark.slow),
])
def test_w8a8_compiles_fullgraph(kernel):
    """W8A8: per-token int8 activations. oneDNN's prepacked int8 linear runs behind a custom op
    (``llmopt::onednn_qlinear``): inductor's own lowering of it needs the weight to be a constant."""
    _skip_unless_kernel(kernel, _w8a8)
    q = _w8a8(kernel)
    x = _x()
    # Same codes and int32 accumulation in every kernel: float32 rounding only, against the float64
    # product of the fake-quantized activations with the dequantized weight.
    _check(q, x, q.dequantize_weight(torch.float64), q.bias, F32_EAGER, F32_REF,
           x_ref=fake_quantize_activations(x, 8))


@pytest.mark.slow
def test_quant_linear_input_scale_compiles():
    lin = _linear()
    q = QuantLinear.from_linear(lin, format="int4", group_size=64, kernel="int4pack_cpu")
    scale = torch.rand(K, generator=_gen(3)) + 0.5
    q2 = QuantLinear.from_codes(q.codes(), q.canonical_state()["scale"], q.canonical_state()["zero_point"],
                                format="int4", group_size=64, bias=lin.bias.detach(), kernel="int4pack_cpu",
                                input_scale=scale)
    x = _x(torch.bfloat16)
    _check(q2, x, q2.dequantize_weight(torch.float64), q2.bias, BF16_EAGER, BF16_REF)


@pytest.mark.slow
def test_fast_kernel_backward_compiles():
    """The int4 CPU op has no derivative: QuantLinear's autograd.Function supplies ``grad_x = grad_y @ W``
    (dequantized in the backward). It traces whole, and its backward compiles too."""
    q = QuantLinear.from_linear(_linear(), format="int4", group_size=64, kernel="int4pack_cpu")
    x_c, x_e = _x(requires_grad=True), _x(requires_grad=True)
    y_c = _compiled(q)(x_c)
    y_e = q(x_e)
    assert _rel(y_c, y_e) <= BF16_EAGER
    g = torch.randn(y_e.shape, generator=_gen(5))
    y_c.backward(g)
    y_e.backward(g)
    assert _rel(x_c.grad, x_e.grad) <= BF16_EAGER
    ref = g.double() @ q.dequantize_weight(torch.float64)
    assert _rel(x_c.grad, ref) <= BF16_REF


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["int4pack_cpu", "int8_onednn_cpu"])
def test_dynamic_shapes_compile(kernel):
    """``dynamic=True``: one graph serves every number of tokens (prefill and decode)."""
    factory = _w8a8 if kernel == "int8_onednn_cpu" else (
        lambda kern: QuantLinear.from_linear(_linear(), format="int4", group_size=64, kernel=kern))
    _skip_unless_kernel(kernel, factory)
    q = factory(kernel)
    compiled = _compiled(q, dynamic=True)
    with torch.no_grad():
        for rows in (1, 5, 17):
            x = _x(shape=(rows,), seed=rows)
            assert _rel(compiled(x), q(x)) <= BF16_EAGER


# ------------------------------------------------------------------------------------------ LowRankLinear
def test_low_rank_compiles_fullgraph():
    down = torch.randn(8, K, generator=_gen(1)) / K ** 0.5
    up = torch.randn(N, 8, generator=_gen(2)) / 8 ** 0.5
    layer = LowRankLinear.from_factors(down, up, torch.randn(N, generator=_gen(3)))
    _check(layer, _x(), layer.dequantize_weight(torch.float64), layer.up.bias, F32_EAGER, F32_REF)


@pytest.mark.slow
def test_low_rank_with_quantized_factors_compiles():
    layer = LowRankLinear.from_factors(torch.randn(32, K, generator=_gen(1)) / K ** 0.5,
                                       torch.randn(N, 32, generator=_gen(2)) / 32 ** 0.5)
    layer.down = QuantLinear.from_linear(layer.down, "int4", 32, kernel="int4pack_cpu")
    layer.up = QuantLinear.from_linear(layer.up, "int4", 32, kernel="int4pack_cpu")
    x = _x(torch.bfloat16)
    _check(layer, x, None, None, BF16_EAGER, BF16_REF)


# ------------------------------------------------------------------------------------------ SparseLinear
def _nm_mask(n: int, m: int) -> torch.Tensor:
    scores = torch.rand(N, K // m, m, generator=_gen(4))
    keep = scores.argsort(dim=-1)[..., :n]
    return torch.zeros(N, K // m, m, dtype=torch.bool).scatter_(2, keep, True).reshape(N, K)


SPARSE_CASES = [
    ("bitmask", False, "dense"),
    ("bitmask", True, "compressed"),  # quantized kept values: exactly nnz codes unpacked per forward
    pytest.param("bitmask", False, "compressed", marks=pytest.mark.slow),
    pytest.param("2:4", False, "compressed", marks=pytest.mark.slow),
    pytest.param("2:4", True, "compressed", marks=pytest.mark.slow),
    pytest.param("2:4", False, "dense", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("layout,quantized,runtime", SPARSE_CASES)
def test_sparse_linear_compiles_fullgraph(layout, quantized, runtime):
    lin = _linear()
    nm = None if layout == "bitmask" else (2, 4)
    mask = torch.rand(N, K, generator=_gen(4)) > 0.5 if nm is None else _nm_mask(*nm)
    if quantized:
        fmt = get_format("int4")
        q = quantize_weight(lin.weight.detach(), fmt, 32)
        layer = SparseLinear.from_quantized(q.codes, q.scale, q.zero_point, mask, lin.bias.detach(), format=fmt,
                                            group_size=32, nm=nm, runtime=runtime)
    else:
        layer = SparseLinear.from_dense(lin.weight.detach(), mask, lin.bias.detach(), nm=nm, runtime=runtime)
    assert layer.runtime == runtime
    _check(layer, _x(), layer.dequantize_weight(torch.float64), layer.bias, F32_EAGER, F32_REF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (2:4 semi-structured kernels)")
def test_sparse_semi_structured_compiles():  # pragma: no cover - CPU-only CI
    mask = _nm_mask(2, 4)
    layer = SparseLinear.from_dense(_linear().weight.detach().half().cuda(), mask.cuda(), nm=(2, 4),
                                    runtime="semi_structured")
    x = _x(torch.float16).cuda()
    with torch.no_grad():
        assert _rel(_compiled(layer)(x), layer(x)) <= BF16_EAGER


# ------------------------------------------------------------------------------------------ LoRALinear
def _randomize(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=_gen(seed)) * 0.1)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=_gen(seed + 1)) * 0.1)
    return layer


def test_lora_eval_compiles_fullgraph():
    """Eval mode (dropout off) over a dense base: forward equals base + s * B A x."""
    layer = _randomize(LoRALinear(_linear(), 4, 8.0, dropout=0.1)).eval()
    _check(layer, _x(), layer.merged_weight(torch.float64), layer.base.bias, F32_EAGER, F32_REF)


LORA_TRAIN_CASES = [
    ("quant", False),  # QLoRA over the int4 CPU kernel: base backward is QuantLinear's autograd.Function
    pytest.param("dense", False, marks=pytest.mark.slow),
    pytest.param("dense", True, marks=pytest.mark.slow),  # DoRA
    pytest.param("quant_reference", True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("base_kind,dora", LORA_TRAIN_CASES)
def test_lora_train_forward_and_backward_compile(base_kind, dora):
    """Train mode, forward and backward compiled: same output, input and adapter gradients as eager."""
    lin = _linear()
    if base_kind == "dense":
        base, dtype, tol = lin, torch.float32, 1e-4
    else:
        kernel = "int4pack_cpu" if base_kind == "quant" else "reference"
        base = QuantLinear.from_linear(lin, "int4", 64, kernel=kernel)
        dtype, tol = (torch.bfloat16, BF16_EAGER) if kernel != "reference" else (torch.float32, 1e-4)
    layer = _randomize(LoRALinear(base, 4, 8.0, use_dora=dora)).train()
    results = []
    for fn in (_compiled(layer), layer):
        layer.zero_grad(set_to_none=True)
        x = _x(dtype, requires_grad=True)
        y = fn(x)
        y.float().pow(2).sum().backward()
        results.append((y, x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()))
    for got, want in zip(*results):
        assert _rel(got, want) <= tol


@pytest.mark.slow
def test_lora_train_dropout_compiles():
    """Dropout in train mode compiles too (inductor draws its own random numbers, so only the eval-mode
    function and finiteness are compared)."""
    layer = _randomize(LoRALinear(_linear(), 4, 8.0, dropout=0.5)).train()
    x = _x(requires_grad=True)
    y = _compiled(layer)(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(layer.lora_A.weight.grad).all()


# ------------------------------------------------------------------------------------------ CompensatedLinear
def test_compensated_linear_compiles_fullgraph():
    base = QuantLinear.from_linear(_linear(), "int3", 32, kernel="int4pack_cpu")
    layer = CompensatedLinear.from_quantized(base, torch.randn(4, K, generator=_gen(1)) * 0.05,
                                             torch.randn(N, 4, generator=_gen(2)) * 0.05)
    x = _x(torch.bfloat16)
    _check(layer, x, layer.dequantize_weight(torch.float64), layer.bias, BF16_EAGER, BF16_REF)


# ------------------------------------------------------------------------------------------ QATLinear
@pytest.mark.parametrize("fmt,group_size,act_bits", [
    ("int4", 32, None),
    pytest.param("int8", None, 8, marks=pytest.mark.slow),
])
def test_qat_linear_compiles_bit_exact(fmt, group_size, act_bits):
    """The fake quantization runs behind ``llmopt::qat_fake_quantize``: inductor would otherwise skip the
    bf16 rounding of the scales inside its fused kernel and move some codes by one step. Forward and
    straight-through gradients then match eager exactly, and ``to_quant_linear`` computes the same
    function."""
    layer = QATLinear(_linear(), fmt, group_size, act_bits=act_bits)
    results = []
    for fn in (_compiled(layer), layer):
        layer.zero_grad(set_to_none=True)
        x = _x(requires_grad=True)
        y = fn(x)
        y.pow(2).sum().backward()
        results.append((y, x.grad, layer.weight.grad.clone()))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    with torch.no_grad():
        x = _x()
        assert torch.equal(results[0][0].detach(), layer.to_quant_linear(kernel="reference")(x))


# ------------------------------------------------------------------------------------------ decoding
def test_compiled_decode_matches_eager_and_never_recompiles(expected_auto_kernel):
    """``evaluate.compiled_decode_throughput``: a StaticCache keeps every decode step's shapes equal, so the
    step compiles once (fullgraph) during the warm-up and the timed runs add no graph. A float32 model
    (int4 layers on the fast CPU kernel "auto" picks) gives the same greedy tokens compiled and eager."""
    pytest.importorskip("transformers")
    import llmopt
    from llmopt import evaluate
    from llmopt.models import speed_model

    model = speed_model("tiny")
    llmopt.compress_(model, llmopt.RTN(format="int4", group_size=64), exclude=["lm_head"])
    up = model.model.layers[0].mlp.up_proj
    assert up.kernel.name == expected_auto_kernel(up) != "reference"
    kwargs = dict(prompt_tokens=5, repeats=2)
    compiled = evaluate.compiled_decode_throughput(model, 6, **kwargs)
    eager = evaluate.compiled_decode_throughput(model, 6, compile=False, **kwargs)
    assert compiled["compiled"] and compiled["recompiles"] == 0 and compiled["compile_s"] > 0
    assert eager["compile_s"] is None and len(eager["tokens"]) == 6
    assert compiled["tokens"] == eager["tokens"]
    assert compiled["tokens_per_s"] > 0 and len(compiled["times_s"]) == 2


def test_decode_runner_batches_and_merges_a_mode_with_guard_options(monkeypatch):
    """``batch`` decodes repeated prompts (same greedy tokens as batch 1, throughput counts every
    sequence); a ``mode`` with ``skip_module_guards`` reaches torch.compile as that mode's options
    (torch.compile refuses a mode plus options)."""
    pytest.importorskip("transformers")
    from llmopt import evaluate
    from llmopt.models import speed_model

    model = speed_model("tiny")
    one = evaluate.DecodeRunner(model, prompt_tokens=4, new_tokens=5, compile=False)
    three = evaluate.DecodeRunner(model, prompt_tokens=4, new_tokens=5, compile=False, batch=3)
    assert three.prompt.shape == (3, 4) and torch.equal(three.prompt[2], one.prompt[0])
    run_one, run_three = one.run(), three.run()
    assert run_three["tokens"] == run_one["tokens"]
    assert run_three["tokens_per_s"] == pytest.approx(3 * 4 / run_three["seconds"])
    with pytest.raises(ValueError, match="batch"):
        evaluate.DecodeRunner(model, compile=False, batch=0)

    seen = {}

    def fake_compile(fn, **kwargs):
        seen.update(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    evaluate.DecodeRunner(model, mode="reduce-overhead", skip_module_guards=True)
    assert "mode" not in seen and seen["options"]["triton.cudagraphs"] is True
    assert "guard_filter_fn" in seen["options"]
