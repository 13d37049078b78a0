"""Mixed precision by budget: one method per layer, chosen so the model meets a size budget.

:func:`allocate` measures, for every targeted ``nn.Linear`` and every candidate method config, what
the layer would cost (stored bytes of its weight) and how much it would hurt (an estimated loss
increase), then picks one candidate per layer minimising the summed estimate under the budget (a
multiple-choice knapsack). The result, an :class:`Allocation`, turns into a
:class:`~llmopt.recipe.Recipe` for :func:`llmopt.compress_`.

Cost of a candidate on a layer: the layer's replacement (the method's handler applied to that layer
alone) is measured with :func:`~llmopt.analysis.memory_report`: ``bits_per_weight * weights / 8``, the
stored bytes of the weight (codes, scales and zero points, masks, factors), bias excluded as in
``bits_per_weight`` (a bias costs the same whatever the method, so it changes no choice).

Error of a candidate on a layer, with ``delta = W' - W`` (``W'`` the replacement's effective weight):

* ``"fisher"``: ``0.5 * sum(F * delta^2)``, ``F`` the diagonal empirical Fisher of the weight
  (squared gradients of the model's loss over the calibration batches), an estimate of the loss
  increase in nats per token.
* ``"output"``: ``tr(delta H delta^T)`` with ``H = X^T X / rows`` the layer's input second moment
  (block by block on the float model): the mean squared error of the layer's output.
* ``"kfac"``: ``0.5 * sum_j f_j (delta H delta^T)_jj``, the output error of each output channel ``j``
  weighted by ``f_j``, the mean squared gradient of the loss with respect to that output: a
  Kronecker-factored Fisher (full input correlations, diagonal output factor), in nats per token.
* ``"weight"``: ``sum(delta^2)``, no data at all.

All layer errors are assumed to add up (no interactions), which is what makes the choice a knapsack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..calibration import StatsSpec, float_layer_stats, spec_for_dtype
from ..calibration.runner import _input_device, _no_cache_kwargs, _normalize_batches, _to, _TrainingState
from ..core.errors import SkipLayer
from ..core.measure import memory_report
from ..core.targets import Patterns, select_linears
from ..methods.base import MethodConfig, get_method
from .api import compress_
from .recipe import Recipe, Stage

__all__ = ["allocate", "Allocation", "LayerChoice", "solve_budget", "effective_weight", "SENSITIVITIES"]

SENSITIVITIES = ("auto", "fisher", "output", "kfac", "weight")
_NEEDS_HESSIAN = ("output", "kfac")
_NEEDS_GRADIENTS = ("fisher", "kfac")


# ----------------------------------------------------------------------------------------------
# The result


@dataclass
class LayerChoice:
    """One targeted layer: what it gets, what it costs, the estimated error."""

    name: str
    num_weights: int
    config: MethodConfig
    bytes: int  # stored bytes of the weight (bias excluded)
    error: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.num_weights

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "num_weights": self.num_weights, "config": self.config.to_dict(),
                "label": self.config.label(), "bytes": self.bytes, "bits_per_weight": self.bits_per_weight,
                "error": self.error}


@dataclass
class Allocation:
    """One method config per targeted layer, meeting a byte budget with the least estimated loss.

    ``assignments``: ``{layer_name: config}``. ``total_bytes``: stored bytes of the targeted layers'
    weights under the assignments (bias excluded, as ``memory_report``'s ``bits_per_weight``);
    ``bits_per_weight = 8 * total_bytes / num_weights``; never more than ``budget_bytes``.
    ``estimated_loss``: the sum of the chosen layer errors (nats per token for ``"fisher"`` and
    ``"kfac"``, summed output mean squared errors for ``"output"``). ``costs`` / ``errors``: the
    measured ``{layer: [value per candidate]}`` (``None`` where a candidate does not apply), from
    which :meth:`with_budget` re-solves for another budget without measuring again.
    """

    assignments: Dict[str, MethodConfig]
    bits_per_weight: float
    total_bytes: int
    budget_bytes: int
    estimated_loss: float
    layers: List[LayerChoice] = field(default_factory=list)
    candidates: List[MethodConfig] = field(default_factory=list)
    costs: Dict[str, List[Optional[int]]] = field(default_factory=dict)
    errors: Dict[str, List[Optional[float]]] = field(default_factory=dict)
    num_weights: int = 0
    sensitivity: str = ""
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    # -- re-solving ------------------------------------------------------------------------------
    def with_budget(self, target_bits: Optional[float] = None, target_bytes: Optional[int] = None
                    ) -> "Allocation":
        """The allocation for another budget, from the measurements already made (no model needed)."""
        budget = _budget(target_bits, target_bytes, self.num_weights)
        return _solve(self.candidates, self.costs, self.errors,
                      {c.name: c.num_weights for c in self.layers}, budget, self.sensitivity, self.seconds,
                      list(self.notes))

    # -- using it --------------------------------------------------------------------------------
    @property
    def recipe(self):
        """A :class:`~llmopt.recipe.Recipe` applying the assignments with :func:`llmopt.compress_`.

        One stage per method (calibration-free methods first, so calibrated ones see their outputs):
        ``include`` = the exact names of its layers, ``config`` = its most common config and
        ``overrides`` = ``{name: config}`` for its layers that get another one.
        """
        groups: Dict[str, List[str]] = {}
        for name, cfg in self.assignments.items():
            groups.setdefault(cfg.name, []).append(name)
        order = {cfg.name: i for i, cfg in enumerate(self.candidates)}
        methods = sorted(groups, key=lambda m: (bool(_first(self.assignments, groups[m]).needs_calibration),
                                                order.get(m, len(order))))
        stages = []
        for method in methods:
            names = groups[method]
            counts = Counter(_config_key(self.assignments[n]) for n in names)
            common_key = max(counts, key=lambda key: (counts[key], -_first_index(self.assignments, names, key)))
            common = next(self.assignments[n] for n in names if _config_key(self.assignments[n]) == common_key)
            overrides = {n: self.assignments[n] for n in names if _config_key(self.assignments[n]) != common_key}
            stages.append(Stage(common, include=list(names), overrides=overrides))
        return Recipe(stages)

    def apply_(self, model: nn.Module, calibration: Optional[Sequence[Any]] = None, **kwargs: Any):
        """``llmopt.compress_(model, self.recipe, calibration=calibration, **kwargs)``; returns its report."""
        return compress_(model, self.recipe, calibration=calibration, **kwargs)

    # -- reporting -------------------------------------------------------------------------------
    def summary(self) -> Dict[str, Dict[str, float]]:
        """``{label: {"layers": n, "weights": share of the weights}}`` of the chosen configs."""
        out: Dict[str, Dict[str, float]] = {}
        for layer in self.layers:
            row = out.setdefault(layer.config.label(), {"layers": 0, "weights": 0.0})
            row["layers"] += 1
            row["weights"] += layer.num_weights / max(self.num_weights, 1)
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable: totals, per-layer table, candidates and their measured costs and errors."""
        return {
            "bits_per_weight": self.bits_per_weight, "total_bytes": self.total_bytes,
            "budget_bytes": self.budget_bytes, "num_weights": self.num_weights,
            "estimated_loss": self.estimated_loss, "sensitivity": self.sensitivity, "seconds": self.seconds,
            "assignments": {name: cfg.to_dict() for name, cfg in self.assignments.items()},
            "layers": [layer.to_dict() for layer in self.layers],
            "candidates": [cfg.to_dict() for cfg in self.candidates],
            "costs": {name: list(v) for name, v in self.costs.items()},
            "errors": {name: list(v) for name, v in self.errors.items()},
            "summary": self.summary(), "notes": list(self.notes),
        }

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lwidth = max([len(layer.config.label()) for layer in self.layers] + [6])
        lines = [f"{'layer':<{width}}  {'method':<{lwidth}} {'weights':>11} {'bytes':>11} {'bits/w':>7} "
                 f"{'error':>10}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<{width}}  {layer.config.label():<{lwidth}} {layer.num_weights:>11,} "
                         f"{layer.bytes:>11,} {layer.bits_per_weight:>7.3f} {layer.error:>10.4g}")
        for label, row in self.summary().items():
            lines.append(f"  {label}: {int(row['layers'])} layer(s), {100 * row['weights']:.1f}% of the weights")
        lines.append(f"total {self.total_bytes:,} of {self.budget_bytes:,} budget bytes: "
                     f"{self.bits_per_weight:.4f} bits/weight over {self.num_weights:,} weights; estimated "
                     f"loss {self.estimated_loss:.5g} ({self.sensitivity}); measured in {self.seconds:.1f} s")
        return "\n".join(lines)


def _config_key(cfg: MethodConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def _first(assignments: Dict[str, MethodConfig], names: List[str]) -> MethodConfig:
    return assignments[names[0]]


def _first_index(assignments: Dict[str, MethodConfig], names: List[str], key: str) -> int:
    return next(i for i, n in enumerate(names) if _config_key(assignments[n]) == key)


# ----------------------------------------------------------------------------------------------
# The knapsack


def solve_budget(costs: Sequence[Sequence[Optional[int]]], errors: Sequence[Sequence[Optional[float]]],
                 budget: int, *, max_states: int = 1 << 16) -> List[int]:
    """Multiple-choice knapsack: one option per item, least summed error, summed cost ``<= budget``.

    ``costs[i][k]`` (integer >= 0) and ``errors[i][k]`` (finite) describe option ``k`` of item ``i``;
    ``None`` marks an option the item does not have. Returns the chosen option index per item.

    Method: options that cost more without a lower error are dropped; a dynamic programme over the
    cost above the cheapest choice, in units of ``ceil(extra budget / max_states)`` bytes with every
    cost rounded *up* to whole units (so its answer always fits; exact when the extra budget is at most
    ``max_states``); then a greedy fill with exact costs takes the upgrade with the best error saved
    per byte while one fits. The result never exceeds the budget and no single-item change to a
    lower-error option fits in what is left. Raises ``ValueError`` when even the cheapest option of
    every item exceeds the budget.
    """
    if len(costs) != len(errors):
        raise ValueError(f"costs has {len(costs)} items but errors has {len(errors)}")
    budget = int(budget)
    fronts: List[List[Tuple[int, float, int]]] = []  # per item: (cost, error, option index), cost up, error down
    for i, (c_row, e_row) in enumerate(zip(costs, errors)):
        if len(c_row) != len(e_row):
            raise ValueError(f"item {i}: {len(c_row)} costs but {len(e_row)} errors")
        options = []
        for k, (c, e) in enumerate(zip(c_row, e_row)):
            if c is None or e is None:
                continue
            if int(c) != c or c < 0:
                raise ValueError(f"item {i}, option {k}: cost must be an integer >= 0, got {c!r}")
            if not math.isfinite(float(e)):
                raise ValueError(f"item {i}, option {k}: error must be finite, got {e!r}")
            options.append((int(c), float(e), k))
        if not options:
            raise ValueError(f"item {i} has no usable option")
        options.sort(key=lambda o: (o[0], o[1], o[2]))
        front = []
        for option in options:
            if not front or option[1] < front[-1][1]:
                front.append(option)
        fronts.append(front)
    if not fronts:
        return []
    base = sum(front[0][0] for front in fronts)
    if base > budget:
        raise ValueError(f"budget of {budget} bytes is below the cheapest choice ({base} bytes)")
    extra = budget - base
    unit = max(1, -(-extra // max_states))
    states = extra // unit + 1
    inf = float("inf")
    dp = torch.zeros(states, dtype=torch.float64)  # least error of the items so far within s units
    index_dtype = torch.int16 if max(len(f) for f in fronts) < 2**15 else torch.int32
    choices = []
    for front in fronts:
        best = torch.full((states,), inf, dtype=torch.float64)
        arg = torch.zeros(states, dtype=index_dtype)
        for j, (c, e, _) in enumerate(front):
            shift = -(-(c - front[0][0]) // unit)
            if shift >= states:
                continue
            cand = torch.full((states,), inf, dtype=torch.float64)
            cand[shift:] = dp[:states - shift] + e
            better = cand < best
            best = torch.where(better, cand, best)
            arg = torch.where(better, torch.tensor(j, dtype=index_dtype), arg)
        dp = best
        choices.append(arg)
    pick = [0] * len(fronts)
    s = states - 1
    for i in range(len(fronts) - 1, -1, -1):
        j = int(choices[i][s])
        pick[i] = j
        s -= -(-(fronts[i][j][0] - fronts[i][0][0]) // unit)
    # Greedy fill with exact costs: rounding up may have left room for more upgrades.
    spent = sum(front[j][0] for front, j in zip(fronts, pick))
    for _ in range(sum(len(f) for f in fronts) + 1):
        left = budget - spent
        best_step = None
        for i, front in enumerate(fronts):
            c0, e0, _ = front[pick[i]]
            for j in range(pick[i] + 1, len(front)):
                dc, de = front[j][0] - c0, e0 - front[j][1]
                if dc > left:
                    break
                ratio = de / dc if dc > 0 else inf
                if best_step is None or ratio > best_step[0]:
                    best_step = (ratio, i, j, dc)
        if best_step is None:
            break
        _, i, j, dc = best_step
        pick[i] = j
        spent += dc
    return [front[j][2] for front, j in zip(fronts, pick)]


# ----------------------------------------------------------------------------------------------
# Measuring one layer


def effective_weight(module: nn.Module, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[out, in]`` weight a replacement layer multiplies by: ``dequantize_weight()`` when it has
    one, else its response to the identity matrix minus its response to zero (any linear module)."""
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight(dtype).to(dtype)
    if hasattr(module, "to_linear"):
        return module.to_linear().weight.detach().to(dtype)
    ref = next((t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()), None)
    run_dtype = ref.dtype if ref is not None else dtype
    device = ref.device if ref is not None else torch.device("cpu")
    with torch.no_grad():
        eye = torch.eye(in_features, dtype=run_dtype, device=device)
        out = module(eye) - module(torch.zeros(1, in_features, dtype=run_dtype, device=device))
    return out.T.to(dtype)


def _measuring_config(cfg: MethodConfig) -> MethodConfig:
    """``cfg`` with the reference kernel where it has a ``kernel`` option: the stored form (bytes) and
    the dequantized weight are the same, without packing into a fast kernel's layout for nothing."""
    if getattr(cfg, "kernel", "reference") == "reference" or not dataclasses.is_dataclass(cfg):
        return cfg
    try:
        return dataclasses.replace(cfg, kernel="reference")
    except (TypeError, ValueError):
        return cfg


def _weight_bytes(module: nn.Module, name: str, cfg: MethodConfig) -> int:
    rows = memory_report(module).layers
    if not rows or rows[0].name != "":
        raise ValueError(f"layer {name!r}: candidate {cfg.label()} returned a {type(module).__name__}, which "
                         "memory_report does not count as a layer (expected an llmopt wrapper or nn.Linear)")
    return int(round(rows[0].bits_per_weight * rows[0].num_weights / 8.0))


@dataclass
class _Sensitivity:
    mode: str
    fisher: Dict[str, torch.Tensor] = field(default_factory=dict)  # weight-shaped, float32
    out_fisher: Dict[str, torch.Tensor] = field(default_factory=dict)  # [out], float32


def _layer_error(mode: str, delta: torch.Tensor, name: str, sens: _Sensitivity,
                 hessian: Optional[torch.Tensor]) -> float:
    if mode == "weight":
        return float(delta.double().pow(2).sum())
    if mode == "fisher":
        return 0.5 * float((sens.fisher[name] * delta * delta).double().sum())
    rows = ((delta @ hessian) * delta).sum(dim=1)  # per output channel: mean ||delta x||^2 share
    if mode == "output":
        return float(rows.double().sum())
    return 0.5 * float((sens.out_fisher[name] * rows).double().sum())  # kfac


def _measure_layer(name: str, linear: nn.Module, candidates: List[MethodConfig], stats, sens: _Sensitivity
                   ) -> Tuple[List[Optional[int]], List[Optional[float]], List[str]]:
    weight = linear.weight.detach().to(torch.float32)
    hessian = None
    if sens.mode in _NEEDS_HESSIAN:
        if stats is None or stats.count == 0:
            raise ValueError(f"layer {name!r} received no inputs during calibration: its output error cannot "
                             "be measured")
        hessian = stats.mean_hessian().to(torch.float32)
    costs: List[Optional[int]] = []
    errors: List[Optional[float]] = []
    notes: List[str] = []
    for cfg in candidates:
        entry = get_method(cfg)
        kwargs = {"stats": stats} if cfg.needs_calibration else {}
        try:
            new = entry.handler(linear, _measuring_config(cfg), name=name, **kwargs)
        except SkipLayer as skip:
            costs.append(None)
            errors.append(None)
            notes.append(f"{name}: {cfg.label()} does not apply ({skip.reason})")
            continue
        except Exception as exc:
            raise ValueError(f"layer {name!r}: candidate {cfg.label()} failed: {exc}") from exc
        nbytes = _weight_bytes(new, name, cfg)
        delta = effective_weight(new, weight.shape[1]) - weight
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"layer {name!r}: candidate {cfg.label()} has weight shape {tuple(delta.shape)}, "
                             f"expected {tuple(weight.shape)}")
        error = _layer_error(sens.mode, delta, name, sens, hessian)
        if not math.isfinite(error):
            raise ValueError(f"layer {name!r}: candidate {cfg.label()} gives a non-finite error ({error}); "
                             "NaN/Inf in the weight, the replacement or the calibration statistics")
        costs.append(nbytes)
        errors.append(error)
        del new, delta
    if all(c is None for c in costs):
        raise ValueError(f"layer {name!r}: no candidate applies to it ({'; '.join(notes)})")
    return costs, errors, notes


# ----------------------------------------------------------------------------------------------
# Gradients (Fisher)


def _batch_size_tokens(ids: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> float:
    """Predicted items behind a mean next-token loss: non-ignored shifted labels, else ids' rows x (seq-1)."""
    if isinstance(labels, torch.Tensor) and labels.dim() >= 2:
        return float((labels[..., 1:] != -100).sum())
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        ids2 = ids if ids.dim() >= 2 else ids.unsqueeze(0)
        return float(ids2.shape[0] * max(ids2.shape[-1] - 1, 1))
    return 1.0


def _output_loss(output: Any) -> Optional[torch.Tensor]:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def _accepts_labels(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "labels" in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _loss_and_items(model: nn.Module, batch: Any, prepared: Tuple[tuple, dict], loss_fn, extra: dict,
                    device) -> Tuple[Optional[torch.Tensor], float]:
    args, kwargs = _to(prepared, device)
    ids = args[0] if args else kwargs.get("input_ids")
    if loss_fn is not None:
        return loss_fn(model, _to(batch, device)), _batch_size_tokens(ids, None)
    if not _accepts_labels(model) or not isinstance(ids, torch.Tensor):
        return None, 1.0
    if args:  # a tensor batch: token ids
        args, kwargs = (), {"input_ids": ids, **kwargs}
    labels = kwargs.get("labels")
    if labels is None:
        kwargs = {**kwargs, "labels": ids}
    return _output_loss(model(*args, **{**kwargs, **extra})), _batch_size_tokens(ids, labels)


def _model_has_loss(model: nn.Module, calibration: Sequence[Any], loss_fn) -> bool:
    """Whether the first calibration batch gives a scalar loss (forward only, no gradients)."""
    if loss_fn is not None:
        return True
    if not _accepts_labels(model):
        return False
    prepared = _normalize_batches(model, calibration[:1])
    try:
        with _TrainingState(model), torch.no_grad():
            loss, _ = _loss_and_items(model, calibration[0], prepared[0], None, _no_cache_kwargs(model),
                                      _input_device(model))
    except Exception:  # noqa: BLE001 - any failure with labels means "no usable loss": fall back to output
        return False
    return loss is not None


def _gradient_statistics(model: nn.Module, targets: Dict[str, nn.Module], calibration: Sequence[Any],
                         loss_fn, want_weight: bool, want_output: bool, progress: bool,
                         dtype: Optional[torch.dtype] = None) -> _Sensitivity:
    """Squared loss gradients over the calibration batches: per weight (diagonal Fisher) and/or per
    output channel of each target. Gradients flow only to the targets' weights; requires_grad flags,
    existing ``.grad`` tensors and train/eval flags are restored afterwards. ``dtype`` (bfloat16 /
    float16): forwards and backwards under autocast (about 2x faster on CPUs with bf16 units)."""
    prepared = _normalize_batches(model, calibration)
    extra = _no_cache_kwargs(model)
    device = _input_device(model)
    sens = _Sensitivity("")
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    weights: Dict[int, List[str]] = {}
    for name, linear in targets.items():
        weights.setdefault(id(linear.weight), []).append(name)
    scale = {"items": 1.0}
    handles = []
    items_total = 0.0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, linear in targets.items():
            w = linear.weight
            if want_weight and name not in sens.fisher:
                acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                for shared in weights[id(w)]:
                    sens.fisher[shared] = acc
            if want_output:
                sens.out_fisher[name] = torch.zeros(linear.out_features, dtype=torch.float32, device=w.device)
            w.requires_grad_(True)
        if want_weight:
            done = set()
            for name, linear in targets.items():
                w = linear.weight
                if id(w) in done:
                    continue
                done.add(id(w))
                acc = sens.fisher[name]

                def on_grad(p, acc=acc):
                    g = p.grad.detach().to(torch.float32) * scale["items"]  # gradient of the summed loss
                    acc.addcmul_(g, g)
                    p.grad = None
                handles.append(w.register_post_accumulate_grad_hook(on_grad))
        else:
            for name, linear in targets.items():
                handles.append(linear.weight.register_post_accumulate_grad_hook(
                    lambda p: setattr(p, "grad", None)))
        if want_output:
            for name, linear in targets.items():
                acc = sens.out_fisher[name]

                def forward_hook(module, inputs, output, acc=acc):
                    if isinstance(output, torch.Tensor) and output.requires_grad:
                        def on_output_grad(g, acc=acc):
                            g = g.detach().to(torch.float32).reshape(-1, g.shape[-1]) * scale["items"]
                            acc.add_((g * g).sum(dim=0))
                        output.register_hook(on_output_grad)
                handles.append(linear.register_forward_hook(forward_hook))
        bar = None
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(prepared), desc="allocate: loss gradients", unit="batch", disable=not progress)
        except ImportError:  # pragma: no cover
            pass
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16)
                    else contextlib.nullcontext())
        with _TrainingState(model), torch.enable_grad(), autocast:
            for i, (batch, prep) in enumerate(zip(calibration, prepared)):
                try:
                    loss, items = _loss_and_items(model, batch, prep, loss_fn, extra, device)
                except Exception as exc:
                    raise ValueError(f"calibration batch {i}: the loss could not be computed "
                                     f"({type(exc).__name__}: {exc})") from exc
                if loss is None:
                    raise ValueError("sensitivity='fisher'/'kfac' needs a loss: the model returned none for "
                                     f"calibration batch {i} (pass loss_fn=..., or use sensitivity='output')")
                if not torch.isfinite(loss.detach()):
                    raise ValueError(f"calibration batch {i}: the loss is {float(loss)}; the model or batch "
                                     "produces NaN/Inf")
                if not loss.requires_grad:
                    raise ValueError("the loss does not depend on the targeted weights (no gradient); check "
                                     "include/exclude and that the model is not run under torch.no_grad")
                scale["items"] = items
                loss.backward()
                items_total += items
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
    # Per-token averages: sum over batches of (d summed-loss / d w)^2, divided by the items seen.
    for acc in {id(t): t for t in sens.fisher.values()}.values():
        acc.div_(items_total)
    for acc in sens.out_fisher.values():
        acc.div_(items_total)
    return sens


# ----------------------------------------------------------------------------------------------
# allocate


def _budget(target_bits: Optional[float], target_bytes: Optional[int], num_weights: int) -> int:
    if (target_bits is None) == (target_bytes is None):
        raise ValueError("give exactly one of target_bits= (average stored bits per weight) or target_bytes= "
                         f"(stored bytes of the targeted weights); got target_bits={target_bits!r}, "
                         f"target_bytes={target_bytes!r}")
    if target_bits is not None:
        if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) \
                or not math.isfinite(target_bits) or target_bits <= 0:
            raise ValueError(f"target_bits must be a positive number, got {target_bits!r}")
        return int(math.floor(target_bits * num_weights / 8.0 + 1e-9))
    if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes <= 0:
        raise ValueError(f"target_bytes must be a positive integer, got {target_bytes!r}")
    return target_bytes


def _solve(candidates: List[MethodConfig], costs: Dict[str, List[Optional[int]]],
           errors: Dict[str, List[Optional[float]]], num_weights: Dict[str, int], budget: int, sensitivity: str,
           seconds: float, notes: List[str]) -> Allocation:
    names = list(costs)
    total_weights = sum(num_weights.values())
    try:
        pick = solve_budget([costs[n] for n in names], [errors[n] for n in names], budget)
    except ValueError as exc:
        cheapest = sum(min(c for c in costs[n] if c is not None) for n in names)
        raise ValueError(f"the budget of {budget:,} bytes ({8 * budget / total_weights:.4f} bits/weight) is below "
                         f"the cheapest candidate in every layer: {cheapest:,} bytes "
                         f"({8 * cheapest / total_weights:.4f} bits/weight); add a smaller candidate or raise "
                         "the target") from exc
    layers = [LayerChoice(n, num_weights[n], candidates[k], int(costs[n][k]), float(errors[n][k]))
              for n, k in zip(names, pick)]
    total = sum(layer.bytes for layer in layers)
    return Allocation(
        assignments={layer.name: layer.config for layer in layers},
        bits_per_weight=8.0 * total / total_weights, total_bytes=total, budget_bytes=budget,
        estimated_loss=sum(layer.error for layer in layers), layers=layers, candidates=list(candidates),
        costs={n: list(costs[n]) for n in names}, errors={n: list(errors[n]) for n in names},
        num_weights=total_weights, sensitivity=sensitivity, seconds=seconds, notes=notes)


def _check_candidates(candidates: Any) -> List[MethodConfig]:
    if isinstance(candidates, MethodConfig) or candidates is None:
        raise TypeError("candidates must be a list of method configs, e.g. [RTN('int2', 64), RTN('int4', 64)]; "
                        f"got {candidates!r}")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty: give at least one method config per layer to choose from")
    unique, seen = [], set()
    for cfg in candidates:
        if not isinstance(cfg, MethodConfig):
            raise TypeError(f"candidate {cfg!r} is not a method config (e.g. llmopt.RTN('int4', 64))")
        entry = get_method(cfg)
        why = {"block": "it rescales modules shared by several layers",
               "model": "it changes the architecture"}.get(entry.scope)
        if why is not None:
            raise ValueError(f"candidate {cfg.label()}: {cfg.name!r} is a {entry.scope}-scope method ({why}), and "
                             "allocate measures each layer alone; use layer-scope candidates (RTN, HQQ, GPTQ, SVD, "
                             "Wanda, ...)")
        if cfg.adds_adapters:
            raise ValueError(f"candidate {cfg.label()}: {cfg.name!r} adds adapters, it does not compress a layer")
        key = _config_key(cfg)
        if key not in seen:
            seen.add(key)
            unique.append(cfg)
    return unique


def allocate(
    model: nn.Module,
    *,
    candidates: Sequence[MethodConfig],
    target_bits: Optional[float] = None,
    target_bytes: Optional[int] = None,
    calibration: Optional[Sequence[Any]] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    sensitivity: str = "auto",
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    calibration_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> Allocation:
    """Pick one of ``candidates`` for every targeted ``nn.Linear`` so that the targeted weights fit
    ``target_bits`` (average stored bits per weight, scales included) or ``target_bytes``, with the least
    estimated loss. The model is not modified; apply the result with ``allocation.apply_(model)`` or
    ``llmopt.compress_(model, allocation.recipe, calibration=...)``.

    ``candidates``: layer-scope method configs (``RTN``, ``HQQ``, ``GPTQ``, ``SVD(rank=...)``,
    ``Wanda(...)``, ...); block-scope ones (AWQ, SmoothQuant) are refused. ``sensitivity``:
    ``"fisher"`` (squared loss gradients per weight), ``"kfac"`` (output error weighted by squared
    loss gradients per output channel), ``"output"`` (output error), ``"weight"`` (weight error, no
    data) or ``"auto"``: ``"fisher"`` when the model returns a loss (a Hugging Face CausalLM given
    ``labels``, or ``loss_fn(model, batch)`` given; it beat ``"kfac"`` at 2 of 3 budgets on SmolLM2,
    see docs/allocate.md) and ``"output"`` otherwise. ``calibration``: batches as for ``compress_``
    (needed by every mode but ``"weight"`` and by calibrated candidates); their statistics come from
    one block-by-block pass over the float model. ``loss_fn(model, batch)``: the mean loss of one
    batch, for models that do not return one given ``labels``. ``calibration_dtype`` (bfloat16):
    calibration forwards, and the gradient passes under autocast, in that dtype (faster, as
    ``compress_``). ``progress``: progress bars.

    Raises ``ValueError`` for empty candidates, both or neither of ``target_bits``/``target_bytes``, a
    budget below the cheapest candidate in every layer, missing calibration, a block-scope candidate,
    or a layer whose candidates fail (named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"allocate expects an nn.Module, got {type(model).__name__}")
    candidates = _check_candidates(candidates)
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(model, batch) -> scalar loss, got {loss_fn!r}")
    if calibration is not None and not isinstance(calibration, (list, tuple)):
        if isinstance(calibration, (torch.Tensor, Mapping)):
            raise ValueError("calibration must be a list of batches, got a single "
                             f"{type(calibration).__name__}; wrap it in a list")
        calibration = list(calibration)
    if calibration is not None and len(calibration) == 0:
        calibration = None
    for cfg in candidates:
        if cfg.needs_calibration and not calibration:
            raise ValueError(f"candidate {cfg.label()} needs calibration data; pass calibration=[...]")
    if sensitivity != "weight" and not calibration:
        raise ValueError(f"sensitivity={sensitivity!r} measures on calibration data; pass calibration=[...] "
                         "(or sensitivity='weight' for a data-free weight-error allocation)")
    targets, skipped = select_linears(model, include, exclude)
    if not targets:
        raise ValueError(f"allocate: no uncompressed nn.Linear matches include={include!r} exclude={exclude!r}"
                         + (f" (skipped: {', '.join(sorted(skipped)[:5])})" if skipped else ""))
    num_weights = {name: int(linear.weight.numel()) for name, linear in targets.items()}
    budget = _budget(target_bits, target_bytes, sum(num_weights.values()))

    start = time.perf_counter()
    mode = sensitivity
    if mode == "auto":
        mode = "fisher" if _model_has_loss(model, calibration, loss_fn) else "output"
    sens = _Sensitivity(mode)
    if mode in _NEEDS_GRADIENTS:
        grads = _gradient_statistics(model, targets, calibration, loss_fn, want_weight=mode == "fisher",
                                     want_output=mode == "kfac", progress=progress, dtype=calibration_dtype)
        sens.fisher, sens.out_fisher = grads.fisher, grads.out_fisher

    costs: Dict[str, List[Optional[int]]] = {}
    errors: Dict[str, List[Optional[float]]] = {}
    notes: List[str] = [f"{name}: {reason}" for name, reason in skipped.items()]

    def measure(name: str, stats) -> None:
        try:
            c, e, n = _measure_layer(name, targets[name], candidates, stats, sens)
        finally:
            sens.fisher.pop(name, None)  # free each layer's accumulator once used
        costs[name], errors[name] = c, e
        notes.extend(n)

    needs_stats = mode in _NEEDS_HESSIAN or any(cfg.needs_calibration for cfg in candidates)
    if needs_stats:
        spec = spec_for_dtype(StatsSpec(hessian=True, dtype=torch.float64), calibration_dtype)
        float_layer_stats(model, calibration, spec, list(targets), measure, dtype=calibration_dtype,
                          progress=progress)
    else:
        names = list(targets)
        try:
            from tqdm.auto import tqdm
            names = tqdm(names, desc="allocate: candidates per layer", unit="layer", disable=not progress)
        except ImportError:  # pragma: no cover
            pass
        for name in names:
            measure(name, None)
    costs = {name: costs[name] for name in targets}
    errors = {name: errors[name] for name in targets}
    seconds = time.perf_counter() - start
    return _solve(candidates, costs, errors, num_weights, budget, mode, seconds, notes)
