"""RTN: round-to-nearest weight quantization, no calibration data."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from ...nn.quant_linear import QuantLinear
from ...nn.sparse_linear import SparseLinear
from ..base import MethodConfig, register_method
from ..quantized import WeightQuantFields

__all__ = ["RTN"]


@dataclasses.dataclass(frozen=True)
class RTN(WeightQuantFields, MethodConfig):
    """Round-to-nearest quantization of every targeted ``nn.Linear``.

    Args:
        format: a registered format name (``"int4"``, ``"int8"``, ``"nf4"``, ...).
        group_size: columns sharing one scale; ``None`` for one scale per output row.
        symmetric: affine formats only; ``None`` keeps the format's default (asymmetric).
        scale_dtype: dtype of stored scales/zero points (``"bfloat16"`` by default).
        kernel: ``"auto"`` or a kernel name from ``llmopt.kernels.list_kernels()``.

    The five fields are the :class:`~llmopt.core.scheme.WeightQuant` ``config.scheme``, checked when the
    config is built (an unknown format or kernel fails before any layer is touched).
    """

    name = "rtn"

    @classmethod
    def examples(cls):
        return [cls("int4", 32), cls("int4", 64, symmetric=True), cls("int8", None), cls("int3", 64),
                cls("int2", 32), cls("nf4", 64), cls("fp4_e2m1", 32), cls("fp8_e4m3", 128)]

    @classmethod
    def benchmark_configs(cls):
        return [cls("int8", None), cls("int4", 128), cls("int4", 64), cls("int3", 64), cls("nf4", 64)]

    def label(self) -> str:
        return f"rtn {self.scheme.label()}"

    def accepts_compressed(self, module: nn.Module) -> bool:
        """RTN also quantizes the kept weights of a float ``SparseLinear`` (prune, then quantize)."""
        return isinstance(module, SparseLinear) and not module.quantized


@register_method(RTN)
def _apply_rtn(linear: nn.Module, config: RTN, *, name: str = "") -> nn.Module:
    if isinstance(linear, SparseLinear):  # sparsity + quantization: same mask, quantized values
        return linear.quantize(config.scheme)
    return QuantLinear.from_linear(linear, config.scheme)
