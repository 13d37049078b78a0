"""Pure mask selection: scores in, boolean keep-mask out (``True`` = kept).

One code path, :func:`select_mask`, serves every unstructured and N:M method (magnitude, Wanda,
SparseGPT's per-block choices):

* ``scope="row"``: every row keeps exactly ``K - round(K * sparsity)`` weights.
* ``scope="layer"``: the layer keeps exactly ``N K - round(N K * sparsity)`` weights, wherever they are.
* ``nm=(N, M)``: in every group of ``M`` consecutive input columns of every row, the ``N`` highest
  scores are kept (sparsity ``1 - N / M``). ``K`` must be a multiple of ``M``.
* :func:`global_sparsities`: one threshold over many layers; returns each layer's sparsity, which
  then feeds a per-layer ``select_mask`` (e.g. ``Magnitude(sparsities=...)``).

``round`` rounds halves up (``floor(x + 0.5)``), not to even. Ties are broken deterministically:
among equal scores, the weight with the lower index (row-major for ``scope="layer"``) is pruned first
(a stable sort), so the same scores always give the same mask.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from ...core.checks import _NM_RE, NM, check_nm

__all__ = ["select_mask", "global_sparsities", "parse_pattern", "check_sparsity", "num_pruned",
           "resolve_sparsity", "SCOPES"]

SCOPES = ("layer", "row")


def check_sparsity(sparsity: object, what: str = "sparsity") -> float:
    """``sparsity`` as a float in ``[0, 1)``, or a ``ValueError`` saying what is wrong."""
    ok = (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and math.isfinite(sparsity)
          and 0 <= sparsity < 1)
    if not ok:
        raise ValueError(f"{what} must be a number in [0, 1) (the fraction of weights removed), got {sparsity!r}")
    return float(sparsity)


def parse_pattern(pattern: str) -> Optional[NM]:
    """``"unstructured"`` -> ``None``; ``"2:4"``, ``"4:8"``, any ``"N:M"`` -> ``(N, M)`` (validated)."""
    if pattern == "unstructured":
        return None
    if isinstance(pattern, str) and _NM_RE.match(pattern):
        return check_nm(pattern)
    raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4' or '4:8', got {pattern!r}")


def resolve_sparsity(sparsity: Optional[float], nm: Optional[NM], default: float = 0.5) -> float:
    """The sparsity a config means: ``sparsity`` (default ``default``) for unstructured masks, ``1 - N/M``
    for N:M (an explicit ``sparsity`` must then agree)."""
    if nm is None:
        return default if sparsity is None else check_sparsity(sparsity)
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None:
        check_sparsity(sparsity)
        if abs(sparsity - implied) > 1e-9:
            raise ValueError(f"pattern {nm[0]}:{nm[1]} removes {implied:g} of the weights, but sparsity={sparsity!r} "
                             "was given; leave sparsity unset (None) or make them agree")
    return implied


def num_pruned(total: int, sparsity: float) -> int:
    """``round(total * sparsity)`` with halves rounded up: the exact count of weights to remove."""
    return int(math.floor(total * sparsity + 0.5))


def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"select_mask: scores must be a 2-D tensor [out_features, in_features], got {shape}")
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"select_mask: scores must be real numbers, got {scores.dtype}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("select_mask: scores contain NaN (NaN weights or calibration statistics?)")


def _prune_lowest(scores: Tensor, count: Union[int, Tensor], dim: Optional[int]) -> Tensor:
    """Keep-mask pruning the ``count`` lowest scores along ``dim`` (``None``: over the flattened tensor).

    ``count`` is an int, or for ``dim=1`` an int tensor ``[rows]`` (a per-row count). Among ties the
    lower index is pruned first (what a stable sort would give).
    """
    if isinstance(count, Tensor):  # per-row counts (rare): a stable sort per row
        order = torch.sort(scores, dim=1, stable=True).indices
        rank = torch.arange(scores.shape[1], device=scores.device)
        pruned_sorted = rank[None, :] < count.to(scores.device).reshape(-1, 1)
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, order, ~pruned_sorted)
        return keep
    count = int(count)
    if count == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # Selection instead of sorting (linear time; a full sort of a 1536 x 576 layer is ~10x slower):
    # t = the count-th smallest score; everything below t goes, then the lowest-index ties at t.
    work = scores.reshape(1, -1) if dim is None else scores
    threshold = torch.kthvalue(work, count, dim=1, keepdim=True).values
    pruned = work < threshold
    need = count - pruned.sum(dim=1, keepdim=True)
    tie = work == threshold
    pruned |= tie & (tie.cumsum(dim=1) <= need)
    return (~pruned).reshape(scores.shape)


def select_mask(
    scores: Tensor,
    sparsity: Optional[float] = None,
    *,
    scope: str = "layer",
    nm: Optional[Union[NM, str]] = None,
    count: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """Boolean keep-mask ``[N, K]`` (``True`` = kept) removing the lowest ``scores``.

    Args:
        scores: ``[N, K]`` importance (higher = kept first); NaN is an error.
        sparsity: fraction removed, in ``[0, 1)``. Optional with ``nm`` (implied ``1 - N/M``; an explicit
            value must agree) or with ``count``.
        scope: ``"row"`` (each row removes exactly ``round(K * sparsity)``) or ``"layer"`` (the layer
            removes exactly ``round(N K * sparsity)``). Ignored for N:M.
        nm: ``(N, M)`` or ``"N:M"``: keep the ``N`` highest of every ``M`` consecutive columns of a row.
            ``K % M != 0`` is an error.
        count: instead of ``sparsity``, the exact number of weights to remove: per row (an int or an int
            tensor ``[N]``) for ``scope="row"``, for the whole tensor for ``scope="layer"``. Used by
            SparseGPT to spend a layer's budget block by block.

    Ties are broken by index (lower index pruned first), so the result is deterministic.
    """
    _check_scores(scores)
    rows, cols = scores.shape
    if nm is not None:
        n, m = check_nm(nm)
        if count is not None:
            raise ValueError("select_mask: count cannot be combined with an N:M pattern")
        resolve_sparsity(sparsity, (n, m))
        if cols % m:
            raise ValueError(f"select_mask: N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols} "
                             f"(the last {cols % m} column(s) would form an incomplete group)")
        groups = scores.reshape(rows, cols // m, m)
        keep = _prune_lowest(groups.reshape(-1, m), m - n, dim=1)
        return keep.reshape(rows, cols)
    if scope not in SCOPES:
        raise ValueError(f"select_mask: scope must be one of {SCOPES}, got {scope!r}")
    if (sparsity is None) == (count is None):
        raise ValueError("select_mask: give exactly one of sparsity= and count= (or an N:M pattern)")
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
        count = num_pruned(cols if scope == "row" else rows * cols, sparsity)
    limit = cols if scope == "row" else rows * cols
    if isinstance(count, Tensor):
        if scope != "row" or count.numel() != rows:
            raise ValueError(f"select_mask: a tensor count must be per row ([{rows}]) with scope='row'")
        if (count < 0).any() or (count > limit).any():
            raise ValueError(f"select_mask: per-row counts must lie in [0, {limit}]")
    elif not (isinstance(count, int) and 0 <= count <= limit):
        raise ValueError(f"select_mask: count must be an integer in [0, {limit}], got {count!r}")
    return _prune_lowest(scores, count, dim=1 if scope == "row" else None)


def global_sparsities(scores_by_layer: Mapping[str, Tensor], sparsity: float) -> Dict[str, float]:
    """One threshold over all layers' scores: remove exactly ``round(total * sparsity)`` weights model-wide.

    Returns ``{name: that layer's resulting sparsity}`` (its count of removed weights divided by its
    size), ready for a per-layer ``select_mask(..., scope="layer")``, which then removes exactly that
    count in every layer. Ties at the threshold go to the layers in mapping order, lower index first.
    """
    sparsity = check_sparsity(sparsity)
    if not scores_by_layer:
        raise ValueError("global_sparsities: no layers given")
    for name, s in scores_by_layer.items():
        try:
            _check_scores(s)
        except ValueError as exc:
            raise ValueError(f"global_sparsities: layer {name!r}: {exc}") from None
    total = sum(int(s.numel()) for s in scores_by_layer.values())
    budget = num_pruned(total, sparsity)
    if budget == 0:
        return {name: 0.0 for name in scores_by_layer}
    # One common dtype (float32 for float32 scores: half the memory of float64 on a whole model), in
    # which every comparison below is exact.
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores_by_layer.values()])
    if not dtype.is_floating_point:
        dtype = torch.float64
    flat = torch.cat([s.detach().reshape(-1).to(dtype) for s in scores_by_layer.values()])
    threshold = torch.kthvalue(flat.cpu(), budget).values.item()
    del flat
    ties_left = budget - sum(int((s.detach().to(dtype) < threshold).sum()) for s in scores_by_layer.values())
    result: Dict[str, float] = {}
    for name, s in scores_by_layer.items():
        sd = s.detach().to(dtype)
        pruned = int((sd < threshold).sum())
        ties = int((sd == threshold).sum())
        take = min(ties, ties_left)
        ties_left -= take
        result[name] = (pruned + take) / s.numel()
    return result
