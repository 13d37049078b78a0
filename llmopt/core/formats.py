"""Number formats for weights, behind one small protocol.

A format turns groups of float weights into integer *codes* in ``[0, 2**bits)`` plus per-group
parameters (``scale`` and, for asymmetric formats, ``zero_point``), and back. Everything else in
llmopt (packing, ``QuantLinear``, RTN, GPTQ, save/load) only talks to this protocol, so a format
registered with :func:`register_format` works everywhere a format name is accepted.

Shapes: ``groups`` is ``[..., G, group_size]`` float32; ``scale`` and ``zero_point`` are
``[..., G, 1]`` so they broadcast against the groups.

Affine convention ("float zero point"): for ``b`` bits with mid code ``m = 2**(b-1)``::

    w = (code - m) * scale + zero_point          # asymmetric
    w = (code - m) * scale                       # symmetric (zero_point is None)

``zero_point`` is therefore the real value that the mid code stands for. This is exactly the form
PyTorch's int4 CPU kernel consumes, so the stored parameters feed the fast path bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch
from torch import Tensor

__all__ = [
    "WeightFormat",
    "AffineFormat",
    "CodebookFormat",
    "Float8E4M3Format",
    "register_format",
    "get_format",
    "list_formats",
    "NF4_LEVELS",
    "FP4_E2M1_LEVELS",
]

# Smallest scale we allow: avoids division by zero for all-zero groups while staying far below
# any real weight magnitude (and representable in bfloat16/float16).
_MIN_SCALE = 1e-8


class WeightFormat:
    """Base class and protocol of a weight number format.

    Subclasses set ``bits`` and ``has_zero_point`` and implement :meth:`choose_params`,
    :meth:`quantize` and :meth:`dequantize`. Constructor keyword arguments are the format's options;
    they are returned by :meth:`options` so the format can be saved to JSON and rebuilt.
    """

    name: str = ""  # set by register_format
    bits: int = 8
    has_zero_point: bool = False

    def options(self) -> Dict[str, Any]:
        """JSON-serialisable constructor options that rebuild this format."""
        return {}

    def choose_params(self, groups: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Pick ``(scale, zero_point)`` for each group of ``groups`` ``[..., G, gs]``."""
        raise NotImplementedError

    def quantize(self, groups: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> Tensor:
        """Map float groups to integer codes in ``[0, 2**bits)`` (uint8 tensor)."""
        raise NotImplementedError

    def dequantize(self, codes: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> Tensor:
        """Map codes back to float32 values."""
        raise NotImplementedError

    def grid(self) -> Optional[Tensor]:
        """The values a code can take for unit scale and zero offset, if the format has a fixed grid."""
        return None

    def zero_point_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        """dtype the zero points are stored in, for scales stored in ``scale_dtype`` (the same, by default)."""
        return scale_dtype

    def finalize_params(self, scale: Tensor, zero_point: Optional[Tensor], scale_dtype: torch.dtype
                        ) -> Tuple[Tensor, Optional[Tensor]]:
        """``(scale, zero_point)`` from :meth:`choose_params` (float32) as they are stored: rounded to
        ``scale_dtype`` (and :meth:`zero_point_dtype`). Codes are then chosen for these stored values."""
        zero = zero_point.to(self.zero_point_dtype(scale_dtype)) if zero_point is not None else None
        return scale.to(scale_dtype), zero

    def to_dict(self) -> Dict[str, Any]:
        """``{"name": ..., **options}``: enough to rebuild the format with :func:`get_format`."""
        return {"name": self.name, **self.options()}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.name!r}{', ' + opts if opts else ''})"

    def __eq__(self, other: object) -> bool:
        # Class and bits too: formats built directly share the empty name, and AffineFormat(3) must
        # not equal AffineFormat(2) (kernel plans and probe caches are keyed by format).
        return (isinstance(other, WeightFormat) and type(self) is type(other) and self.bits == other.bits
                and self.to_dict() == other.to_dict())

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.bits, tuple(sorted(self.to_dict().items()))))


# How an asymmetric affine grid stores its offset (``AffineFormat(zero_point=...)``):
# "float": any float, the value of the mid code, in the scale dtype (llmopt's default, HQQ's);
# "int": an integer zero point on the code grid, ``w = (code - zp) * scale`` (GPTQ/AWQ checkpoints,
#        compressed-tensors);
# "min": the value of code 0 rounded to the scale dtype, ``w = code * scale + min`` (GGUF Q4_1/Q5_1).
# "int" and "min" keep the zero point in float32, where ``(mid - zp) * scale`` and ``min + mid * scale``
# are exact for fp16/bf16 scales, so the stored parameters map bit for bit onto those formats.
ZERO_POINT_MODES = ("float", "int", "min")


class AffineFormat(WeightFormat):
    """Uniform integer grid of ``bits`` bits, asymmetric (min/max) by default or symmetric (absmax).

    ``zero_point`` (asymmetric only) is how the offset is stored: ``"float"`` (default), ``"int"`` or
    ``"min"``; see :data:`ZERO_POINT_MODES`.

    ``full_range`` (symmetric only): use all ``2**bits`` codes, as llama.cpp's Q4_0 does. The weight of
    largest magnitude in a group lands on the lowest code, ``-2**(bits-1)``, so the scale is
    ``-w_extreme / 2**(bits-1)`` (negative when that weight is positive) and the step is
    ``absmax / 2**(bits-1)`` instead of ``absmax / (2**(bits-1) - 1)``: 12.5% finer at 4 bits.
    """

    def __init__(self, bits: int, symmetric: bool = False, zero_point: str = "float", full_range: bool = False):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ValueError(f"affine format: bits must be an integer in 1..8, got {bits!r}")
        if symmetric and bits < 2:
            raise ValueError("affine format: symmetric needs at least 2 bits")
        if zero_point not in ZERO_POINT_MODES:
            raise ValueError(f"affine format: zero_point must be one of {ZERO_POINT_MODES}, got {zero_point!r}")
        if symmetric and zero_point != "float":
            raise ValueError(f"affine format: zero_point={zero_point!r} needs an asymmetric format "
                             "(a symmetric grid has no zero point)")
        if full_range and not symmetric:
            raise ValueError("affine format: full_range=True needs symmetric=True (an asymmetric grid "
                             "already uses every code)")
        self.full_range = bool(full_range)
        self.bits = bits
        self.symmetric = bool(symmetric)
        self.has_zero_point = not self.symmetric
        self.zero_point_mode = zero_point

    def zero_point_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return scale_dtype if self.zero_point_mode == "float" else torch.float32

    def finalize_params(self, scale: Tensor, zero_point: Optional[Tensor], scale_dtype: torch.dtype
                        ) -> Tuple[Tensor, Optional[Tensor]]:
        if zero_point is None or self.zero_point_mode == "float":
            return super().finalize_params(scale, zero_point, scale_dtype)
        stored = scale.to(scale_dtype)
        s = stored.to(torch.float32)
        lo = zero_point.to(torch.float32) - self.mid * scale.to(torch.float32)  # the group's minimum
        if self.zero_point_mode == "int":
            # The code that stands for 0.0, so w = (code - zp) * s; (mid - zp) * s is exact in float32.
            zp = torch.round(-lo / s).clamp_(0, self.qmax)
            return stored, (self.mid - zp) * s
        low = lo.to(scale_dtype).to(torch.float32)  # "min": code 0's value, representable in scale_dtype
        return stored, low + self.mid * s

    @property
    def mid(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def options(self) -> Dict[str, Any]:
        options: Dict[str, Any] = {"symmetric": True} if self.symmetric else {}
        if self.full_range:
            options["full_range"] = True
        if self.zero_point_mode != "float":
            options["zero_point"] = self.zero_point_mode
        return options

    def choose_params(self, groups: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        if self.symmetric and self.full_range:
            extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))
            scale = -extreme / self.mid
            # A group of zeros keeps a tiny positive scale, so the grid stays well defined.
            return torch.where(scale.abs() >= _MIN_SCALE, scale, torch.full_like(scale, _MIN_SCALE)), None
        if self.symmetric:
            absmax = groups.abs().amax(dim=-1, keepdim=True)
            scale = (absmax / (self.mid - 1)).clamp_min(_MIN_SCALE)
            return scale, None
        lo = groups.amin(dim=-1, keepdim=True)
        hi = groups.amax(dim=-1, keepdim=True)
        if self.zero_point_mode == "int":
            # An integer zero point is a code, so 0.0 must lie on the grid: the range includes it (as
            # GPTQ/AWQ do), else a group far from 0 would clamp its zero point and lose its values.
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / self.qmax).clamp_min(_MIN_SCALE)
        # The mid code stands for lo + mid * scale, so code 0 lands on lo and code qmax on hi.
        zero_point = lo + self.mid * scale
        overflow = ~(torch.isfinite(scale) & torch.isfinite(zero_point))
        if bool(overflow.any()):
            # Finite weights near +-3e38: hi - lo (or mid * scale) overflowed float32 although the
            # parameters themselves fit. Redo those groups in float64; the other groups keep their
            # float32 parameters bit for bit. A scale that still does not fit float32 (1-bit formats)
            # stays Inf and is refused by check_params_finite.
            lo64, hi64 = lo.to(torch.float64), hi.to(torch.float64)
            scale64 = ((hi64 - lo64) / self.qmax).clamp_min(_MIN_SCALE)
            zero64 = lo64 + self.mid * scale64
            scale = torch.where(overflow, scale64.to(scale.dtype), scale)
            zero_point = torch.where(overflow, zero64.to(zero_point.dtype), zero_point)
        return scale, zero_point

    def quantize(self, groups: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> Tensor:
        # One temporary, updated in place: this runs over every weight of the model.
        codes = groups - zero_point if zero_point is not None else groups.clone()
        codes.div_(scale).round_().add_(self.mid).clamp_(0, self.qmax)
        return codes.to(torch.uint8)

    def dequantize(self, codes: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> Tensor:
        values = (codes.to(torch.float32) - self.mid) * scale.to(torch.float32)
        if zero_point is not None:
            values = values + zero_point.to(torch.float32)
        return values

    def grid(self) -> Tensor:
        return torch.arange(1 << self.bits, dtype=torch.float32) - self.mid


class CodebookFormat(WeightFormat):
    """A fixed table of levels in ``[-1, 1]`` scaled by each group's absolute maximum (NF4, FP4).

    Subclasses only need ``levels`` (sorted, ``2**bits`` entries, largest magnitude 1).
    """

    levels: Tuple[float, ...] = ()

    def __init__(self) -> None:
        table = torch.tensor(self.levels, dtype=torch.float32)
        if table.numel() == 0 or table.numel() > 256 or table.numel() & (table.numel() - 1):
            raise ValueError(f"{type(self).__name__}: levels must have 2**bits entries, got {table.numel()}")
        if not torch.all(table[1:] >= table[:-1]):
            raise ValueError(f"{type(self).__name__}: levels must be sorted in increasing order")
        self.bits = int(math.log2(table.numel()))
        self.has_zero_point = False
        self._table = table
        self._norm = float(table.abs().max())
        # Midpoints between neighbours: a value's code is the number of midpoints below it.
        self._edges = (table[1:] + table[:-1]) / 2

    def choose_params(self, groups: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        absmax = groups.abs().amax(dim=-1, keepdim=True)
        return (absmax / self._norm).clamp_min(_MIN_SCALE), None

    def quantize(self, groups: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> Tensor:
        normalized = (groups / scale).contiguous()
        return torch.bucketize(normalized, self._edges.to(groups.device)).to(torch.uint8)

    def dequantize(self, codes: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> Tensor:
        table = self._table.to(codes.device)
        return table[codes.long()] * scale.to(torch.float32)

    def grid(self) -> Tensor:
        return torch.unique(self._table)


# NF4 levels (QLoRA paper, appendix): quantiles of a standard normal, normalized to [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 E2M1 (OCP microscaling spec): sign, 2 exponent bits, 1 mantissa bit; magnitudes
# {0, 0.5, 1, 1.5, 2, 3, 4, 6}, normalized by 6. Like the hardware format it has both +0 and -0,
# so 16 codes carry 15 distinct values.
FP4_E2M1_LEVELS = tuple(
    v / 6.0 for v in (-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
)


class NF4Format(CodebookFormat):
    """4-bit NormalFloat (QLoRA): levels at normal quantiles, absmax scaling per group."""

    levels = NF4_LEVELS


class FP4E2M1Format(CodebookFormat):
    """4-bit float E2M1 with absmax scaling per group (scale maps the group max to 6)."""

    levels = FP4_E2M1_LEVELS


class Float8E4M3Format(WeightFormat):
    """8-bit float E4M3 (``torch.float8_e4m3fn``) with absmax scaling (group max maps to 448)."""

    bits = 8
    has_zero_point = False
    _FP8_MAX = 448.0

    def choose_params(self, groups: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        absmax = groups.abs().amax(dim=-1, keepdim=True)
        return (absmax / self._FP8_MAX).clamp_min(_MIN_SCALE), None

    def quantize(self, groups: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> Tensor:
        scaled = (groups / scale).clamp(-self._FP8_MAX, self._FP8_MAX)
        return scaled.to(torch.float8_e4m3fn).view(torch.uint8)

    def dequantize(self, codes: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> Tensor:
        values = codes.contiguous().view(torch.float8_e4m3fn).to(torch.float32)
        return values * scale.to(torch.float32)

    def grid(self) -> Tensor:
        values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
        return torch.unique(values[torch.isfinite(values)])


# --------------------------------------------------------------------------------------------
# Registry

_FormatFactory = Callable[..., WeightFormat]
_FORMATS: Dict[str, Tuple[_FormatFactory, Dict[str, Any]]] = {}


def register_format(name: str, **defaults: Any) -> Callable[[Type[WeightFormat]], Type[WeightFormat]]:
    """Class decorator: make a :class:`WeightFormat` subclass available under ``name``.

    ``defaults`` are constructor arguments bound to this name (``register_format("int4", bits=4)``).
    Registering a name twice is an error, so two plug-ins cannot silently shadow each other.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"format name must be a non-empty string, got {name!r}")

    def decorator(cls: Type[WeightFormat]) -> Type[WeightFormat]:
        if not (isinstance(cls, type) and issubclass(cls, WeightFormat)):
            raise TypeError(f"register_format({name!r}) expects a WeightFormat subclass, got {cls!r}")
        if name in _FORMATS:
            raise ValueError(f"format {name!r} is already registered")
        _FORMATS[name] = (cls, dict(defaults))
        return cls

    return decorator


def unregister_format(name: str) -> None:
    """Remove a registered format (for tests and plug-in reloads)."""
    _FORMATS.pop(name, None)


def list_formats() -> list:
    """Names of all registered formats."""
    return sorted(_FORMATS)


def _registered_name_of(fmt: WeightFormat) -> str:
    """Name under which an equivalent format is registered (for instances built without get_format)."""
    for name, (factory, defaults) in _FORMATS.items():
        if factory is not type(fmt):
            continue
        try:
            candidate = factory(**{**defaults, **fmt.options()})
        except (TypeError, ValueError):
            continue
        if candidate.options() == fmt.options() and candidate.bits == fmt.bits:
            return name
    raise ValueError(
        f"format {fmt!r} is not registered under any name, so it could not be saved and reloaded; "
        f"register its class with llmopt.register_format(name) and build it with get_format(name)"
    )


def get_format(spec: "str | WeightFormat | Dict[str, Any]", **options: Any) -> WeightFormat:
    """Build a format from a name (plus options), a ``to_dict()`` dict, or pass an instance through."""
    if isinstance(spec, WeightFormat):
        if options:
            raise ValueError(f"options {sorted(options)} given together with a format instance {spec!r}")
        if not spec.name:
            spec.name = _registered_name_of(spec)
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        return get_format(name, **spec, **options)
    if not isinstance(spec, str) or spec not in _FORMATS:
        raise ValueError(f"unknown weight format {spec!r}; registered formats: {', '.join(list_formats())}")
    factory, defaults = _FORMATS[spec]
    try:
        fmt = factory(**{**defaults, **options})
    except TypeError as exc:
        raise ValueError(f"format {spec!r} does not accept options {sorted(options)}: {exc}") from None
    fmt.name = spec
    return fmt


register_format("int8", bits=8)(AffineFormat)
register_format("int4", bits=4)(AffineFormat)
register_format("int3", bits=3)(AffineFormat)
register_format("int2", bits=2)(AffineFormat)
register_format("nf4")(NF4Format)
register_format("fp4_e2m1")(FP4E2M1Format)
register_format("fp8_e4m3")(Float8E4M3Format)
