"""One-call entry points: ``compress_``."""

from __future__ import annotations

import dataclasses
import glob
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..core.errors import CompressionError, SkipLayer
from ..core.measure import memory_report
from ..core.targets import (
    Patterns,
    _as_list,
    _matches,
    get_submodule,
    is_compressed,
    replace_modules,
    restore_modules,
    select_linears,
)
from ..methods.base import MethodConfig, get_method

__all__ = ["compress_", "CompressionReport", "CompressionError", "SkipLayer", "merged_stats_spec"]

if TYPE_CHECKING:  # recipe imports lowrank.lora, which imports this module
    from ..methods.lowrank.lora import LoRA
    from .recipe import Recipe, Stage


@dataclass
class CompressionReport:
    """What ``compress_`` did: replaced layers, bytes before/after, time."""

    replaced: Dict[str, str] = field(default_factory=dict)  # name -> repr of the new module
    # Non-target modules swapped for rescaled copies (AWQ/SmoothQuant folding 1/s into a norm).
    rescaled: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)  # name -> reason
    notes: List[str] = field(default_factory=list)  # things the user should know (tied weights, ...)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    methods: List[Dict[str, Any]] = field(default_factory=list)  # one dict per stage (a config's to_dict())
    # name -> the configs (to_dict()) applied to that layer by this call, in order (prune, then quantize)
    layer_configs: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "replaced": dict(self.replaced), "rescaled": dict(self.rescaled), "skipped": dict(self.skipped),
            "notes": list(self.notes),
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "compression_ratio": self.compression_ratio, "seconds": self.seconds, "methods": self.methods,
            "layer_configs": {name: list(configs) for name, configs in self.layer_configs.items()},
        }

    def __str__(self) -> str:
        return (f"compressed {len(self.replaced)} layer(s), skipped {len(self.skipped)}: "
                f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
                f"({self.compression_ratio:.2f}x) in {self.seconds:.2f} s")


def _tied_weight_notes(model: nn.Module, swapped: Dict[str, nn.Module]) -> List[str]:
    """Warn when a replaced layer's weight was shared with a module that still uses it (tied head)."""
    owners: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    notes = []
    for name, original in swapped.items():
        for pname, param in original.named_parameters(recurse=False):
            still_used = owners.get(id(param), [])
            if still_used:
                notes.append(f"{name}.{pname} was shared with {', '.join(still_used)}; that module keeps the "
                             f"float tensor, so memory grows by the compressed copy (exclude {name!r} to avoid it)")
    return notes


def _handle(entry, cfg: MethodConfig, name: str, module: nn.Module, skipped: Dict[str, str],
            **kwargs: Any) -> Optional[nn.Module]:
    """Run one handler; any failure becomes a CompressionError naming the layer. A :class:`SkipLayer`
    is recorded in ``skipped`` and gives ``None`` (the layer stays as it is)."""
    try:
        return entry.handler(module, cfg, name=name, **kwargs)
    except SkipLayer as skip:
        skipped[name] = f"{cfg.name}: {skip.reason}"
        return None
    except Exception as exc:
        raise CompressionError(f"layer {name!r} ({cfg.name}): {exc}") from exc


def _handle_block(entry, cfg: MethodConfig, prefix: str, layers: Dict[str, nn.Module], **kwargs: Any
                  ) -> Dict[str, nn.Module]:
    """Run one block-scope handler; any failure becomes a CompressionError naming the block."""
    try:
        return entry.handler(layers, cfg, prefix=prefix, **kwargs)
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(f"{prefix or 'model'} ({cfg.name}, layers {', '.join(layers)}): {exc}") from exc


def _group_by_config(names: Sequence[str], configs: Dict[str, MethodConfig]) -> List[tuple]:
    """``[(config, [names])]``: layers sharing one resolved config (compared with ``==``), first-seen order."""
    groups: List[tuple] = []
    for name in names:
        for cfg, members in groups:
            if cfg == configs[name]:
                members.append(name)
                break
        else:
            groups.append((configs[name], [name]))
    return groups


def merged_stats_spec(configs: Sequence[MethodConfig]):
    """One :class:`~llmopt.calibration.StatsSpec` serving every config of a calibration pass: the union
    of what they ask for (a Hessian if any needs one, float64 sums if any wants them; a reduced
    ``product_dtype`` only if all agree)."""
    from ..calibration import StatsSpec

    specs = [cfg.stats_spec() if hasattr(cfg, "stats_spec") else StatsSpec() for cfg in configs]
    if not specs:
        return StatsSpec()
    first = specs[0]
    if all(spec == first for spec in specs[1:]):
        return first
    dtype = torch.float64 if any(spec.dtype == torch.float64 for spec in specs) else torch.float32
    products = {spec.product_dtype for spec in specs}
    return dataclasses.replace(first, hessian=any(spec.hessian for spec in specs), dtype=dtype,
                               product_dtype=products.pop() if len(products) == 1 else None)


def _compress_with_calibration(model: nn.Module, entry, configs: Dict[str, MethodConfig],
                               targets: Dict[str, nn.Module], calibration: Sequence[Any],
                               swapped: Dict[str, nn.Module],
                               calibration_dtype: Optional[torch.dtype] = None,
                               calibration_device: Optional[Union[str, torch.device]] = None,
                               skipped: Optional[Dict[str, str]] = None) -> set:
    """Block by block: each block's layers get statistics of the inputs the already-compressed
    previous blocks produce; targets outside the repeated blocks (e.g. ``lm_head``), or every target
    of a model without repeated blocks, come last, with statistics from one forward of the (partly
    compressed) model. Every swap is recorded for rollback.

    ``configs``: ``{layer name: config}``, all of one method (and one ``propagate``); layers may have
    different settings (per-layer overrides): one calibration pass collects the union of the
    statistics they need, a layer-scope handler gets each layer's own config, and a block-scope
    handler is called once per group of layers of the block sharing a config. Returns the names of
    the targets that were replaced."""
    from ..calibration import collect_stats, find_blocks, run_blocks, spec_for_dtype

    distinct = [cfg for cfg, _ in _group_by_config(list(configs), configs)]
    spec = merged_stats_spec(distinct)
    spec = spec_for_dtype(spec, calibration_dtype)  # bf16 calibration: bf16 products, float32 sums
    propagate = getattr(distinct[0], "propagate", "quantized")

    skipped = {} if skipped is None else skipped
    replaced: set = set()
    processed: set = set()

    def swap(new_modules: Dict[str, Optional[nn.Module]]) -> None:
        new_modules = {name: module for name, module in new_modules.items() if module is not None}
        for name, old in replace_modules(model, new_modules).items():
            swapped.setdefault(name, old)
            if name in configs:
                replaced.add(name)

    block_scope = entry.scope == "block"

    def run_block_handler(prefix: str, names: List[str], stats, sources, root: nn.Module) -> None:
        for cfg, members in _group_by_config(names, configs):
            swap(_handle_block(entry, cfg, prefix, {name: targets[name] for name in members},
                               stats={name: stats[name] for name in members}, sources=sources, root=root))

    def process_block(index: int, block: nn.Module, stats, sources=None) -> None:
        names = [name for name in stats if name in targets]
        processed.update(names)
        if block_scope:
            if names:
                run_block_handler(f"{path}.{index}" if path else str(index), names, stats, sources or {}, block)
            return
        swap({name: _handle(entry, configs[name], name, targets[name], skipped, stats=stats[name])
              for name in names})

    try:
        path, _ = find_blocks(model)
    except ValueError:
        path = None  # no repeated blocks (a plain MLP, a single layer): one pass over the model
    if path is not None:
        run_blocks(model, calibration, process_block, stats_spec=spec, include=sorted(targets),
                   trace_sources=block_scope, dtype=calibration_dtype, propagate=propagate,
                   device=calibration_device)
    rest = [name for name in targets if name not in processed]
    if rest:
        stats = collect_stats(model, calibration, spec, include=rest)
        if block_scope:
            # Outside the repeated blocks nothing is folded (no sources): scales stay on the layers.
            for name in rest:
                if name not in stats or stats[name].count == 0:
                    raise CompressionError(f"layer {name!r} ({configs[name].name}): it received no inputs during "
                                           "calibration")
            run_block_handler("", rest, stats, {}, model)
        else:
            swap({name: _handle(entry, configs[name], name, targets[name], skipped, stats=stats.get(name))
                  for name in rest})
    return replaced


ConfigLike = Union[MethodConfig, "Stage", "LoRA"]


def _as_stages(config: Any) -> List["Stage"]:
    """Normalise ``compress_``'s ``config`` argument to a validated list of stages."""
    from ..methods.lowrank.lora import LoRA
    from .recipe import Recipe, Stage

    if isinstance(config, Recipe):
        return list(config.stages)
    if isinstance(config, (MethodConfig, LoRA, Stage)):
        items = [config]
    elif isinstance(config, (list, tuple)):
        items = list(config)
    else:
        raise TypeError(f"expected a method config (e.g. llmopt.RTN(...)), a list of them, a Stage or a Recipe, "
                        f"got {config!r}")
    if not items:
        raise ValueError("compress_ needs at least one method config")
    stages = []
    for item in items:
        if isinstance(item, Stage):
            stages.append(item)
        elif isinstance(item, (MethodConfig, LoRA)):
            stages.append(Stage(item))  # an unregistered method: ValueError naming the registered ones
        else:
            raise TypeError(f"expected a method config (e.g. llmopt.RTN(...)) or a Stage, got {item!r}")
    Recipe(stages)  # ordering rules (LoRA stages last)
    return stages


def _stage_configs(stage: "Stage") -> List[Any]:
    """The stage's config and every whole config its overrides can resolve to."""
    out = [stage.config]
    for value in stage.overrides.values():
        resolved = stage.resolve(value)
        if resolved is not None:
            out.append(resolved)
    return out


def _merged_globs(stage: "Stage", include: Patterns, exclude: Patterns) -> "tuple[Optional[List[str]], Optional[List[str]], List[str]]":
    """``(include, exclude, call_include)`` for a stage inside a ``compress_`` call: the stage's include
    (else the call's), both excludes; ``call_include`` must also pass when the stage has its own include."""
    call_include = _as_list(include)
    excludes = list(stage.exclude or []) + _as_list(exclude)
    return (stage.include if stage.include else (call_include or None)), (excludes or None), call_include


def _select_for_stage(model: nn.Module, stage: "Stage", include: Patterns, exclude: Patterns,
                      select=select_linears, **kwargs: Any) -> "tuple[Dict[str, nn.Module], Dict[str, str]]":
    """``select(model, include, exclude, **kwargs)`` with the stage's globs and the call's (a layer must pass both)."""
    first_include, excludes, call_include = _merged_globs(stage, include, exclude)
    selected, skipped = select(model, first_include, excludes, **kwargs)
    if stage.include and call_include:
        selected = {n: m for n, m in selected.items() if _matches(n, call_include)}
        skipped = {n: r for n, r in skipped.items() if _matches(n, call_include)}
    return selected, skipped


def _effective_stage(stage: "Stage", include: Patterns, exclude: Patterns) -> "Stage":
    """The stage with the call's include/exclude folded in (what is recorded on the model)."""
    from .recipe import Stage

    if include is None and exclude is None:
        return stage
    first_include, excludes, _ = _merged_globs(stage, include, exclude)
    return Stage(stage.config, include=first_include, exclude=excludes, overrides=dict(stage.overrides))


def _record_recipe(model: nn.Module, stages: List["Stage"]) -> None:
    """Append the applied stages to ``model._llmopt_recipe`` (a recipe dict that savers can store;
    overrides in their ordered list form, which survives key-sorting JSON writers)."""
    previous = getattr(model, "_llmopt_recipe", None)
    recorded = list(previous.get("stages", [])) if isinstance(previous, dict) else []
    recorded.extend(stage.to_dict(ordered_overrides=True) for stage in stages)
    model.__dict__["_llmopt_recipe"] = {"stages": recorded}


def compress_(
    model: nn.Module,
    config: Union[ConfigLike, Sequence[ConfigLike], "Recipe"],
    *,
    calibration: Optional[Sequence[Any]] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    calibration_dtype: Optional[torch.dtype] = None,
    calibration_device: Optional[Union[str, torch.device]] = None,
) -> CompressionReport:
    """Compress the targeted ``nn.Linear`` layers of ``model`` in place; all or nothing.

    ``config`` is one method config, a :class:`~llmopt.Stage`, a :class:`~llmopt.Recipe`, or a list
    of configs and stages applied in order (a :class:`~llmopt.LoRA` config / stage adds adapters, after
    every compression stage). ``include``/``exclude`` are glob patterns on module names, applied to
    every stage on top of the stage's own (a layer must pass both). If any layer fails, every
    replacement made by this call (adapters included) is undone and a :class:`CompressionError` names
    the layer and the problem.

    Per-layer overrides of a stage (``Stage.overrides``) that keep the stage's method run in the same
    pass: one calibration pass (statistics: the union of what the configs need), each layer handled
    with its own config (block-scope methods: one handler call per group of a block's layers sharing
    a config). Overrides naming another method (or another ``propagate`` / calibration need) run as
    their own pass right after, on exactly the layers they match. A ``None``/``"skip"`` override
    leaves the layer alone and is listed in ``report.skipped``. ``report.methods`` has one entry per
    stage, ``report.layer_configs`` the configs each replaced layer got. The applied stages are
    recorded on the model as ``model._llmopt_recipe`` (a recipe dict).

    ``calibration_dtype`` (e.g. ``torch.bfloat16``): run the calibration forwards in that dtype on a
    temporary copy of each block (much faster on CPUs with bf16; the model's weights are not cast).
    ``calibration_device`` (e.g. ``"cuda"``): move each block there for its turn and back afterwards,
    so a model larger than the device's memory can be calibrated on it.
    """
    if calibration_dtype is not None and not (isinstance(calibration_dtype, torch.dtype)
                                              and calibration_dtype.is_floating_point):
        raise ValueError(f"calibration_dtype must be a floating torch dtype or None, got {calibration_dtype!r}")
    stages = _as_stages(config)
    for index, stage in enumerate(stages):
        for cfg in _stage_configs(stage):
            if isinstance(cfg, MethodConfig):
                get_method(cfg)
                if cfg.needs_calibration and not calibration:
                    where = f" (stage {index})" if len(stages) > 1 else ""
                    raise ValueError(f"method {cfg.name!r}{where} needs calibration data; pass calibration=[...]")
    if include is not None:
        select_linears(model, include)  # an include glob matching no module is an error, before any work

    report = CompressionReport()
    start = time.perf_counter()
    swapped: Dict[str, nn.Module] = {}  # name -> original module, for rollback across stages
    targeted: set = set()  # names of the linears the methods were asked to compress
    flags = [(p, p.requires_grad) for p in model.parameters()]  # add_lora_ freezes the base
    try:
        for index, stage in enumerate(stages):
            if stage.is_lora:
                _apply_lora_stage(model, stage, index, include, exclude, swapped, targeted, report)
            else:
                _apply_stage(model, stage, index, include, exclude, calibration, swapped, targeted, report,
                             calibration_dtype, calibration_device)
            report.methods.append(stage.to_dict())
    except BaseException:
        restore_modules(model, swapped)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    _record_recipe(model, [_effective_stage(stage, include, exclude) for stage in stages])
    report.seconds = time.perf_counter() - start
    report.notes.extend(_tied_weight_notes(model, swapped))
    for name, original in swapped.items():
        new = get_submodule(model, name)
        if name not in targeted:
            report.rescaled[name] = repr(new)
            continue
        report.replaced[name] = repr(new)
        if any(name.startswith(outer + ".") for outer in swapped):
            continue  # inside a layer replaced earlier in this call (SVD then RTN): counted with it
        report.bytes_before += memory_report(original).stored_bytes
        report.bytes_after += memory_report(new).stored_bytes
    return report


def _note_unused_overrides(stage: "Stage", index: int, names: List[str], report: CompressionReport) -> None:
    """A note for each override glob that matches none of the stage's layers (a typo does nothing)."""
    unused = [glob for glob in stage.overrides if not any(_matches(name, [glob]) for name in names)]
    if unused:
        report.notes.append(f"stage {index} ({stage.config.name}): override(s) {', '.join(map(repr, unused))} "
                            "matched none of the stage's layers")


def _resolve_layer(stage: "Stage", index: int, name: str, report: CompressionReport) -> Optional[Any]:
    """The layer's config in this stage (first matching override, else the stage's); ``None`` when an
    override skips it, recorded in ``report.skipped``."""
    hit = stage.match(name)
    layer_cfg = stage.config if hit is None else stage.resolve(hit[1])
    if layer_cfg is None:
        report.skipped[name] = f"stage {index} ({stage.config.name}): skipped by override {hit[0]!r}"
    return layer_cfg


def _apply_stage(model: nn.Module, stage: "Stage", index: int, include: Patterns, exclude: Patterns,
                 calibration, swapped: Dict[str, nn.Module], targeted: set, report: CompressionReport,
                 calibration_dtype, calibration_device) -> None:
    """One compression stage: select, resolve each layer's config, run one pass per method group."""
    cfg = stage.config
    configs = _stage_configs(stage)

    def accept(module: nn.Module) -> bool:
        return any(c.accepts_compressed(module) for c in configs if hasattr(c, "accepts_compressed"))

    has_accept = any(hasattr(c, "accepts_compressed") for c in configs)
    targets, skipped = _select_for_stage(model, stage, include, exclude, accept=accept if has_accept else None)
    for name, reason in skipped.items():
        if name not in swapped:
            report.skipped[name] = reason
    earlier = [name for name in skipped if name in swapped]
    if earlier:
        kinds = sorted({type(get_submodule(model, name)).__name__ for name in earlier})
        report.notes.append(f"stage {index} ({cfg.name}): {len(earlier)} layer(s) replaced by an earlier stage "
                            f"({', '.join(kinds)}) were left as they are: {cfg.name} does not compose with them")
    if not targets and not skipped:
        shown_include = stage.include if stage.include else include
        shown_exclude = (list(stage.exclude or []) + _as_list(exclude)) if stage.exclude else exclude
        raise ValueError(f"method {cfg.name!r}: no uncompressed nn.Linear matches include={shown_include!r} "
                         f"exclude={shown_exclude!r}")

    # Resolve every layer's config; one pass per (method, calibration need, propagate), the stage's first.
    def key(c: MethodConfig) -> tuple:
        return (c.name, bool(c.needs_calibration), getattr(c, "propagate", None))

    _note_unused_overrides(stage, index, list(targets) + list(skipped), report)
    passes: Dict[tuple, Dict[str, MethodConfig]] = {key(cfg): {}}
    for name, module in targets.items():
        layer_cfg = _resolve_layer(stage, index, name, report)
        if layer_cfg is None:
            continue
        if is_compressed(module) and not (hasattr(layer_cfg, "accepts_compressed")
                                          and layer_cfg.accepts_compressed(module)):
            if name not in swapped:
                report.skipped[name] = f"already compressed ({type(module).__name__})"
            continue
        passes.setdefault(key(layer_cfg), {})[name] = layer_cfg
    for layer_configs in passes.values():
        if not layer_configs:
            continue
        entry = get_method(next(iter(layer_configs.values())))
        pass_targets = {name: get_submodule(model, name) for name in layer_configs}
        targeted.update(pass_targets)
        if next(iter(layer_configs.values())).needs_calibration:
            done = _compress_with_calibration(model, entry, layer_configs, pass_targets, calibration, swapped,
                                              calibration_dtype, calibration_device, report.skipped)
        else:
            new_modules = {name: _handle(entry, layer_configs[name], name, module, report.skipped)
                           for name, module in pass_targets.items()}
            new_modules = {name: module for name, module in new_modules.items() if module is not None}
            for name, old in replace_modules(model, new_modules).items():
                swapped.setdefault(name, old)
            done = set(new_modules)
        for name in pass_targets:
            if name in done:
                report.layer_configs.setdefault(name, []).append(layer_configs[name].to_dict())


def _apply_lora_stage(model: nn.Module, stage: "Stage", index: int, include: Patterns, exclude: Patterns,
                      swapped: Dict[str, nn.Module], targeted: set, report: CompressionReport) -> None:
    """A LoRA stage: ``add_lora_`` once per group of layers sharing a resolved LoRA config."""
    from ..methods.lowrank.lora import _lora_targets, add_lora_, trainable_parameters

    targets, skipped = _select_for_stage(model, stage, include, exclude, select=_lora_targets)
    report.skipped.update(skipped)
    if not targets and not skipped:
        _, excludes, _ = _merged_globs(stage, include, exclude)
        raise ValueError(f"lora (stage {index}): no linear layer matches include={stage.include or include!r} "
                         f"exclude={excludes or []!r}")
    _note_unused_overrides(stage, index, list(targets) + list(skipped), report)
    resolved = {name: cfg for name in targets if (cfg := _resolve_layer(stage, index, name, report)) is not None}
    for layer_cfg, names in _group_by_config(list(resolved), resolved):
        before = {name: get_submodule(model, name) for name in names}
        lora_report = add_lora_(model, layer_cfg, include=[glob.escape(name) for name in names])
        for name in lora_report.replaced:
            swapped.setdefault(name, before[name])
            targeted.add(name)
            report.layer_configs.setdefault(name, []).append(layer_cfg.to_dict())
    if resolved:
        report.notes.append(f"stage {index} (lora): {len(resolved)} layer(s) got adapters; trainable parameters "
                            f"{trainable_parameters(model):,}")
