"""What every llmopt layer that stands in for an ``nn.Linear`` provides: :class:`CompressedLinear`.

A wrapper declares its storage (``stored_bytes``/``runtime_bytes``), the float weight it computes
with (``dequantize_weight``), a short description, and its constructor arguments as JSON
(``config``/``from_config``); the base derives the rest (``to_linear``, ``bits_per_weight``, ``repr``)
and registers every concrete subclass for ``llmopt.save``/``llmopt.load`` by its class name, so a new
wrapper needs no registration call and no edit anywhere else.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Type, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..core.measure import tensor_bytes
from ..core.targets import is_compressed

__all__ = ["CompressedLinear", "dense_linear", "register_module_type", "module_types", "layer_bytes"]


def dense_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """A plain ``nn.Linear`` holding copies of ``weight [out, in]`` and ``bias`` (cast to the weight's dtype)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.to(weight.dtype))
    return linear


def layer_bytes(module: nn.Module, stored: bool = True) -> int:
    """Bytes of a sub-layer (a factor, a wrapped base): a compressed wrapper's ``stored_bytes()`` (or
    ``runtime_bytes()`` with ``stored=False``), else the bytes of its parameters and buffers."""
    if is_compressed(module):
        return int(module.stored_bytes() if stored else module.runtime_bytes())
    return tensor_bytes(*module.parameters(), *module.buffers())


# type name -> class with .config() and .from_config(config, device)
_MODULE_TYPES: Dict[str, Type[nn.Module]] = {}


def register_module_type(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Make a wrapper class loadable: it needs ``config() -> dict`` and ``from_config(config, device)``.

    Subclasses of :class:`CompressedLinear` are registered automatically; this is for other modules.
    """
    if not (hasattr(cls, "config") and hasattr(cls, "from_config")):
        raise TypeError(f"{cls.__name__} needs config() and from_config(config, device) to be saved/loaded")
    _MODULE_TYPES[cls.__name__] = cls
    return cls


def module_types() -> Dict[str, Type[nn.Module]]:
    """``{class name: class}`` of every wrapper ``llmopt.load`` can rebuild."""
    return dict(_MODULE_TYPES)


class CompressedLinear(nn.Module):
    """Base of every llmopt layer that replaces or wraps an ``nn.Linear``.

    Subclasses set ``in_features``/``out_features`` and implement the methods that raise
    ``NotImplementedError`` here. ``class MyLinear(CompressedLinear, register=False)`` opts an
    intermediate (abstract) class out of the save/load registry.

    ``is_llmopt_compressed``: ``True`` for compressed forms that methods must not compress again
    (``compress_`` skips them unless a method accepts them, e.g. RTN quantizing a float
    ``SparseLinear``); a wrapper that only adds to its base (LoRA) sets it to ``False``.
    """

    is_llmopt_compressed: ClassVar[bool] = True
    in_features: int
    out_features: int

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            register_module_type(cls)

    # ------------------------------------------------------------------ what every wrapper implements
    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight ``[out_features, in_features]`` this layer multiplies by."""
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """Bytes ``llmopt.save`` writes for this layer (weights, parameters, bias)."""
        raise NotImplementedError

    def runtime_bytes(self) -> int:
        """Bytes this layer holds in memory (kernel layouts and padding included)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Short summary for reports, e.g. ``"int4 g64 [int4pack_cpu]"``."""
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments (written to the manifest by ``llmopt.save``)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Dict[str, Any],
                    device: Optional[Union[str, torch.device]] = None) -> "CompressedLinear":
        """An empty layer from :meth:`config` output; the values come later from a state dict."""
        raise NotImplementedError

    # ------------------------------------------------------------------ derived
    def weight_bytes(self) -> float:
        """Stored bytes of the weight alone (bias excluded): the numerator of :meth:`bits_per_weight`."""
        bias = getattr(self, "bias", None)
        return float(self.stored_bytes() - tensor_bytes(bias if isinstance(bias, Tensor) else None))

    def bits_per_weight(self) -> float:
        """Stored bits per weight, parameters included, bias excluded."""
        return 8.0 * self.weight_bytes() / (self.in_features * self.out_features)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` computing with :meth:`dequantize_weight` (and this layer's bias)."""
        bias = getattr(self, "bias", None)
        return dense_linear(self.dequantize_weight(dtype), bias.detach() if isinstance(bias, Tensor) else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"
