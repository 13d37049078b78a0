"""Low-rank compression: truncated SVD (plain and activation-aware) and rank planning."""

from .activation_aware import asvd_scales, scaled_svd, whitened_svd, whitening_factor
from .svd import SVD, Decomposition, allocate_ranks, plan_ranks, rank_from, saves_parameters, truncated_svd

__all__ = [
    "SVD", "Decomposition", "truncated_svd", "rank_from", "saves_parameters", "allocate_ranks", "plan_ranks",
    "whitening_factor", "whitened_svd", "asvd_scales", "scaled_svd",
]
