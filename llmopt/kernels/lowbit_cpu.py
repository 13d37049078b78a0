"""``lowbit_cpu``: llmopt's fused C++ CPU kernel for every weight format, at its real width.

One C++ kernel (``csrc/lowbit_cpu.cpp``, built at first use, see :mod:`.cpp_ext`) serves

* affine int2, int3, int4 and int8 (any zero-point mode, symmetric or not, full-range or not);
* 4-bit codebooks (nf4, fp4_e2m1, any registered 16-level codebook);
* fp8_e4m3;

with group sizes that are multiples of 32 (per-channel layers too, when ``in_features`` rounds up to
one), scales in bfloat16, float16 or float32, and float32 or bfloat16 activations (others are cast to
float32). The weight is never dequantized in memory: each row is decoded in registers, 32 codes at a
time, and multiplied there.

Integer formats quantize the activations per token to int16 (range +-16383) in blocks of up to 256
columns inside each group (one float scale per block) and use AVX-512 VNNI ``vpdpwssd`` word dot
products with exact int32 accumulation: the output is within ~1e-4 (relative) of a float64 product with
the stored weight (see ``tests/kernels/test_lowbit_cpu.py``). fp8 keeps float32 activations. The
runtime layout is the canonical one for int2/int4/int8/codebooks/fp8 whenever ``in_features`` is a
multiple of the group size (no copy at load), and two bit planes for int3 (3 bits per weight in memory
either way); :meth:`to_canonical` is its exact inverse.

Without AVX-512 VNNI the same C++ file runs a scalar path (correct, slow): ``kernel="auto"`` only
considers this kernel on CPUs with ``avx512_vnni`` (and, like every kernel, only after the speed probe
finds it not slower than dense).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.formats import AffineFormat, CodebookFormat, Float8E4M3Format
from ..core.packing import pack_codes, unpack_codes
from ..core.primitives import dequantize_weight
from .base import Kernel, KernelSpec, Tensors, is_cpu
from .cpp_ext import extension_error, load_extension
from .registry import register_kernel

__all__ = ["LowBitCPUKernel", "lowbit_available", "format_kind", "set_isa", "CHUNK"]

_EXT = "llmopt_lowbit_cpu"
_SOURCE = "lowbit_cpu.cpp"
CHUNK = 32
# Kinds, as the C++ file numbers them.
INT2, INT3, INT4, INT8, LUT4, FP8 = range(6)
_AFFINE_KINDS = {2: INT2, 3: INT3, 4: INT4, 8: INT8}
# Largest |level * L| of a codebook's int16 table: the C++ overflow bound (see csrc/lowbit_cpu.cpp).
_LUT_MAX = 4095
# ISA request for the C++ op: 0 = fastest available, 1 = force the scalar path.
_ISA_ENV = "LLMOPT_LOWBIT_ISA"


def _isa_from_env() -> int:
    return 1 if os.environ.get(_ISA_ENV, "").strip().lower() == "scalar" else 0


# Read once (an environment lookup per call costs as much as a small layer's matmul); tests switch
# paths with set_isa().
_ISA = [_isa_from_env()]


def set_isa(name: str) -> str:
    """Choose the C++ path: ``"auto"`` (AVX-512 VNNI when the CPU has it) or ``"scalar"`` (portable
    loops; for tests). Returns the previous choice."""
    if name not in ("auto", "scalar"):
        raise ValueError(f"set_isa: expected 'auto' or 'scalar', got {name!r}")
    previous = "scalar" if _ISA[0] == 1 else "auto"
    _ISA[0] = 1 if name == "scalar" else 0
    return previous


@dataclasses.dataclass(frozen=True)
class _FormatPlan:
    """How the C++ kernel reads one format: its kind, level table, and the unit/offset of its codes."""

    kind: int
    lut: Tensor  # int16 [16]: the codebook's levels * L (zeros for other formats)
    unit: float  # value of one code step (codebooks: 1/L)
    offset: float  # code value that stands for 0 (affine: mid; others: 0)


def _codebook_plan(fmt: CodebookFormat) -> Optional[_FormatPlan]:
    """Levels as int16: ``level ~ t / L``, exact when the levels are integers on a scale L <= 127 (FP4:
    L = 12), else L = 4095 / max|level| (NF4: within 1.2e-4 of the group's absmax)."""
    levels = torch.tensor(fmt.levels, dtype=torch.float64)
    top = float(levels.abs().max())
    if levels.numel() != 16 or top == 0:
        return None
    for scale in range(1, 128):
        scaled = levels * scale
        if float(scaled.abs().max()) <= _LUT_MAX and float((scaled - scaled.round()).abs().max()) < 1e-6:
            return _FormatPlan(LUT4, scaled.round().to(torch.int16), 1.0 / scale, 0.0)
    scale = _LUT_MAX / top
    return _FormatPlan(LUT4, (levels * scale).round().to(torch.int16), 1.0 / scale, 0.0)


def format_kind(fmt) -> Optional[_FormatPlan]:
    """The C++ kernel's plan for a weight format, or ``None`` if it cannot serve it."""
    # Cached on the format object: hashing a format builds its dict, too slow for every call.
    cached = getattr(fmt, "_lowbit_plan", _MISSING)
    if cached is not _MISSING:
        return cached
    plan = None
    zeros = torch.zeros(16, dtype=torch.int16)
    if isinstance(fmt, AffineFormat) and fmt.bits in _AFFINE_KINDS:
        plan = _FormatPlan(_AFFINE_KINDS[fmt.bits], zeros, 1.0, float(fmt.mid))
    elif isinstance(fmt, CodebookFormat) and fmt.bits == 4:
        plan = _codebook_plan(fmt)
    elif isinstance(fmt, Float8E4M3Format):
        plan = _FormatPlan(FP8, zeros, 1.0, 0.0)
    try:
        fmt._lowbit_plan = plan
    except AttributeError:  # a format class with __slots__: recomputed each time
        pass
    return plan


_MISSING = object()


def _padded_k(spec: KernelSpec) -> int:
    return spec.num_groups * spec.group_size


# Lane l of an int2/int3 chunk holds column 4*(l % 8) + l // 8 (see the C++ layout notes).
_INT2_LANE_COLUMN = torch.tensor([4 * (lane % 8) + lane // 8 for lane in range(CHUNK)])
_INT2_COLUMN_LANE = torch.argsort(_INT2_LANE_COLUMN)


def _pack_runtime(kind: int, codes: Tensor) -> Tensor:
    """Codes ``[N, Kp]`` (uint8) -> runtime bytes ``[N, Kp/32 * chunk bytes]``."""
    n, kp = codes.shape
    if kind in (INT4, LUT4):
        return pack_codes(codes, 4)
    if kind == INT2:
        return pack_codes(codes, 2)
    if kind in (INT8, FP8):
        return codes.contiguous()
    # INT3: per chunk, the low 2 bits packed as int2 (8 bytes), then the high bits in lane order (4 bytes).
    chunks = kp // CHUNK
    low = pack_codes(codes & 3, 2).view(n, chunks, 8)
    high = (codes >> 2).view(n, chunks, CHUNK)[..., _INT2_LANE_COLUMN.to(codes.device)]
    high = pack_codes(high.contiguous(), 1).view(n, chunks, 4)
    return torch.cat([low, high], dim=-1).reshape(n, chunks * 12)


def _unpack_runtime(kind: int, data: Tensor, kp: int) -> Tensor:
    """Exact inverse of :func:`_pack_runtime`: codes ``[N, Kp]``."""
    n = data.shape[0]
    if kind in (INT4, LUT4):
        return unpack_codes(data, 4, kp)
    if kind == INT2:
        return unpack_codes(data, 2, kp)
    if kind in (INT8, FP8):
        return data
    chunks = kp // CHUNK
    planes = data.view(n, chunks, 12)
    low = unpack_codes(planes[..., :8].contiguous(), 2, CHUNK)
    high = unpack_codes(planes[..., 8:].contiguous(), 1, CHUNK)[..., _INT2_COLUMN_LANE.to(data.device)]
    return (low | (high << 2)).reshape(n, kp)


@register_kernel(priority=25)
class LowBitCPUKernel(Kernel):
    """llmopt's C++ kernel: int2/3/4/8, 4-bit codebooks and fp8 decoded in registers (see module doc)."""

    name = "lowbit_cpu"
    cpu_flags = ("avx512_vnni",)

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        if not is_cpu(device):
            return "needs a CPU device"
        plan = format_kind(spec.format)
        if plan is None:
            return (f"format {spec.format.name!r} is not int2/int3/int4/int8 affine, a 16-level codebook "
                    "or fp8_e4m3")
        if spec.group_size % CHUNK:
            return f"group_size={spec.group_size} is not a multiple of {CHUNK}"
        if spec.act_bits is not None:
            return "W8A8 layers (act_bits=8) are served by the int8 kernels"
        for name, dtype in (("scale", spec.scale_dtype),
                            ("zero_point", spec.zero_point_dtype if spec.has_zero_point else torch.float32)):
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return f"{name} dtype {dtype} is not float32, bfloat16 or float16"
        if not lowbit_available():
            return extension_error(_EXT) or "the C++ extension is unavailable"
        return None

    def to_runtime(self, spec: KernelSpec, canonical: Tensors) -> Tensors:
        plan = format_kind(spec.format)
        kp = _padded_k(spec)
        if kp == spec.in_features and plan.kind not in (INT3,):
            qdata = canonical["qdata"].contiguous()  # the canonical bytes are the runtime layout
        else:
            codes = unpack_codes(canonical["qdata"], spec.format.bits, spec.in_features)
            if kp != spec.in_features:
                codes = F.pad(codes, (0, kp - spec.in_features))  # meets zero activations
            qdata = _pack_runtime(plan.kind, codes)
        runtime = {"qdata": qdata, "scale": canonical["scale"].contiguous()}
        if "zero_point" in canonical:
            runtime["zero_point"] = canonical["zero_point"].contiguous()
        return runtime

    def to_canonical(self, spec: KernelSpec, runtime: Tensors) -> Tensors:
        plan = format_kind(spec.format)
        kp = _padded_k(spec)
        if kp == spec.in_features and plan.kind not in (INT3,):
            qdata = runtime["qdata"].clone()
        else:
            codes = _unpack_runtime(plan.kind, runtime["qdata"], kp)[:, : spec.in_features]
            qdata = pack_codes(codes.contiguous(), spec.format.bits)
        out = {"qdata": qdata, "scale": runtime["scale"].clone()}
        if "zero_point" in runtime:
            out["zero_point"] = runtime["zero_point"].clone()
        return out

    def codes(self, spec: KernelSpec, runtime: Tensors) -> Tensor:
        plan = format_kind(spec.format)
        codes = _unpack_runtime(plan.kind, runtime["qdata"], _padded_k(spec))
        return codes[:, : spec.in_features].contiguous()

    def dequantize(self, spec: KernelSpec, runtime: Tensors, dtype: torch.dtype) -> Tensor:
        return dequantize_weight(self.codes(spec, runtime), runtime["scale"], runtime.get("zero_point"),
                                 spec.format, spec.group_size, dtype)

    def dequantize_rows(self, spec: KernelSpec, runtime: Tensors, rows: Tensor, dtype: torch.dtype) -> Tensor:
        # Rows are contiguous in every runtime layout: gather them, then decode only those.
        if rows.numel() == 0:
            return torch.empty(0, spec.in_features, dtype=dtype, device=runtime["qdata"].device)
        sub = {name: runtime[name].index_select(0, rows) for name in ("qdata", "scale", "zero_point")
               if name in runtime}
        return self.dequantize(dataclasses.replace(spec, out_features=int(rows.numel())), sub, dtype)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        plan = format_kind(spec.format)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, spec.in_features)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.to(torch.float32)
        y = torch.ops.llmopt_lowbit.mm(
            x2, runtime["qdata"], runtime["scale"], runtime.get("zero_point"), bias, plan.lut, plan.kind,
            spec.group_size, spec.out_features, plan.unit, plan.offset, _ISA[0])
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*lead, spec.out_features)


def _register_fake() -> None:
    """Shape function for ``torch.compile`` (the op's output: ``[M, N]`` in the activations' dtype)."""
    try:
        @torch.library.register_fake("llmopt_lowbit::mm")
        def _mm_fake(x, qdata, scale, zero_point, bias, lut, kind, group_size, out_features, unit, offset, isa):
            return x.new_empty(x.shape[0], out_features)
    except Exception:  # an older torch without register_fake: eager use is unaffected
        pass


_FAKE_DONE: Dict[str, bool] = {}


def lowbit_available() -> bool:
    """True once the C++ extension is built and loaded (builds it on the first call)."""
    ok = load_extension(_EXT, _SOURCE)
    if ok and not _FAKE_DONE:
        _register_fake()
        _FAKE_DONE["done"] = True
    return ok
