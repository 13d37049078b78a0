"""``nn.Module`` wrappers that replace or wrap ``nn.Linear``."""

from ..io import register_module_type
from .quant_linear import QuantLinear

register_module_type(QuantLinear)

__all__ = ["QuantLinear"]
