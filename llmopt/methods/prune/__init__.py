"""Pruning: unstructured and N:M masks (magnitude, Wanda, SparseGPT), compressed sparse storage
(:class:`llmopt.nn.SparseLinear`), structured pruning that returns smaller ``nn.Linear`` layers
(:class:`PruneChannels`, :class:`PruneHeads`), and gradual schedules for training scripts.
"""

from .magnitude import Magnitude, plan_global_sparsity
from .schedule import GradualPruner, cubic_sparsity
from .sparsegpt import SparseGPT
from .structured import AttentionGroup, MLPGroup, PruneChannels, PruneHeads, StructuredReport, find_groups
from .wanda import Wanda

__all__ = [
    "Magnitude", "plan_global_sparsity", "Wanda", "SparseGPT", "GradualPruner", "cubic_sparsity",
    "PruneChannels", "PruneHeads", "AttentionGroup", "MLPGroup", "StructuredReport", "find_groups",
]
