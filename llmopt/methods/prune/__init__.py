"""Pruning: unstructured and N:M masks (magnitude, Wanda, SparseGPT), compressed sparse storage
(:class:`llmopt.nn.SparseLinear`), structured pruning that returns smaller ``nn.Linear`` layers, and
gradual schedules for training scripts.
"""

from .magnitude import Magnitude, plan_global_sparsity
from .schedule import GradualPruner, cubic_sparsity
from .sparsegpt import SparseGPT
from .structured import AttentionGroup, MLPGroup, StructuredReport, find_groups, prune_channels_, prune_heads_
from .wanda import Wanda

__all__ = [
    "Magnitude", "plan_global_sparsity", "Wanda", "SparseGPT", "GradualPruner", "cubic_sparsity",
    "AttentionGroup", "MLPGroup", "StructuredReport", "find_groups", "prune_channels_", "prune_heads_",
]
