"""Low-rank compensation of quantization error: ``W ~= deq(Q) + L R``.

Quantize the weight first (``Q``, as :class:`~llmopt.RTN` does, or HQQ), then spend a few extra
parameters on the part of the error that is low-rank: with ``E = W - deq(Q)``, keep the best rank-``r``
approximation ``L R`` of ``E`` (``L = up [N, r]``, ``R = down [r, K]``). The layer computes
``deq(Q) x + L (R x)`` (:class:`~llmopt.nn.compensated_linear.CompensatedLinear`, a ``QuantLinear`` with two
extra factors). This is the idea of LQER / ZeroQuant-V2's
LoRC and the first step of LoftQ (which then alternates re-quantizing ``W - L R``):

* **plain** (``activation_aware=False``): truncated SVD of ``E``; the weight error drops from
  ``||E||_F^2`` to ``||E||_F^2 - sum_{i<=r} sigma_i(E)^2`` (Eckart-Young), no calibration data.
* **activation-aware** (``activation_aware=True``, needs ``calibration=``): minimise the output error
  ``||X (E - L R)^T||_F`` instead, with ``H = X^T X / n`` from the calibration runner: SVD of the
  whitened residual ``E C`` (``C C^T`` = damped ``H``, SVD-LLM's whitening; see
  :mod:`llmopt.lowrank.activation_aware`), mapped back through ``C^{-1}``. The output error left is
  exactly the sum of the discarded ``sigma_i(E C)^2``, the least any rank-``r`` correction can leave.

The factors are stored in ``factor_dtype`` (bfloat16 by default, like the quantization scales): at
rank ``r`` they add ``16 r (N + K) / (N K)`` bits per weight, counted by ``memory_report`` and the
``compress_`` report. The result is trainable as QLoRA through :meth:`CompensatedLinear.to_lora`
(or :func:`compensation_to_lora_` for a whole model): adapters that start at the factors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ...calibration import LayerStats, StatsSpec
from ...core.checks import check_choice, check_flag, check_int, check_linear_weight, check_number, parse_dtype
from ...core.errors import SkipLayer
from ...core.scheme import WeightQuant
from ...core.targets import replace_modules
from ...nn.compensated_linear import CompensatedLinear
from ...nn.lowrank_linear import FACTOR_ATTR
from ...nn.quant_linear import QuantLinear
from ...solvers.decompose import Decomposition, _check_rank, decompose, whitened_svd
from ..base import MethodConfig, register_method
from ..quant.hqq import check_hqq_format, hqq_quantize
from ..quantized import WeightQuantFields
from .lora import _freeze_all_but_adapters
from .svd import is_factor

__all__ = ["QuantLowRank", "CompensatedLinear", "decompose_residual", "compensation_factors",
           "quantize_base", "compensation_to_lora_", "BASES"]

BASES = ("rtn", "hqq")


# ----------------------------------------------------------------------------------------------
# Pure maths


def decompose_residual(residual: Tensor, hessian: Optional[Tensor] = None, damp: float = 0.01) -> Decomposition:
    """SVD of the quantization error ``residual [N, K]``: plain, or whitened by ``hessian [K, K]``.

    Plain: float32 (float64 for a float64 residual). Whitened: float64, ``hessian`` damped by
    ``damp * mean(diag H)`` (more if its Cholesky factorization fails); an all-zero ``hessian`` falls
    back to the plain SVD. ``.factors(r)`` of the result gives ``(down, up)``.
    """
    if residual.dim() != 2:
        raise ValueError(f"expected a 2-D residual [out_features, in_features], got {tuple(residual.shape)}")
    if hessian is None:
        return decompose(residual)
    return whitened_svd(residual, hessian, damp)


def compensation_factors(residual: Tensor, rank: int, *, hessian: Optional[Tensor] = None, damp: float = 0.01,
                         dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """``(down [r, K], up [N, r])`` with ``up @ down`` the best rank-``r`` correction of ``residual``.

    Best for the Frobenius norm (``hessian=None``) or for the output error ``trace(D H D^T)``,
    ``D = residual - up @ down`` (``hessian`` given; the damped one). ``dtype``: of the factors
    (default: the residual's); ``sqrt(sigma)`` goes to both factors.
    """
    if residual.dim() != 2:
        raise ValueError(f"expected a 2-D residual [out_features, in_features], got {tuple(residual.shape)}")
    _check_rank(rank, tuple(residual.shape))
    return decompose_residual(residual, hessian, damp).factors(rank, dtype or residual.dtype)


# ----------------------------------------------------------------------------------------------
# The method: config + handler


@dataclasses.dataclass(frozen=True)
class QuantLowRank(WeightQuantFields, MethodConfig):
    """Quantize every targeted ``nn.Linear``, then add a rank-``r`` correction of the quantization error.

    Replaces each layer with a :class:`~llmopt.nn.CompensatedLinear` computing ``deq(Q) x + L (R x)``.

    Args:
        format, group_size, symmetric, scale_dtype, kernel: the quantization ``Q`` (as :class:`~llmopt.RTN`;
            ``config.scheme``, a :class:`~llmopt.core.scheme.WeightQuant`).
        rank: rank ``r`` of the correction (at most ``min(N, K)`` of every targeted layer).
        activation_aware: fit the correction to the output error on calibration inputs (whitened SVD
            with the layer's input Hessian; needs ``calibration=``) instead of the weight error.
        base: how ``Q`` is computed: ``"rtn"`` (round to nearest, exactly :class:`~llmopt.RTN`'s layer)
            or ``"hqq"`` (HQQ's zero-point refinement with ``round_zero=True``, the setting measured best
            on SmolLM2; asymmetric affine formats only).
        factor_dtype: dtype of the stored factors; ``None`` keeps the layer's weight dtype.
        damp: relative Hessian damping of the whitening (activation-aware only).
        propagate: what feeds the next block during calibration: ``"float"`` (the uncompressed block's
            outputs, as SVD-LLM; one forward per block) or ``"quantized"`` (the compressed block's).
    """

    name = "quant_lowrank"

    # format, group_size, symmetric, scale_dtype, kernel come from WeightQuantFields; different defaults:
    format: str = "int3"
    group_size: Optional[int] = 64
    rank: int = 32
    activation_aware: bool = False
    base: str = "rtn"
    factor_dtype: Optional[str] = "bfloat16"
    damp: float = 0.01
    propagate: str = "float"

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_choice("base", self.base, BASES)
        super().__post_init__()  # unknown format / bad options fail here, before any layer is touched
        if self.factor_dtype is not None:
            parse_dtype(self.factor_dtype)
        check_flag("activation_aware", self.activation_aware)
        check_number("damp", self.damp, 0, 1, high_open=True)
        check_choice("propagate", self.propagate, ("float", "quantized"))

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        """Only activation-aware compensation reads calibration data."""
        return self.activation_aware

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(hessian=True, dtype=torch.float64)

    def check_scheme(self, scheme: WeightQuant) -> None:
        if self.base == "hqq":
            check_hqq_format(scheme.weight_format())  # HQQ refits a zero point: asymmetric affine only

    @classmethod
    def examples(cls):
        # Ranks at most 16: the smallest toy layers (k/v projections) are 32 x 64.
        return [cls("int3", 64, rank=8), cls("int4", 32, symmetric=True, rank=16, factor_dtype="float32"),
                cls("int2", 32, rank=16, activation_aware=True), cls("int3", 64, rank=8, base="hqq")]

    @classmethod
    def benchmark_configs(cls):
        return []  # benchmarks/bench_compensation.py measures it

    def label(self) -> str:
        how = "whitened" if self.activation_aware else "plain"
        extra = " quantized-propagation" if self.activation_aware and self.propagate != "float" else ""
        return f"{self.base} {self.scheme.label()} + rank {self.rank} {how}{extra}"


def quantize_base(linear: nn.Module, config: QuantLowRank) -> QuantLinear:
    """``Q``: the ``QuantLinear`` (bias included) that :class:`~llmopt.RTN` (or HQQ) would build for ``linear``."""
    weight = linear.weight
    check_linear_weight(weight)
    scheme = config.scheme
    fmt = scheme.weight_format()
    if config.base == "rtn":
        return QuantLinear.from_linear(linear, scheme)
    q = hqq_quantize(weight.detach(), fmt, scheme.group_size, scale_dtype=scheme.scale_torch_dtype,
                     round_zero=True)
    bias = getattr(linear, "bias", None)
    return QuantLinear.from_codes(q.codes, q.scale, q.zero_point, format=fmt, group_size=q.group_size,
                                  bias=bias.detach() if bias is not None else None, dtype=weight.dtype,
                                  kernel=scheme.kernel)


@register_method(QuantLowRank)
def _apply_quant_lowrank(linear: nn.Module, config: QuantLowRank, *, name: str = "",
                         stats: Optional[LayerStats] = None, **_: Any) -> CompensatedLinear:
    if is_factor(linear):
        raise SkipLayer(f"already compressed: it is the {getattr(linear, FACTOR_ATTR)!r} factor of a "
                        "LowRankLinear (quant_lowrank does not compensate a factor)")
    check_linear_weight(linear.weight)
    weight = linear.weight.detach()
    _check_rank(config.rank, tuple(weight.shape))
    hessian = None
    if config.activation_aware:
        if stats is None or stats.count == 0:
            raise ValueError("activation-aware compensation needs calibration statistics for this layer (it "
                             "received no inputs)")
        hessian = stats.mean_hessian()
    base = quantize_base(linear, config)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    residual = weight.to(work) - base.dequantize_weight(work).to(work)
    factor_dtype = parse_dtype(config.factor_dtype) if config.factor_dtype is not None else weight.dtype
    down, up = compensation_factors(residual, config.rank, hessian=hessian, damp=config.damp, dtype=factor_dtype)
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise ValueError("the compensation factors contain NaN/Inf values")
    return CompensatedLinear.from_quantized(base, down, up)


# ----------------------------------------------------------------------------------------------
# Fine-tuning from a compensated model


def compensation_to_lora_(model: nn.Module, *, alpha: Optional[float] = None, dropout: float = 0.0,
                          dtype: Optional[Union[str, torch.dtype]] = None,
                          freeze_base: bool = True) -> Dict[str, str]:
    """Replace every :class:`CompensatedLinear` of ``model`` by a :class:`~llmopt.nn.LoRALinear` over its
    quantized base with adapters starting at the factors (:meth:`CompensatedLinear.to_lora`), in place.

    The model computes the same function (up to the adapter ``dtype``); the adapters then train as
    QLoRA. With ``freeze_base`` every other parameter gets ``requires_grad=False`` (as a ``LoRA`` stage of ``compress_``).
    Returns ``{name: repr of the new layer}``. ``merge_lora_`` afterwards re-quantizes ``W_q + B A``.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CompensatedLinear)}
    if not layers:
        raise ValueError("compensation_to_lora_: the model has no CompensatedLinear layer")
    new = {name: layer.to_lora(alpha, dropout, dtype) for name, layer in layers.items()}
    replace_modules(model, new)
    if freeze_base:
        _freeze_all_but_adapters(model)
    return {name: repr(layer) for name, layer in new.items()}
