"""``int4_tinygemm_cuda``: PyTorch's CUDA int4 kernel (``aten._weight_int4pack_mm``, "tinygemm").

The kernel torchao's int4 weight-only path runs. It computes ``(q - 8) * scale + zero`` per group:
llmopt's int4 affine convention (mid code 8), so 4-bit parameters feed it unchanged (a symmetric
format has zero 0). Requirements: a CUDA GPU of compute capability 8.0+, ``out_features % 8 == 0``,
bfloat16 scales, group sizes that are multiples of 32 (the kernel's group is the largest of
256/128/64/32 dividing it; the scales are repeated), bfloat16 activations (others are cast).

The runtime layout is the tensor-core layout ``aten._convert_weight_to_int4pack`` produces. Its exact
inverse (:func:`unpack_tinygemm`) is written from the layout itself (:func:`tinygemm_nibble_positions`)
and checked once per process against the real op on the GPU at first use: if a PyTorch build packs
differently, the kernel refuses the layer (``"auto"`` then takes ``lowbit_triton``) instead of saving
wrong codes.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.formats import AffineFormat
from ..core.packing import pack_codes, unpack_codes
from ..core.primitives import dequantize_weight
from .base import Kernel, KernelSpec, Tensors, finish_output
from .int4_cpu import int4_kernel_group, int4_scale_and_zero
from .registry import register_kernel

__all__ = ["Int4TinyGemmCUDAKernel", "tinygemm_nibble_positions", "pack_tinygemm_reference",
           "unpack_tinygemm", "inner_k_tiles"]

# Rows per n-tile and columns per k-tile of the m16n8k16 tensor-core layout.
_N_TILE, _K_TILE = 8, 16


def inner_k_tiles(k_pad: int) -> int:
    """The widest inner-k-tile count (8, 4 or 2) the padded ``in_features`` allows."""
    for tiles in (8, 4, 2):
        if k_pad % (tiles * _K_TILE) == 0:
            return tiles
    raise ValueError(f"in_features padded to {k_pad} is not a multiple of 32")


def tinygemm_nibble_positions(n_tiles: int, k: int, tiles: int, device=None) -> Tuple[Tensor, Tensor]:
    """For each nibble of the packed tensor (``[n_tiles, k / (tiles*16), 32, tiles/2]`` int32, 8 nibbles
    per word, lowest first), the ``(row, column)`` of the code it holds.

    From the layout of ``_convert_weight_to_int4pack`` (CUDA): lane ``t`` of n-tile ``nt`` holds row
    ``8*nt + t//4``; word ``w`` of k-super-tile ``ko`` covers byte columns ``(ko*tiles + 2w)*8 + t%4 +
    {0, 4, 8, 12}`` of the ``[n, k/2]`` byte matrix whose byte ``j`` is ``code[2j] << 4 | code[2j+1]``.
    Nibbles 0-3 hold those bytes' high halves (even columns), nibbles 4-7 their low halves (odd ones).
    """
    k_super = k // (tiles * _K_TILE)
    nt = torch.arange(n_tiles, device=device).view(-1, 1, 1, 1, 1)
    ko = torch.arange(k_super, device=device).view(1, -1, 1, 1, 1)
    lane = torch.arange(32, device=device).view(1, 1, -1, 1, 1)
    word = torch.arange(tiles // 2, device=device).view(1, 1, 1, -1, 1)
    nibble = torch.arange(8, device=device).view(1, 1, 1, 1, -1)
    row = nt * _N_TILE + lane // 4
    byte = (ko * tiles + 2 * word) * (_K_TILE // 2) + lane % 4 + 4 * (nibble % 4)
    col = 2 * byte + nibble // 4
    shape = (n_tiles, k_super, 32, tiles // 2, 8)
    return row.expand(shape), col.expand(shape)


def _nibbles(packed: Tensor) -> Tensor:
    """``[..., 8]`` nibbles (lowest first) of int32 words."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return (packed.unsqueeze(-1) >> shifts) & 0xF


def unpack_tinygemm(packed: Tensor, n: int, k: int) -> Tensor:
    """Exact inverse of ``_convert_weight_to_int4pack``: uint8 codes ``[n, k]``.

    Works through 128 n-tiles (1024 rows) at a time, so the index tensors stay small.
    """
    n_tiles, _, _, half = packed.shape
    tiles = 2 * half
    codes = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    step = 128
    for start in range(0, n_tiles, step):
        stop = min(n_tiles, start + step)
        rows, cols = tinygemm_nibble_positions(stop - start, k, tiles, packed.device)
        values = _nibbles(packed[start:stop]).to(torch.uint8)
        codes[(rows + start * _N_TILE).reshape(-1), cols.reshape(-1)] = values.reshape(-1)
    return codes


def pack_tinygemm_reference(codes: Tensor, tiles: int) -> Tensor:
    """What ``_convert_weight_to_int4pack`` returns for codes ``[n, k]`` (``n % 8 == 0``), in torch.

    The reference the real op is checked against on the GPU, and its stand-in in CPU tests.
    """
    n, k = codes.shape
    rows, cols = tinygemm_nibble_positions(n // _N_TILE, k, tiles, codes.device)
    nibbles = codes.to(torch.int64)[rows, cols]
    shifts = torch.arange(0, 32, 4, device=codes.device)
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _bytes_for_op(codes: Tensor) -> Tensor:
    """The op's input: ``[n, k/2]`` uint8 whose byte ``j`` is ``code[2j] << 4 | code[2j+1]``."""
    c = codes.to(torch.uint8)
    return ((c[:, ::2] << 4) | c[:, 1::2]).contiguous()


def _convert(data: Tensor, tiles: int) -> Tensor:
    """``aten._convert_weight_to_int4pack`` (a module function, so CPU tests can stand in for it)."""
    return torch.ops.aten._convert_weight_to_int4pack(data, tiles)


def _mm(x: Tensor, packed: Tensor, group_size: int, scale_and_zero: Tensor) -> Tensor:
    """``aten._weight_int4pack_mm`` (a module function, so CPU tests can stand in for it)."""
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_and_zero)


# Filled once per process by _layout_ok(): whether this PyTorch packs as tinygemm_nibble_positions says.
_LAYOUT_CHECK: Dict[str, Optional[str]] = {}


def _layout_ok(device: torch.device) -> Optional[str]:
    """``None`` if the op's layout matches :func:`pack_tinygemm_reference` on ``device``, else a reason."""
    if "result" not in _LAYOUT_CHECK:
        gen = torch.Generator().manual_seed(0)
        reason = None
        for tiles in (2, 4, 8):
            probe = torch.randint(0, 16, (16, tiles * _K_TILE * 2), generator=gen, dtype=torch.uint8)
            try:
                real = _convert(_bytes_for_op(probe).to(device), tiles)
            except Exception as error:
                reason = f"aten._convert_weight_to_int4pack failed: {type(error).__name__}: {error}"
                break
            if not torch.equal(real.cpu(), pack_tinygemm_reference(probe, tiles)):
                reason = ("this PyTorch packs int4 for aten._weight_int4pack_mm in a layout llmopt does not "
                          "know, so its codes could not be saved exactly")
                break
        _LAYOUT_CHECK["result"] = reason
    return _LAYOUT_CHECK["result"]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@register_kernel(priority=35)
class Int4TinyGemmCUDAKernel(Kernel):
    """``aten._weight_int4pack_mm`` on CUDA with bf16 activations (see the module docstring)."""

    name = "int4_tinygemm_cuda"
    auto_device_types = ("cuda",)

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda":
            return "needs a CUDA device"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return "this PyTorch has no aten._weight_int4pack_mm"
        fmt = spec.format
        if not isinstance(fmt, AffineFormat) or fmt.bits != 4:
            return f"format {fmt.name!r} is not a 4-bit affine format"
        if spec.out_features % _N_TILE:
            return f"out_features={spec.out_features} is not a multiple of {_N_TILE}"
        if spec.scale_dtype != torch.bfloat16:
            return f"needs bfloat16 scales (scale_dtype={spec.scale_dtype} would be rounded)"
        if int4_kernel_group(spec.group_size) is None:
            return f"group_size={spec.group_size} is not a multiple of 32"
        if torch.version.hip is None and torch.cuda.is_available():
            major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
            if major < 8:
                return f"needs compute capability 8.0+ (this GPU has {major}.{minor})"
        return _layout_ok(device)

    @staticmethod
    def _padded_k(spec: KernelSpec) -> int:
        return spec.num_groups * spec.group_size

    def to_runtime(self, spec: KernelSpec, canonical: Tensors) -> Tensors:
        k_pad = self._padded_k(spec)
        codes = unpack_codes(canonical["qdata"], 4, spec.in_features)
        if k_pad != spec.in_features:
            # Padded columns get code 8 (value = zero point) and meet zero-padded activations.
            codes = F.pad(codes, (0, k_pad - spec.in_features), value=8)
        packed = _convert(_bytes_for_op(codes), inner_k_tiles(k_pad))
        return {"qdata": packed, **int4_scale_and_zero(spec, canonical)}

    def codes(self, spec: KernelSpec, runtime: Tensors) -> Tensor:
        codes = unpack_tinygemm(runtime["qdata"], spec.out_features, self._padded_k(spec))
        return codes[:, : spec.in_features].contiguous()

    def _params(self, spec: KernelSpec, runtime: Tensors) -> Tuple[Tensor, Optional[Tensor]]:
        repeat = spec.group_size // int4_kernel_group(spec.group_size)
        sz = runtime["scale_and_zero"].transpose(0, 1)[:, ::repeat]
        scale = sz[..., 0].to(spec.scale_dtype).contiguous()
        if "zero_point" in runtime:
            return scale, runtime["zero_point"]
        return scale, (sz[..., 1].to(spec.scale_dtype).contiguous() if spec.has_zero_point else None)

    def to_canonical(self, spec: KernelSpec, runtime: Tensors) -> Tensors:
        scale, zero = self._params(spec, runtime)
        out = {"qdata": pack_codes(self.codes(spec, runtime), 4), "scale": scale}
        if zero is not None:
            out["zero_point"] = zero.clone()
        return out

    def dequantize(self, spec: KernelSpec, runtime: Tensors, dtype: torch.dtype) -> Tensor:
        scale, zero = self._params(spec, runtime)
        return dequantize_weight(self.codes(spec, runtime), scale, zero, spec.format, spec.group_size, dtype)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        lead = x.shape[:-1]
        k_pad = self._padded_k(spec)
        x2 = x.reshape(-1, spec.in_features).to(torch.bfloat16)
        if k_pad != spec.in_features:
            x2 = F.pad(x2, (0, k_pad - spec.in_features))
        y = _mm(
            x2.contiguous(), runtime["qdata"], int4_kernel_group(spec.group_size), runtime["scale_and_zero"])
        return finish_output(y, x, bias, spec.out_features, lead)
