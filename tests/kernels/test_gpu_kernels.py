"""The CUDA kernels: ``lowbit_triton`` (Triton) and ``int4_tinygemm_cuda`` (``aten._weight_int4pack_mm``).

Without a GPU, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` and the Triton kernels run on CPU
tensors through Triton's interpreter: the same kernel code the GPU compiles, checked against a
float64 product with the reference dequantization. ``aten._weight_int4pack_mm`` has no CPU
implementation: its layout inverse is checked against a torch model of the op here, and against
the op itself on a GPU (tests marked ``cuda``, skipped without one).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.core.formats import AffineFormat, get_format
from llmopt.core.packing import pack_codes
from llmopt.core.primitives import dequantize_weight, quantize_weight
from llmopt.kernels import KernelSpec, get_kernel, int4_cuda, triton_lowbit
from llmopt.nn import QuantLinear
from llmopt.testing import check_kernel

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_lowbit.triton_available() or (not HAS_CUDA and not triton_lowbit.triton_interpreter()),
    reason="needs triton, and a CUDA device or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Float64 relative (Frobenius) error allowed per activation dtype. Both kernels accumulate in float32;
# the output is rounded to the activation dtype (bf16: up to 2**-9 per element), and the GEMM also
# rounds the weight to bf16/fp16 (measured ~3e-3 for bf16).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 4e-3}


def _quantized(fmt, n, k, group_size, scale_dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    q = quantize_weight(w, fmt, group_size, scale_dtype)
    canonical = {"qdata": pack_codes(q.codes, fmt.bits), "scale": q.scale}
    if q.zero_point is not None:
        canonical["zero_point"] = q.zero_point
    spec = KernelSpec(fmt, k, n, q.group_size, scale_dtype, has_bias=True)
    reference = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, torch.float64)
    return spec, canonical, reference


def _rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _to(tensors, device):
    return {name: t.to(device) for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------- Triton

@needs_triton
@pytest.mark.parametrize("group_sizes", [(32, None), (64,)])
def test_lowbit_triton_kernel_contract(group_sizes):
    """Every format round-trips exactly and multiplies correctly (small grid: the interpreter is slow)."""
    result = check_kernel("lowbit_triton", device=DEVICE, group_sizes=group_sizes, shapes=((48, 72),),
                          scale_dtypes=(torch.bfloat16,), act_bits=(None,), biases=(True,),
                          act_dtypes=(torch.float32, torch.bfloat16), leads=((2, 3),))
    assert not result.refused and len(result.served) >= 19  # every format variant


@needs_triton
def test_lowbit_triton_contract_fp16_scales_and_w8a8():
    result = check_kernel("lowbit_triton", ["int4", "nf4"], device=DEVICE, group_sizes=(32,),
                          shapes=((40, 64),), scale_dtypes=(torch.float16,), act_bits=(None, 8),
                          biases=(False,), act_dtypes=(torch.float16,), leads=((1,),))
    assert not result.refused


@needs_triton
@settings(max_examples=10, deadline=None)
@given(bits=st.integers(1, 8), symmetric=st.booleans(), n=st.integers(1, 24), k=st.integers(1, 100),
       group=st.integers(1, 100), m=st.sampled_from([1, 3, 17, 20]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       split=st.sampled_from([None, 2, 3]), seed=st.integers(0, 1000))
def test_lowbit_triton_matches_float64_any_shape(bits, symmetric, n, k, group, m, dtype, split, seed):
    """Any bit width 1-8, any group size (not only multiples of 16), both GEMV (with and without
    split-K) and GEMM paths."""
    if symmetric and bits < 2:
        symmetric = False
    fmt = AffineFormat(bits, symmetric=symmetric)
    spec, canonical, reference = _quantized(fmt, n, k, min(group, k), seed=seed)
    kernel = get_kernel("lowbit_triton")
    runtime = kernel.to_runtime(spec, _to(canonical, DEVICE))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    previous = triton_lowbit.set_split_k(split)
    try:
        y = kernel.forward(spec, runtime, x.to(DEVICE), bias.to(DEVICE)).cpu()
    finally:
        triton_lowbit.set_split_k(previous)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = x.double() @ reference.T + bias.double()
    assert _rel_err(y, ref) < RTOL[dtype]


@needs_triton
@pytest.mark.parametrize("fmt_name", ["nf4", "fp4_e2m1", "fp8_e4m3", "int3", "int2", "int8"])
@pytest.mark.parametrize("m", [1, 24])
def test_lowbit_triton_formats_gemv_and_gemm(fmt_name, m):
    spec, canonical, reference = _quantized(get_format(fmt_name), 48, 160, 64)
    kernel = get_kernel("lowbit_triton")
    runtime = kernel.to_runtime(spec, _to(canonical, DEVICE))
    x = torch.randn(m, 160)
    y = kernel.forward(spec, runtime, x.to(DEVICE), None).cpu()
    assert _rel_err(y, x.double() @ reference.T) < 1e-5


@needs_triton
@pytest.mark.parametrize("fmt,group,k", [(AffineFormat(4), 64, 256), (AffineFormat(2, symmetric=True), 128, 256),
                                         (AffineFormat(8), 32, 96), (AffineFormat(1), 256, 512),
                                         (get_format("nf4"), 96, 192), (get_format("fp8_e4m3"), 40, 40),
                                         (AffineFormat(4), 72, 72)])
@pytest.mark.parametrize("split", [None, 3])
def test_word_gemv_matches_byte_gemv(monkeypatch, fmt, group, k, split):
    """The decode GEMV that reads 32-bit words (scale applied per group) gives what the per-code byte
    GEMV gives, including split-K and per-channel rows."""
    assert triton_lowbit.words_config(fmt.bits, k, group, -(-k // group)) is not None
    spec, canonical, reference = _quantized(fmt, 40, k, group)
    kernel = get_kernel("lowbit_triton")
    runtime = kernel.to_runtime(spec, _to(canonical, DEVICE))
    x = torch.randn(2, k).to(DEVICE)
    previous = triton_lowbit.set_split_k(split)
    try:
        words = kernel.forward(spec, runtime, x, None).cpu()
        monkeypatch.setattr(triton_lowbit, "words_config", lambda *args: None)
        per_code = kernel.forward(spec, runtime, x, None).cpu()
    finally:
        triton_lowbit.set_split_k(previous)
    ref = x.cpu().double() @ reference.T
    assert _rel_err(words, ref) < 1e-5 and _rel_err(per_code, ref) < 1e-5


def test_word_gemv_applies_only_where_rows_are_whole_words():
    assert triton_lowbit.words_config(3, 256, 64, 4) is None  # int3: codes straddle words
    assert triton_lowbit.words_config(4, 100, 50, 2) is None  # 400 bits per row: not whole words
    assert triton_lowbit.words_config(4, 192, 96, 2) is not None  # groups of 96: virtual groups of 32
    assert triton_lowbit.words_config(4, 200, 40, 5) is None  # 40 is no multiple of 8 codes * 2**j


@needs_triton
def test_lowbit_triton_keeps_the_stored_bytes():
    """The runtime layout is the canonical one: no copy, no extra width (int3 stays 3 bits)."""
    spec, canonical, _ = _quantized(get_format("int3"), 32, 128, 64)
    canonical = _to(canonical, DEVICE)
    runtime = get_kernel("lowbit_triton").to_runtime(spec, canonical)
    assert runtime["qdata"].data_ptr() == canonical["qdata"].data_ptr()
    assert runtime["qdata"].shape == (32, 128 * 3 // 8)


@needs_triton
def test_lowbit_triton_in_a_layer_with_gradient():
    """QuantLinear on lowbit_triton: same output as the reference kernel, and the input gradient of
    ``grad @ W`` (QLoRA's backward)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    ref_layer = QuantLinear.from_linear(linear, "nf4", 32, kernel="reference")
    layer = QuantLinear.from_linear(linear, "nf4", 32, kernel="lowbit_triton")
    ref_layer, layer = ref_layer.to(DEVICE), layer.to(DEVICE)
    assert layer.kernel.name == "lowbit_triton" and "lowbit_triton" in repr(layer)
    x = torch.randn(3, 96, device=DEVICE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref_layer(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


@needs_triton
def test_lowbit_triton_under_torch_compile():
    """The kernel is an opaque custom op with a fake implementation: fullgraph compile traces it."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), "int4", 32, kernel="lowbit_triton").to(DEVICE)
    x = torch.randn(2, 64, device=DEVICE)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x), eager)


@needs_triton
def test_lowbit_triton_empty_batch():
    spec, canonical, _ = _quantized(get_format("int4"), 16, 64, 32)
    kernel = get_kernel("lowbit_triton")
    y = kernel.forward(spec, kernel.to_runtime(spec, _to(canonical, DEVICE)), torch.empty(0, 64, device=DEVICE),
                       None)
    assert y.shape == (0, 16)


def test_auto_never_picks_a_gpu_kernel_on_cpu(expected_auto_kernel):
    """With the interpreter on, lowbit_triton could serve CPU tensors; "auto" must still pick CPU kernels."""
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), "nf4", 32)
    assert layer.kernel.name not in ("lowbit_triton", "int4_tinygemm_cuda")
    assert layer.kernel.name == expected_auto_kernel(layer)


def test_lowbit_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = KernelSpec(get_format("int4"), 64, 32, 32)
    reason = get_kernel("lowbit_triton").unsupported_reason(spec, torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    with pytest.raises(ValueError, match="lowbit_triton"):
        QuantLinear.from_linear(torch.nn.Linear(64, 32), "int4", 32, kernel="lowbit_triton")


def test_set_split_k_validates():
    with pytest.raises(ValueError):
        triton_lowbit.set_split_k(0)


# ------------------------------------------------------------------------------ tinygemm layout

@pytest.mark.parametrize("tiles", [2, 4, 8])
@pytest.mark.parametrize("n,k", [(8, 256), (24, 128), (1040, 256)])
def test_tinygemm_layout_inverse(tiles, n, k):
    """unpack_tinygemm inverts the layout model exactly (1040 rows: more than one 1024-row slab)."""
    if k % (tiles * 16):
        pytest.skip("k not a multiple of the tile span")
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = int4_cuda.pack_tinygemm_reference(codes, tiles)
    assert packed.shape == (n // 8, k // (tiles * 16), 32, tiles // 2) and packed.dtype == torch.int32
    assert torch.equal(int4_cuda.unpack_tinygemm(packed, n, k), codes)


def test_tinygemm_positions_are_a_permutation():
    rows, cols = int4_cuda.tinygemm_nibble_positions(3, 128, 4)
    linear = (rows * 128 + cols).reshape(-1)
    assert torch.equal(torch.sort(linear).values, torch.arange(3 * 8 * 128))


def _emulated_ops(monkeypatch):
    """Stand-ins for the CUDA-only aten ops, from the layout model: (q - 8) * scale + zero per group."""
    def convert(data, tiles):
        codes = torch.stack([data >> 4, data & 0xF], dim=-1).reshape(data.shape[0], -1)
        return int4_cuda.pack_tinygemm_reference(codes, tiles)

    def mm(x, packed, group_size, scale_and_zero):
        n = scale_and_zero.shape[1]
        codes = int4_cuda.unpack_tinygemm(packed, n, x.shape[1]).float()
        sz = scale_and_zero.float().transpose(0, 1)  # [n, groups, 2]
        w = (codes.view(n, -1, group_size) - 8) * sz[..., :1] + sz[..., 1:]
        return (x.float() @ w.view(n, -1).T).to(torch.bfloat16)

    monkeypatch.setattr(int4_cuda, "_convert", convert)
    monkeypatch.setattr(int4_cuda, "_mm", mm)


@pytest.mark.parametrize("fmt", [AffineFormat(4), AffineFormat(4, symmetric=True),
                                 AffineFormat(4, zero_point="int"), AffineFormat(4, zero_point="min")])
@pytest.mark.parametrize("shape,group", [((48, 128), 64), ((16, 200), 96), ((32, 384), 384)])
def test_tinygemm_kernel_round_trip_on_the_layout_model(monkeypatch, fmt, shape, group):
    """to_runtime -> to_canonical is bit-exact, codes/dequantize match, forward is right: the kernel's
    Python side run on CPU with the layout model standing in for the CUDA ops."""
    _emulated_ops(monkeypatch)
    n, k = shape
    spec, canonical, reference = _quantized(fmt, n, k, group)
    kernel = get_kernel("int4_tinygemm_cuda")
    runtime = kernel.to_runtime(spec, canonical)
    back = kernel.to_canonical(spec, runtime)
    assert set(back) == set(canonical)
    for name in canonical:
        assert back[name].dtype == canonical[name].dtype
        assert torch.equal(back[name], canonical[name]), name
    torch.testing.assert_close(kernel.dequantize(spec, runtime, torch.float64), reference, rtol=0, atol=0)
    x = torch.randn(3, k)
    y = kernel.forward(spec, runtime, x, None)
    assert y.dtype == torch.float32 and _rel_err(y, x.double() @ reference.T) < 1e-2


def test_tinygemm_refuses_what_it_cannot_serve():
    kernel = get_kernel("int4_tinygemm_cuda")
    assert "CUDA" in kernel.unsupported_reason(KernelSpec(get_format("int4"), 64, 32, 32), torch.device("cpu"))
    cuda = torch.device("cuda")
    for spec, words in [(KernelSpec(get_format("int3"), 64, 32, 32), "4-bit"),
                        (KernelSpec(get_format("int4"), 64, 36, 32), "multiple of 8"),
                        (KernelSpec(get_format("int4"), 64, 32, 32, torch.float16), "bfloat16"),
                        (KernelSpec(get_format("int4"), 96, 32, 48), "multiple of 32")]:
        assert words in kernel.unsupported_reason(spec, cuda)


# ------------------------------------------------------------------------------------ CUDA only

@needs_cuda
def test_tinygemm_layout_model_matches_the_real_op():
    assert int4_cuda._layout_ok(torch.device("cuda")) is None
    for tiles in (2, 4, 8):
        codes = torch.randint(0, 16, (64, 512), dtype=torch.uint8)
        real = torch.ops.aten._convert_weight_to_int4pack(int4_cuda._bytes_for_op(codes).cuda(), tiles)
        assert torch.equal(real.cpu(), int4_cuda.pack_tinygemm_reference(codes, tiles))


@needs_cuda
def test_tinygemm_kernel_contract_on_cuda():
    result = check_kernel("int4_tinygemm_cuda", ["int4"], device="cuda", scale_dtypes=(torch.bfloat16,))
    assert result.served


@needs_cuda
@pytest.mark.parametrize("fmt_name,expected", [("int4", "int4_tinygemm_cuda"), ("nf4", "lowbit_triton"),
                                               ("int3", "lowbit_triton"), ("fp8_e4m3", "lowbit_triton")])
def test_auto_on_cuda(fmt_name, expected):
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 128), fmt_name, 64).cuda()
    if expected == "lowbit_triton" and not triton_lowbit.triton_available():
        expected = "reference"
    assert layer.kernel.name == expected
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ layer.dequantize_weight(torch.float64).T + layer.bias.double()
    assert _rel_err(layer(x).cpu(), ref.cpu()) < 1e-2


def test_interpreter_flag_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_lowbit.triton_interpreter()
    monkeypatch.setenv("TRITON_INTERPRET", "")
    assert not triton_lowbit.triton_interpreter()
    assert os.environ.get("TRITON_INTERPRET") == ""
