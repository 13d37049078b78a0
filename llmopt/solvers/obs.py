"""One Optimal-Brain-Surgeon column sweep: the shared engine of GPTQ (quantize) and SparseGPT (prune).

The problem: given a weight ``W [N, K]`` and the Hessian ``H [K, K]`` of the layer-wise loss
``||X W^T - X Q^T||^2`` (``H = X^T X`` up to a constant), replace the columns of ``W`` one by one
with constrained values (quantized, pruned, ...) and after each column move the error it made onto
the columns not yet visited, so that they compensate for it (the OBS update). For column ``j`` with
current values ``w`` and new values ``q``::

    err        = (w - q) / U[j, j]
    W[:, j+1:] -= err[:, None] * U[j, j+1:]

where ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``): row ``j`` of ``U`` is, up to
the factor ``U[j, j]``, row ``j`` of the inverse Hessian of the columns ``j..K-1`` that are still free,
so one factorization serves the whole sweep. The sum of ``err**2`` over all columns is exactly
``trace((W - Q) H_damped (W - Q)^T)``, the loss the sweep caused (reported as ``info["loss"]``).

The sweep is blocked ("lazy batch updates"): inside a block of ``block_size`` columns the update is
done column by column, and the block's accumulated error reaches the columns after the block with
one matrix product. This changes nothing but the floating-point rounding order.

The per-column decision is delegated to a callback (see :func:`obs_sweep`), so the same solver
quantizes to any format or prunes to any mask rule.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["obs_sweep", "ObsBlock", "ColumnFn", "ProcessBlock", "HessianError", "act_order_permutation",
           "inverse_hessian_factor", "check_hessian"]

ColumnFn = Callable[[int, Tensor, Tensor], Tensor]
"""``column_fn(j, w, d) -> q``: new values of sweep column ``j`` (see :func:`obs_sweep`)."""


class HessianError(ValueError):
    """The Hessian cannot be used: wrong shape, NaN/Inf, or not positive semi-definite."""


class ObsBlock:
    """What the solver shows the callback about the block of columns it is about to sweep.

    All column indices are positions in the *sweep* order (after the ``order`` permutation);
    :meth:`original_index` maps one back to the column of the caller's weight.

    Attributes:
        start, end: the block covers sweep columns ``[start, end)``.
        weight: the block's live buffer ``[N, end - start]`` (working dtype). When the callback for
            the block is created it holds the block's current values (all errors of earlier blocks
            applied); during the sweep column ``i`` of it holds the final value once swept and the
            error-updated value otherwise. Read it, never write it.
        hinv: the block's part ``U[start:end, start:end]`` of the upper Cholesky factor of the
            (damped, permuted) inverse Hessian. ``hinv.diagonal()`` are the ``d`` of the columns,
            e.g. the SparseGPT saliency is ``weight**2 / hinv.diagonal()**2``.
        order: sweep position -> original column (``None`` for the identity).
    """

    def __init__(self, start: int, end: int, weight: Tensor, hinv: Tensor, state: "_SweepState"):
        self.start = start
        self.end = end
        self.weight = weight
        self.hinv = hinv
        self.order = state.order
        self._state = state

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def num_columns(self) -> int:
        """K, the total number of columns of the sweep."""
        return self._state.weight_t.shape[0]

    def original_index(self, j: int) -> int:
        """The caller's column index of sweep column ``j``."""
        return j if self._state.order_list is None else self._state.order_list[j]

    def current(self, start: int, end: int) -> Tensor:
        """Exact current values ``[N, end - start]`` of sweep columns ``[start, end)`` (a new tensor).

        "Current" means what the unblocked column-by-column recurrence would hold at this moment:
        swept columns hold their final values; columns of this block hold their error-updated values;
        columns after this block get the pending (lazy) errors of this block's swept columns applied
        on the fly. So GPTQ can choose a group's parameters from the updated weights of the whole
        group even when the group runs past the block, and the result does not depend on
        ``block_size``.
        """
        k = self.num_columns
        if not 0 <= start <= end <= k:
            raise IndexError(f"columns [{start}, {end}) are outside [0, {k})")
        st = self._state
        # The solver keeps the weight transposed ([K, N]: one contiguous row per column).
        rows = st.weight_t[start:end].clone()
        lo = max(start, self.end)
        if lo < end:
            # Columns of this block not swept yet have zero error, so the full block product is exact.
            pending = st.hinv[self.start:self.end, lo:end].t() @ st.block_err_t
            rows[lo - start:].sub_(pending)
        return rows.t()


ProcessBlock = Callable[[ObsBlock], ColumnFn]
"""``process_block(block) -> column_fn``: called once at the start of every block (see :func:`obs_sweep`)."""


class _SweepState:
    def __init__(self, weight_t: Tensor, hinv: Tensor, order: Optional[Tensor]):
        self.weight_t = weight_t  # [K, N], sweep order
        self.hinv = hinv
        self.order = order
        self.order_list = order.tolist() if order is not None else None
        self.block_err_t = weight_t[:0]


def act_order_permutation(hessian: Tensor) -> Tensor:
    """Columns sorted by descending Hessian diagonal (GPTQ "act-order"); ties keep their order."""
    return torch.argsort(hessian.diagonal(), descending=True, stable=True)


def check_hessian(hessian: Tensor, k: int) -> None:
    """Raise :class:`HessianError` unless ``hessian`` is a finite, symmetric ``[k, k]`` matrix with a
    non-negative diagonal (positive definiteness is tested by the factorization itself)."""
    if hessian.dim() != 2 or tuple(hessian.shape) != (k, k):
        raise HessianError(f"hessian must be [K, K] = [{k}, {k}] for a weight with {k} columns, "
                           f"got shape {tuple(hessian.shape)}")
    if not hessian.is_floating_point():
        raise HessianError(f"hessian must be a floating-point tensor, got {hessian.dtype}")
    if not torch.isfinite(hessian).all():
        bad = int((~torch.isfinite(hessian)).sum())
        raise HessianError(f"hessian contains {bad} NaN/Inf entries (overflow or NaN in the calibration "
                           "activations?)")
    diag = hessian.diagonal()
    if (diag < 0).any():
        raise HessianError(f"hessian is not positive semi-definite: {int((diag < 0).sum())} negative "
                           f"diagonal entries (min {float(diag.min()):.4g}); expected X^T X")
    scale = float(hessian.abs().max())
    asym = float((hessian - hessian.transpose(0, 1)).abs().max())
    if asym > 1e-4 * scale:
        raise HessianError(f"hessian is not symmetric (max |H - H^T| = {asym:.4g}, max |H| = {scale:.4g})")


def inverse_hessian_factor(h: Tensor) -> Tuple[Optional[Tensor], bool]:
    """Upper Cholesky factor ``U`` of ``h^-1`` (``h^-1 = U^T U``) without forming ``h^-1``.

    With ``P`` the reversal permutation and ``P h P = L L^T``, ``h^-1 = (P L^-1 P)^T (P L^-1 P)`` and
    ``P L^-1 P`` is upper triangular with a positive diagonal: one Cholesky and one triangular inverse
    instead of Cholesky, inverse and Cholesky again. Returns ``(U, True)`` or ``(None, False)`` when
    ``h`` is not (numerically) positive definite.
    """
    flipped = h.flip(0, 1)
    chol, info = torch.linalg.cholesky_ex(flipped)
    if int(info) != 0:
        return None, False
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    factor = chol_inv.flip(0, 1)
    if not torch.isfinite(factor).all() or not (factor.diagonal() > 0).all():
        return None, False
    return factor, True


def obs_sweep(
    weight: Tensor,
    hessian: Tensor,
    process_block: ProcessBlock,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    max_damp_tries: int = 6,
    order: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Any]]:
    """Sweep the columns of ``weight`` in ``order``, letting a callback replace each one, with OBS updates.

    Args:
        weight: ``[N, K]``; not modified. The sweep runs in float64 if ``weight`` is float64, else in
            float32 (the "working dtype").
        hessian: ``[K, K]`` symmetric positive semi-definite (e.g. ``X^T X``); not modified. Factorized
            in float64.
        process_block: the callback, see below.
        block_size: columns per lazy-update block (a speed knob; the result does not depend on it up
            to rounding).
        damp: relative damping; ``damp * mean(diag(H))`` is added to the diagonal.
        max_damp_tries: Cholesky attempts; after each failure the damping is multiplied by 10.
        order: optional permutation of ``range(K)`` (LongTensor): sweep column ``j`` is original column
            ``order[j]`` (see :func:`act_order_permutation`). ``None`` sweeps in column order.

    Preparation: dead input channels (``H[i, i] == 0``: the input is always zero) get ``H[i, i] = 1``
    and their weight column is set to 0 before the sweep; then the damping is added and the upper
    Cholesky factor ``U`` of ``H^-1`` is computed, retrying with 10x the damping when the
    factorization fails. NaN/Inf, negative diagonal entries, asymmetry, or failure of every try raise
    :class:`HessianError`.

    Callback contract:
        ``process_block(block: ObsBlock) -> column_fn`` is called at the start of every block, before
        any of its columns is swept. It may look at the block (``block.weight``, ``block.hinv``,
        ``block.current(a, b)``) to make per-block decisions, e.g. SparseGPT's mask selection.

        ``column_fn(j: int, w: Tensor, d: Tensor) -> Tensor`` is then called once per column of the
        block, in sweep order, with ``j`` the sweep position (``block.original_index(j)`` gives the
        original column), ``w`` the column's current error-updated values ``[N]`` (working dtype;
        read-only) and ``d = U[j, j]`` (0-dim tensor). It returns the column's new values ``[N]``
        (any float dtype, cast to the working dtype). It may call ``block.current(a, b)`` to read the
        exact current values of any columns, e.g. to choose the parameters of a quantization group
        that starts at ``j`` from its updated weights. Whatever else it needs to record (codes,
        masks) it keeps itself.

    Returns:
        ``(result, info)``: ``result [N, K]`` in the working dtype and the ORIGINAL column order, each
        column being what ``column_fn`` returned for it; ``info`` has ``damp`` (relative damping used),
        ``damp_abs`` (absolute value added to the diagonal), ``damp_tries``, ``dead_columns``, ``loss``
        (``sum((w - q)**2 / d**2)`` over all columns = ``trace(dW (H + damp_abs I) dW^T)`` with dead
        channels' diagonal set to 1, ``dW = weight - result``) and ``time_s``.
    """
    tick = time.perf_counter()
    if weight.dim() != 2:
        raise ValueError(f"obs_sweep: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"obs_sweep: weight must be floating point, got {weight.dtype}")
    n, k = weight.shape
    check_hessian(hessian, k)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"obs_sweep: block_size must be a positive integer, got {block_size!r}")
    if not damp >= 0:
        raise ValueError(f"obs_sweep: damp must be >= 0, got {damp!r}")
    if not isinstance(max_damp_tries, int) or max_damp_tries < 1:
        raise ValueError(f"obs_sweep: max_damp_tries must be a positive integer, got {max_damp_tries!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("obs_sweep: weight contains NaN/Inf")
    device = weight.device
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32

    if order is not None:
        order = torch.as_tensor(order, device=device).long().flatten()
        if order.numel() != k or not torch.equal(torch.sort(order).values, torch.arange(k, device=device)):
            raise ValueError(f"obs_sweep: order must be a permutation of range({k})")

    h = hessian.detach().to(device=device, dtype=torch.float64, copy=True)
    w = weight.detach().to(dtype=work_dtype, copy=True)
    dead = h.diagonal() == 0
    num_dead = int(dead.sum())
    if num_dead:
        h.diagonal()[dead] = 1.0
        w[:, dead] = 0
    if order is not None:
        w = w[:, order].contiguous()
        h = h[order][:, order]

    mean_diag = float(h.diagonal().mean()) if k else 1.0
    rel = float(damp)
    factor = None
    tries = 0
    for tries in range(1, max_damp_tries + 1):
        if tries > 1:
            rel = rel * 10 if rel > 0 else 1e-6
        damped = h.clone()
        damped.diagonal().add_(rel * mean_diag)
        factor, ok = inverse_hessian_factor(damped)
        if ok:
            break
    else:
        raise HessianError(
            f"obs_sweep: the Hessian [{k}, {k}] is not positive definite even with damping "
            f"{rel:.3g} * mean(diag(H)) after {max_damp_tries} Cholesky tries; it is not a valid X^T X "
            "(wrong accumulation, overflow, or corrupted calibration data?)"
        )
    del damped, h
    hinv = factor.to(work_dtype)
    del factor

    # Work on the transpose [K, N]: a column is a contiguous row, and the rank-1 updates inside a
    # block touch contiguous memory (several times faster on CPU than strided column updates).
    wt = w.t().contiguous()
    del w
    state = _SweepState(wt, hinv, order)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        count = i2 - i1
        w1 = wt[i1:i2]  # contiguous view, updated in place
        hinv1 = hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        state.block_err_t = err1
        column_fn = process_block(ObsBlock(i1, i2, w1.t(), hinv1, state))
        for i in range(count):
            col = w1[i]
            d = hinv1[i, i]
            q = column_fn(i1 + i, col, d)
            q = torch.as_tensor(q).to(device=device, dtype=work_dtype).reshape(n)
            err = (col - q).div_(d)
            col.copy_(q)
            if i + 1 < count:
                w1[i + 1:].addr_(hinv1[i, i + 1:], err, alpha=-1)
            err1[i] = err
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
        loss += err1.double().square().sum()
    state.block_err_t = wt[:0]

    if order is not None:
        wt = wt[torch.argsort(order)]
    result = wt.t().contiguous()
    del wt
    info = {
        "damp": rel,
        "damp_abs": rel * mean_diag,
        "damp_tries": tries,
        "dead_columns": num_dead,
        "loss": float(loss),
        "time_s": time.perf_counter() - tick,
    }
    return result, info
