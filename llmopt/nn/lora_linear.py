"""``LoRALinear``: trainable low-rank adapters around any frozen linear-like layer.

The wrapped ``base`` is anything with ``in_features``/``out_features`` and a forward computing
``x @ W.T + b``: an ``nn.Linear`` (or a user's subclass), a :class:`~llmopt.nn.QuantLinear` (QLoRA),
a low-rank layer, a layer with a pruning mask. Its parameters are frozen; only the adapters train::

    y = base(x) + s * B(A(dropout(x)))                  s = alpha / r   (alpha / sqrt(r) with rsLoRA)

DoRA (Liu et al. 2024) adds a trainable magnitude ``m [out]`` and normalises each output row::

    y = m * (W + s B A) x / ||W + s B A||_row + b        (the norm is detached, as the paper advises)

``W`` (needed by DoRA, PiSSA and merging) is ``base.weight`` if the base has one, else
``base.dequantize_weight()``, else ``base.to_linear().weight``.

Merging (see :meth:`LoRALinear.merge`, :meth:`LoRALinear.merge_` and :meth:`LoRALinear.unmerge`):

* ``merge()`` is pure: it returns a new module without adapters computing ``W' = W + s B A``
  (DoRA: ``m * W' / ||W'||``), evaluated in float64 and rounded once. A dense base gives a copy of
  itself with the merged weight; a ``QuantLinear`` base is re-quantized with the same format, group
  size, scale dtype, input scale and activation bits, and the error this rounding adds is recorded
  in :attr:`LoRALinear.merge_error` (relative Frobenius norm against the float64 merged weight).
* ``merge_()`` switches this layer to a *merged state*: the merged module becomes ``base`` (so the
  forward costs one matmul) and the original base object is kept aside, outside the module tree
  (``state_dict``/``save`` see only the merged weights; ``.to()`` moves both). ``unmerge()`` puts
  the original object back: bit-exact for any base, quantized or not, since nothing is recomputed.
  The price is one extra copy of the layer's weights while merged.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..core.checks import dtype_name, parse_dtype
from ..core.formats import WeightFormat, get_format
from ..core.measure import tensor_bytes
from ..core.primitives import dequantize_weight as _dequantize_codes
from ..core.primitives import quantize_weight
from .base import CompressedLinear, layer_bytes, module_types
from .quant_linear import QuantLinear

__all__ = ["LoRALinear", "base_weight", "LORA_INITS", "Requantizer"]

LORA_INITS = ("gaussian", "pissa", "loftq")


# ---------------------------------------------------------------------------------------------- helpers
def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight ``[out, in]`` a linear-like layer multiplies by (detached, in ``dtype``)."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, Tensor):
        return weight.detach().to(dtype)
    if isinstance(base, QuantLinear):
        return base.dequantize_weight(torch.float32).to(dtype)
    if hasattr(base, "dequantize_weight"):
        return base.dequantize_weight().detach().to(dtype)
    if hasattr(base, "to_linear"):
        return base.to_linear().weight.detach().to(dtype)
    raise TypeError(f"{type(base).__name__} exposes no weight (needs .weight, .dequantize_weight() or "
                    ".to_linear())")


def _base_dtype(base: nn.Module) -> torch.dtype:
    """Float dtype of the base's weights (what the adapters default to)."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    dtype = getattr(base, "weight_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in base.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


def _base_bias(base: nn.Module) -> Optional[Tensor]:
    bias = getattr(base, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def _row_norm(weight: Tensor) -> Tensor:
    """Per-output-row L2 norm (over the input dimension), DoRA's ``||W||_c`` for ``W [out, in]``."""
    return torch.linalg.vector_norm(weight, dim=1)


def _dense_with_weight(base: nn.Module, weight: Tensor) -> nn.Module:
    """A copy of a dense ``nn.Linear`` (any subclass) whose weight is ``weight`` (cast to its dtype).

    The old weight is not copied: the deepcopy memo maps it straight to the new parameter.
    """
    if not (isinstance(base, nn.Linear) and isinstance(base.weight, Tensor)):
        raise TypeError(f"cannot write a new weight into {type(base).__name__}: merging and PiSSA need an "
                        "nn.Linear (or subclass) or a QuantLinear base")
    old = base.weight
    new = nn.Parameter(weight.detach().to(device=old.device, dtype=old.dtype).contiguous(),
                       requires_grad=old.requires_grad)
    return copy.deepcopy(base, memo={id(old): new})


def _svd_factors(weight: Tensor, rank: int, scaling: float) -> Tuple[Tensor, Tensor]:
    """``(A [r, in], B [out, r])`` with ``s * B @ A`` the best rank-r approximation of ``weight``."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


class Requantizer:
    """Quantize a float weight the way a given ``QuantLinear`` (or a format spec) stores it.

    ``fake(W)`` returns the dequantized weight the layer would compute with; ``build(W)`` the layer.
    A layer's input scale (AWQ/SmoothQuant) and activation bits are kept: the stored weight is
    ``W / input_scale``, as in the original.
    """

    def __init__(self, format: Union[str, WeightFormat, Dict[str, Any]], group_size: Optional[int],
                 scale_dtype: torch.dtype = torch.bfloat16, *, dtype: torch.dtype = torch.float32,
                 kernel: str = "auto", input_scale: Optional[Tensor] = None, act_bits: Optional[int] = None,
                 bias: Optional[Tensor] = None) -> None:
        self.format = get_format(format)
        self.group_size = group_size
        self.scale_dtype = parse_dtype(scale_dtype)
        self.dtype = dtype
        self.kernel = kernel
        self.input_scale = input_scale
        self.act_bits = act_bits
        self.bias = bias

    @classmethod
    def like(cls, layer: QuantLinear) -> "Requantizer":
        return cls(layer.format, layer.group_size, layer.scale_dtype, dtype=layer.weight_dtype,
                   kernel=layer.requested_kernel, input_scale=layer.input_scale, act_bits=layer.act_bits,
                   bias=layer.bias.detach() if layer.bias is not None else None)

    def _quantize(self, weight: Tensor):
        w = weight.to(torch.float32)
        if self.input_scale is not None:
            w = w / self.input_scale.to(device=w.device, dtype=torch.float32)
        return quantize_weight(w, self.format, self.group_size, self.scale_dtype)

    def fake(self, weight: Tensor) -> Tensor:
        """Float32 weight after a quantize/dequantize round trip."""
        q = self._quantize(weight)
        w = _dequantize_codes(q.codes, q.scale, q.zero_point, self.format, q.group_size, torch.float32)
        if self.input_scale is not None:
            w = w * self.input_scale.to(device=w.device, dtype=torch.float32)
        return w

    def build(self, weight: Tensor) -> QuantLinear:
        q = self._quantize(weight)
        return QuantLinear.from_codes(
            q.codes, q.scale, q.zero_point, format=self.format, group_size=q.group_size, bias=self.bias,
            dtype=self.dtype, kernel=self.kernel, input_scale=self.input_scale, act_bits=self.act_bits)


def _freeze_base(module: "LoRALinear", incompatible_keys) -> None:
    for p in module.base.parameters():
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- module
class LoRALinear(CompressedLinear):
    """Frozen ``base`` plus trainable adapters ``lora_A`` (in -> r) and ``lora_B`` (r -> out).

    Args:
        base: the layer to adapt (kept as ``self.base``; its parameters get ``requires_grad=False``).
        rank, alpha: adapter rank ``r`` and ``alpha``; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input (training only).
        use_rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
        use_dora: DoRA: learn a per-output-row magnitude, initialised to ``||W||_row``.
        init: ``"gaussian"`` (A ~ N(0, 1/r^2), B = 0: output unchanged), ``"pissa"`` (A, B from the
            top-r singular triplets of W; the base becomes the residual ``W - s B A``, re-quantized
            for a quantized base: QPiSSA) or ``"loftq"`` (needs ``quantize_base``: alternate
            ``Q = quantize(W - s B A)`` and ``B, A = rank-r SVD of W - deq(Q)``).
        loftq_iters: LoftQ alternations.
        quantize_base: a format name (``"int4"``, ``"nf4"``, ...): quantize a dense base while
            initialising (QLoRA from a float model; with ``"pissa"``, the residual is quantized).
        quant_group_size: group size for ``quantize_base``.
        dtype: adapter dtype (default: the base's weight dtype).

    The new base (PiSSA/LoftQ/``quantize_base``) is a new module: the ``base`` passed in is only
    ever changed by freezing its parameters.
    """

    # An adapter wrapper, not a compressed layer: memory reports list its base and adapters
    # separately, and llmopt never compresses a LoRALinear as a whole. It still offers the wrapper
    # interface (dequantize_weight, bytes, config) of CompressedLinear.
    is_llmopt_compressed = False
    is_llmopt_lora = True

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        *,
        init: str = "gaussian",
        loftq_iters: int = 1,
        quantize_base: Optional[Union[str, WeightFormat, Dict[str, Any]]] = None,
        quant_group_size: Optional[int] = 64,
        dtype: Optional[Union[str, torch.dtype]] = None,
        _empty: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TypeError("base is already a LoRALinear: adapters are never stacked")
        in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if not (isinstance(in_f, int) and isinstance(out_f, int) and in_f > 0 and out_f > 0):
            raise TypeError(f"{type(base).__name__} has no positive integer in_features/out_features")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if rank > min(in_f, out_f):
            raise ValueError(f"rank {rank} exceeds min(in_features, out_features) = {min(in_f, out_f)} "
                             f"(layer is {in_f} -> {out_f})")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if init not in LORA_INITS:
            raise ValueError(f"init must be one of {LORA_INITS}, got {init!r}")
        if not isinstance(loftq_iters, int) or isinstance(loftq_iters, bool) or loftq_iters < 1:
            raise ValueError(f"loftq_iters must be a positive integer, got {loftq_iters!r}")

        self.in_features, self.out_features = in_f, out_f
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout_p = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.use_dora = bool(use_dora)
        self.init = init
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.merged = False
        self.merge_error: Optional[float] = None  # set by merge(): error re-quantization added
        self.__dict__["_unmerged_base"] = None  # original base while merged (outside the module tree)
        adapter_dtype = parse_dtype(dtype) if dtype is not None else _base_dtype(base)
        device = _base_device(base)

        if _empty:  # placeholders of the right shape; values come from a state dict (llmopt.load)
            new_base, a, b = base, torch.empty(rank, in_f), torch.empty(out_f, rank)
        else:
            new_base, a, b = self._initial_state(base, init, loftq_iters, quantize_base, quant_group_size,
                                                 adapter_dtype)
        for p in new_base.parameters():
            p.requires_grad_(False)
        self.base = new_base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, rank, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(rank, out_f, bias=False, device=device, dtype=adapter_dtype)
        for adapter in (self.lora_A, self.lora_B):
            adapter.is_llmopt_adapter = True  # compress_ never quantizes or prunes an adapter
        with torch.no_grad():
            if not _empty:
                self.lora_A.weight.copy_(a)
                self.lora_B.weight.copy_(b)
        if self.use_dora:
            magnitude = (torch.empty(out_f, device=device, dtype=adapter_dtype) if _empty
                         else self._weight_norm().to(adapter_dtype))
            self.lora_magnitude = nn.Parameter(magnitude)
        else:
            self.register_parameter("lora_magnitude", None)
        # llmopt.load may put a freshly built wrapper in as the base: keep the base frozen after loading.
        self.register_load_state_dict_post_hook(_freeze_base)

    # ------------------------------------------------------------------ initialisation
    def _initial_state(self, base: nn.Module, init: str, loftq_iters: int, quantize_base,
                       quant_group_size, adapter_dtype: torch.dtype) -> Tuple[nn.Module, Tensor, Tensor]:
        """``(new_base, A, B)`` for the chosen initialisation (pure: ``base`` is not modified).

        The residual left in the base is computed with the adapters as they will be stored (rounded
        to ``adapter_dtype``), so ``base + s B A`` reproduces ``W`` as closely as the dtypes allow.
        """
        rank, s = self.rank, self.scaling
        quantized = isinstance(base, QuantLinear)
        if init == "loftq":
            if quantized:
                raise ValueError("init='loftq' needs the float weights, which a QuantLinear no longer has: "
                                 "apply LoRA(init='loftq', quantize_base=...) to the dense layer instead")
            if quantize_base is None:
                raise ValueError("init='loftq' quantizes the base itself: give quantize_base (e.g. 'nf4')")
        if quantize_base is not None and quantized:
            raise ValueError("quantize_base was given but the base is already a QuantLinear")
        requant: Optional[Requantizer] = None
        if quantized:
            requant = Requantizer.like(base)
        elif quantize_base is not None:
            bias = _base_bias(base)
            requant = Requantizer(quantize_base, quant_group_size, torch.bfloat16, dtype=_base_dtype(base),
                                  bias=bias.detach() if bias is not None else None)

        if init == "gaussian":
            a = torch.randn(rank, self.in_features) / rank
            b = torch.zeros(self.out_features, rank)
            if requant is not None and not quantized:
                return requant.build(base_weight(base, torch.float32)), a, b
            return base, a, b

        work = torch.float64 if _base_dtype(base) == torch.float64 else torch.float32
        weight = base_weight(base, work)
        def stored(t: Tensor) -> Tensor:
            return t.to(adapter_dtype).to(work)

        if init == "pissa":
            a, b = map(stored, _svd_factors(weight, rank, s))
            residual = weight - s * (b @ a)
            new_base = requant.build(residual) if requant is not None else _dense_with_weight(base, residual)
            return new_base, a, b

        # LoftQ: alternate quantizing the residual of the adapters and fitting the adapters to the error.
        a = torch.zeros(rank, self.in_features, dtype=work)
        b = torch.zeros(self.out_features, rank, dtype=work)
        for _ in range(loftq_iters):
            target = weight - s * (b @ a)
            deq = requant.fake(target).to(work)
            a, b = map(stored, _svd_factors(weight - deq, rank, s))
        # The quantized weight the last adapters were fitted to (not a re-quantization with them).
        return requant.build(target), a, b

    # ------------------------------------------------------------------ maths
    def _delta(self, dtype: torch.dtype) -> Tensor:
        """``s * B @ A`` ``[out, in]`` in ``dtype``."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    def _weight_norm(self) -> Tensor:
        """``||W + s B A||_row`` in float32 (float64 for a float64 base), without gradient."""
        work = torch.float64 if _base_dtype(self.base) == torch.float64 else torch.float32
        with torch.no_grad():
            return _row_norm(base_weight(self.base, work) + self._delta(work))

    def dora_scale(self) -> Tensor:
        """DoRA's ``m / ||W + s B A||_row`` (``[out]``; the norm is detached)."""
        if not self.use_dora:
            raise ValueError("dora_scale() is only defined with use_dora=True")
        m = self.lora_magnitude
        return m / self._weight_norm().to(m.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, dropout=True)

    def _forward(self, x: Tensor, dropout: bool) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = self.lora_A.weight
        h = self.lora_dropout(x) if dropout else x
        lora = self.lora_B(self.lora_A(h.to(a.dtype))) * self.scaling
        if not self.use_dora:
            return y + lora.to(y.dtype)
        g = self.dora_scale()
        bias = _base_bias(self.base)
        y_no_bias = y - bias.to(y.dtype) if bias is not None else y
        # m * (W x + s B A x) / ||.|| + b, written so that at init (g == 1, B == 0) it is y exactly.
        return y + (g - 1).to(y.dtype) * y_no_bias + g.to(y.dtype) * lora.to(y.dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The weight ``[out, in]`` of the adapted layer: ``W + s B A`` (DoRA: ``m * W' / ||W'||_row``)."""
        weight = base_weight(self.base, dtype) + self._delta(dtype).detach()
        if self.use_dora:
            m = self.lora_magnitude.detach().to(dtype)
            weight = weight * (m / _row_norm(weight))[:, None]
        return weight

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The weight ``[out, in]`` this layer computes with (default dtype: the base's): the base's own
        weight while merged, else :meth:`merged_weight` (evaluated in float64, rounded once)."""
        dtype = dtype or _base_dtype(self.base)
        if self.merged:
            return base_weight(self.base, dtype)
        return self.merged_weight(torch.float64).to(dtype)

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self) -> nn.Module:
        """A new module without adapters computing what this layer computes (see module docs).

        Sets :attr:`merge_error`: relative Frobenius error of the new module's weight against the
        float64 merged weight (re-quantization error for a QuantLinear base; float rounding otherwise).
        """
        if self.merged:
            raise RuntimeError("layer is already merged (its base holds the merged weight)")
        target = self.merged_weight(torch.float64)
        if isinstance(self.base, QuantLinear):
            new = Requantizer.like(self.base).build(target)
        else:
            new = _dense_with_weight(self.base, target)
            if type(self.base).forward is not nn.Linear.forward:
                self._check_merged_forward(new)
        got = base_weight(new, torch.float64)
        norm = float(torch.linalg.matrix_norm(target))
        self.merge_error = float(torch.linalg.matrix_norm(got - target)) / norm if norm > 0 else 0.0
        return new

    def _check_merged_forward(self, new: nn.Module) -> None:
        """A base with its own forward (a mask, a transform) may not compute ``x @ weight.T + b``:
        check on a random probe that the merged copy reproduces the adapted layer, else refuse."""
        dtype = _base_dtype(self.base)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, self.in_features, generator=gen).to(device=_base_device(self.base), dtype=dtype)
        with torch.no_grad():
            expected, got = self._forward(x, dropout=False).double(), new(x).double()
        tol = min(1e-2, 1e3 * torch.finfo(dtype).eps)
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
        if not error <= tol:
            raise ValueError(f"merging into {type(self.base).__name__} does not reproduce the adapted layer "
                             f"(relative error {error:.2e}): its forward is not x @ weight.T + bias (a mask?); "
                             "keep the adapters, or merge into a plain copy yourself")

    def merge_(self) -> "LoRALinear":
        """Switch to the merged state in place (forward = merged base only); :meth:`unmerge` undoes it."""
        new = self.merge()
        self.__dict__["_unmerged_base"] = self.base
        self.base = new
        self.merged = True
        return self

    def unmerge(self) -> "LoRALinear":
        """Leave the merged state: the original base object comes back, bit-exact."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        original = self.__dict__["_unmerged_base"]
        if original is None:
            raise RuntimeError("the original base of this merged layer is not available (it was loaded from "
                               "disk in the merged state); unmerge is impossible")
        self.base = original
        self.__dict__["_unmerged_base"] = None
        self.merged = False
        self.merge_error = None
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        original = self.__dict__.get("_unmerged_base")
        if original is not None:
            original._apply(fn, recurse)
        return self

    # ------------------------------------------------------------------ parameters
    @property
    def weight(self) -> Tensor:
        """The base's ``weight`` (for code that reads ``layer.weight.dtype``); the adapters are apart."""
        weight = getattr(self.base, "weight", None)
        if weight is None:
            raise AttributeError(f"the base {type(self.base).__name__} of this LoRALinear has no weight")
        return weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The base's bias (``None`` if it has none)."""
        return _base_bias(self.base)

    def adapter_parameters(self) -> Dict[str, nn.Parameter]:
        """``{"lora_A.weight": ..., "lora_B.weight": ..., ["lora_magnitude": ...]}``."""
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.lora_magnitude is not None:
            params["lora_magnitude"] = self.lora_magnitude
        return params

    def _adapter_bytes(self) -> int:
        return tensor_bytes(*self.adapter_parameters().values())

    def stored_bytes(self) -> int:
        """Bytes ``llmopt.save`` writes: the base (compressed or not) plus the adapters."""
        return layer_bytes(self.base) + self._adapter_bytes()

    def runtime_bytes(self) -> int:
        """Bytes held in memory: base, adapters and, while merged, the original base kept aside."""
        original = self.__dict__.get("_unmerged_base")
        kept_aside = layer_bytes(original, stored=False) if original is not None else 0
        return layer_bytes(self.base, stored=False) + self._adapter_bytes() + kept_aside

    def settings(self) -> Dict[str, Any]:
        """The adapter hyper-parameters (JSON-serialisable)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout_p, "use_rslora": self.use_rslora,
                "use_dora": self.use_dora, "init": self.init, "dtype": dtype_name(self.lora_A.weight.dtype),
                "in_features": self.in_features, "out_features": self.out_features}

    # ------------------------------------------------------------------ save / load (llmopt.save)
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable description (used by ``llmopt.save``); the base is described inside."""
        base = self.base
        name = type(base).__name__
        if module_types().get(name) is type(base):
            base_spec = {"type": name, "config": base.config()}
        elif isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
            base_spec = {"type": "Linear", "config": {
                "in_features": base.in_features, "out_features": base.out_features,
                "bias": base.bias is not None, "dtype": dtype_name(base.weight.dtype)}}
        else:
            raise TypeError(f"llmopt.save cannot describe a LoRALinear whose base is {name} (not an llmopt "
                            "wrapper nor a plain nn.Linear): merge first, or save only the adapters with "
                            "llmopt.lowrank.lora.save_adapters")
        cfg = {k: v for k, v in self.settings().items() if k not in ("in_features", "out_features")}
        return {**cfg, "merged": self.merged, "base": base_spec}

    @classmethod
    def from_config(cls, config: Dict[str, Any], device: Optional[Union[str, torch.device]] = None) -> "LoRALinear":
        """Empty layer (base included) from :meth:`config` output; values come from a state dict."""
        types = module_types()
        spec = config["base"]
        if spec["type"] == "Linear":
            c = spec["config"]
            base = nn.Linear(c["in_features"], c["out_features"], bias=c["bias"], device=device,
                             dtype=parse_dtype(c["dtype"]))
        elif spec["type"] in types:
            base = types[spec["type"]].from_config(spec["config"], device=device)
        else:
            raise ValueError(f"LoRALinear base has unknown type {spec['type']!r}; known: "
                             f"{['Linear'] + sorted(types)}")
        layer = cls(base, config["rank"], config["alpha"], config["dropout"], config["use_rslora"],
                    config["use_dora"], dtype=config["dtype"], _empty=True)
        layer.init = config.get("init", "gaussian")
        layer.merged = bool(config.get("merged", False))
        return layer

    def describe(self) -> str:
        """``"LoRA r8 a16"`` (``"DoRA ..."``, ``"... merged"``)."""
        kind = "DoRA" if self.use_dora else "LoRA"
        return f"{kind} r{self.rank} a{self.alpha:g}{' merged' if self.merged else ''}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:.4g}"
                + (", rslora=True" if self.use_rslora else "") + (", dora=True" if self.use_dora else "")
                + (f", init={self.init}" if self.init != "gaussian" else "")
                + (", merged=True" if self.merged else ""))
