"""The one entry point: ``compress_``.

Every technique (quantization, low rank, pruning, structured pruning, LoRA adapters, QAT) is a
registered :class:`~llmopt.methods.base.MethodConfig`; ``compress_`` applies any of them, alone, in a
list or in a :class:`~llmopt.Recipe`, reading only what the configs declare (scope, targets,
calibration needs, the model-level step after a stage). It knows no method by name.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from ..calibration import StatsSpec, check_calibration_data, collect_stats, find_blocks, run_blocks, spec_for_dtype
from ..core.errors import CompressionError, SkipLayer
from ..core.measure import memory_report, total_parameters, trainable_parameters
from ..core.scheme import WeightQuant
from ..kernels import list_kernels
from ..core.targets import (
    RESIZED_ATTR,
    Patterns,
    _as_list,
    _matches,
    get_submodule,
    is_compressed,
    replace_modules,
    requires_grad_flags,
    restore_requires_grad,
    select_linears,
)
from ..methods.base import MethodConfig, MethodEntry, ModelEdit, get_method
from ..nn.quant_embedding import QuantEmbedding
from ..nn.quant_linear import QuantLinear
from .recipe import Recipe, Stage
from .report import CompressionReport, tied_weight_notes

__all__ = ["compress_", "CompressionReport", "CompressionError", "SkipLayer", "merged_stats_spec"]

_MISSING = object()


class _Changes:
    """Every change ``compress_`` makes to the model, in order, so a failure can undo all of them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.swapped: Dict[str, nn.Module] = {}  # name -> the module there before this call
        self._log: List[Callable[[], None]] = []  # undo steps, run in reverse

    def replace(self, new_modules: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
        """Swap modules in; returns ``{name: old}``."""
        old = replace_modules(self.model, new_modules)
        for name, module in old.items():
            self.swapped.setdefault(name, module)
            self._log.append(lambda n=name, m=module: replace_modules(self.model, {n: m}))
        return old

    def set_attr(self, obj: Any, attr: str, value: Any) -> None:
        previous = getattr(obj, attr, _MISSING)
        setattr(obj, attr, value)
        self._log.append(lambda: delattr(obj, attr) if previous is _MISSING else setattr(obj, attr, previous))

    def undo(self) -> None:
        for step in reversed(self._log):
            step()
        self._log.clear()


def _module_home(module: nn.Module) -> Optional[torch.device]:
    """Device of a module's first parameter or buffer (``None`` when it has no tensors)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def _handle(entry: MethodEntry, cfg: MethodConfig, name: str, module: nn.Module, skipped: Dict[str, str],
            **kwargs: Any) -> Optional[nn.Module]:
    """Run one layer handler. A :class:`SkipLayer` is recorded in ``skipped`` and gives ``None`` (the layer
    stays as it is); a :class:`CompressionError` (which names the layer) passes as is; any other failure
    becomes a CompressionError naming the layer."""
    try:
        return entry.handler(module, cfg, name=name, **kwargs)
    except SkipLayer as skip:
        skipped[name] = f"{cfg.name}: {skip.reason}"
        return None
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(f"layer {name!r} ({cfg.name}): {exc}") from exc


def _handle_block(entry: MethodEntry, cfg: MethodConfig, prefix: str, layers: Dict[str, nn.Module],
                  **kwargs: Any) -> Dict[str, nn.Module]:
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


def merged_stats_spec(configs: Sequence[MethodConfig]) -> StatsSpec:
    """One :class:`~llmopt.calibration.StatsSpec` serving every config of a calibration pass: the union
    of what they ask for (a Hessian if any needs one, float64 sums if any wants them; a reduced
    ``product_dtype`` only if all agree)."""
    specs = [cfg.stats_spec() for cfg in configs]
    if not specs:
        return StatsSpec()
    first = specs[0]
    if all(spec == first for spec in specs[1:]):
        return first
    dtype = torch.float64 if any(spec.dtype == torch.float64 for spec in specs) else torch.float32
    products = {spec.product_dtype for spec in specs}
    return dataclasses.replace(first, hessian=any(spec.hessian for spec in specs), dtype=dtype,
                               product_dtype=products.pop() if len(products) == 1 else None)


def _compress_with_calibration(model: nn.Module, entry: MethodEntry, configs: Dict[str, MethodConfig],
                               targets: Dict[str, nn.Module], calibration: Sequence[Any], changes: _Changes,
                               calibration_dtype: Optional[torch.dtype] = None,
                               calibration_device: Optional[Union[str, torch.device]] = None,
                               skipped: Optional[Dict[str, str]] = None) -> Set[str]:
    """Block by block: each block's layers get statistics of the inputs the already-compressed
    previous blocks produce; targets outside the repeated blocks (e.g. ``lm_head``), or every target
    of a model without repeated blocks, come last, with statistics from one forward of the (partly
    compressed) model. Every swap is recorded for rollback.

    ``configs``: ``{layer name: config}``, all of one method (and one ``propagate``); layers may have
    different settings (per-layer overrides): one calibration pass collects the union of the
    statistics they need, a layer-scope handler gets each layer's own config, and a block-scope
    handler is called once per group of layers of the block sharing a config. Returns the names of
    the targets that were replaced."""
    distinct = [cfg for cfg, _ in _group_by_config(list(configs), configs)]
    spec = merged_stats_spec(distinct)
    spec = spec_for_dtype(spec, calibration_dtype)  # bf16 calibration: bf16 products, float32 sums
    propagate = distinct[0].propagate
    # Layers of one stage share the method; a training method's teacher is the first config's.
    block_io = distinct[0].block_io if entry.scope == "block" else None

    skipped = {} if skipped is None else skipped
    replaced: Set[str] = set()
    processed: Set[str] = set()
    # With calibration_device, a block's layers are swapped out while the block sits on that device,
    # and ``run_blocks`` then moves only the block (now holding the new layers) back. The originals,
    # kept for a rollback, would stay on the device: every block's worth of memory there, and a
    # rollback would put device modules into the model. They are sent home once their block is, not
    # at the swap: a replacement may hold the original as a submodule (a wrapper around its base), and
    # that must stay on the device while the block still runs there.
    homes = {name: _module_home(module) for name, module in targets.items()} if calibration_device else {}
    pending: List[Tuple[nn.Module, torch.device]] = []

    def send_originals_home() -> None:
        while pending:
            module, home = pending.pop()
            module.to(home)

    def swap(new_modules: Dict[str, Optional[nn.Module]]) -> None:
        new_modules = {name: module for name, module in new_modules.items() if module is not None}
        for name, old in changes.replace(new_modules).items():
            if name in configs:
                replaced.add(name)
            if homes.get(name) is not None:
                pending.append((old, homes[name]))

    block_scope = entry.scope == "block"

    def run_block_handler(prefix: str, names: List[str], stats, sources, root: nn.Module, io=None) -> None:
        extra = {"io": io} if block_io is not None else {}
        for cfg, members in _group_by_config(names, configs):
            swap(_handle_block(entry, cfg, prefix, {name: targets[name] for name in members},
                               stats={name: stats[name] for name in members}, sources=sources, root=root,
                               **extra))

    def process_block(index: int, block: nn.Module, stats, sources=None, io=None) -> None:
        send_originals_home()  # the previous block is home by now
        names = [name for name in stats if name in targets]
        processed.update(names)
        if block_scope:
            if names:
                run_block_handler(f"{path}.{index}" if path else str(index), names, stats, sources or {}, block,
                                  io)
            return
        swap({name: _handle(entry, configs[name], name, targets[name], skipped, stats=stats[name])
              for name in names})

    try:
        path, _ = find_blocks(model)
    except ValueError:
        path = None  # no repeated blocks (a plain MLP, a single layer): one pass over the model
    if path is not None:
        try:
            run_blocks(model, calibration, process_block, stats_spec=spec, include=sorted(targets),
                       trace_sources=block_scope, dtype=calibration_dtype, propagate=propagate,
                       device=calibration_device, block_io=block_io)
        finally:
            send_originals_home()  # run_blocks has moved the last (or failed) block back already
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


ConfigLike = Union[MethodConfig, Stage]


def _as_stages(config: Any, allow_empty: bool = False) -> List[Stage]:
    """Normalise ``compress_``'s ``config`` argument to a validated list of stages (``allow_empty``: ``None``
    or ``[]`` give no stages, for a call that only quantizes embeddings)."""
    if isinstance(config, Recipe):
        return list(config.stages)
    if allow_empty and (config is None or (isinstance(config, (list, tuple)) and not config)):
        return []
    if isinstance(config, (MethodConfig, Stage)):
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
        elif isinstance(item, MethodConfig):
            stages.append(Stage(item))  # an unregistered method: ValueError naming the registered ones
        else:
            raise TypeError(f"expected a method config (e.g. llmopt.RTN(...)) or a Stage, got {item!r}")
    Recipe(stages)  # the ordering rules (adapter stages last)
    return stages


EmbeddingsLike = Union[WeightQuant, str, Dict[str, Any], None]


def _as_embedding_scheme(embeddings: EmbeddingsLike, config: Any) -> Optional[WeightQuant]:
    """``compress_``'s ``embeddings`` argument (or the recipe's) as a checked :class:`WeightQuant`, or None."""
    from_recipe = config.embeddings if isinstance(config, Recipe) else None
    if isinstance(embeddings, str):
        embeddings = WeightQuant(embeddings)
    elif isinstance(embeddings, dict):
        embeddings = WeightQuant.from_dict(embeddings)
    elif embeddings is not None and not isinstance(embeddings, WeightQuant):
        raise TypeError(f"embeddings must be a WeightQuant (e.g. llmopt.WeightQuant('int4', 64)), a format name, "
                        f"a dict or None, got {embeddings!r}")
    if embeddings is not None and from_recipe is not None and embeddings != from_recipe:
        raise ValueError(f"embeddings={embeddings.label()!r} differs from the recipe's embeddings "
                         f"({from_recipe.label()!r}): give one")
    scheme = embeddings if embeddings is not None else from_recipe
    if scheme is not None and scheme.kernel != "auto" and scheme.kernel not in list_kernels():
        raise ValueError(f"embeddings: unknown kernel {scheme.kernel!r}; use 'auto' or one of {list_kernels()}")
    return scheme


def _merged_globs(stage: Stage, include: Patterns, exclude: Patterns
                  ) -> Tuple[Optional[List[str]], Optional[List[str]], List[str]]:
    """``(include, exclude, call_include)`` for a stage inside a ``compress_`` call: the stage's include
    (else the call's), both excludes; ``call_include`` must also pass when the stage has its own include."""
    call_include = _as_list(include)
    excludes = list(stage.exclude or []) + _as_list(exclude)
    return (stage.include if stage.include else (call_include or None)), (excludes or None), call_include


def _select_for_stage(model: nn.Module, stage: Stage, include: Patterns, exclude: Patterns,
                      accept: Optional[Callable[[nn.Module], bool]] = None
                      ) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
    """The stage config's :meth:`~MethodConfig.select_targets` with the stage's globs and the call's (a
    layer must pass both)."""
    first_include, excludes, call_include = _merged_globs(stage, include, exclude)
    selected, skipped = stage.config.select_targets(model, first_include, excludes, accept)
    if stage.include and call_include:
        selected = {n: m for n, m in selected.items() if _matches(n, call_include)}
        skipped = {n: r for n, r in skipped.items() if _matches(n, call_include)}
    tables = _embedding_tables(model)
    if tables:
        skipped = {n: r for n, r in skipped.items() if not _matches(n, tables)}
    return selected, skipped


def _embedding_tables(model: nn.Module) -> List[str]:
    """Names of the model's quantized embeddings: never a method's target, so not listed as skipped."""
    return [name for name, module in model.named_modules() if isinstance(module, QuantEmbedding)]


def _no_targets(stage: Stage, include: Patterns, exclude: Patterns) -> ValueError:
    shown_include = stage.include if stage.include else include
    shown_exclude = (list(stage.exclude or []) + _as_list(exclude)) if stage.exclude else exclude
    cfg = stage.config
    return ValueError(f"method {cfg.name!r}: no {cfg.describe_targets()} matches include={shown_include!r} "
                      f"exclude={shown_exclude!r}")


def _effective_stage(stage: Stage, include: Patterns, exclude: Patterns) -> Stage:
    """The stage with the call's include/exclude folded in (what is recorded on the model)."""
    if include is None and exclude is None:
        return stage
    first_include, excludes, _ = _merged_globs(stage, include, exclude)
    return Stage(stage.config, include=first_include, exclude=excludes, overrides=dict(stage.overrides))


def _record_recipe(model: nn.Module, stages: List[Stage], embeddings: Optional[WeightQuant] = None) -> None:
    """Append the applied stages to ``model._llmopt_recipe`` (a recipe dict that savers can store;
    overrides in their ordered list form, which survives key-sorting JSON writers), and the embedding
    scheme when this call quantized embeddings."""
    previous = getattr(model, "_llmopt_recipe", None)
    recorded = list(previous.get("stages", [])) if isinstance(previous, dict) else []
    recorded.extend(stage.to_dict(ordered_overrides=True) for stage in stages)
    record: Dict[str, Any] = {"stages": recorded}
    old_embeddings = previous.get("embeddings") if isinstance(previous, dict) else None
    if embeddings is not None or old_embeddings is not None:
        record["embeddings"] = embeddings.to_dict() if embeddings is not None else old_embeddings
    model.__dict__["_llmopt_recipe"] = record


def compress_(
    model: nn.Module,
    config: Union[ConfigLike, Sequence[ConfigLike], Recipe],
    *,
    calibration: Optional[Sequence[Any]] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    calibration_dtype: Optional[torch.dtype] = None,
    calibration_device: Optional[Union[str, torch.device]] = None,
    embeddings: EmbeddingsLike = None,
) -> CompressionReport:
    """Apply method configs to ``model`` in place; all or nothing.

    ``config`` is one method config (``RTN(...)``, ``GPTQ(...)``, ``LoRA(...)``, ``QAT(...)``,
    ``PruneChannels(...)``, any registered method), a :class:`~llmopt.Stage`, a
    :class:`~llmopt.Recipe`, or a list of configs and stages applied in order (stages of methods that
    add adapters, such as LoRA, come after every compression stage). ``include``/``exclude`` are
    glob patterns on module names, applied to every stage on top of the stage's own (a layer must
    pass both). If anything fails, every change made by this call (module swaps, attributes and
    config values a model-scope method set, ``requires_grad`` flags) is undone, and a
    :class:`CompressionError` names the layer and the problem (a model-scope method's ``ValueError``
    about the model is passed on as is).

    Per-layer overrides of a stage (``Stage.overrides``) that keep the stage's method run in the same
    pass: one calibration pass (statistics: the union of what the configs need), each layer handled
    with its own config (block-scope methods: one handler call per group of a block's layers sharing
    a config). Overrides naming another method (or another ``propagate`` / calibration need) run as
    their own pass right after, on exactly the layers they match. A ``None``/``"skip"`` override
    leaves the layer alone and is listed in ``report.skipped``. ``report.methods`` has one entry per
    stage, ``report.layer_configs`` the configs each replaced layer got, ``report.details`` each
    stage's own summary (or ``None``). The applied stages are recorded on the model as
    ``model._llmopt_recipe`` (a recipe dict).

    ``calibration_dtype`` (e.g. ``torch.bfloat16``): run the calibration forwards in that dtype on a
    temporary copy of each block (much faster on CPUs with bf16; the model's weights are not cast).
    ``calibration_device`` (e.g. ``"cuda"``): move each block there for its turn and back afterwards,
    so a model larger than the device's memory can be calibrated on it.

    ``embeddings`` (a :class:`~llmopt.WeightQuant`, a format name such as ``"int4"``, or its dict; or
    a recipe's ``embeddings``): also quantize the model's ``nn.Embedding`` tables by round to nearest,
    row by row, into :class:`~llmopt.nn.QuantEmbedding` s, *before* the first stage. ``None`` (the
    default) leaves embeddings as they are. Every plain ``nn.Embedding`` not matched by ``exclude`` is
    quantized (``include`` selects the stages' layers, not embeddings). A ``Linear`` whose weight is
    the embedding's very tensor (a tied ``lm_head``) becomes the embedding's own ``QuantLinear``: one
    packed table serves the lookup and the head's matmul, so the stages skip that head as already
    compressed. An embedding is left alone, with the reason in ``report.skipped``, when its tensor is
    shared with an excluded layer or a module that is not a Linear, or when it is an ``nn.Embedding``
    subclass (its forward may do more than look rows up). ``config`` may then be ``None``.
    """
    if calibration_dtype is not None and not (isinstance(calibration_dtype, torch.dtype)
                                              and calibration_dtype.is_floating_point):
        raise ValueError(f"calibration_dtype must be a floating torch dtype or None, got {calibration_dtype!r}")
    embedding_scheme = _as_embedding_scheme(embeddings, config)
    stages = _as_stages(config, allow_empty=embedding_scheme is not None)
    for index, stage in enumerate(stages):
        for cfg in stage.configs():
            get_method(cfg)
            if cfg.needs_calibration:
                where = f" (stage {index})" if len(stages) > 1 else ""
                if calibration is None or (isinstance(calibration, (list, tuple)) and not calibration):
                    raise ValueError(f"method {cfg.name!r}{where} needs calibration data; "
                                     f"pass calibration=[...]")
                # A bare tensor or dict: "wrap it in a list" (truth-testing a tensor would raise
                # "Boolean value of Tensor ... is ambiguous").
                check_calibration_data(calibration)
    if include is not None:
        select_linears(model, include)  # an include glob matching no module is an error, before any work

    report = CompressionReport()
    start = time.perf_counter()
    changes = _Changes(model)
    targeted: Set[str] = set()  # names of the modules the methods were asked to change
    flags = requires_grad_flags(model)  # an after_stage step may freeze them
    try:
        if embedding_scheme is not None:
            # First, so that a tied head becomes the embedding's table before any stage compresses it alone.
            targeted.update(_quantize_embeddings(model, embedding_scheme, exclude, changes, report))
        for index, stage in enumerate(stages):
            if stage.config.SCOPE == "model":
                done, details = _apply_model_stage(model, stage, index, include, exclude, calibration, changes,
                                                   report, calibration_dtype, calibration_device)
            else:
                done = _apply_stage(model, stage, index, include, exclude, calibration, changes, report,
                                    calibration_dtype, calibration_device)
                details = None
            targeted.update(done)
            notes = stage.config.after_stage(model, {name: get_submodule(model, name) for name in done})
            report.notes.extend(f"stage {index} ({stage.config.name}): {note}" for note in notes)
            report.methods.append(stage.to_dict())
            report.details.append(details)
    except BaseException:
        changes.undo()
        restore_requires_grad(flags)
        raise
    _record_recipe(model, [_effective_stage(stage, include, exclude) for stage in stages], embedding_scheme)
    report.seconds = time.perf_counter() - start
    report.notes.extend(tied_weight_notes(model, changes.swapped))
    before: List[nn.Module] = []
    after: List[nn.Module] = []
    for name, original in changes.swapped.items():
        new = get_submodule(model, name)
        if name not in targeted:
            report.rescaled[name] = repr(new)
            continue
        report.replaced[name] = repr(new)
        if any(name.startswith(outer + ".") for outer in changes.swapped):
            continue  # inside a layer replaced earlier in this call (SVD then RTN): counted with it
        before.append(original)
        after.append(new)
    if before:
        # Measured together, so a tensor shared by several of them (a tied embedding and head, before
        # and after) is counted once.
        report.bytes_before = memory_report(nn.ModuleList(before)).stored_bytes
        report.bytes_after = memory_report(nn.ModuleList(after)).stored_bytes
    report.trainable_parameters = trainable_parameters(model)
    report.total_parameters = total_parameters(model)
    return report


def _note_unused_overrides(stage: Stage, index: int, names: List[str], report: CompressionReport) -> None:
    """A note for each override glob that matches none of the stage's layers (a typo does nothing)."""
    unused = [glob for glob in stage.overrides if not any(_matches(name, [glob]) for name in names)]
    if unused:
        report.notes.append(f"stage {index} ({stage.config.name}): override(s) {', '.join(map(repr, unused))} "
                            "matched none of the stage's layers")


def _note_override_cannot_apply(stage: Stage, index: int, name: str, module: nn.Module,
                                report: CompressionReport) -> None:
    """An override naming a layer an earlier stage of this call replaced with a wrapper its method does not
    compose with (an ``SVD`` override on a layer Wanda made sparse) would do nothing: list it in
    ``report.skipped`` with why, rather than drop the user's explicit request silently."""
    hit = stage.match(name)
    cfg = stage.resolve(hit[1]) if hit is not None else None
    if cfg is None or cfg.accepts_compressed(module):
        return
    applied = [c.get("method", "?") for c in report.layer_configs.get(name, [])]
    origin = f" by an earlier stage ({', '.join(applied)})" if applied else " by an earlier stage"
    reason = (f"stage {index} ({stage.config.name}): override {hit[0]!r} ({cfg.name}) cannot apply: the layer "
              f"was replaced{origin} with a {type(module).__name__}, which {cfg.name} does not compose with; "
              f"left as that stage made it")
    report.skipped[name] = f"{report.skipped[name]}; {reason}" if name in report.skipped else reason


def _resolve_layer(stage: Stage, index: int, name: str, report: CompressionReport) -> Optional[MethodConfig]:
    """The layer's config in this stage (first matching override, else the stage's); ``None`` when an
    override skips it, recorded in ``report.skipped``."""
    hit = stage.match(name)
    layer_cfg = stage.config if hit is None else stage.resolve(hit[1])
    if layer_cfg is None:
        report.skipped[name] = f"stage {index} ({stage.config.name}): skipped by override {hit[0]!r}"
    return layer_cfg


def _apply_stage(model: nn.Module, stage: Stage, index: int, include: Patterns, exclude: Patterns,
                 calibration, changes: _Changes, report: CompressionReport, calibration_dtype,
                 calibration_device) -> Set[str]:
    """One layer- or block-scope stage: select, resolve each layer's config, run one pass per method
    group. Returns the names of the targets it replaced."""
    cfg = stage.config
    configs = stage.configs()

    def accept(module: nn.Module) -> bool:  # wrappers any config of the stage composes with
        return any(c.accepts_compressed(module) for c in configs)

    targets, skipped = _select_for_stage(model, stage, include, exclude, accept)
    for name, reason in skipped.items():
        if name not in changes.swapped:
            report.skipped[name] = reason
    earlier = [name for name in skipped if name in changes.swapped]
    for name in earlier:
        _note_override_cannot_apply(stage, index, name, get_submodule(model, name), report)
    if earlier:
        kinds = sorted({type(get_submodule(model, name)).__name__ for name in earlier})
        report.notes.append(f"stage {index} ({cfg.name}): {len(earlier)} layer(s) replaced by an earlier stage "
                            f"({', '.join(kinds)}) were left as they are: {cfg.name} does not compose with them")
    if not targets and not skipped:
        raise _no_targets(stage, include, exclude)

    # Resolve every layer's config; one pass per (method, calibration need, propagate), the stage's first.
    def key(c: MethodConfig) -> tuple:
        return (c.name, bool(c.needs_calibration), c.propagate)

    _note_unused_overrides(stage, index, list(targets) + list(skipped), report)
    passes: Dict[tuple, Dict[str, MethodConfig]] = {key(cfg): {}}
    for name, module in targets.items():
        layer_cfg = _resolve_layer(stage, index, name, report)
        if layer_cfg is None:
            continue
        if is_compressed(module) and not layer_cfg.accepts_compressed(module):
            if name not in changes.swapped:
                report.skipped[name] = f"already compressed ({type(module).__name__})"
            else:  # replaced by an earlier stage of this call: an override of this stage cannot apply
                _note_override_cannot_apply(stage, index, name, module, report)
            continue
        passes.setdefault(key(layer_cfg), {})[name] = layer_cfg
    replaced: Set[str] = set()
    for layer_configs in passes.values():
        if not layer_configs:
            continue
        entry = get_method(next(iter(layer_configs.values())))
        pass_targets = {name: get_submodule(model, name) for name in layer_configs}
        if next(iter(layer_configs.values())).needs_calibration:
            done = _compress_with_calibration(model, entry, layer_configs, pass_targets, calibration, changes,
                                              calibration_dtype, calibration_device, report.skipped)
        else:
            new_modules = {name: _handle(entry, layer_configs[name], name, module, report.skipped)
                           for name, module in pass_targets.items()}
            new_modules = {name: module for name, module in new_modules.items() if module is not None}
            changes.replace(new_modules)
            done = set(new_modules)
        for name in pass_targets:
            if name in done:
                report.layer_configs.setdefault(name, []).append(layer_configs[name].to_dict())
        replaced.update(name for name in pass_targets if name in done)
    return replaced


def _apply_model_stage(model: nn.Module, stage: Stage, index: int, include: Patterns, exclude: Patterns,
                       calibration, changes: _Changes, report: CompressionReport, calibration_dtype,
                       calibration_device) -> Tuple[Set[str], Any]:
    """One model-scope stage: the handler plans a :class:`ModelEdit` from the whole model and its
    targets; it is applied here (and recorded for ``llmopt.save``), so a failure undoes it. Returns
    the names of the replaced modules and the method's own summary."""
    cfg = stage.config
    entry = get_method(cfg)
    targets, skipped = _select_for_stage(model, stage, include, exclude)
    for name, reason in skipped.items():
        if name not in changes.swapped:
            report.skipped[name] = reason
    if not targets:
        raise _no_targets(stage, include, exclude)
    try:
        edit = entry.handler(model, cfg, targets=targets, calibration=calibration if cfg.needs_calibration else None,
                             calibration_dtype=calibration_dtype, calibration_device=calibration_device)
    except (CompressionError, ValueError, TypeError):
        raise  # the model is untouched (the handler only plans); these name the problem themselves
    except Exception as exc:
        raise CompressionError(f"{cfg.name} (stage {index}): {exc}") from exc
    if not isinstance(edit, ModelEdit):
        raise CompressionError(f"{cfg.name} (stage {index}): a model-scope handler must return a ModelEdit, "
                               f"got {type(edit).__name__}")
    outside = sorted(set(edit.modules) - set(targets))
    if outside:
        raise CompressionError(f"{cfg.name} (stage {index}): the handler replaces {outside[:4]}, which are not "
                               "among its targets")
    originals = changes.replace(dict(edit.modules))
    for module_name, attributes in edit.attributes.items():
        owner = get_submodule(model, module_name) if module_name else model
        for attr, value in attributes.items():
            changes.set_attr(owner, attr, value)
    model_config = getattr(model, "config", None)  # a Hugging Face config, when the model has one
    config_changes = dict(edit.config) if model_config is not None else {}
    for key, value in config_changes.items():
        changes.set_attr(model_config, key, value)
    _record_resized(model, changes, originals, edit.attributes, config_changes)
    for name in edit.modules:
        report.layer_configs.setdefault(name, []).append(cfg.to_dict())
    report.notes.extend(f"stage {index} ({cfg.name}): {note}" for note in edit.notes)
    return set(edit.modules), edit.details


def _record_resized(model: nn.Module, changes: _Changes, originals: Dict[str, nn.Module],
                    attributes: Dict[str, Dict[str, Any]], config: Dict[str, Any]) -> None:
    """Add what a model edit resized to the record ``llmopt.save`` writes (``"resized"`` in the manifest),
    so ``llmopt.load`` rebuilds it on a skeleton of the original architecture: ``{"linears": {name:
    [out, in, bias]}, "attributes": {module: {attr: value}}, "config": {key: value}}``."""
    linears = {name: [new.out_features, new.in_features, new.bias is not None]
               for name, new in ((n, get_submodule(model, n)) for n in originals)
               if isinstance(new, nn.Linear) and (new.out_features, new.in_features)
               != (getattr(originals[name], "out_features", None), getattr(originals[name], "in_features", None))}
    if not (linears or attributes or config):
        return
    record = copy.deepcopy(getattr(model, RESIZED_ATTR, None)) or {"linears": {}, "attributes": {}, "config": {}}
    record["linears"].update(linears)
    for module_name, values in attributes.items():
        record["attributes"].setdefault(module_name, {}).update(values)
    record["config"].update(config)
    changes.set_attr(model, RESIZED_ATTR, record)


# ---------------------------------------------------------------------------------------------- embeddings
def _quantize_embeddings(model: nn.Module, scheme: WeightQuant, exclude: Patterns, changes: _Changes,
                         report: CompressionReport) -> Set[str]:
    """Replace every plain ``nn.Embedding`` not excluded with a :class:`QuantEmbedding` of ``scheme``; a Linear
    sharing its weight (a tied head) becomes the embedding's own table. Swaps go through ``changes``
    (undone on failure). Returns the replaced names."""
    excludes = _as_list(exclude)
    everything = list(model.named_modules(remove_duplicate=False))
    found: Dict[int, str] = {}
    done_before = []
    for name, module in everything:
        if isinstance(module, nn.Embedding) and id(module) not in found and not _matches(name, excludes):
            found[id(module)] = name
        elif isinstance(module, QuantEmbedding) and not _matches(name, excludes):
            done_before.append(name)
    for name in done_before:
        report.skipped[name] = "already compressed (QuantEmbedding)"
    if not found and not done_before:
        raise ValueError("embeddings=... was given, but the model has no nn.Embedding"
                         + (f" outside exclude={exclude!r}" if excludes else ""))
    replacements: Dict[str, nn.Module] = {}
    for name in found.values():
        embedding = get_submodule(model, name)
        if type(embedding) is not nn.Embedding:
            report.skipped[name] = (f"embeddings: {type(embedding).__name__} is an nn.Embedding subclass, whose forward "
                                    "may do more than look rows up; left as it is")
            continue
        if embedding.max_norm is not None:
            report.skipped[name] = "embeddings: max_norm renormalizes rows on lookup, which a quantized table cannot"
            continue
        weight = embedding.weight
        heads, problem = [], None
        for other_name, other in everything:
            if other is embedding or not any(p is weight for p in other.parameters(recurse=False)):
                continue
            if not (isinstance(other, nn.Linear) and other.weight is weight):
                problem = f"its weight is also used by {other_name} ({type(other).__name__}), which cannot share a table"
            elif _matches(other_name, excludes):
                problem = (f"its weight is tied to {other_name}, which is excluded; quantizing the embedding alone "
                           f"would keep the float tensor for {other_name} next to the packed copy")
            else:
                heads.append(other_name)
        if problem is not None:
            report.skipped[name] = f"embeddings: {problem}"
            continue
        try:
            if heads:
                # The head's matmul picks its kernel (scheme.kernel, "auto" by default); the lookup gathers
                # rows from that kernel's layout.
                table = QuantLinear.from_linear(get_submodule(model, heads[0]), scheme)
            else:
                # Only looked up: the row-major canonical layout (reference kernel) gathers rows directly,
                # unless a kernel is named.
                kernel = "reference" if scheme.kernel == "auto" else scheme.kernel
                shell = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
                shell.weight = weight  # shares the tensor; from_linear only reads it
                table = QuantLinear.from_linear(shell, scheme.replace(kernel=kernel))
            new = QuantEmbedding.from_linear(table, padding_idx=embedding.padding_idx)
        except Exception as exc:
            raise CompressionError(f"embedding {name!r} (embeddings={scheme.label()}): {exc}") from exc
        replacements[name] = new
        for head in heads:
            replacements[head] = table
        shared = f", shared with {', '.join(heads)} (one packed table)" if heads else ""
        report.notes.append(f"embeddings: {name} quantized {scheme.label()} [{table.kernel.name}]{shared}")
        if not heads:
            _note_broken_tie(model, embedding, name, report)
    changes.replace(replacements)
    return set(replacements)


def _note_broken_tie(model: nn.Module, embedding: nn.Module, name: str, report: CompressionReport) -> None:
    """A note when the config ties the head to this embedding but an earlier call compressed the head alone:
    the two now hold separate packed copies."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        tied_input = model.get_input_embeddings() is embedding
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if tied_input and head is not None and is_compressed(head):
        report.notes.append(f"embeddings: {name} is tied to the output head by the model's config, but the head was "
                            "compressed on its own earlier, so the two keep separate copies; quantize embeddings in "
                            "the same compress_ call as the head to share one table")
