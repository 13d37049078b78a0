"""Calibration: block-sequential runner and streaming input statistics, shared by every method.

* :func:`run_blocks` drives a model block by block: block ``i`` is calibrated on the outputs of the
  already-compressed block ``i-1``, one block (optionally moved to an execution device) at a time.
* :func:`float_layer_stats` serves the float model's statistics one layer at a time (measurements).
* :func:`collect_stats` gathers the same statistics from plain forwards of the unmodified model.
* :class:`LayerStats` / :class:`StatsSpec`: ``X^T X`` (float64 or float32) with a row count, per-column
  squared sums (norms) and absmax, for each linear layer.
"""

from .runner import (
    CalibrationRun,
    capture_block_inputs,
    check_calibration_data,
    collect_stats,
    find_blocks,
    float_layer_stats,
    forward_keywords,
    linear_like_modules,
    run_blocks,
    spec_for_dtype,
)
from .stats import LayerStats, StatsSpec

__all__ = [
    "run_blocks", "collect_stats", "float_layer_stats", "spec_for_dtype", "capture_block_inputs", "find_blocks", "linear_like_modules",
    "CalibrationRun", "LayerStats", "StatsSpec", "check_calibration_data", "forward_keywords",
]
