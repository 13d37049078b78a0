"""LoRA / DoRA fine-tuning adapters: the :class:`LoRA` method and its handler.

``llmopt.compress_(model, LoRA(rank=16, alpha=32), include=["*q_proj", "*v_proj"])`` wraps every
targeted linear-like layer (``nn.Linear`` and subclasses, ``QuantLinear`` = QLoRA, other llmopt
wrappers) in a :class:`~llmopt.nn.lora_linear.LoRALinear`, all or nothing, and freezes everything but
the adapters. LoRA is an ordinary registered method: what differs from a compression is declared on
the config (its targets, the freezing step, ``adds_adapters`` so recipe stages order themselves).
After training, ``llmopt.merge_lora_(model)`` folds the adapters into the weights (re-quantizing a
quantized base), or ``llmopt.save_adapters``/``load_adapters`` keep them apart (a few MB,
safetensors + JSON, no pickle).

Initialisations (``LoRA.init``):

* ``"gaussian"``: ``A ~ N(0, 1/r^2)``, ``B = 0`` (Hu et al. 2021): the model is unchanged at step 0.
* ``"pissa"``: PiSSA (Meng et al. 2024): ``s B A`` is the top-r SVD of ``W``, the base keeps the
  residual. A quantized base (or ``quantize_base``) gets its residual quantized: QPiSSA.
* ``"loftq"``: LoftQ (Li et al. 2023), with ``quantize_base``: alternate ``Q = quantize(W - s B A)``
  and ``B, A = rank-r SVD of (W - deq(Q))`` for ``loftq_iters`` steps; ``deq(Q) + s B A`` is closer
  to ``W`` than plain QLoRA's ``deq(quantize(W))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn

from ...core.errors import CompressionError
from ...core.measure import trainable_parameters
from ...core.targets import Patterns, _as_list, _matches, get_submodule, is_compressed, select_linears
from ...nn.lora_linear import LORA_INITS, LoRALinear
from ..base import MethodConfig, register_method
from ..quantized import QuantizesWeights

__all__ = ["LoRA", "LoRAError", "LoRALinear", "lora_layers", "trainable_parameters"]


class LoRAError(CompressionError):
    """A layer could not get (or merge, or load) adapters; the model was left exactly as it was."""


@dataclass(frozen=True)
class LoRA(QuantizesWeights, MethodConfig):
    """LoRA / DoRA adapter settings: ``llmopt.compress_(model, LoRA(...), include=...)`` adds them.

    Args:
        rank: adapter rank ``r`` (at most ``min(in_features, out_features)`` of every targeted layer).
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter input, in ``[0, 1)``.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        use_dora: DoRA (Liu et al. 2024): a trainable per-output-row magnitude.
        init: ``"gaussian"``, ``"pissa"`` or ``"loftq"`` (see the module docs).
        loftq_iters: LoftQ alternations (``init="loftq"``).
        quantize_base: a weight format name (``"int4"``, ``"nf4"``, ...): dense bases are quantized
            while the adapters are initialised (QLoRA / QPiSSA / LoftQ from a float model). Required by
            ``"loftq"``; not allowed for layers that are already quantized.
        quant_group_size: group size for ``quantize_base`` (``None``: one group per row).

    Targets: every linear-like layer matching the globs (``nn.Linear``, a subclass, an llmopt wrapper
    such as ``QuantLinear``), never a module inside a wrapper; a layer that already has adapters is
    skipped. After the stage every parameter but the adapters is frozen, and the report's notes give
    the trainable parameter count. A rank above ``min(in_features, out_features)`` of a layer is a
    :class:`LoRAError` naming it (the model is left as it was).
    """

    name = "lora"
    # quantize_base / quant_group_size are a WeightQuant's format / group_size (checked by the mixin);
    # without quantize_base nothing is quantized (scheme is None).
    scheme_optional = True
    scheme_field_names = {"format": "quantize_base", "group_size": "quant_group_size"}
    adds_adapters = True  # adapters train on top of the final compressed model: LoRA stages come last
    reduces_stored_bytes = False  # the adapters add parameters

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "gaussian"
    loftq_iters: int = 1
    quantize_base: Optional[str] = None
    quant_group_size: Optional[int] = 64

    def __post_init__(self) -> None:
        super().__post_init__()  # quantize_base and quant_group_size, as a WeightQuant
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA: rank must be a positive integer, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha)
                or self.alpha <= 0):
            raise ValueError(f"LoRA: alpha must be a positive finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA: dropout must be in [0, 1), got {self.dropout!r}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRA: {flag} must be True or False, got {getattr(self, flag)!r}")
        if self.init not in LORA_INITS:
            raise ValueError(f"LoRA: init must be one of {LORA_INITS}, got {self.init!r}")
        if not isinstance(self.loftq_iters, int) or isinstance(self.loftq_iters, bool) or self.loftq_iters < 1:
            raise ValueError(f"LoRA: loftq_iters must be a positive integer, got {self.loftq_iters!r}")
        if self.init == "loftq" and self.quantize_base is None:
            raise ValueError("LoRA: init='loftq' quantizes the base weights itself: give quantize_base "
                             "(e.g. quantize_base='nf4') and apply it to the dense (unquantized) model")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def layer_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :class:`LoRALinear` (all but ``base``)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora,
                "use_dora": self.use_dora, "init": self.init, "loftq_iters": self.loftq_iters,
                "quantize_base": self.quantize_base, "quant_group_size": self.quant_group_size}

    @property
    def lossless(self) -> bool:  # type: ignore[override]
        """Zero-initialised adapters (``B = 0``) on an unchanged base: the model computes what it did."""
        return self.init == "gaussian" and self.quantize_base is None

    def accepts_compressed(self, module: nn.Module) -> bool:
        """Any linear-like llmopt wrapper can be a base (``QuantLinear`` = QLoRA, ``LowRankLinear``, ...)."""
        return _linear_like(module) and not isinstance(module, LoRALinear)

    def select_targets(self, model: nn.Module, include: Patterns, exclude: Patterns,
                       accept: Optional[Callable[[nn.Module], bool]] = None
                       ) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
        """Linear-like layers, compressed ones included, never inside a wrapper (see :func:`_lora_targets`)."""
        return _lora_targets(model, include, exclude)

    def describe_targets(self) -> str:
        return "linear layer without adapters"

    def after_stage(self, model: nn.Module, replaced: Dict[str, nn.Module]) -> List[str]:
        """Freeze every parameter but the adapters (the wrapped bases froze themselves)."""
        if not replaced:
            return []
        _freeze_all_but_adapters(model)
        return [f"{len(replaced)} layer(s) got adapters; trainable parameters {trainable_parameters(model):,}"]

    @classmethod
    def examples(cls) -> List["LoRA"]:
        # Ranks at most 32: the toy transformer's k/v projections are 64 -> 32.
        return [cls(rank=8, alpha=16), cls(rank=4, alpha=8, use_dora=True, use_rslora=True)]

    def label(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        extra = "".join([f" {self.init}" if self.init != "gaussian" else "",
                         f" base={self.quantize_base}" if self.quantize_base else "",
                         " rslora" if self.use_rslora else ""])
        return f"{kind} r{self.rank} a{self.alpha:g}{extra}"


# ---------------------------------------------------------------------------------------------- helpers
def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """``{name: layer}`` of every :class:`LoRALinear` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _adapter_ids(model: nn.Module) -> set:
    return {id(p) for layer in lora_layers(model).values() for p in layer.adapter_parameters().values()}


def _freeze_all_but_adapters(model: nn.Module) -> None:
    keep = _adapter_ids(model)
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _linear_like(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int))


def _lora_targets(model: nn.Module, include: Patterns, exclude: Patterns):
    """``(targets, skipped)``: linear-like layers to wrap, and matched layers left alone (with why).

    Targets are ``nn.Linear`` modules (any subclass) and llmopt wrappers (``QuantLinear``, ...), never
    a module inside a ``LoRALinear`` (its base and its own ``lora_A``/``lora_B``) or inside another
    wrapper (the factors of a low-rank layer): a wrapper is adapted as a whole.
    """
    selected, compressed = select_linears(model, include, exclude)
    candidates: Dict[str, nn.Module] = dict(selected)
    skipped: Dict[str, str] = {}
    for name in compressed:
        module = get_submodule(model, name)
        if _linear_like(module):
            candidates[name] = module
        else:
            skipped[name] = f"{type(module).__name__} has no in_features/out_features"
    include_list, exclude_list = _as_list(include), _as_list(exclude)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and (not include_list or _matches(name, include_list)) \
                and not _matches(name, exclude_list):
            skipped[name] = "already adapted (LoRALinear)"
    targets: Dict[str, nn.Module] = {}
    for name in sorted(candidates, key=lambda n: n.count(".")):
        parts = name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
        inside = False
        for prefix in ancestors:
            parent = get_submodule(model, prefix)
            if isinstance(parent, LoRALinear) or is_compressed(parent) or prefix in targets:
                inside = True
                break
        if not inside:
            targets[name] = candidates[name]
    # Keep the model's order (reports and error messages follow it).
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    targets = dict(sorted(targets.items(), key=lambda kv: order[kv[0]]))
    skipped = {k: v for k, v in skipped.items() if not any(k.startswith(t + ".") for t in targets)}
    return targets, skipped


# ---------------------------------------------------------------------------------------------- handler
@register_method(LoRA)
def _apply_lora(module: nn.Module, config: LoRA, *, name: str = "", **_: Any) -> LoRALinear:
    """Wrap one layer; a layer that cannot take these adapters is a :class:`LoRAError` naming it."""
    n_in, n_out = module.in_features, module.out_features
    if config.rank > min(n_in, n_out):
        raise LoRAError(f"LoRA rank {config.rank} exceeds min(in_features, out_features) of layer {name!r} "
                        f"({n_in} -> {n_out}); lower the rank or exclude it")
    try:
        return LoRALinear(module, **config.layer_kwargs())
    except Exception as exc:
        raise LoRAError(f"layer {name!r} (lora): {exc}") from exc
