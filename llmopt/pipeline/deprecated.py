"""The verbs that were separate entry points before every technique became a method of ``compress_``.

Each one is now a ``compress_`` call, kept for one release: ``llmopt.add_lora_`` & co resolve here with
a ``DeprecationWarning`` naming the new way (``llmopt.__getattr__``). They return what they returned
before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..core.checks import dtype_name
from ..core.formats import WeightFormat, get_format
from ..core.measure import trainable_parameters
from ..core.targets import Patterns, requires_grad_flags
from ..methods.lowrank.lora import LoRA
from ..methods.prune.structured import PruneChannels, PruneHeads, StructuredReport
from ..methods.quant.qat import QAT
from .api import compress_
from .report import CompressionReport, LoRAReport

__all__ = ["add_lora_", "prepare_qat_", "convert_qat_", "prune_channels_", "prune_heads_"]


def add_lora_(model: nn.Module, config: Optional[LoRA] = None, *, include: Patterns = None,
              exclude: Patterns = None, freeze_base: bool = True) -> LoRAReport:
    """Deprecated: ``llmopt.compress_(model, LoRA(...), include=..., exclude=...)``.

    ``freeze_base=False`` keeps the ``requires_grad`` flags of the parameters outside the wrapped layers
    (the wrapped layers' own parameters are frozen in any case).
    """
    if config is None:
        config = LoRA()
    if not isinstance(config, LoRA):
        raise TypeError(f"expected a LoRA config (llmopt.LoRA(...)), got {config!r}")
    flags = requires_grad_flags(model)
    report = compress_(model, config, include=include, exclude=exclude)
    if not freeze_base:
        wrapped = {id(p) for name in report.replaced for p in model.get_submodule(name).base.parameters()}
        for p, flag in flags:
            if id(p) not in wrapped:
                p.requires_grad_(flag)
    out = LoRAReport(**{f.name: getattr(report, f.name) for f in dataclasses.fields(report)})
    out.trainable_parameters = trainable_parameters(model)  # freeze_base=False changed the flags
    return out


def _qat_format(format: Union[str, WeightFormat, Dict[str, Any]], symmetric: Optional[bool]):
    """``(name, symmetric)`` for a QAT config from the formats ``prepare_qat_`` accepted."""
    if isinstance(format, str):
        return format, symmetric
    options = get_format(format).to_dict()
    name = options.pop("name")
    sym = options.pop("symmetric", symmetric)
    if options:
        raise ValueError(f"prepare_qat_: format options {sorted(options)} cannot be expressed by QAT(...); "
                         "register a format with them and pass its name")
    return name, sym


def prepare_qat_(model: nn.Module, format: Union[str, WeightFormat, Dict[str, Any]] = "int4",
                 group_size: Optional[int] = 64, *, symmetric: Optional[bool] = None,
                 scale_dtype: Union[str, torch.dtype] = "bfloat16", act_bits: Optional[int] = None,
                 include: Patterns = None, exclude: Patterns = None) -> CompressionReport:
    """Deprecated: ``llmopt.compress_(model, QAT(format, group_size, ...), include=..., exclude=...)``."""
    name, sym = _qat_format(format, symmetric)
    if isinstance(scale_dtype, torch.dtype):
        scale_dtype = dtype_name(scale_dtype)
    config = QAT(name, group_size, symmetric=sym, scale_dtype=scale_dtype, act_bits=act_bits)
    return compress_(model, config, include=include, exclude=exclude)


def convert_qat_(model: nn.Module, kernel: str = "auto") -> CompressionReport:
    """Deprecated: ``llmopt.compress_(model, QAT(step="convert", kernel=...))``."""
    return compress_(model, QAT(step="convert", kernel=kernel))


def prune_channels_(model: nn.Module, ratio: Optional[float] = None, *,
                    ratios: Optional[Mapping[Union[int, str], float]] = None, importance: str = "magnitude",
                    adaptive: bool = False, min_keep: float = 0.1, calibration: Optional[Iterable[Any]] = None,
                    groups: Union[None, Sequence, Mapping[int, Sequence]] = None, round_to: int = 1,
                    blocks_path: Optional[str] = None) -> StructuredReport:
    """Deprecated: ``llmopt.compress_(model, PruneChannels(ratio, ...), calibration=...)``; returns its
    ``report.details[0]``."""
    config = PruneChannels(ratio, ratios=ratios, importance=importance, adaptive=adaptive, min_keep=min_keep,
                           round_to=round_to, groups=groups, blocks_path=blocks_path)
    return compress_(model, config, calibration=calibration).details[0]


def prune_heads_(model: nn.Module, ratio: Optional[float] = None, *,
                 ratios: Optional[Mapping[Union[int, str], float]] = None, importance: str = "magnitude",
                 adaptive: bool = False, min_keep: float = 0.1, calibration: Optional[Iterable[Any]] = None,
                 groups: Union[None, Sequence, Mapping[int, Sequence]] = None,
                 blocks_path: Optional[str] = None) -> StructuredReport:
    """Deprecated: ``llmopt.compress_(model, PruneHeads(ratio, ...), calibration=...)``; returns its
    ``report.details[0]``."""
    config = PruneHeads(ratio, ratios=ratios, importance=importance, adaptive=adaptive, min_keep=min_keep,
                        groups=groups, blocks_path=blocks_path)
    return compress_(model, config, calibration=calibration).details[0]
