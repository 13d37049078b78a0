"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score each weight by ``|W_ij| * ||X_j||_2``, its magnitude times the norm of the input feature it
multiplies over the calibration tokens, and remove the lowest scores of every output row (the
paper's comparison group). No weight update, no Hessian: only the per-column sums of squares of
the inputs, i.e. a ``StatsSpec(hessian=False)``, so calibration is as cheap as a forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.nn as nn

from ...calibration import LayerStats, StatsSpec
from ...core.checks import check_choice, check_linear_weight
from ..base import MethodConfig, register_method
from .criteria import input_norms, wanda_scores
from .magnitude import PruneOptions, sparse_from_mask
from .patterns import select_mask

__all__ = ["Wanda"]


@dataclasses.dataclass(frozen=True)
class Wanda(PruneOptions, MethodConfig):
    """Wanda pruning: keep the largest ``|W_ij| * ||X_j||_2`` (calibration data needed).

    ``sparsity``: fraction removed in ``[0, 1)`` (default 0.5; implied by an N:M ``pattern``).
    ``pattern``: ``"unstructured"``, ``"2:4"``, ``"4:8"``, any ``"N:M"``. ``scope``: ``"row"`` (the
    paper's default: every output row loses exactly the same count) or ``"layer"``. ``value_dtype``:
    dtype of the stored kept values. ``propagate``: what feeds the next block during calibration,
    ``"quantized"`` (the pruned block's outputs, as the reference implementation) or ``"float"``
    (the dense block's outputs: one forward per block instead of two).
    """

    name = "wanda"
    needs_calibration = True

    sparsity: Optional[float] = None
    pattern: str = "unstructured"
    scope: str = "row"
    value_dtype: Optional[str] = None
    propagate: str = "quantized"

    def __post_init__(self) -> None:
        self._check_common()
        check_choice("propagate", self.propagate, ("quantized", "float"))

    @staticmethod
    def stats_spec() -> StatsSpec:
        # Column sums of squares only: no K x K Hessian.
        return StatsSpec(hessian=False)

    @classmethod
    def examples(cls):
        return [cls(0.5), cls(0.5, scope="layer"), cls(pattern="2:4")]

    def label(self) -> str:
        return f"wanda {self._pattern_label()}" + (" float-propagation" if self.propagate == "float" else "")


@register_method(Wanda)
def _apply_wanda(linear: nn.Module, config: Wanda, *, name: str = "", stats: Optional[LayerStats] = None,
                 **_: Any) -> nn.Module:
    check_linear_weight(linear.weight)
    if stats is None or stats.count == 0:
        raise ValueError("Wanda needs calibration statistics for this layer (it received no inputs)")
    scores = wanda_scores(linear.weight, input_norms(stats))
    mask = select_mask(scores, config.target_sparsity, scope=config.scope, nm=config.nm)
    return sparse_from_mask(linear, mask, config)
