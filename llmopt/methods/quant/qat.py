"""Quantization-aware training: fake-quantized linears for fine-tuning, then conversion to ``QuantLinear``.

::

    report = prepare_qat_(model, "int4", group_size=64, exclude=["lm_head"])   # nn.Linear -> QATLinear
    ...train as usual (the float weights are the trainable parameters)...
    report = convert_qat_(model)                                               # QATLinear -> QuantLinear

A :class:`QATLinear` keeps the float ``weight``/``bias`` of the ``nn.Linear`` it replaces (the same
``Parameter`` objects, so an optimizer built before ``prepare_qat_`` still updates them) and computes

    y = x_q @ fake_quantize(W).T + b

where ``fake_quantize`` is round-to-nearest with per-group parameters chosen from the current weight
(:func:`llmopt.quant.primitives.fake_quantize`), the parameters rounded to ``scale_dtype`` exactly as
the stored layer rounds them, and ``x_q`` is ``x`` itself or, with ``act_bits=8``, its per-token
int8 fake quantization (W8A8).

Gradients use the plain straight-through estimator (STE): rounding counts as the identity, so
``dL/dW = grad_y^T x`` evaluated at the fake-quantized weight (and ``dL/dx = grad_y W_q`` through the
activation rounding). There is no clipping mask: scales come from each group's own min/max (or
absmax), so no weight ever lies outside its group's range, and the clipped-STE variant would equal
the plain one. Scales and zero points are not learned; they follow the weights.

:func:`convert_qat_` quantizes each trained weight with the same format, group size and scale dtype
(``quantize_weight``, the function the fake quantization runs) and builds a ``QuantLinear`` from
those codes, so the converted layer computes the same function: bit-identical outputs with the
reference kernel, bf16 rounding with the fast CPU kernels.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from ...core.checks import dtype_name
from ...core.errors import CompressionError
from ...core.formats import WeightFormat
from ...core.primitives import (
    resolve_group_size,
)
from ...core.targets import Patterns, get_submodule, replace_modules, select_linears
from ...kernels import list_kernels
from ...nn.qat_linear import QATLinear, _check_act_bits, _check_scale_dtype, _resolve_format, qat_layers
from ...pipeline.api import CompressionReport, _tied_weight_notes

__all__ = ["QATLinear", "prepare_qat_", "convert_qat_", "qat_layers"]

FormatSpec = Union[str, WeightFormat, Dict[str, Any]]


def _shared_weight_notes(model: nn.Module, layers: Dict[str, nn.Module]) -> "list[str]":
    """Notes for QAT layers whose weight/bias is also used elsewhere (a head tied to the embeddings)."""
    owners: Dict[int, list] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    notes = []
    for name, layer in layers.items():
        for pname, param in layer.named_parameters(recurse=False):
            others = [o for o in owners.get(id(param), []) if o != f"{name}.{pname}"]
            if others:
                notes.append(f"{name}.{pname} is shared with {', '.join(others)}: training updates both, and "
                             f"convert_qat_ will leave that module's float copy (exclude {name!r} to avoid it)")
    return notes


def _method_dict(fmt: WeightFormat, group_size: Optional[int], scale_dtype: torch.dtype,
                 act_bits: Optional[int], **extra: Any) -> Dict[str, Any]:
    return {"name": "qat", "format": fmt.to_dict(), "group_size": group_size,
            "scale_dtype": dtype_name(scale_dtype), "act_bits": act_bits, **extra}


def prepare_qat_(
    model: nn.Module,
    format: FormatSpec = "int4",
    group_size: Optional[int] = 64,
    *,
    symmetric: Optional[bool] = None,
    scale_dtype: Union[str, torch.dtype] = "bfloat16",
    act_bits: Optional[int] = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> CompressionReport:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by :class:`QATLinear`, in place; all or nothing.

    Targets are chosen like :func:`llmopt.compress_` (glob ``include``/``exclude`` on module names;
    llmopt wrappers and LoRA adapters are skipped and listed in ``report.skipped``). Options are
    validated before any layer is touched; a layer that cannot be quantized (NaN/Inf or meta
    weights, a format failing on it) raises :class:`~llmopt.api.CompressionError` naming it, and the
    model is left exactly as it was. The weights are not copied: the QAT layers own the original
    Parameters. ``report.bytes_before == report.bytes_after`` (the weights stay float until
    :func:`convert_qat_`).
    """
    start = time.perf_counter()
    fmt = _resolve_format(format, symmetric)
    resolve_group_size(group_size, 1 << 30)
    sdtype = _check_scale_dtype(scale_dtype)
    _check_act_bits(act_bits)
    targets, skipped = select_linears(model, include, exclude)
    if not targets:
        raise ValueError(f"prepare_qat_: no nn.Linear to prepare matches include={include!r} exclude={exclude!r}"
                         + (f" (skipped: {skipped})" if skipped else ""))
    new: Dict[str, nn.Module] = {}
    for name, linear in targets.items():
        try:
            new[name] = QATLinear(linear, fmt, group_size, scale_dtype=sdtype, act_bits=act_bits)
        except Exception as exc:
            raise CompressionError(f"layer {name!r} (qat {fmt.name}): {exc}") from exc
    replace_modules(model, new)
    report = CompressionReport(skipped=dict(skipped))
    for name, layer in new.items():
        report.replaced[name] = repr(layer)
        report.bytes_before += layer.stored_bytes()
        report.bytes_after += layer.stored_bytes()
    report.methods.append(_method_dict(fmt, group_size, sdtype, act_bits, step="prepare"))
    report.notes.extend(_shared_weight_notes(model, new))
    report.seconds = time.perf_counter() - start
    return report


def convert_qat_(model: nn.Module, kernel: str = "auto") -> CompressionReport:
    """Replace every :class:`QATLinear` of ``model`` by the equivalent :class:`~llmopt.nn.QuantLinear`.

    Each trained weight is quantized with the layer's format, group size and scale dtype (the codes
    its forward used); bias and ``act_bits`` carry over. All or nothing: a layer whose weight became
    NaN/Inf in training, or an explicit ``kernel`` that cannot serve a layer, raises
    :class:`~llmopt.api.CompressionError` naming it, and no layer is converted.
    """
    start = time.perf_counter()
    if kernel != "auto" and kernel not in list_kernels():
        raise ValueError(f"unknown kernel {kernel!r}; use 'auto' or one of {list_kernels()}")
    layers = qat_layers(model)
    if not layers:
        raise ValueError("convert_qat_: the model has no QATLinear layer (call prepare_qat_ first)")
    new: Dict[str, nn.Module] = {}
    for name, layer in layers.items():
        try:
            new[name] = layer.to_quant_linear(kernel)
        except Exception as exc:
            raise CompressionError(f"layer {name!r} (qat {layer.format.name}): {exc}") from exc
    replace_modules(model, new)
    report = CompressionReport(notes=_tied_weight_notes(model, layers))
    seen = set()
    for name, layer in layers.items():
        quant = get_submodule(model, name)
        report.replaced[name] = repr(quant)
        report.bytes_before += layer.stored_bytes()
        report.bytes_after += quant.stored_bytes()
        key = (layer.format.to_dict().get("name"), layer.group_size, layer.scale_dtype, layer.act_bits)
        if key not in seen:
            seen.add(key)
            report.methods.append(_method_dict(layer.format, layer.group_size, layer.scale_dtype, layer.act_bits,
                                               step="convert", kernel=kernel))
    report.seconds = time.perf_counter() - start
    return report
