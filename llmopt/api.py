"""One-call entry points: ``compress_``."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .analysis import memory_report
from .config import MethodConfig
from .registry import get_method
from .targets import Patterns, get_submodule, replace_modules, restore_modules, select_linears

__all__ = ["compress_", "CompressionReport", "CompressionError", "SkipLayer"]


class CompressionError(RuntimeError):
    """A layer could not be compressed; the model was left exactly as it was."""


class SkipLayer(Exception):
    """Raised by a layer-scope handler to leave its layer as it is (e.g. a factorization that would
    not save parameters). ``compress_`` records ``"<method>: <reason>"`` in ``report.skipped`` and
    goes on with the other layers; nothing is rolled back."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = str(reason)


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
    methods: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "replaced": dict(self.replaced), "rescaled": dict(self.rescaled), "skipped": dict(self.skipped),
            "notes": list(self.notes),
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "compression_ratio": self.compression_ratio, "seconds": self.seconds, "methods": self.methods,
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


def _compress_with_calibration(model: nn.Module, cfg: MethodConfig, entry, targets: Dict[str, nn.Module],
                               calibration: Sequence[Any], swapped: Dict[str, nn.Module],
                               calibration_dtype: Optional[torch.dtype] = None,
                               calibration_device: Optional[Union[str, torch.device]] = None,
                               skipped: Optional[Dict[str, str]] = None) -> None:
    """Block by block: each block's layers get statistics of the inputs the already-compressed
    previous blocks produce; targets outside the repeated blocks (e.g. ``lm_head``), or every target
    of a model without repeated blocks, come last, with statistics from one forward of the (partly
    compressed) model. Every swap is recorded for rollback."""
    from .calibration import StatsSpec, collect_stats, find_blocks, run_blocks

    spec = cfg.stats_spec() if hasattr(cfg, "stats_spec") else StatsSpec()
    if calibration_dtype in (torch.bfloat16, torch.float16) and spec.hessian:
        # Activations are already in that dtype: x^T x products in it too (~4x faster). Their rounding
        # (2**-9) then dominates any accumulation error, so float32 sums are as good as float64 ones
        # and 3x cheaper (measured on SmolLM2: 0.8 s instead of 2.3 s per block at 128 x 512 tokens).
        spec = dataclasses.replace(spec, product_dtype=calibration_dtype, dtype=torch.float32)
    propagate = getattr(cfg, "propagate", "quantized")

    skipped = {} if skipped is None else skipped

    def swap(new_modules: Dict[str, Optional[nn.Module]]) -> None:
        new_modules = {name: module for name, module in new_modules.items() if module is not None}
        for name, old in replace_modules(model, new_modules).items():
            swapped.setdefault(name, old)

    block_scope = entry.scope == "block"

    def process_block(index: int, block: nn.Module, stats, sources=None) -> None:
        if block_scope:
            layers = {name: targets[name] for name in stats if name in targets}
            if layers:
                swap(_handle_block(entry, cfg, f"{path}.{index}" if path else str(index), layers,
                                   stats={name: stats[name] for name in layers}, sources=sources or {},
                                   root=block))
            return
        swap({name: _handle(entry, cfg, name, targets[name], skipped, stats=layer_stats)
              for name, layer_stats in stats.items() if name in targets})

    try:
        path, _ = find_blocks(model)
    except ValueError:
        path = None  # no repeated blocks (a plain MLP, a single layer): one pass over the model
    if path is not None:
        run_blocks(model, calibration, process_block, stats_spec=spec, include=sorted(targets),
                   trace_sources=block_scope, dtype=calibration_dtype, propagate=propagate,
                   device=calibration_device)
    rest = [name for name in targets if get_submodule(model, name) is targets[name]]
    if rest:
        stats = collect_stats(model, calibration, spec, include=rest)
        if block_scope:
            # Outside the repeated blocks nothing is folded (no sources): scales stay on the layers.
            for name in rest:
                if name not in stats or stats[name].count == 0:
                    raise CompressionError(f"layer {name!r} ({cfg.name}): it received no inputs during "
                                           "calibration")
            swap(_handle_block(entry, cfg, "", {name: targets[name] for name in rest},
                               stats={name: stats[name] for name in rest}, sources={}, root=model))
        else:
            swap({name: _handle(entry, cfg, name, targets[name], skipped, stats=stats.get(name)) for name in rest})


def compress_(
    model: nn.Module,
    config: Union[MethodConfig, Sequence[MethodConfig]],
    *,
    calibration: Optional[Sequence[Any]] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    calibration_dtype: Optional[torch.dtype] = None,
    calibration_device: Optional[Union[str, torch.device]] = None,
) -> CompressionReport:
    """Compress the targeted ``nn.Linear`` layers of ``model`` in place; all or nothing.

    ``config`` is one method config or a list applied in order. ``include``/``exclude`` are glob
    patterns on module names. If any layer fails, every replacement made by this call is undone
    and a :class:`CompressionError` names the layer and the problem.

    ``calibration_dtype`` (e.g. ``torch.bfloat16``): run the calibration forwards in that dtype on a
    temporary copy of each block (much faster on CPUs with bf16; the model's weights are not cast).
    ``calibration_device`` (e.g. ``"cuda"``): move each block there for its turn and back afterwards,
    so a model larger than the device's memory can be calibrated on it.
    """
    if calibration_dtype is not None and not (isinstance(calibration_dtype, torch.dtype)
                                              and calibration_dtype.is_floating_point):
        raise ValueError(f"calibration_dtype must be a floating torch dtype or None, got {calibration_dtype!r}")
    if isinstance(config, MethodConfig):
        configs = [config]
    elif isinstance(config, (list, tuple)):
        configs = list(config)
    else:
        raise TypeError(f"expected a method config (e.g. llmopt.RTN(...)) or a list of them, got {config!r}")
    if not configs:
        raise ValueError("compress_ needs at least one method config")
    for cfg in configs:
        if not isinstance(cfg, MethodConfig):
            raise TypeError(f"expected a method config (e.g. llmopt.RTN(...)), got {cfg!r}")
        get_method(cfg)
        if cfg.needs_calibration and not calibration:
            raise ValueError(f"method {cfg.name!r} needs calibration data; pass calibration=[...]")

    report = CompressionReport()
    start = time.perf_counter()
    swapped: Dict[str, nn.Module] = {}  # name -> original module, for rollback across configs
    targeted: set = set()  # names of the linears the methods were asked to compress
    try:
        for cfg in configs:
            entry = get_method(cfg)
            targets, skipped = select_linears(model, include, exclude,
                                              accept=getattr(cfg, "accepts_compressed", None))
            targeted.update(targets)
            for name, reason in skipped.items():
                if name not in swapped:
                    report.skipped[name] = reason
            if not targets and not skipped:
                raise ValueError(f"method {cfg.name!r}: no uncompressed nn.Linear matches include={include!r} "
                                 f"exclude={exclude!r}")
            if cfg.needs_calibration:
                _compress_with_calibration(model, cfg, entry, targets, calibration, swapped, calibration_dtype,
                                           calibration_device, report.skipped)
            else:
                new_modules = {name: _handle(entry, cfg, name, module, report.skipped)
                               for name, module in targets.items()}
                new_modules = {name: module for name, module in new_modules.items() if module is not None}
                for name, old in replace_modules(model, new_modules).items():
                    swapped.setdefault(name, old)
            report.methods.append(cfg.to_dict())
    except BaseException:
        restore_modules(model, swapped)
        raise
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
