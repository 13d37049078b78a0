"""Small pieces every ``nn.Linear`` replacement shares."""

from __future__ import annotations

from typing import Dict, Optional, Type

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["dense_linear", "register_module_type", "module_types"]


def dense_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """A plain ``nn.Linear`` holding copies of ``weight [out, in]`` and ``bias`` (cast to the weight's dtype)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.to(weight.dtype))
    return linear


# type name -> class with .config() and .from_config(config, device)
_MODULE_TYPES: Dict[str, Type[nn.Module]] = {}


def register_module_type(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Make a wrapper class loadable: it needs ``config() -> dict`` and ``from_config(config, device)``."""
    if not (hasattr(cls, "config") and hasattr(cls, "from_config")):
        raise TypeError(f"{cls.__name__} needs config() and from_config(config, device) to be saved/loaded")
    _MODULE_TYPES[cls.__name__] = cls
    return cls


def module_types() -> Dict[str, Type[nn.Module]]:
    """``{class name: class}`` of every wrapper ``llmopt.load`` can rebuild."""
    return dict(_MODULE_TYPES)
