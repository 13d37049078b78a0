"""8-bit CPU kernels on PyTorch's own ops.

* ``int8pack_cpu``: weight-only, ``aten._weight_int8pack_mm`` (8-bit affine, one scale per output
  row) with bfloat16 activations.
* ``int8_dynamic_cpu``: W8A8 for layers with ``act_bits=8``: activations quantized per token to int8,
  multiplied by symmetric per-channel int8 weights with ``torch._int_mm`` (int32 accumulation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.formats import AffineFormat
from ..core.primitives import quantize_activations
from .base import Kernel, KernelSpec, Tensors, bf16_rows, finish_output, is_cpu
from .registry import register_kernel

__all__ = ["Int8PackCPUKernel", "Int8DynamicCPUKernel", "w8a8_unsupported_reason"]


@register_kernel(priority=20)
class Int8PackCPUKernel(Kernel):
    """PyTorch's int8 weight-only kernel (``aten._weight_int8pack_mm``) with bf16 activations.

    Codes are stored signed (``code - 128``, a bit flip of the top bit). An asymmetric layer adds
    ``sum(x) * zero_point`` per output row, since ``w = q * scale + zero_point``. The op returns
    wrong results when K is not a multiple of 16 (seen with torch 2.13), so the runtime layout pads
    K with zero columns and the activations with zeros.
    """

    name = "int8pack_cpu"
    _K_ALIGN = 16

    def _padded_k(self, spec: KernelSpec) -> int:
        return -(-spec.in_features // self._K_ALIGN) * self._K_ALIGN

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        if not is_cpu(device):
            return "needs a CPU device"
        fmt = spec.format
        if not isinstance(fmt, AffineFormat) or fmt.bits != 8:
            return f"format {fmt.name!r} is not 8-bit affine"
        if spec.num_groups != 1:
            return "needs one scale per output row (group_size=None); groupwise int8 has no CPU kernel"
        if spec.scale_dtype != torch.bfloat16:
            return f"needs bfloat16 scales (scale_dtype={spec.scale_dtype} would be rounded)"
        if spec.has_zero_point and spec.zero_point_dtype != torch.bfloat16:
            # The "int"/"min" zero-point modes keep exact float32 zero points; this layout holds bf16.
            return f"needs bfloat16 zero points (zero_point={spec.format.options().get('zero_point')!r} keeps float32)"
        return None

    def to_runtime(self, spec: KernelSpec, canonical: Tensors) -> Tensors:
        signed = (canonical["qdata"] ^ 0x80).view(torch.int8)
        signed = F.pad(signed, (0, self._padded_k(spec) - spec.in_features)).contiguous()
        out = {"qdata": signed, "scale": canonical["scale"].reshape(-1).to(torch.bfloat16)}
        if "zero_point" in canonical:
            out["zero_point"] = canonical["zero_point"].reshape(-1).to(torch.bfloat16)
        return out

    def to_canonical(self, spec: KernelSpec, runtime: Tensors) -> Tensors:
        out = {
            "qdata": (runtime["qdata"][:, : spec.in_features].view(torch.uint8) ^ 0x80).contiguous(),
            "scale": runtime["scale"].reshape(-1, 1).to(spec.scale_dtype),
        }
        if "zero_point" in runtime:
            out["zero_point"] = runtime["zero_point"].reshape(-1, 1).to(spec.scale_dtype)
        return out

    def dequantize(self, spec: KernelSpec, runtime: Tensors, dtype: torch.dtype) -> Tensor:
        signed = runtime["qdata"][:, : spec.in_features].to(torch.float32)
        values = signed * runtime["scale"].to(torch.float32).unsqueeze(1)
        if "zero_point" in runtime:
            values = values + runtime["zero_point"].unsqueeze(1)
        return values.to(dtype)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        lead = x.shape[:-1]
        x2 = bf16_rows(x, self._padded_k(spec))
        y = torch.ops.aten._weight_int8pack_mm(x2, runtime["qdata"], runtime["scale"])
        zero_point = runtime.get("zero_point")
        if zero_point is not None:
            # One fused bf16 op (sum accumulates in float32 internally): the output is bf16 anyway.
            y.addcmul_(x2.sum(-1, keepdim=True), zero_point)
        return finish_output(y, x, bias, spec.out_features, lead)


def w8a8_unsupported_reason(spec: KernelSpec, device: torch.device) -> Optional[str]:
    """Why a W8A8 kernel (int8 activations x symmetric per-channel int8 weights) cannot serve ``spec``."""
    if not is_cpu(device):
        return "needs a CPU device"
    if spec.act_bits != 8:
        return "the layer does not quantize its activations (act_bits is not 8)"
    if not hasattr(torch, "_int_mm"):
        return "this PyTorch has no torch._int_mm"
    fmt = spec.format
    if not isinstance(fmt, AffineFormat) or fmt.bits != 8 or fmt.has_zero_point:
        return f"format {fmt.name!r} is not symmetric 8-bit affine (int8 with symmetric=True)"
    if spec.num_groups != 1:
        return "needs one scale per output row (group_size=None)"
    return None


@register_kernel(priority=30)
class Int8DynamicCPUKernel(Kernel):
    """W8A8: per-token int8 activations x per-channel symmetric int8 weights, ``torch._int_mm``.

    Runtime layout: ``qdata`` signed int8 ``[K, N]`` (transposed: ``_int_mm`` is faster with the
    weight as its contiguous right operand) and ``scale`` float32 ``[N]``. The int32 accumulator is
    exact; the output is ``acc * x_scale[m] * w_scale[n] + bias``, computed in float32.
    """

    name = "int8_dynamic_cpu"
    quantizes_activations = True

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        return w8a8_unsupported_reason(spec, device)

    def to_runtime(self, spec: KernelSpec, canonical: Tensors) -> Tensors:
        signed = (canonical["qdata"] ^ 0x80).view(torch.int8)
        # clone(): a fresh tensor with standard strides even when K == 1 (where .t().contiguous() keeps
        # the transposed strides, and _int_mm reads them wrongly).
        weight = signed.t().clone(memory_format=torch.contiguous_format)
        return {"qdata": weight, "scale": canonical["scale"].reshape(-1).to(torch.float32)}

    def to_canonical(self, spec: KernelSpec, runtime: Tensors) -> Tensors:
        codes = (runtime["qdata"].t().contiguous().view(torch.uint8) ^ 0x80).contiguous()
        return {"qdata": codes, "scale": runtime["scale"].reshape(-1, 1).to(spec.scale_dtype)}

    def codes(self, spec: KernelSpec, runtime: Tensors) -> Tensor:
        return runtime["qdata"].t().contiguous().view(torch.uint8) ^ 0x80

    def dequantize(self, spec: KernelSpec, runtime: Tensors, dtype: torch.dtype) -> Tensor:
        return (runtime["qdata"].t().to(torch.float32) * runtime["scale"].unsqueeze(1)).to(dtype)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        lead = x.shape[:-1]
        codes, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]), spec.act_bits)
        acc = torch._int_mm(codes, runtime["qdata"])
        y = acc.to(torch.float32).mul_(x_scale).mul_(runtime["scale"])
        return finish_output(y, x, bias, spec.out_features, lead)
