"""Matmul kernels for quantized weights, chosen explicitly.

Every kernel converts the canonical stored tensors (``qdata`` packed row by row, ``scale``,
``zero_point``; see :mod:`llmopt.quant.packing`) into a *runtime layout* it can multiply with fast,
and converts that layout back exactly. A ``QuantLinear`` keeps only the runtime layout in memory,
so a fast kernel never costs a second copy of the weights; ``state_dict`` and ``llmopt.save`` always
see the canonical form, which is portable across machines and kernels.

Kernels:

* ``reference``: dequantize then ``F.linear``; pure torch, any device, any format. The oracle.
* ``int4pack_cpu``: ``aten._weight_int4pack_mm_for_cpu`` (affine formats of 2-4 bits, group sizes
  that are multiples of 32). Activations are cast to bfloat16, the only dtype it is fast with.
* ``int8pack_cpu``: ``aten._weight_int8pack_mm`` (8-bit affine, one scale per output row).
* ``int8_dynamic_cpu``: W8A8 for layers with ``act_bits=8``: activations quantized per token to int8,
  multiplied by symmetric per-channel int8 weights with ``torch._int_mm`` (int32 accumulation).
* ``int8_onednn_cpu``: the same W8A8 arithmetic with the weight prepacked once for oneDNN
  (``torch.ops.onednn.qlinear_pointwise``); preferred by ``"auto"``, 2-3x faster than ``_int_mm``.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.formats import AffineFormat
from ..core.packing import pack_codes, unpack_codes
from ..core.primitives import dequantize_weight, quantize_activations

if TYPE_CHECKING:  # pragma: no cover
    from ..nn.quant_linear import QuantLinear

__all__ = ["Kernel", "get_kernel", "list_kernels", "select_kernel", "KERNELS"]

logger = logging.getLogger("llmopt")

Tensors = Dict[str, Tensor]


@functools.lru_cache(maxsize=None)
def log_once(message: str) -> None:
    """Log a kernel fallback the first time it happens (per distinct message)."""
    logger.warning(message)


class Kernel:
    """One way of computing ``x @ W.T`` for a ``QuantLinear``. Stateless: all data lives in the layer."""

    name = "base"
    # True if forward() quantizes the activations itself (layers with act_bits); otherwise the layer
    # hands it fake-quantized activations.
    quantizes_activations = False

    def unsupported_reason(self, layer: "QuantLinear", device: torch.device) -> Optional[str]:
        """``None`` if this kernel can serve ``layer`` on ``device``, else a short reason."""
        raise NotImplementedError

    def to_runtime(self, layer: "QuantLinear", canonical: Tensors) -> Tensors:
        """Canonical tensors -> this kernel's runtime tensors (may reuse the inputs)."""
        return dict(canonical)

    def to_canonical(self, layer: "QuantLinear", runtime: Tensors) -> Tensors:
        """Exact inverse of :meth:`to_runtime`."""
        return dict(runtime)

    def codes(self, layer: "QuantLinear", runtime: Tensors) -> Tensor:
        """Unpacked uint8 codes ``[N, K]``."""
        canonical = self.to_canonical(layer, runtime)
        return unpack_codes(canonical["qdata"], layer.format.bits, layer.in_features)

    def dequantize(self, layer: "QuantLinear", runtime: Tensors, dtype: torch.dtype) -> Tensor:
        """The float weight ``[N, K]`` this layer represents."""
        canonical = self.to_canonical(layer, runtime)
        codes = unpack_codes(canonical["qdata"], layer.format.bits, layer.in_features)
        return dequantize_weight(
            codes, canonical["scale"], canonical.get("zero_point"), layer.format, layer.group_size, dtype
        )

    def forward(self, layer: "QuantLinear", runtime: Tensors, x: Tensor) -> Tensor:
        raise NotImplementedError


class ReferenceKernel(Kernel):
    """Dequantize the whole weight in the activation dtype, then a dense matmul."""

    name = "reference"

    def unsupported_reason(self, layer: "QuantLinear", device: torch.device) -> Optional[str]:
        return None

    def forward(self, layer: "QuantLinear", runtime: Tensors, x: Tensor) -> Tensor:
        weight = self.dequantize(layer, runtime, x.dtype)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, weight, bias)


def _bf16_rows(x: Tensor, k_pad: int) -> Tensor:
    """Activations as a contiguous bf16 ``[rows, k_pad]`` matrix, zero-padded past ``in_features``."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if k_pad != x2.shape[-1]:
        x2 = F.pad(x2, (0, k_pad - x2.shape[-1]))
    return x2.contiguous()


def _finish(y: Tensor, x: Tensor, layer: "QuantLinear", lead) -> Tensor:
    """Add the bias in the kernel's output dtype, cast back to the input dtype, restore leading dims."""
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype) if y.dtype != torch.float32 else y + layer.bias
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*lead, layer.out_features)


def _is_cpu(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def _int4_kernel_group(group_size: int) -> Optional[int]:
    """Largest group size the int4 CPU kernel accepts that divides ``group_size``."""
    for candidate in (256, 128, 64, 32):
        if group_size % candidate == 0:
            return candidate
    return None


def _int4_nibble_sources(n: int, k: int, device: torch.device) -> Tensor:
    """For each nibble of PyTorch's packed int4 CPU layout of an ``[n, k]`` matrix, its source index.

    Generic but slow (several packing passes over an ``n*k`` index): used only when the layout is
    none of the known ones, see :func:`_int4_layout`.
    """
    total = n * k
    index = torch.arange(total, dtype=torch.int64, device=device).view(n, k)
    sources = torch.zeros(total, dtype=torch.int64, device=device)
    shift = 0
    while (1 << shift) < total:
        probe = ((index >> shift) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)
        sources |= nibbles.to(torch.int64) << shift
        shift += 4
    return sources


def _unpack_int4_blocked(packed: Tensor, n: int, k: int, block_n: int, split_halves: bool) -> Tensor:
    """Codes ``[n, k]`` from PyTorch's int4 CPU layout, described by two parameters.

    The op packs rows in blocks of ``block_n``; each block stores ``k`` runs of ``block_n / 2`` bytes.
    In a full block, byte ``b`` holds rows ``b`` and ``b + block_n/2`` (``split_halves``) or rows
    ``2b`` and ``2b+1``; a partial last block always uses the pair form.
    """
    flat = packed.reshape(-1)
    n_full = n // block_n
    parts = []
    if n_full:
        full = flat[: n_full * k * block_n // 2].view(n_full, k, block_n // 2)
        lo, hi = full & 0xF, full >> 4
        rows = torch.cat([lo, hi], dim=2) if split_halves else torch.stack([lo, hi], dim=3)
        parts.append(rows.reshape(n_full, k, block_n).permute(0, 2, 1).reshape(n_full * block_n, k))
    tail = n - n_full * block_n
    if tail:
        part = flat[n_full * k * block_n // 2:].view(k, tail // 2)
        parts.append(torch.stack([part & 0xF, part >> 4], dim=2).reshape(k, tail).t())
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0].contiguous()


# Filled once by _int4_layout(); a plain dict (not functools.lru_cache) so that torch.compile reads the
# cached answer as a constant instead of tracing the probe (which builds a Generator, an opaque object).
_INT4_LAYOUT_CACHE: Dict[str, Optional[tuple]] = {}


def _int4_layout() -> Optional[tuple]:
    """Which known layout this PyTorch build and CPU use (``(block_n, split_halves)``), or None.

    The layout differs between CPU capabilities (AVX-512: blocks of 64 rows, halves; AVX2: 32, halves;
    scalar: 32, pairs), so it is detected once by packing a random probe and checking each candidate.
    ``Int4PackCPUKernel.to_runtime`` (always eager) runs the probe, so a compiled forward or backward
    only ever reads the cached answer.
    """
    if "layout" not in _INT4_LAYOUT_CACHE:
        _INT4_LAYOUT_CACHE["layout"] = _probe_int4_layout()
    return _INT4_LAYOUT_CACHE["layout"]


def _probe_int4_layout() -> Optional[tuple]:
    gen = torch.Generator().manual_seed(0)
    n, k = 2 * 64 + 48, 64
    probe = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block_n, split in ((64, True), (32, True), (32, False), (64, False), (16, False)):
        if torch.equal(_unpack_int4_blocked(packed, n, k, block_n, split).to(torch.int32), probe):
            return block_n, split
    return None


def _unpack_int4_cpu(packed: Tensor, n: int, k: int) -> Tensor:
    """Exact inverse of ``aten._convert_weight_to_int4pack_for_cpu``: uint8 codes ``[n, k]``."""
    layout = _int4_layout()
    if layout is not None:
        return _unpack_int4_blocked(packed, n, k, *layout)
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(-1)
    codes = torch.empty(n * k, dtype=torch.uint8, device=packed.device)
    codes[_int4_nibble_sources(n, k, packed.device)] = nibbles
    return codes.view(n, k)


class Int4PackCPUKernel(Kernel):
    """PyTorch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``) with bf16 activations.

    It computes ``(code - 8) * scale + zero`` per group: our affine convention with mid code 8,
    so 4-bit parameters feed it unchanged. 2- and 3-bit codes are re-centred onto the 4-bit grid
    (``code - mid + 8``), which is exact; they then take 4 bits each in memory (the report says so).
    """

    name = "int4pack_cpu"

    def unsupported_reason(self, layer: "QuantLinear", device: torch.device) -> Optional[str]:
        if not _is_cpu(device):
            return "needs a CPU device"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this PyTorch has no aten._weight_int4pack_mm_for_cpu"
        fmt = layer.format
        if not isinstance(fmt, AffineFormat) or fmt.bits > 4:
            return f"format {fmt.name!r} is not an affine format of at most 4 bits"
        if layer.out_features % 16:
            return f"out_features={layer.out_features} is not a multiple of 16"
        if layer.scale_dtype != torch.bfloat16:
            return f"needs bfloat16 scales (scale_dtype={layer.scale_dtype} would be rounded)"
        if _int4_kernel_group(layer.group_size) is None:
            return f"group_size={layer.group_size} is not a multiple of 32"
        return None

    @staticmethod
    def _padded_k(layer: "QuantLinear") -> int:
        return layer.num_groups * layer.group_size

    def to_runtime(self, layer: "QuantLinear", canonical: Tensors) -> Tensors:
        fmt = layer.format
        k_pad = self._padded_k(layer)
        codes = unpack_codes(canonical["qdata"], fmt.bits, layer.in_features).to(torch.int32)
        if fmt.mid != 8:
            codes += 8 - fmt.mid  # re-centre 2/3-bit codes on the 4-bit grid (exact)
        if k_pad != layer.in_features:
            # Padded columns get code 8 (value = zero_point) and meet zero-padded activations.
            codes = F.pad(codes, (0, k_pad - layer.in_features), value=8)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        _int4_layout()  # probe eagerly now: dequantize()/to_canonical() may later run inside torch.compile
        repeat = layer.group_size // _int4_kernel_group(layer.group_size)
        scale = canonical["scale"].to(torch.bfloat16)
        zero = canonical.get("zero_point")
        zero = torch.zeros_like(scale) if zero is None else zero.to(torch.bfloat16)
        scale_and_zero = torch.stack([scale, zero], dim=-1).repeat_interleave(repeat, dim=1)
        return {"qdata": packed, "scale_and_zero": scale_and_zero.transpose(0, 1).contiguous()}

    def to_canonical(self, layer: "QuantLinear", runtime: Tensors) -> Tensors:
        fmt = layer.format
        codes = _unpack_int4_cpu(runtime["qdata"], layer.out_features, self._padded_k(layer))
        codes = codes[:, : layer.in_features].to(torch.int16) - (8 - fmt.mid)
        repeat = layer.group_size // _int4_kernel_group(layer.group_size)
        sz = runtime["scale_and_zero"].transpose(0, 1)[:, ::repeat]
        out = {
            "qdata": pack_codes(codes.to(torch.uint8), fmt.bits),
            "scale": sz[..., 0].to(layer.scale_dtype).contiguous(),
        }
        if fmt.has_zero_point:
            out["zero_point"] = sz[..., 1].to(layer.scale_dtype).contiguous()
        return out

    def codes(self, layer: "QuantLinear", runtime: Tensors) -> Tensor:
        codes = _unpack_int4_cpu(runtime["qdata"], layer.out_features, self._padded_k(layer))
        codes = codes[:, : layer.in_features]
        return codes - (8 - layer.format.mid) if layer.format.mid != 8 else codes.contiguous()

    def dequantize(self, layer: "QuantLinear", runtime: Tensors, dtype: torch.dtype) -> Tensor:
        # Straight from the kernel layout (no detour through the packed canonical form): the same
        # maths the kernel does, (code - 8) * scale + zero per kernel group.
        n, k_pad = layer.out_features, self._padded_k(layer)
        codes = _unpack_int4_cpu(runtime["qdata"], n, k_pad)
        kernel_group = _int4_kernel_group(layer.group_size)
        sz = runtime["scale_and_zero"].transpose(0, 1).to(torch.float32)  # [N, G', 2]
        values = (codes.view(n, -1, kernel_group).to(torch.float32) - 8) * sz[..., :1] + sz[..., 1:]
        return values.view(n, k_pad)[:, : layer.in_features].to(dtype)

    def forward(self, layer: "QuantLinear", runtime: Tensors, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = _bf16_rows(x, self._padded_k(layer))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, runtime["qdata"], _int4_kernel_group(layer.group_size), runtime["scale_and_zero"]
        )
        return _finish(y, x, layer, lead)


class Int8PackCPUKernel(Kernel):
    """PyTorch's int8 weight-only kernel (``aten._weight_int8pack_mm``) with bf16 activations.

    Codes are stored signed (``code - 128``, a bit flip of the top bit). An asymmetric layer adds
    ``sum(x) * zero_point`` per output row, since ``w = q * scale + zero_point``. The op returns
    wrong results when K is not a multiple of 16 (seen with torch 2.13), so the runtime layout pads
    K with zero columns and the activations with zeros.
    """

    _K_ALIGN = 16

    def _padded_k(self, layer: "QuantLinear") -> int:
        return -(-layer.in_features // self._K_ALIGN) * self._K_ALIGN

    name = "int8pack_cpu"

    def unsupported_reason(self, layer: "QuantLinear", device: torch.device) -> Optional[str]:
        if not _is_cpu(device):
            return "needs a CPU device"
        fmt = layer.format
        if not isinstance(fmt, AffineFormat) or fmt.bits != 8:
            return f"format {fmt.name!r} is not 8-bit affine"
        if layer.num_groups != 1:
            return "needs one scale per output row (group_size=None); groupwise int8 has no CPU kernel"
        if layer.scale_dtype != torch.bfloat16:
            return f"needs bfloat16 scales (scale_dtype={layer.scale_dtype} would be rounded)"
        return None

    def to_runtime(self, layer: "QuantLinear", canonical: Tensors) -> Tensors:
        signed = (canonical["qdata"] ^ 0x80).view(torch.int8)
        signed = F.pad(signed, (0, self._padded_k(layer) - layer.in_features)).contiguous()
        out = {"qdata": signed, "scale": canonical["scale"].reshape(-1).to(torch.bfloat16)}
        if "zero_point" in canonical:
            out["zero_point"] = canonical["zero_point"].reshape(-1).to(torch.bfloat16)
        return out

    def to_canonical(self, layer: "QuantLinear", runtime: Tensors) -> Tensors:
        out = {
            "qdata": (runtime["qdata"][:, : layer.in_features].view(torch.uint8) ^ 0x80).contiguous(),
            "scale": runtime["scale"].reshape(-1, 1).to(layer.scale_dtype),
        }
        if "zero_point" in runtime:
            out["zero_point"] = runtime["zero_point"].reshape(-1, 1).to(layer.scale_dtype)
        return out

    def dequantize(self, layer: "QuantLinear", runtime: Tensors, dtype: torch.dtype) -> Tensor:
        signed = runtime["qdata"][:, : layer.in_features].to(torch.float32)
        values = signed * runtime["scale"].to(torch.float32).unsqueeze(1)
        if "zero_point" in runtime:
            values = values + runtime["zero_point"].unsqueeze(1)
        return values.to(dtype)

    def forward(self, layer: "QuantLinear", runtime: Tensors, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = _bf16_rows(x, self._padded_k(layer))
        y = torch.ops.aten._weight_int8pack_mm(x2, runtime["qdata"], runtime["scale"])
        zero_point = runtime.get("zero_point")
        if zero_point is not None:
            # One fused bf16 op (sum accumulates in float32 internally): the output is bf16 anyway.
            y.addcmul_(x2.sum(-1, keepdim=True), zero_point)
        return _finish(y, x, layer, lead)


class Int8DynamicCPUKernel(Kernel):
    """W8A8: per-token int8 activations x per-channel symmetric int8 weights, ``torch._int_mm``.

    Runtime layout: ``qdata`` signed int8 ``[K, N]`` (transposed: ``_int_mm`` is faster with the
    weight as its contiguous right operand) and ``scale`` float32 ``[N]``. The int32 accumulator is
    exact; the output is ``acc * x_scale[m] * w_scale[n] + bias``, computed in float32.
    """

    name = "int8_dynamic_cpu"
    quantizes_activations = True

    def unsupported_reason(self, layer: "QuantLinear", device: torch.device) -> Optional[str]:
        if not _is_cpu(device):
            return "needs a CPU device"
        if getattr(layer, "act_bits", None) != 8:
            return "the layer does not quantize its activations (act_bits is not 8)"
        if not hasattr(torch, "_int_mm"):
            return "this PyTorch has no torch._int_mm"
        fmt = layer.format
        if not isinstance(fmt, AffineFormat) or fmt.bits != 8 or fmt.has_zero_point:
            return f"format {fmt.name!r} is not symmetric 8-bit affine (int8 with symmetric=True)"
        if layer.num_groups != 1:
            return "needs one scale per output row (group_size=None)"
        return None

    def to_runtime(self, layer: "QuantLinear", canonical: Tensors) -> Tensors:
        signed = (canonical["qdata"] ^ 0x80).view(torch.int8)
        # clone(): a fresh tensor with standard strides even when K == 1 (where .t().contiguous() keeps
        # the transposed strides, and _int_mm reads them wrongly).
        weight = signed.t().clone(memory_format=torch.contiguous_format)
        return {"qdata": weight, "scale": canonical["scale"].reshape(-1).to(torch.float32)}

    def to_canonical(self, layer: "QuantLinear", runtime: Tensors) -> Tensors:
        codes = (runtime["qdata"].t().contiguous().view(torch.uint8) ^ 0x80).contiguous()
        return {"qdata": codes, "scale": runtime["scale"].reshape(-1, 1).to(layer.scale_dtype)}

    def codes(self, layer: "QuantLinear", runtime: Tensors) -> Tensor:
        return runtime["qdata"].t().contiguous().view(torch.uint8) ^ 0x80

    def dequantize(self, layer: "QuantLinear", runtime: Tensors, dtype: torch.dtype) -> Tensor:
        return (runtime["qdata"].t().to(torch.float32) * runtime["scale"].unsqueeze(1)).to(dtype)

    def forward(self, layer: "QuantLinear", runtime: Tensors, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        codes, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]), layer.act_bits)
        acc = torch._int_mm(codes, runtime["qdata"])
        y = acc.to(torch.float32).mul_(x_scale).mul_(runtime["scale"])
        return _finish(y, x, layer, lead)


@functools.lru_cache(maxsize=None)
def _onednn_int8_available() -> bool:
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
                                  torch.zeros(16, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], "")
        return bool(torch.equal(y, (x.to(torch.float32) @ w.to(torch.float32).T)))
    except Exception:  # pragma: no cover - builds or CPUs without the op: fall back to _int_mm
        return False


def _onednn_qlinear_eager(codes: Tensor, packed_weight: Tensor, w_scale: Tensor, w_zero: Tensor) -> Tensor:
    """``codes [M, K] int8 @ W`` with the activation scale 1 and per-channel weight scales: float32 ``[M, N]``."""
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


class Int8OneDNNCPUKernel(Int8DynamicCPUKernel):
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

    def unsupported_reason(self, layer: "QuantLinear", device: torch.device) -> Optional[str]:
        reason = super().unsupported_reason(layer, device)
        if reason is not None:
            return reason
        if not _onednn_int8_available():
            return "this PyTorch has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)"
        return None

    def to_runtime(self, layer: "QuantLinear", canonical: Tensors) -> Tensors:
        signed = (canonical["qdata"] ^ 0x80).view(torch.int8).contiguous()
        scale = canonical["scale"].reshape(-1).to(torch.float32).contiguous()
        return {
            "qdata": torch.ops.onednn.qlinear_prepack(signed, None),
            "scale": scale,
            # oneDNN's per-channel signature wants weight zero points; symmetric weights have none.
            "zero_point": torch.zeros(layer.out_features, dtype=torch.int64, device=scale.device),
        }

    def _weight_kn(self, runtime: Tensors) -> Tensor:
        return runtime["qdata"].to_dense()

    def to_canonical(self, layer: "QuantLinear", runtime: Tensors) -> Tensors:
        codes = (self._weight_kn(runtime).t().contiguous().view(torch.uint8) ^ 0x80).contiguous()
        return {"qdata": codes, "scale": runtime["scale"].reshape(-1, 1).to(layer.scale_dtype)}

    def codes(self, layer: "QuantLinear", runtime: Tensors) -> Tensor:
        return self._weight_kn(runtime).t().contiguous().view(torch.uint8) ^ 0x80

    def dequantize(self, layer: "QuantLinear", runtime: Tensors, dtype: torch.dtype) -> Tensor:
        weight = self._weight_kn(runtime).t().to(torch.float32)
        return (weight * runtime["scale"].unsqueeze(1)).to(dtype)

    def forward(self, layer: "QuantLinear", runtime: Tensors, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        codes, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]), layer.act_bits)
        qlinear = onednn_qlinear if torch.compiler.is_compiling() else _onednn_qlinear_eager
        y = qlinear(codes.contiguous(), runtime["qdata"], runtime["scale"], runtime["zero_point"])
        return _finish(y.mul_(x_scale), x, layer, lead)


KERNELS: Dict[str, Kernel] = {
    k.name: k for k in (ReferenceKernel(), Int4PackCPUKernel(), Int8PackCPUKernel(), Int8DynamicCPUKernel(),
                        Int8OneDNNCPUKernel())
}

# Tried in order by kernel="auto"; the reference kernel always serves as the last resort.
_AUTO_ORDER = ("int8_onednn_cpu", "int8_dynamic_cpu", "int8pack_cpu", "int4pack_cpu")


def list_kernels() -> list:
    """Names of the available kernels."""
    return list(KERNELS)


def get_kernel(name: str) -> Kernel:
    """Kernel by name."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; available: {', '.join(KERNELS)}")
    return KERNELS[name]


def select_kernel(layer: "QuantLinear", requested: str, device: torch.device) -> Kernel:
    """Resolve ``requested`` (``"auto"`` or a kernel name) for ``layer`` on ``device``.

    An explicitly requested kernel that cannot serve the layer is an error; ``"auto"`` falls back to
    the reference kernel and logs why once.
    """
    if requested != "auto":
        kernel = get_kernel(requested)
        reason = kernel.unsupported_reason(layer, device)
        if reason is not None:
            raise ValueError(f"kernel {requested!r} cannot serve this layer: {reason}")
        return kernel
    reasons = []
    for name in _AUTO_ORDER:
        reason = KERNELS[name].unsupported_reason(layer, device)
        if reason is None:
            return KERNELS[name]
        reasons.append(f"{name}: {reason}")
    if _is_cpu(device) or torch.device(device).type == "cuda":
        log_once(
            f"llmopt: no fast kernel for format={layer.format.name!r} group_size={layer.group_size} on "
            f"{torch.device(device).type}; using the reference kernel (dequantize + matmul). "
            f"Reasons: {'; '.join(reasons)}"
        )
    return KERNELS["reference"]
