"""Streaming statistics of the inputs of one linear layer, the data every calibration method reads.

A :class:`LayerStats` sees the inputs of one ``nn.Linear`` (any leading dimensions, flattened to rows
of ``in_features``) batch after batch and keeps running sums, never the activations themselves:

* ``hessian``: ``sum_rows x^T x``, ``(in, in)``, in ``spec.dtype`` (float64 by default). Skipped with
  ``StatsSpec(hessian=False)`` when a method needs only the cheap per-column stats (an ``in x in``
  float64 matrix is 128 MiB for ``in = 4096``).
* ``count``: rows seen, so ``mean_hessian() = hessian / count``.
* ``col_sq_sum``: ``sum_rows x_j^2`` per input column (``col_norm()`` is its square root).
* ``col_abs_sum``: ``sum_rows |x_j|`` per input column (``col_abs_mean()``: AWQ's activation salience).
* ``absmax``: ``max_rows |x_j|`` per input column (float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

__all__ = ["StatsSpec", "LayerStats", "StatsIncrement", "compute_increment"]


@dataclass(frozen=True)
class StatsSpec:
    """What to collect. ``hessian=False`` keeps only the cheap per-column stats (count, norms, absmax).

    ``dtype``: what the sums are accumulated in. ``product_dtype``: dtype of each batch's ``x^T x``
    product before it is added (default: ``dtype``). ``torch.bfloat16`` makes the product ~4x faster
    than float32 on CPUs with bf16 units (5x than float64); with bf16 activations (calibration in
    bf16) the inputs are exact and only the product's final rounding (relative 2**-9 per batch, which
    averages out over batches) is added, far below GPTQ's 1% damping.
    """

    hessian: bool = True
    dtype: torch.dtype = torch.float64
    product_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.product_dtype is not None and not (isinstance(self.product_dtype, torch.dtype)
                                                   and self.product_dtype.is_floating_point):
            raise ValueError(f"StatsSpec.product_dtype must be a floating torch dtype or None, got "
                             f"{self.product_dtype!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"StatsSpec.dtype must be a floating torch dtype, got {self.dtype!r}")
        if self.dtype not in (torch.float64, torch.float32):
            raise ValueError(f"StatsSpec.dtype must be torch.float64 or torch.float32, got {self.dtype}")


class StatsIncrement(NamedTuple):
    """One batch's contribution; computed once and added to every layer that read the same input."""

    rows: int
    xtx: Optional[torch.Tensor]
    col_sq: torch.Tensor
    absmax: torch.Tensor
    col_abs: torch.Tensor


_STATS_CHUNK_ROWS = 1024


def compute_increment(x: torch.Tensor, in_features: int, spec: StatsSpec) -> StatsIncrement:
    """Sums for one input tensor ``x`` (``(..., in_features)``)."""
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, expected {in_features}")
    x = x.detach().reshape(-1, in_features)
    rows = int(x.shape[0])
    if not spec.hessian:
        xtx = None
    elif spec.product_dtype is not None and spec.product_dtype != spec.dtype:
        xp = x.to(spec.product_dtype)
        xtx = (xp.T @ xp).to(spec.dtype)
        del xp
    else:
        xf = x.to(spec.dtype)
        xtx = xf.T @ xf
        del xf
    # Per-column sums in chunks: the callers buffer thousands of rows into one tall product, and
    # full-size float copies of them (x, |x|, x*x) would cost more memory than the product saves.
    col_sq = torch.zeros(in_features, dtype=spec.dtype, device=x.device)
    col_abs = torch.zeros(in_features, dtype=spec.dtype, device=x.device)
    absmax = torch.zeros(in_features, dtype=torch.float32, device=x.device)
    for start in range(0, rows, _STATS_CHUNK_ROWS):
        xf = x[start:start + _STATS_CHUNK_ROWS].to(spec.dtype)
        col_sq += (xf * xf).sum(dim=0)
        xabs = xf.abs()  # not in place: .to() returns x itself when it already has spec.dtype
        col_abs += xabs.sum(dim=0)
        absmax = torch.maximum(absmax, xabs.amax(dim=0).to(torch.float32))
    return StatsIncrement(rows, xtx, col_sq, absmax, col_abs)


class LayerStats:
    """Running input statistics of one linear layer (see the module docstring)."""

    def __init__(self, in_features: int, spec: Optional[StatsSpec] = None):
        self.in_features = int(in_features)
        self.spec = spec if spec is not None else StatsSpec()
        self.count = 0
        self.hessian: Optional[torch.Tensor] = None
        self.col_sq_sum: Optional[torch.Tensor] = None
        self.col_abs_sum: Optional[torch.Tensor] = None
        self.absmax: Optional[torch.Tensor] = None

    # -- accumulation ---------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (shape ``(..., in_features)``; leading dims flattened)."""
        self.add(compute_increment(x, self.in_features, self.spec))

    def add(self, inc: StatsIncrement) -> None:
        """Add a precomputed :class:`StatsIncrement` (lets layers sharing one input share the matmul)."""
        if self.col_sq_sum is None:  # allocate lazily, on the device the inputs live on
            device = inc.col_sq.device
            n = self.in_features
            self.col_sq_sum = torch.zeros(n, dtype=self.spec.dtype, device=device)
            self.col_abs_sum = torch.zeros(n, dtype=self.spec.dtype, device=device)
            self.absmax = torch.zeros(n, dtype=torch.float32, device=device)
            if self.spec.hessian:
                self.hessian = torch.zeros(n, n, dtype=self.spec.dtype, device=device)
        self.count += inc.rows
        self.col_sq_sum.add_(inc.col_sq.to(self.col_sq_sum.device))
        self.col_abs_sum.add_(inc.col_abs.to(self.col_abs_sum.device))
        torch.maximum(self.absmax, inc.absmax.to(self.absmax.device), out=self.absmax)
        if self.hessian is not None:
            self.hessian.add_(inc.xtx.to(self.hessian.device))

    # -- reading --------------------------------------------------------------------------------
    def _require_data(self) -> None:
        if self.count == 0:
            raise RuntimeError("no inputs were recorded for this layer (it was never called during "
                               "calibration)")

    def mean_hessian(self) -> torch.Tensor:
        """``hessian / count``: the average ``x^T x`` per row (a new tensor)."""
        self._require_data()
        if self.hessian is None:
            raise RuntimeError("the Hessian was not collected (StatsSpec(hessian=False)); ask for "
                               "hessian=True")
        return self.hessian / self.count

    def col_norm(self) -> torch.Tensor:
        """L2 norm of each input column over all rows seen: ``sqrt(col_sq_sum)``."""
        self._require_data()
        return self.col_sq_sum.sqrt()

    def col_rms(self) -> torch.Tensor:
        """Root-mean-square of each input column: ``sqrt(col_sq_sum / count)``."""
        self._require_data()
        return (self.col_sq_sum / self.count).sqrt()

    def col_abs_mean(self) -> torch.Tensor:
        """Mean absolute value of each input column: ``col_abs_sum / count``."""
        self._require_data()
        return self.col_abs_sum / self.count

    def check_finite(self) -> None:
        """``ValueError`` if any statistic holds NaN/Inf (an Inf or NaN activation, or x^T x overflowing
        its dtype): every method reading them would otherwise pick its parameters from garbage."""
        bad = [label for label, t in (("hessian", self.hessian), ("column sums of squares", self.col_sq_sum),
                                      ("column absolute sums", self.col_abs_sum), ("absmax", self.absmax))
               if t is not None and not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"the calibration statistics ({', '.join(bad)}) contain NaN/Inf values "
                             f"(overflow or NaN in the calibration activations?)")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.hessian, self.col_sq_sum, self.col_abs_sum, self.absmax) if t is not None)

    def __repr__(self) -> str:
        h = "on" if self.spec.hessian else "off"
        return (f"LayerStats(in_features={self.in_features}, count={self.count}, hessian={h}, "
                f"dtype={str(self.spec.dtype).replace('torch.', '')})")
