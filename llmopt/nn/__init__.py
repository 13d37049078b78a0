"""``nn.Module`` wrappers that replace or wrap ``nn.Linear``."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
