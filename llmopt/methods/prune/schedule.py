"""Gradual pruning during training: the cubic schedule of Zhu & Gupta (2017) and a mask keeper.

Zhu & Gupta, "To prune, or not to prune" (arXiv:1710.01878): sparsity rises from ``s_i`` to ``s_f``
over ``n`` pruning steps of ``dt`` training steps each, starting at ``t0``::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3        t0 <= t <= t0 + n * dt

fast at first (many redundant weights), slowly near the end. :class:`GradualPruner` recomputes the
masks at each pruning step from the magnitudes of the *current* weights and re-applies them after every
optimizer step, so pruned weights stay exactly zero whatever the optimizer does (momentum, Adam, weight
decay). Typical loop::

    pruner = GradualPruner(model, 0.5, begin_step=100, end_step=1000, frequency=50)
    for step, batch in enumerate(loader):
        loss = model(batch).loss; loss.backward()
        optimizer.step(); optimizer.zero_grad()
        pruner.step()                      # after optimizer.step()
    layers = pruner.finalize()             # nn.Linear -> SparseLinear (compressed storage)

LoRA recovery: a model whose Linears are wrapped in :class:`~llmopt.nn.LoRALinear` exposes the frozen
base ``nn.Linear`` (``"...q_proj.base"``) to the pruner; the adapters (``lora_A``/``lora_B``) are never
pruned. Pruning the base and training the adapters recovers accuracy, but ``W + s B A`` is dense again:
:meth:`GradualPruner.finalize` therefore converts only the *base* to a :class:`~llmopt.nn.SparseLinear`
and keeps the adapters unmerged (``merge_lora_`` refuses a sparse base rather than silently densifying it).

Masks come from :func:`llmopt.prune.patterns.select_mask` (exact counts, deterministic ties), fed with
scores in which already pruned weights rank lowest, so masks are nested.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ...core.checks import check_int
from ...core.targets import find_linears, replace_modules
from ...nn.sparse_linear import SparseLinear
from .patterns import check_sparsity, global_sparsities, num_pruned, parse_pattern, select_mask

__all__ = ["cubic_sparsity", "GradualPruner"]

Criterion = Union[str, Callable[[str, Tensor], Tensor]]
_SCOPES = ("layer", "row", "global")


def _check_schedule(initial: float, final: float, begin_step: int, end_step: int, frequency: int) -> None:
    check_sparsity(initial, "initial sparsity")
    check_sparsity(final, "final sparsity")
    if initial > final:
        raise ValueError(f"initial sparsity {initial} exceeds final sparsity {final}")
    check_int("begin_step", begin_step, 0)
    check_int("end_step", end_step, 0)
    if end_step < begin_step:
        raise ValueError(f"end_step {end_step} is before begin_step {begin_step}")
    check_int("frequency", frequency, 1)


def cubic_sparsity(step: int, *, initial: float = 0.0, final: float, begin_step: int, end_step: int,
                   frequency: int = 1) -> float:
    """Zhu & Gupta's cubic sparsity at training step ``step``.

    ``initial`` before and at ``begin_step``, ``final`` from ``end_step`` on; in between the value of the
    last pruning step (``begin_step + j * frequency``), so the sparsity only changes when masks are
    recomputed. ``end_step == begin_step`` prunes to ``final`` in one shot.
    """
    _check_schedule(initial, final, begin_step, end_step, frequency)
    step = check_int("step", step, 0)
    if step >= end_step:
        return float(final)
    if step <= begin_step:
        return float(initial)
    last = begin_step + ((step - begin_step) // frequency) * frequency
    progress = (last - begin_step) / (end_step - begin_step)
    return float(final + (initial - final) * (1.0 - progress) ** 3)


class GradualPruner:
    """Keeps a bool mask per targeted ``nn.Linear`` and raises its sparsity on a cubic schedule.

    Args:
        model: the model being trained (changed in place: weights are zeroed where pruned).
        final_sparsity: target fraction of pruned weights in ``[0, 1)``; for an ``"N:M"`` pattern it must
            be ``1 - N/M``.
        begin_step, end_step, frequency, initial_sparsity: the schedule (:func:`cubic_sparsity`).
        criterion: ``"magnitude"`` (``|W|``) or a callable ``(name, weight) -> scores [out, in]``.
        pattern: ``"unstructured"`` or ``"N:M"``; an N:M schedule prunes ``round(s_t * M)`` of every
            ``M`` consecutive inputs (so the sparsity moves in steps of ``1/M``) and ends at N:M.
        scope: where exact counts are taken for unstructured masks: ``"layer"`` (each layer reaches
            ``s_t``), ``"row"`` (each output row) or ``"global"`` (all targeted layers together).
        include, exclude: glob patterns on module names (as ``compress_``).
        mask_gradients: also zero the gradients of pruned weights (hooks), so optimizer states of
            pruned weights stay clean; masks hold without it.

    Masks are nested: a pruned weight scores below every kept one, so it stays pruned.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, *, begin_step: int, end_step: int,
                 frequency: int = 1, initial_sparsity: float = 0.0, criterion: Criterion = "magnitude",
                 pattern: str = "unstructured", scope: str = "layer",
                 include: Optional[Union[str, Sequence[str]]] = None,
                 exclude: Optional[Union[str, Sequence[str]]] = None, mask_gradients: bool = False) -> None:
        final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        _check_schedule(initial_sparsity, final_sparsity, begin_step, end_step, frequency)
        self.nm = parse_pattern(pattern)
        if self.nm is not None:
            n, m = self.nm
            if abs(final_sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {pattern!r} means final_sparsity {1 - n / m:g}, "
                                 f"got {final_sparsity}")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        if not (criterion == "magnitude" or callable(criterion)):
            raise ValueError("criterion must be 'magnitude' or a callable (name, weight) -> scores, "
                             f"got {criterion!r}")
        targets = find_linears(model, include, exclude)
        if not targets:
            raise ValueError("GradualPruner: no nn.Linear selected (check include/exclude)")
        for name, layer in targets.items():
            w = layer.weight
            if w.device.type == "meta" or not w.is_floating_point():
                raise ValueError(f"GradualPruner: layer {name!r} has a meta or non-float weight "
                                 f"({w.dtype}, {w.device})")
            if self.nm is not None and w.shape[1] % self.nm[1]:
                raise ValueError(f"GradualPruner: layer {name!r} has in_features {w.shape[1]}, not a "
                                 f"multiple of M={self.nm[1]} (pattern {pattern!r})")
        self.model = model
        self.final_sparsity, self.initial_sparsity = final_sparsity, initial_sparsity
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.criterion, self.pattern, self.scope = criterion, pattern, scope
        self.layers: Dict[str, nn.Linear] = dict(targets)
        self.masks: Dict[str, Tensor] = {}
        self.step_count = 0  # the step the next step() call stands for
        self.current_sparsity = 0.0  # target of the last mask update
        self.finalized = False
        self._hooks = []
        if mask_gradients:
            for name, layer in self.layers.items():
                self._hooks.append(layer.weight.register_hook(self._grad_hook(name)))

    # ------------------------------------------------------------------ schedule
    def sparsity_at(self, step: int) -> float:
        """Scheduled sparsity at ``step`` (:func:`cubic_sparsity` with this pruner's settings)."""
        return cubic_sparsity(step, initial=self.initial_sparsity, final=self.final_sparsity,
                              begin_step=self.begin_step, end_step=self.end_step, frequency=self.frequency)

    def is_pruning_step(self, step: int) -> bool:
        """True when masks are recomputed at ``step`` (every ``frequency`` steps from begin, and at end)."""
        if not self.begin_step <= step <= self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def step(self, step: Optional[int] = None) -> float:
        """Call after ``optimizer.step()``: recompute masks if ``step`` is a pruning step, then zero
        every pruned weight again. ``step`` defaults to an internal counter (0, 1, 2, ...).
        Returns the current target sparsity."""
        if self.finalized:
            raise RuntimeError("GradualPruner.step() after finalize(): the layers are SparseLinear now")
        t = self.step_count if step is None else check_int("step", step, 0)
        if self.is_pruning_step(t):
            self.update_masks(self.sparsity_at(t))
        self.apply_masks()
        self.step_count = t + 1
        return self.current_sparsity

    # ------------------------------------------------------------------ masks
    def _scores(self, name: str, weight: Tensor) -> Tensor:
        w = weight.detach()
        if self.criterion == "magnitude":
            scores = w.abs().to(torch.float32)
        else:
            scores = self.criterion(name, w)
            if not isinstance(scores, Tensor) or tuple(scores.shape) != tuple(w.shape):
                got = getattr(scores, "shape", scores)
                raise ValueError(f"GradualPruner: criterion returned {got!r} for layer {name!r}, expected a "
                                 f"tensor of shape {tuple(w.shape)}")
            scores = scores.detach().to(torch.float32)
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"GradualPruner: layer {name!r} has NaN/Inf weights or scores")
        previous = self.masks.get(name)
        if previous is not None:
            # Already pruned weights rank below every kept one: masks are nested, pruned stays pruned.
            scores = scores.masked_fill(~previous, float("-inf"))
        return scores

    def update_masks(self, sparsity: float) -> None:
        """Recompute every mask at ``sparsity`` (exact counts; see ``pattern`` / ``scope``)."""
        sparsity = check_sparsity(sparsity, "sparsity")
        scores = {name: self._scores(name, layer.weight) for name, layer in self.layers.items()}
        if self.nm is not None:
            n, m = self.nm
            pruned = min(num_pruned(m, sparsity), m - n)  # per group of m; m - n once the schedule ends
            masks = {name: (select_mask(s, nm=(m - pruned, m)) if pruned
                            else torch.ones_like(s, dtype=torch.bool))
                     for name, s in scores.items()}
        elif self.scope == "global":
            # One threshold over all targeted layers, then exact per-layer counts.
            per_layer = global_sparsities(scores, sparsity)
            masks = {name: select_mask(s, per_layer[name], scope="layer") for name, s in scores.items()}
        else:
            masks = {name: select_mask(s, sparsity, scope=self.scope) for name, s in scores.items()}
        self.masks = masks
        # N:M moves in steps of 1/m: report the sparsity the masks really have.
        self.current_sparsity = pruned / self.nm[1] if self.nm is not None else sparsity

    def apply_masks(self) -> None:
        """Zero the pruned weights in place (no autograd history)."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.layers[name].weight.masked_fill_(~mask, 0)

    def _grad_hook(self, name: str):
        def hook(grad: Tensor) -> Tensor:
            mask = self.masks.get(name)
            return grad if mask is None else grad.masked_fill(~mask, 0)
        return hook

    def remove_hooks(self) -> None:
        """Remove the gradient hooks (``mask_gradients=True``)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def sparsity(self) -> Dict[str, float]:
        """Fraction of pruned weights per layer, from the masks (0 before the first pruning step)."""
        return {name: (1.0 - float(self.masks[name].float().mean())) if name in self.masks else 0.0
                for name in self.layers}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """Masks, step counter and schedule settings (tensors and plain values: ``torch.save``-able)."""
        return {
            "step_count": self.step_count,
            "current_sparsity": self.current_sparsity,
            "masks": {name: mask.clone() for name, mask in self.masks.items()},
            "settings": {"final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
                         "begin_step": self.begin_step, "end_step": self.end_step,
                         "frequency": self.frequency,
                         "pattern": self.pattern, "scope": self.scope},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same targeted layers) and re-apply the masks."""
        masks = state["masks"]
        unknown = set(masks) - set(self.layers)
        if unknown:
            raise ValueError("GradualPruner.load_state_dict: masks for layers not targeted here: "
                             f"{sorted(unknown)}")
        checked = {}
        for name, mask in masks.items():
            shape = tuple(self.layers[name].weight.shape)
            if tuple(mask.shape) != shape or mask.dtype != torch.bool:
                raise ValueError(f"GradualPruner.load_state_dict: mask of {name!r} is {mask.dtype} "
                                 f"{tuple(mask.shape)}, expected bool {shape}")
            checked[name] = mask.to(self.layers[name].weight.device).clone()
        self.masks = checked
        self.step_count = int(state["step_count"])
        self.current_sparsity = float(state.get("current_sparsity", 0.0))
        self.apply_masks()

    # ------------------------------------------------------------------ end of training
    def finalize(self, *, dtype: Optional[torch.dtype] = None,
                 runtime: str = "dense") -> Dict[str, nn.Module]:
        """Replace each pruned layer in the model by :meth:`SparseLinear.from_dense` (values in ``dtype``,
        default the weight's); returns ``{name: SparseLinear}``. The N:M layout is used when the masks
        follow the pattern (the schedule has ended), the bitmask layout otherwise. Layers never pruned
        (before ``begin_step``) are left alone. All-or-nothing: on error the model is unchanged."""
        self.apply_masks()
        new: Dict[str, nn.Module] = {}
        for name, mask in self.masks.items():
            layer = self.layers[name]
            nm = self.nm if self.nm is not None and _follows_nm(mask, self.nm) else None
            try:
                new[name] = SparseLinear.from_dense(layer.weight.detach(), mask,
                                                    layer.bias.detach() if layer.bias is not None else None,
                                                    nm=nm, dtype=dtype, runtime=runtime)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"GradualPruner.finalize: layer {name!r}: {exc}") from None
        replace_modules(self.model, new)
        self.remove_hooks()
        self.finalized = True
        return new


def _follows_nm(mask: Tensor, nm: Tuple[int, int]) -> bool:
    n, m = nm
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all())
