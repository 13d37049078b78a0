"""Measuring what compression did: memory per layer, bits per weight, error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .targets import is_compressed

__all__ = ["memory_report", "MemoryReport", "LayerMemory", "sqnr", "trainable_parameters", "total_parameters",
           "tensor_bytes"]


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, computed in float64 (``inf`` when exact)."""
    ref = reference.detach().to(torch.float64)
    noise = (ref - approximation.detach().to(torch.float64)).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


@dataclass
class LayerMemory:
    name: str
    kind: str
    detail: str
    num_weights: int
    stored_bytes: int  # everything the layer saves, bias included
    runtime_bytes: int  # everything the layer holds in memory, bias included
    bits_per_weight: float  # stored bits of the weight alone (codes + scales), bias excluded


@dataclass
class MemoryReport:
    """Bytes per layer and in total, stored (as saved) and at run time (as held in memory)."""

    layers: List[LayerMemory] = field(default_factory=list)
    other_bytes: int = 0  # parameters and buffers outside the listed layers (embeddings, norms)

    @property
    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers) + self.other_bytes

    @property
    def runtime_bytes(self) -> int:
        return sum(layer.runtime_bytes for layer in self.layers) + self.other_bytes

    def to_dict(self) -> Dict[str, Any]:
        return {
            "layers": [dict(vars(layer)) for layer in self.layers],
            "other_bytes": self.other_bytes,
            "stored_bytes": self.stored_bytes,
            "runtime_bytes": self.runtime_bytes,
        }

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'type':<12} {'detail':<28} {'weights':>11} {'stored':>11} "
                 f"{'runtime':>11} {'bits/w':>7}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<{width}}  {layer.kind:<12} {layer.detail:<28} {layer.num_weights:>11,} "
                         f"{layer.stored_bytes:>11,} {layer.runtime_bytes:>11,} {layer.bits_per_weight:>7.3f}")
        lines.append(f"{'other (embeddings, norms, ...)':<{width + 54}} {self.other_bytes:>11,} "
                     f"{self.other_bytes:>11,}")
        lines.append(f"{'total':<{width + 54}} {self.stored_bytes:>11,} {self.runtime_bytes:>11,}"
                     f"   ({self.stored_bytes / 2**20:.2f} MiB stored, {self.runtime_bytes / 2**20:.2f} MiB in memory)")
        return "\n".join(lines)


def _tensor_key(t: torch.Tensor):
    if t.device.type == "meta":  # meta tensors have no storage address: only identity tells sharing
        return ("meta", id(t))
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
    except RuntimeError:
        # Tensor subclasses of other libraries (torchao, quanto) wrap inner tensors and have no
        # storage of their own: identity is the best sharing test available.
        return ("object", id(t))


def memory_report(model: nn.Module) -> MemoryReport:
    """Per-layer bytes of every ``nn.Linear`` and compressed wrapper, plus everything else.

    Shared tensors (tied embeddings) are counted once. ``stored`` is what ``llmopt.save`` writes;
    ``runtime`` is what the layer holds in memory in its kernel's layout.
    """
    report = MemoryReport()
    counted = set()
    layer_prefixes = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in layer_prefixes):
            continue  # inside a compressed layer (the factors of a LowRankLinear): counted with it
        if is_compressed(module):
            for t in list(module.parameters()) + list(module.buffers()):
                counted.add(_tensor_key(t))
            num_weights = module.in_features * module.out_features
            report.layers.append(LayerMemory(name, type(module).__name__, module.describe(), num_weights,
                                             int(module.stored_bytes()), int(module.runtime_bytes()),
                                             float(module.bits_per_weight())))
            layer_prefixes.append(name + "." if name else "")
        elif isinstance(module, nn.Linear):
            size = 0
            for t in module.parameters(recurse=False):
                key = _tensor_key(t)
                if key not in counted:
                    counted.add(key)
                    size += t.numel() * t.element_size()
            weight = module.weight
            detail = f"dense {str(weight.dtype).replace('torch.', '')}"
            report.layers.append(LayerMemory(name, "Linear", detail, weight.numel(), size, size,
                                             8.0 * weight.element_size()))
    for t in list(model.parameters()) + list(model.buffers()):
        key = _tensor_key(t)
        if key not in counted:
            counted.add(key)
            report.other_bytes += t.numel() * t.element_size()
    return report


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def total_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    """Bytes of the given tensors' elements; ``None`` (an absent bias) counts 0."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
