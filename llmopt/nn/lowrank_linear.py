"""``LowRankLinear``: ``W ~= up.weight @ down.weight`` as two ordinary ``nn.Linear`` layers."""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..core.checks import dtype_name, parse_dtype
from ..core.targets import is_compressed
from .base import CompressedLinear, layer_bytes

__all__ = ["LowRankLinear", "FACTOR_ATTR"]

# Set on the two factor Linears of a LowRankLinear ("down" / "up"): methods that must not factorize a
# factor again (SVD) recognise them by it, while others (RTN, GPTQ, ...) may still compress them.
FACTOR_ATTR = "llmopt_lowrank_factor"


def _weight_of(module: nn.Module, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The float weight a factor multiplies by: its ``weight`` or, once compressed, its dequantized one."""
    if is_compressed(module):
        return module.dequantize_weight(dtype)
    weight = module.weight.detach()
    return weight if dtype is None else weight.to(dtype)


def _weight_bytes(module: nn.Module) -> float:
    """Stored bytes of a factor's weight alone (bias excluded)."""
    if is_compressed(module):
        return module.weight_bytes()
    return float(module.weight.numel() * module.weight.element_size())


class LowRankLinear(CompressedLinear):
    """``y = up(down(x))``: a rank-``r`` factorization of a linear layer.

    ``down`` (``in_features -> rank``, no bias) and ``up`` (``rank -> out_features``, holding the
    bias) are ordinary ``nn.Linear`` modules, so they train like any Linear and other llmopt methods
    can compress them further (``compress_(model, RTN(...))`` quantizes the factors; ``SVD`` recognises
    them and does not factorize them again). The stored weights take ``rank * (in + out)`` values
    instead of ``in * out``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        dtype: Union[str, torch.dtype] = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        for label, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LowRankLinear: {label} must be a positive integer, got {value!r}")
        if rank > min(in_features, out_features):
            raise ValueError(f"LowRankLinear: rank {rank} exceeds min(in_features, out_features) = "
                             f"{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        dtype = parse_dtype(dtype)
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        self._mark_factors()

    def _mark_factors(self) -> None:
        for label in ("down", "up"):
            setattr(getattr(self, label), FACTOR_ATTR, label)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_factors(cls, down: Tensor, up: Tensor, bias: Optional[Tensor] = None) -> "LowRankLinear":
        """Layer computing ``x @ (up @ down).T + bias`` from ``down [r, in]``, ``up [out, r]`` (copied)."""
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"LowRankLinear.from_factors: expected down [r, in] and up [out, r], got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")
        if down.dtype != up.dtype or down.device != up.device:
            raise ValueError(f"LowRankLinear.from_factors: down and up differ in dtype/device "
                             f"({down.dtype}/{down.device} vs {up.dtype}/{up.device})")
        rank, in_features = down.shape
        out_features = up.shape[0]
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"LowRankLinear.from_factors: bias has shape {tuple(bias.shape)}, expected "
                             f"({out_features},)")
        layer = cls(in_features, out_features, rank, bias=bias is not None, dtype=down.dtype, device="meta")
        layer.down.weight = nn.Parameter(down.detach().clone().contiguous())
        layer.up.weight = nn.Parameter(up.detach().clone().contiguous())
        if bias is not None:
            layer.up.bias = nn.Parameter(bias.detach().to(device=up.device, dtype=up.dtype).clone())
        return layer

    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments (used by ``llmopt.save``)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None, "dtype": dtype_name(self.weight_dtype)}

    @classmethod
    def from_config(cls, config: Dict[str, Any], device: Optional[Union[str, torch.device]] = None
                    ) -> "LowRankLinear":
        """Empty layer from :meth:`config` output (values come later from a state dict)."""
        return cls(**config, device=device)

    # ------------------------------------------------------------------ properties
    @property
    def bias(self) -> Optional[Tensor]:
        return self.up.bias

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the layer's float weights (the factors', or their dequantized dtype)."""
        up = self.up
        return up.weight_dtype if is_compressed(up) else up.weight.dtype

    # ------------------------------------------------------------------ maths
    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight ``up @ down`` ``[out, in]`` (computed in float32, or float64 for float64)."""
        dtype = dtype or self.weight_dtype
        work = torch.float64 if torch.float64 in (dtype, self.weight_dtype) else torch.float32
        return (_weight_of(self.up, work) @ _weight_of(self.down, work)).to(dtype)

    # ------------------------------------------------------------------ memory
    def stored_bytes(self) -> int:
        """Bytes ``llmopt.save`` writes for this layer (both factors, bias included)."""
        return layer_bytes(self.down) + layer_bytes(self.up)

    def runtime_bytes(self) -> int:
        """Bytes both factors hold in memory (their kernel layouts included)."""
        return layer_bytes(self.down, stored=False) + layer_bytes(self.up, stored=False)

    def weight_bytes(self) -> float:
        """Stored bytes of both factors' weights, bias excluded (a compressed factor counted from its own
        bits per weight): what :meth:`bits_per_weight` spreads over the dense ``[out, in]`` layer."""
        return _weight_bytes(self.down) + _weight_bytes(self.up)

    def describe(self) -> str:
        """Short summary for reports: ``"rank 16, float32"`` or ``"rank 16, int4 g64 [reference]"``."""
        parts = [m.describe() if is_compressed(m) else dtype_name(m.weight.dtype) for m in (self.down, self.up)]
        return f"rank {self.rank}, " + (parts[0] if parts[0] == parts[1] else f"down {parts[0]} / up {parts[1]}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
