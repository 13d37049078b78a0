"""``lowbit_triton``: Triton GPU kernels for every weight format, reading the packed weight directly.

Serves affine formats of 1-8 bits (any zero-point mode, symmetric or not), codebook formats (nf4,
fp4_e2m1, any registered codebook) and fp8_e4m3, with **any group size** (per-channel included),
scales in float32/bfloat16/float16 and float16/bfloat16/float32 activations (others are cast to
float32; float32 activations are multiplied in float32, ``input_precision="ieee"``).

The runtime layout *is* the canonical one (``qdata`` packed row by row, ``scale``, ``zero_point``;
codebooks add their level table): loading costs no conversion, memory holds the stored width (3.5
bits/weight for int3 g64), and :meth:`to_canonical` is the identity. Two kernels
(:mod:`._triton_lowbit_impl`): a GEMV for ``M <= 16`` tokens (decode), split over K when the layer
has too few output columns to fill the GPU, and a tiled ``tl.dot`` GEMM for prefill and training.
The input gradient (QLoRA) is ``grad @ dequantize(W)``: one dequantization and a cuBLAS matmul, the
fast choice at training batch sizes.

``triton`` is optional (``pip install llmopt[gpu]``). ``kernel="auto"`` takes this kernel only on
CUDA devices. With ``TRITON_INTERPRET=1`` in the environment (set before the first use), Triton's
interpreter runs the same kernels on CPU tensors: slowly, but exactly the code the GPU compiles. The
test suite checks every format that way against the reference kernel.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.formats import AffineFormat, CodebookFormat, Float8E4M3Format
from .base import Kernel, KernelSpec, Tensors
from .registry import get_kernel, register_kernel

__all__ = ["LowBitTritonKernel", "triton_available", "triton_interpreter", "triton_error",
           "gemv_config", "words_config", "gemm_config", "set_split_k"]

# Kinds, as _triton_lowbit_impl numbers them.
_AFFINE, _LUT, _FP8 = 0, 1, 2
# Up to this many tokens, each token runs the GEMV (the weight tile is re-read from L2, not HBM).
GEMV_MAX_TOKENS = 16
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Split-K override (tests reach the split path on small shapes with it); None = the heuristic.
_SPLIT_K: list = [None]


def triton_interpreter() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def _load_impl() -> Tuple[Optional[object], Optional[str]]:
    try:
        # Loaded at first use, not at import: triton is optional, and importing it costs ~1 s. The module
        # imports only triton (no llmopt module), so loading it late cannot break the layering.
        impl = importlib.import_module(f"{__package__}._triton_lowbit_impl")
    except Exception as error:  # ImportError, or a triton that fails on this platform
        return None, f"triton is unavailable ({type(error).__name__}: {error}); pip install 'llmopt[gpu]'"
    return impl, None


def triton_available() -> bool:
    """True if ``triton`` imports and the kernels compile (their module loads)."""
    return _load_impl()[0] is not None


def triton_error() -> Optional[str]:
    """Why Triton kernels are unavailable, or ``None``."""
    return _load_impl()[1]


def set_split_k(split: Optional[int]) -> Optional[int]:
    """Force the GEMV's split over K (``None``: choose by shape and GPU). Returns the previous value."""
    if split is not None and (not isinstance(split, int) or split < 1):
        raise ValueError(f"set_split_k: expected None or a positive integer, got {split!r}")
    previous = _SPLIT_K[0]
    _SPLIT_K[0] = split
    return previous


def _kind_of(fmt) -> Optional[int]:
    if isinstance(fmt, AffineFormat):
        return _AFFINE
    if isinstance(fmt, CodebookFormat):
        return _LUT
    if isinstance(fmt, Float8E4M3Format):
        return _FP8
    return None


def _block_k(group_size: int, n_groups: int, widest: int) -> Tuple[int, bool]:
    """K tile and whether every tile lies inside one group (one scale per row per tile); a row that is
    one group (per-channel) is aligned whatever the tile."""
    for block in (256, 128, 64, 32, 16):
        if block <= widest and group_size % block == 0:
            return block, True
    return min(64, widest), n_groups == 1


def gemv_config(group_size: int, n_groups: int) -> Tuple[int, int, bool]:
    """``(BLOCK_N, BLOCK_K, group_aligned)`` of the byte-reading decode kernel."""
    block_k, aligned = _block_k(group_size, n_groups, 128)
    return max(16, min(64, 2048 // block_k)), block_k, aligned


def gemm_config(group_size: int, n_groups: int, m: int) -> Tuple[int, int, int, bool]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, group_aligned)`` of the prefill/training kernel."""
    block_k, aligned = _block_k(group_size, n_groups, 64)
    return (32 if m <= 32 else 64), 64, max(block_k, 16), aligned


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(device: torch.device, programs: int, k: int, block_k: int) -> int:
    if _SPLIT_K[0] is not None:
        return _SPLIT_K[0]
    if device.type != "cuda":
        return 1
    # Fewer programs than ~2 per SM leave the GPU idle at decode: split K until they fill it.
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= target:
        return 1
    return max(1, min(8, -(-target // programs), k // (4 * block_k)))


def words_config(bits: int, k: int, group_size: int, n_groups: int) -> Optional[Tuple[int, int, int]]:
    """``(BLOCK_N, GROUPS, WPG)`` of the word-reading decode GEMV, or ``None`` where it does not apply.

    It needs whole codes per 32-bit word (1/2/4/8 bits), rows of whole words (``k * bits % 32 == 0``)
    and virtual groups of a power-of-two number of codes inside one real group (or one group per row).
    """
    if bits not in (1, 2, 4, 8) or (k * bits) % 32:
        return None
    per_word = 32 // bits
    for vgroup in (256, 128, 64, 32):
        if vgroup < per_word:
            break
        if n_groups == 1 or group_size % vgroup == 0:
            if n_groups == 1:
                # One scale per row: shrink the virtual group to the row (small layers).
                while vgroup > per_word and vgroup // 2 >= k:
                    vgroup //= 2
            return (16 if bits == 8 else 32), max(1, 512 // vgroup), vgroup * bits // 32
    return None


def _gemv_out(x: Tensor, n: int, split: int) -> Tensor:
    if split == 1:
        return torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    return torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)  # split-K partial sums


def _gemv_finish(y: Tensor, x: Tensor, bias: Optional[Tensor], split: int) -> Tensor:
    if split > 1:
        if bias is not None:
            y += bias.to(torch.float32)
        y = y.to(x.dtype)
    return y


def _gemv_words(impl, x, qdata, scale, z, table, b, has_zero, bias, bits, kind, group_size, n, mid,
                block_n, groups, wpg) -> Tensor:
    m, k = x.shape
    vgroup = wpg * 32 // bits
    n_vgroups = -(-k // vgroup)
    programs = -(-n // block_n) * m
    split = _split_k(x.device, programs, k, groups * vgroup)
    per_split = -(-n_vgroups // (split * groups)) * groups
    split = -(-n_vgroups // per_split)
    y = _gemv_out(x, n, split)
    impl.lowbit_gemv_words[(-(-n // block_n), m, split)](
        x, qdata.view(torch.int32), scale, z, table, b, y, n, k, qdata.shape[1] // 4, scale.shape[1],
        group_size, mid, x.stride(0), y.stride(0), n_vgroups, per_split,
        BITS=bits, KIND=kind, HAS_ZERO=has_zero, HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_N=block_n, GROUPS=groups, WPG=wpg, CPW=32 // bits, VG=vgroup, CODE_MASK=(1 << bits) - 1,
        num_warps=4)
    return _gemv_finish(y, x, bias, split)


def _launch(x: Tensor, qdata: Tensor, scale: Tensor, zero: Optional[Tensor], lut: Optional[Tensor],
            bias: Optional[Tensor], bits: int, kind: int, group_size: int, n: int, mid: int) -> Tensor:
    """``x [M, K] @ W.T (+ bias)`` in ``x``'s dtype; ``x`` contiguous, float16/bfloat16/float32."""
    impl = _load_impl()[0]
    m, k = x.shape
    if m == 0:
        return x.new_empty(0, n)
    n_groups = scale.shape[1]
    row_bytes = qdata.shape[1]
    # Unused pointers still need a tensor on the right device (never read: constexpr flags skip them).
    z = zero if zero is not None else scale
    table = lut if lut is not None else scale
    b = bias if bias is not None else scale
    interpret = triton_interpreter()
    if m <= GEMV_MAX_TOKENS:
        words = words_config(bits, k, group_size, n_groups)
        if words is not None and qdata.stride(0) == row_bytes and qdata.data_ptr() % 4 == 0:
            return _gemv_words(impl, x, qdata, scale, z, table, b, zero is not None, bias, bits, kind,
                               group_size, n, mid, *words)
        block_n, block_k, aligned = gemv_config(group_size, n_groups)
        programs = -(-n // block_n) * m
        split = _split_k(x.device, programs, k, block_k)
        k_per_split = -(-k // (split * block_k)) * block_k
        split = -(-k // k_per_split)
        y = _gemv_out(x, n, split)
        impl.lowbit_gemv[(-(-n // block_n), m, split)](
            x, qdata, scale, z, table, b, y, m, n, k, row_bytes, n_groups, group_size, mid,
            x.stride(0), y.stride(0), k_per_split,
            BITS=bits, KIND=kind, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
            GROUP_ALIGNED=aligned, SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
        return _gemv_finish(y, x, bias, split)
    block_m, block_n, block_k, aligned = gemm_config(group_size, n_groups, m)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    impl.lowbit_gemm[(-(-m // block_m), -(-n // block_n))](
        x, qdata, scale, z, table, b, y, m, n, k, row_bytes, n_groups, group_size, mid,
        x.stride(0), y.stride(0),
        BITS=bits, KIND=kind, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, GROUP_ALIGNED=aligned,
        DOT_F32=interpret, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3)
    return y


def _define_op() -> None:
    """``torch.ops.llmopt_triton.lowbit_mm``: an opaque op, so ``torch.compile`` traces it whole."""

    @torch.library.custom_op("llmopt_triton::lowbit_mm", mutates_args=())
    def lowbit_mm(x: Tensor, qdata: Tensor, scale: Tensor, zero: Optional[Tensor], lut: Optional[Tensor],
                  bias: Optional[Tensor], bits: int, kind: int, group_size: int, n: int, mid: int) -> Tensor:
        return _launch(x, qdata, scale, zero, lut, bias, bits, kind, group_size, n, mid)

    @lowbit_mm.register_fake
    def _(x, qdata, scale, zero, lut, bias, bits, kind, group_size, n, mid):
        return x.new_empty(x.shape[0], n)


_define_op()


@register_kernel(priority=33)
class LowBitTritonKernel(Kernel):
    """Triton kernels for int1-8 affine, codebooks and fp8, any group size (see the module docstring)."""

    name = "lowbit_triton"
    auto_device_types = ("cuda",)

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreter()):
            return "needs a CUDA device (or TRITON_INTERPRET=1 to run on CPU tensors, for tests)"
        kind = _kind_of(spec.format)
        if kind is None:
            return f"format {spec.format.name!r} is not affine, a codebook or fp8_e4m3"
        if spec.scale_dtype not in _FLOAT_DTYPES:
            return f"scale dtype {spec.scale_dtype} is not float32, bfloat16 or float16"
        if spec.has_zero_point and spec.zero_point_dtype not in _FLOAT_DTYPES:
            return f"zero_point dtype {spec.zero_point_dtype} is not float32, bfloat16 or float16"
        return triton_error()

    def to_runtime(self, spec: KernelSpec, canonical: Tensors) -> Tensors:
        runtime = {name: tensor.contiguous() for name, tensor in canonical.items()}
        if isinstance(spec.format, CodebookFormat):
            runtime["lut"] = spec.format.dequantize(
                torch.arange(1 << spec.format.bits, device=canonical["qdata"].device),
                torch.ones((), device=canonical["qdata"].device), None).to(torch.float32).contiguous()
        return runtime

    def to_canonical(self, spec: KernelSpec, runtime: Tensors) -> Tensors:
        return {name: runtime[name] for name in ("qdata", "scale", "zero_point") if name in runtime}

    def dequantize_rows(self, spec: KernelSpec, runtime: Tensors, rows: Tensor, dtype: torch.dtype) -> Tensor:
        # The canonical layout keeps rows apart: gather them, then dequantize only those.
        return get_kernel("reference").dequantize_rows(spec, self.to_canonical(spec, runtime), rows, dtype)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, spec.in_features)
        if x2.dtype not in _FLOAT_DTYPES:
            x2 = x2.to(torch.float32)
        fmt = spec.format
        y = torch.ops.llmopt_triton.lowbit_mm(
            x2.contiguous(), runtime["qdata"], runtime["scale"], runtime.get("zero_point"),
            runtime.get("lut"), bias, fmt.bits, _kind_of(fmt), spec.group_size, spec.out_features,
            fmt.mid if isinstance(fmt, AffineFormat) else 0)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*lead, spec.out_features)

