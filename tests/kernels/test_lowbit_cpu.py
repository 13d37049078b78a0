"""llmopt's C++ CPU kernel ``lowbit_cpu``: exactness of its layouts, accuracy against float64, the
AVX-512 and scalar paths against each other, torch.compile, and the fallback when it cannot be built.

The contract grid (every format x group size x dtype) is in test_kernel_contract.py; this file checks
what is specific to the C++ kernel. Speed lives in benchmarks/bench_kernels.py, never here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.core.formats import AffineFormat, get_format
from llmopt.core.primitives import dequantize_weight, quantize_weight, resolve_group_size
from llmopt.kernels import KernelSpec, get_kernel
from llmopt.kernels import cpp_ext
from llmopt.kernels.lowbit_cpu import INT3, _pack_runtime, _unpack_runtime, lowbit_available, set_isa
from llmopt.nn import QuantLinear

pytestmark = pytest.mark.skipif(not lowbit_available(), reason="the lowbit_cpu C++ extension cannot be built here")

KERNEL = get_kernel("lowbit_cpu") if "lowbit_cpu" in __import__("llmopt").kernels.list_kernels() else None
FAST = lowbit_available() and bool(torch.ops.llmopt_lowbit.has_fast_path())
ISAS = ["auto", "scalar"] if FAST else ["scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    previous = set_isa(request.param)
    yield request.param
    set_isa(previous)


def _layer_tensors(fmt, n, k, group_size, scale_dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen, dtype=torch.float64).float()
    q = quantize_weight(weight, fmt, group_size, scale_dtype)
    spec = KernelSpec(format=fmt, in_features=k, out_features=n, group_size=q.group_size, scale_dtype=scale_dtype)
    from llmopt.core.packing import pack_codes

    canonical = {"qdata": pack_codes(q.codes, fmt.bits), "scale": q.scale}
    if q.zero_point is not None:
        canonical["zero_point"] = q.zero_point
    return spec, canonical, q


def _reference(q, fmt, x):
    weight = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, torch.float64)
    return x.to(torch.float64) @ weight.T


FORMATS = ["int2", "int3", "int4", "int8", "nf4", "fp4_e2m1", "fp8_e4m3"]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_matches_float64_reference(isa, name, group_size, m):
    """int16 activations per block: the product is within 1e-3 of float64 (measured ~1e-4)."""
    fmt = get_format(name)
    spec, canonical, q = _layer_tensors(fmt, 72, 320, group_size)
    runtime = KERNEL.to_runtime(spec, canonical)
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(1))
    y = KERNEL.forward(spec, runtime, x, None)
    ref = _reference(q, fmt, x)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 1e-3, f"{name} g{group_size} M={m} [{isa}]: relative error {err:.2e}"


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    symmetric=st.booleans(),
    groups=st.integers(1, 5),
    group_mult=st.sampled_from([1, 2, 4, 8]),
    tail=st.integers(0, 31),
    n=st.integers(1, 37),
    m=st.integers(1, 7),
    bf16=st.booleans(),
    bias=st.booleans(),
)
def test_fast_and_scalar_paths_agree(bits, symmetric, groups, group_mult, tail, n, m, bf16, bias):
    """Property: any shape (K not a multiple of the group included), bits, group size: the AVX-512 path
    and the scalar path compute the same function (to float32 accumulation order), and both are within
    the kernel's accuracy of float64."""
    group_size = 32 * group_mult
    k = max(1, groups * group_size - tail)
    fmt = get_format(f"int{bits}", symmetric=symmetric)
    spec, canonical, q = _layer_tensors(fmt, n, k, group_size, seed=bits * 1000 + n)
    if spec.group_size % 32:
        return  # per-channel resolution of a tiny K: not a multiple of 32, refused (tested elsewhere)
    runtime = KERNEL.to_runtime(spec, canonical)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen)
    if bf16:
        x = x.to(torch.bfloat16)
    b = torch.randn(n, generator=gen) if bias else None
    outputs = {}
    for path in ISAS:
        previous = set_isa(path)
        try:
            outputs[path] = KERNEL.forward(spec, runtime, x, b).to(torch.float64)
        finally:
            set_isa(previous)
    ref = _reference(q, fmt, x.float()) + (b.double() if bias else 0)
    # Relative to sum |x| |w| (and |bias|): one output can cancel to near zero, its error cannot.
    weight = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, torch.float64)
    magnitude = x.double().abs() @ weight.abs().T + (b.double().abs() if bias else 0)
    scale = float(magnitude.norm()) + 1e-12
    for path, y in outputs.items():
        assert y.shape == (m, n)
        tol = 1e-2 if bf16 else 2e-4  # bf16 output rounding; int16 activations
        assert float((y - ref).norm()) / scale < tol, path
    if len(outputs) == 2:
        assert float((outputs["auto"] - outputs["scalar"]).norm()) / scale < (1e-2 if bf16 else 1e-5)


@settings(max_examples=30, deadline=None)
@given(chunks=st.integers(1, 6), n=st.integers(1, 9), seed=st.integers(0, 1000))
def test_int3_bit_planes_round_trip(chunks, n, seed):
    codes = torch.randint(0, 8, (n, 32 * chunks), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = _pack_runtime(INT3, codes)
    assert packed.shape == (n, 12 * chunks)  # 3 bits per weight in memory
    assert torch.equal(_unpack_runtime(INT3, packed, 32 * chunks), codes)


def test_int3_in_memory_is_three_bits():
    layer = QuantLinear.from_linear(torch.nn.Linear(4096, 256, bias=False), "int3", 64, kernel="lowbit_cpu")
    bits = layer.runtime_bytes() * 8 / (4096 * 256)
    assert bits == pytest.approx(3.5), bits  # 3 bits of codes + bf16 scale and zero per 64


@pytest.mark.parametrize("name", ["int4", "int8", "nf4", "fp8_e4m3"])
def test_runtime_is_the_canonical_tensor(name):
    """No copy at load when in_features is a multiple of the group: the layer holds the stored bytes."""
    fmt = get_format(name)
    spec, canonical, _ = _layer_tensors(fmt, 16, 256, 64)
    runtime = KERNEL.to_runtime(spec, canonical)
    assert runtime["qdata"].data_ptr() == canonical["qdata"].data_ptr()


def test_dequantize_rows_gathers_rows():
    layer = QuantLinear.from_linear(torch.nn.Linear(96, 40), "int3", 32, kernel="lowbit_cpu")
    rows = torch.tensor([5, 0, 39, 5])
    got = layer.kernel.dequantize_rows(layer.kernel_spec, layer._runtime(), rows, torch.float32)
    assert torch.equal(got, layer.dequantize_weight(torch.float32)[rows])


def test_backward_through_the_layer():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), "int4", 32, kernel="lowbit_cpu")
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    expected = layer.dequantize_weight(torch.float32).sum(0).expand(3, -1)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 48), "int4", 64, kernel="lowbit_cpu")
    x = torch.randn(2, 128)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_bad_inputs_name_the_kernel():
    spec, canonical, _ = _layer_tensors(get_format("int4"), 8, 64, 32)
    runtime = KERNEL.to_runtime(spec, canonical)
    with pytest.raises(RuntimeError, match="lowbit_cpu"):
        torch.ops.llmopt_lowbit.mm(torch.randn(1, 64), runtime["qdata"][:, :5].contiguous(), runtime["scale"],
                                   runtime.get("zero_point"), None, torch.zeros(16, dtype=torch.int16), 2, 32,
                                   8, 1.0, 8.0, 0)
    with pytest.raises(RuntimeError, match="lowbit_cpu"):
        torch.ops.llmopt_lowbit.mm(torch.randn(1, 64, dtype=torch.float64), runtime["qdata"], runtime["scale"],
                                   runtime.get("zero_point"), None, torch.zeros(16, dtype=torch.int16), 2, 32,
                                   8, 1.0, 8.0, 0)


def test_unsupported_specs_say_why():
    odd = KernelSpec(format=get_format("int4"), in_features=96, out_features=8, group_size=48)
    assert "multiple of 32" in KERNEL.unsupported_reason(odd, torch.device("cpu"))
    w8a8 = KernelSpec(format=get_format("int8", symmetric=True), in_features=64, out_features=8,
                      group_size=resolve_group_size(None, 64), act_bits=8)
    assert "act_bits" in KERNEL.unsupported_reason(w8a8, torch.device("cpu"))
    five = KernelSpec(format=AffineFormat(5), in_features=64, out_features=8, group_size=32)
    assert KERNEL.unsupported_reason(five, torch.device("cpu"))


@pytest.fixture
def fresh_extension_name():
    """A name no extension was loaded under; its cached outcome is forgotten afterwards."""
    name = "llmopt_test_ext"
    yield name
    cpp_ext._LOADED.pop(name, None)
    cpp_ext._ERRORS.pop(name, None)


def test_loader_reports_why_when_disabled(monkeypatch, fresh_extension_name):
    monkeypatch.setenv("LLMOPT_CPP_EXT", "0")
    assert cpp_ext.load_extension(fresh_extension_name, "lowbit_cpu.cpp") is False
    assert "disabled" in cpp_ext.extension_error(fresh_extension_name)


def test_loader_reports_a_missing_compiler(monkeypatch, fresh_extension_name):
    monkeypatch.setenv("CXX", "no-such-compiler-llmopt")
    assert cpp_ext.load_extension(fresh_extension_name, "lowbit_cpu.cpp") is False
    assert "no C++ compiler" in cpp_ext.extension_error(fresh_extension_name)


_FALLBACK_SCRIPT = r"""
import logging, torch
records = []
class Keep(logging.Handler):
    def emit(self, record): records.append(record.getMessage())
logging.getLogger("llmopt").addHandler(Keep())
from llmopt.nn import QuantLinear
lin = torch.nn.Linear(256, 64)
layer = QuantLinear.from_linear(lin, "int3", 64)
named = None
try:
    QuantLinear.from_linear(lin, "int3", 64, kernel="lowbit_cpu")
except ValueError as error:
    named = str(error)
x = torch.randn(2, 256)
ref = x.double() @ layer.dequantize_weight(torch.float64).T + lin.bias.double()
err = float((layer(x).double() - ref).norm() / ref.norm())
print(layer.kernel.name, err < 1e-2, sum("C++" in r for r in records), named is not None and "disabled" in named)
"""


def test_clean_fallback_without_the_extension():
    """A fresh process with the C++ kernels disabled: "auto" takes PyTorch's kernels, the reason is
    logged once, a layer asking for lowbit_cpu by name gets a clear error, and results stay right."""
    env = dict(os.environ, LLMOPT_CPP_EXT="0", LLMOPT_KERNEL_PROBE="0")
    out = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kernel, accurate, logged, named = out.stdout.split()
    assert kernel != "lowbit_cpu"
    assert accurate == "True"
    assert logged == "1"
    assert named == "True"


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_path_matches_float64(name, group_size, dtype):
    """From 16 tokens on, the weight is decoded to bf16 in blocks of rows and multiplied by PyTorch's
    bf16 GEMM: bf16 precision (measured ~3e-3), ragged K and bias included."""
    fmt = get_format(name)
    spec, canonical, q = _layer_tensors(fmt, 150, 200 if group_size is not None else 224, group_size)
    runtime = KERNEL.to_runtime(spec, canonical)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 19, spec.in_features, generator=gen).to(dtype)
    bias = torch.randn(150, generator=gen)
    y = KERNEL.forward(spec, runtime, x, bias)
    assert y.dtype == dtype and y.shape == (2, 19, 150)
    ref = _reference(q, fmt, x.float()) + bias.double()
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 1e-2, f"{name} g{group_size} {dtype}: relative error {err:.2e}"


def test_loader_reports_the_compiler_error(monkeypatch, tmp_path, fresh_extension_name):
    """A source that does not compile: the reason names the compiler's error line, nothing raises."""
    (tmp_path / "broken.cpp").write_text("int main() { return undefined_symbol_llmopt; }\n")
    monkeypatch.setattr(cpp_ext, "_source_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    assert cpp_ext.load_extension(fresh_extension_name, "broken.cpp") is False
    reason = cpp_ext.extension_error(fresh_extension_name)
    assert "error:" in reason and "undefined_symbol_llmopt" in reason, reason
