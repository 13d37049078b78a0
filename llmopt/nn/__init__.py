"""``nn.Module`` wrappers that replace or wrap ``nn.Linear``."""

from ..io import register_module_type
from .lora_linear import LoRALinear  # registers itself for save/load
from .lowrank_linear import LowRankLinear
from .quant_linear import QuantLinear
from .compensated_linear import CompensatedLinear
from .sparse_linear import SparseLinear  # registers itself for save/load

register_module_type(QuantLinear)
register_module_type(LowRankLinear)

__all__ = ["QuantLinear", "LowRankLinear", "LoRALinear", "CompensatedLinear", "SparseLinear"]
