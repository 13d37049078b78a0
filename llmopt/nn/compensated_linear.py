"""``CompensatedLinear``: a quantized layer plus a low-rank correction of its quantization error.

::

    y = Q(x) + up @ (down @ x)          W_eff = deq(Q) + up @ down

It is a :class:`~llmopt.nn.QuantLinear` (same codes, scales, kernels, bias and state-dict keys) with
two extra frozen ``nn.Parameter`` tensors, ``down [r, in]`` and ``up [out, r]``, usually the best
rank-``r`` fit of ``W - deq(Q)`` (see :mod:`llmopt.lowrank.compensation`).
:meth:`~CompensatedLinear.dequantize_weight` returns the effective weight, so everything that reads a
quantized layer's weight (``to_linear``, LoRA on top, calibration's dense copies) sees the correction.

Why not a :class:`~llmopt.nn.LoRALinear` with frozen adapters, or a wrapper around a ``QuantLinear``:
llmopt's contract is that each targeted Linear becomes *one* compressed module (``is_llmopt_compressed``)
that reports its own bits per weight and is never compressed again. A ``LoRALinear`` is by design not a
compressed layer (its ``QuantLinear`` base is, its adapters are listed apart), and a wrapper would nest a
second compressed module inside the first. Factors kept as parameters (not ``nn.Linear`` modules) are
also out of reach of later ``compress_`` calls. For fine-tuning, :meth:`CompensatedLinear.to_lora`
gives a ``LoRALinear`` over the plain ``QuantLinear`` whose trainable adapters start at the factors
(QLoRA with LoftQ-style initialisation).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.checks import dtype_name, parse_dtype
from ..core.measure import tensor_bytes
from .lora_linear import LoRALinear
from .quant_linear import QuantLinear

__all__ = ["CompensatedLinear"]

_FACTORS = ("down", "up")


def _quant_config(layer: QuantLinear) -> Dict[str, Any]:
    """``QuantLinear.config()`` of a layer (without the CompensatedLinear extras)."""
    return {k: v for k, v in QuantLinear.config(layer).items() if k not in ("rank", "factor_dtype")}


def _copy_quantized(src: QuantLinear, dst: QuantLinear, kernel: str) -> None:
    """Give ``dst`` (built on the meta device with ``src``'s config) ``src``'s bias, input scale and codes."""
    if src.input_scale is not None:
        dst.set_input_scale(src.input_scale)
    if src.bias is not None:
        dst.bias = nn.Parameter(src.bias.detach().clone(), requires_grad=False)
    dst.requested_kernel = kernel
    dst.set_canonical(src.canonical_state())


class CompensatedLinear(QuantLinear):
    """A :class:`~llmopt.nn.QuantLinear` plus a rank-``r`` correction: ``y = Q(x) + x @ (up @ down).T``.

    Args:
        in_features, out_features, bias, format, group_size, scale_dtype, dtype, device, kernel,
            input_scale: as for :class:`~llmopt.nn.QuantLinear` (``act_bits`` is not supported: the
            correction would see unquantized activations).
        rank: ``r``, at most ``min(in_features, out_features)``.
        factor_dtype: dtype of ``down``/``up`` (cast to the input's dtype in the forward).

    The factors start at zero; :meth:`from_quantized` builds a layer from a ``QuantLinear`` and factors.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 factor_dtype: Union[str, torch.dtype] = torch.bfloat16,
                 device: Optional[Union[str, torch.device]] = None, act_bits: Optional[int] = None,
                 **quant_kwargs: Any) -> None:
        if act_bits is not None:
            raise ValueError("CompensatedLinear does not support act_bits (W8A8): the correction would run on "
                             "unquantized activations")
        super().__init__(in_features, out_features, bias, device=device, **quant_kwargs)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"CompensatedLinear: rank must be a positive integer, got {rank!r}")
        if rank > min(in_features, out_features):
            raise ValueError(f"CompensatedLinear: rank {rank} exceeds min(in_features, out_features) = "
                             f"{min(in_features, out_features)} (layer is {in_features} -> {out_features})")
        self.rank = int(rank)
        fdtype = parse_dtype(factor_dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.down = nn.Parameter(torch.zeros(rank, in_features, dtype=fdtype, device=device), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=fdtype, device=device), requires_grad=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, base: QuantLinear, down: Tensor, up: Tensor) -> "CompensatedLinear":
        """Layer computing ``base(x) + x @ (up @ down).T`` from a ``QuantLinear`` (its codes, scales, bias
        and kernel are copied) and factors ``down [r, in]``, ``up [out, r]`` (copied, dtype kept)."""
        if not isinstance(base, QuantLinear):
            raise TypeError(f"CompensatedLinear.from_quantized: base must be a QuantLinear, got {type(base).__name__}")
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"CompensatedLinear.from_quantized: expected down [r, in] and up [out, r], got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")
        if down.shape[1] != base.in_features or up.shape[0] != base.out_features:
            raise ValueError(f"CompensatedLinear.from_quantized: factors {tuple(up.shape)} @ {tuple(down.shape)} "
                             f"do not match the layer ({base.in_features} -> {base.out_features})")
        if down.dtype != up.dtype or down.device != up.device:
            raise ValueError(f"CompensatedLinear.from_quantized: down and up differ in dtype/device "
                             f"({down.dtype}/{down.device} vs {up.dtype}/{up.device})")
        config = _quant_config(base)
        kernel = config.pop("kernel")
        layer = cls(**config, kernel="reference", rank=int(down.shape[0]), factor_dtype=down.dtype, device="meta")
        _copy_quantized(base, layer, kernel)
        layer.down = nn.Parameter(down.detach().clone().contiguous(), requires_grad=False)
        layer.up = nn.Parameter(up.detach().clone().contiguous(), requires_grad=False)
        return layer

    def to_quant_linear(self) -> QuantLinear:
        """A plain ``QuantLinear`` with the same codes, scales and bias: ``Q`` without the correction."""
        config = _quant_config(self)
        kernel = config.pop("kernel")
        layer = QuantLinear(**config, kernel="reference", device="meta")
        _copy_quantized(self, layer, kernel)
        return layer

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.up.dtype

    # ------------------------------------------------------------------ maths
    def correction(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """``up @ down`` ``[out, in]`` in ``dtype``."""
        return self.up.to(dtype) @ self.down.to(dtype)

    def dequantize_base(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``deq(Q)`` alone (the quantized weight, input scale included), without the correction."""
        return super().dequantize_weight(dtype)

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The effective weight ``deq(Q) + up @ down`` ``[out, in]`` (summed in float32, or float64 when
        any of the dtypes involved is float64)."""
        dtype = dtype or self.weight_dtype
        work = torch.float64 if torch.float64 in (dtype, self.weight_dtype, self.factor_dtype) else torch.float32
        return (super().dequantize_weight(work).to(work) + self.correction(work).detach()).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        down, up = self.down, self.up
        if down.dtype != x.dtype:
            down, up = down.to(x.dtype), up.to(x.dtype)
        return y + F.linear(F.linear(x, down), up).to(y.dtype)

    def to_lora(self, alpha: Optional[float] = None, dropout: float = 0.0,
                dtype: Optional[Union[str, torch.dtype]] = None) -> LoRALinear:
        """A :class:`~llmopt.nn.LoRALinear` over :meth:`to_quant_linear` whose trainable adapters start at
        the factors (``lora_A = down``, ``lora_B = up / scaling``): QLoRA fine-tuning that starts from this
        layer's function (up to the adapter ``dtype``, by default the factors'). ``alpha`` defaults to
        ``rank`` (scaling 1)."""
        alpha = float(self.rank if alpha is None else alpha)
        adapter_dtype = parse_dtype(dtype) if dtype is not None else self.factor_dtype
        layer = LoRALinear(self.to_quant_linear(), self.rank, alpha, dropout, dtype=adapter_dtype, _empty=True)
        layer.init = "loftq"  # adapters fitted to the quantization error (LoftQ's initialisation)
        with torch.no_grad():
            layer.lora_A.weight.copy_(self.down.to(adapter_dtype))
            layer.lora_B.weight.copy_((self.up.to(torch.float64) / layer.scaling).to(adapter_dtype))
        return layer

    # ------------------------------------------------------------------ memory
    def _factor_bytes(self) -> int:
        return tensor_bytes(self.down, self.up)

    def stored_bytes(self) -> int:
        """Bytes ``llmopt.save`` writes: codes, scales, bias (as ``QuantLinear``) plus both factors."""
        return super().stored_bytes() + self._factor_bytes()

    def runtime_bytes(self) -> int:
        return super().runtime_bytes() + self._factor_bytes()

    def weight_bytes(self) -> float:
        """Stored bytes of codes and scales plus both factors (bias excluded): what
        :meth:`bits_per_weight` counts."""
        return super().weight_bytes() + self._factor_bytes()

    # ------------------------------------------------------------------ state dict: QuantLinear's + factors
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _FACTORS:
            param = getattr(self, name)
            destination[prefix + name] = param if keep_vars else param.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        assign = local_metadata.get("assign_to_params_buffers", False)
        for name in _FACTORS:
            key = prefix + name
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if key not in state_dict:
                missing_keys.append(key)
                continue
            param, value = getattr(self, name), state_dict[key]
            if tuple(value.shape) != tuple(param.shape):
                error_msgs.append(f"{key}: shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            elif assign or param.device.type == "meta":
                setattr(self, name, nn.Parameter(value.detach().clone(), requires_grad=param.requires_grad))
            else:
                with torch.no_grad():
                    param.copy_(value)

    # ------------------------------------------------------------------ save / load (llmopt.save)
    def config(self) -> Dict[str, Any]:
        """``QuantLinear.config()`` plus ``rank`` and ``factor_dtype`` (used by ``llmopt.save``)."""
        return {**super().config(), "rank": self.rank, "factor_dtype": dtype_name(self.factor_dtype)}

    def describe(self) -> str:
        """``"int3 g64 [reference] + rank 32 bfloat16"``."""
        return f"{super().describe()} + rank {self.rank} {dtype_name(self.factor_dtype)}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, factor_dtype={dtype_name(self.factor_dtype)}"
