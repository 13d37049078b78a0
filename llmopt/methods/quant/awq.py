"""AWQ (Lin et al., 2023): activation-aware weight quantization.

A few input channels carry much larger activations than the rest; their weights matter most. AWQ
multiplies those weight columns by ``s > 1`` before round-to-nearest (a finer grid for them) and
divides the input by ``s`` (exact in float). Two searches, both scored on the layer's output error:

* **scale search**: ``s = mean|x|^alpha`` (optionally ``/ mean|w|^(1-alpha)``, "duo scaling"),
  centred so that ``sqrt(max * min) = 1``, for ``alpha`` on a grid in ``[0, 1)``; plain RTN (``s = 1``) is always a
  candidate, so the search never does worse than RTN on the score. Layers reading the same input (q/k/v,
  gate/up) share one ``s`` when it can be folded into the norm that feeds them.
* **clip search**: per output row and group, the range ``[min, max]`` is shrunk by a ratio on a grid
  in ``[1 - max_shrink, 1]`` (outliers saturate, the rest get a finer step).

The score is the exact output error ``||X (W - W_q)^T||^2 = trace(D H D^T)`` with ``H = X^T X / n``
from the calibration runner's statistics, so no activations are stored (the reference
implementation keeps a sample of activations and re-runs the modules). The clip search uses the
block-diagonal part of ``H`` (one group's columns at a time), as the reference does.

``1 / s`` is folded into the producing norm when exact (see :mod:`llmopt.quant.scaling`), otherwise
kept on the layer as ``QuantLinear.input_scale``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ...calibration import LayerStats, StatsSpec
from ...calibration.graph import InputSource
from ...core.checks import check_choice, check_flag, check_int, check_linear_weight, check_number
from ...core.formats import WeightFormat
from ...core.primitives import QuantizedWeight, dequantize_weight, num_groups, quantize_weight, resolve_group_size
from ...nn.quant_linear import QuantLinear
from ..base import MethodConfig, register_method
from ..quantized import WeightQuantFields
from .gptq import gptq_quantize
from .scaling import fold_candidate, fold_inverse_scale, input_groups, relative_name

__all__ = ["AWQ", "AWQSearchFields", "awq_search_scale", "awq_search_clip", "output_error", "awq_block_plan", "LayerPlan"]


def output_error(delta: Tensor, hessian: Tensor) -> Tensor:
    """``trace(delta H delta^T)``: squared output error of a weight error ``delta [N, K]``."""
    return ((delta @ hessian) * delta).sum()


def _rtn(weight: Tensor, fmt: WeightFormat, group_size: int, scale_dtype: torch.dtype,
         clip_ratio: Optional[Tensor] = None) -> Tensor:
    """Round-to-nearest then back to float32 (what the stored layer will multiply by)."""
    q = quantize_weight(weight, fmt, group_size, scale_dtype, clip_ratio=clip_ratio)
    return dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, torch.float32)


def _weight_salience(weights: Sequence[Tensor], group_size: int) -> Tensor:
    """Mean over output rows of ``|w|`` normalised by its group's absmax: AWQ's per-column weight size."""
    parts = []
    for w in weights:
        n, k = w.shape
        g = num_groups(k, group_size)
        wa = w.abs().to(torch.float32)
        pad = g * group_size - k
        if pad:
            wa = torch.cat([wa, wa[:, -1:].expand(n, pad)], dim=1)
        grouped = wa.view(n, g, group_size)
        grouped = grouped / grouped.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        parts.append(grouped.view(n, -1)[:, :k])
    return torch.cat(parts, dim=0).mean(dim=0)


def awq_search_scale(
    weights: Sequence[Tensor],
    hessian: Tensor,
    act_mean: Tensor,
    fmt: WeightFormat,
    group_size: Optional[int],
    *,
    grid: int = 20,
    duo_scaling: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> Tuple[Tensor, Dict[str, Any]]:
    """Best per-input-channel scale ``s [K]`` for layers that all read the same input.

    Candidates: ``s = 1`` (plain RTN) and, for each ``alpha``, ``mean|x|^alpha`` (``/ mean|w|^(1-alpha)``
    with ``duo_scaling``) scaled so that ``sqrt(max(s) * min(s)) = 1``.

    Args:
        weights: the layers' weights ``[N_i, K]`` (float; not modified).
        hessian: ``[K, K]`` mean ``x^T x`` of the shared input (float32 is plenty).
        act_mean: ``[K]`` mean ``|x|`` per input channel.
        fmt, group_size, scale_dtype: the quantization the layers will get.
        grid: number of ``alpha`` values tried in ``[0, 1)``.
        duo_scaling: divide by ``mean|w|^(1-alpha)`` too (AutoAWQ's variant).

    Returns:
        ``(s, info)`` with ``info = {"alpha", "loss", "loss_rtn"}`` (summed output errors).
    """
    k = hessian.shape[0]
    gs = resolve_group_size(group_size, k)
    h = hessian.to(torch.float32)
    ws = [w.detach().to(torch.float32) for w in weights]
    x = act_mean.to(torch.float32).clamp_min(1e-8)
    w_mean = _weight_salience(ws, gs).clamp_min(1e-8) if duo_scaling else None
    def loss_of(s: Tensor) -> float:
        return sum(float(output_error(w - _rtn(w * s, fmt, gs, scale_dtype) / s, h)) for w in ws)

    # Plain RTN (s = 1) is always a candidate, so the result is never worse than RTN on the score
    # (with duo scaling, alpha = 0 is not s = 1).
    loss_rtn = loss_of(torch.ones_like(x))
    best: Tuple[float, float, Tensor] = (loss_rtn, 0.0, torch.ones_like(x))
    for i in range(grid):
        alpha = i / grid
        s = x.pow(alpha)
        if w_mean is not None:
            s = s / w_mean.pow(1 - alpha)
        s = s.clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales: sqrt(max * min) = 1
        if w_mean is None and i == 0:
            continue  # s = 1: already scored
        loss = loss_of(s)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], {"alpha": best[1], "loss": best[0], "loss_rtn": loss_rtn}


def awq_search_clip(
    weight: Tensor,
    hessian: Tensor,
    fmt: WeightFormat,
    group_size: Optional[int],
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Per row and group, the range-shrink ratio in ``[1 - max_shrink, 1]`` with the least output error.

    ``weight [N, K]`` and ``hessian [K, K]`` are those the quantizer sees (already rescaled). Each
    group is scored with its own diagonal block of ``hessian``. Returns ratios ``[N, G]`` (float32).
    """
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    gs = resolve_group_size(group_size, k)
    g = num_groups(k, gs)
    pad = g * gs - k
    h = hessian.to(torch.float32)
    if pad:
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))  # padded columns carry no error
    blocks = torch.stack([h[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(g)])  # [G, gs, gs]
    best_err = torch.full((n, g), float("inf"), device=w.device)
    best_ratio = torch.ones(n, g, device=w.device)
    for i in range(grid):
        ratio = 1.0 - max_shrink * i / grid
        delta = w - _rtn(w, fmt, gs, scale_dtype, clip_ratio=torch.full((n, g), ratio, device=w.device))
        if pad:
            delta = torch.nn.functional.pad(delta, (0, pad))
        d = delta.view(n, g, gs)
        err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


# ----------------------------------------------------------------------------------------------
# The method


@dataclasses.dataclass(frozen=True)
class AWQSearchFields:
    """AWQ's scale and clip search options, shared by :class:`AWQ` and the methods that start from its
    plan (:class:`~llmopt.methods.quant.learned_round.LearnedRound`); see :class:`AWQ` for their meaning."""

    grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    fold: bool = True


@dataclasses.dataclass(frozen=True)
class AWQ(AWQSearchFields, WeightQuantFields, MethodConfig):
    """AWQ: activation-aware per-channel scaling plus range clipping, then round to nearest.

    Args:
        format, group_size, symmetric, scale_dtype, kernel: the quantization (as :class:`RTN`;
            ``config.scheme``, a :class:`~llmopt.core.scheme.WeightQuant`).
        grid: ``alpha`` values tried by the scale search.
        duo_scaling: also divide the scale by the weights' per-column size (AutoAWQ's variant).
        clip: run the clip search.
        clip_grid, max_shrink: clip ratios tried, in ``[1 - max_shrink, 1]``.
        fold: fold ``1 / s`` into the producing norm where exact (otherwise it stays on the layer).
        propagate: what feeds the next block during calibration: ``"float"`` (the uncompressed
            block's outputs, as the reference implementation; one forward per block) or
            ``"quantized"`` (the compressed block's outputs; a second forward per block).
        rounding: how the scaled (and clipped) weight is rounded: ``"rtn"`` (round to nearest, AWQ as
            published) or ``"gptq"`` (GPTQ's error feedback through the scaled inputs' Hessian, in the
            same calibration pass: AWQ's scales and clipping, GPTQ's rounding).
        act_order, damp: GPTQ's options when ``rounding="gptq"``.
    """

    name = "awq"
    needs_calibration = True

    # (grid, duo_scaling, clip, clip_grid, max_shrink, fold: from AWQSearchFields)
    propagate: str = "float"
    rounding: str = "rtn"
    act_order: bool = True
    damp: float = 0.01

    def __post_init__(self) -> None:
        check_choice("propagate", self.propagate, ("quantized", "float"))
        check_choice("rounding", self.rounding, ("rtn", "gptq"))
        check_flag("act_order", self.act_order)
        check_number("damp", self.damp, 0, 1, low_open=True, high_open=True)
        super().__post_init__()  # the quantization scheme
        check_int("grid", self.grid, 1)
        check_int("clip_grid", self.clip_grid, 1)
        check_number("max_shrink", self.max_shrink, 0, 1, high_open=True)
        for flag in ("duo_scaling", "clip", "fold"):
            check_flag(flag, getattr(self, flag))

    def stats_spec(self) -> StatsSpec:
        # GPTQ's Cholesky of the (scaled) Hessian wants float64 sums; the scale search is fine in float32.
        return StatsSpec(hessian=True, dtype=torch.float64 if self.rounding == "gptq" else torch.float32)

    @classmethod
    def examples(cls):
        return [cls("int4", 32), cls("int4", 64, duo_scaling=True, fold=False), cls("int3", 64, clip=False),
                cls("nf4", 64)]

    @classmethod
    def benchmark_configs(cls):
        return [cls("int4", 64), cls("int3", 64)]

    def label(self) -> str:
        return (f"awq {self.format} {self.scheme.group_label()}"
                + (" +gptq" if self.rounding == "gptq" else "")
                + (" quantized-propagation" if self.propagate == "quantized" else ""))


def _layer_weight(name: str, layer: nn.Module) -> Tensor:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"layer {name!r}: AWQ quantizes nn.Linear layers, got {type(layer).__name__}")
    try:
        check_linear_weight(layer.weight)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"layer {name!r}: {exc}") from None
    return layer.weight.detach()


def _stats_of(name: str, stats: Dict[str, LayerStats]) -> LayerStats:
    st = stats.get(name)
    if st is None or st.count == 0:
        raise ValueError(f"layer {name!r} received no inputs during calibration")
    try:
        st.check_finite()  # with Inf in H every candidate scores NaN and s = 1 would win silently
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from None
    return st


@dataclasses.dataclass
class LayerPlan:
    """How one layer of a block is quantized: its quantization (of ``W * s``) and the ``1 / s`` the layer
    keeps on its input (``None`` when folded into a norm)."""

    quantized: QuantizedWeight
    input_scale: Optional[Tensor]

    def to_module(self, layer: nn.Linear, kernel: str, fmt: WeightFormat) -> QuantLinear:
        """The :class:`QuantLinear` replacing ``layer``."""
        q = self.quantized
        return QuantLinear.from_codes(
            q.codes, q.scale, q.zero_point, format=fmt, group_size=q.group_size,
            bias=layer.bias.detach() if layer.bias is not None else None, dtype=layer.weight.dtype,
            kernel=kernel, input_scale=self.input_scale,
        )


def awq_block_plan(layers: Dict[str, nn.Module], config: AWQ, stats: Dict[str, LayerStats],
                   sources: Dict[str, InputSource], root: nn.Module, prefix: str = "", *,
                   search_scales: bool = True) -> Tuple[Dict[str, LayerPlan], Dict[str, nn.Module]]:
    """AWQ (scale search, clip search, RTN or GPTQ rounding) on the targeted linears of one block,
    without changing anything: ``({layer name: LayerPlan}, {norm name: norm with 1/s folded in})``.

    ``search_scales=False`` keeps ``s = 1`` (clipping and rounding only: GPTQ with AWQ's clip search).
    """
    scheme = config.scheme
    fmt, group_size, scale_dtype = scheme.weight_format(), scheme.group_size, scheme.scale_torch_dtype
    weights = {name: _layer_weight(name, layer) for name, layer in layers.items()}
    plans: Dict[str, LayerPlan] = {}
    norms: Dict[str, nn.Module] = {}
    for group in input_groups(list(layers), sources):
        producer = fold_candidate(group, sources, root, prefix) if config.fold and search_scales else None
        # A foldable group shares one scale; otherwise each layer gets its own (more freedom, same cost).
        subgroups = [group] if producer is not None else [[name] for name in group]
        for members in subgroups:
            st = _stats_of(members[0], stats)
            hessian = st.mean_hessian().to(torch.float32)
            act_mean = st.col_abs_mean().to(torch.float32)
            if search_scales:
                s, _info = awq_search_scale([weights[m] for m in members], hessian, act_mean, fmt,
                                            group_size, grid=config.grid, duo_scaling=config.duo_scaling,
                                            scale_dtype=scale_dtype)
            else:
                s = torch.ones_like(act_mean)
            folded = None
            if producer is not None:
                norm = root.get_submodule(relative_name(producer, prefix))
                folded = fold_inverse_scale(norm, s.to(norm.weight.device))
                if folded is not None:
                    norms[producer] = folded
            h_scaled = hessian / s.unsqueeze(0) / s.unsqueeze(1)
            for name in members:
                w_scaled = weights[name].to(torch.float32) * s
                ratio = None
                if config.clip:
                    ratio = awq_search_clip(w_scaled, h_scaled, fmt, group_size, grid=config.clip_grid,
                                            max_shrink=config.max_shrink, scale_dtype=scale_dtype)
                if config.rounding == "gptq":
                    q, _ = gptq_quantize(w_scaled, h_scaled.to(torch.float64), fmt, group_size,
                                         act_order=config.act_order, damp=config.damp,
                                         scale_dtype=scale_dtype, clip_ratio=ratio)
                else:
                    q = quantize_weight(w_scaled, fmt, group_size, scale_dtype, clip_ratio=ratio)
                keep_scale = None if folded is not None or not search_scales else 1.0 / s
                plans[name] = LayerPlan(q, keep_scale)
    return plans, norms


@register_method(AWQ, scope="block")
def _apply_awq(layers: Dict[str, nn.Module], config: AWQ, *, stats: Dict[str, LayerStats],
               sources: Dict[str, InputSource], root: nn.Module, prefix: str = "",
               **_: Any) -> Dict[str, nn.Module]:
    plans, norms = awq_block_plan(layers, config, stats, sources, root, prefix)
    fmt = config.scheme.weight_format()
    out: Dict[str, nn.Module] = dict(norms)
    for name, plan in plans.items():
        out[name] = plan.to_module(layers[name], config.scheme.kernel, fmt)
    return out
