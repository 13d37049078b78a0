"""Method configs that quantize weights: one :class:`~llmopt.core.scheme.WeightQuant` behind their fields.

A config keeps the scheme's options as its own flat fields (``RTN("int4", 64, symmetric=True)``,
``to_dict()`` -> ``{"method": "rtn", "format": "int4", "group_size": 64, ...}``), and the mixin
:class:`QuantizesWeights` turns them into ``config.scheme``, checked once when the config is built.

Two ways to carry the fields:

* :class:`WeightQuantFields` declares all seven (``format, group_size, symmetric, scale_dtype, kernel, zero_point, full_range``,
  RTN's defaults, in that order, first): RTN, GPTQ, AWQ, HQQ, QuantLowRank and QAT. A config adopts the
  scheme in one line, ``class QAT(WeightQuantFields, MethodConfig)``, and redeclares only a default it
  wants different (``group_size: Optional[int] = 64``; a redeclared field keeps its place).
* Configs whose positional arguments put the fields elsewhere (SparseGPT: the sparsity comes first
  and the format is optional) or that fix some of them (SmoothQuant: int8, symmetric, per channel)
  inherit :class:`QuantizesWeights` alone and declare the fields they expose. The mixin finds them
  by name; a scheme field the config does not declare takes the config's ``scheme_fixed`` value or
  the scheme's default.
* A config that names them otherwise maps them: LoRA would set
  ``scheme_field_names = {"format": "quantize_base", "group_size": "quant_group_size"}`` and
  ``scheme_optional = True`` (no ``quantize_base``: no quantization).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional

from ..core.formats import WeightFormat
from ..core.scheme import WeightQuant
from ..kernels import list_kernels

__all__ = ["QuantizesWeights", "WeightQuantFields", "check_kernel_name"]


def check_kernel_name(kernel: str) -> str:
    """``kernel`` if it is ``"auto"`` or a registered kernel, else a ``ValueError`` listing the kernels."""
    if kernel != "auto" and kernel not in list_kernels():
        raise ValueError(f"unknown kernel {kernel!r}; use 'auto' or one of {list_kernels()}")
    return kernel


class QuantizesWeights:
    """Mixin of frozen dataclass configs whose weights are quantized with one :class:`WeightQuant`.

    Class attributes a config may set:

    * ``scheme_fixed``: scheme fields the method fixes instead of exposing them (SmoothQuant's int8).
    * ``scheme_optional``: ``format=None`` means "no quantization" (``scheme`` is then ``None``), as in
      SparseGPT, which prunes and optionally quantizes in the same sweep.
    * ``scheme_field_names``: ``{scheme field: config field}`` for a config whose saved keys name them
      otherwise (LoRA's ``quantize_base`` / ``quant_group_size``); errors then name the config's field.

    ``__post_init__`` builds and checks the scheme, so a config whose own ``__post_init__`` checks more
    calls ``super().__post_init__()``. Method-specific limits (HQQ: asymmetric affine formats only) go in
    :meth:`check_scheme`.
    """

    scheme_fixed: ClassVar[Mapping[str, Any]] = {}
    scheme_optional: ClassVar[bool] = False
    scheme_field_names: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        scheme = self._build_scheme()
        if scheme is not None:
            check_kernel_name(scheme.kernel)
            self.check_scheme(scheme)
        object.__setattr__(self, "_scheme", scheme)  # not a field: to_dict, ==, hash and repr ignore it
        parent = getattr(super(), "__post_init__", None)  # cooperative: a base may check more
        if parent is not None:
            parent()

    def _scheme_values(self) -> Dict[str, Any]:
        """The scheme's fields as this config sets them (declared field, else fixed, else the default)."""
        own = {f.name for f in dataclasses.fields(self)}
        values: Dict[str, Any] = {}
        for name in WeightQuant.field_names():
            attribute = self.scheme_field_names.get(name, name)
            if name in self.scheme_fixed:
                values[name] = self.scheme_fixed[name]
            elif attribute in own:
                values[name] = getattr(self, attribute)
                if attribute != name:  # check it alone first, so that the error names the config's field
                    try:
                        WeightQuant.check_field(name, values[name])
                    except ValueError as exc:
                        raise ValueError(f"{attribute}: {exc}") from None
        return values

    def _build_scheme(self) -> Optional[WeightQuant]:
        values = self._scheme_values()
        if self.scheme_optional and values.get("format") is None:
            for name, value in values.items():  # still refuse a bad value in a field that waits for a format
                if name != "format" and value is not None:
                    WeightQuant.check_field(name, value)
            return None
        return WeightQuant(**values)

    def check_scheme(self, scheme: WeightQuant) -> None:
        """Limits of this method on top of the scheme's own checks; raise ``ValueError``. Default: none."""

    @property
    def scheme(self) -> Optional[WeightQuant]:
        """The :class:`WeightQuant` of this config (``None`` only for ``scheme_optional`` configs without a
        format)."""
        if "_scheme" not in self.__dict__:  # a subclass __post_init__ that did not call super()
            object.__setattr__(self, "_scheme", self._build_scheme())
        return self.__dict__["_scheme"]

    def weight_format(self) -> Optional[WeightFormat]:
        """A new :class:`~llmopt.core.formats.WeightFormat` instance of the scheme (``None`` without one)."""
        scheme = self.scheme
        return None if scheme is None else scheme.weight_format()


@dataclasses.dataclass(frozen=True)
class WeightQuantFields(QuantizesWeights):
    """:class:`QuantizesWeights` with the seven scheme fields declared, first and in the scheme's order.

    The defaults are :class:`WeightQuant`'s (``tests/core/test_scheme.py`` checks they stay equal).
    """

    format: str = "int4"
    group_size: Optional[int] = 128
    symmetric: Optional[bool] = None
    scale_dtype: str = "bfloat16"
    kernel: str = "auto"
    # Added after the first five: omitted from to_dict() when None, so earlier dicts stay pinned.
    zero_point: Optional[str] = dataclasses.field(default=None, metadata={"omit_if_default": True})
    full_range: Optional[bool] = dataclasses.field(default=None, metadata={"omit_if_default": True})
