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

import json
import time
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..api import CompressionError, CompressionReport, _tied_weight_notes
from ..io import register_module_type
from ..kernels import list_kernels
from ..nn.quant_linear import QuantLinear, check_linear_weight, dtype_name, parse_dtype
from ..targets import Patterns, get_submodule, replace_modules, select_linears
from .formats import WeightFormat, get_format
from .primitives import (
    ACT_BITS,
    QuantizedWeight,
    SCALE_DTYPES,
    dequantize_weight,
    fake_quantize,
    fake_quantize_activations,
    quantize_weight,
    resolve_group_size,
)
from ..nn.common import dense_linear

__all__ = ["QATLinear", "prepare_qat_", "convert_qat_", "qat_layers"]

FormatSpec = Union[str, WeightFormat, Dict[str, Any]]


def _resolve_format(format: FormatSpec, symmetric: Optional[bool]) -> WeightFormat:
    """``get_format`` with the ``symmetric`` option (affine formats only); an instance passes through."""
    if isinstance(format, WeightFormat):
        fmt = get_format(format)
        if symmetric is not None and bool(getattr(fmt, "symmetric", not fmt.has_zero_point)) != bool(symmetric):
            raise ValueError(f"symmetric={symmetric} contradicts the format instance {fmt!r}; "
                             "pass a format name, or an instance built with the option you want")
        return fmt
    return get_format(format, **({"symmetric": symmetric} if symmetric is not None else {}))


def _check_act_bits(act_bits: Optional[int]) -> None:
    if act_bits is not None and (isinstance(act_bits, bool) or act_bits not in ACT_BITS):
        raise ValueError(f"act_bits must be None or one of {ACT_BITS}, got {act_bits!r}")


def _check_scale_dtype(scale_dtype: Union[str, torch.dtype]) -> torch.dtype:
    try:
        dtype = parse_dtype(scale_dtype)
    except ValueError:
        dtype = None
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of float32, float16, bfloat16; got {scale_dtype!r}")
    return dtype


# Formats the compiled fake quantization may be asked for, by their JSON key (see _format_key). Filled by
# QATLinear.__init__ (eager), so a user's unregistered format instance is found too.
_COMPILE_FORMATS: Dict[str, WeightFormat] = {}


def _format_key(fmt: WeightFormat) -> str:
    key = json.dumps(fmt.to_dict(), sort_keys=True)
    _COMPILE_FORMATS.setdefault(key, fmt)
    return key


@torch.library.custom_op("llmopt::qat_fake_quantize", mutates_args=())
def qat_fake_quantize(weight: Tensor, format_key: str, group_size: int, scale_dtype: torch.dtype) -> Tensor:
    """``fake_quantize`` as one opaque op, which :class:`QATLinear` uses under ``torch.compile``.

    Inductor computes a fused ``x.to(bfloat16).to(float32)`` without the rounding (it keeps
    intermediates in float32 unless ``emulate_precision_casts`` is set), so the scales the compiled
    fake quantization divides by would not be the rounded ones the stored layer keeps: a few codes
    per layer came out one step off. Behind this op the eager maths runs unchanged, bit-identical
    to :meth:`QATLinear.to_quant_linear`; gradients are straight-through.
    """
    fmt = _COMPILE_FORMATS.get(format_key) or get_format(json.loads(format_key))
    q = quantize_weight(weight.detach(), fmt, group_size, scale_dtype)
    return dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, weight.dtype)


@qat_fake_quantize.register_fake
def _qat_fake_quantize_fake(weight: Tensor, format_key: str, group_size: int, scale_dtype: torch.dtype) -> Tensor:
    return torch.empty_like(weight)


def _qat_fake_quantize_backward(ctx: Any, grad: Tensor):
    return grad, None, None, None


qat_fake_quantize.register_autograd(_qat_fake_quantize_backward)


class QATLinear(nn.Module):
    """A linear layer that trains float weights through the fake quantization of a weight format.

    Args:
        linear: the ``nn.Linear`` (or subclass) to wrap; its ``weight``/``bias`` Parameters become this
            module's own (same objects, ``requires_grad`` untouched).
        format: a registered format name, a ``to_dict()`` dict or a :class:`WeightFormat` instance.
        group_size: columns sharing one scale; ``None``/``-1`` for one scale per output row. A group
            size that does not divide ``in_features`` gives a shorter (padded) last group.
        symmetric: affine formats only; ``None`` keeps the format's default.
        scale_dtype: dtype the stored scales/zero points will have (the fake quantization rounds
            them to it, so :meth:`to_quant_linear` is exact).
        act_bits: ``8`` also fake-quantizes the activations per token (train for W8A8); ``None``: not.

    The forward works in eval mode too: the quantization is always on. ``in_features`` and
    ``out_features`` are those of the wrapped layer.
    """

    # A wrapper llmopt's methods must not compress as if it were a float layer: compress_ skips it
    # ("already compressed (QATLinear)"); convert it with convert_qat_ first.
    is_llmopt_compressed = True
    is_llmopt_qat = True

    def __init__(
        self,
        linear: nn.Linear,
        format: FormatSpec = "int4",
        group_size: Optional[int] = 64,
        *,
        symmetric: Optional[bool] = None,
        scale_dtype: Union[str, torch.dtype] = torch.bfloat16,
        act_bits: Optional[int] = None,
        check: bool = True,
    ) -> None:
        super().__init__()
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"expected an nn.Linear with a weight, got {type(linear).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
        _check_act_bits(act_bits)
        self.format = _resolve_format(format, symmetric)
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.group_size = resolve_group_size(group_size, self.in_features)
        self.scale_dtype = _check_scale_dtype(scale_dtype)
        self.act_bits = act_bits
        self._format_key = _format_key(self.format)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        bias = getattr(linear, "bias", None)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias)
        self.bias = bias
        if check:
            self.check()

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Raise a clear error if the current weight cannot be quantized (NaN/Inf, meta, non-float)
        or the format gives non-finite values for it. Costs one quantization pass."""
        check_linear_weight(self.weight.detach())
        q = quantize_weight(self.weight.detach(), self.format, self.group_size, self.scale_dtype)
        values = dequantize_weight(q.codes, q.scale, q.zero_point, self.format, q.group_size, torch.float32)
        if not torch.isfinite(values.sum()) and not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(f"format {self.format.name!r} with group_size={self.group_size} and "
                             f"scale_dtype={dtype_name(self.scale_dtype)} gives {bad} non-finite values")

    # ------------------------------------------------------------------ maths
    def quantize(self) -> QuantizedWeight:
        """``QuantizedWeight`` of the current weight: what :meth:`to_quant_linear` stores."""
        return quantize_weight(self.weight.detach(), self.format, self.group_size, self.scale_dtype)

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The fake-quantized weight ``[out, in]`` the forward multiplies by (detached)."""
        q = self.quantize()
        return dequantize_weight(q.codes, q.scale, q.zero_point, self.format, q.group_size,
                                 dtype or self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is not None:
            fq = fake_quantize_activations(x, self.act_bits)
            # Straight-through: the rounding counts as the identity for the input gradient.
            x = x + (fq - x).detach() if x.requires_grad else fq
        weight = self.weight
        if weight.dtype != x.dtype and weight.dtype != torch.float32:
            # QuantLinear dequantizes in float32 and rounds once to the activation dtype: do the same.
            weight = weight.to(torch.float32)
        if torch.compiler.is_compiling():
            w_q = qat_fake_quantize(weight, self._format_key, self.group_size, self.scale_dtype)
        else:
            w_q = fake_quantize(weight, self.format, self.group_size, self.scale_dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w_q.to(x.dtype), bias)

    # ------------------------------------------------------------------ conversion
    def to_quant_linear(self, kernel: str = "auto") -> QuantLinear:
        """The ``QuantLinear`` computing this layer's forward: same codes, scales, bias and ``act_bits``."""
        check_linear_weight(self.weight.detach())
        q = self.quantize()
        return QuantLinear.from_codes(
            q.codes, q.scale, q.zero_point, format=self.format, group_size=q.group_size,
            bias=self.bias.detach() if self.bias is not None else None,
            dtype=self.weight.dtype, kernel=kernel, act_bits=self.act_bits,
        )

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the fake-quantized weight (as ``QuantLinear.to_linear``: the weights
        this layer multiplies by; activation quantization, if any, is not part of it)."""
        return dense_linear(self.dequantize_weight(dtype), self.bias)

    # ------------------------------------------------------------------ reports
    def stored_bytes(self) -> int:
        """Bytes of the float weight and bias (what a checkpoint of this training layer holds)."""
        return sum(p.numel() * p.element_size() for p in (self.weight, self.bias) if p is not None)

    def runtime_bytes(self) -> int:
        return self.stored_bytes()

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight.element_size()

    def describe(self) -> str:
        """``"qat int4 g64 (float32 weights)"``."""
        act = f" a{self.act_bits}" if self.act_bits is not None else ""
        return f"qat {self.format.name} g{self.group_size}{act} ({dtype_name(self.weight.dtype)} weights)"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format.name}, group_size={self.group_size}, "
                f"scale_dtype={dtype_name(self.scale_dtype)}"
                + (f", act_bits={self.act_bits}" if self.act_bits is not None else ""))

    # ------------------------------------------------------------------ save / load (training checkpoints)
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable arguments for :meth:`from_config` (``llmopt.save`` of a model mid-training)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "format": self.format.to_dict(),
            "group_size": self.group_size,
            "scale_dtype": dtype_name(self.scale_dtype),
            "dtype": dtype_name(self.weight.dtype),
            "act_bits": self.act_bits,
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any], device: Optional[Union[str, torch.device]] = None) -> "QATLinear":
        """Empty layer from :meth:`config` (values come later from a state dict)."""
        linear = nn.Linear(config["in_features"], config["out_features"], bias=config["bias"],
                           device=device or "cpu", dtype=parse_dtype(config.get("dtype", "float32")))
        return cls(linear, config["format"], config["group_size"], scale_dtype=config["scale_dtype"],
                   act_bits=config.get("act_bits"), check=False)


register_module_type(QATLinear)


# ---------------------------------------------------------------------------------------------- model level
def qat_layers(model: nn.Module) -> Dict[str, QATLinear]:
    """``{name: layer}`` of every :class:`QATLinear` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


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
