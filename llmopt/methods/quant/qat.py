"""Quantization-aware training: fake-quantized linears for fine-tuning, then conversion to ``QuantLinear``.

::

    qat = QAT("int4", group_size=64)
    llmopt.compress_(model, qat, exclude=["lm_head"])                 # nn.Linear -> QATLinear
    ...train as usual (the float weights are the trainable parameters)...
    llmopt.compress_(model, QAT(step="convert"))                       # QATLinear -> QuantLinear

A :class:`QATLinear` keeps the float ``weight``/``bias`` of the ``nn.Linear`` it replaces (the same
``Parameter`` objects, so an optimizer built before the prepare step still updates them) and computes

    y = x_q @ fake_quantize(W).T + b

where ``fake_quantize`` is round-to-nearest with per-group parameters chosen from the current weight
(:func:`llmopt.core.primitives.fake_quantize`), the parameters rounded to ``scale_dtype`` exactly as
the stored layer rounds them, and ``x_q`` is ``x`` itself or, with ``act_bits=8``, its per-token
int8 fake quantization (W8A8).

Gradients use the plain straight-through estimator (STE): rounding counts as the identity, so
``dL/dW = grad_y^T x`` evaluated at the fake-quantized weight (and ``dL/dx = grad_y W_q`` through the
activation rounding). There is no clipping mask: scales come from each group's own min/max (or
absmax), so no weight ever lies outside its group's range, and the clipped-STE variant would equal
the plain one. Scales and zero points are not learned; they follow the weights.

The convert step quantizes each trained weight with **the layer's own** format, group size, scale
dtype and ``act_bits`` (``quantize_weight``, the function the fake quantization runs) and builds a
``QuantLinear`` from those codes, so the converted layer computes the same function: bit-identical
outputs with the reference kernel, bf16 rounding with the fast CPU kernels. That is why the format
fields of a convert config (``format``, ``group_size``, ``symmetric``, ``scale_dtype``, ``act_bits``)
are not used: converting to any other format would change the function the layer learned (and
layers prepared with per-layer overrides convert with theirs). Only ``kernel`` matters at convert.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn

from ...core.targets import Patterns, select_linears
from ...nn.qat_linear import QATLinear, _check_act_bits, qat_layers
from ..base import MethodConfig, register_method
from ..quantized import WeightQuantFields

__all__ = ["QAT", "QATLinear", "qat_layers", "QAT_STEPS"]

QAT_STEPS = ("prepare", "convert")


@dataclasses.dataclass(frozen=True)
class QAT(WeightQuantFields, MethodConfig):
    """Quantization-aware training, in two ``compress_`` calls (as torchao's ``QATConfig``).

    ``step="prepare"`` replaces the targeted ``nn.Linear`` layers by :class:`QATLinear` (same
    Parameters, fake-quantized forward, straight-through gradients); train; then ``step="convert"``
    replaces every targeted ``QATLinear`` by the :class:`~llmopt.nn.QuantLinear` computing the same
    function.

    Args:
        format: a registered format name (``"int4"``, ``"int8"``, ``"nf4"``, ...).
        group_size: columns sharing one scale; ``None`` for one scale per output row.
        symmetric: affine formats only; ``None`` keeps the format's default (asymmetric).
        scale_dtype: dtype of the scales/zero points the fake quantization rounds to (and stores at convert).
        act_bits: ``8`` also fake-quantizes the activations per token (train for W8A8); ``None``: not.
        step: ``"prepare"`` or ``"convert"``.
        kernel: the ``QuantLinear`` kernel at convert (``"auto"`` or a name from ``list_kernels()``).

    At convert, each layer uses the settings it was prepared with; the format fields of a convert
    config are not used (see the module docs), so ``QAT(step="convert")`` is enough.
    Prepare leaves the stored bytes as they are (float weights); convert shrinks them.
    """

    name = "qat"

    # format, group_size, symmetric, scale_dtype, kernel come from WeightQuantFields (config.scheme);
    # a different default:
    group_size: Optional[int] = 64
    act_bits: Optional[int] = None
    step: str = "prepare"

    def __post_init__(self) -> None:
        if self.step not in QAT_STEPS:
            raise ValueError(f"QAT: step must be one of {QAT_STEPS}, got {self.step!r}")
        super().__post_init__()  # the scheme: unknown format / bad options fail before any layer is touched
        _check_act_bits(self.act_bits)

    # -- protocol: what differs between the two steps ----------------------------------------------
    @property
    def reduces_stored_bytes(self) -> bool:  # type: ignore[override]
        """Prepare keeps the float weights; convert stores the codes."""
        return self.step == "convert"

    def accepts_compressed(self, module: nn.Module) -> bool:
        return self.step == "convert" and isinstance(module, QATLinear)

    def select_targets(self, model: nn.Module, include: Patterns, exclude: Patterns,
                       accept: Optional[Callable[[nn.Module], bool]] = None
                       ) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
        """Prepare: the uncompressed ``nn.Linear`` layers. Convert: the ``QATLinear`` layers (other
        wrappers are skipped as already compressed; float layers are simply not targets)."""
        if self.step == "prepare":
            return super().select_targets(model, include, exclude, accept)
        selected, skipped = select_linears(model, include, exclude, accept=self.accepts_compressed)
        return {name: m for name, m in selected.items() if isinstance(m, QATLinear)}, skipped

    def describe_targets(self) -> str:
        return "uncompressed nn.Linear" if self.step == "prepare" else \
            "QATLinear (run QAT(step='prepare') and train first)"

    def after_stage(self, model: nn.Module, replaced: Dict[str, nn.Module]) -> List[str]:
        """Prepare: say which trained weights are shared with other modules (a tied head)."""
        return _shared_weight_notes(model, replaced) if self.step == "prepare" else []

    def example_setup(self) -> List[MethodConfig]:
        return [dataclasses.replace(self, step="prepare")] if self.step == "convert" else []

    @classmethod
    def examples(cls) -> List["QAT"]:
        return [cls("int4", 32), cls("int8", None, symmetric=True, act_bits=8), cls("int4", 32, step="convert")]

    def label(self) -> str:
        if self.step == "convert":
            return "qat convert" + (f" [{self.kernel}]" if self.kernel != "auto" else "")
        act = f" a{self.act_bits}" if self.act_bits is not None else ""
        return f"qat {self.scheme.label()}{act}"


def _shared_weight_notes(model: nn.Module, layers: Dict[str, nn.Module]) -> List[str]:
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
                             f"the convert step will leave that module's float copy (exclude {name!r} to avoid it)")
    return notes


@register_method(QAT)
def _apply_qat(module: nn.Module, config: QAT, *, name: str = "", **_: Any) -> nn.Module:
    if config.step == "prepare":
        return QATLinear(module, config.weight_format(), config.group_size, scale_dtype=config.scale_dtype,
                         act_bits=config.act_bits)
    if not isinstance(module, QATLinear):
        raise TypeError(f"QAT(step='convert') converts QATLinear layers, got {type(module).__name__} "
                        "(prepare it with QAT(step='prepare') first)")
    return module.to_quant_linear(config.kernel)
