"""``int4pack_cpu``: PyTorch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``).

Serves affine formats of 2-4 bits with group sizes that are multiples of 32, ``out_features % 16
== 0`` and bfloat16 scales; activations are cast to bfloat16, the only dtype it is fast with. Its
packed layout depends on the CPU, so the exact inverse (:func:`unpack_int4_cpu`) detects it once.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.formats import AffineFormat
from ..core.packing import pack_codes, unpack_codes
from .base import Kernel, KernelSpec, Tensors, bf16_rows, finish_output, is_cpu
from .registry import register_kernel

__all__ = ["Int4PackCPUKernel", "int4_kernel_group", "int4_scale_and_zero", "unpack_int4_cpu",
           "int4_nibble_sources"]


def int4_kernel_group(group_size: int) -> Optional[int]:
    """Largest group size the int4 CPU kernel accepts that divides ``group_size``."""
    for candidate in (256, 128, 64, 32):
        if group_size % candidate == 0:
            return candidate
    return None


def int4_scale_and_zero(spec: KernelSpec, canonical: Tensors) -> Tensors:
    """PyTorch's int4 kernels' parameters (CPU and CUDA alike): ``scale_and_zero`` ``[K'/g', N, 2]`` bf16
    per kernel group ``g'`` (the scales repeated when the layer's groups are wider), ``zero = 0`` for
    symmetric formats. "int"/"min" zero points also keep their exact float32 values as ``zero_point``:
    the kernel computes with their bf16 rounding (like its bf16 activations), the stored form needs them.
    """
    repeat = spec.group_size // int4_kernel_group(spec.group_size)
    scale = canonical["scale"].to(torch.bfloat16)
    zero = canonical.get("zero_point")
    zero = torch.zeros_like(scale) if zero is None else zero.to(torch.bfloat16)
    scale_and_zero = torch.stack([scale, zero], dim=-1).repeat_interleave(repeat, dim=1)
    out = {"scale_and_zero": scale_and_zero.transpose(0, 1).contiguous()}
    if spec.has_zero_point and spec.zero_point_dtype != torch.bfloat16:
        out["zero_point"] = canonical["zero_point"].to(spec.zero_point_dtype).contiguous()
    return out


def int4_nibble_sources(n: int, k: int, device: torch.device) -> Tensor:
    """For each nibble of PyTorch's packed int4 CPU layout of an ``[n, k]`` matrix, its source index.

    Generic but slow (several packing passes over an ``n*k`` index): used only when the layout is
    none of the known ones, see :func:`_int4_layout`.
    """
    total = n * k
    index = torch.arange(total, dtype=torch.int64, device=device).view(n, k)
    sources = torch.zeros(total, dtype=torch.int64, device=device)
    shift = 0
    while (1 << shift) < total:
        probe = ((index >> shift) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)
        sources |= nibbles.to(torch.int64) << shift
        shift += 4
    return sources


def _unpack_int4_blocked(packed: Tensor, n: int, k: int, block_n: int, split_halves: bool) -> Tensor:
    """Codes ``[n, k]`` from PyTorch's int4 CPU layout, described by two parameters.

    The op packs rows in blocks of ``block_n``; each block stores ``k`` runs of ``block_n / 2`` bytes.
    In a full block, byte ``b`` holds rows ``b`` and ``b + block_n/2`` (``split_halves``) or rows
    ``2b`` and ``2b+1``; a partial last block always uses the pair form.
    """
    flat = packed.reshape(-1)
    n_full = n // block_n
    parts = []
    if n_full:
        full = flat[: n_full * k * block_n // 2].view(n_full, k, block_n // 2)
        lo, hi = full & 0xF, full >> 4
        rows = torch.cat([lo, hi], dim=2) if split_halves else torch.stack([lo, hi], dim=3)
        parts.append(rows.reshape(n_full, k, block_n).permute(0, 2, 1).reshape(n_full * block_n, k))
    tail = n - n_full * block_n
    if tail:
        part = flat[n_full * k * block_n // 2:].view(k, tail // 2)
        parts.append(torch.stack([part & 0xF, part >> 4], dim=2).reshape(k, tail).t())
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0].contiguous()


# Filled once by _int4_layout(); a plain dict (not functools.lru_cache) so that torch.compile reads the
# cached answer as a constant instead of tracing the probe (which builds a Generator, an opaque object).
_INT4_LAYOUT_CACHE: Dict[str, Optional[tuple]] = {}


def _int4_layout() -> Optional[tuple]:
    """Which known layout this PyTorch build and CPU use (``(block_n, split_halves)``), or None.

    The layout differs between CPU capabilities (AVX-512: blocks of 64 rows, halves; AVX2: 32, halves;
    scalar: 32, pairs), so it is detected once by packing a random probe and checking each candidate.
    ``Int4PackCPUKernel.to_runtime`` (always eager) runs the probe, so a compiled forward or backward
    only ever reads the cached answer.
    """
    if "layout" not in _INT4_LAYOUT_CACHE:
        _INT4_LAYOUT_CACHE["layout"] = _probe_int4_layout()
    return _INT4_LAYOUT_CACHE["layout"]


def _probe_int4_layout() -> Optional[tuple]:
    gen = torch.Generator().manual_seed(0)
    n, k = 2 * 64 + 48, 64
    probe = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block_n, split in ((64, True), (32, True), (32, False), (64, False), (16, False)):
        if torch.equal(_unpack_int4_blocked(packed, n, k, block_n, split).to(torch.int32), probe):
            return block_n, split
    return None


def unpack_int4_cpu(packed: Tensor, n: int, k: int) -> Tensor:
    """Exact inverse of ``aten._convert_weight_to_int4pack_for_cpu``: uint8 codes ``[n, k]``."""
    layout = _int4_layout()
    if layout is not None:
        return _unpack_int4_blocked(packed, n, k, *layout)
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(-1)
    codes = torch.empty(n * k, dtype=torch.uint8, device=packed.device)
    codes[int4_nibble_sources(n, k, packed.device)] = nibbles
    return codes.view(n, k)


@register_kernel(priority=10)
class Int4PackCPUKernel(Kernel):
    """PyTorch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``) with bf16 activations.

    It computes ``(code - 8) * scale + zero`` per group: our affine convention with mid code 8,
    so 4-bit parameters feed it unchanged. 2- and 3-bit codes are re-centred onto the 4-bit grid
    (``code - mid + 8``), which is exact; they then take 4 bits each in memory (the report says so).
    """

    name = "int4pack_cpu"

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        if not is_cpu(device):
            return "needs a CPU device"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this PyTorch has no aten._weight_int4pack_mm_for_cpu"
        fmt = spec.format
        if not isinstance(fmt, AffineFormat) or fmt.bits > 4:
            return f"format {fmt.name!r} is not an affine format of at most 4 bits"
        if spec.out_features % 16:
            return f"out_features={spec.out_features} is not a multiple of 16"
        if spec.scale_dtype != torch.bfloat16:
            return f"needs bfloat16 scales (scale_dtype={spec.scale_dtype} would be rounded)"
        if int4_kernel_group(spec.group_size) is None:
            return f"group_size={spec.group_size} is not a multiple of 32"
        return None

    @staticmethod
    def _padded_k(spec: KernelSpec) -> int:
        return spec.num_groups * spec.group_size

    def to_runtime(self, spec: KernelSpec, canonical: Tensors) -> Tensors:
        fmt = spec.format
        k_pad = self._padded_k(spec)
        codes = unpack_codes(canonical["qdata"], fmt.bits, spec.in_features).to(torch.int32)
        if fmt.mid != 8:
            codes += 8 - fmt.mid  # re-centre 2/3-bit codes on the 4-bit grid (exact)
        if k_pad != spec.in_features:
            # Padded columns get code 8 (value = zero_point) and meet zero-padded activations.
            codes = F.pad(codes, (0, k_pad - spec.in_features), value=8)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        _int4_layout()  # probe eagerly now: dequantize()/to_canonical() may later run inside torch.compile
        return {"qdata": packed, **int4_scale_and_zero(spec, canonical)}

    def to_canonical(self, spec: KernelSpec, runtime: Tensors) -> Tensors:
        fmt = spec.format
        codes = unpack_int4_cpu(runtime["qdata"], spec.out_features, self._padded_k(spec))
        codes = codes[:, : spec.in_features].to(torch.int16) - (8 - fmt.mid)
        repeat = spec.group_size // int4_kernel_group(spec.group_size)
        sz = runtime["scale_and_zero"].transpose(0, 1)[:, ::repeat]
        out = {
            "qdata": pack_codes(codes.to(torch.uint8), fmt.bits),
            "scale": sz[..., 0].to(spec.scale_dtype).contiguous(),
        }
        if "zero_point" in runtime:
            out["zero_point"] = runtime["zero_point"].clone()
        elif fmt.has_zero_point:
            out["zero_point"] = sz[..., 1].to(spec.scale_dtype).contiguous()
        return out

    def codes(self, spec: KernelSpec, runtime: Tensors) -> Tensor:
        codes = unpack_int4_cpu(runtime["qdata"], spec.out_features, self._padded_k(spec))
        codes = codes[:, : spec.in_features]
        return codes - (8 - spec.format.mid) if spec.format.mid != 8 else codes.contiguous()

    def dequantize(self, spec: KernelSpec, runtime: Tensors, dtype: torch.dtype) -> Tensor:
        # Straight from the kernel layout (no detour through the packed canonical form): the same
        # maths the kernel does, (code - 8) * scale + zero per kernel group.
        n, k_pad = spec.out_features, self._padded_k(spec)
        codes = unpack_int4_cpu(runtime["qdata"], n, k_pad)
        kernel_group = int4_kernel_group(spec.group_size)
        sz = runtime["scale_and_zero"].transpose(0, 1).to(torch.float32)  # [N, G', 2]
        zero = sz[..., 1:]
        if "zero_point" in runtime:  # exact float32 zero points ("int"/"min" modes)
            repeat = spec.group_size // kernel_group
            zero = runtime["zero_point"].to(torch.float32).repeat_interleave(repeat, dim=1).unsqueeze(-1)
        values = (codes.view(n, -1, kernel_group).to(torch.float32) - 8) * sz[..., :1] + zero
        return values.view(n, k_pad)[:, : spec.in_features].to(dtype)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        lead = x.shape[:-1]
        x2 = bf16_rows(x, self._padded_k(spec))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, runtime["qdata"], int4_kernel_group(spec.group_size), runtime["scale_and_zero"]
        )
        return finish_output(y, x, bias, spec.out_features, lead)
