"""Shared solvers for calibration-based compression (GPTQ, SparseGPT, ...)."""

from .obs import (
                  ColumnFn,
                  HessianError,
                  ObsBlock,
                  ProcessBlock,
                  act_order_permutation,
                  check_hessian,
                  inverse_hessian_factor,
                  obs_sweep,
)

__all__ = ["obs_sweep", "ObsBlock", "ColumnFn", "ProcessBlock", "HessianError", "act_order_permutation",
           "check_hessian", "inverse_hessian_factor"]
