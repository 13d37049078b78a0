"""Pure pruning scores: a higher score means a more important weight (pruned last).

* :func:`magnitude_scores`: ``|W|``.
* :func:`wanda_scores`: ``|W_ij| * ||X_j||_2`` (Sun et al. 2023, "A Simple and Effective Pruning
  Approach for Large Language Models"): a weight matters in proportion to the size of the input it
  multiplies, measured over the calibration tokens.
* :func:`input_norms`: ``||X_j||_2`` from a :class:`~llmopt.calibration.LayerStats`.

Scores are float32 (float64 for a float64 weight), the shape of the weight ``[N, K]``; they feed
:func:`llmopt.prune.patterns.select_mask`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...calibration import LayerStats

__all__ = ["magnitude_scores", "wanda_scores", "input_norms"]


def _score_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _check_weight(weight: Tensor, what: str) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{what}: expected a 2-D weight [out_features, in_features], got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"{what}: weight must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{what}: weight has {bad} NaN/Inf values")


def magnitude_scores(weight: Tensor) -> Tensor:
    """``|weight|`` as float32 (float64 for a float64 weight). Raises on NaN/Inf or a non-2-D weight."""
    _check_weight(weight, "magnitude_scores")
    return weight.detach().to(_score_dtype(weight)).abs()


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """Wanda's ``|W_ij| * input_norm[j]`` with ``input_norm[j] = ||X_j||_2`` over the calibration tokens.

    ``input_norm`` is ``[K]``, finite and non-negative (see :func:`input_norms`). Any positive
    rescaling of ``input_norm`` gives the same masks, so a norm or an RMS both work.
    """
    _check_weight(weight, "wanda_scores")
    if not isinstance(input_norm, Tensor) or input_norm.dim() != 1 or input_norm.numel() != weight.shape[1]:
        shape = tuple(input_norm.shape) if isinstance(input_norm, Tensor) else type(input_norm).__name__
        raise ValueError(f"wanda_scores: input_norm must be [in_features] = [{weight.shape[1]}], got {shape}")
    if not torch.isfinite(input_norm).all():
        raise ValueError("wanda_scores: input_norm has NaN/Inf values (overflow in the calibration activations?)")
    if (input_norm < 0).any():
        raise ValueError("wanda_scores: input_norm has negative entries; expected ||X_j||_2 >= 0")
    dtype = _score_dtype(weight)
    return weight.detach().to(dtype).abs() * input_norm.detach().to(device=weight.device, dtype=dtype)[None, :]


def input_norms(stats: Optional[LayerStats]) -> Tensor:
    """``||X_j||_2`` per input column from calibration statistics.

    Uses the per-column sum of squares (always collected, also with ``StatsSpec(hessian=False)``);
    falls back to ``sqrt(diag(hessian))`` (the Hessian is the sum ``X^T X``, so its diagonal is the
    same sum of squares). Raises when the layer saw no inputs.
    """
    if stats is None or stats.count == 0:
        raise ValueError("no calibration statistics for this layer (it received no inputs during calibration)")
    if stats.col_sq_sum is not None:
        norm = stats.col_norm()
    elif stats.hessian is not None:
        norm = stats.hessian.diagonal().clamp_min(0).sqrt()
    else:
        raise ValueError("the calibration statistics hold neither column norms nor a Hessian")
    if not torch.isfinite(norm).all():
        raise ValueError("the input column norms contain NaN/Inf (overflow in the calibration activations?)")
    return norm
