"""``nn.Module`` wrappers that replace or wrap ``nn.Linear`` (and :class:`QuantEmbedding`, for ``nn.Embedding``).

Every wrapper subclasses :class:`CompressedLinear` (:mod:`llmopt.nn.base`) and so registers itself for
``llmopt.save`` / ``llmopt.load`` when its module is imported: adding a wrapper is adding its file (and
importing it here to export it).
"""

from .base import CompressedLinear
from .compensated_linear import CompensatedLinear
from .lora_linear import LoRALinear
from .lowrank_linear import LowRankLinear
from .qat_linear import QATLinear
from .quant_embedding import QuantEmbedding
from .quant_linear import QuantLinear
from .sparse_linear import SparseLinear

__all__ = ["CompressedLinear", "QuantLinear", "LowRankLinear", "LoRALinear", "CompensatedLinear",
           "SparseLinear", "QATLinear", "QuantEmbedding"]
