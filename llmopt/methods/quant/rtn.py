"""RTN: round-to-nearest weight quantization, no calibration data."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch.nn as nn

from ...core.checks import parse_dtype
from ...core.formats import get_format
from ...core.primitives import SCALE_DTYPES, resolve_group_size
from ...kernels import list_kernels
from ...nn.quant_linear import QuantLinear
from ..base import MethodConfig, register_method

__all__ = ["RTN"]


@dataclasses.dataclass(frozen=True)
class RTN(MethodConfig):
    """Round-to-nearest quantization of every targeted ``nn.Linear``.

    Args:
        format: a registered format name (``"int4"``, ``"int8"``, ``"nf4"``, ...).
        group_size: columns sharing one scale; ``None`` for one scale per output row.
        symmetric: affine formats only; ``None`` keeps the format's default (asymmetric).
        scale_dtype: dtype of stored scales/zero points (``"bfloat16"`` by default).
        kernel: ``"auto"`` or a kernel name from ``llmopt.kernels.list_kernels()``.
    """

    name = "rtn"

    format: str = "int4"
    group_size: Optional[int] = 128
    symmetric: Optional[bool] = None
    scale_dtype: str = "bfloat16"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        self.weight_format()  # unknown format / bad options fail here, before any layer is touched
        resolve_group_size(self.group_size, 1 << 30)
        if parse_dtype(self.scale_dtype) not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of float32, float16, bfloat16; got {self.scale_dtype!r}")
        if self.kernel != "auto" and self.kernel not in list_kernels():
            raise ValueError(f"unknown kernel {self.kernel!r}; use 'auto' or one of {list_kernels()}")

    @classmethod
    def examples(cls):
        return [cls("int4", 32), cls("int4", 64, symmetric=True), cls("int8", None), cls("int3", 64),
                cls("int2", 32), cls("nf4", 64), cls("fp4_e2m1", 32), cls("fp8_e4m3", 128)]

    @classmethod
    def benchmark_configs(cls):
        return [cls("int8", None), cls("int4", 128), cls("int4", 64), cls("int3", 64), cls("nf4", 64)]

    def label(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        sym = " sym" if self.symmetric else ""
        return f"rtn {self.format}{sym} {group}"

    def weight_format(self):
        """The :class:`~llmopt.quant.formats.WeightFormat` this config asks for."""
        return get_format(self.format, **({"symmetric": self.symmetric} if self.symmetric is not None else {}))

    def accepts_compressed(self, module: nn.Module) -> bool:
        """RTN also quantizes the kept weights of a float ``SparseLinear`` (prune, then quantize)."""
        from ...nn.sparse_linear import SparseLinear

        return isinstance(module, SparseLinear) and not module.quantized


@register_method(RTN)
def _apply_rtn(linear: nn.Module, config: RTN, *, name: str = "") -> nn.Module:
    from ...nn.sparse_linear import SparseLinear

    if isinstance(linear, SparseLinear):  # sparsity + quantization: same mask, quantized values
        return linear.quantize(config.weight_format(), config.group_size, scale_dtype=config.scale_dtype)
    return QuantLinear.from_linear(
        linear, config.weight_format(), config.group_size,
        scale_dtype=config.scale_dtype, kernel=config.kernel,
    )
