"""Dense bit packing of integer codes into uint8, row by row.

Codes of ``bits`` bits form one little-endian bit stream per row: code ``i`` occupies stream bits
``[bits*i, bits*(i+1))``. A row of ``K`` codes takes exactly ``ceil(K * bits / 8)`` bytes, so
3-bit codes pack 8 to 3 bytes and 4-bit codes 2 to a byte. ``unpack_codes`` is the exact inverse.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_codes", "unpack_codes", "packed_row_bytes"]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def packed_row_bytes(num_codes: int, bits: int) -> int:
    """Bytes one packed row of ``num_codes`` codes takes: ``ceil(num_codes * bits / 8)``."""
    _check_bits(bits)
    return (num_codes * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes ``[..., K]`` in ``[0, 2**bits)`` into uint8 ``[..., ceil(K*bits/8)]``."""
    _check_bits(bits)
    if codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_codes expects an integer tensor, got {codes.dtype}")
    num_codes = codes.shape[-1]
    out_bytes = packed_row_bytes(num_codes, bits)
    if bits == 8:
        return codes.to(torch.uint8)
    lead = codes.shape[:-1]
    if bits in (1, 2, 4):
        # Power-of-two widths: whole codes per byte, plain shifts on uint8.
        per_byte = 8 // bits
        padded = codes.to(torch.uint8)
        if out_bytes * per_byte != num_codes:
            padded = torch.nn.functional.pad(padded, (0, out_bytes * per_byte - num_codes))
        padded = padded.reshape(*lead, out_bytes, per_byte)
        packed = padded[..., 0].clone()
        for j in range(1, per_byte):
            packed |= padded[..., j] << (bits * j)
        return packed
    # Other widths: chunks of 8 codes make exactly `bits` bytes.
    chunks = (num_codes + 7) // 8
    acc_dtype = torch.int32 if bits * 8 <= 31 else torch.int64
    padded = torch.nn.functional.pad(codes.to(acc_dtype), (0, chunks * 8 - num_codes))
    padded = padded.reshape(*lead, chunks, 8)
    stream = torch.zeros(*lead, chunks, dtype=acc_dtype, device=codes.device)
    for i in range(8):
        stream |= padded[..., i] << (bits * i)
    packed = torch.stack([((stream >> (8 * j)) & 0xFF).to(torch.uint8) for j in range(bits)], dim=-1)
    # Trailing bytes past ceil(K*bits/8) hold only padding zeros: drop them.
    return packed.reshape(*lead, chunks * bits)[..., :out_bytes].contiguous()


def unpack_codes(packed: Tensor, bits: int, num_codes: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., B]`` back to uint8 codes ``[..., num_codes]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_codes expects uint8 data, got {packed.dtype}")
    expected = packed_row_bytes(num_codes, bits)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"packed rows have {packed.shape[-1]} bytes but {num_codes} codes of {bits} bits need {expected}"
        )
    if bits == 8:
        return packed
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        parts = [(packed >> (bits * j)) & mask for j in range(per_byte)]
        codes = torch.stack(parts, dim=-1).reshape(*lead, expected * per_byte)
        return codes[..., :num_codes]
    chunks = (num_codes + 7) // 8
    acc_dtype = torch.int32 if bits * 8 <= 31 else torch.int64
    padded = torch.nn.functional.pad(packed, (0, chunks * bits - expected)).reshape(*lead, chunks, bits)
    stream = torch.zeros(*lead, chunks, dtype=acc_dtype, device=packed.device)
    for j in range(bits):
        stream |= padded[..., j].to(acc_dtype) << (8 * j)
    codes = torch.stack([((stream >> (bits * i)) & mask) for i in range(8)], dim=-1)
    return codes.reshape(*lead, chunks * 8)[..., :num_codes].to(torch.uint8)
