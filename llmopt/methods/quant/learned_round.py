"""Learned rounding and clipping by block-wise reconstruction (issue 17), after AutoRound's idea
(Cheng et al., 2023: signed-gradient descent on rounding offsets and range scales) and OmniQuant's
learnable clipping, written for llmopt's formats.

For each block, in calibration order:

1. **Start** from AWQ's plan for the block (activation-aware scales folded into the norms, clip
   search, GPTQ's rounding: the ``w4-best`` quantization), or from a plainer one (``init=``).
2. **Train** a copy of the block whose targeted linears compute ``W_hat`` from learnable parameters,
   so that its outputs on the calibration inputs match the uncompressed block's (mean squared error):

   * a rounding offset ``v`` per weight, in units of the group's starting scale: the codes are those
     the format picks for ``W_start + v * scale0`` (any format, codebooks included; straight-through
     gradient). ``v`` starts where it reproduces the starting codes exactly and moves at most
     ``max_offset`` away;
   * a multiplier of each group's scale (``[1 - scale_range, 1 + scale_range]``) and a shift of its
     zero point (asymmetric formats): learnable clipping. The stored form of the parameters
     (bf16 scales, integer or GGUF "min" zero points) is applied in every forward, so training sees
     exactly what will be stored.

   Updates are signed gradient steps with a linearly decaying step size, as AutoRound's: each
   parameter moves by at most ``lr`` per step, so the result stays near the (already good) start.
3. **Keep** the trained parameters only if they lower the block's loss on the whole calibration
   set; otherwise the starting quantization stays (never worse than ``init`` on the calibration loss).

The block's inputs are the outputs of the already compressed previous blocks, and its targets
(``teacher="float"``, default) the uncompressed model's own outputs at this block, so each block also
learns to undo part of the error of the blocks before it. Training runs in the calibration dtype
(bf16 on CPUs that have it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...calibration import LayerStats, StatsSpec
from ...calibration.graph import InputSource
from ...calibration.runner import BlockIO
from ...core.checks import check_choice, check_int, check_number
from ...core.formats import WeightFormat
from ...core.primitives import QuantizedWeight, dequantize_weight, to_groups
from ...core.targets import set_submodule
from ..base import MethodConfig, register_method
from ..quantized import WeightQuantFields
from .awq import AWQ, AWQSearchFields, LayerPlan, awq_block_plan
from .scaling import relative_name

__all__ = ["LearnedRound", "RoundingLinear"]

INITS = ("awq+gptq", "awq", "gptq", "rtn")
LOSSES = ("mse", "relative")


class RoundingLinear(nn.Module):
    """A linear layer whose weight is a quantized weight with learnable rounding and group parameters.

    ``start`` is the starting quantization. ``refresh()`` recomputes the dequantized weight from the
    parameters once per training step (every forward of the step reuses it); ``quantized()`` gives the
    codes and stored parameters. Everything is kept per group (``[N, G, group_size]``, the last group
    padded), the shape the format quantizes, so no step regroups or expands per-group values.
    """

    def __init__(self, start: QuantizedWeight, fmt: WeightFormat, scale_dtype: torch.dtype,
                 bias: Optional[Tensor], input_scale: Optional[Tensor], *, max_offset: float = 1.0,
                 scale_range: float = 0.5):
        super().__init__()
        self.fmt, self.scale_dtype, self.group_size = fmt, scale_dtype, start.group_size
        self.in_features = start.codes.shape[1]
        self.max_offset, self.scale_range = max_offset, scale_range
        scale0 = start.scale.to(torch.float32).unsqueeze(-1)  # [N, G, 1]
        self.register_buffer("scale_start", scale0)
        self.register_buffer("step", scale0.abs().clamp_min(1e-12))  # the unit of the offsets
        self.register_buffer("zero_start", start.zero_point.to(torch.float32).unsqueeze(-1)
                             if start.zero_point is not None else None)
        self.register_buffer("bias", bias.detach() if bias is not None else None)
        self.register_buffer("input_scale", input_scale.detach().to(torch.float32)
                             if input_scale is not None else None)
        # The rounding target starts on the starting code's value, so the format picks that code again.
        values = dequantize_weight(start.codes, start.scale, start.zero_point, fmt, start.group_size)
        self.register_buffer("start_groups", to_groups(values, self.group_size))
        self.offset = nn.Parameter(torch.zeros_like(self.start_groups))  # in steps, from the start
        self.log_scale = nn.Parameter(torch.zeros_like(scale0))
        self.zero_shift = nn.Parameter(torch.zeros_like(scale0)) if start.zero_point is not None else None
        self._w_hat: Optional[Tensor] = None

    def _params(self) -> Tuple[Tensor, Optional[Tensor]]:
        """Group scale and zero point ``[N, G, 1]`` as they will be stored (straight-through rounding)."""
        scale = self.scale_start * self.log_scale.exp()
        zero = self.zero_start + self.zero_shift * self.step if self.zero_start is not None else None
        stored_scale, stored_zero = self.fmt.finalize_params(scale.detach(), zero.detach() if zero is not None
                                                             else None, self.scale_dtype)
        scale = scale + (stored_scale.to(torch.float32) - scale).detach()
        if zero is not None:
            zero = zero + (stored_zero.to(torch.float32) - zero).detach()
        return scale, zero

    def _quantize(self) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """``(target, codes, scale, zero)``: the grouped float target ``start + offset * step``, the codes
        the format picks for it under the (stored) group parameters, and those parameters."""
        target = self.start_groups + self.offset * self.step
        scale, zero = self._params()
        with torch.no_grad():
            codes = self.fmt.quantize(target, scale.detach(), zero.detach() if zero is not None else None)
        return target, codes, scale, zero

    def _ungroup(self, grouped: Tensor) -> Tensor:
        return grouped.reshape(grouped.shape[0], -1)[:, : self.in_features]

    def compute_weight(self) -> Tensor:
        """The dequantized weight ``[N, K]`` (float32), differentiable in every learnable parameter."""
        target, codes, scale, zero = self._quantize()
        values = self.fmt.dequantize(codes, scale, zero)  # gradients to the scale and zero point
        return self._ungroup(values + (target - target.detach()))  # straight through to the offsets

    def refresh(self) -> None:
        self._w_hat = self.compute_weight()

    def forward(self, x: Tensor) -> Tensor:
        w = self._w_hat if self._w_hat is not None else self.compute_weight()
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return F.linear(x, w.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the parameters in their ranges (after each step)."""
        self.offset.clamp_(-self.max_offset, self.max_offset)
        self.log_scale.clamp_(math.log1p(-self.scale_range), math.log1p(self.scale_range))
        if self.zero_shift is not None:
            self.zero_shift.clamp_(-self.max_offset, self.max_offset)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """Codes and stored parameters of the current state (what the :class:`QuantLinear` gets)."""
        _, codes, scale, zero = self._quantize()
        stored_zero = (zero.squeeze(-1).to(self.fmt.zero_point_dtype(self.scale_dtype))
                       if zero is not None else None)
        return QuantizedWeight(codes=self._ungroup(codes).contiguous(),
                               scale=scale.squeeze(-1).to(self.scale_dtype).contiguous(),
                               zero_point=stored_zero.contiguous() if stored_zero is not None else None,
                               group_size=self.group_size)


@dataclasses.dataclass(frozen=True)
class LearnedRound(AWQSearchFields, WeightQuantFields, MethodConfig):
    """Learned rounding and clipping by block-wise reconstruction, on top of AWQ + GPTQ.

    Args:
        format, group_size, symmetric, scale_dtype, kernel: the quantization (as :class:`RTN`).
        init: the starting quantization of each block: ``"awq+gptq"`` (AWQ scales and clipping, GPTQ
            rounding; default), ``"awq"`` (AWQ with round-to-nearest), ``"gptq"`` (GPTQ with AWQ's clip
            search, no scales) or ``"rtn"`` (round to nearest).
        iters: training steps per block (0: the starting quantization, no training).
        lr: the step of the signed updates at the start (it decays linearly to 0, so a parameter moves by
            at most ``lr * iters / 2`` in all: 0.4 quantization steps with the defaults).
        batch_size: calibration batches per step.
        max_offset: how far (in quantization steps) a weight's rounding target may move from its start.
        scale_range: each group's scale stays within ``[1 - r, 1 + r]`` times its start.
        teacher: ``"float"`` (the uncompressed model's outputs at each block, so a block also makes up for
            the error of the ones before it) or ``"local"`` (the uncompressed block on the same inputs).
        loss: ``"mse"`` (mean squared error of the block's outputs) or ``"relative"`` (each token's squared
            error relative to its target's squared norm).
        grid, duo_scaling, clip, clip_grid, max_shrink, fold, act_order, damp: the starting AWQ/GPTQ's options.
        seed: the order of the calibration batches.
    """

    name = "learned_round"
    SCOPE = "block"
    needs_calibration = True

    init: str = "awq+gptq"
    iters: int = 40
    lr: float = 0.02
    batch_size: int = 4
    max_offset: float = 1.0
    scale_range: float = 0.5
    teacher: str = "float"
    loss: str = "mse"
    # (grid, duo_scaling, clip, clip_grid, max_shrink, fold: from AWQSearchFields)
    act_order: bool = True
    damp: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)
        check_choice("teacher", self.teacher, ("float", "local"))
        check_choice("loss", self.loss, LOSSES)
        check_int("iters", self.iters, 0)
        check_number("lr", self.lr, 0, 1, low_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_number("max_offset", self.max_offset, 0, 8)
        check_number("scale_range", self.scale_range, 0, 1, high_open=True)
        check_int("seed", self.seed, 0)
        super().__post_init__()
        # The starting AWQ validates its own options (grid, clip_grid, max_shrink, damp, flags).
        self.start_config()

    # The runner's block data: inputs and the float targets.
    @property
    def block_io(self) -> str:  # type: ignore[override]
        return self.teacher

    def start_config(self) -> AWQ:
        """The :class:`AWQ` config whose plan is each block's starting point."""
        return AWQ(self.format, self.group_size, symmetric=self.symmetric, scale_dtype=self.scale_dtype,
                   kernel=self.kernel, grid=self.grid, duo_scaling=self.duo_scaling,
                   clip=self.clip and self.init != "rtn", clip_grid=self.clip_grid, max_shrink=self.max_shrink,
                   fold=self.fold, propagate="quantized",
                   rounding="gptq" if self.init in ("awq+gptq", "gptq") else "rtn",
                   act_order=self.act_order, damp=self.damp)

    def stats_spec(self) -> StatsSpec:
        return self.start_config().stats_spec()

    @classmethod
    def examples(cls):
        return [cls("int4", 32, iters=4, batch_size=2), cls("int3", 64, iters=3, init="rtn", teacher="local"),
                cls("nf4", 64, iters=2)]

    @classmethod
    def benchmark_configs(cls):
        return []  # minutes per model: the suite measures it through the presets that use it

    def label(self) -> str:
        return f"learned-round {self.format} {self.scheme.group_label()} ({self.init}, {self.iters} steps)"



def block_loss(block: nn.Module, io: BlockIO, indices: List[int], kind: str = "mse") -> Tensor:
    """Sum over batches ``indices`` of the error of ``block``'s outputs against the targets: the mean
    squared error (``"mse"``), or each token's squared error relative to its target's squared norm
    (``"relative"``: what a normalisation layer reading the output sees; tokens of huge norm, such as
    an attention sink, then weigh no more than the others)."""
    total = None
    for j in indices:
        out = io.run(block, j).to(torch.float32)
        target = io.targets[j].to(out.device, torch.float32)
        if kind == "mse":
            loss = F.mse_loss(out, target)
        else:
            err = (out - target).pow(2).sum(-1)
            loss = (err / target.pow(2).sum(-1).clamp_min(1e-12)).mean()
        total = loss if total is None else total + loss
    return total


def _train_block(train: nn.Module, modules: List[RoundingLinear], io: BlockIO, config: LearnedRound) -> Tuple[float, float]:
    """Signed-gradient training of ``modules`` (inside ``train``); returns the whole-set losses before and
    after. The parameters are left at the end state (the caller compares and decides)."""
    everything = list(range(len(io)))

    def full_loss() -> float:
        with torch.no_grad():
            for m in modules:
                m.refresh()
            return float(block_loss(train, io, everything, config.loss)) / len(everything)

    before = full_loss()
    params = [p for m in modules for p in (m.offset, m.log_scale, m.zero_shift) if p is not None]
    generator = torch.Generator().manual_seed(config.seed)
    order: List[int] = []
    for step in range(config.iters):
        if len(order) < config.batch_size:
            order += torch.randperm(len(io), generator=generator).tolist()
        batch, order = order[: config.batch_size], order[config.batch_size:]
        for m in modules:
            m.refresh()
        loss = block_loss(train, io, batch, config.loss)
        for p in params:
            p.grad = None
        loss.backward()
        lr = config.lr * (1.0 - step / config.iters)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-lr)
            for m in modules:
                m.clamp_()
        del loss
    after = full_loss()
    for m in modules:
        m._w_hat = None  # the training copy is dropped next; free the cached weights now
    return before, after


def _training_copy(root: nn.Module, prefix: str, plans: Dict[str, LayerPlan], norms: Dict[str, nn.Module],
                   layers: Dict[str, nn.Module], config: LearnedRound, dtype: Optional[torch.dtype]
                   ) -> Tuple[nn.Module, Dict[str, RoundingLinear]]:
    """A copy of the block with the folded norms and a :class:`RoundingLinear` per planned layer; every
    other parameter frozen, in the calibration dtype."""
    train = copy.deepcopy(root)
    if dtype is not None:
        train.to(dtype)
    for p in train.parameters():
        p.requires_grad_(False)
    fmt, scale_dtype = config.scheme.weight_format(), config.scheme.scale_torch_dtype
    for name, norm in norms.items():
        replacement = copy.deepcopy(norm)
        if dtype is not None:
            replacement.to(dtype)
        for p in replacement.parameters():
            p.requires_grad_(False)
        set_submodule(train, relative_name(name, prefix), replacement)
    modules: Dict[str, RoundingLinear] = {}
    for name, plan in plans.items():
        layer = layers[name]
        m = RoundingLinear(plan.quantized, fmt, scale_dtype, layer.bias, plan.input_scale,
                           max_offset=config.max_offset, scale_range=config.scale_range)
        set_submodule(train, relative_name(name, prefix), m)
        modules[name] = m
    return train, modules


@register_method(LearnedRound)
def _apply_learned_round(layers: Dict[str, nn.Module], config: LearnedRound, *, stats: Dict[str, LayerStats],
                         sources: Dict[str, InputSource], root: nn.Module, prefix: str = "",
                         io: Optional[BlockIO] = None, **_: Any) -> Dict[str, nn.Module]:
    start = config.start_config()
    plans, norms = awq_block_plan(layers, start, stats, sources, root, prefix,
                                  search_scales=config.init in ("awq+gptq", "awq"))
    fmt = config.scheme.weight_format()
    if io is None and config.iters > 0:
        # Layers outside the repeated blocks (or a model without any) have no block to train on.
        warnings.warn(f"LearnedRound: {', '.join(layers)} lie outside the model's repeated blocks; they keep "
                      f"the starting {config.init} quantization, untrained", stacklevel=2)
    if io is not None and len(io) and config.iters > 0:
        train, modules = _training_copy(root, prefix, plans, norms, layers, config, io.dtype)
        before, after = _train_block(train, list(modules.values()), io, config)
        if after < before:  # else the starting quantization stays (never worse on the calibration loss)
            plans = {name: dataclasses.replace(plans[name], quantized=m.quantized()) for name, m in modules.items()}
        del train, modules
    out: Dict[str, nn.Module] = dict(norms)
    for name, plan in plans.items():
        out[name] = plan.to_module(layers[name], config.scheme.kernel, fmt)
    return out
