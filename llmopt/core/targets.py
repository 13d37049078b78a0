"""Which modules a method applies to, and swapping them in place."""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

__all__ = ["find_linears", "select_linears", "get_submodule", "set_submodule", "replace_modules", "is_compressed",
           "RESIZED_ATTR", "requires_grad_flags", "restore_requires_grad"]

Patterns = Optional[Union[str, Sequence[str]]]

# Set by structured pruning on a model whose Linears it resized: {"linears": {name: [out, in, bias]},
# "attributes": {module: {attr: int}}, "config": {key: value}}. Written to the manifest as "resized".
RESIZED_ATTR = "_llmopt_resized"


def _as_list(patterns: Patterns) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def is_compressed(module: nn.Module) -> bool:
    """True for llmopt wrappers (``QuantLinear`` & co), which methods never compress twice."""
    return bool(getattr(module, "is_llmopt_compressed", False))


def find_linears(model: nn.Module, include: Patterns = None, exclude: Patterns = None) -> Dict[str, nn.Linear]:
    """``{name: module}`` of the ``nn.Linear`` modules selected by glob patterns (see :func:`select_linears`)."""
    return select_linears(model, include, exclude)[0]


def select_linears(
    model: nn.Module, include: Patterns = None, exclude: Patterns = None,
    accept: Optional[Callable[[nn.Module], bool]] = None,
) -> "tuple[Dict[str, nn.Linear], Dict[str, str]]":
    """``{name: module}`` of the ``nn.Linear`` modules (subclasses included) selected by glob patterns.

    Returns ``(selected, skipped)``. Patterns are ``fnmatch`` globs on the full dotted module name
    (``"*.mlp.*"``, ``"lm_head"``); a pattern that matches a module also covers everything inside
    it (``include="layers.0"`` selects the Linears of block 0). Already-compressed modules and LoRA
    adapters (``lora_A``/``lora_B`` of a ``LoRALinear``) are skipped, with the reason. An include pattern that matches no module at all is an
    error: a typo must not silently compress nothing. ``accept(module)``: compressed modules for which
    it returns True are selected rather than skipped (a method that composes with another wrapper,
    e.g. RTN quantizing the kept weights of a ``SparseLinear``).
    """
    include_list, exclude_list = _as_list(include), _as_list(exclude)
    names = [name for name, _ in model.named_modules() if name]
    for pattern in include_list:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"include pattern {pattern!r} matches no module (modules are named like: {sample})")
    selected, skipped = {}, {}
    for name, module in model.named_modules():
        if not name:
            continue
        if include_list and not _matches(name, include_list):
            continue
        if _matches(name, exclude_list):
            continue
        if is_compressed(module) and accept is not None and accept(module):
            selected[name] = module
        elif is_compressed(module):
            skipped[name] = f"already compressed ({type(module).__name__})"
        elif getattr(module, "is_llmopt_adapter", False):
            skipped[name] = "LoRA adapter (trained, never compressed)"
        elif isinstance(module, nn.Linear):
            selected[name] = module
    return selected, skipped


def _matches(name: str, patterns: List[str]) -> bool:
    """True if a pattern matches ``name`` or one of its ancestors (``"layers.0"`` covers its children)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, p) for p in patterns for prefix in prefixes)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """Module at dotted path ``name`` (clear error if absent)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"model has no submodule {name!r}") from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at dotted path ``name``; returns the module it replaced."""
    parent_name, _, attr = name.rpartition(".")
    parent = get_submodule(model, parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)
    return old


def replace_modules(model: nn.Module, replacements: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """Swap several modules at once; returns ``{name: old}``. On any error, restores what it swapped."""
    done: Dict[str, nn.Module] = {}
    try:
        for name, module in replacements.items():
            done[name] = set_submodule(model, name, module)
    except BaseException:
        restore_modules(model, done)
        raise
    return done


def restore_modules(model: nn.Module, originals: Dict[str, nn.Module]) -> None:
    """Undo :func:`replace_modules` (in reverse order)."""
    for name in reversed(list(originals)):
        set_submodule(model, name, originals[name])


def requires_grad_flags(model: nn.Module) -> List[Tuple[nn.Parameter, bool]]:
    """``[(parameter, requires_grad)]`` of every parameter, for :func:`restore_requires_grad` on a rollback."""
    return [(p, p.requires_grad) for p in model.parameters()]


def restore_requires_grad(flags: List[Tuple[nn.Parameter, bool]]) -> None:
    """Put back the flags :func:`requires_grad_flags` recorded."""
    for p, flag in flags:
        p.requires_grad_(flag)
