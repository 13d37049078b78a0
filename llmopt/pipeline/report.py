"""What a whole-model call did: :class:`CompressionReport` (``compress_``) and :class:`LoRAReport`
(``merge_lora_``, ``load_adapters``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch.nn as nn

__all__ = ["CompressionReport", "LoRAReport", "tied_weight_notes"]


@dataclass
class CompressionReport:
    """What ``compress_`` did: replaced layers, bytes before/after, time."""

    replaced: Dict[str, str] = field(default_factory=dict)  # name -> repr of the new module
    # Non-target modules swapped for rescaled copies (AWQ/SmoothQuant folding 1/s into a norm).
    rescaled: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)  # name -> reason
    notes: List[str] = field(default_factory=list)  # things the user should know (tied weights, ...)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    methods: List[Dict[str, Any]] = field(default_factory=list)  # one dict per stage (a config's to_dict())
    # name -> the configs (to_dict()) applied to that layer by this call, in order (prune, then quantize)
    layer_configs: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    # Parameter elements of the model afterwards: those with requires_grad (adapters after LoRA), and all.
    trainable_parameters: int = 0
    total_parameters: int = 0
    # One entry per stage: the method's own summary (structured pruning: a StructuredReport), or None.
    details: List[Any] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """``bytes_before / bytes_after`` of the replaced layers; ``1.0`` when nothing was replaced (a model
        compressed already: every layer skipped), so reports and JSON never show NaN."""
        if not self.bytes_after:
            return 1.0 if not self.bytes_before else float("inf")
        return self.bytes_before / self.bytes_after

    def to_dict(self) -> Dict[str, Any]:
        return {
            "replaced": dict(self.replaced), "rescaled": dict(self.rescaled), "skipped": dict(self.skipped),
            "notes": list(self.notes),
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "compression_ratio": self.compression_ratio, "seconds": self.seconds, "methods": self.methods,
            "layer_configs": {name: list(configs) for name, configs in self.layer_configs.items()},
            "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
            "details": [None if d is None else d.to_dict() for d in self.details],
        }

    def __str__(self) -> str:
        if not (self.bytes_before or self.bytes_after):
            return (f"compressed {len(self.replaced)} layer(s), skipped {len(self.skipped)}: nothing compressed "
                    f"in {self.seconds:.2f} s")
        return (f"compressed {len(self.replaced)} layer(s), skipped {len(self.skipped)}: "
                f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
                f"({self.compression_ratio:.2f}x) in {self.seconds:.2f} s")


@dataclass
class LoRAReport(CompressionReport):
    """What ``merge_lora_`` / ``load_adapters`` did.

    ``replaced``: layer name -> repr of the new module; ``merge_errors``: layer name -> relative
    Frobenius error the merge added (re-quantization for a quantized base, float rounding otherwise).
    """

    merge_errors: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {**super().to_dict(), "merge_errors": dict(self.merge_errors)}

    def __str__(self) -> str:
        text = (f"{len(self.replaced)} layer(s) changed, skipped {len(self.skipped)}; trainable parameters "
                f"{self.trainable_parameters:,} of {self.total_parameters:,} in {self.seconds:.2f} s")
        if self.merge_errors:
            text += f"; largest merge error {max(self.merge_errors.values()):.3g}"
        return text


def tied_weight_notes(model: nn.Module, swapped: Dict[str, nn.Module]) -> List[str]:
    """Warn when a replaced layer's weight was shared with a module that still uses it (tied head): that
    module keeps the float tensor next to the compressed copy. A replacement that holds the very same
    Parameter (an adapter wrapper, a QAT layer) duplicates nothing and gets no note."""
    owners: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    notes = []
    for name, original in swapped.items():
        kept = {id(p) for p in model.get_submodule(name).parameters()}
        for pname, param in original.named_parameters(recurse=False):
            still_used = owners.get(id(param), [])
            if still_used and id(param) not in kept:
                notes.append(f"{name}.{pname} was shared with {', '.join(still_used)}; that module keeps the "
                             f"float tensor, so memory grows by the compressed copy (exclude {name!r} to avoid it)")
    return notes
