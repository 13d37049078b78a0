"""``QATLinear``: a linear layer that trains float weights through fake quantization.

The layer behind :class:`llmopt.QAT` (``step="prepare"``); see :mod:`llmopt.methods.quant.qat` for the
training recipe and the conversion to :class:`~llmopt.nn.QuantLinear`.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.checks import check_linear_weight, dtype_name, parse_dtype
from ..core.formats import WeightFormat, get_format
from ..core.measure import tensor_bytes
from ..core.primitives import (
    ACT_BITS,
    QuantizedWeight,
    dequantize_weight,
    fake_quantize,
    fake_quantize_activations,
    parse_scale_dtype,
    quantize_weight,
    resolve_group_size,
)
from .base import CompressedLinear
from .quant_linear import QuantLinear

__all__ = ["QATLinear", "qat_layers", "qat_fake_quantize"]

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


class QATLinear(CompressedLinear):
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
    ``out_features`` are those of the wrapped layer. :meth:`to_linear` (from the base) holds the
    fake-quantized weight, as ``QuantLinear.to_linear`` would; activation quantization, if any, is not
    part of it.
    """

    # A wrapper llmopt's methods must not compress as if it were a float layer: compress_ skips it
    # ("already compressed (QATLinear)"); convert it first (compress_(model, QAT(step="convert")).
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
        self.scale_dtype = parse_scale_dtype(scale_dtype)
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

    # ------------------------------------------------------------------ reports
    def stored_bytes(self) -> int:
        """Bytes of the float weight and bias (what a checkpoint of this training layer holds)."""
        return tensor_bytes(self.weight, self.bias)

    def runtime_bytes(self) -> int:
        """The same bytes: the float weight and bias are all this layer holds."""
        return self.stored_bytes()

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


# ---------------------------------------------------------------------------------------------- model level
def qat_layers(model: nn.Module) -> Dict[str, QATLinear]:
    """``{name: layer}`` of every :class:`QATLinear` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


