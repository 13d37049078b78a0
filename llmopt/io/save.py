"""Save and load compressed models: safetensors for tensors, JSON for structure. Never pickle."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from .._version import __version__
from ..core.targets import RESIZED_ATTR, _matches, get_submodule, set_submodule
from ..nn.base import _MODULE_TYPES
from ..pipeline.recipe import RecipeError, check_versions
from ..core.files import (
    CHUNK_BYTES,
    TEMP_PREFIX,
    LoadError,
    finish_file,
    fsync_directory,
    member_path,
    new_save_id,
    pause_point,
    read_json_member,
    remove_quietly,
    temp_path,
    write_bytes_atomic,
)

__all__ = ["save", "load", "read_manifest", "tensor_files", "LoadError", "MANIFEST_NAME", "TENSORS_NAME"]

MANIFEST_NAME = "llmopt.json"
TENSORS_NAME = "model.safetensors"
FORMAT_VERSION = 1
READ_FORMAT_VERSION = 2  # highest version load() understands
# Shards bound the extra memory of save (and of load) to about one shard, whatever the model size.
DEFAULT_SHARD_BYTES = 512 * 2**20
# The key, in each tensor file's safetensors ``__metadata__``, of the id of the save it belongs to.
SAVE_ID_KEY = "llmopt_save_id"

def _wrapped_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and type(m).__name__ in _MODULE_TYPES
            and isinstance(m, _MODULE_TYPES[type(m).__name__])}


def _shared_modules(model: nn.Module) -> Dict[str, str]:
    """``{second name: first name}`` of compressed wrappers held under several names: a tied ``lm_head`` that
    *is* the ``QuantLinear`` table of a ``QuantEmbedding``. Their tensors are written once (under the first
    name) and ``load`` puts the one rebuilt module back under every name."""
    first: Dict[int, str] = {}
    shared: Dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or type(module).__name__ not in _MODULE_TYPES or any(name.startswith(a + ".") for a in shared):
            continue
        if id(module) in first:
            shared[name] = first[id(module)]
        else:
            first[id(module)] = name
    return shared


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
    shared = tuple(_shared_modules(model))
    for name, module in model.named_modules(remove_duplicate=False):
        if shared and _matches(name, list(shared)):
            continue  # a second name of a shared wrapper: its tensors were written under the first one
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

    Crash-safe: everything that can be checked (metadata is JSON, the model has no meta tensors) is
    checked before the directory is touched; new tensor files never overwrite files of the save
    already there; ``llmopt.json`` is replaced atomically last, and it is the commit point. A crash or
    an exception at any moment leaves the directory loading either the complete old save or the
    complete new one. Each tensor file carries the save's id, so a stale or swapped file is refused
    on load. One writer per directory at a time.
    """

    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"llmopt.save: metadata must be a dict of JSON values, got {type(metadata).__name__}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    directory = os.fspath(directory)
    # 1. Everything that can fail before a byte is written: the manifest (minus the file list) must
    #    serialise, and no tensor may be on the meta device.
    manifest = {
        "llmopt_version": __version__,
        "format_version": FORMAT_VERSION,
        "save_id": "",
        "tensors": [],
        "tensor_bytes": [],
        "modules": {name: {"type": type(m).__name__, "config": m.config()}
                    for name, m in _wrapped_modules(model).items()},
        "aliases": {},
        "metadata": _with_recipe(model, metadata),
    }
    resized = _resized_record(model)
    if resized:
        manifest["resized"] = resized
    shared = _shared_modules(model)
    if shared:  # only when there are: manifests of models without shared wrappers stay as they were
        manifest["shared_modules"] = shared
    cast = _non_persistent_dtypes(model)
    if cast:
        manifest["non_persistent_dtypes"] = cast
    _check_json(manifest)
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.device.type == "meta"]
    if on_meta:
        raise ValueError(f"cannot save {on_meta[0]!r}: tensor is on the meta device")
    os.makedirs(directory, exist_ok=True)
    old_files = _referenced_files(directory)
    _remove_leftovers(directory, keep=old_files)

    save_id = new_save_id()
    manifest["save_id"] = save_id
    written: List[str] = []  # temporary paths, in shard order
    finals: List[str] = []
    try:
        aliases = _write_shards(model, directory, save_id, max_shard_bytes, written)
        finals = _final_names(directory, len(written), save_id)
        sizes = [os.path.getsize(p) for p in written]
        for i, (tmp, final) in enumerate(zip(written, finals)):
            os.replace(tmp, os.path.join(directory, final))
            pause_point("shard_rename", i + 1)
        fsync_directory(directory)
        manifest["aliases"] = aliases
        # Version 2 only when sharded: a single-file save stays readable by llmopt versions before shards.
        manifest["format_version"] = FORMAT_VERSION if len(finals) == 1 else 2
        manifest["tensors"] = finals[0] if len(finals) == 1 else finals
        manifest["tensor_bytes"] = sizes[0] if len(sizes) == 1 else sizes
        # The commit point: before this rename the old save loads, after it the new one.
        write_bytes_atomic(os.path.join(directory, MANIFEST_NAME),
                           json.dumps(manifest, indent=2).encode(),  # not sorted: overrides are ordered
                           save_id=save_id, point="manifest_write")
    except BaseException:
        for tmp in written:
            remove_quietly(tmp)
        for final in finals:
            if final not in old_files:
                remove_quietly(os.path.join(directory, final))
        raise
    pause_point("cleanup")
    _remove_leftovers(directory, keep=set(finals))
    return directory


def check_json_metadata(metadata: Dict[str, Any]) -> None:
    """Refuse, before anything is written, metadata that ``json`` cannot write (naming the entry)."""
    _check_json({"metadata": metadata})


def _check_json(manifest: Dict[str, Any]) -> None:
    """Refuse, before anything is written, a manifest that ``json`` cannot write (naming the entry)."""
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as exc:
        where = "manifest"
        metadata = manifest.get("metadata")
        for key, value in (metadata.items() if isinstance(metadata, dict) else ()):
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                where = f"metadata[{key!r}]"
                break
        raise TypeError(f"llmopt.save: {where} is not JSON-serialisable ({exc}); nothing was written") from None


def _write_shards(model: nn.Module, directory: str, save_id: str, max_shard_bytes: int,
                  written: List[str]) -> Dict[str, str]:
    """Stream the model's tensors into temporary shard files (paths appended to ``written``); returns the aliases."""
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

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard or not written:  # a model without tensors still gets an (empty) tensor file
            index = len(written) + 1
            path = temp_path(directory, save_id, f"shard-{index:05d}.safetensors")
            written.append(path)
            _write_tensor_file(path, shard, {"format": "pt", "llmopt": "1", SAVE_ID_KEY: save_id}, index)
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
    return aliases


def _write_tensor_file(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], index: int) -> None:
    """One safetensors file, written in chunks (a crash can land mid-file; the name is temporary) and synced."""
    data = safetensors_save(tensors, metadata=metadata)
    view = memoryview(data)
    with open(path, "wb") as f:
        for offset in range(0, max(len(view), 1), CHUNK_BYTES):
            f.write(view[offset:offset + CHUNK_BYTES])
            if offset == 0:
                f.flush()
                pause_point("shard_write", index)
        finish_file(f)
    del view, data


def _final_names(directory: str, count: int, save_id: str) -> List[str]:
    """Tensor file names for a save of ``count`` files: the usual ones when none of them exists yet,
    else names carrying the save id, so the files of the save already there are never overwritten."""
    if count == 1:
        usual = [TENSORS_NAME]
    else:
        usual = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    if not any(os.path.lexists(os.path.join(directory, n)) for n in usual):
        return usual
    tag = save_id[:8]
    if count == 1:
        return [f"model-{tag}.safetensors"]
    return [f"model-{tag}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _referenced_files(directory: str) -> set:
    """Tensor files the directory's current manifest names (empty when there is none or it is unreadable)."""
    try:
        with open(os.path.join(directory, MANIFEST_NAME), "rb") as f:
            manifest = json.loads(f.read())
        names = manifest.get("tensors", TENSORS_NAME)
        names = [names] if isinstance(names, str) else list(names)
        return {n for n in names if isinstance(n, str)}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def _remove_leftovers(directory: str, keep: set) -> None:
    """Remove what crashed or earlier saves left: llmopt temporaries, and tensor files (``model*.safetensors``)
    not in ``keep``. With no readable manifest, tensor files are kept (they may be all that is left)."""
    for fname in os.listdir(directory):
        path = os.path.join(directory, fname)
        if fname.startswith(TEMP_PREFIX):
            remove_quietly(path)
        elif keep and fname.startswith("model") and fname.endswith(".safetensors") and fname not in keep:
            remove_quietly(path)


def _with_recipe(model: nn.Module, metadata: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The user's metadata plus the recipe ``compress_`` recorded on the model (unless one is given)."""
    meta = dict(metadata or {})
    recipe = model.__dict__.get("_llmopt_recipe")
    if recipe and "recipe" not in meta:
        meta["recipe"] = json.loads(json.dumps(recipe))
    return meta


def tensor_files(directory: Union[str, os.PathLike], manifest: Optional[Dict[str, Any]] = None) -> List[str]:
    """Paths of the safetensors files of a saved directory, in order (each checked to lie inside it)."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    source = os.path.join(directory, MANIFEST_NAME)
    names = manifest.get("tensors", TENSORS_NAME)
    names = [names] if isinstance(names, str) else list(names)
    return [member_path(directory, n, source=source, what="tensor file") for n in names]


def _manifest_problem(manifest: Any) -> Optional[str]:
    """What is wrong with a parsed manifest's structure, or None."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"format_version must be a positive integer, got {version!r}"
    if "modules" not in manifest:
        return "has no 'modules' entry"
    modules = manifest["modules"]
    if not isinstance(modules, dict):
        return f"'modules' must be an object, got {type(modules).__name__}"
    for name, entry in modules.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) \
                or not isinstance(entry.get("config"), dict):
            return f"module {name!r} must be an object with a string 'type' and an object 'config', got {entry!r}"
    names = manifest.get("tensors", TENSORS_NAME)
    if not (isinstance(names, str) or (isinstance(names, list) and names and all(isinstance(n, str) for n in names))):
        return f"'tensors' must be a file name or a non-empty list of file names, got {names!r}"
    sizes = manifest.get("tensor_bytes")
    if sizes is not None:
        count = 1 if isinstance(names, str) else len(names)
        sizes = [sizes] if isinstance(sizes, int) else sizes
        if not isinstance(sizes, list) or len(sizes) != count or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            return f"'tensor_bytes' must give one size per tensor file, got {manifest['tensor_bytes']!r}"
    if not isinstance(manifest.get("save_id", ""), str):
        return f"'save_id' must be a string, got {manifest['save_id']!r}"
    for key in ("aliases", "non_persistent_dtypes", "shared_modules"):
        value = manifest.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return f"'{key}' must map names to names, got {value!r}"
    if not isinstance(manifest.get("metadata", {}), dict):
        return f"'metadata' must be an object, got {type(manifest['metadata']).__name__}"
    for alias, target in manifest.get("shared_modules", {}).items():
        if target not in modules:
            return f"shared module {alias!r} names {target!r}, which is not one of the saved modules"
    resized = manifest.get("resized") or {}
    if not isinstance(resized, dict) or not all(isinstance(resized.get(k, {}), dict)
                                                for k in ("linears", "attributes", "config")):
        return f"'resized' must be an object of objects, got {resized!r}"
    for name, shape in resized.get("linears", {}).items():
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) for v in shape)):
            return f"resized linear {name!r} must be [out_features, in_features, has_bias], got {shape!r}"
    return None


def read_manifest(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The parsed ``llmopt.json`` of a saved directory; its structure checked, errors naming the file."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST_NAME)
    manifest = read_json_member(directory, MANIFEST_NAME, written_by="llmopt.save")
    problem = _manifest_problem(manifest)
    if problem:
        raise LoadError(f"{path}: {problem}")
    if manifest.get("format_version", 1) > READ_FORMAT_VERSION:
        raise LoadError(f"{path} has format_version {manifest['format_version']}; this llmopt reads up to "
                        f"{READ_FORMAT_VERSION}: upgrade llmopt")
    metadata = manifest.get("metadata")
    if isinstance(metadata, dict) and metadata.get("recipe"):
        try:  # a method config written at a newer VERSION than this llmopt's class is refused
            check_versions(metadata["recipe"])
        except RecipeError as exc:
            raise RecipeError(f"{path}: recipe {exc}") from None
    return manifest


def _read_headers(directory: str, manifest: Dict[str, Any], device: torch.device
                  ) -> List[Tuple[str, Dict[str, Tuple[Tuple[int, ...], str]]]]:
    """``[(path, {name: (shape, dtype)})]`` of every tensor file, checked before any tensor is read.

    Each file must lie in the directory, have the size the manifest recorded, be a readable
    safetensors file, and carry the manifest's save id (so a file of another save is refused).
    """
    source = os.path.join(directory, MANIFEST_NAME)
    paths = tensor_files(directory, manifest)
    sizes = manifest.get("tensor_bytes")
    sizes = [sizes] if isinstance(sizes, int) else sizes
    save_id = manifest.get("save_id")
    headers = []
    seen: Dict[str, str] = {}
    for i, path in enumerate(paths):
        actual = os.path.getsize(path)
        if sizes is not None and actual != sizes[i]:
            raise LoadError(f"{path}: {actual} bytes where {source} recorded {sizes[i]}: the file is truncated "
                            "or belongs to another save")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                entries = {}
                for key in f.keys():
                    piece = f.get_slice(key)
                    entries[key] = (tuple(piece.get_shape()), str(piece.get_dtype()))
        except Exception as exc:  # safetensors raises its own error types, without the file name
            raise LoadError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        if save_id and meta.get(SAVE_ID_KEY) != save_id:
            found = meta.get(SAVE_ID_KEY)
            raise LoadError(f"{path} belongs to {'save ' + found if found else 'no llmopt save'}, not to the save "
                            f"{save_id} that {source} describes: the directory mixes files of different saves")
        for key in entries:
            if key in seen:
                raise LoadError(f"{path}: tensor {key!r} is also in {seen[key]}")
            seen[key] = path
        headers.append((path, entries))
    return headers


def _check_against_skeleton(skeleton: nn.Module, directory: str, headers, aliases: Dict[str, str],
                            wrapped: List[str], strict: bool) -> None:
    """Compare the files' tensor names (and the shapes of plain, unwrapped tensors) with what the
    skeleton, its compressed wrappers already in place, expects: fails before anything is assigned."""
    expected: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
    for items in _module_state_items(skeleton):
        for key, tensor in items:
            expected[key] = (tuple(tensor.shape), tensor.dtype)
    provided: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for path, entries in headers:
        for key, (shape, _dtype) in entries.items():
            provided[key] = (path, shape)
    for alias, target in aliases.items():
        if target in provided:
            provided[alias] = provided[target]
    inside = tuple(name + "." for name in wrapped)
    for key, (path, shape) in provided.items():
        # A wrapper's own tensors may be data-dependent in shape (sparse values): the wrapper checks them.
        if key in expected and not key.startswith(inside) and expected[key][0] != shape:
            raise LoadError(f"{path}: tensor {key!r} has shape {list(shape)}, the skeleton expects "
                            f"{list(expected[key][0])}")
    if strict:
        missing = sorted(set(expected) - set(provided))
        unexpected = sorted(set(provided) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:20]}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:20]}")
            raise LoadError(f"{directory}: state does not match the skeleton: " + "; ".join(parts))


def _snapshot_tensors(model: nn.Module) -> List[Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]]:
    """Every module's parameter and buffer dicts (references, no copies): restoring them undoes a load."""
    return [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]


def _restore_tensors(snapshot) -> None:
    for module, params, buffers in snapshot:
        module._parameters.clear()
        module._parameters.update(params)
        module._buffers.clear()
        module._buffers.update(buffers)


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
    Tied parameters of the skeleton stay tied, unless the files hold a separate tensor for each name
    (the saved model had untied them, as ``Rotate`` does). Returns the (same) skeleton object.

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...): where the loaded model lives, whatever device
    the model was saved from. Tensors are read from the files straight onto it, compressed wrappers
    pick their kernels for it, and the skeleton's non-persistent buffers (not in the files, e.g.
    rotary ``inv_freq``) are moved there too.

    All or nothing: the manifest and every tensor file's header (save id, names, shapes) are checked
    before a tensor is assigned, and on any failure the skeleton is left exactly as it was. Errors
    name the file and what is wrong with it. Only files inside ``directory`` are ever read.
    """
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    device = torch.device(device)
    headers = _read_headers(directory, manifest, device)
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
            raise LoadError(f"{os.path.join(directory, MANIFEST_NAME)}: module {name!r} has unknown type "
                            f"{entry['type']!r}; known: {sorted(_MODULE_TYPES)}")
        if not any(name.startswith(outer + ".") for outer in modules):
            get_submodule(skeleton, name)  # clear error if the skeleton lacks the layer
        try:
            replacements[name] = cls.from_config(entry["config"], device="meta")
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"{os.path.join(directory, MANIFEST_NAME)}: module {name!r} ({entry['type']}) has an "
                            f"invalid config: {type(exc).__name__}: {exc}") from None
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
    aliases = manifest.get("aliases", {})
    snapshot = _snapshot_tensors(skeleton)
    had_resized = RESIZED_ATTR in skeleton.__dict__
    old_resized = skeleton.__dict__.get(RESIZED_ATTR)
    originals = {name: set_submodule(skeleton, name, module) for name, module in replacements.items()}
    old_values: list = []
    try:
        # Shared wrappers (a tied head that is the embedding's table): one rebuilt module under every name.
        for alias, target in manifest.get("shared_modules", {}).items():
            shared_module = get_submodule(skeleton, target)
            get_submodule(skeleton, alias)  # clear error if the skeleton lacks it
            originals[alias] = set_submodule(skeleton, alias, shared_module)
        _apply_resized_values(skeleton, resized, old_values)
        _check_against_skeleton(skeleton, directory, headers, aliases, list(modules), strict)
        # One shard at a time: a module's tensors are always in one shard, so each wrapper sees all of
        # its canonical tensors in one call and converts them to its kernel layout; the shard's
        # temporaries are freed before the next one is read.
        for path, _entries in headers:
            try:
                state = load_file(path, device=str(device))
            except Exception as exc:
                raise LoadError(f"{path}: cannot read tensors ({type(exc).__name__}: {exc})") from None
            for alias, target in aliases.items():
                if target in state:
                    state[alias] = state[target]
            try:
                skeleton.load_state_dict(state, strict=False, assign=True)
            except RuntimeError as exc:
                raise LoadError(f"{path}: {exc}") from None
            del state
        if resized:
            object.__setattr__(skeleton, RESIZED_ATTR, json.loads(json.dumps(resized)))
        stored = {key for _path, entries in headers for key in entries}
        for names in tie_groups:
            if sum(name in stored for name in names) > 1:
                # The save wrote each name's own tensor (not an alias): the saved model had untied them
                # (Rotate gives the head its own rotated copy), so tying them again would be wrong.
                continue
            first = _get_param(skeleton, names[0])
            if first is None:
                continue
            for other in names[1:]:
                if _get_param(skeleton, other) is not None:
                    _set_param(skeleton, other, first)
        _restore_non_persistent_dtypes(skeleton, manifest.get("non_persistent_dtypes", {}))
        _move_non_persistent_buffers(skeleton, device)
        _check_materialized(skeleton)
    except BaseException:
        for name in reversed(list(originals)):  # inner wrappers first, then the outer ones
            set_submodule(skeleton, name, originals[name])
        for obj, attr, value in reversed(old_values):
            setattr(obj, attr, value)
        _restore_tensors(snapshot)
        if had_resized:
            object.__setattr__(skeleton, RESIZED_ATTR, old_resized)
        else:
            skeleton.__dict__.pop(RESIZED_ATTR, None)
        raise
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


def _move_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Put the buffers the files do not hold on the load device: a CPU skeleton loaded with
    ``device="cuda"`` would otherwise compute with CUDA weights and CPU buffers. Meta buffers stay
    (``_check_materialized`` names them)."""
    for _, module, bname, buf in _non_persistent_buffers(model):
        if buf.device.type != "meta":
            module._buffers[bname] = buf.to(device)


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
