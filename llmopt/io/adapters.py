"""LoRA adapters on disk, apart from the model: ``adapters.safetensors`` + ``adapters.json``. No pickle."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from .._version import __version__
from ..core.measure import total_parameters, trainable_parameters
from ..core.targets import (
    get_submodule,
    replace_modules,
    requires_grad_flags,
    restore_modules,
    restore_requires_grad,
)
from ..methods.lowrank.lora import (
    LoRAError,
    _freeze_all_but_adapters,
    lora_layers,
)
from ..nn.lora_linear import LoRALinear
from ..pipeline.report import LoRAReport
from ..core.files import (
    LoadError,
    finish_file,
    member_path,
    new_save_id,
    read_json_member,
    remove_quietly,
    temp_path,
    write_bytes_atomic,
)
from .save import SAVE_ID_KEY, check_json_metadata

__all__ = ["lora_state_dict", "save_adapters", "load_adapters", "ADAPTERS_MANIFEST", "ADAPTERS_TENSORS"]

ADAPTERS_MANIFEST = "adapters.json"
ADAPTERS_TENSORS = "adapters.safetensors"
ADAPTERS_FORMAT_VERSION = 1


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors only: ``{"<layer>.lora_A.weight": ..., "<layer>.lora_B.weight": ...,
    ["<layer>.lora_magnitude": ...]}`` (detached, not copied)."""
    return {f"{name}.{key}": p.detach() for name, layer in lora_layers(model).items()
            for key, p in layer.adapter_parameters().items()}


def save_adapters(model: nn.Module, directory: Union[str, os.PathLike],
                  metadata: Optional[Dict[str, Any]] = None) -> str:
    """Write the adapters of ``model`` to ``directory``: ``adapters.safetensors`` + ``adapters.json``.

    The JSON holds each wrapped layer's name and settings (rank, alpha, dropout, rsLoRA, DoRA, init,
    dtype, shape). No pickle. Returns the directory.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapters: the model has no LoRALinear layers")
    directory = os.fspath(directory)
    manifest = {
        "kind": "llmopt-lora-adapters",
        "format_version": ADAPTERS_FORMAT_VERSION,
        "llmopt_version": __version__,
        "save_id": "",
        "tensors": ADAPTERS_TENSORS,
        "tensor_bytes": 0,
        "layers": {name: layer.settings() for name, layer in layers.items()},
        "metadata": metadata or {},
    }
    if not isinstance(manifest["metadata"], dict):
        raise TypeError(f"save_adapters: metadata must be a dict of JSON values, got {type(metadata).__name__}")
    check_json_metadata(manifest["metadata"])  # before anything is written
    tensors = {key: t.to("cpu").contiguous().clone() for key, t in lora_state_dict(model).items()}
    os.makedirs(directory, exist_ok=True)
    # Same protocol as llmopt.save: a new tensor file never overwrites the one the current manifest
    # names, the manifest is replaced atomically last (the commit point), then the old file goes.
    save_id = new_save_id()
    name = ADAPTERS_TENSORS
    if os.path.lexists(os.path.join(directory, name)):
        name = f"adapters-{save_id[:8]}.safetensors"
    tmp = temp_path(directory, save_id, name)
    final = os.path.join(directory, name)
    try:
        with open(tmp, "wb") as f:
            f.write(safetensors_save(tensors, metadata={"format": "pt", "llmopt": "lora", SAVE_ID_KEY: save_id}))
            finish_file(f)
        os.replace(tmp, final)
        manifest.update(save_id=save_id, tensors=name, tensor_bytes=os.path.getsize(final))
        write_bytes_atomic(os.path.join(directory, ADAPTERS_MANIFEST),
                           json.dumps(manifest, indent=2, sort_keys=True).encode(), save_id=save_id)
    except BaseException:
        remove_quietly(tmp)
        if name != ADAPTERS_TENSORS:
            remove_quietly(final)
        raise
    for fname in os.listdir(directory):  # the previous save's tensor file and crashed saves' leftovers
        if fname.startswith("adapters") and fname.endswith(".safetensors") and fname != name:
            remove_quietly(os.path.join(directory, fname))
    return directory


def _read_adapter_files(directory: str) -> tuple:
    """``(manifest, tensors)`` of an adapter directory, every problem reported with the file's path."""
    path = os.path.join(directory, ADAPTERS_MANIFEST)
    manifest = read_json_member(directory, ADAPTERS_MANIFEST, written_by="save_adapters")
    if not isinstance(manifest, dict) or manifest.get("kind") != "llmopt-lora-adapters":
        raise LoadError(f"{path} is not an llmopt adapter manifest")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise LoadError(f"{path}: format_version must be an integer, got {version!r}")
    if version > ADAPTERS_FORMAT_VERSION:
        raise LoadError(f"{path} has format_version {version}; this llmopt reads up to "
                        f"{ADAPTERS_FORMAT_VERSION}: upgrade llmopt")
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise LoadError(f"{path}: 'layers' must map layer names to settings objects")
    missing = [f"{name}.{key}" for name, settings in layers.items() for key in _REQUIRED_SETTINGS
               if key not in settings]
    if missing:
        raise LoadError(f"{path}: layer settings lack {missing[:5]}")
    tensors_path = member_path(directory, manifest.get("tensors", ADAPTERS_TENSORS), source=path, what="tensor file")
    size = manifest.get("tensor_bytes")
    if isinstance(size, int) and os.path.getsize(tensors_path) != size:
        raise LoadError(f"{tensors_path}: {os.path.getsize(tensors_path)} bytes where {path} recorded {size}: "
                        "the file is truncated or belongs to another save")
    try:
        with safe_open(tensors_path, framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(tensors_path)
    except Exception as exc:  # safetensors' own errors do not name the file
        raise LoadError(f"{tensors_path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    save_id = manifest.get("save_id")
    if save_id and header.get(SAVE_ID_KEY) != save_id:
        raise LoadError(f"{tensors_path} does not belong to the save {path} describes: the directory mixes "
                        "files of different saves")
    return manifest, tensors


_REQUIRED_SETTINGS = ("rank", "alpha", "dropout", "use_rslora", "use_dora", "dtype", "in_features", "out_features")
_MATCHED_SETTINGS = ("rank", "alpha", "use_rslora", "use_dora", "dtype", "in_features", "out_features")


def load_adapters(model: nn.Module, directory: Union[str, os.PathLike], *, freeze_base: bool = True
                  ) -> LoRAReport:
    """Load adapters written by :func:`save_adapters` into ``model``; all or nothing, bit-exact.

    A named layer that is already a ``LoRALinear`` gets its adapter tensors replaced (its settings
    must match the file's); a plain layer (``nn.Linear``, ``QuantLinear``, ...) is wrapped first.
    Adapters initialised with PiSSA/LoftQ were trained against a modified base: they can only be
    loaded into layers that already carry it (rebuild it by running the same ``compress_(model, LoRA(...))``
    on the same original model), or save the whole model with ``llmopt.save`` instead.
    """
    directory = os.fspath(directory)
    manifest, tensors = _read_adapter_files(directory)
    start = time.perf_counter()
    report = LoRAReport()

    # 1. Validate everything before touching the model.
    plan: Dict[str, Dict[str, Any]] = {}
    used = set()
    for name, settings in manifest["layers"].items():
        try:
            module = get_submodule(model, name)
        except KeyError:
            raise LoRAError(f"{directory}: the model has no layer {name!r}") from None
        if isinstance(module, LoRALinear):
            if module.merged:
                raise LoRAError(f"layer {name!r} is merged: unmerge it before loading adapters")
            ours = module.settings()
            diff = [f"{k}={settings.get(k)!r} (layer has {ours[k]!r})" for k in _MATCHED_SETTINGS
                    if settings.get(k) != ours[k]]
            if diff:
                raise LoRAError(f"layer {name!r}: adapters in {directory} do not match: {', '.join(diff)}")
        else:
            if settings.get("init", "gaussian") != "gaussian":
                raise LoRAError(f"layer {name!r}: these adapters were initialised with {settings['init']!r}, "
                                "which also changed the base weights; run the same compress_(model, LoRA(...)) on the original "
                                "model first, then load them (or save the whole model with llmopt.save)")
            if (getattr(module, "in_features", None), getattr(module, "out_features", None)) != \
                    (settings["in_features"], settings["out_features"]):
                raise LoRAError(f"layer {name!r}: shape {getattr(module, 'in_features', None)} -> "
                                f"{getattr(module, 'out_features', None)} does not match the adapters' "
                                f"{settings['in_features']} -> {settings['out_features']}")
        r, n_in, n_out = settings["rank"], settings["in_features"], settings["out_features"]
        shapes = {"lora_A.weight": (r, n_in), "lora_B.weight": (n_out, r)}
        if settings["use_dora"]:
            shapes["lora_magnitude"] = (n_out,)
        values = {}
        for key, shape in shapes.items():
            full = f"{name}.{key}"
            t = tensors.get(full)
            if t is None:
                raise LoRAError(f"{directory}: tensor {full!r} is missing")
            if tuple(t.shape) != shape or str(t.dtype).replace("torch.", "") != settings["dtype"]:
                raise LoRAError(f"{directory}: tensor {full!r} is {str(t.dtype)} {tuple(t.shape)}, expected "
                                f"{settings['dtype']} {shape}")
            values[key] = t
            used.add(full)
        plan[name] = {"module": module, "settings": settings, "values": values}
    extra = sorted(set(tensors) - used)
    if extra:
        raise LoRAError(f"{directory}: tensors {extra[:5]} belong to no listed layer")

    # 2. Build wrappers for plain layers, then swap and copy (undone on any failure).
    flags = requires_grad_flags(model)
    swapped: Dict[str, nn.Module] = {}
    previous: List[tuple] = []
    try:
        new: Dict[str, nn.Module] = {}
        for name, item in plan.items():
            if not isinstance(item["module"], LoRALinear):
                s = item["settings"]
                try:
                    new[name] = LoRALinear(item["module"], s["rank"], s["alpha"], s["dropout"], s["use_rslora"],
                                           s["use_dora"], dtype=s["dtype"])
                except Exception as exc:
                    raise LoRAError(f"layer {name!r} (load adapters): {exc}") from exc
        swapped = replace_modules(model, new)
        with torch.no_grad():
            for name, item in plan.items():
                params = get_submodule(model, name).adapter_parameters()
                for key, value in item["values"].items():
                    p = params[key]
                    previous.append((p, p.detach().clone()))
                    p.copy_(value.to(p.device))
        if freeze_base:
            _freeze_all_but_adapters(model)
    except BaseException:
        with torch.no_grad():
            for p, value in previous:
                p.copy_(value)
        restore_modules(model, swapped)
        restore_requires_grad(flags)
        raise
    for name in plan:
        report.replaced[name] = repr(get_submodule(model, name))
    report.trainable_parameters = trainable_parameters(model)
    report.total_parameters = total_parameters(model)
    report.seconds = time.perf_counter() - start
    return report
