"""Small pieces every ``nn.Linear`` replacement shares."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["dense_linear", "check_linear_input"]


def dense_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """A plain ``nn.Linear`` holding copies of ``weight [out, in]`` and ``bias`` (cast to the weight's dtype)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.to(weight.dtype))
    return linear


def check_linear_input(x: Tensor, in_features: int, layer_type: str) -> None:
    """Clear errors for inputs a linear layer cannot multiply (integer dtype, wrong last dimension)."""
    if not x.is_floating_point():
        raise TypeError(f"{layer_type} expects floating-point inputs, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{layer_type} expects inputs with {in_features} features, got shape {tuple(x.shape)}")
