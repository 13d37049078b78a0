"""Magnitude pruning: remove the weights of smallest ``|W|``, no data needed.

``Magnitude(sparsity, pattern, scope)`` replaces each targeted ``nn.Linear`` with a
:class:`~llmopt.nn.sparse_linear.SparseLinear` holding the kept weights. Scopes:

* ``scope="layer"`` (default): every layer removes exactly ``round(N K * sparsity)`` weights.
* ``scope="row"``: every output row removes exactly ``round(K * sparsity)``.
* global: :func:`plan_global_sparsity` puts one threshold over all targeted layers and returns each
  layer's sparsity; ``Magnitude(sparsities=plan)`` then applies it (layers missing from the plan stay
  dense and are listed in ``report.skipped``).
* ``pattern="2:4"`` / ``"4:8"`` / any ``"N:M"``: N kept out of every M consecutive input weights of a row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ...calibration import LayerStats
from ...core.checks import check_linear_weight, parse_dtype
from ...core.errors import SkipLayer
from ...core.targets import select_linears
from ...nn.sparse_linear import SparseLinear
from ..base import MethodConfig, register_method
from .criteria import magnitude_scores
from .patterns import SCOPES, check_sparsity, global_sparsities, parse_pattern, resolve_sparsity, select_mask

__all__ = ["Magnitude", "plan_global_sparsity", "PruneOptions"]


class PruneOptions:
    """Validation shared by the unstructured / N:M pruning configs (a mixin of frozen dataclasses with
    ``sparsity``, ``pattern``, ``scope`` and ``value_dtype`` fields)."""

    def _check_common(self) -> None:
        nm = parse_pattern(self.pattern)
        resolve_sparsity(self.sparsity, nm)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES} (for one threshold over the whole model use "
                             f"plan_global_sparsity), got {self.scope!r}")
        if self.value_dtype is not None:
            parse_dtype(self.value_dtype)

    @property
    def nm(self):
        """``(N, M)`` for an N:M pattern, ``None`` for unstructured."""
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The fraction removed: ``sparsity`` (default 0.5) or ``1 - N/M`` for N:M patterns."""
        return resolve_sparsity(self.sparsity, self.nm)

    def values_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """Dtype the kept values are stored in (``value_dtype``, default: the weight's own)."""
        return weight_dtype if self.value_dtype is None else parse_dtype(self.value_dtype)

    def _pattern_label(self) -> str:
        if self.nm is not None:
            return self.pattern
        return f"{self.target_sparsity * 100:g}%" + ("" if self.scope == "layer" else f" per-{self.scope}")


def sparse_from_mask(linear: nn.Module, mask: torch.Tensor, config: PruneOptions) -> nn.Module:
    """The :class:`SparseLinear` holding ``linear``'s weights where ``mask`` is True."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    return SparseLinear.from_dense(weight, mask, bias, nm=config.nm, dtype=config.values_dtype(weight.dtype))


@dataclasses.dataclass(frozen=True)
class Magnitude(PruneOptions, MethodConfig):
    """Magnitude pruning: keep the largest ``|W|``.

    ``sparsity``: fraction of weights removed, in ``[0, 1)`` (default 0.5; for an N:M ``pattern`` it is
    ``1 - N/M`` and may be left unset). ``pattern``: ``"unstructured"``, ``"2:4"``, ``"4:8"`` or any
    ``"N:M"`` (``0 < N < M <= 32``). ``scope``: ``"layer"`` or ``"row"`` (unstructured only).
    ``sparsities``: ``{layer_name: sparsity}`` overriding ``sparsity`` per layer, e.g. from
    :func:`plan_global_sparsity`; when given, layers not in it stay dense. ``value_dtype``: dtype of
    the stored kept values (e.g. ``"bfloat16"``; default: the weight's).
    """

    name = "magnitude"

    sparsity: Optional[float] = None
    pattern: str = "unstructured"
    scope: str = "layer"
    sparsities: Optional[Dict[str, float]] = None
    value_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        self._check_common()
        if self.sparsities is not None:
            if self.nm is not None:
                raise ValueError("sparsities= (per-layer sparsity) applies to unstructured pruning only; an N:M "
                                 "pattern fixes every layer's sparsity")
            if not isinstance(self.sparsities, Mapping):
                raise ValueError(f"sparsities must be a dict {{layer_name: sparsity}}, got "
                                 f"{type(self.sparsities).__name__}")
            for key, value in self.sparsities.items():
                if not isinstance(key, str):
                    raise ValueError(f"sparsities: layer names must be strings, got {key!r}")
                check_sparsity(value, f"sparsities[{key!r}]")
            object.__setattr__(self, "sparsities", {k: float(v) for k, v in self.sparsities.items()})

    def __hash__(self) -> int:  # the ``sparsities`` dict is not hashable
        plan = tuple(sorted(self.sparsities.items())) if self.sparsities is not None else None
        return hash((self.sparsity, self.pattern, self.scope, plan, self.value_dtype))

    @classmethod
    def examples(cls):
        return [cls(0.5), cls(0.6, scope="row"), cls(pattern="2:4"), cls(pattern="4:8")]

    def label(self) -> str:
        if self.sparsities is not None:
            return f"magnitude planned sparsities ({len(self.sparsities)} layers)"
        return f"magnitude {self._pattern_label()}"

    def layer_sparsity(self, name: str) -> float:
        """This layer's sparsity (raises :class:`SkipLayer` for a layer outside a ``sparsities`` plan)."""
        if self.sparsities is None:
            return self.target_sparsity
        if name not in self.sparsities:
            raise SkipLayer("not in the sparsity plan (Magnitude(sparsities=...))")
        return self.sparsities[name]


@register_method(Magnitude)
def _apply_magnitude(linear: nn.Module, config: Magnitude, *, name: str = "", stats: Optional[LayerStats] = None,
                     **_: Any) -> nn.Module:
    check_linear_weight(linear.weight)
    sparsity = config.layer_sparsity(name)
    scores = magnitude_scores(linear.weight)
    mask = select_mask(scores, sparsity, scope=config.scope, nm=config.nm)
    return sparse_from_mask(linear, mask, config)


def plan_global_sparsity(
    model: nn.Module,
    sparsity: float,
    *,
    include: Any = None,
    exclude: Any = None,
    criterion: str = "magnitude",
) -> Dict[str, float]:
    """Per-layer sparsities from ONE score threshold over all targeted ``nn.Linear`` layers.

    Removes exactly ``round(total * sparsity)`` weights of the targeted layers in all, the lowest
    scores wherever they are (``criterion="magnitude"``: ``|W|``, so layers with small weights lose
    more). Returns ``{name: sparsity}`` for ``Magnitude(sparsities=...)`` with the same
    ``include``/``exclude``. The model is not modified. A layer whose plan reaches 1.0 (every weight
    below the threshold) is an error: it would vanish.
    """
    check_sparsity(sparsity)
    if criterion != "magnitude":
        raise ValueError(f"plan_global_sparsity: criterion must be 'magnitude', got {criterion!r}")
    targets, _ = select_linears(model, include, exclude)
    if not targets:
        raise ValueError(f"plan_global_sparsity: no uncompressed nn.Linear matches include={include!r} "
                         f"exclude={exclude!r}")
    scores = {}
    for name, linear in targets.items():
        try:
            check_linear_weight(linear.weight)
            scores[name] = magnitude_scores(linear.weight)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"plan_global_sparsity: layer {name!r}: {exc}") from exc
    plan = global_sparsities(scores, sparsity)
    full = [name for name, s in plan.items() if s >= 1.0]
    if full:
        raise ValueError(f"plan_global_sparsity: the global threshold removes every weight of {full[:5]}; use a "
                         "lower sparsity or exclude those layers")
    return plan
