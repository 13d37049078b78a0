"""Where a :class:`~llmopt.nn.sparse_linear.SparseLinear` keeps track of its kept weights.

A layout turns a bool mask ``[N, K]`` into small metadata tensors and back. It also fixes the order in
which the kept entries are stored (what :mod:`.values` then stores as floats or packed codes):

* :class:`BitmaskLayout` (any mask): ``mask`` uint8 ``[N, ceil(K/8)]``, one bit per weight (each row's
  bits packed little-endian by :func:`~llmopt.core.packing.pack_codes`); the kept entries are one flat
  run of ``nnz`` in row-major order.
* :class:`NMLayout` (exactly ``n`` kept in every group of ``m`` consecutive inputs): ``indices`` uint8
  ``[N, ceil(K*n/m * b / 8)]``, the position ``0..m-1`` of each kept weight inside its group in
  ``b = ceil(log2 m)`` bits; the kept entries are one run of ``K*n/m`` per output row.

Layouts are immutable descriptions (shape and pattern); the tensors themselves live in the layer.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor

from ...core.checks import check_nm
from ...core.packing import pack_codes, packed_row_bytes, unpack_codes

__all__ = ["SparseLayout", "BitmaskLayout", "NMLayout", "make_layout", "nm_index_bits", "bool_mask"]

# {name: (shape, dtype)} of stored tensors.
TensorSpec = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]


def nm_index_bits(m: int) -> int:
    """Bits per stored position inside a group of ``m``: ``ceil(log2 m)`` (2 for 2:4)."""
    return max(1, math.ceil(math.log2(m)))


def bool_mask(mask: Tensor, shape: Tuple[int, int], where: str) -> Tensor:
    """``mask`` as a bool tensor of ``shape``; bool or integer 0/1 input, anything else is an error."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where}: mask must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{where}: mask has shape {tuple(mask.shape)}, the weight has shape {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise TypeError(f"{where}: mask must be bool (or integers 0/1), got {mask.dtype}")
    return mask != 0


class SparseLayout:
    """How kept positions are stored for a ``[out_features, in_features]`` weight (see module docs)."""

    name: str
    nm: Optional[Tuple[int, int]] = None
    # State-dict order: the bitmask comes before the values, N:M indices after them (as written so far).
    metadata_first: ClassVar[bool]

    def __init__(self, out_features: int, in_features: int) -> None:
        self.out_features, self.in_features = out_features, in_features

    def in_state_order(self, metadata: Dict[str, Any], kept: Dict[str, Any]) -> Dict[str, Any]:
        """Metadata and kept-value entries (the kept tensor first, then parameters) in state-dict order."""
        first, *rest = kept.items()
        ordered = [*metadata.items(), first] if self.metadata_first else [first, *metadata.items()]
        return dict(ordered + rest)

    def run_length(self, nnz: int) -> int:
        """Kept entries per stored run (the last dimension of the kept values)."""
        raise NotImplementedError

    def kept_shape(self, nnz: int, bits: Optional[int] = None) -> Tuple[int, ...]:
        """Shape of the kept entries: float values, or packed at ``bits`` bits per code."""
        raise NotImplementedError

    def metadata_spec(self) -> TensorSpec:
        """Names, shapes and dtypes of the metadata tensors."""
        raise NotImplementedError

    def empty_metadata(self, device: torch.device) -> Dict[str, Tensor]:
        """Metadata of an empty layer (nothing kept; for N:M the first ``n`` of each group)."""
        raise NotImplementedError

    def split(self, dense: Tensor, mask: Tensor, where: str) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(kept entries of dense [N, K] in storage order, metadata)`` for bool ``mask`` (checked)."""
        raise NotImplementedError

    def count(self, stored: Dict[str, Tensor]) -> int:
        """Number of kept weights; for the bitmask, checks the mask tensor first (raises ValueError)."""
        raise NotImplementedError

    def check_positions(self, stored: Dict[str, Tensor]) -> None:
        """Check the metadata's content once shapes and dtypes are right (raises ValueError)."""

    def kept_note(self, nnz: int) -> str:
        """What a wrong kept-values shape is measured against, for error messages."""
        return ""

    def mask(self, stored: Dict[str, Tensor]) -> Tensor:
        """Bool ``[N, K]``: True where a weight is kept."""
        raise NotImplementedError

    def scatter(self, kept: Tensor, stored: Dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """Dense ``[N, K]`` in ``dtype`` with the kept entries in place and 0 elsewhere."""
        raise NotImplementedError


class BitmaskLayout(SparseLayout):
    """Any mask: one bit per weight, kept entries in row-major order."""

    name = "bitmask"
    metadata_first = True

    def run_length(self, nnz: int) -> int:
        return nnz

    def kept_shape(self, nnz: int, bits: Optional[int] = None) -> Tuple[int, ...]:
        return (nnz if bits is None else packed_row_bytes(nnz, bits),)

    def metadata_spec(self) -> TensorSpec:
        return {"mask": ((self.out_features, packed_row_bytes(self.in_features, 1)), torch.uint8)}

    def empty_metadata(self, device: torch.device) -> Dict[str, Tensor]:
        (shape, dtype), = self.metadata_spec().values()
        return {"mask": torch.zeros(shape, dtype=dtype, device=device)}

    def split(self, dense: Tensor, mask: Tensor, where: str) -> Tuple[Tensor, Dict[str, Tensor]]:
        return dense[mask], {"mask": pack_codes(mask.to(torch.uint8), 1)}

    def count(self, stored: Dict[str, Tensor]) -> int:
        packed = stored["mask"]
        (expected, _), = self.metadata_spec().values()
        if tuple(packed.shape) != expected or packed.dtype != torch.uint8:
            raise ValueError(f"mask has shape {tuple(packed.shape)} / dtype {packed.dtype}, expected "
                             f"uint8 {expected} (packed bits)")
        spare = 8 * packed.shape[1] - self.in_features
        if spare and bool((packed[:, -1] >> (8 - spare)).any()):
            raise ValueError("mask has bits set past in_features (corrupt packed mask)")
        return int(unpack_codes(packed, 1, self.in_features).sum())

    def kept_note(self, nnz: int) -> str:
        return f" ({nnz} kept weights in the mask)"

    def mask(self, stored: Dict[str, Tensor]) -> Tensor:
        return unpack_codes(stored["mask"], 1, self.in_features).bool()

    def scatter(self, kept: Tensor, stored: Dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        out = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=kept.device)
        return out.masked_scatter_(self.mask(stored), kept.to(dtype))


class NMLayout(SparseLayout):
    """Exactly ``n`` kept weights in every group of ``m`` inputs; their in-group positions in a few bits."""

    metadata_first = False

    def __init__(self, out_features: int, in_features: int, nm: Tuple[int, int]) -> None:
        super().__init__(out_features, in_features)
        self.nm = check_nm(nm)
        self.name = f"{self.nm[0]}:{self.nm[1]}"
        if in_features % self.nm[1]:
            raise ValueError(f"SparseLinear: in_features {in_features} is not a multiple of M={self.nm[1]} "
                             f"(nm={self.nm})")
        self.kept_per_row = in_features * self.nm[0] // self.nm[1]
        self.index_bits = nm_index_bits(self.nm[1])

    def run_length(self, nnz: int) -> int:
        return self.kept_per_row

    def kept_shape(self, nnz: int, bits: Optional[int] = None) -> Tuple[int, ...]:
        run = self.kept_per_row
        return (self.out_features, run if bits is None else packed_row_bytes(run, bits))

    def metadata_spec(self) -> TensorSpec:
        return {"indices": (self.kept_shape(0, self.index_bits), torch.uint8)}

    def empty_metadata(self, device: torch.device) -> Dict[str, Tensor]:
        if device.type == "meta":
            shape = self.kept_shape(0, self.index_bits)
            return {"indices": torch.zeros(shape, dtype=torch.uint8, device=device)}
        n, m = self.nm
        groups = self.in_features // m
        first = torch.arange(n, dtype=torch.uint8, device=device).repeat(self.out_features, groups)
        return {"indices": pack_codes(first, self.index_bits)}

    def _positions_of(self, mask: Tensor, where: str) -> Tensor:
        """Positions ``[N, K/m, n]`` (ascending, int64) of the kept weights in each group; checks the
        pattern."""
        n, m = self.nm
        groups = mask.reshape(mask.shape[0], -1, m)
        counts = groups.sum(dim=-1)
        if not bool((counts == n).all()):
            bad = int((counts != n).sum())
            raise ValueError(f"{where}: mask violates the {n}:{m} pattern: {bad} groups of {m} do not keep "
                             f"exactly {n} weights (counts seen: {sorted(set(counts.unique().tolist()))})")
        # A stable sort puts the kept (True) positions first, in ascending order.
        return torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., :n]

    def split(self, dense: Tensor, mask: Tensor, where: str) -> Tuple[Tensor, Dict[str, Tensor]]:
        pos = self._positions_of(mask, where)
        rows = dense.shape[0]
        kept = torch.gather(dense.reshape(rows, -1, self.nm[1]), 2, pos).reshape(rows, -1)
        return kept, {"indices": pack_codes(pos.reshape(rows, -1).to(torch.uint8), self.index_bits)}

    def count(self, stored: Dict[str, Tensor]) -> int:
        return self.out_features * self.kept_per_row

    def _positions(self, stored: Dict[str, Tensor]) -> Tensor:
        """Stored positions as int64 ``[N, K/m, n]``."""
        pos = unpack_codes(stored["indices"], self.index_bits, self.kept_per_row).to(torch.int64)
        return pos.reshape(self.out_features, -1, self.nm[0])

    def check_positions(self, stored: Dict[str, Tensor]) -> None:
        n, m = self.nm
        pos = self._positions(stored)
        if bool((pos >= m).any()) or (n > 1 and bool((pos[..., 1:] <= pos[..., :-1]).any())):
            raise ValueError(f"indices are not strictly increasing positions in [0, {m}) per group")

    def mask(self, stored: Dict[str, Tensor]) -> Tensor:
        pos = self._positions(stored)
        out = torch.zeros(self.out_features, self.in_features // self.nm[1], self.nm[1], dtype=torch.bool,
                          device=pos.device)
        return out.scatter_(2, pos, True).reshape(self.out_features, self.in_features)

    def scatter(self, kept: Tensor, stored: Dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        n, m = self.nm
        out = torch.zeros(self.out_features, self.in_features // m, m, dtype=dtype, device=kept.device)
        out.scatter_(2, self._positions(stored), kept.to(dtype).reshape(self.out_features, -1, n))
        return out.reshape(self.out_features, self.in_features)


def make_layout(out_features: int, in_features: int, nm: Optional[Tuple[int, int]]) -> SparseLayout:
    """The bitmask layout (``nm=None``) or the N:M layout for ``nm=(n, m)`` (checked)."""
    return BitmaskLayout(out_features, in_features) if nm is None else NMLayout(out_features, in_features, nm)
