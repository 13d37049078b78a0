"""Truncated SVD: factor a linear layer's weight ``W [N, K]`` into ``up [N, r] @ down [r, K]``.

Pure functions first (decomposition, rank rules, a whole-model rank budget), then the ``SVD``
method config and its handler, which replaces each targeted ``nn.Linear`` with a
:class:`~llmopt.nn.LowRankLinear`.

* :func:`truncated_svd`: the best rank-``r`` approximation in the Frobenius norm (Eckart-Young), with
  ``sqrt(sigma)`` given to both factors so that they have the same scale (what quantizing the
  factors afterwards wants).
* :func:`rank_from`: one rule per call: a fixed ``rank``, a ``rank_ratio`` of ``min(N, K)``, the
  ``energy`` (fraction of ``sum sigma^2``) to keep, or the ``param_ratio`` of the layer's parameters
  to remove.
* :func:`allocate_ranks` / :func:`plan_ranks`: one parameter budget for many layers, spent greedily
  where it buys the most ``sigma^2`` per parameter.
* ``SVD(..., activation_aware=True)``: whiten with the calibration Hessian first (SVD-LLM), or scale
  input channels (ASVD); see :mod:`llmopt.lowrank.activation_aware`.

A factorization at rank ``r`` stores ``r (N + K)`` values instead of ``N K``; a layer where that does
not save anything is left dense and listed in ``report.skipped``.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ...calibration import LayerStats, StatsSpec, check_calibration_data, float_layer_stats, spec_for_dtype
from ...core.checks import check_choice, check_flag, check_int, check_linear_weight, check_number
from ...core.errors import SkipLayer
from ...core.targets import select_linears
from ...nn.lowrank_linear import FACTOR_ATTR, LowRankLinear
from ...solvers.decompose import (
    Decomposition,
    Shape,
    _check_rank,
    _work_dtype,
    asvd_scales,
    decompose,
    scaled_svd,
    truncated_svd,
    whitened_svd,
)
from ..base import MethodConfig, register_method

__all__ = ["SVD", "Decomposition", "truncated_svd", "rank_from", "saves_parameters", "allocate_ranks",
           "plan_ranks", "RANK_RULES"]

RANK_RULES = ("rank", "rank_ratio", "energy", "param_ratio")


# ----------------------------------------------------------------------------------------------
# Rank rules


def saves_parameters(rank: int, shape: Shape) -> bool:
    """Whether ``rank * (N + K) < N * K``: the two factors hold fewer values than the dense weight."""
    n, k = shape
    return rank * (n + k) < n * k


def _check_ratio(label: str, value: Any, high_closed: bool = True) -> None:
    """A ratio in ``(0, 1]`` (``(0, 1)`` without ``high_closed``)."""
    check_number(label, value, 0, 1, low_open=True, high_open=not high_closed)


def rank_from(
    sigmas: Optional[Tensor],
    shape: Shape,
    *,
    rank: Optional[int] = None,
    rank_ratio: Optional[float] = None,
    energy: Optional[float] = None,
    param_ratio: Optional[float] = None,
) -> int:
    """The rank one rule gives for a ``shape = (N, K)`` weight with singular values ``sigmas``.

    Exactly one of:

    * ``rank``: that rank (``1 <= rank <= min(N, K)``).
    * ``rank_ratio`` in ``(0, 1]``: ``round(rank_ratio * min(N, K))`` (halves round up), at least 1.
    * ``energy`` in ``(0, 1]``: the smallest ``r`` whose ``sum(sigma[:r]^2)`` is at least that fraction
      of ``sum(sigma^2)`` (``sigmas`` needed; 1 for an all-zero weight).
    * ``param_ratio`` in ``(0, 1)``: the fraction of the layer's ``N K`` parameters to remove, i.e. the
      largest ``r`` with ``r (N + K) <= (1 - param_ratio) N K`` (an error if even rank 1 is too many).

    The result may still not save parameters (``rank_ratio=1``, ``energy`` near 1): see
    :func:`saves_parameters`.
    """
    given = {k: v for k, v in (("rank", rank), ("rank_ratio", rank_ratio), ("energy", energy),
                               ("param_ratio", param_ratio)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"rank_from needs exactly one of {', '.join(RANK_RULES)}; got "
                         f"{', '.join(given) if given else 'none'}")
    n, k = int(shape[0]), int(shape[1])
    m = min(n, k)
    if rank is not None:
        _check_rank(rank, (n, k))
        return int(rank)
    if rank_ratio is not None:
        _check_ratio("rank_ratio", rank_ratio)
        return max(1, min(m, int(math.floor(rank_ratio * m + 0.5))))
    if energy is not None:
        _check_ratio("energy", energy)
        if sigmas is None:
            raise ValueError("the energy rule needs the singular values")
        s2 = sigmas.detach().to(torch.float64).pow(2)
        total = float(s2.sum())
        if not math.isfinite(total):
            raise ValueError("singular values contain NaN/Inf")
        if total == 0:
            return 1
        fraction = torch.cumsum(s2, 0) / total
        return max(1, min(m, int((fraction < energy - 1e-12).sum()) + 1))
    _check_ratio("param_ratio", param_ratio, high_closed=False)
    r = int(math.floor((1 - param_ratio) * n * k / (n + k) + 1e-9))
    if r < 1:
        raise ValueError(f"param_ratio {param_ratio} leaves {(1 - param_ratio) * n * k:.0f} parameters for this "
                         f"[{n}, {k}] weight, fewer than rank 1 needs ({n + k})")
    return min(r, m)


def allocate_ranks(spectra: Mapping[str, Tensor], shapes: Mapping[str, Shape], param_ratio: float
                   ) -> Dict[str, Optional[int]]:
    """Ranks for many layers under one budget: remove ``param_ratio`` of their total parameters.

    ``spectra[name]``: the layer's singular values (whitened ones for activation-aware SVD, whose
    ``sigma^2`` are output errors); ``shapes[name] = (N, K)``. Every layer starts at rank 1; then the
    budget ``(1 - param_ratio) * sum(N K)`` is spent greedily on the next singular value with the
    largest ``sigma^2 / (N + K)`` (error removed per parameter) over all layers. A layer that reaches
    its largest parameter-saving rank (``r (N + K) < N K``) may, as its next step, go back to dense
    (cost ``N K - r (N + K)``, removing all its remaining ``sigma^2``).

    Returns ``{name: rank}``, with ``None`` for layers that stay dense (factorizing them at the rank
    the budget allows would not save parameters). The kept parameters ``sum(r (N + K))`` plus ``N K``
    of the dense layers never exceed the budget. Raises ``ValueError`` when even rank 1 everywhere
    does not fit.
    """
    _check_ratio("param_ratio", param_ratio, high_closed=False)
    if set(spectra) != set(shapes):
        raise ValueError(f"spectra and shapes name different layers: {sorted(set(spectra) ^ set(shapes))[:5]}")
    budget = (1 - param_ratio) * sum(int(n) * int(k) for n, k in shapes.values())
    ranks: Dict[str, Optional[int]] = {}
    s2: Dict[str, list] = {}
    cost = 0
    for name, (n, k) in shapes.items():
        n, k = int(n), int(k)
        s2[name] = spectra[name].detach().to(torch.float64).pow(2).sort(descending=True).values.tolist()
        if not saves_parameters(1, (n, k)):
            ranks[name] = None  # even rank 1 saves nothing (N or K is 1)
            cost += n * k
        else:
            ranks[name] = 1
            cost += n + k
    if cost > budget:
        raise ValueError(f"param_ratio {param_ratio} leaves {budget:.0f} parameters, fewer than rank 1 in every "
                         f"layer needs ({cost})")

    heap: list = []

    def push(name: str) -> None:
        n, k = shapes[name]
        r = ranks[name]
        if r is None or r >= len(s2[name]):
            return
        if saves_parameters(r + 1, (n, k)):
            step, gain = n + k, s2[name][r]
        else:  # last saving rank reached: the next step is back to dense
            step, gain = n * k - r * (n + k), sum(s2[name][r:])
        heapq.heappush(heap, (-gain / step, name, step))

    for name in shapes:
        push(name)
    while heap:
        _, name, step = heapq.heappop(heap)
        if cost + step > budget:
            continue  # this layer cannot grow any more; others (cheaper steps) still may
        cost += step
        n, k = shapes[name]
        r = ranks[name]
        ranks[name] = r + 1 if saves_parameters(r + 1, (n, k)) else None
        push(name)
    return ranks


# ----------------------------------------------------------------------------------------------
# The method: config + handler


@dataclasses.dataclass(frozen=True)
class SVD(MethodConfig):
    """Low-rank factorization of every targeted ``nn.Linear`` into a :class:`~llmopt.nn.LowRankLinear`.

    Exactly one rank rule: ``rank``, ``rank_ratio`` (of ``min(N, K)``), ``energy`` (fraction of
    ``sum sigma^2`` kept), ``param_ratio`` (fraction of each layer's parameters removed), or ``ranks``
    (``{layer_name: rank or None}``, e.g. from :func:`plan_ranks`; ``None`` and layers not in it stay
    dense). A layer whose rank would not save parameters is left dense and listed in
    ``report.skipped``.

    ``activation_aware=True`` needs ``calibration=``: ``variant="whiten"`` (SVD-LLM: truncate ``W L``
    with ``L L^T`` the damped input Hessian; the discarded singular values are then exactly the
    output error) or ``"asvd"`` (scale input channels by ``mean|x|^0.5``). ``damp``: relative
    Hessian damping (whiten). ``propagate``: what feeds the next block during calibration,
    ``"float"`` (the original model's activations, as SVD-LLM; one forward per block) or
    ``"quantized"`` (the factorized block's outputs).
    """

    name = "svd"

    rank: Optional[int] = None
    rank_ratio: Optional[float] = None
    energy: Optional[float] = None
    param_ratio: Optional[float] = None
    ranks: Optional[Dict[str, Optional[int]]] = None
    activation_aware: bool = False
    variant: str = "whiten"  # not "method": to_dict() uses that key for the registry name
    damp: float = 0.01
    propagate: str = "float"

    def __post_init__(self) -> None:
        rules = [r for r in RANK_RULES + ("ranks",) if getattr(self, r) is not None]
        if len(rules) != 1:
            raise ValueError(f"SVD needs exactly one rank rule out of rank=, rank_ratio=, energy=, param_ratio=, "
                             f"ranks=; got {', '.join(rules) if rules else 'none'}")
        if self.rank is not None:
            check_int("rank", self.rank, 1)
        if self.rank_ratio is not None:
            _check_ratio("rank_ratio", self.rank_ratio)
        if self.energy is not None:
            _check_ratio("energy", self.energy)
        if self.param_ratio is not None:
            _check_ratio("param_ratio", self.param_ratio, high_closed=False)
        if self.ranks is not None:
            if not isinstance(self.ranks, Mapping):
                raise ValueError(f"ranks must be a dict {{layer_name: rank or None}}, got {type(self.ranks).__name__}")
            for key, value in self.ranks.items():
                if not isinstance(key, str):
                    raise ValueError(f"ranks: layer names must be strings, got {key!r}")
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ValueError(f"ranks[{key!r}] must be an integer >= 1 or None (dense), got {value!r}")
            object.__setattr__(self, "ranks", dict(self.ranks))  # a private copy
        check_flag("activation_aware", self.activation_aware)
        check_choice("variant", self.variant, ("whiten", "asvd"))
        if self.variant == "asvd" and not self.activation_aware:
            raise ValueError("variant='asvd' scales by activation statistics: set activation_aware=True")
        check_number("damp", self.damp, 0, 1, high_open=True)
        check_choice("propagate", self.propagate, ("float", "quantized"))

    def __hash__(self) -> int:  # the ``ranks`` dict is not hashable
        return hash(tuple(sorted((k, str(v)) for k, v in self.to_dict().items())))

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        """Only activation-aware SVD reads calibration data."""
        return self.activation_aware

    def stats_spec(self) -> StatsSpec:
        if self.variant == "asvd":
            return StatsSpec(hessian=False)
        return StatsSpec(hessian=True, dtype=torch.float64)

    @classmethod
    def examples(cls):
        # Ranks that save parameters in every layer of the toy models (random weights: flat spectra).
        return [cls(rank_ratio=0.4), cls(param_ratio=0.2, activation_aware=True),
                cls(rank_ratio=0.4, activation_aware=True, variant="asvd")]

    @classmethod
    def benchmark_configs(cls):
        return []  # benchmarks/bench_lowrank.py measures SVD

    def label(self) -> str:
        if self.rank is not None:
            rule = f"rank {self.rank}"
        elif self.rank_ratio is not None:
            rule = f"rank {self.rank_ratio:g} x min(N,K)"
        elif self.energy is not None:
            rule = f"energy {self.energy:g}"
        elif self.param_ratio is not None:
            rule = f"{self.param_ratio * 100:g}% params"
        else:
            rule = f"planned ranks ({len(self.ranks)} layers)"
        how = ("whitened" if self.variant == "whiten" else "asvd") if self.activation_aware else "plain"
        extra = " quantized-propagation" if self.activation_aware and self.propagate != "float" else ""
        return f"svd {rule} {how}{extra}"


def is_factor(module: nn.Module) -> bool:
    """True for the ``down`` / ``up`` Linears of a :class:`~llmopt.nn.LowRankLinear`."""
    return getattr(module, FACTOR_ATTR, None) is not None


def _layer_decomposition(weight: Tensor, config: SVD, stats: Optional[LayerStats]) -> Decomposition:
    if not config.activation_aware:
        return decompose(weight)
    if stats is None or stats.count == 0:
        raise ValueError("activation-aware SVD needs calibration statistics for this layer (it received no "
                         "inputs)")
    if config.variant == "asvd":
        return scaled_svd(weight, asvd_scales(stats.col_abs_mean()))
    return whitened_svd(weight, stats.mean_hessian(), config.damp)


@register_method(SVD)
def _apply_svd(linear: nn.Module, config: SVD, *, name: str = "", stats: Optional[LayerStats] = None,
               **_: Any) -> LowRankLinear:
    if is_factor(linear):
        raise SkipLayer(f"already compressed: it is the {getattr(linear, FACTOR_ATTR)!r} factor of a "
                        "LowRankLinear (SVD does not factorize a factor again; use to_linear() first)")
    check_linear_weight(linear.weight)
    weight = linear.weight.detach()
    shape = tuple(weight.shape)
    rank: Optional[int] = None
    if config.ranks is not None:
        if name not in config.ranks:
            raise SkipLayer("not in the rank plan (SVD(ranks=...))")
        if config.ranks[name] is None:
            raise SkipLayer("the rank plan keeps it dense (a factorization would not save parameters)")
        rank = rank_from(None, shape, rank=config.ranks[name])
    elif config.energy is None:
        rank = rank_from(None, shape, rank=config.rank, rank_ratio=config.rank_ratio,
                         param_ratio=config.param_ratio)
    if rank is not None and not saves_parameters(rank, shape):
        raise SkipLayer(_no_saving(rank, shape))
    dec = _layer_decomposition(weight, config, stats)
    if rank is None:
        rank = rank_from(dec.sigma, shape, energy=config.energy)
        if not saves_parameters(rank, shape):
            raise SkipLayer(_no_saving(rank, shape) + f" (energy {config.energy:g} needs rank {rank})")
    down, up = dec.factors(rank, weight.dtype)
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise ValueError("the factorization produced NaN/Inf values")
    return LowRankLinear.from_factors(down, up, linear.bias.detach() if linear.bias is not None else None)


def _no_saving(rank: int, shape: Shape) -> str:
    n, k = shape
    return (f"left dense: rank {rank} would not save parameters ({rank} x ({n} + {k}) = {rank * (n + k)} "
            f">= {n} x {k} = {n * k})")


# ----------------------------------------------------------------------------------------------
# A whole-model plan


def _spectrum(linear: nn.Module, config: SVD, stats: Optional[LayerStats]) -> Tensor:
    weight = linear.weight.detach()
    if not config.activation_aware:
        return torch.linalg.svdvals(weight.to(_work_dtype(weight)))
    return _layer_decomposition(weight, config, stats).sigma


def plan_ranks(
    model: nn.Module,
    param_ratio: float,
    *,
    include: Any = None,
    exclude: Any = None,
    calibration: Optional[Sequence[Any]] = None,
    activation_aware: bool = False,
    variant: str = "whiten",
    damp: float = 0.01,
    calibration_dtype: Optional[torch.dtype] = None,
) -> Dict[str, Optional[int]]:
    """Ranks removing ``param_ratio`` of the targeted ``nn.Linear`` parameters, allocated model-wide.

    Computes each targeted layer's singular values (of ``W``, or of the whitened ``W L`` / scaled
    ``W diag(s)`` with ``activation_aware=True``, from ``calibration`` batches run block by block with
    float propagation, layers outside the blocks from one forward) and returns
    :func:`allocate_ranks` of them: ``{name: rank or None (dense)}``, for ``SVD(ranks=...)`` with the
    same ``include``/``exclude``, calibration and ``activation_aware`` / ``variant`` / ``damp``. The model
    is not modified. Factors of already factorized layers are left out.
    """
    config = SVD(param_ratio=param_ratio, activation_aware=activation_aware, variant=variant, damp=damp)
    targets, _ = select_linears(model, include, exclude)
    targets = {name: m for name, m in targets.items() if not is_factor(m)}
    if not targets:
        raise ValueError(f"plan_ranks: no uncompressed nn.Linear matches include={include!r} exclude={exclude!r}")
    for name, linear in targets.items():
        try:
            check_linear_weight(linear.weight)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"plan_ranks: layer {name!r}: {exc}") from exc
    spectra: Dict[str, Tensor] = {}
    if not activation_aware:
        spectra = {name: _spectrum(linear, config, None) for name, linear in targets.items()}
    else:
        if calibration is None or (isinstance(calibration, (list, tuple)) and not calibration):
            raise ValueError("plan_ranks(activation_aware=True) needs calibration data; pass calibration=[...]")
        check_calibration_data(calibration)  # a bare tensor: "wrap it in a list", not a truth-value error
        spec = spec_for_dtype(config.stats_spec(), calibration_dtype)  # as compress_ does

        def add(name: str, layer_stats: Optional[LayerStats]) -> None:
            if layer_stats is None:
                raise ValueError(f"plan_ranks: layer {name!r} received no inputs during calibration")
            try:
                spectra[name] = _spectrum(targets[name], config, layer_stats)
            except Exception as exc:
                raise ValueError(f"plan_ranks: layer {name!r}: {exc}") from exc

        float_layer_stats(model, calibration, spec, list(targets), add, dtype=calibration_dtype)
    shapes = {name: tuple(linear.weight.shape) for name, linear in targets.items()}
    return allocate_ranks(spectra, shapes, param_ratio)
