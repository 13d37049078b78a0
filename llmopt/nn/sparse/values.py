"""How a :class:`~llmopt.nn.sparse_linear.SparseLinear` stores its kept weights.

* :class:`FloatValues`: ``values``, the kept weights in a float dtype (shape from the layout: ``[nnz]``
  for the bitmask, ``[N, K*n/m]`` for N:M).
* :class:`QuantizedValues`: ``qdata``, the codes of the kept weights only, packed at the format's bits
  (one packed run per layout run), plus ``scale`` / ``zero_point`` ``[N, G]`` exactly as
  :class:`~llmopt.nn.QuantLinear` stores them: groups along the *dense* input dimension, pruned weights
  included. The weight is ``dequantize(codes) * mask``, so pruned weights are exactly 0.

Both work with either layout (:mod:`.layouts`), which decides where the kept entries go.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ...core.checks import dtype_name
from ...core.formats import WeightFormat
from ...core.packing import pack_codes, unpack_codes
from ...core.primitives import dequantize_weight, num_groups
from .layouts import SparseLayout, TensorSpec

__all__ = ["KeptValues", "FloatValues", "QuantizedValues", "stored_spec",
           "validate_stored"]


class KeptValues:
    """The stored form of the kept weights; immutable (a dtype cast gives a new one)."""

    quantized: bool = False
    format: Optional[WeightFormat] = None
    group_size: Optional[int] = None
    scale_dtype: Optional[torch.dtype] = None
    value_dtype: Optional[torch.dtype] = None
    kept_name: str  # the stored tensor holding the kept entries (its length depends on the mask)
    # Stored tensors that follow a float dtype cast of the layer, as a dense Linear's weight would.
    cast_names: Tuple[str, ...] = ()

    def spec(self, layout: SparseLayout, nnz: int) -> TensorSpec:
        """Names, shapes and dtypes of the stored tensors for ``nnz`` kept weights (kept entries first)."""
        raise NotImplementedError

    def empty(self, layout: SparseLayout, device: torch.device) -> Dict[str, Tensor]:
        """Tensors of an empty layer: zeros, and unit scales."""
        return {name: (torch.ones if name == "scale" else torch.zeros)(shape, dtype=dtype, device=device)
                for name, (shape, dtype) in self.spec(layout, 0).items()}

    def store(self, kept: Tensor) -> Dict[str, Tensor]:
        """The stored kept-entry tensor from the kept entries in storage order."""
        raise NotImplementedError

    def normalize(self, stored: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``stored`` with the parameters in their stored dtype."""
        return stored

    def check(self, stored: Dict[str, Tensor]) -> None:
        """Content checks once names, shapes and dtypes are right (raises ValueError)."""

    def dense(self, stored: Dict[str, Tensor], layout: SparseLayout, nnz: int, dtype: torch.dtype) -> Tensor:
        """The dense weight ``[N, K]`` in ``dtype``, 0 where pruned."""
        raise NotImplementedError

    def after_cast(self, stored: Dict[str, Tensor]) -> "KeptValues":
        """The description of ``stored`` after a float dtype cast of the layer."""
        return self

    def describe(self) -> str:
        raise NotImplementedError

    def repr_fields(self) -> str:
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """This part's keys of :meth:`SparseLinear.config`."""
        return {"format": self.format.to_dict() if self.format is not None else None,
                "group_size": self.group_size,
                "scale_dtype": dtype_name(self.scale_dtype) if self.scale_dtype is not None else "bfloat16",
                "value_dtype": dtype_name(self.value_dtype) if self.value_dtype is not None else None}


class FloatValues(KeptValues):
    """The kept weights as floats of ``value_dtype``."""

    kept_name = "values"
    cast_names = ("values",)

    def __init__(self, value_dtype: torch.dtype) -> None:
        self.value_dtype = value_dtype

    def spec(self, layout: SparseLayout, nnz: int) -> TensorSpec:
        return {"values": (layout.kept_shape(nnz), self.value_dtype)}

    def store(self, kept: Tensor) -> Dict[str, Tensor]:
        return {"values": kept.to(self.value_dtype).contiguous()}

    def check(self, stored: Dict[str, Tensor]) -> None:
        values = stored["values"]
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise ValueError("values have NaN/Inf entries")

    def dense(self, stored: Dict[str, Tensor], layout: SparseLayout, nnz: int, dtype: torch.dtype) -> Tensor:
        return layout.scatter(stored["values"], stored, dtype)

    def after_cast(self, stored: Dict[str, Tensor]) -> "KeptValues":
        return FloatValues(stored["values"].dtype)

    def describe(self) -> str:
        return dtype_name(self.value_dtype)

    def repr_fields(self) -> str:
        return f"format=None, value_dtype={dtype_name(self.value_dtype)}"


class QuantizedValues(KeptValues):
    """The kept weights as packed codes of ``format`` plus per-group parameters over the dense input."""

    quantized = True
    kept_name = "qdata"

    def __init__(self, format: WeightFormat, group_size: int, scale_dtype: torch.dtype) -> None:
        self.format, self.group_size, self.scale_dtype = format, group_size, scale_dtype

    def spec(self, layout: SparseLayout, nnz: int) -> TensorSpec:
        params = ((layout.out_features, num_groups(layout.in_features, self.group_size)), self.scale_dtype)
        spec = {"qdata": (layout.kept_shape(nnz, self.format.bits), torch.uint8), "scale": params}
        if self.format.has_zero_point:
            spec["zero_point"] = params
        return spec

    def store(self, kept: Tensor) -> Dict[str, Tensor]:
        return {"qdata": pack_codes(kept, self.format.bits)}

    def normalize(self, stored: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {name: t.to(self.scale_dtype) if name in ("scale", "zero_point") else t
                for name, t in stored.items()}

    def codes(self, stored: Dict[str, Tensor], layout: SparseLayout, nnz: int) -> Tensor:
        """Dense uint8 codes ``[N, K]``, 0 where pruned."""
        kept = unpack_codes(stored["qdata"], self.format.bits, layout.run_length(nnz))
        return layout.scatter(kept, stored, torch.uint8)

    def dense(self, stored: Dict[str, Tensor], layout: SparseLayout, nnz: int, dtype: torch.dtype) -> Tensor:
        zero_point = stored.get("zero_point")
        zero_point = zero_point.float() if zero_point is not None else None
        codes = self.codes(stored, layout, nnz)
        w = dequantize_weight(codes, stored["scale"].float(), zero_point, self.format, self.group_size,
                              torch.float32)
        # A pruned weight's code is 0, which need not dequantize to 0 (affine formats): mask it out.
        return torch.where(layout.mask(stored), w, torch.zeros((), dtype=w.dtype, device=w.device)).to(dtype)

    def describe(self) -> str:
        return f"{self.format.name} g{self.group_size}"

    def repr_fields(self) -> str:
        return f"format={self.format.name}, group_size={self.group_size}"


def stored_spec(layout: SparseLayout, values: KeptValues, nnz: int) -> TensorSpec:
    """Names (in state-dict order), shapes and dtypes of everything a layer with ``layout`` and ``values``
    stores for ``nnz`` kept weights."""
    return layout.in_state_order(layout.metadata_spec(), values.spec(layout, nnz))


def validate_stored(layout: SparseLayout, values: KeptValues, stored: Dict[str, Tensor]) -> Optional[int]:
    """Check a full set of stored tensors: names, shapes, dtypes, positions and values (raises ValueError
    naming the tensor). Returns the number of kept weights (``None`` for tensors on the meta device)."""
    names = set(stored_spec(layout, values, 0))
    if set(stored) != names:
        raise ValueError(f"expected tensors {sorted(names)}, got {sorted(stored)}")
    if any(t.device.type == "meta" for t in stored.values()):
        return None  # an empty skeleton (from_config on meta): nothing to check until data arrives
    nnz = layout.count(stored)
    for name, (shape, dtype) in stored_spec(layout, values, nnz).items():
        t = stored[name]
        if tuple(t.shape) != shape:
            note = layout.kept_note(nnz) if name == values.kept_name else ""
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}{note}")
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    layout.check_positions(stored)
    values.check(stored)
    return nnz
