"""LoRA / DoRA fine-tuning adapters: config, ``add_lora_``, ``merge_lora_``, adapter save/load.

``add_lora_(model, LoRA(rank=16, alpha=32), include=["*q_proj", "*v_proj"])`` wraps every targeted
linear-like layer (``nn.Linear`` and subclasses, ``QuantLinear`` = QLoRA, other llmopt wrappers) in a
:class:`~llmopt.nn.lora_linear.LoRALinear`, all or nothing, and freezes everything but the adapters.
After training, ``merge_lora_(model)`` folds the adapters into the weights (re-quantizing a
quantized base), or ``save_adapters``/``load_adapters`` keep them apart (a few MB, safetensors +
JSON, no pickle).

Initialisations (``LoRA.init``):

* ``"gaussian"``: ``A ~ N(0, 1/r^2)``, ``B = 0`` (Hu et al. 2021): the model is unchanged at step 0.
* ``"pissa"``: PiSSA (Meng et al. 2024): ``s B A`` is the top-r SVD of ``W``, the base keeps the
  residual. A quantized base (or ``quantize_base``) gets its residual quantized: QPiSSA.
* ``"loftq"``: LoftQ (Li et al. 2023), with ``quantize_base``: alternate ``Q = quantize(W - s B A)``
  and ``B, A = rank-r SVD of (W - deq(Q))`` for ``loftq_iters`` steps; ``deq(Q) + s B A`` is closer
  to ``W`` than plain QLoRA's ``deq(quantize(W))``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

import torch.nn as nn

from ...core.errors import CompressionError
from ...core.formats import get_format
from ...core.measure import memory_report
from ...core.targets import (
    Patterns,
    _as_list,
    _matches,
    get_submodule,
    is_compressed,
    replace_modules,
    restore_modules,
    select_linears,
)
from ...nn.lora_linear import LORA_INITS, LoRALinear
from ...pipeline.api import CompressionReport

__all__ = [
    "LoRA", "LoRAError", "LoRAReport", "LoRALinear", "add_lora_", "merge_lora_", "unmerge_lora_",
    "lora_layers", "trainable_parameters",
]

class LoRAError(CompressionError):
    """A layer could not get (or merge, or load) adapters; the model was left exactly as it was."""


@dataclass(frozen=True)
class LoRA:
    """LoRA / DoRA adapter settings.

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
    """

    name: ClassVar[str] = "lora"

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
        if self.quantize_base is not None:
            if not isinstance(self.quantize_base, str):
                raise ValueError(f"LoRA: quantize_base must be a format name or None, got {self.quantize_base!r}")
            get_format(self.quantize_base)  # unknown name: ValueError listing the registered formats
        gs = self.quant_group_size
        if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or (gs <= 0 and gs != -1)):
            raise ValueError(f"LoRA: quant_group_size must be a positive integer, -1 or None, got {gs!r}")
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

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LoRA":
        data = dict(data)
        method = data.pop("method", cls.name)
        if method != cls.name:
            raise ValueError(f"not a LoRA config: method={method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoRA has no option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def label(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        extra = "".join([f" {self.init}" if self.init != "gaussian" else "",
                         f" base={self.quantize_base}" if self.quantize_base else "",
                         " rslora" if self.use_rslora else ""])
        return f"{kind} r{self.rank} a{self.alpha:g}{extra}"


@dataclass
class LoRAReport(CompressionReport):
    """What ``add_lora_`` / ``merge_lora_`` / ``load_adapters`` did.

    ``replaced``: layer name -> repr of the new module; ``merge_errors``: layer name -> relative
    Frobenius error the merge added (re-quantization for a quantized base, float rounding otherwise).
    """

    merge_errors: Dict[str, float] = field(default_factory=dict)
    trainable_parameters: int = 0
    total_parameters: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {**super().to_dict(), "merge_errors": dict(self.merge_errors),
                "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters}

    def __str__(self) -> str:
        text = (f"{len(self.replaced)} layer(s) changed, skipped {len(self.skipped)}; trainable parameters "
                f"{self.trainable_parameters:,} of {self.total_parameters:,} in {self.seconds:.2f} s")
        if self.merge_errors:
            text += f"; largest merge error {max(self.merge_errors.values()):.3g}"
        return text


# ---------------------------------------------------------------------------------------------- helpers
def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """``{name: layer}`` of every :class:`LoRALinear` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _adapter_ids(model: nn.Module) -> set:
    return {id(p) for layer in lora_layers(model).values() for p in layer.adapter_parameters().values()}


def _freeze_all_but_adapters(model: nn.Module) -> None:
    keep = _adapter_ids(model)
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _requires_grad_flags(model: nn.Module) -> List[tuple]:
    return [(p, p.requires_grad) for p in model.parameters()]


def _restore_flags(flags: List[tuple]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


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
            skipped[name] = "already has LoRA adapters"
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


# ---------------------------------------------------------------------------------------------- add / merge
def add_lora_(
    model: nn.Module,
    config: Optional[LoRA] = None,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    freeze_base: bool = True,
) -> LoRAReport:
    """Wrap the targeted linear-like layers of ``model`` in :class:`LoRALinear`, in place; all or nothing.

    ``include``/``exclude`` are glob patterns on module names (as for ``compress_``). Quantized
    layers get QLoRA adapters. With ``freeze_base`` (default) every parameter of the model except the
    adapters gets ``requires_grad=False``; the wrapped layers' own parameters are frozen in any case.
    A layer that cannot take adapters (a rank above ``min(in_features, out_features)``, ...) raises
    :class:`LoRAError` naming it, and the model (modules and ``requires_grad`` flags) is unchanged.
    Layers that already have adapters are skipped, never wrapped twice.
    """
    if config is None:
        config = LoRA()
    if not isinstance(config, LoRA):
        raise TypeError(f"expected a LoRA config (llmopt.lowrank.lora.LoRA(...)), got {config!r}")
    start = time.perf_counter()
    targets, skipped = _lora_targets(model, include, exclude)
    if not targets and not skipped:
        raise ValueError(f"add_lora_: no linear layer matches include={include!r} exclude={exclude!r}")
    too_small = [f"{name!r} ({m.in_features} -> {m.out_features})" for name, m in targets.items()
                 if config.rank > min(m.in_features, m.out_features)]
    if too_small:
        raise LoRAError(f"LoRA rank {config.rank} exceeds min(in_features, out_features) of layer(s) "
                        f"{', '.join(too_small)}; lower the rank or exclude them")
    report = LoRAReport(skipped=skipped, methods=[config.to_dict()])
    flags = _requires_grad_flags(model)
    swapped: Dict[str, nn.Module] = {}
    try:
        new: Dict[str, nn.Module] = {}
        for name, module in targets.items():
            try:
                new[name] = LoRALinear(module, **config.layer_kwargs())
            except Exception as exc:
                raise LoRAError(f"layer {name!r} (lora): {exc}") from exc
        swapped = replace_modules(model, new)
        if freeze_base:
            _freeze_all_but_adapters(model)
    except BaseException:
        restore_modules(model, swapped)
        _restore_flags(flags)
        raise
    for name, original in swapped.items():
        layer = get_submodule(model, name)
        report.replaced[name] = repr(layer)
        report.bytes_before += memory_report(original).stored_bytes
        report.bytes_after += memory_report(layer).stored_bytes
    report.trainable_parameters = trainable_parameters(model)
    report.total_parameters = _total_parameters(model)
    report.seconds = time.perf_counter() - start
    return report


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
        raise ValueError("merge_lora_: the model has no LoRALinear layers (add_lora_ first)")
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
    report.total_parameters = _total_parameters(model)
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
