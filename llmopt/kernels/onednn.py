"""``int8_onednn_cpu``: W8A8 with the weight prepacked once for oneDNN's int8 GEMM.

Also defines the ``llmopt::onednn_qlinear`` custom op, through which ``torch.compile`` calls the
oneDNN kernel unchanged.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..core.primitives import quantize_activations
from .base import Kernel, KernelSpec, Tensors, finish_output
from .int8_cpu import w8a8_unsupported_reason
from .registry import register_kernel

__all__ = ["Int8OneDNNCPUKernel", "onednn_qlinear", "onednn_int8_available"]


@functools.lru_cache(maxsize=None)
def onednn_int8_available() -> bool:
    """True if oneDNN's prepacked int8 linear (the ops x86 inductor quantization uses) exists here and
    multiplies signed int8 activations exactly: probed once on a tiny product, since support depends
    on the PyTorch build and the CPU's instruction set."""
    try:
        ops = torch.ops.onednn
        if not (torch.backends.mkldnn.is_available() and hasattr(ops, "qlinear_prepack")
                and hasattr(ops, "qlinear_pointwise")):
            return False
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(-127, 128, (3, 32), dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
        y = ops.qlinear_pointwise(x, 1.0, 0, ops.qlinear_prepack(w, None), torch.ones(16),
                                  torch.zeros(16, dtype=torch.int64), None, 1.0, 0, torch.float32,
                                  "none", [], "")
        return bool(torch.equal(y, (x.to(torch.float32) @ w.to(torch.float32).T)))
    except Exception:  # pragma: no cover - builds or CPUs without the op: fall back to _int_mm
        return False


def _onednn_qlinear_eager(codes: Tensor, packed_weight: Tensor, w_scale: Tensor, w_zero: Tensor) -> Tensor:
    """``codes [M, K] int8 @ W`` with the activation scale 1 and per-channel weight scales: float32
    ``[M, N]``."""
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 0, packed_weight, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], "",
    )


@torch.library.custom_op("llmopt::onednn_qlinear", mutates_args=())
def onednn_qlinear(codes: Tensor, packed_weight: Tensor, w_scale: Tensor, w_zero: Tensor) -> Tensor:
    """oneDNN's int8 linear as one opaque op for ``torch.compile``.

    Inductor lowers ``onednn.qlinear_pointwise`` itself only when the prepacked weight is a graph
    constant (``freezing``); a module buffer is not one, and the lowering fails. Behind this op inductor
    calls the eager kernel unchanged, and the rest of the layer (activation quantization, scaling, bias)
    is still compiled around it. Eager calls skip the op and call oneDNN directly.
    """
    return _onednn_qlinear_eager(codes, packed_weight, w_scale, w_zero)


@onednn_qlinear.register_fake
def _onednn_qlinear_fake(codes: Tensor, packed_weight: Tensor, w_scale: Tensor, w_zero: Tensor) -> Tensor:
    return codes.new_empty((codes.shape[0], w_scale.shape[0]), dtype=torch.float32)


@register_kernel(priority=40)
class Int8OneDNNCPUKernel(Kernel):
    """W8A8 as ``int8_dynamic_cpu``, with the weight prepacked once into oneDNN's blocked layout.

    ``torch._int_mm`` hands oneDNN a plain int8 matrix, which oneDNN reorders into its blocked layout
    on every call: at decode sizes the reorder costs more than the multiply (measured 0.4-0.9x of bf16
    dense on 576x1536 and 4096x4096). Here ``qdata`` is the opaque prepacked weight
    (``torch.ops.onednn.qlinear_prepack``, [K, N]) and the multiply is
    ``torch.ops.onednn.qlinear_pointwise`` with the activation scale set to 1 and the per-channel
    weight scales applied by oneDNN in float32; the per-token activation scales are applied after.
    Same arithmetic as ``int8_dynamic_cpu`` (exact int32 accumulation of the same codes), so the two
    agree to float32 rounding. ``to_dense()`` of the packed tensor gives the int8 codes back exactly,
    so the runtime layout is still the only copy of the weight in memory.
    """

    name = "int8_onednn_cpu"
    quantizes_activations = True
    # Fast with AMX only: on an AMD EPYC with AVX-512 VNNI but no AMX, oneDNN's int8 GEMM measured
    # 100-2000x slower than bf16 dense (4096x4096, M=1: 190 ms vs 1.6 ms; M=128: 24 s vs 11 ms).
    cpu_flags = ("amx_int8",)

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        reason = w8a8_unsupported_reason(spec, device)
        if reason is not None:
            return reason
        if not onednn_int8_available():
            return "this PyTorch has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)"
        return None

    def to_runtime(self, spec: KernelSpec, canonical: Tensors) -> Tensors:
        signed = (canonical["qdata"] ^ 0x80).view(torch.int8).contiguous()
        scale = canonical["scale"].reshape(-1).to(torch.float32).contiguous()
        return {
            "qdata": torch.ops.onednn.qlinear_prepack(signed, None),
            "scale": scale,
            # oneDNN's per-channel signature wants weight zero points; symmetric weights have none.
            "zero_point": torch.zeros(spec.out_features, dtype=torch.int64, device=scale.device),
        }

    @staticmethod
    def _weight_kn(runtime: Tensors) -> Tensor:
        return runtime["qdata"].to_dense()

    def to_canonical(self, spec: KernelSpec, runtime: Tensors) -> Tensors:
        codes = (self._weight_kn(runtime).t().contiguous().view(torch.uint8) ^ 0x80).contiguous()
        return {"qdata": codes, "scale": runtime["scale"].reshape(-1, 1).to(spec.scale_dtype)}

    def codes(self, spec: KernelSpec, runtime: Tensors) -> Tensor:
        return self._weight_kn(runtime).t().contiguous().view(torch.uint8) ^ 0x80

    def dequantize(self, spec: KernelSpec, runtime: Tensors, dtype: torch.dtype) -> Tensor:
        weight = self._weight_kn(runtime).t().to(torch.float32)
        return (weight * runtime["scale"].unsqueeze(1)).to(dtype)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        lead = x.shape[:-1]
        codes, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]), spec.act_bits)
        qlinear = onednn_qlinear if torch.compiler.is_compiling() else _onednn_qlinear_eager
        y = qlinear(codes.contiguous(), runtime["qdata"], runtime["scale"], runtime["zero_point"])
        return finish_output(y.mul_(x_scale), x, bias, spec.out_features, lead)
