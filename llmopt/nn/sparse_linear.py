"""``SparseLinear``: a pruned linear layer that stores only its kept weights.

The layer composes three independent choices, each in :mod:`llmopt.nn.sparse`:

* the **layout** (:mod:`~llmopt.nn.sparse.layouts`): ``bitmask`` (any mask; ``mask`` uint8
  ``[N, ceil(K/8)]``, one bit per weight, kept weights in row-major order) or **N:M** (``nm=(n, m)``:
  exactly ``n`` kept in every group of ``m`` inputs; ``indices`` uint8, the in-group position of each
  kept weight in ``ceil(log2 m)`` bits, 2 for 2:4; no bitmask);
* the **kept values** (:mod:`~llmopt.nn.sparse.values`): float ``values`` (``[nnz]`` for the bitmask,
  ``[N, K*n/m]`` for N:M), or with :meth:`SparseLinear.from_quantized` ``qdata`` (the codes of the kept
  weights only, packed at the format's bits) plus ``scale`` / ``zero_point`` ``[N, G]`` exactly as
  :class:`~llmopt.nn.QuantLinear` stores them (groups along the *dense* input, pruned weights included);
* the **runtime** (:mod:`~llmopt.nn.sparse.runtimes`, ``runtime=``, switch with
  :meth:`SparseLinear.set_runtime`): ``"dense"`` (default: a dense copy held for ``F.linear``, as fast
  as dense and *not* smaller in memory, which :meth:`~SparseLinear.runtime_bytes` reports),
  ``"compressed"`` (the dense weight rebuilt in every forward: memory saving, slower) or
  ``"semi_structured"`` (CUDA, ``nm=(2, 4)``, float16/bfloat16: PyTorch's 2:4 sparse kernels, the only
  runtime that can be faster than dense).

Those stored tensors are what ``state_dict()`` and ``llmopt.save`` see. Bytes per weight (bias excluded)
at 50% sparsity: bitmask ``1/8 + 0.5 * value_bytes``; 2:4 ``0.5 * value_bytes + 0.5 * 2/8``. With
bfloat16 values both are 1.125 bytes = 0.5625x dense bf16.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..core.checks import check_linear_input, check_linear_weight, dtype_name, parse_dtype
from ..core.formats import WeightFormat, get_format
from ..core.primitives import check_quantized, quantize_weight, resolve_group_size
from ..core.scheme import WeightQuant
from .sparse.layouts import bool_mask, make_layout, nm_index_bits
from .sparse.runtimes import RUNTIMES, RuntimeSwitch
from .sparse.storage import StoredTensorsLinear, check_bias
from .sparse.values import (
    FloatValues,
    KeptValues,
    QuantizedValues,
    stored_spec,
    validate_stored,
)

__all__ = ["SparseLinear", "RUNTIMES", "nm_index_bits"]

FormatSpec = Union[str, WeightFormat, Dict[str, Any]]
DtypeSpec = Union[str, torch.dtype]
_CONFIG_KEYS = frozenset({"in_features", "out_features", "bias", "nm", "format", "group_size", "scale_dtype",
                          "value_dtype", "dtype", "runtime"})


def _part(part: str, attr: str, doc: str) -> property:
    """A read-only attribute of one of the layer's parts (its layout or its kept values)."""
    return property(lambda self: getattr(getattr(self, part), attr), doc=doc)


def _kept_values(format: Optional[FormatSpec], group_size: Optional[int], scale_dtype: DtypeSpec,
                 value_dtype: Optional[DtypeSpec], dtype: torch.dtype, in_features: int) -> KeptValues:
    """Quantized values for a ``format``, else float values (of ``value_dtype``, default ``dtype``)."""
    if format is not None:
        return QuantizedValues(get_format(format), resolve_group_size(group_size, in_features),
                               parse_dtype(scale_dtype))
    if group_size is not None:
        raise ValueError("SparseLinear: group_size only applies to quantized values (format=...)")
    return FloatValues(parse_dtype(value_dtype) if value_dtype is not None else dtype)


class SparseLinear(RuntimeSwitch, StoredTensorsLinear):
    """Linear layer holding a pruned weight in compressed form (see the module docs for the parts).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        nm: ``(n, m)`` for the N:M layout, ``None`` for the bitmask layout.
        format, group_size, scale_dtype: quantized values (``format`` a name/spec from
            :mod:`llmopt.core.formats`); ``format=None`` stores float values.
        value_dtype: dtype of float values (default: ``dtype``).
        dtype: compute dtype: the dense weight, bias and :meth:`dequantize_weight` default.
        runtime: ``"dense"``, ``"compressed"`` or ``"semi_structured"``.

    The constructor builds an empty layer (every weight pruned, or for N:M the first ``n`` of each
    group kept with value 0); :meth:`from_dense`, :meth:`from_quantized` or a state dict fill it.
    """

    # The packed bitmask is stored as "mask" but held in the buffer "mask_bits": "mask" is the method.
    buffer_names = {"mask": "mask_bits"}

    nm = _part("_layout", "nm", "``(n, m)`` of the N:M layout; ``None`` for the bitmask layout.")
    layout = _part("_layout", "name", '``"bitmask"`` or ``"n:m"`` (e.g. ``"2:4"``).')
    quantized = _part("_values", "quantized", "Whether the kept weights are stored as codes.")
    format = _part("_values", "format", "Format of the codes (``None`` for float values).")
    group_size = _part("_values", "group_size", "Inputs per quantization group (``None`` for float values).")
    scale_dtype = _part("_values", "scale_dtype", "dtype of scale/zero_point (``None`` for float values).")
    value_dtype = _part("_values", "value_dtype", "dtype of float values (``None`` when quantized).")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 nm: Optional[Tuple[int, int]] = None, format: Optional[FormatSpec] = None,
                 group_size: Optional[int] = None, scale_dtype: DtypeSpec = torch.bfloat16,
                 value_dtype: Optional[DtypeSpec] = None, dtype: DtypeSpec = torch.float32,
                 runtime: str = "dense", device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        for label, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SparseLinear: {label} must be a positive integer, got {value!r}")
        self.runtime = runtime
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._layout = make_layout(self.out_features, self.in_features, nm)
        self.weight_dtype = parse_dtype(dtype)
        self._values = _kept_values(format, group_size, scale_dtype, value_dtype, self.weight_dtype,
                                    self.in_features)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=self.weight_dtype, device=device),
                                  requires_grad=False) if bias else None)
        empty = self._layout.empty_metadata(device), self._values.empty(self._layout, device)
        self._install(self._layout.in_state_order(*empty), build=device.type != "meta")

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
        if not isinstance(weight, Tensor):
            raise TypeError(f"SparseLinear: weight must be a tensor, got {type(weight).__name__}")
        where = f"SparseLinear.from_dense [{tuple(weight.shape)}]"
        try:
            check_linear_weight(weight)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        n_out, k = weight.shape
        mask = bool_mask(mask, (n_out, k), where).to(weight.device)
        value_dtype = dtype if dtype is not None else weight.dtype
        layer = cls(k, n_out, bias=bias is not None, nm=nm, value_dtype=value_dtype, dtype=weight.dtype,
                    runtime=runtime, device="meta")
        return layer._fill(weight.detach(), mask, bias, where)

    @classmethod
    def from_quantized(cls, codes: Tensor, scale: Tensor, zero_point: Optional[Tensor], mask: Tensor,
                       bias: Optional[Tensor] = None, *, format: FormatSpec, group_size: Optional[int],
                       scale_dtype: DtypeSpec = torch.bfloat16, nm: Optional[Tuple[int, int]] = None,
                       dtype: DtypeSpec = torch.float32, runtime: str = "dense") -> "SparseLinear":
        """Layer from unpacked codes ``[N, K]`` on ``format``'s grid and parameters ``[N, G]`` (groups along
        K as :class:`QuantLinear`); only the codes where ``mask`` is True are stored. The layer's weight is
        ``dequantize(codes) * mask``: pruned weights are exactly 0. ``dtype`` is the compute dtype."""
        fmt = get_format(format)
        where = f"SparseLinear.from_quantized [{tuple(codes.shape)}]"
        group_size = check_quantized(codes, scale, zero_point, fmt, group_size, where)
        n_out, k = codes.shape
        mask = bool_mask(mask, (n_out, k), where).to(codes.device)
        layer = cls(k, n_out, bias=bias is not None, nm=nm, format=fmt, group_size=group_size,
                    scale_dtype=scale_dtype, dtype=dtype, runtime=runtime, device="meta")
        params = {name: t.detach().to(layer.scale_dtype).contiguous()
                  for name, t in (("scale", scale), ("zero_point", zero_point)) if t is not None}
        return layer._fill(codes.to(torch.uint8), mask, bias, where, params)

    def _fill(self, source: Tensor, mask: Tensor, bias: Optional[Tensor], where: str,
              params: Optional[Dict[str, Tensor]] = None) -> "SparseLinear":
        """Store the entries of ``source`` (weights or codes ``[N, K]``) where ``mask`` is True, the
        quantization ``params`` if any, and ``bias``."""
        check_bias(bias, self.out_features, where)
        kept, metadata = self._layout.split(source, mask, where)
        self._set_bias(bias)
        self._install(self._layout.in_state_order(metadata, {**self._values.store(kept), **(params or {})}))
        return self

    def quantize(self, format: Union[FormatSpec, WeightQuant] = "int4", group_size: Optional[int] = 128, *,
                 scale_dtype: DtypeSpec = torch.bfloat16) -> "SparseLinear":
        """A new layer with the same mask and layout whose kept weights are quantized by round to nearest
        (sparsity + int4). Group parameters are chosen over the dense groups, pruned zeros included.
        ``format`` may be a whole :class:`~llmopt.WeightQuant` (its group size and scale dtype too)."""
        if self.quantized:
            raise ValueError(f"SparseLinear: values are already quantized ({self.format.name})")
        if isinstance(format, WeightQuant):
            format, group_size, scale_dtype = format.weight_format(), format.group_size, format.scale_dtype
        fmt = get_format(format)
        q = quantize_weight(self.dequantize_weight(torch.float32), fmt, group_size, parse_dtype(scale_dtype))
        bias = self.bias.detach() if self.bias is not None else None
        return SparseLinear.from_quantized(
            q.codes, q.scale, q.zero_point, self.mask(), bias, format=fmt, group_size=q.group_size,
            scale_dtype=scale_dtype, nm=self.nm, dtype=self.weight_dtype, runtime=self.runtime)

    # ------------------------------------------------------------------ stored tensors (StoredTensorsLinear)
    def _spec_names(self) -> List[str]:
        return list(stored_spec(self._layout, self._values, 0))

    def _normalize(self, canonical: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return self._values.normalize(canonical)

    def _validate(self, canonical: Dict[str, Tensor]) -> Optional[int]:
        return validate_stored(self._layout, self._values, canonical)

    def _follows_cast(self, name: str) -> bool:
        return name in self._values.cast_names

    def _after_cast(self, dtype: torch.dtype, canonical: Dict[str, Tensor]) -> None:
        super()._after_cast(dtype, canonical)
        self._values = self._values.after_cast(canonical)

    # ------------------------------------------------------------------ maths
    def mask(self) -> Tensor:
        """Bool ``[out, in]``: True where a weight is kept."""
        return self._layout.mask(self.canonical_state())

    def nnz(self) -> int:
        """Number of kept weights."""
        cached = self.__dict__.get("_nnz")  # counted when the tensors were installed
        return cached if cached is not None else self._layout.count(self.canonical_state())

    def sparsity(self) -> float:
        """Fraction of pruned weights (kept weights that happen to be 0 do not count)."""
        return 1.0 - self.nnz() / (self.in_features * self.out_features)

    def codes(self) -> Tensor:
        """Dense uint8 codes ``[out, in]`` (0 where pruned); quantized layers only."""
        if not self.quantized:
            raise ValueError("codes() is only defined for quantized values (from_quantized)")
        return self._values.codes(self.canonical_state(), self._layout, self.nnz())

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight ``[out, in]`` (zeros where pruned) in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.weight_dtype
        return self._values.dense(self.canonical_state(), self._layout, self.nnz(), dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, "SparseLinear")
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return self._runtime.forward(self, x, bias)

    # ------------------------------------------------------------------ save / load, reports
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments (used by ``llmopt.save``)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "nm": list(self.nm) if self.nm is not None else None,
                **self._values.config(),
                "dtype": dtype_name(self.weight_dtype), "runtime": self.runtime}

    @classmethod
    def from_config(cls, config: Dict[str, Any], device: Optional[Union[str, torch.device]] = None
                    ) -> "SparseLinear":
        """Empty layer from :meth:`config` output (values come later from a state dict)."""
        config = dict(config)
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"SparseLinear.from_config: unknown keys {unknown} (a config written for "
                             "another layer type?)")
        runtime = config.pop("runtime", "dense")
        layer = cls(**config, runtime="dense", device=device)
        layer.runtime = runtime  # not built yet: a semi_structured layer is built (or falls back) with data
        return layer

    def describe(self) -> str:
        """Short summary for reports: ``"50.0% sparse bitmask, bfloat16 values [dense]"``."""
        values = self._values.describe()
        return f"{100 * self.sparsity():.1f}% sparse {self.layout}, {values} values [{self.runtime}]"

    def extra_repr(self) -> str:
        sparsity = f"{self.sparsity():.4f}" if self.device.type != "meta" else "?"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, layout={self.layout}, {self._values.repr_fields()}, "
                f"sparsity={sparsity}, kernel={self.runtime}")
