"""Save and load compressed models: safetensors for tensors, JSON for structure. Never pickle."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..core.targets import RESIZED_ATTR, get_submodule, set_submodule
from ..nn.base import _MODULE_TYPES
from ..pipeline.recipe import RecipeError, check_versions

__all__ = ["save", "load", "MANIFEST_NAME", "TENSORS_NAME"]

MANIFEST_NAME = "llmopt.json"
TENSORS_NAME = "model.safetensors"
FORMAT_VERSION = 1
READ_FORMAT_VERSION = 2  # highest version load() understands
# Shards bound the extra memory of save (and of load) to about one shard, whatever the model size.
DEFAULT_SHARD_BYTES = 512 * 2**20

def _wrapped_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and type(m).__name__ in _MODULE_TYPES
            and isinstance(m, _MODULE_TYPES[type(m).__name__])}


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _module_state_items(model: nn.Module) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """``[(key, tensor), ...]`` per module, in ``state_dict`` order, one module at a time.

    Streaming: a compressed layer's canonical tensors (unpacked from a kernel layout) exist only while
    their shard is written, never all at once. Modules with state-dict hooks fall back to one
    ``state_dict()`` call, so hooks keep their meaning.
    """
    if any(m._state_dict_hooks or m._state_dict_pre_hooks for m in model.modules()):
        yield list(model.state_dict().items())
        return
    for name, module in model.named_modules(remove_duplicate=False):
        local: Dict[str, torch.Tensor] = {}
        module._save_to_state_dict(local, name + "." if name else "", False)
        if local:
            yield list(local.items())


def _storage_bytes(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def save(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    metadata: Optional[Dict[str, Any]] = None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> str:
    """Write ``model`` to ``directory``: ``model.safetensors`` (or numbered shards) plus ``llmopt.json``.

    Compressed layers are saved in their canonical (portable) form; tensors shared between several
    names (tied embeddings) are written once and recorded as aliases. Tensors are written module by
    module into shards of at most ``max_shard_bytes`` (a module's tensors always share one shard),
    so saving needs at most about one shard of extra memory, never a second copy of the model.
    Returns the directory.
    """

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    os.makedirs(directory, exist_ok=True)
    # Storages the model owns outlive this call, so their addresses identify shared tensors; a
    # temporary's address may be reused once it is freed, so temporaries are never deduplicated.
    owned = set()
    for t in list(model.parameters()) + list(model.buffers()):
        try:
            owned.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            pass
    aliases: Dict[str, str] = {}
    seen: Dict[Any, str] = {}
    shard: Dict[str, torch.Tensor] = {}
    shard_bytes = 0
    files: List[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard or not files:  # a model without tensors still gets an (empty) tensor file
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(directory, fname), metadata={"format": "pt", "llmopt": "1"})
            files.append(fname)
        shard, shard_bytes = {}, 0

    for items in _module_state_items(model):
        module_tensors: Dict[str, torch.Tensor] = {}
        for key, tensor in items:
            if tensor.device.type == "meta":
                raise ValueError(f"cannot save {key!r}: tensor is on the meta device")
            tensor = tensor.detach()
            skey = _storage_key(tensor)
            if skey in seen:
                aliases[key] = seen[skey]
                continue
            if skey[0] in owned:
                seen[skey] = key
            tensor = tensor.to("cpu")
            # safetensors refuses views into a larger storage (fused projections) and non-contiguous
            # tensors: only those get their own copy.
            if not tensor.is_contiguous() or _storage_bytes(tensor) != tensor.numel() * tensor.element_size():
                tensor = tensor.contiguous().clone()
            module_tensors[key] = tensor
        size = sum(t.numel() * t.element_size() for t in module_tensors.values())
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard.update(module_tensors)
        shard_bytes += size
    flush()
    if len(files) == 1:
        os.replace(os.path.join(directory, files[0]), os.path.join(directory, TENSORS_NAME))
        files = [TENSORS_NAME]
    else:
        total = len(files)
        renamed = []
        for i, fname in enumerate(files):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(directory, fname), os.path.join(directory, final))
            renamed.append(final)
        files = renamed
    for fname in os.listdir(directory):  # tensor files of an earlier save into the same directory
        if fname.startswith("model") and fname.endswith(".safetensors") and fname not in files:
            os.remove(os.path.join(directory, fname))
    manifest = {
        "llmopt_version": __version__,
        # Version 2 only when sharded: a single-file save stays readable by llmopt versions before shards.
        "format_version": FORMAT_VERSION if len(files) == 1 else 2,
        "tensors": files[0] if len(files) == 1 else files,
        "modules": {name: {"type": type(m).__name__, "config": m.config()}
                    for name, m in _wrapped_modules(model).items()},
        "aliases": aliases,
        "metadata": _with_recipe(model, metadata),
    }
    resized = _resized_record(model)
    if resized:
        manifest["resized"] = resized
    cast = _non_persistent_dtypes(model)
    if cast:
        manifest["non_persistent_dtypes"] = cast
    with open(os.path.join(directory, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=2)  # not sorted: recipe overrides are ordered (first match wins)
    return str(directory)


def _with_recipe(model: nn.Module, metadata: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The user's metadata plus the recipe ``compress_`` recorded on the model (unless one is given)."""
    meta = dict(metadata or {})
    recipe = model.__dict__.get("_llmopt_recipe")
    if recipe and "recipe" not in meta:
        meta["recipe"] = json.loads(json.dumps(recipe))
    return meta


def tensor_files(directory: Union[str, os.PathLike], manifest: Optional[Dict[str, Any]] = None) -> List[str]:
    """Paths of the safetensors files of a saved directory, in order."""
    manifest = read_manifest(directory) if manifest is None else manifest
    names = manifest.get("tensors", TENSORS_NAME)
    names = [names] if isinstance(names, str) else list(names)
    paths = [os.path.join(directory, n) for n in names]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the directory written by llmopt.save is incomplete")
    return paths


def read_manifest(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The parsed ``llmopt.json`` of a saved directory."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a directory written by llmopt.save")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format_version", 0) > READ_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest['format_version']}; this llmopt reads up to "
                         f"{READ_FORMAT_VERSION}: upgrade llmopt")
    metadata = manifest.get("metadata")
    if isinstance(metadata, dict) and metadata.get("recipe"):
        try:  # a method config written at a newer VERSION than this llmopt's class is refused
            check_versions(metadata["recipe"])
        except RecipeError as exc:
            raise RecipeError(f"{path}: recipe {exc}") from None
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
    paths = tensor_files(directory, manifest)
    aliases = manifest.get("aliases", {})
    originals = {name: set_submodule(skeleton, name, module) for name, module in replacements.items()}
    old_values: list = []
    try:
        _apply_resized_values(skeleton, resized, old_values)
        # One shard at a time: a module's tensors are always in one shard, so each wrapper sees all of
        # its canonical tensors in one call and converts them to its kernel layout; the shard's
        # temporaries are freed before the next one is read.
        missing: Optional[set] = None
        unexpected: set = set()
        for path in paths:
            state = load_file(path, device=str(device))
            for alias, target in aliases.items():
                if target in state:
                    state[alias] = state[target]
            result = skeleton.load_state_dict(state, strict=False, assign=True)
            missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
            unexpected |= set(result.unexpected_keys)
            del state, result
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {sorted(missing)[:20]}")
            if unexpected:
                parts.append(f"unexpected keys {sorted(unexpected)[:20]}")
            raise RuntimeError(f"{directory}: state does not match the skeleton: " + "; ".join(parts))
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
    _restore_non_persistent_dtypes(skeleton, manifest.get("non_persistent_dtypes", {}))
    _check_materialized(skeleton)
    return skeleton


def _non_persistent_buffers(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, torch.Tensor]]:
    for mname, module in model.named_modules():
        for bname in module._non_persistent_buffers_set:
            buf = module._buffers.get(bname)
            if buf is not None:
                yield (f"{mname}.{bname}" if mname else bname), module, bname, buf


def _non_persistent_dtypes(model: nn.Module) -> Dict[str, str]:
    """Dtypes of the floating non-persistent buffers (rotary ``inv_freq``): they are not saved but are
    recomputed by the constructor in its default dtype, and ``model.to(bfloat16)`` had cast them."""
    return {name: str(buf.dtype).replace("torch.", "") for name, _, _, buf in _non_persistent_buffers(model)
            if buf.is_floating_point()}


def _restore_non_persistent_dtypes(model: nn.Module, dtypes: Dict[str, str]) -> None:
    for name, module, bname, buf in _non_persistent_buffers(model):
        dtype = getattr(torch, dtypes.get(name, ""), None)
        if isinstance(dtype, torch.dtype) and buf.is_floating_point() and buf.dtype != dtype:
            module._buffers[bname] = buf.to(dtype)


def _check_materialized(model: nn.Module) -> None:
    """Fail clearly when a tensor was left on the meta device (a non-persistent buffer of a meta skeleton)."""
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(
            f"after loading, {len(left)} tensor(s) are still on the meta device ({', '.join(left[:5])}"
            f"{', ...' if len(left) > 5 else ''}): they are not in the saved file (non-persistent buffers such as "
            "rotary inv_freq are computed at construction). Build the skeleton with parameters on meta but "
            "buffers real: `with accelerate.init_empty_weights(): model = ...`, or use llmopt.load_pretrained")




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
