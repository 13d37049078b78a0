"""The ``reference`` kernel: dequantize, then a dense matmul. Pure torch, any device, any format.

It is the oracle every other kernel is tested against and the fallback of ``kernel="auto"``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.packing import unpack_codes
from ..core.primitives import dequantize_weight
from .base import Kernel, KernelSpec, Tensors
from .registry import register_kernel

__all__ = ["ReferenceKernel"]


@register_kernel(priority=None)  # never ranked: select_kernel falls back on it after every other kernel
class ReferenceKernel(Kernel):
    """Dequantize the whole weight in the activation dtype, then a dense matmul."""

    name = "reference"

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        return None

    def dequantize_rows(self, spec: KernelSpec, runtime: Tensors, rows: Tensor, dtype: torch.dtype) -> Tensor:
        # The canonical layout is row-major: gather the rows, then dequantize only those.
        zero = runtime.get("zero_point")
        codes = unpack_codes(runtime["qdata"].index_select(0, rows), spec.format.bits, spec.in_features)
        return dequantize_weight(codes, runtime["scale"].index_select(0, rows),
                                 zero.index_select(0, rows) if zero is not None else None,
                                 spec.format, spec.group_size, dtype)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        weight = self.dequantize(spec, runtime, x.dtype)
        return F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
