"""``SparseLinear``: a pruned linear layer that stores only its kept weights.

Two storage layouts (the canonical tensors, what ``state_dict()`` and ``llmopt.save`` see):

* **bitmask** (any mask): ``mask`` uint8 ``[N, ceil(K/8)]`` (one bit per weight, the row's bits packed
  little-endian with :func:`~llmopt.quant.packing.pack_codes`) and ``values`` 1-D ``[nnz]``: the kept
  weights in row-major order.
* **N:M** (``nm=(n, m)``: exactly ``n`` kept weights in every group of ``m`` consecutive inputs):
  ``values`` ``[N, K*n/m]`` and ``indices`` uint8 ``[N, ceil(K*n/m * b / 8)]``: the position (``0..m-1``)
  of each kept weight inside its group, ``b = ceil(log2 m)`` bits each (2 bits for 2:4). No bitmask.

With quantized values (:meth:`SparseLinear.from_quantized`) the float ``values`` become ``qdata``: the
codes of the kept weights only, packed at the format's bits (1-D for the bitmask layout, one packed row
per output for N:M), plus ``scale`` / ``zero_point`` ``[N, G]`` exactly as :class:`QuantLinear` stores
them (groups along the *dense* input dimension, pruned weights included).

Bytes per weight (bias excluded), 50% sparsity: bitmask ``1/8 + 0.5 * value_bytes``; 2:4
``0.5 * value_bytes + 0.5 * 2/8``. With bfloat16 values both are 1.125 bytes = 0.5625x dense bf16.

Runtime (``runtime=``, switch with :meth:`SparseLinear.set_runtime`):

* ``"dense"`` (default): the dense weight, zeros included, is materialised once in the compute dtype and
  the forward is ``F.linear``: as fast as a dense layer, and *not* smaller in memory: the layer holds the
  compressed tensors plus a dense copy, which :meth:`runtime_bytes` reports.
* ``"compressed"``: only the compressed tensors are held; the dense weight is rebuilt inside every
  forward (memory saving, slower).
* ``"semi_structured"``: CUDA, ``nm=(2, 4)``, float16/bfloat16 compute dtype: PyTorch's 2:4 sparse
  kernels (``torch.sparse.to_sparse_semi_structured``), the only runtime that can be faster than dense.
"""

from __future__ import annotations

import copy
import math
import warnings
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.checks import check_linear_input, check_linear_weight, check_nm, dtype_name, parse_dtype
from ..core.formats import WeightFormat, get_format
from ..core.packing import pack_codes, packed_row_bytes, unpack_codes
from ..core.primitives import dequantize_weight as _dequantize_codes
from ..core.primitives import num_groups, quantize_weight, resolve_group_size
from .base import dense_linear, register_module_type

__all__ = ["SparseLinear", "RUNTIMES", "nm_index_bits"]

RUNTIMES = ("dense", "compressed", "semi_structured")
# The packed bitmask is stored as "mask" (state dict / file) but held in the buffer "mask_bits": the
# attribute name "mask" belongs to the mask() method of the shared interface.
_BUFFER_NAME = {"mask": "mask_bits"}


def nm_index_bits(m: int) -> int:
    """Bits per stored position inside a group of ``m``: ``ceil(log2 m)`` (2 for 2:4)."""
    return max(1, math.ceil(math.log2(m)))


def _bool_mask(mask: Tensor, shape: Tuple[int, int], where: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where}: mask must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{where}: mask has shape {tuple(mask.shape)}, the weight has shape {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise TypeError(f"{where}: mask must be bool (or integers 0/1), got {mask.dtype}")
    return mask != 0


def _nm_positions(mask: Tensor, nm: Tuple[int, int], where: str) -> Tensor:
    """Positions ``[N, K/m, n]`` (ascending, int64) of the kept weights in each group; checks the pattern."""
    n, m = nm
    rows, k = mask.shape
    if k % m:
        raise ValueError(f"{where}: in_features {k} is not a multiple of M={m} (nm=({n}, {m}))")
    groups = mask.reshape(rows, k // m, m)
    counts = groups.sum(dim=-1)
    if not bool((counts == n).all()):
        bad = int((counts != n).sum())
        raise ValueError(f"{where}: mask violates the {n}:{m} pattern: {bad} groups of {m} do not keep "
                         f"exactly {n} weights (counts seen: {sorted(set(counts.unique().tolist()))})")
    # Stable sort puts the kept (True) positions first in ascending order.
    order = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices
    return order[..., :n]


class SparseLinear(nn.Module):
    """Linear layer holding a pruned weight in compressed form (see the module docs for layouts).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        nm: ``(n, m)`` for the N:M layout, ``None`` for the bitmask layout.
        format, group_size, scale_dtype: quantized values (``format`` a name/spec from
            :mod:`llmopt.quant.formats`); ``format=None`` stores float values.
        value_dtype: dtype of float values (default: ``dtype``).
        dtype: compute dtype: the dense weight, bias and :meth:`dequantize_weight` default.
        runtime: ``"dense"``, ``"compressed"`` or ``"semi_structured"``.

    The constructor builds an empty layer (every weight pruned, or for N:M the first ``n`` of each
    group kept with value 0); :meth:`from_dense`, :meth:`from_quantized` or a state dict fill it.
    """

    is_llmopt_compressed = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        nm: Optional[Tuple[int, int]] = None,
        format: Optional[Union[str, WeightFormat, Dict[str, Any]]] = None,
        group_size: Optional[int] = None,
        scale_dtype: Union[str, torch.dtype] = torch.bfloat16,
        value_dtype: Optional[Union[str, torch.dtype]] = None,
        dtype: Union[str, torch.dtype] = torch.float32,
        runtime: str = "dense",
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        for label, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SparseLinear: {label} must be a positive integer, got {value!r}")
        if runtime not in RUNTIMES:
            raise ValueError(f"SparseLinear: runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.nm = None if nm is None else check_nm(nm)
        if self.nm is not None and self.in_features % self.nm[1]:
            raise ValueError(f"SparseLinear: in_features {in_features} is not a multiple of M={self.nm[1]} "
                             f"(nm={self.nm})")
        self.format: Optional[WeightFormat] = get_format(format) if format is not None else None
        self.weight_dtype = parse_dtype(dtype)
        if self.format is not None:
            self.group_size: Optional[int] = resolve_group_size(group_size, self.in_features)
            self.scale_dtype: Optional[torch.dtype] = parse_dtype(scale_dtype)
            self.value_dtype: Optional[torch.dtype] = None
        else:
            if group_size is not None:
                raise ValueError("SparseLinear: group_size only applies to quantized values (format=...)")
            self.group_size, self.scale_dtype = None, None
            self.value_dtype = parse_dtype(value_dtype) if value_dtype is not None else self.weight_dtype
        self.runtime = runtime
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=self.weight_dtype, device=device),
                                  requires_grad=False) if bias else None)
        self._canonical_names: Tuple[str, ...] = ()
        self._install(self._empty_canonical(device), build=device.type != "meta")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None, *,
                   nm: Optional[Tuple[int, int]] = None, dtype: Optional[torch.dtype] = None,
                   runtime: str = "dense") -> "SparseLinear":
        """Layer keeping ``weight`` where ``mask`` is True (values stored in ``dtype``, default weight's).

        ``weight`` ``[N, K]`` float and finite; ``mask`` bool ``[N, K]``; ``nm=(n, m)`` checks that every
        group of ``m`` inputs keeps exactly ``n`` weights and uses the N:M layout. The compute dtype
        (bias, dense weight, outputs) is ``weight.dtype``.
        """
        where = (f"SparseLinear.from_dense [{tuple(weight.shape)}]" if isinstance(weight, Tensor)
                 else "SparseLinear")
        if not isinstance(weight, Tensor):
            raise TypeError(f"{where}: weight must be a tensor, got {type(weight).__name__}")
        try:
            check_linear_weight(weight)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        n_out, k = weight.shape
        mask = _bool_mask(mask, (n_out, k), where).to(weight.device)
        nm = None if nm is None else check_nm(nm)
        value_dtype = parse_dtype(dtype) if dtype is not None else weight.dtype
        _check_bias(bias, n_out, where)
        w = weight.detach()
        if nm is not None:
            pos = _nm_positions(mask, nm, where)
            values = torch.gather(w.reshape(n_out, k // nm[1], nm[1]), 2, pos).reshape(n_out, -1)
            canonical = {"values": values.to(value_dtype).contiguous(),
                         "indices": pack_codes(pos.reshape(n_out, -1).to(torch.uint8), nm_index_bits(nm[1]))}
        else:
            canonical = {"mask": pack_codes(mask.to(torch.uint8), 1),
                         "values": w[mask].to(value_dtype).contiguous()}
        layer = cls(k, n_out, bias=bias is not None, nm=nm, value_dtype=value_dtype, dtype=weight.dtype,
                    runtime=runtime, device="meta")
        layer._set_bias(bias)
        layer._install(canonical)
        return layer

    @classmethod
    def from_quantized(cls, codes: Tensor, scale: Tensor, zero_point: Optional[Tensor], mask: Tensor,
                       bias: Optional[Tensor] = None, *, format: Union[str, WeightFormat, Dict[str, Any]],
                       group_size: Optional[int], scale_dtype: Union[str, torch.dtype] = torch.bfloat16,
                       nm: Optional[Tuple[int, int]] = None, dtype: Union[str, torch.dtype] = torch.float32,
                       runtime: str = "dense") -> "SparseLinear":
        """Layer from unpacked codes ``[N, K]`` on ``format``'s grid and parameters ``[N, G]`` (groups along
        K as :class:`QuantLinear`); only the codes where ``mask`` is True are stored. The layer's weight is
        ``dequantize(codes) * mask``: pruned weights are exactly 0. ``dtype`` is the compute dtype."""
        fmt = get_format(format)
        where = f"SparseLinear.from_quantized [{tuple(codes.shape)}]"
        if codes.dim() != 2 or codes.numel() == 0:
            raise ValueError(f"{where}: codes must be a non-empty 2-D tensor [out, in]")
        if codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
            raise TypeError(f"{where}: codes must be integers, got {codes.dtype}")
        if int(codes.min()) < 0 or int(codes.max()) >= (1 << fmt.bits):
            raise ValueError(f"{where}: codes must lie in [0, {1 << fmt.bits}) for {fmt.bits}-bit format "
                             f"{fmt.name!r}")
        n_out, k = codes.shape
        gs = resolve_group_size(group_size, k)
        g = num_groups(k, gs)
        sdtype = parse_dtype(scale_dtype)
        for label, t in (("scale", scale), ("zero_point", zero_point)):
            if t is not None and tuple(t.shape) != (n_out, g):
                raise ValueError(f"{where}: {label} has shape {tuple(t.shape)}, expected ({n_out}, {g})")
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: {label} has NaN/Inf values")
        if fmt.has_zero_point != (zero_point is not None):
            need = "needs" if fmt.has_zero_point else "takes no"
            raise ValueError(f"{where}: format {fmt.name!r} {need} zero_point")
        mask = _bool_mask(mask, (n_out, k), where).to(codes.device)
        nm = None if nm is None else check_nm(nm)
        _check_bias(bias, n_out, where)
        codes = codes.to(torch.uint8)
        if nm is not None:
            pos = _nm_positions(mask, nm, where)
            kept = torch.gather(codes.reshape(n_out, k // nm[1], nm[1]), 2, pos).reshape(n_out, -1)
            canonical = {"qdata": pack_codes(kept, fmt.bits),
                         "indices": pack_codes(pos.reshape(n_out, -1).to(torch.uint8), nm_index_bits(nm[1]))}
        else:
            canonical = {"mask": pack_codes(mask.to(torch.uint8), 1),
                         "qdata": pack_codes(codes[mask], fmt.bits)}
        canonical["scale"] = scale.detach().to(sdtype).contiguous()
        if zero_point is not None:
            canonical["zero_point"] = zero_point.detach().to(sdtype).contiguous()
        layer = cls(k, n_out, bias=bias is not None, nm=nm, format=fmt, group_size=gs, scale_dtype=sdtype,
                    dtype=dtype, runtime=runtime, device="meta")
        layer._set_bias(bias)
        layer._install(canonical)
        return layer

    def quantize(self, format: Union[str, WeightFormat, Dict[str, Any]] = "int4",
                 group_size: Optional[int] = 128, *,
                 scale_dtype: Union[str, torch.dtype] = torch.bfloat16) -> "SparseLinear":
        """A new layer with the same mask and layout whose kept weights are quantized by round to nearest
        (sparsity + int4). Group parameters are chosen over the dense groups, pruned zeros included."""
        if self.quantized:
            raise ValueError(f"SparseLinear: values are already quantized ({self.format.name})")
        fmt = get_format(format)
        q = quantize_weight(self.dequantize_weight(torch.float32), fmt, group_size, parse_dtype(scale_dtype))
        bias = self.bias.detach() if self.bias is not None else None
        return SparseLinear.from_quantized(
            q.codes, q.scale, q.zero_point, self.mask(), bias,
            format=fmt, group_size=q.group_size, scale_dtype=scale_dtype, nm=self.nm, dtype=self.weight_dtype,
            runtime=self.runtime)

    def _set_bias(self, bias: Optional[Tensor]) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.weight_dtype).clone(), requires_grad=False)

    # ------------------------------------------------------------------ canonical form
    @property
    def quantized(self) -> bool:
        return self.format is not None

    @property
    def layout(self) -> str:
        """``"bitmask"`` or ``"n:m"`` (e.g. ``"2:4"``)."""
        return "bitmask" if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"

    @property
    def device(self) -> torch.device:
        return self._buffers[_BUFFER_NAME.get(self._canonical_names[0], self._canonical_names[0])].device

    def _kept_per_row(self) -> int:
        return self.in_features * self.nm[0] // self.nm[1]

    def _fixed_shapes(self, nnz: Optional[int]) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Expected ``{name: (shape, dtype)}`` of the canonical tensors (``nnz`` for the bitmask layout)."""
        n, k = self.out_features, self.in_features
        shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        if self.nm is None:
            shapes["mask"] = ((n, packed_row_bytes(k, 1)), torch.uint8)
            if self.quantized:
                shapes["qdata"] = ((packed_row_bytes(nnz, self.format.bits),), torch.uint8)
            else:
                shapes["values"] = ((nnz,), self.value_dtype)
        else:
            kept = self._kept_per_row()
            if self.quantized:
                shapes["qdata"] = ((n, packed_row_bytes(kept, self.format.bits)), torch.uint8)
            else:
                shapes["values"] = ((n, kept), self.value_dtype)
            shapes["indices"] = ((n, packed_row_bytes(kept, nm_index_bits(self.nm[1]))), torch.uint8)
        if self.quantized:
            g = num_groups(k, self.group_size)
            shapes["scale"] = ((n, g), self.scale_dtype)
            if self.format.has_zero_point:
                shapes["zero_point"] = ((n, g), self.scale_dtype)
        return shapes

    def _empty_canonical(self, device: torch.device) -> Dict[str, Tensor]:
        out = {}
        for name, (shape, dtype) in self._fixed_shapes(0).items():
            out[name] = (torch.ones if name == "scale" else torch.zeros)(shape, dtype=dtype, device=device)
        if self.nm is not None:
            n, m = self.nm
            pos = torch.arange(n, dtype=torch.uint8, device=device)
            pos = pos.repeat(self.out_features, self.in_features // m)
            out["indices"] = pack_codes(pos, nm_index_bits(m)) if device.type != "meta" else out["indices"]
        return out

    def _validate(self, canonical: Dict[str, Tensor]) -> Optional[int]:
        """Check names, shapes, dtypes and internal consistency of canonical tensors (raises ValueError).

        Returns the number of kept weights (``None`` for tensors on the meta device)."""
        names = set(self._fixed_shapes(0))
        if set(canonical) != names:
            raise ValueError(f"expected tensors {sorted(names)}, got {sorted(canonical)}")
        if any(t.device.type == "meta" for t in canonical.values()):
            return None  # an empty skeleton (from_config on meta): nothing to check until data arrives
        nnz = 0
        if self.nm is None:
            packed = canonical["mask"]
            expected = (self.out_features, packed_row_bytes(self.in_features, 1))
            if tuple(packed.shape) != expected or packed.dtype != torch.uint8:
                raise ValueError(f"mask has shape {tuple(packed.shape)} / dtype {packed.dtype}, expected "
                                 f"uint8 {expected} (packed bits)")
            nnz = int(unpack_codes(packed, 1, self.in_features).sum())
            spare = 8 * packed.shape[1] - self.in_features
            if spare and bool((packed[:, -1] >> (8 - spare)).any()):
                raise ValueError("mask has bits set past in_features (corrupt packed mask)")
        for name, (shape, dtype) in self._fixed_shapes(nnz).items():
            t = canonical[name]
            if tuple(t.shape) != shape:
                bitmask_values = name in ("values", "qdata") and self.nm is None
                what = f" ({nnz} kept weights in the mask)" if bitmask_values else ""
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}{what}")
            if t.dtype != dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
        if self.nm is not None:
            n, m = self.nm
            pos = unpack_codes(canonical["indices"], nm_index_bits(m), self._kept_per_row())
            pos = pos.reshape(self.out_features, -1, n).to(torch.int64)
            if bool((pos >= m).any()) or (n > 1 and bool((pos[..., 1:] <= pos[..., :-1]).any())):
                raise ValueError(f"indices are not strictly increasing positions in [0, {m}) per group")
        if "values" in canonical:
            v = canonical["values"]
            if v.numel() and not bool(torch.isfinite(v).all()):
                raise ValueError("values have NaN/Inf entries")
        return nnz if self.nm is None else self.out_features * self._kept_per_row()

    def _install(self, canonical: Dict[str, Tensor], build: bool = True) -> None:
        """Validate and take ``canonical`` as this layer's stored tensors, then rebuild the runtime form."""
        canonical = {name: t.to(self.scale_dtype) if name in ("scale", "zero_point") else t
                     for name, t in canonical.items()}
        self.__dict__["_nnz"] = self._validate(canonical)
        for name in self._canonical_names:
            del self._buffers[_BUFFER_NAME.get(name, name)]
        for name, tensor in canonical.items():
            self.register_buffer(_BUFFER_NAME.get(name, name), tensor)
        self._canonical_names = tuple(canonical)
        if build:
            self._build_runtime_or_fallback()

    def canonical_state(self) -> Dict[str, Tensor]:
        """The stored tensors (``mask``/``values``/``indices``/``qdata``/``scale``/``zero_point``)."""
        return {name: self._buffers[_BUFFER_NAME.get(name, name)] for name in self._canonical_names}

    # ------------------------------------------------------------------ runtime
    @property
    def kernel(self) -> SimpleNamespace:
        """The runtime path as a named object (``layer.kernel.name``), as for :class:`QuantLinear`."""
        return SimpleNamespace(name=self.runtime)

    def _drop_runtime(self) -> None:
        self._buffers.pop("dense_weight", None)
        self.__dict__.pop("_semi", None)

    def _build_runtime(self) -> None:
        self._drop_runtime()
        if self.device.type == "meta":
            return
        if self.runtime == "dense":
            self.register_buffer("dense_weight", self.dequantize_weight(self.weight_dtype), persistent=False)
        elif self.runtime == "semi_structured":
            # Kept outside _buffers: a sparse tensor subclass cannot go through state_dict/deepcopy.
            self.__dict__["_semi"] = _to_semi_structured(self)

    def set_runtime(self, runtime: str) -> "SparseLinear":
        """Switch the runtime path (``"dense"``, ``"compressed"``, ``"semi_structured"``); returns self."""
        if runtime not in RUNTIMES:
            raise ValueError(f"SparseLinear: runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "semi_structured":
            _check_semi_structured(self)
        previous = self.runtime
        self.runtime = runtime
        try:
            self._build_runtime()
        except BaseException:
            self.runtime = previous
            self._build_runtime()
            raise
        return self

    # ------------------------------------------------------------------ maths
    def mask(self) -> Tensor:
        """Bool ``[out, in]``: True where a weight is kept."""
        if self.nm is None:
            return unpack_codes(self._buffers["mask_bits"], 1, self.in_features).bool()
        n, m = self.nm
        pos = unpack_codes(self._buffers["indices"], nm_index_bits(m), self._kept_per_row()).to(torch.int64)
        out = torch.zeros(self.out_features, self.in_features // m, m, dtype=torch.bool, device=pos.device)
        out.scatter_(2, pos.reshape(self.out_features, -1, n), True)
        return out.reshape(self.out_features, self.in_features)

    def nnz(self) -> int:
        """Number of kept weights."""
        if self.nm is not None:
            return self.out_features * self._kept_per_row()
        # Counted once when the tensors are installed: a Python int, so that a forward under
        # torch.compile (which unpacks exactly nnz codes) has no data-dependent shape.
        cached = self.__dict__.get("_nnz")
        if cached is not None:
            return cached
        return int(unpack_codes(self._buffers["mask_bits"], 1, self.in_features).sum())

    def sparsity(self) -> float:
        """Fraction of pruned weights (kept weights that happen to be 0 do not count)."""
        return 1.0 - self.nnz() / (self.in_features * self.out_features)

    def _scatter(self, kept: Tensor, fill_dtype: torch.dtype) -> Tensor:
        """Dense ``[N, K]`` with the kept entries (row-major / per-group order) in place, 0 elsewhere."""
        n_out, k = self.out_features, self.in_features
        out = torch.zeros(n_out, k, dtype=fill_dtype, device=kept.device)
        if self.nm is None:
            return out.masked_scatter_(self.mask(), kept.to(fill_dtype))
        n, m = self.nm
        pos = unpack_codes(self._buffers["indices"], nm_index_bits(m), self._kept_per_row()).to(torch.int64)
        out = out.reshape(n_out, k // m, m)
        out.scatter_(2, pos.reshape(n_out, -1, n), kept.to(fill_dtype).reshape(n_out, -1, n))
        return out.reshape(n_out, k)

    def codes(self) -> Tensor:
        """Dense uint8 codes ``[out, in]`` (0 where pruned); quantized layers only."""
        if not self.quantized:
            raise ValueError("codes() is only defined for quantized values (from_quantized)")
        bits = self.format.bits
        qdata = self._buffers["qdata"]
        kept = unpack_codes(qdata, bits, self.nnz()) if self.nm is None else \
            unpack_codes(qdata, bits, self._kept_per_row())
        return self._scatter(kept, torch.uint8)

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight ``[out, in]`` (zeros where pruned) in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.weight_dtype
        if not self.quantized:
            return self._scatter(self._buffers["values"], dtype)
        zp = self._buffers.get("zero_point")
        zp = zp.float() if zp is not None else None
        w = _dequantize_codes(self.codes(), self._buffers["scale"].float(), zp, self.format, self.group_size,
                              torch.float32)
        return torch.where(self.mask(), w, torch.zeros((), dtype=w.dtype, device=w.device)).to(dtype)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dense weight (zeros included) and the bias."""
        return dense_linear(self.dequantize_weight(dtype), self.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, "SparseLinear")
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.runtime == "semi_structured":
            semi = self.__dict__.get("_semi")
            if semi is not None and x.dtype == self.weight_dtype:
                flat = x.reshape(-1, self.in_features)
                y = F.linear(flat, semi, bias)
                return y.reshape(*x.shape[:-1], self.out_features)
            weight = self.dequantize_weight(x.dtype)
        elif self.runtime == "dense":
            weight = self._buffers["dense_weight"]
            if weight.dtype != x.dtype:
                weight = weight.to(x.dtype)
        else:
            weight = self.dequantize_weight(x.dtype)
        return F.linear(x, weight, bias)

    # ------------------------------------------------------------------ memory
    def _weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.canonical_state().values())

    def stored_bytes(self) -> int:
        """Bytes ``llmopt.save`` writes: the canonical tensors plus the bias."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self._weight_bytes() + bias

    def runtime_bytes(self) -> int:
        """Bytes held in memory: canonical tensors, bias and the runtime copy (a full dense weight with
        ``runtime="dense"``; the packed 2:4 tensor with ``"semi_structured"``)."""
        total = self.stored_bytes()
        dense = self._buffers.get("dense_weight")
        if dense is not None:
            total += dense.numel() * dense.element_size()
        semi = self.__dict__.get("_semi")
        if semi is not None:
            for attr in ("packed", "meta", "packed_t", "meta_t"):
                t = getattr(semi, attr, None)
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total

    def bits_per_weight(self) -> float:
        """Stored bits of the weight (values/codes, mask or indices, scales) per dense weight (no bias)."""
        return 8.0 * self._weight_bytes() / (self.in_features * self.out_features)

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The length of a bitmask layer's values/qdata depends on the mask: the empty layer built by
        # from_config cannot know it, so the loaded tensors are validated against the mask and taken as is.
        names = list(self._fixed_shapes(0))
        canonical = {}
        for name in names:
            key = prefix + name
            if key in state_dict:
                canonical[name] = state_dict[key].detach()
            else:
                missing_keys.append(key)
        new_bias = None
        if self.bias is not None:
            key = prefix + "bias"
            if key in state_dict:
                value = state_dict[key]
                if tuple(value.shape) != (self.out_features,):
                    error_msgs.append(f"{key}: shape {tuple(value.shape)}, expected ({self.out_features},)")
                else:
                    new_bias = value
            else:
                missing_keys.append(key)
        known = set(names) | {"bias"}
        for key in state_dict:
            if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in known:
                unexpected_keys.append(key)
        label = prefix.rstrip(".") or "SparseLinear"
        if len(canonical) == len(names):
            try:
                if not local_metadata.get("assign_to_params_buffers", False) and self.device.type != "meta":
                    # Plain load_state_dict copies to the layer's device, never aliasing the caller's tensors.
                    canonical = {k: v.to(self.device, copy=True) for k, v in canonical.items()}
                self._install(canonical)
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{label}: {exc}")
                return
        if new_bias is not None:
            if local_metadata.get("assign_to_params_buffers", False) or self.bias.device.type == "meta":
                self.bias = nn.Parameter(new_bias.detach().clone().to(self.weight_dtype), requires_grad=False)
            else:
                with torch.no_grad():
                    self.bias.copy_(new_bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for name, tensor in self.canonical_state().items():
            destination[prefix + name] = tensor

    # ------------------------------------------------------------------ copies
    def __deepcopy__(self, memo):
        # The semi-structured tensor is a derived, opaque layout: copy everything else, then rebuild it.
        semi = self.__dict__.pop("_semi", None)
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                new.__dict__[key] = copy.deepcopy(value, memo)
        finally:
            if semi is not None:
                self.__dict__["_semi"] = semi
        if semi is not None:
            new._build_runtime_or_fallback()
        return new

    # ------------------------------------------------------------------ device / dtype moves
    def _apply(self, fn, recurse=True):
        device = self.device
        probe = fn(torch.zeros((), dtype=self.weight_dtype, device=device))
        cast = probe.is_floating_point() and probe.dtype != self.weight_dtype
        canonical = {name: self._buffers.pop(_BUFFER_NAME.get(name, name)) for name in self._canonical_names}
        self._drop_runtime()
        try:
            super()._apply(fn, recurse)  # the bias
        finally:
            moved = {}
            for name, t in canonical.items():
                if name == "values" and cast:
                    # Float values follow a dtype cast, as a dense Linear's weight would; codes, masks,
                    # indices and quantization scales keep their dtype (like QuantLinear's).
                    moved[name] = fn(t)
                else:
                    moved[name] = t.to(probe.device)
            self._buffers.update({_BUFFER_NAME.get(k, k): v for k, v in moved.items()})
        if cast:
            self.weight_dtype = probe.dtype
            if self.value_dtype is not None:
                self.value_dtype = self._buffers["values"].dtype
        self._build_runtime_or_fallback()
        return self

    def _build_runtime_or_fallback(self) -> None:
        try:
            self._build_runtime()
        except (RuntimeError, ValueError) as exc:
            if self.runtime != "semi_structured":
                raise
            warnings.warn(f"SparseLinear: semi_structured runtime unavailable here ({exc}); using 'dense'",
                          stacklevel=3)
            self.runtime = "dense"
            self._build_runtime()

    # ------------------------------------------------------------------ save / load (llmopt.save)
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments (used by ``llmopt.save``)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "nm": list(self.nm) if self.nm is not None else None,
            "format": self.format.to_dict() if self.format is not None else None,
            "group_size": self.group_size,
            "scale_dtype": dtype_name(self.scale_dtype) if self.scale_dtype is not None else "bfloat16",
            "value_dtype": dtype_name(self.value_dtype) if self.value_dtype is not None else None,
            "dtype": dtype_name(self.weight_dtype),
            "runtime": self.runtime,
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any], device: Optional[Union[str, torch.device]] = None
                    ) -> "SparseLinear":
        """Empty layer from :meth:`config` output (values come later from a state dict)."""
        config = dict(config)
        known = {"in_features", "out_features", "bias", "nm", "format", "group_size", "scale_dtype",
                 "value_dtype", "dtype", "runtime"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"SparseLinear.from_config: unknown keys {unknown} (a config written for "
                             "another layer type?)")
        runtime = config.pop("runtime", "dense")
        layer = cls(**config, runtime="dense", device=device)
        # Set without building: a semi_structured layer is rebuilt (or falls back) once it has data.
        layer.runtime = runtime
        return layer

    def describe(self) -> str:
        """Short summary for reports: ``"50.0% sparse bitmask, bfloat16 values [dense]"``."""
        values = f"{self.format.name} g{self.group_size}" if self.quantized else dtype_name(self.value_dtype)
        return f"{100 * self.sparsity():.1f}% sparse {self.layout}, {values} values [{self.runtime}]"

    def extra_repr(self) -> str:
        if self.quantized:
            values = f"format={self.format.name}, group_size={self.group_size}"
        else:
            values = f"format=None, value_dtype={dtype_name(self.value_dtype)}"
        sparsity = f"{self.sparsity():.4f}" if self.device.type != "meta" else "?"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, layout={self.layout}, {values}, sparsity={sparsity}, "
                f"kernel={self.runtime}")


def _check_bias(bias: Optional[Tensor], n_out: int, where: str) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (n_out,):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{where}: bias has shape {shape}, expected ({n_out},)")
    if not bias.is_floating_point() or not bool(torch.isfinite(bias).all()):
        raise ValueError(f"{where}: bias must be a finite float tensor")


def _check_semi_structured(layer: SparseLinear) -> None:
    if layer.nm != (2, 4):
        raise ValueError(f"semi_structured runtime needs nm=(2, 4), layer has layout {layer.layout}")
    if layer.device.type != "cuda":
        raise ValueError(f"semi_structured runtime needs a CUDA device, layer is on {layer.device}")
    if layer.weight_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"semi_structured runtime needs float16/bfloat16, compute dtype is "
                         f"{layer.weight_dtype}")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise ValueError("this PyTorch has no torch.sparse.to_sparse_semi_structured")


def _to_semi_structured(layer: SparseLinear) -> Tensor:
    _check_semi_structured(layer)
    return torch.sparse.to_sparse_semi_structured(layer.dequantize_weight(layer.weight_dtype))


register_module_type(SparseLinear)
