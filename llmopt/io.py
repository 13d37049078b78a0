"""Save and load compressed models: safetensors for tensors, JSON for structure. Never pickle."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Type, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .targets import get_submodule, set_submodule

__all__ = ["save", "load", "register_module_type", "MANIFEST_NAME", "TENSORS_NAME"]

MANIFEST_NAME = "llmopt.json"
TENSORS_NAME = "model.safetensors"
FORMAT_VERSION = 1

# type name -> class with .config() and .from_config(config, device)
_MODULE_TYPES: Dict[str, Type[nn.Module]] = {}


def register_module_type(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Make a wrapper class loadable: it needs ``config() -> dict`` and ``from_config(config, device)``."""
    if not (hasattr(cls, "config") and hasattr(cls, "from_config")):
        raise TypeError(f"{cls.__name__} needs config() and from_config(config, device) to be saved/loaded")
    _MODULE_TYPES[cls.__name__] = cls
    return cls


def _wrapped_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and type(m).__name__ in _MODULE_TYPES
            and isinstance(m, _MODULE_TYPES[type(m).__name__])}


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save(model: nn.Module, directory: Union[str, os.PathLike], metadata: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model`` to ``directory``: ``model.safetensors`` plus an ``llmopt.json`` manifest.

    Compressed layers are saved in their canonical (portable) form; tensors shared between several
    names (tied embeddings) are written once and recorded as aliases. Returns the directory.
    """
    from . import __version__

    os.makedirs(directory, exist_ok=True)
    state = model.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[Any, str] = {}
    for key, tensor in state.items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {key!r}: tensor is on the meta device")
        skey = _storage_key(tensor)
        if skey in seen:
            aliases[key] = seen[skey]
            continue
        seen[skey] = key
        # safetensors refuses views that share storage: give each tensor its own contiguous copy.
        tensors[key] = tensor.detach().to("cpu").contiguous().clone()
    manifest = {
        "llmopt_version": __version__,
        "format_version": FORMAT_VERSION,
        "tensors": TENSORS_NAME,
        "modules": {name: {"type": type(m).__name__, "config": m.config()}
                    for name, m in _wrapped_modules(model).items()},
        "aliases": aliases,
        "metadata": metadata or {},
    }
    resized = _resized_record(model)
    if resized:
        manifest["resized"] = resized
    save_file(tensors, os.path.join(directory, TENSORS_NAME), metadata={"format": "pt", "llmopt": "1"})
    with open(os.path.join(directory, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return str(directory)


def read_manifest(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The parsed ``llmopt.json`` of a saved directory."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a directory written by llmopt.save")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest['format_version']}; this llmopt reads up to "
                         f"{FORMAT_VERSION}: upgrade llmopt")
    return manifest


def load(
    skeleton: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Load a directory written by :func:`save` into ``skeleton`` (the uncompressed architecture).

    ``skeleton`` may live on the meta device (``with torch.device("meta"): model = Arch(...)``):
    every tensor is taken from the file. The compressed wrappers named in the manifest are rebuilt
    first, then the state dict is loaded with ``assign=True``; the result is bit-exact.
    Tied parameters of the skeleton stay tied. Returns the (same) skeleton object.
    """
    manifest = read_manifest(directory)
    device = torch.device(device)
    # Which parameter names share one Parameter object in the skeleton (tied embeddings & co).
    ties: Dict[int, list] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    tie_groups = [names for names in ties.values() if len(names) > 1]

    replacements: Dict[str, nn.Module] = {}
    modules = manifest["modules"]
    # Outer wrappers first: a wrapper inside another one (the QuantLinear base of a LoRALinear) is
    # put into the rebuilt outer module, so only top-level names must exist in the skeleton.
    for name in sorted(modules, key=lambda n: n.count(".")):
        entry = modules[name]
        cls = _MODULE_TYPES.get(entry["type"])
        if cls is None:
            raise ValueError(f"{directory}: module {name!r} has unknown type {entry['type']!r}; "
                             f"known: {sorted(_MODULE_TYPES)}")
        if not any(name.startswith(outer + ".") for outer in modules):
            get_submodule(skeleton, name)  # clear error if the skeleton lacks the layer
        replacements[name] = cls.from_config(entry["config"], device="meta")
    resized = manifest.get("resized") or {}
    for name, (out_f, in_f, has_bias) in resized.get("linears", {}).items():
        # Structurally pruned plain Linears: rebuild them at their saved shapes (weights come from the file).
        if name in replacements or any(name.startswith(outer + ".") for outer in modules):
            continue
        current = get_submodule(skeleton, name)
        if (isinstance(current, nn.Linear) and (current.out_features, current.in_features) == (out_f, in_f)
                and (current.bias is not None) == bool(has_bias)):
            continue
        dtype = current.weight.dtype if isinstance(getattr(current, "weight", None), torch.Tensor) else None
        replacements[name] = nn.Linear(in_f, out_f, bias=bool(has_bias), device="meta", dtype=dtype)
    state = load_file(os.path.join(directory, manifest.get("tensors", TENSORS_NAME)), device=str(device))
    for alias, target in manifest.get("aliases", {}).items():
        state[alias] = state[target]
    originals = {name: set_submodule(skeleton, name, module) for name, module in replacements.items()}
    old_values: list = []
    try:
        _apply_resized_values(skeleton, resized, old_values)
        result = skeleton.load_state_dict(state, strict=strict, assign=True)
    except BaseException:
        for name in reversed(list(originals)):  # inner wrappers first, then the outer ones
            set_submodule(skeleton, name, originals[name])
        for obj, attr, value in reversed(old_values):
            setattr(obj, attr, value)
        raise
    if resized:
        object.__setattr__(skeleton, RESIZED_ATTR, json.loads(json.dumps(resized)))
    for names in tie_groups:
        first = _get_param(skeleton, names[0])
        if first is None:
            continue
        for other in names[1:]:
            if _get_param(skeleton, other) is not None:
                _set_param(skeleton, other, first)
    del result
    return skeleton


# Set by llmopt.prune.structured on a model whose Linears it resized: {"linears": {name: [out, in, bias]},
# "attributes": {module: {attr: int}}, "config": {key: value}}. Written to the manifest as "resized".
RESIZED_ATTR = "_llmopt_resized"


def _resized_record(model: nn.Module) -> Optional[Dict[str, Any]]:
    rec = getattr(model, RESIZED_ATTR, None)
    if not rec:
        return None
    linears = {}
    for name in rec.get("linears", {}):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if type(m) is nn.Linear:  # wrapped later (quantized...): its wrapper's config carries the shape
            linears[name] = [m.out_features, m.in_features, m.bias is not None]
    return {"linears": linears, "attributes": dict(rec.get("attributes", {})),
            "config": dict(rec.get("config", {}))}


def _apply_resized_values(skeleton: nn.Module, resized: Dict[str, Any], undo: list) -> None:
    """Set the recorded module attributes and config values; appends ``(obj, attr, old)`` to ``undo``."""
    for name, attrs in resized.get("attributes", {}).items():
        module = get_submodule(skeleton, name) if name else skeleton
        for attr, value in attrs.items():
            undo.append((module, attr, getattr(module, attr, None)))
            setattr(module, attr, value)
    config = getattr(skeleton, "config", None)
    if config is not None:
        for key, value in resized.get("config", {}).items():
            undo.append((config, key, getattr(config, key, None)))
            setattr(config, key, value)


def _get_param(model: nn.Module, name: str) -> Optional[nn.Parameter]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    return module._parameters.get(attr)


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = param
