"""Per-input-channel rescaling shared by AWQ and SmoothQuant.

Both methods replace ``y = x @ W.T`` by ``y = (x / s) @ (W * s).T`` for a positive vector ``s [K]``:
the product is unchanged, but the quantizer sees ``W * s`` (AWQ: salient channels get a finer grid)
and ``x / s`` (SmoothQuant: activation outliers flattened for int8). The ``1 / s`` on the input must
go somewhere:

* **folded** into the module that produced the input, when that is exact: a norm (``LayerNorm``,
  ``RMSNorm``, ...) whose output is the very tensor every consumer reads, with every consumer being
  rescaled by the same ``s``. Found generically from :class:`~llmopt.calibration.graph.InputSource`
  (tensor identity during a traced forward), and checked numerically on a random input before use;
* otherwise **carried** by the quantized layer as ``QuantLinear.input_scale = 1 / s`` (one
  elementwise multiply per call, no other cost).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ...calibration.graph import InputSource

__all__ = ["input_groups", "fold_candidate", "fold_inverse_scale", "relative_name"]


def relative_name(full: str, prefix: str) -> str:
    """``"model.layers.0.mlp.up_proj"`` relative to ``prefix="model.layers.0"`` -> ``"mlp.up_proj"``."""
    if not prefix:
        return full
    if full == prefix:
        return ""
    if not full.startswith(prefix + "."):
        raise ValueError(f"{full!r} is not inside {prefix!r}")
    return full[len(prefix) + 1:]


def input_groups(names: Sequence[str], sources: Dict[str, InputSource]) -> List[List[str]]:
    """The layers of ``names`` grouped by the tensor they read (q/k/v together; gate/up together).

    Layers without a traced source are groups of one. Order follows ``names``.
    """
    groups: Dict[object, List[str]] = {}
    for name in names:
        src = sources.get(name)
        key = ("tensor", src.tensor) if src is not None else ("alone", name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _is_ancestor(container: str, names: Sequence[str]) -> bool:
    return any(n.startswith(container + ".") for n in names)


def fold_candidate(group: Sequence[str], sources: Dict[str, InputSource], root: nn.Module,
                   prefix: str) -> Optional[str]:
    """Full name of the module the group's ``1 / s`` can be folded into, or ``None``.

    Requires a traced producer inside ``root`` that ran once, with a 1-D ``weight`` of
    ``in_features`` values (and optionally a 1-D ``bias``); that every module which received the
    tensor is a member of the group or a container of members (``self_attn`` passing its input on to
    q/k/v); and that no code other than the members' own ran an operation on the tensor (a residual
    ``x + h`` would see ``h / s``).
    """
    src = sources.get(group[0])
    if src is None or src.producer is None or src.producer_calls != 1:
        return None
    if any(sources.get(n) is None or sources[n].tensor != src.tensor for n in group):
        return None
    for consumer in src.consumers:
        if consumer not in group and not _is_ancestor(consumer, group):
            return None
    for user in src.op_users:
        if not any(user == n or user.startswith(n + ".") for n in group):
            return None
    try:
        producer = root.get_submodule(relative_name(src.producer, prefix))
    except (AttributeError, ValueError):
        return None
    weight = getattr(producer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or list(producer.children()):
        return None
    bias = getattr(producer, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape):
        return None
    return src.producer


def fold_inverse_scale(module: nn.Module, scale: Tensor) -> Optional[nn.Module]:
    """A copy of ``module`` (a norm) whose output is ``module(x) / scale``, or ``None`` if not exact.

    ``weight`` (and ``bias``) are divided by ``scale``. The copy is checked on a random input against
    ``module(x) / scale``; norms of another form (e.g. ``(1 + weight) * x_hat``) fail the check and
    return ``None``, so the caller keeps the scale on the consumers instead.
    """
    weight = module.weight
    if scale.shape != weight.shape:
        return None
    new = copy.deepcopy(module)
    with torch.no_grad():
        inv = (1.0 / scale.to(torch.float64))
        new.weight.copy_((weight.detach().to(torch.float64) * inv).to(weight.dtype))
        if getattr(new, "bias", None) is not None:
            new.bias.copy_((module.bias.detach().to(torch.float64) * inv).to(module.bias.dtype))
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(4, weight.shape[0], generator=gen).to(device=weight.device, dtype=weight.dtype)
        try:
            expected = module(x).to(torch.float32) / scale.to(torch.float32)
            got = new(x).to(torch.float32)
        except Exception:
            return None
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    err = (got - expected).abs().max()
    ref = expected.abs().max().clamp_min(1e-12)
    if not bool(torch.isfinite(err)) or float(err / ref) > tol:
        return None
    return new
