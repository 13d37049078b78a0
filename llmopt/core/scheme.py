"""One weight quantization scheme as a value object: :class:`WeightQuant`.

Every method that quantizes weights (RTN, GPTQ, AWQ, HQQ, SmoothQuant, quantization + low rank,
SparseGPT with a format, ...) asks for the same five things: a registered number format, the group
size, whether the affine grid is symmetric, the dtype the scales are stored in, and the matmul kernel.
:class:`WeightQuant` holds them, checks them once on construction (each error names the field), and
offers what the methods need: the :class:`~llmopt.core.formats.WeightFormat` instance, the scale
``torch.dtype``, the group size of a layer, a label and a JSON round trip::

    scheme = WeightQuant("int4", 64, symmetric=True)
    scheme.weight_format()          # AffineFormat('int4', symmetric=True)
    scheme.resolve_group_size(40)   # 40: a group never exceeds the row
    scheme.label()                  # 'int4 sym g64'
    WeightQuant.from_dict(scheme.to_dict()) == scheme

The kernel is checked here as a non-empty string only: kernels live one layer up, so whether the name
is a registered kernel is checked by the method configs (:mod:`llmopt.methods.quantized`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .checks import dtype_name
from .formats import ZERO_POINT_MODES, WeightFormat, get_format
from .primitives import parse_scale_dtype, resolve_group_size

__all__ = ["WeightQuant"]

# Group sizes are checked against a row wider than any real layer: only the value's type and sign matter.
_ANY_WIDTH = 1 << 30


def _check_format(value: Any) -> Any:
    if isinstance(value, (WeightFormat, dict)):
        raise ValueError(f"format must be a registered format name such as 'int4' (a scheme is saved "
                         f"as JSON), got {value!r}; for a WeightFormat use WeightQuant.from_format(fmt)")
    return value  # the name itself is checked when the format is built, together with its options


def _check_group_size(value: Any) -> Any:
    resolve_group_size(value, _ANY_WIDTH)  # "group_size must be a positive integer, -1 or None ..."
    return value


def _optional_bool(name: str) -> Callable[[Any], Any]:
    """The check of a format flag that is True, False or None (the format's default)."""
    def check(value: Any) -> Any:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True, False or None (the format's default), got {value!r}")
        return value
    return check


_check_symmetric = _optional_bool("symmetric")
_check_full_range = _optional_bool("full_range")


def _check_zero_point(value: Any) -> Any:
    if value is not None and value not in ZERO_POINT_MODES:
        raise ValueError(f"zero_point must be None (the format's default, 'float') or one of {ZERO_POINT_MODES}, "
                         f"got {value!r}")
    return value


def _check_scale_dtype(value: Any) -> str:
    return dtype_name(parse_scale_dtype(value))  # stored by name, so the scheme stays JSON


def _check_kernel(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError(f"kernel must be 'auto' or a kernel name (a non-empty string), got {value!r}")
    return value


def _option(default: Any, check: Callable[[Any], Any], *, format_option: bool = False,
            omit_if_default: bool = False) -> Any:
    """A :class:`WeightQuant` field: its default, the function that checks (and normalises) a value,
    whether it is a constructor option of the format (passed to ``get_format`` unless ``None``), and
    whether ``to_dict`` leaves it out at its default (a field added later, so earlier dicts keep their
    bytes; method configs read the same ``omit_if_default`` metadata)."""
    return dataclasses.field(default=default, metadata={"check": check, "format_option": format_option,
                                                        "omit_if_default": omit_if_default})


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How the weights of a layer are quantized; checked on construction, immutable, JSON round-trip.

    Args:
        format: a registered format name (``"int4"``, ``"int8"``, ``"nf4"``, ``"fp8_e4m3"``, ...;
            see :func:`~llmopt.core.formats.list_formats`).
        group_size: columns sharing one scale; ``None`` or ``-1`` for one scale per output row.
        symmetric: for formats that take the option (the affine ``int*`` formats); ``None`` keeps the
            format's default (asymmetric). Any other format refuses ``True`` and ``False``.
        scale_dtype: dtype of the stored scales / zero points, ``"float32"``, ``"float16"`` or
            ``"bfloat16"`` (a ``torch.dtype`` is accepted and stored by name).
        kernel: ``"auto"`` or a kernel name; :mod:`llmopt.methods.quantized` checks it is registered.
        zero_point: asymmetric affine formats only: how the offset is stored. ``None`` (the format's
            default, ``"float"``), ``"int"`` (an integer zero point on the code grid, as GPTQ/AWQ
            checkpoints and compressed-tensors store it) or ``"min"`` (the value of code 0 in the scale
            dtype, GGUF's Q4_1); see :data:`llmopt.core.formats.ZERO_POINT_MODES`.
        full_range: symmetric affine formats only: use every code, the group's largest-magnitude weight on
            the lowest one (llama.cpp's Q4_0 grid, a 12.5% finer step at 4 bits); ``None``: no.

    Every error is a ``ValueError`` naming the field. Equality is field by field (``symmetric=False``
    and ``symmetric=None`` build the same format but are different requests).

    Adding an option (e.g. an integer zero-point mode, or exact GGUF parameters) is one line here:
    a field declared with ``_option(default, check)``, where ``check`` raises a ``ValueError`` naming
    the field and returns the (normalised) value, and ``format_option=True`` if the value is passed to
    the format's constructor. The default must mean "as before", so saved dicts without the key still
    load. ``to_dict``, ``from_dict``, ``replace``, ``from_format`` and the method configs
    (:class:`~llmopt.methods.quantized.QuantizesWeights`, which passes on every config field named
    like a scheme field) follow the field list; only :meth:`label` and the code that applies the
    scheme need to be taught what the option means.
    """

    format: str = _option("int4", _check_format)
    group_size: Optional[int] = _option(128, _check_group_size)
    symmetric: Optional[bool] = _option(None, _check_symmetric, format_option=True)
    scale_dtype: str = _option("bfloat16", _check_scale_dtype)
    kernel: str = _option("auto", _check_kernel)
    zero_point: Optional[str] = _option(None, _check_zero_point, format_option=True, omit_if_default=True)
    full_range: Optional[bool] = _option(None, _check_full_range, format_option=True, omit_if_default=True)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = self.check_field(field.name, getattr(self, field.name))
            if value is not getattr(self, field.name):
                object.__setattr__(self, field.name, value)  # normalised (a torch.dtype stored by name)
        self.weight_format()  # an unknown format, or an option it does not take, fails here

    @classmethod
    def check_field(cls, name: str, value: Any) -> Any:
        """Check one field on its own (not its combination with the format); returns the normalised value.

        For configs that carry some scheme fields without a format (SparseGPT without quantization).
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise ValueError(f"WeightQuant has no field {name!r}; fields: {list(fields)}")
        return fields[name].metadata["check"](value)

    @classmethod
    def field_names(cls) -> tuple:
        """The scheme's fields in order: ``format, group_size, symmetric, scale_dtype, kernel, zero_point, full_range``."""
        return tuple(f.name for f in dataclasses.fields(cls))

    # ------------------------------------------------------------------ what methods need
    def format_options(self) -> Dict[str, Any]:
        """The options this scheme passes to the format's constructor (``{"symmetric": True}``, or ``{}``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["format_option"] and getattr(self, f.name) is not None}

    def weight_format(self) -> WeightFormat:
        """A new :class:`~llmopt.core.formats.WeightFormat` instance for this scheme."""
        return get_format(self.format, **self.format_options())

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        """``scale_dtype`` as a ``torch.dtype``."""
        return parse_scale_dtype(self.scale_dtype)

    def resolve_group_size(self, in_features: int) -> int:
        """The group size for a layer with ``in_features`` columns (per-channel: ``in_features``)."""
        return resolve_group_size(self.group_size, in_features)

    def group_label(self) -> str:
        """``"g64"``, or ``"channel"`` for ``group_size=None`` (``-1`` shows as ``"g-1"``, as it always
        has in the methods' labels)."""
        return "channel" if self.group_size is None else f"g{self.group_size}"

    def label(self) -> str:
        """Short text for reports: ``"int4 sym g64"``, ``"nf4 g64"``, ``"int8 channel"``."""
        zero = f" zp={self.zero_point}" if self.zero_point not in (None, "float") else ""
        zero += " full" if self.full_range else ""
        return f"{self.format}{' sym' if self.symmetric else ''}{zero} {self.group_label()}"

    # ------------------------------------------------------------------ building and saving
    def replace(self, **changes: Any) -> "WeightQuant":
        """A copy with ``changes`` applied (checked like a new scheme)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> Dict[str, Any]:
        """``{"format": ..., "group_size": ..., ...}``, every field in order; JSON-serialisable.
        Fields added later (``zero_point``, ``full_range``) are written only when set, so earlier dicts
        stay as they were."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.metadata["omit_if_default"] and getattr(self, f.name) == f.default)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WeightQuant":
        """Rebuild a scheme from :meth:`to_dict` output; missing keys take their defaults."""
        if not isinstance(data, Mapping):
            raise ValueError(f"WeightQuant.from_dict expects a mapping, got {type(data).__name__}")
        unknown = sorted(map(str, set(data) - set(cls.field_names())))
        if unknown:
            raise ValueError(f"WeightQuant has no field(s) {unknown}; fields: {list(cls.field_names())}")
        return cls(**data)

    @classmethod
    def from_format(cls, fmt: Union[str, WeightFormat, Dict[str, Any]], group_size: Optional[int] = 128,
                    **fields: Any) -> "WeightQuant":
        """The scheme of a format given as a name, a ``to_dict()`` dict or a :class:`WeightFormat` instance
        (its options become the scheme's format options, e.g. ``symmetric``); ``fields`` are the others
        (``scale_dtype=...``, ``kernel=...``). A format with options a scheme cannot carry is refused."""
        fmt = get_format(fmt)
        options = dict(fmt.options())
        for field in dataclasses.fields(cls):
            if field.metadata["format_option"] and field.name in options:
                value = options.pop(field.name)
                if fields.get(field.name) is not None and fields[field.name] != value:  # None: not given
                    raise ValueError(f"{field.name}={fields[field.name]!r} contradicts the format {fmt!r}")
                fields[field.name] = value
        if options:
            raise ValueError(f"format {fmt.name!r} has option(s) {sorted(options)} that a WeightQuant "
                             f"does not carry")
        return cls(fmt.name, group_size, **fields)
