"""Pure quantization maths on weight matrices: tensors in, tensors out.

A weight ``[N, K]`` is split along K into groups of ``group_size`` columns (``None`` means one
group per row, i.e. per-channel). When ``group_size`` does not divide ``K`` the last group is padded
internally by repeating the row's last column: padding never moves a group's min, max or absmax,
so the parameters and codes of the real columns are exactly those of an unpadded layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import dtype_name, parse_dtype
from .formats import WeightFormat

__all__ = [
    "QuantizedWeight",
    "SCALE_DTYPES",
    "parse_scale_dtype",
    "resolve_group_size",
    "num_groups",
    "to_groups",
    "quantize_weight",
    "dequantize_weight",
    "fake_quantize",
    "quantize_activations",
    "fake_quantize_activations",
    "check_params_finite",
    "check_quantized",
]

SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCALE_DTYPE_NAMES = "float32, float16, bfloat16"


def parse_scale_dtype(scale_dtype: "str | torch.dtype") -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``, for the dtype quantization parameters are
    stored in; anything but float32, float16 or bfloat16 is a ``ValueError`` naming ``scale_dtype``."""
    try:
        dtype = parse_dtype(scale_dtype)
    except ValueError:
        dtype = None
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype: unsupported dtype {scale_dtype!r}; "
                         f"expected one of {_SCALE_DTYPE_NAMES}")
    return dtype


@dataclass
class QuantizedWeight:
    """Unpacked result of quantizing a ``[N, K]`` weight: codes ``[N, K]`` and per-group parameters."""

    codes: Tensor  # uint8 [N, K]
    scale: Tensor  # [N, G] in the chosen scale dtype
    zero_point: Optional[Tensor]  # [N, G] or None
    group_size: int


def resolve_group_size(group_size: Optional[int], in_features: int) -> int:
    """Validate ``group_size`` and turn ``None``/``-1`` (per-channel) into ``in_features``."""
    if group_size is None or (isinstance(group_size, int) and group_size == -1):
        return in_features
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, -1 or None (per-channel), got {group_size!r}")
    return min(group_size, in_features)


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups per row, counting a padded last group."""
    return -(-in_features // group_size)


def to_groups(weight: Tensor, group_size: int) -> Tensor:
    """``[N, K]`` -> float32 ``[N, G, group_size]``, the last group padded by replication."""
    n, k = weight.shape
    g = num_groups(k, group_size)
    w = weight.to(torch.float32)
    pad = g * group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, g, group_size)


def quantize_weight(
    weight: Tensor,
    fmt: WeightFormat,
    group_size: Optional[int],
    scale_dtype: torch.dtype = torch.bfloat16,
    clip_ratio: Optional[Tensor] = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight with per-group parameters.

    Parameters are rounded to ``scale_dtype`` *before* the codes are chosen, so the codes are the
    nearest ones for the parameters that are actually stored. ``clip_ratio`` (``[N, G]`` or a number
    in ``(0, 1]``) shrinks each group's range before its parameters are chosen: the group is clamped
    to ``[ratio * min, ratio * max]`` for ``choose_params`` only, so outliers saturate (AWQ's clipping).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    scale_dtype = parse_scale_dtype(scale_dtype)
    n, k = weight.shape
    gs = resolve_group_size(group_size, k)
    groups = to_groups(weight, gs)
    if clip_ratio is None:
        scale, zero_point = fmt.choose_params(groups)
    else:
        ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=groups.device)
        if ratio.dim() == 2:
            ratio = ratio.unsqueeze(-1)
        lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale, zero_point = fmt.choose_params(torch.clamp(groups, lo * ratio, hi * ratio))
    scale, zero_point = fmt.finalize_params(scale, zero_point, scale_dtype)
    codes = fmt.quantize(
        groups, scale.to(torch.float32), zero_point.to(torch.float32) if zero_point is not None else None
    )
    codes = codes.reshape(n, -1)[:, :k].contiguous()
    check_params_finite(fmt, scale.squeeze(-1), zero_point.squeeze(-1) if zero_point is not None else None,
                        codes, gs, weight)
    return QuantizedWeight(
        codes=codes,
        scale=scale.squeeze(-1).contiguous(),
        zero_point=zero_point.squeeze(-1).contiguous() if zero_point is not None else None,
        group_size=gs,
    )


def check_params_finite(fmt: WeightFormat, scale: Tensor, zero_point: Optional[Tensor],
                        codes: Optional[Tensor] = None, group_size: Optional[int] = None,
                        weight: Optional[Tensor] = None) -> None:
    """``ValueError`` unless ``scale`` / ``zero_point`` ``[N, G]`` (as stored) are finite and the weight
    they encode dequantizes to finite float32 values.

    Weights near the float32 limit (+-3e38), or merely large ones with float16 scales, give parameters
    that overflow their dtype, or codes whose value overflows when dequantized (``(code - mid) * scale``):
    the layer would compute with Inf/NaN. Fast path: both ends of the format's grid dequantize to finite
    values in every group (one pass over the parameters). Otherwise, with ``codes [N, K]`` and
    ``group_size``, only the rows whose grid ends overflow are dequantized, and pass if the codes they
    actually use are finite (symmetric formats never use their lowest code). ``weight`` (optional) only
    makes the message say how large the weights are.
    """
    problem = None
    for label, t in (("scale", scale), ("zero_point", zero_point)):
        if t is not None and not bool(torch.isfinite(t).all()):
            problem = f"{label} has NaN/Inf values"
            break
    grid = fmt.grid() if problem is None else None
    if grid is not None and grid.numel():
        s32 = scale.to(torch.float32)
        z32 = zero_point.to(torch.float32) if zero_point is not None else 0.0
        ends = torch.stack([float(grid.min()) * s32 + z32, float(grid.max()) * s32 + z32])
        rows = (~torch.isfinite(ends)).flatten(1).any(0) if ends.dim() > 1 else None
        if rows is not None and bool(rows.any()):
            problem = "codes dequantize to Inf in float32"
            if codes is not None and group_size is not None and ends.dim() == 3:
                rows = rows.view(scale.shape[0], -1).any(-1)
                values = dequantize_weight(codes[rows], scale[rows], zero_point[rows] if zero_point is not None
                                           else None, fmt, group_size)
                if bool(torch.isfinite(values).all()):
                    problem = None
    if problem is None:
        return
    where = f"{fmt.name or type(fmt).__name__} with {dtype_name(scale.dtype)} scales"
    if weight is None and problem.startswith(("scale", "zero_point")):
        raise ValueError(f"{problem} ({where})")  # parameters given as they are (from_codes, a file)
    size = ""
    if weight is not None and weight.numel():
        size = f", largest |weight| {float(weight.detach().abs().max().to(torch.float64)):.3g}"
    raise ValueError(f"weights too large for {where}{size}: {problem}; use float32 scales, more bits, "
                     f"or smaller weights")


def check_quantized(codes: Tensor, scale: Tensor, zero_point: Optional[Tensor], fmt: WeightFormat,
                    group_size: Optional[int], where: str) -> int:
    """Check codes ``[N, K]`` on ``fmt``'s grid (integers in ``[0, 2**bits)``) and parameters ``[N, G]``
    that are finite and dequantize to finite values (raises ``ValueError`` or ``TypeError`` naming
    ``where`` and the problem); returns the resolved group size."""
    if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.numel() == 0:
        raise ValueError(f"{where}: codes must be a non-empty 2-D tensor [out, in]")
    if codes.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"{where}: codes must be integers, got {codes.dtype}")
    if codes.device.type != "meta":
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= (1 << fmt.bits):
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: codes must lie in [0, {1 << fmt.bits}) for {fmt.bits}-bit format "
                             f"{fmt.name!r}, got {bad}")
    rows, k = codes.shape
    group_size = resolve_group_size(group_size, k)
    groups = num_groups(k, group_size)
    if fmt.has_zero_point != (zero_point is not None):
        need = "needs" if fmt.has_zero_point else "takes no"
        raise ValueError(f"{where}: format {fmt.name!r} {need} zero_point")
    for label, t in (("scale", scale), ("zero_point", zero_point)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{where}: {label} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != (rows, groups):
            raise ValueError(f"{where}: {label} has shape {tuple(t.shape)}, expected ({rows}, {groups})")
    if scale.device.type != "meta":
        try:
            check_params_finite(fmt, scale, zero_point, codes, group_size)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return group_size


def dequantize_weight(
    codes: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor],
    fmt: WeightFormat,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Codes ``[N, K]`` and parameters ``[N, G]`` back to a float ``[N, K]`` weight."""
    n, k = codes.shape
    g = scale.shape[-1]
    pad = g * group_size - k
    if pad < 0 or pad >= group_size:
        raise ValueError(f"{g} groups of {group_size} do not cover {k} columns")
    if pad:
        codes = F.pad(codes, (0, pad))
    grouped = codes.reshape(n, g, group_size)
    zp = zero_point.unsqueeze(-1) if zero_point is not None else None
    values = fmt.dequantize(grouped, scale.unsqueeze(-1), zp)
    return values.reshape(n, g * group_size)[:, :k].to(dtype)


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, fmt, group_size, scale_dtype):  # type: ignore[override]
        q = quantize_weight(weight.detach(), fmt, group_size, scale_dtype)
        return dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, weight.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # Straight-through estimator: the rounding is treated as identity for gradients.
        return grad, None, None, None


def fake_quantize(
    weight: Tensor,
    fmt: WeightFormat,
    group_size: Optional[int],
    scale_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Quantize then dequantize, differentiable through a straight-through estimator."""
    return _FakeQuantizeSTE.apply(weight, fmt, group_size, scale_dtype)


# ----------------------------------------------------------------------------------------------
# Activations: dynamic per-token symmetric quantization (W8A8)

ACT_BITS = (8,)


def quantize_activations(x: Tensor, bits: int = 8) -> "tuple[Tensor, Tensor]":
    """Per-token (per-row) symmetric quantization of activations ``[..., K]``.

    Returns ``(codes, scale)``: int8 codes in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` with the input's
    shape, and a float32 ``scale`` of shape ``[..., 1]`` such that ``x ~= codes * scale``. A row of zeros
    gets scale 1 (its codes are all 0). The scale is computed once per call from the current values
    (dynamic quantization: no calibration).
    """
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS}, got {bits!r}")
    qmax = (1 << (bits - 1)) - 1
    # No float32 copy of x: |x| and its row max are exact in x's own dtype, and dividing a bf16/fp16
    # tensor by the float32 scale computes in float32 (type promotion). Few passes over x matter: at
    # decode sizes this function costs as much as the int8 matmul it feeds.
    absmax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    scale = torch.where(absmax > 0, absmax / qmax, 1.0)
    # x / scale is at most qmax (up to float rounding, which round() absorbs): no clamp needed, but a
    # clamp keeps the codes valid even for inputs with Inf (which then give garbage, never a crash).
    codes = torch.div(x, scale).round_().clamp_(-qmax, qmax).to(torch.int8)
    return codes, scale


def fake_quantize_activations(x: Tensor, bits: int = 8) -> Tensor:
    """``quantize_activations`` followed by dequantization, in ``x``'s dtype (no gradient rule)."""
    codes, scale = quantize_activations(x, bits)
    return (codes.to(torch.float32) * scale).to(x.dtype)
