"""HQQ: Half-Quadratic Quantization (Badri & Shaji, 2023), calibration-free.

Round to nearest picks each group's zero point from the group's min/max. HQQ keeps that scale and
re-fits the zero point to minimise an ``lp`` norm (``p < 1``) of the weight error, which is robust to
the few weights that land far from the grid (outliers, clamped extremes). The non-convex problem is
split half-quadratically with an auxiliary error variable ``E``::

    min_{zp, E}  |E|_p^p + beta/2 * || E - (W - Q(W; s, zp)) ||^2

and solved by alternating

    (a) E  <- shrink_p(W - deq(W; s, zp), beta)              generalised soft-thresholding
    (b) zp <- mean over the group of (W - E - (code - mid) * s)    closed form, i.e.
        zp <- zp + mean(e - shrink_p(e)),  e = W - deq

with ``beta`` growing by ``kappa`` every iteration. Everything here is written in llmopt's affine
convention ``w = (code - mid) * scale + zero_point`` (the zero point is the float value of the mid
code), and the zero point is projected onto ``scale_dtype`` at every step, so every iterate that is
scored is a parameter set that can actually be stored: the result's error is the error of the stored
layer, and the first iterate *is* round to nearest (HQQ never returns anything worse than RTN on
its own error measure, the mean absolute error of each group). ``round_zero=True`` starts instead
from RTN's zero rounded to a whole code (the value 0 on the grid, as the hqq library does at 4
bits): slightly more weight error, but much lower perplexity on SmolLM2 (see docs/methods/hqq.md).

The shrinkage is not scale-invariant (as upstream): with ``beta = 10`` it is zero for every error
below ``beta ** (-1 / (2 - p))`` (0.17 for ``p = 0.7``), i.e. for all errors of typical LLM weights,
and each step is then a plain least-squares re-fit of the zero point to the current codes.

Groups are independent: each one stops on its own when its error stops decreasing (keeping its best
iterate), and a ragged last group is optimised on its real columns only, so a group's result never
depends on its neighbours or on padding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ...core.checks import check_flag, check_int, check_linear_weight, check_number
from ...core.formats import AffineFormat, WeightFormat, get_format
from ...core.primitives import QuantizedWeight, parse_scale_dtype, resolve_group_size, to_groups
from ...core.scheme import WeightQuant
from ...nn.quant_linear import QuantLinear
from ..base import MethodConfig, register_method
from ..quantized import WeightQuantFields

__all__ = ["HQQ", "hqq_quantize", "check_hqq_format"]

# Rows (groups) handled per block: bounds the float32 temporaries to a few x 16 MiB whatever the
# layer size, and keeps the per-block working set small.
_BLOCK_ELEMS = 1 << 22


def check_hqq_format(fmt: Union[str, WeightFormat]) -> AffineFormat:
    """``fmt`` as an asymmetric :class:`AffineFormat` (the only kind with a zero point to refit), else a
    ``ValueError`` naming the format."""
    fmt = get_format(fmt)
    if not isinstance(fmt, AffineFormat) or not fmt.has_zero_point:
        raise ValueError(
            f"HQQ optimises the zero point of an asymmetric affine (integer) format; format "
            f"{fmt.name or type(fmt).__name__!r} ({fmt!r}) has no zero point. Use int2/int3/int4/int8 "
            f"(asymmetric), or RTN for this format."
        )
    return fmt


def _check_options(iters, lp_norm, beta, kappa, round_zero=False) -> None:
    check_int("iters", iters, 0)
    check_number("lp_norm", lp_norm, 0, 1, low_open=True)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 < beta < math.inf):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not (1 <= kappa < math.inf):
        raise ValueError(f"kappa must be a finite number >= 1, got {kappa!r}")
    check_flag("round_zero", round_zero)


def _shrink(e: Tensor, beta: float, p: float) -> Tensor:
    """Generalised soft-thresholding, the proximal step of ``|x|^p`` (``p = 1``: plain soft threshold)."""
    a = e.abs()
    if p == 1:
        thresh = torch.full_like(a, 1.0 / beta)
    else:
        # |e|^(p-1) is +inf at e == 0; relu(0 - inf) = 0 then, which is the right limit.
        thresh = a.pow(p - 1.0).mul_(1.0 / beta)
    return torch.sign(e).mul_(a.sub_(thresh).clamp_min_(0.0))


def _optimize_block(w: Tensor, scale: Tensor, zp: Tensor, fmt: AffineFormat, *, iters: int, p: float,
                    beta: float, kappa: float, zp_dtype: torch.dtype, early_stop: bool) -> Tensor:
    """Best zero point per row of ``w`` ``[M, gs]`` (float32) for a fixed ``scale`` ``[M, 1]``.

    ``zp`` ``[M, 1]`` is the starting point, already representable in ``zp_dtype``. Rows are
    independent; a row stops (early_stop) at its first non-improving iterate. Returns ``[M, 1]``.
    """
    mid, qmax = float(fmt.mid), float(fmt.qmax)
    best_zp = zp.clone()
    best_err = torch.full_like(zp, math.inf)
    idx = torch.arange(w.shape[0], device=w.device)  # rows still iterating, as indices into the block
    cur_w, cur_s, cur_zp = w, scale, zp
    alive = torch.ones(w.shape[0], 1, dtype=torch.bool, device=w.device)
    for t in range(iters + 1):
        # Exactly AffineFormat.quantize / dequantize, in float: the codes scored here are the codes
        # that the stored parameters give.
        q = (cur_w - cur_zp).div_(cur_s).round_().add_(mid).clamp_(0.0, qmax)
        e = cur_w - q.sub_(mid).mul_(cur_s).add_(cur_zp)  # q now holds the dequantized weight
        del q
        err = e.abs().mean(dim=-1, keepdim=True)
        improved = (err < best_err[idx]) & alive
        best_err[idx] = torch.where(improved, err, best_err[idx])
        best_zp[idx] = torch.where(improved, cur_zp, best_zp[idx])
        if t == iters:
            break
        if early_stop:
            alive = improved
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if n_alive <= alive.shape[0] // 2:  # compact: stop paying for rows that are done
                keep = alive.squeeze(-1)
                idx, cur_w, cur_s, cur_zp, e = idx[keep], cur_w[keep], cur_s[keep], cur_zp[keep], e[keep]
                alive = alive[keep]
        # (a) + (b): zp <- mean(W - E - (q - mid) s) = zp + mean(e - shrink(e)), then project onto
        # the storable values so the next iterate is scored as it would be stored.
        # |e|^p-shrinkage is exactly zero below |e| = beta^(-1/(2-p)) (where |e| = |e|^(p-1)/beta); at
        # typical LLM weight magnitudes every error is far below it, so skip the pow() passes then.
        if float(e.abs().amax()) < beta ** (-1.0 / (2.0 - p)) * (1 - 1e-3):
            resid = e
        else:
            resid = e - _shrink(e, beta, p)
        cur_zp = (cur_zp + resid.mean(dim=-1, keepdim=True)).to(zp_dtype).to(torch.float32)
        beta *= kappa
    return best_zp


def _optimize_rows(w: Tensor, scale: Tensor, zp: Tensor, fmt: AffineFormat, **opts) -> Tensor:
    """Row blocks of :func:`_optimize_block` (rows are independent, so blocking changes nothing)."""
    rows = max(1, _BLOCK_ELEMS // max(1, w.shape[1]))
    out = [
        _optimize_block(w[i:i + rows], scale[i:i + rows], zp[i:i + rows], fmt, **opts)
        for i in range(0, w.shape[0], rows)
    ]
    return torch.cat(out, dim=0)


@torch.no_grad()
def hqq_quantize(
    weight: Tensor,
    fmt: Union[str, WeightFormat],
    group_size: Optional[int],
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 1e1,
    kappa: float = 1.01,
    scale_dtype: torch.dtype = torch.bfloat16,
    early_stop: bool = True,
    round_zero: bool = False,
) -> QuantizedWeight:
    """HQQ-quantize a 2-D weight ``[N, K]`` with an asymmetric affine format.

    The scale of each group is the min/max (RTN) scale, rounded to ``scale_dtype``; the zero point
    starts at RTN's (or, with ``round_zero``, at the nearest whole code, so that the value 0 is on
    the grid) and is refined by ``iters`` half-quadratic steps (``lp_norm``-norm shrinkage,
    closed-form zero update, ``beta`` multiplied by ``kappa`` per step). Each group keeps its
    lowest-mean-absolute-error iterate, the start included, so the result is never worse than the
    start on that measure; with ``early_stop`` a group stops at its first non-improving step.
    Codes are the nearest ones for the stored (``scale_dtype``) parameters.

    Returns a :class:`~llmopt.quant.primitives.QuantizedWeight` in llmopt's convention
    (``zero_point`` = float value of the mid code).
    """
    fmt = check_hqq_format(fmt)
    _check_options(iters, lp_norm, beta, kappa, round_zero)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {shape}")
    if not weight.is_floating_point():
        raise TypeError(f"unsupported weight dtype {weight.dtype}; expected a floating dtype")
    scale_dtype = parse_scale_dtype(scale_dtype)
    n, k = weight.shape
    gs = resolve_group_size(group_size, k)
    groups = to_groups(weight.detach(), gs)  # [N, G, gs] float32, last group padded
    g = groups.shape[1]
    scale, zp = fmt.choose_params(groups)  # RTN parameters, [N, G, 1]
    scale = scale.to(scale_dtype)
    # float16 cannot hold the 1e-8 floor of a constant group's scale: keep it positive, so the
    # stored grid stays well defined (a zero scale would make every code decode to the zero point).
    scale = torch.where(scale > 0, scale, torch.finfo(scale_dtype).tiny)
    s32 = scale.to(torch.float32)
    if round_zero:
        # Start from the integer code nearest to RTN's zero (code of the value 0 in the
        # unsigned convention w = (code - z) * scale): the value 0 then sits on the grid.
        lo = groups.amin(dim=-1, keepdim=True)
        zp = (fmt.mid - torch.round(-lo / s32)) * s32
    z32 = zp.to(scale_dtype).to(torch.float32)
    opts = dict(iters=iters, p=float(lp_norm), beta=float(beta), kappa=float(kappa), zp_dtype=scale_dtype,
                early_stop=early_stop)

    tail = k - (g - 1) * gs  # real columns of the last group
    if tail == gs:
        z32 = _optimize_rows(groups.reshape(n * g, gs), s32.reshape(n * g, 1), z32.reshape(n * g, 1),
                             fmt, **opts).reshape(n, g, 1)
    else:
        # The padded columns of the last group must not pull its zero point: optimise it on its
        # real columns alone (exactly as if that slice were quantized on its own).
        parts = []
        if g > 1:
            body = groups[:, :-1].reshape(n * (g - 1), gs)
            parts.append(_optimize_rows(body, s32[:, :-1].reshape(-1, 1), z32[:, :-1].reshape(-1, 1), fmt,
                                        **opts).reshape(n, g - 1, 1))
        last = groups[:, -1, :tail].contiguous()
        parts.append(_optimize_rows(last, s32[:, -1], z32[:, -1], fmt, **opts).reshape(n, 1, 1))
        z32 = torch.cat(parts, dim=1)

    # As stored: z32 in scale_dtype (exact, every iterate was projected onto it); in the "int"/"min"
    # zero-point modes the optimised zero point moves onto the mode's grid (its nearest integer zero
    # point, or a minimum representable in scale_dtype).
    scale, zero_point = fmt.finalize_params(s32, z32, scale_dtype)
    s32 = scale.to(torch.float32)
    codes = fmt.quantize(groups, s32, zero_point.to(torch.float32))
    codes = codes.reshape(n, -1)[:, :k].contiguous()
    return QuantizedWeight(
        codes=codes,
        scale=scale.squeeze(-1).contiguous(),
        zero_point=zero_point.squeeze(-1).contiguous(),
        group_size=gs,
    )


@dataclasses.dataclass(frozen=True)
class HQQ(WeightQuantFields, MethodConfig):
    """Half-Quadratic Quantization of every targeted ``nn.Linear`` (no calibration data).

    Args:
        format: an asymmetric affine format: ``"int8"``, ``"int4"``, ``"int3"``, ``"int2"``.
        group_size: columns sharing one scale/zero point; ``None`` for one per output row.
        iters: half-quadratic zero-point updates per group (``0`` gives RTN).
        lp_norm: ``p`` of the error norm being minimised, in ``(0, 1]``; smaller is more
            outlier-tolerant.
        scale_dtype: dtype of stored scales/zero points (``"bfloat16"`` by default).
        kernel: ``"auto"`` or a kernel name from ``llmopt.kernels.list_kernels()``.
            With ``symmetric`` (``None`` or ``False`` only: HQQ refits the zero point, so the format is
            asymmetric) these are ``config.scheme`` (a :class:`~llmopt.core.scheme.WeightQuant`).
        round_zero: start from RTN's zero point rounded to a whole code (the hqq library's
            default at 4 bits), which puts the value 0 on the grid (the default since issue 17:
            measured better on SmolLM2); ``False`` starts from RTN exactly and never ends worse than
            it (per group, mean absolute error).
    """

    name = "hqq"
    needs_calibration = False

    # format, group_size, symmetric, scale_dtype, kernel come from WeightQuantFields; different defaults:
    group_size: Optional[int] = 64
    iters: int = 20
    lp_norm: float = 0.7
    # True since issue 17: the better measured setting (SmolLM2 int4 g64 perplexity 26.84 vs 27.85).
    round_zero: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()  # unknown / non-affine format fails here, before any layer is touched
        _check_options(self.iters, self.lp_norm, 1e1, 1.01, self.round_zero)

    def check_scheme(self, scheme: WeightQuant) -> None:
        check_hqq_format(scheme.weight_format())

    @classmethod
    def examples(cls):
        return [cls("int4", 64), cls("int3", 64), cls("int2", 32), cls("int8", None),
                cls("int4", 32, iters=5, lp_norm=1.0, scale_dtype="float16"),
                cls("int3", 64, round_zero=True)]

    @classmethod
    def benchmark_configs(cls):
        # round_zero=True measured far better on SmolLM2 (int4 g64 26.8 vs 27.9, int3 g64 70 vs 196).
        return [cls("int4", 64, round_zero=True), cls("int4", 128, round_zero=True), cls("int3", 64, round_zero=True)]

    def label(self) -> str:
        group = self.scheme.group_label()
        extra = "" if (self.iters, self.lp_norm) == (20, 0.7) else f" it{self.iters} p{self.lp_norm:g}"
        return f"hqq {self.format} {group}{extra}{' rz' if self.round_zero else ''}"


@register_method(HQQ)
def _apply_hqq(linear: nn.Module, config: HQQ, *, name: str = "", **kwargs) -> QuantLinear:
    weight = linear.weight
    check_linear_weight(weight)
    scheme = config.scheme
    fmt = scheme.weight_format()
    q = hqq_quantize(weight.detach(), fmt, scheme.group_size, iters=config.iters, lp_norm=config.lp_norm,
                     scale_dtype=scheme.scale_torch_dtype, round_zero=config.round_zero)
    bias = getattr(linear, "bias", None)
    return QuantLinear.from_codes(
        q.codes, q.scale, q.zero_point, format=fmt, group_size=q.group_size,
        bias=bias.detach() if bias is not None else None, dtype=weight.dtype, kernel=scheme.kernel,
    )
