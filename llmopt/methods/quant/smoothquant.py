"""SmoothQuant (Xiao et al., 2023) + W8A8: int8 weights *and* int8 activations.

Activations of LLMs have a few channels with outliers up to 100x the rest, which ruin an int8 grid
shared by a whole token; weights have no such outliers. SmoothQuant moves the difficulty from the
activations to the weights with a per-input-channel factor

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(``max|W_j|`` over every layer that reads the input), computing ``(x / s) @ (W * s).T``. The weights
``W * s`` are then quantized to symmetric per-channel int8, and at run time each token's activations
are quantized to int8 with their own scale (dynamic, no calibration), so the matmul is int8 x int8
with int32 accumulation (on CPU oneDNN's int8 GEMM with a prepacked weight, ``int8_onednn_cpu``, where the CPU has
AMX and it measures fast, else ``torch._int_mm`` in ``int8_dynamic_cpu``).

``1 / s`` is folded into the producing norm where exact (q/k/v after the attention norm, gate/up
after the MLP norm), otherwise carried as ``QuantLinear.input_scale`` (o_proj, down_proj), so every
layer is smoothed. ``alpha=None`` skips smoothing (plain W8A8).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ...calibration import LayerStats, StatsSpec
from ...calibration.graph import InputSource
from ...core.checks import check_choice, check_flag, check_linear_weight, check_number
from ...core.primitives import quantize_weight
from ...nn.quant_linear import QuantLinear
from ..base import MethodConfig, register_method
from ..quantized import QuantizesWeights
from .scaling import fold_candidate, fold_inverse_scale, input_groups, relative_name

__all__ = ["SmoothQuant", "smoothing_factors"]


def smoothing_factors(act_absmax: Tensor, weights: Sequence[Tensor], alpha: float,
                      min_value: float = 1e-5) -> Tensor:
    """``s [K] = act_absmax ** alpha / max_rows|W| ** (1 - alpha)`` over all ``weights [N_i, K]``.

    Channels that never saw a non-zero activation (or whose weights are all zero) get ``s = 1``.
    """
    a = act_absmax.to(torch.float32)
    w = torch.stack([x.detach().abs().amax(dim=0).to(torch.float32) for x in weights]).amax(dim=0)
    s = a.clamp_min(min_value).pow(alpha) / w.clamp_min(min_value).pow(1 - alpha)
    dead = (a <= 0) | (w <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp_min(min_value))


@dataclasses.dataclass(frozen=True)
class SmoothQuant(QuantizesWeights, MethodConfig):
    """SmoothQuant smoothing + W8A8 (int8 per-channel weights, dynamic per-token int8 activations).

    Args:
        alpha: migration strength in ``[0, 1]`` (0.5 in the paper); ``None`` for no smoothing.
        fold: fold ``1 / s`` into the producing norm where exact (else it stays on the layer).
        scale_dtype: dtype of the stored per-row weight scales.
        kernel: ``"auto"`` (on CPU the fastest measured W8A8 kernel: ``int8_onednn_cpu`` with AMX, else
            ``int8_dynamic_cpu``) or a kernel name.
        propagate: ``"float"`` (statistics of the float model, one forward per block, as the paper)
            or ``"quantized"`` (of the W8A8 model so far).

    ``config.scheme`` (a :class:`~llmopt.core.scheme.WeightQuant`) is symmetric per-channel int8 with
    this ``scale_dtype`` and ``kernel``.
    """

    name = "smoothquant"
    needs_calibration = True
    scheme_fixed = {"format": "int8", "group_size": None, "symmetric": True}

    alpha: Optional[float] = 0.5
    fold: bool = True
    scale_dtype: str = "float32"
    kernel: str = "auto"
    propagate: str = "float"

    def __post_init__(self) -> None:
        check_choice("propagate", self.propagate, ("quantized", "float"))
        if self.alpha is not None:
            check_number("alpha (None: no smoothing)", self.alpha, 0, 1)
        check_flag("fold", self.fold)
        super().__post_init__()  # the quantization scheme

    @staticmethod
    def stats_spec() -> StatsSpec:
        return StatsSpec(hessian=False, dtype=torch.float32)

    @classmethod
    def examples(cls):
        return [cls(), cls(alpha=None), cls(alpha=0.8, fold=False)]

    @classmethod
    def benchmark_configs(cls):
        return [cls(alpha=0.5)]

    def label(self) -> str:
        return ("smoothquant w8a8" + (f" a={self.alpha}" if self.alpha is not None else " (no smoothing)")
                + (" quantized-propagation" if self.propagate == "quantized" else ""))


@register_method(SmoothQuant, scope="block")
def _apply_smoothquant(layers: Dict[str, nn.Module], config: SmoothQuant, *, stats: Dict[str, LayerStats],
                       sources: Dict[str, InputSource], root: nn.Module, prefix: str = "",
                       **_: Any) -> Dict[str, nn.Module]:
    scheme = config.scheme
    fmt, scale_dtype = scheme.weight_format(), scheme.scale_torch_dtype
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer {name!r}: SmoothQuant quantizes nn.Linear layers, got {type(layer).__name__}")
        try:
            check_linear_weight(layer.weight)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from None
        if stats.get(name) is None or stats[name].count == 0:
            raise ValueError(f"layer {name!r} received no inputs during calibration")
        try:
            stats[name].check_finite()  # an Inf absmax would give Inf/NaN smoothing factors
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
    out: Dict[str, nn.Module] = {}
    for group in input_groups(list(layers), sources):
        producer = fold_candidate(group, sources, root, prefix) if (config.fold and config.alpha is not None) else None
        subgroups = [group] if producer is not None else [[name] for name in group]
        for members in subgroups:
            s = None
            folded = None
            if config.alpha is not None:
                s = smoothing_factors(stats[members[0]].absmax, [layers[m].weight for m in members], config.alpha)
                if producer is not None:
                    norm = root.get_submodule(relative_name(producer, prefix))
                    folded = fold_inverse_scale(norm, s.to(norm.weight.device))
                    if folded is not None:
                        out[producer] = folded
            for name in members:
                layer = layers[name]
                w = layer.weight.detach().to(torch.float32)
                if s is not None:
                    w = w * s.to(w.device)
                q = quantize_weight(w, fmt, scheme.group_size, scale_dtype)
                carry = s is not None and folded is None
                out[name] = QuantLinear.from_codes(
                    q.codes, q.scale, q.zero_point, format=fmt, group_size=scheme.group_size,
                    bias=layer.bias.detach() if layer.bias is not None else None, dtype=layer.weight.dtype,
                    kernel=scheme.kernel, input_scale=(1.0 / s) if carry else None, act_bits=8,
                )
    return out
