"""``nn.Module`` wrappers that replace or wrap ``nn.Linear``."""

from .base import register_module_type
from .compensated_linear import CompensatedLinear
from .lora_linear import LoRALinear  # registers itself for save/load
from .lowrank_linear import LowRankLinear
from .qat_linear import QATLinear  # registers itself for save/load
from .quant_linear import QuantLinear
from .sparse_linear import SparseLinear  # registers itself for save/load

register_module_type(QuantLinear)
register_module_type(LowRankLinear)

__all__ = ["QuantLinear", "LowRankLinear", "LoRALinear", "CompensatedLinear", "SparseLinear", "QATLinear"]
