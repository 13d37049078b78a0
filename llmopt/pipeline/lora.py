"""Verbs on a model's LoRA adapters that are not compressions: merge them into the weights, unmerge.

Adding adapters is a method like any other (``llmopt.compress_(model, LoRA(...))``); saving and loading
them apart from the model is :mod:`llmopt.io.adapters`.
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch.nn as nn

from ..core.measure import total_parameters, trainable_parameters
from ..core.targets import replace_modules
from ..methods.lowrank.lora import LoRAError, LoRALinear, lora_layers
from .report import LoRAReport

__all__ = ["merge_lora_", "unmerge_lora_"]


def merge_lora_(model: nn.Module, *, keep_adapters: bool = False) -> LoRAReport:
    """Fold every ``LoRALinear``'s adapters into its weights, in place; all or nothing.

    ``keep_adapters=False`` (default): each ``LoRALinear`` is replaced by :meth:`LoRALinear.merge`'s
    module (a dense copy of the base with ``W + s B A``, or a re-quantized ``QuantLinear``): the model
    has no adapters left. ``keep_adapters=True``: each layer switches to its merged state instead
    (:meth:`LoRALinear.merge_`); :func:`unmerge_lora_` restores the original bases bit-exactly.
    ``report.merge_errors`` gives each layer's relative weight error added by the merge.
    Merged parameters stay frozen (``model.requires_grad_(True)`` to train them).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("merge_lora_: the model has no LoRALinear layers (add them first: "
                         "llmopt.compress_(model, LoRA(...)))")
    start = time.perf_counter()
    report = LoRAReport()
    if keep_adapters:
        done: List[LoRALinear] = []
        try:
            for name, layer in layers.items():
                if layer.merged:
                    report.skipped[name] = "already merged"
                    continue
                try:
                    layer.merge_()
                except Exception as exc:
                    raise LoRAError(f"layer {name!r} (merge): {exc}") from exc
                done.append(layer)
                report.replaced[name] = repr(layer)
                report.merge_errors[name] = layer.merge_error
        except BaseException:
            for layer in reversed(done):
                layer.unmerge()
            raise
    else:
        new: Dict[str, nn.Module] = {}
        for name, layer in layers.items():
            if layer.merged:  # already folded into its base: just drop the adapters
                new[name] = layer.base
                if layer.merge_error is not None:
                    report.merge_errors[name] = layer.merge_error
                continue
            try:
                new[name] = layer.merge()
            except Exception as exc:
                raise LoRAError(f"layer {name!r} (merge): {exc}") from exc
            report.merge_errors[name] = layer.merge_error
        replace_modules(model, new)
        for name, module in new.items():
            report.replaced[name] = repr(module)
    report.trainable_parameters = trainable_parameters(model)
    report.total_parameters = total_parameters(model)
    report.seconds = time.perf_counter() - start
    return report


def unmerge_lora_(model: nn.Module) -> List[str]:
    """Undo ``merge_lora_(model, keep_adapters=True)``: every merged layer gets its original base back.

    Returns the names of the layers unmerged. All or nothing: if a merged layer has no original
    (it was loaded from disk merged), nothing changes and a :class:`LoRAError` names it.
    """
    merged = {name: layer for name, layer in lora_layers(model).items() if layer.merged}
    missing = [name for name, layer in merged.items() if layer.__dict__.get("_unmerged_base") is None]
    if missing:
        raise LoRAError(f"cannot unmerge {', '.join(map(repr, missing))}: the original base is not available "
                        "(layer loaded from disk in the merged state)")
    for layer in merged.values():
        layer.unmerge()
    return list(merged)
