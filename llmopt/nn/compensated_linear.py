"""``CompensatedLinear``: a quantized layer plus a low-rank correction of its quantization error.

::

    y = base(x) + up @ (down @ x)          W_eff = deq(Q) + up @ down

``base`` is an llmopt wrapper (a :class:`~llmopt.nn.QuantLinear` in practice) holding ``Q`` and the
bias; ``down [r, in]`` and ``up [out, r]`` are two frozen ``nn.Parameter`` tensors (not ``nn.Linear``
modules, so that no later ``compress_`` call quantizes or prunes them: the layer is compressed as a
whole). They are usually the best rank-``r`` fit of ``W - deq(Q)`` (see
:mod:`llmopt.lowrank.compensation`).

Why not :class:`~llmopt.nn.LoRALinear` with frozen adapters: a ``LoRALinear`` is by design *not* a
compressed layer (``compress_`` would see its ``QuantLinear`` base as the compressed layer, memory
reports list the adapters apart, and its ``nn.Linear`` adapters are skipped as "LoRA adapters"), so
every llmopt contract (a compressed layer replaces each targeted Linear, reports its own bits per
weight, is never compressed twice) would need exceptions. :meth:`CompensatedLinear.to_lora` turns
the layer into a ``LoRALinear`` whose adapters *start* at the factors, for QLoRA-style fine-tuning
(the LoftQ idea: adapters initialised to the quantization error instead of zero).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..io import _MODULE_TYPES, register_module_type
from .quant_linear import dtype_name, parse_dtype

__all__ = ["CompensatedLinear"]


def _check_base(base: nn.Module) -> None:
    if not getattr(base, "is_llmopt_compressed", False):
        raise TypeError(f"CompensatedLinear: base must be an llmopt compressed layer (e.g. QuantLinear), got "
                        f"{type(base).__name__}")
    for attr in ("dequantize_weight", "stored_bytes", "runtime_bytes", "bits_per_weight", "config"):
        if not hasattr(base, attr):
            raise TypeError(f"CompensatedLinear: base {type(base).__name__} has no {attr}()")
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if not (isinstance(in_f, int) and isinstance(out_f, int) and in_f > 0 and out_f > 0):
        raise TypeError(f"CompensatedLinear: base {type(base).__name__} has no positive in_features/out_features")


class CompensatedLinear(nn.Module):
    """``y = base(x) + up(down(x))``: a compressed ``base`` plus a rank-``r`` correction.

    Args:
        base: the compressed layer (``QuantLinear``), kept as ``self.base``; it holds the bias.
        rank: ``r``, at most ``min(in_features, out_features)``.
        dtype: dtype of the factors (they are cast to the input's dtype in the forward).
        device: device of the (zero-initialised) factors; default: the base's.

    Use :meth:`from_factors` to build one from computed factors.
    """

    is_llmopt_compressed = True

    def __init__(self, base: nn.Module, rank: int, *, dtype: Union[str, torch.dtype] = torch.bfloat16,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        _check_base(base)
        in_f, out_f = base.in_features, base.out_features
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"CompensatedLinear: rank must be a positive integer, got {rank!r}")
        if rank > min(in_f, out_f):
            raise ValueError(f"CompensatedLinear: rank {rank} exceeds min(in_features, out_features) = "
                             f"{min(in_f, out_f)} (layer is {in_f} -> {out_f})")
        self.in_features, self.out_features, self.rank = int(in_f), int(out_f), int(rank)
        factor_dtype = parse_dtype(dtype)
        if device is None:
            tensors = list(base.parameters()) + list(base.buffers())
            device = tensors[0].device if tensors else torch.device("cpu")
        self.base = base
        self.down = nn.Parameter(torch.zeros(rank, in_f, dtype=factor_dtype, device=device), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(out_f, rank, dtype=factor_dtype, device=device), requires_grad=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_factors(cls, base: nn.Module, down: Tensor, up: Tensor) -> "CompensatedLinear":
        """Layer computing ``base(x) + x @ (up @ down).T`` from ``down [r, in]`` and ``up [out, r]`` (copied;
        the factors keep their dtype)."""
        _check_base(base)
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"CompensatedLinear.from_factors: expected down [r, in] and up [out, r], got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")
        if down.shape[1] != base.in_features or up.shape[0] != base.out_features:
            raise ValueError(f"CompensatedLinear.from_factors: factors {tuple(up.shape)} @ {tuple(down.shape)} do "
                             f"not match the base ({base.in_features} -> {base.out_features})")
        if down.dtype != up.dtype or down.device != up.device:
            raise ValueError(f"CompensatedLinear.from_factors: down and up differ in dtype/device "
                             f"({down.dtype}/{down.device} vs {up.dtype}/{up.device})")
        layer = cls(base, int(down.shape[0]), dtype=down.dtype, device="meta")
        layer.down = nn.Parameter(down.detach().clone().contiguous(), requires_grad=False)
        layer.up = nn.Parameter(up.detach().clone().contiguous(), requires_grad=False)
        return layer

    # ------------------------------------------------------------------ properties
    @property
    def bias(self) -> Optional[Tensor]:
        bias = getattr(self.base, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the float layer this one replaced (what :meth:`dequantize_weight` returns)."""
        dtype = getattr(self.base, "weight_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else self.up.dtype

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.up.dtype

    # The base's number format, group size and kernel (reports, repr and tests read them as for a
    # QuantLinear; the correction only adds to the base's precision).
    @property
    def format(self):
        return getattr(self.base, "format", None)

    @property
    def group_size(self) -> Optional[int]:
        return getattr(self.base, "group_size", None)

    @property
    def kernel(self):
        return getattr(self.base, "kernel", None)

    @property
    def act_bits(self) -> Optional[int]:
        return getattr(self.base, "act_bits", None)

    # ------------------------------------------------------------------ maths
    def correction(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """``up @ down`` ``[out, in]`` in ``dtype``."""
        return self.up.to(dtype) @ self.down.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        down, up = self.down, self.up
        if down.dtype != x.dtype:
            down, up = down.to(x.dtype), up.to(x.dtype)
        return y + F.linear(F.linear(x, down), up).to(y.dtype)

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The effective weight ``deq(Q) + up @ down`` ``[out, in]`` (summed in float32, or float64 when
        any of the dtypes involved is float64)."""
        dtype = dtype or self.weight_dtype
        work = torch.float64 if torch.float64 in (dtype, self.weight_dtype, self.factor_dtype) else torch.float32
        base = self.base.dequantize_weight(work if self.weight_dtype == torch.float64 else torch.float32)
        return (base.to(work) + self.correction(work).detach()).to(dtype)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the effective weight (and the bias)."""
        weight = self.dequantize_weight(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias.to(weight.dtype))
        return linear

    def to_lora(self, alpha: Optional[float] = None, dropout: float = 0.0,
                dtype: Optional[Union[str, torch.dtype]] = None) -> nn.Module:
        """A :class:`~llmopt.nn.LoRALinear` over ``self.base`` whose adapters start at the factors
        (``lora_A = down``, ``lora_B = up / scaling``), trainable: QLoRA fine-tuning from the compensated
        layer, computing the same function at the start (up to the adapter ``dtype``, default the factors').

        ``alpha`` defaults to ``rank`` (scaling 1). The base object is shared, not copied; replace this
        layer by the result (see :func:`llmopt.lowrank.compensation.compensation_to_lora_`).
        """
        from .lora_linear import LoRALinear

        alpha = float(self.rank if alpha is None else alpha)
        adapter_dtype = parse_dtype(dtype) if dtype is not None else self.factor_dtype
        layer = LoRALinear(self.base, self.rank, alpha, dropout, dtype=adapter_dtype, _empty=True)
        layer.init = "loftq"  # adapters fitted to the quantization error (LoftQ's initialisation)
        with torch.no_grad():
            layer.lora_A.weight.copy_(self.down.to(adapter_dtype))
            layer.lora_B.weight.copy_((self.up.to(torch.float64) / layer.scaling).to(adapter_dtype))
        return layer

    # ------------------------------------------------------------------ memory
    def _factor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up))

    def stored_bytes(self) -> int:
        """Bytes ``llmopt.save`` writes: the base (codes, scales, bias) plus both factors."""
        return int(self.base.stored_bytes()) + self._factor_bytes()

    def runtime_bytes(self) -> int:
        return int(self.base.runtime_bytes()) + self._factor_bytes()

    def bits_per_weight(self) -> float:
        """Stored bits per weight of the dense ``[out, in]`` layer: the base's plus the factors' (bias excluded)."""
        return float(self.base.bits_per_weight()) + 8.0 * self._factor_bytes() / (self.in_features * self.out_features)

    def describe(self) -> str:
        """``"int3 g64 [reference] + rank 32 bfloat16"``."""
        base = self.base.describe() if hasattr(self.base, "describe") else type(self.base).__name__
        return f"{base} + rank {self.rank} {dtype_name(self.factor_dtype)}"

    # ------------------------------------------------------------------ save / load (llmopt.save)
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable description (used by ``llmopt.save``); the base is described inside."""
        name = type(self.base).__name__
        if _MODULE_TYPES.get(name) is not type(self.base):
            raise TypeError(f"llmopt.save cannot describe a CompensatedLinear whose base is {name} (not a "
                            "registered llmopt wrapper)")
        return {"rank": self.rank, "dtype": dtype_name(self.factor_dtype),
                "base": {"type": name, "config": self.base.config()}}

    @classmethod
    def from_config(cls, config: Dict[str, Any], device: Optional[Union[str, torch.device]] = None
                    ) -> "CompensatedLinear":
        """Empty layer (base included) from :meth:`config` output; values come from a state dict."""
        spec = config["base"]
        if spec["type"] not in _MODULE_TYPES:
            raise ValueError(f"CompensatedLinear base has unknown type {spec['type']!r}; known: "
                             f"{sorted(_MODULE_TYPES)}")
        base = _MODULE_TYPES[spec["type"]].from_config(spec["config"], device=device)
        return cls(base, config["rank"], dtype=config["dtype"], device=device)

    def extra_repr(self) -> str:
        fmt = self.format
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"rank={self.rank}"]
        if fmt is not None:
            parts.append(f"format={fmt.name}")
        if self.group_size is not None:
            parts.append(f"group_size={self.group_size}")
        if self.kernel is not None:
            parts.append(f"kernel={self.kernel.name}")
        parts.append(f"factor_dtype={dtype_name(self.factor_dtype)}")
        return ", ".join(parts)


register_module_type(CompensatedLinear)
