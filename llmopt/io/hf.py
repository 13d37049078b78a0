"""Hugging Face round trip: save a compressed transformers model as a self-contained directory and
rebuild it in a fresh process from that directory alone.

The directory holds what transformers needs to build the architecture (``config.json``,
``generation_config.json``, the tokenizer files) next to llmopt's own ``model.safetensors`` (or
shards) and ``llmopt.json`` manifest. Loading builds the model from the config with parameters on
the meta device (no memory spent on random weights), lets :func:`llmopt.load` put the compressed
wrappers and the saved tensors in place (structurally pruned layers at their new shapes), and
returns the model and its tokenizer. Nothing is downloaded: every file is local.

Requires the ``hf`` extra (transformers, accelerate).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..core.files import new_save_id, write_bytes_atomic
from .save import DEFAULT_SHARD_BYTES, check_json_metadata, load, read_manifest, save

__all__ = ["save_pretrained", "load_pretrained", "HF_METADATA_KEY"]

HF_METADATA_KEY = "hf"


def _require_hf():
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("the Hugging Face round trip needs transformers and accelerate: "
                          "pip install 'llmopt[hf]'") from None


def save_pretrained(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    tokenizer: Any = None,
    metadata: Optional[Dict[str, Any]] = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> str:
    """Save a (compressed) transformers model so :func:`load_pretrained` can rebuild it from ``directory`` alone.

    Writes the model's config (with any shapes structured pruning changed), its generation config,
    the tokenizer when given, and the tensors and manifest of :func:`llmopt.save` (streamed in shards
    of at most ``max_shard_bytes``). ``metadata`` (JSON) is kept in the manifest, e.g. the recipe.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        raise TypeError(f"save_pretrained needs a transformers model with a .config, got {type(model).__name__}; "
                        "use llmopt.save for other models")
    directory = os.fspath(directory)
    # The config describes the uncompressed architecture; llmopt.json says what replaced what. A copy
    # of it goes into the manifest, which is replaced atomically with the tensors it describes: loading
    # builds from that copy, so a crash between writing config.json and the manifest cannot pair the
    # old tensors with a new architecture.
    config_json = config.to_json_string(use_diff=False)
    generation = getattr(model, "generation_config", None)
    generation_json = None
    if generation is not None and hasattr(generation, "to_json_string"):
        try:
            generation.validate()
            generation_json = generation.to_json_string(use_diff=True)
        except (ValueError, TypeError):  # an invalid generation config must not lose the model
            generation_json = None
    architectures = list(getattr(config, "architectures", None) or [type(model).__name__])
    meta = dict(metadata or {})
    meta[HF_METADATA_KEY] = {"architectures": architectures, "class": type(model).__name__,
                             "config": json.loads(config_json)}
    check_json_metadata(meta)  # before anything is written
    os.makedirs(directory, exist_ok=True)
    save_id = new_save_id()
    write_bytes_atomic(os.path.join(directory, "config.json"), config_json.encode(), save_id=save_id)
    if generation_json is not None:
        write_bytes_atomic(os.path.join(directory, "generation_config.json"), generation_json.encode(),
                           save_id=save_id)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    save(model, directory, metadata=meta, max_shard_bytes=max_shard_bytes)
    return directory


def _model_class(manifest: Dict[str, Any], config: Any):
    """The transformers class to build: the saved class name if transformers has it, else the
    architecture in the config, else ``AutoModelForCausalLM``."""
    import transformers

    hf = manifest.get("metadata", {}).get(HF_METADATA_KEY, {})
    for name in [hf.get("class")] + list(hf.get("architectures") or []) + list(getattr(config, "architectures", None)
                                                                          or []):
        cls = getattr(transformers, name, None) if name else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    return None


def load_pretrained(
    directory: Union[str, os.PathLike],
    *,
    device: Union[str, torch.device] = "cpu",
    with_tokenizer: bool = True,
) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` rebuilt from a directory written by :func:`save_pretrained`.

    The architecture comes from the saved ``config.json`` (built with parameters on the meta
    device, buffers real), the compressed layers and every tensor from llmopt's manifest and
    safetensors files: the result is bit-exact with the saved model and generates the same tokens.
    ``tokenizer`` is ``None`` when none was saved (or ``with_tokenizer=False``).
    """
    _require_hf()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory written by llmopt.save_pretrained")
    manifest = read_manifest(directory)
    saved = manifest.get("metadata", {}).get(HF_METADATA_KEY, {}).get("config")
    if saved is None and not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory}/config.json is missing: the directory was written by llmopt.save, not "
                                "save_pretrained; build the architecture yourself and call llmopt.load(skeleton, dir)")
    if isinstance(saved, dict) and isinstance(saved.get("model_type"), str):
        # The copy saved with the tensors (see save_pretrained); config.json is for other tools.
        fields = {k: v for k, v in saved.items() if k != "model_type"}
        config = AutoConfig.for_model(saved["model_type"], **fields)
    else:  # saves written before the manifest carried the config
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    cls = _model_class(manifest, config)
    # Parameters on meta (every one is replaced from the file); buffers real, because non-persistent
    # ones (rotary inv_freq) are not saved and must be computed by the constructor.
    with init_empty_weights(include_buffers=False):
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    load(model, directory, device=device)
    model.eval()
    if hasattr(model, "generation_config"):
        try:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError):
            pass
    tokenizer = None
    if with_tokenizer and any(os.path.isfile(os.path.join(directory, f))
                              for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer
