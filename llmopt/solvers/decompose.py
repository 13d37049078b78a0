"""Decompositions for low rank: plain and activation-aware truncated SVD.

Activation-aware SVD: truncate the weight where the layer's *outputs* lose least, not its weights.

Plain SVD minimises the weight error ``||W - W_r||_F``. What matters is the output error on real
inputs, ``||X (W - W_r)^T||_F^2 / n = trace((W - W_r) H (W - W_r)^T)`` with ``H = X^T X / n`` (the
calibration runner's mean Hessian). Two ways to account for it:

* **Whitening** (SVD-LLM, Wang et al. 2024): with ``H = L L^T`` (Cholesky, ``L`` lower triangular),
  the output error is ``||(W - W_r) L||_F^2``. So take the SVD ``W L = U Sigma V^T``, keep the top
  ``r`` singular triplets and map back: ``W_r = U_r Sigma_r V_r^T L^{-1}``. This is *truncation-aware*:
  the output error is exactly the sum of the discarded ``sigma_i^2`` of ``W L``, and it is the best
  rank-``r`` weight for that error (Eckart-Young in the whitened space). Factors:
  ``down = Sigma_r^{1/2} V_r^T L^{-1}`` (a triangular solve, no inverse), ``up = U_r Sigma_r^{1/2}``.
  ``H`` is damped by ``damp * mean(diag H)`` on its diagonal (needed for dead input channels and
  rank-deficient ``H``); the damping grows x10 while the Cholesky factorization fails, like GPTQ's.
  With damping the identity holds for the damped ``H``.
* **ASVD-style scaling** (Yuan et al. 2023): scale input channel ``j`` by ``s_j = mean|x_j|^alpha``
  (``alpha = 0.5``), take the SVD of ``W diag(s)`` and map back with ``diag(1/s)``. Cheaper (no
  ``K x K`` Hessian), weaker (only the diagonal of ``H`` is seen).

Both run in float64 (``L^{-1}`` and ``1/s`` amplify rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .obs import HessianError, check_hessian

__all__ = ["Decomposition", "decompose", "truncated_svd", "whitening_factor", "whitened_svd", "asvd_scales",
           "scaled_svd", "ASVD_ALPHA"]

Shape = Tuple[int, int]


def _check_rank(rank: Any, shape: Shape) -> None:
    n, k = shape
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an integer, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank > min(n, k):
        raise ValueError(f"rank {rank} exceeds min(out_features, in_features) = {min(n, k)} of this "
                         f"[{n}, {k}] weight")


@dataclasses.dataclass
class Decomposition:
    """``A = U diag(sigma) V^T`` of a (possibly input-transformed) weight, ready to be truncated.

    ``kind``: ``"plain"`` (``A = W``), ``"whiten"`` (``A = W L``, ``chol = L`` lower triangular) or
    ``"asvd"`` (``A = W diag(scales)``). :meth:`factors` undoes the transform on ``down``.
    """

    u: Tensor  # [N, m]
    sigma: Tensor  # [m], descending
    vh: Tensor  # [m, K]
    kind: str = "plain"
    chol: Optional[Tensor] = None  # [K, K]
    scales: Optional[Tensor] = None  # [K]
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, a: Tensor, **kwargs: Any) -> "Decomposition":
        u, sigma, vh = torch.linalg.svd(a, full_matrices=False)
        return cls(u, sigma, vh, **kwargs)

    @property
    def shape(self) -> Shape:
        return self.u.shape[0], self.vh.shape[1]

    def factors(self, rank: int, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """``(down [r, K], up [N, r])`` with ``up @ down`` the truncated weight (in ``dtype``)."""
        _check_rank(rank, self.shape)
        root = self.sigma[:rank].sqrt()
        up = self.u[:, :rank] * root
        down = root[:, None] * self.vh[:rank]
        if self.chol is not None:  # down = Sigma^1/2 V^T L^-1: solve X L = B
            down = torch.linalg.solve_triangular(self.chol.to(down.dtype), down, upper=False, left=False)
        elif self.scales is not None:
            down = down / self.scales.to(down.dtype)
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        return down.contiguous(), up.contiguous()


def _work_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def decompose(weight: Tensor) -> Decomposition:
    """Plain SVD of ``weight [N, K]`` (float32, or float64 for a float64 weight)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {tuple(weight.shape)}")
    return Decomposition.of(weight.detach().to(_work_dtype(weight)), kind="plain")


def truncated_svd(weight: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """``(down [r, K], up [N, r])`` in ``weight``'s dtype, ``up @ down`` the best rank-``r`` approximation.

    Computed in float32 (float64 for float64 weights); ``sqrt(sigma)`` goes to both factors.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {tuple(weight.shape)}")
    _check_rank(rank, tuple(weight.shape))
    return decompose(weight).factors(rank, weight.dtype)


ASVD_ALPHA = 0.5


def whitening_factor(hessian: Tensor, damp: float = 0.01, *, max_tries: int = 6
                     ) -> Tuple[Optional[Tensor], Dict[str, Any]]:
    """Lower Cholesky factor ``L`` (float64) of ``H + damp * mean(diag H) * I``, ``H`` being ``[K, K]``.

    The damping is multiplied by 10 after each failed factorization (a start of 0 becomes 1e-6).
    Returns ``(L, info)`` with ``info = {"damp", "damp_tries", "dead_columns"}``; ``L`` is ``None``
    when ``H`` is all zeros (the layer only ever saw zero inputs: every weight is as good as any
    other, and the caller falls back to plain SVD). Raises :class:`~llmopt.solvers.HessianError` for
    NaN/Inf, asymmetric or non-PSD input, or when every try fails.
    """
    k = hessian.shape[-1] if hessian.dim() == 2 else -1
    check_hessian(hessian, k)
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    h = hessian.detach().to(torch.float64)
    h = (h + h.T) / 2
    diag = h.diagonal()
    info: Dict[str, Any] = {"dead_columns": int((diag == 0).sum()), "damp": float(damp), "damp_tries": 0}
    mean_diag = float(diag.mean())
    if mean_diag == 0:
        return None, info
    rel = float(damp)
    eye = torch.eye(k, dtype=torch.float64, device=h.device)
    for tries in range(1, max_tries + 1):
        if tries > 1:
            rel = rel * 10 if rel > 0 else 1e-6
        chol, status = torch.linalg.cholesky_ex(h + (rel * mean_diag) * eye)
        if int(status) == 0 and torch.isfinite(chol).all() and bool((chol.diagonal() > 0).all()):
            info.update(damp=rel, damp_tries=tries)
            return chol, info
    raise HessianError(f"the Hessian [{k}, {k}] is not positive definite even with damping {rel:.3g} * "
                       f"mean(diag(H)) after {max_tries} Cholesky tries")


def whitened_svd(weight: Tensor, hessian: Tensor, damp: float = 0.01) -> Decomposition:
    """SVD of ``W L`` (``L L^T`` = damped ``hessian``); ``.factors(r)`` maps back through ``L^{-1}``.

    ``weight [N, K]``, ``hessian [K, K]`` (mean ``X^T X``; any positive scale gives the same factors).
    The discarded ``sigma_i^2`` of the result sum to the output error ``trace(dW H_damped dW^T)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {tuple(weight.shape)}")
    chol, info = whitening_factor(hessian, damp)
    w = weight.detach().to(torch.float64)
    if chol is None:
        dec = Decomposition.of(w, kind="plain")
        dec.info.update(info, note="all-zero Hessian: plain SVD")
        return dec
    dec = Decomposition.of(w @ chol, kind="whiten", chol=chol)
    dec.info.update(info)
    return dec


def asvd_scales(col_abs_mean: Tensor, alpha: float = ASVD_ALPHA) -> Tensor:
    """ASVD's input-channel scales ``mean|x_j|^alpha`` (float64), floored at ``1e-6 * max`` so that a
    dead channel does not divide by zero; all ones when every channel is dead."""
    s = col_abs_mean.detach().to(torch.float64).clamp_min(0).pow(alpha)
    if not torch.isfinite(s).all():
        raise ValueError("activation statistics contain NaN/Inf")
    top = float(s.max()) if s.numel() else 0.0
    if top == 0:
        return torch.ones_like(s)
    return s.clamp_min(top * 1e-6)


def scaled_svd(weight: Tensor, scales: Tensor) -> Decomposition:
    """SVD of ``W diag(scales)``; ``.factors(r)`` divides the ``down`` columns by ``scales`` again."""
    if weight.dim() != 2 or scales.shape != (weight.shape[1],):
        raise ValueError(f"expected weight [N, K] and scales [K], got {tuple(weight.shape)} and "
                         f"{tuple(scales.shape)}")
    s = scales.detach().to(device=weight.device, dtype=torch.float64)
    return Decomposition.of(weight.detach().to(torch.float64) * s, kind="asvd", scales=s)
