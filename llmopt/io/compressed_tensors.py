"""Checkpoints other tools read and write: compressed-tensors ``pack-quantized`` export and import, and
GPTQ (AutoGPTQ / GPTQModel layout, ``gptq`` v1 and ``gptq_v2``) import.

Export (:func:`export_compressed_tensors`) writes a directory that transformers (with the
``compressed-tensors`` package) loads and vLLM serves: ``config.json`` with a ``quantization_config``
as the compressed-tensors spec defines it, the tensors in safetensors, the tokenizer when given.
Import (:func:`load_compressed_tensors`, :func:`load_gptq`, or :func:`load_quantized` which reads
``quant_method``) rebuilds the model with :class:`~llmopt.nn.QuantLinear` layers holding the same
codes, scales and zero points as the files.

Conventions mapped (``mid = 2**(bits-1)``):

* llmopt: ``w = (code - mid) * scale + zero_point`` (``code`` unsigned, ``zero_point`` a float, absent
  when symmetric).
* compressed-tensors: ``w = (q - zp) * scale`` with signed ``q = code - mid`` and a signed integer
  ``zp`` (absent when symmetric); so ``zp = -zero_point / scale``, which must be an integer in
  ``[-mid, mid - 1]`` for the mapping to be exact (checked numerically per layer).
* GPTQ: ``w = (code - z) * scale`` with unsigned integer ``z`` (v1 files store ``z - 1``); so
  ``zero_point = (mid - z) * scale``.

Only grids whose codes tile an int32 word (2, 4 and 8 bits) are read or written: for 3, 5, 6 and 7
bits the packing differs between compressed-tensors versions and GPTQ implementations.

Requires transformers and accelerate (the ``hf`` extra); loading the export with transformers needs
the ``compressed-tensors`` package (the ``export`` extra).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..core.files import (LoadError, fsync_directory, member_path, new_save_id, read_json_member, remove_quietly,
                          temp_path, write_bytes_atomic)
from ..core.formats import AffineFormat
from ..nn.base import CompressedLinear
from ..nn.quant_embedding import QuantEmbedding
from ..nn.quant_linear import QuantLinear

__all__ = ["export_compressed_tensors", "load_compressed_tensors", "load_gptq", "load_quantized",
           "ExportError", "PACKABLE_BITS"]

PACKABLE_BITS = (2, 4, 8)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 1024 ** 3


class ExportError(ValueError):
    """A model (or one of its layers) that the target format cannot represent exactly."""


# ---------------------------------------------------------------------------------------------- packing
def _pack_rows(values: Tensor, bits: int) -> Tensor:
    """Unsigned ``values [R, C]`` (each < 2**bits) packed along dim 1 into int32 ``[R, ceil(C*bits/32)]``:
    value ``c`` at bit ``(c % per_word) * bits`` of word ``c // per_word`` (little end first)."""
    per_word = 32 // bits
    rows, cols = values.shape
    words = -(-cols // per_word)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64)
    padded[:, :cols] = values.to(torch.int64)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (padded.view(rows, words, per_word) << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # the int32 bit pattern
    return packed.to(torch.int32)


def _unpack_rows(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`_pack_rows`: int32 ``[R, W]`` -> int64 ``[R, cols]`` unsigned values."""
    per_word = 32 // bits
    rows, words = packed.shape
    if words * per_word < cols or words != -(-cols // per_word):
        raise LoadError(f"packed tensor has {words} int32 words per row, {cols} {bits}-bit values need "
                        f"{-(-cols // per_word)}")
    wide = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (wide.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(rows, words * per_word)[:, :cols]


# ---------------------------------------------------------------------------------------------- export
def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _scheme_of(name: str, layer: QuantLinear) -> Tuple[int, bool, Optional[int]]:
    """``(bits, symmetric, group_size or None for per-channel)`` of an exportable layer, or ExportError."""
    fmt = layer.format
    if not isinstance(fmt, AffineFormat):
        raise ExportError(f"{name}: format {fmt.name!r} is not an integer grid; compressed-tensors "
                          "pack-quantized stores int2/int4/int8 only")
    if fmt.bits not in PACKABLE_BITS:
        raise ExportError(f"{name}: {fmt.bits}-bit codes are not exported (pack-quantized is written for "
                          f"{', '.join(map(str, PACKABLE_BITS))} bits; vLLM serves 4 and 8)")
    if layer.input_scale is not None:
        raise ExportError(f"{name}: the layer carries a per-column input_scale (AWQ/SmoothQuant scales not "
                          "folded into a preceding layer), which compressed-tensors cannot express")
    if layer.act_bits is not None:
        raise ExportError(f"{name}: activation quantization (act_bits={layer.act_bits}) is not exported; "
                          "export a weight-only model")
    group = layer.group_size
    if group >= layer.in_features:
        return fmt.bits, fmt.symmetric, None
    if layer.in_features % group:
        raise ExportError(f"{name}: in_features {layer.in_features} is not a multiple of group_size {group} "
                          "(compressed-tensors needs whole groups)")
    return fmt.bits, fmt.symmetric, group


def _integer_zero_point(name: str, layer: QuantLinear, requantize: bool,
                        report: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    """``(codes [N, K] uint8, signed integer zero point [N, G] int64)`` of an asymmetric layer.

    Accepted when ``-zero_point / scale`` is an integer ``zp`` in ``[-mid, mid - 1]`` for every group,
    i.e. when llmopt's zero point is ``-zp * scale`` as stored in the zero point's dtype (exactly, or
    rounded to that dtype when the product needs more mantissa bits than it has: the report's
    ``zero_point_rounding`` gives the largest such difference, 0 when exact). Otherwise ExportError,
    or with ``requantize`` the zero point is rounded onto the integer grid and the codes re-rounded
    against it (the added error goes into the report's ``requantized``)."""
    mid = layer.format.mid
    state = layer.canonical_state()
    scale = state["scale"].to(torch.float64)
    stored = state["zero_point"]
    zero = stored.to(torch.float64)
    ratio = -zero / scale
    zp = ratio.round().clamp(-mid, mid - 1)
    exact_zero = -zp * scale
    ok = exact_zero.to(stored.dtype).to(torch.float64) == zero
    codes = layer.codes()
    if bool(ok.all()):
        gap = float((exact_zero - zero).abs().max())
        report["zero_point_rounding"] = max(report.get("zero_point_rounding", 0.0), gap)
        return codes, zp.to(torch.int64)
    bad = int((~ok).sum())
    if not requantize:
        raise ExportError(
            f"{name}: {bad} of {ok.numel()} zero points are not on the integer grid "
            f"(-zero_point/scale = {float(ratio[~ok][0]):.6g}, ...); compressed-tensors stores an integer "
            "zero point. Quantize with an integer zero point (zero_point='int' in RTN/GPTQ/AWQ/HQQ), or pass "
            "requantize=True to round it (adds error, reported)")
    k = codes.shape[1]
    g = layer.group_size
    weight = layer.dequantize_weight(torch.float64)
    scale_full = scale.repeat_interleave(g, dim=1)[:, :k]
    zp_full = zp.repeat_interleave(g, dim=1)[:, :k]
    q = (weight / scale_full + zp_full).round().clamp(-mid, mid - 1)
    new_weight = (q - zp_full) * scale_full
    err = (new_weight - weight).abs()
    report["requantized"].append({"layer": name, "groups": bad, "max_abs_error": float(err.max()),
                                  "mean_abs_error": float(err.mean())})
    return (q + mid).to(torch.uint8), zp.to(torch.int64)


def _file_scale(scale: Tensor, model_dtype: torch.dtype) -> Tensor:
    """The scale as written: in the layer's float dtype when that holds every value exactly (the
    compressed-tensors convention; its loader multiplies in the scale's dtype, so a bfloat16 scale on a
    float32 model would round the products), else in llmopt's scale dtype unchanged."""
    cast = scale.to(model_dtype)
    if model_dtype.is_floating_point and torch.equal(cast.to(scale.dtype), scale) and bool(torch.isfinite(cast).all()):
        return cast.contiguous()
    return scale.contiguous()


def _layer_tensors(name: str, layer: QuantLinear, requantize: bool, report: Dict[str, Any]) -> Dict[str, Tensor]:
    bits, symmetric, _ = _scheme_of(name, layer)
    state = layer.canonical_state()
    if symmetric:
        codes, zp = layer.codes(), None
    else:
        codes, zp = _integer_zero_point(name, layer, requantize, report)
    out = {
        f"{name}.weight_packed": _pack_rows(codes.cpu(), bits),
        f"{name}.weight_scale": _file_scale(state["scale"].detach().cpu(), layer.weight_dtype),
        f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if zp is not None:  # signed, stored offset by mid, packed along the output dim
        out[f"{name}.weight_zero_point"] = _pack_rows((zp + layer.format.mid).t().cpu(), bits).t().contiguous()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().cpu().to(layer.weight_dtype).contiguous()
    return out


def _weights_args(bits: int, symmetric: bool, group: Optional[int]) -> Dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if group is None else "group", "group_size": group,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def _embedding_tables(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every :class:`QuantEmbedding`, and of every other name its ``QuantLinear`` table
    is held under (a tied head), each once."""
    found: Dict[str, nn.Module] = {}
    linears = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantEmbedding) and not any(name.startswith(t + ".") for t in found):
            found[name] = module
            linears[id(module.linear)] = f"{name}.linear"
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in linears and name != linears[id(module)] and not any(name.startswith(t + ".") for t in found):
            found[name] = module
    return found


def _write_safetensors(directory: str, tensors: Dict[str, Tensor], save_id: str,
                       max_shard_bytes: int) -> List[str]:
    """Write ``tensors`` as one file or shards + index (temp names, fsync, rename); returns the names."""
    from safetensors.torch import save_file

    shards: List[Dict[str, Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written: List[Tuple[str, str]] = []
    try:
        for shard, name in zip(shards, names):
            tmp = temp_path(directory, save_id, name)
            written.append((tmp, name))
            save_file(shard, tmp, metadata={"format": "pt"})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, name in written:
            os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        for tmp, _ in written:
            remove_quietly(tmp)
        raise
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {key: name for shard, name in zip(shards, names) for key in shard}}
        write_bytes_atomic(os.path.join(directory, INDEX_FILE), json.dumps(index, indent=2).encode(),
                           save_id=save_id)
    else:
        remove_quietly(os.path.join(directory, INDEX_FILE))  # a stale index would shadow the new file
    fsync_directory(directory)
    return names


def export_compressed_tensors(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    tokenizer: Any = None,
    requantize: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Dict[str, Any]:
    """Write ``model`` as a compressed-tensors ``pack-quantized`` checkpoint; returns a report dict.

    Every :class:`~llmopt.nn.QuantLinear` on an int2/int4/int8 grid (group or per-channel, symmetric
    or asymmetric) is written as ``weight_packed`` (int32, the codes, 32/bits per word),
    ``weight_scale`` (the same values, in the layer's float dtype when that holds them exactly, else in
    llmopt's scale dtype), ``weight_shape`` and, when asymmetric,
    ``weight_zero_point`` (the signed integer zero point, packed along the output dim). Plain
    ``nn.Linear`` layers are written as float weights and listed in ``ignore``; every other
    tensor (embeddings, norms) as it is. One scheme gives one config group targeting ``"Linear"``;
    several give one group per scheme targeting its layers by exact-name regex. A
    :class:`~llmopt.nn.QuantEmbedding` is written as its dequantized table (``<name>.weight`` in the
    embedding's dtype: compressed-tensors has no quantized embedding its loaders run); a head that is
    its table (tied) is left to the loader to re-tie, or, in a model whose config does not tie them,
    written as the same dequantized table.

    An asymmetric layer whose zero point is not on the integer grid (``-zero_point / scale`` not an
    integer) is refused naming the layer, unless ``requantize=True``: then its zero point is rounded
    and the codes re-rounded, and the report's ``requantized`` lists the error added per layer.
    Other llmopt layers (LoRA, sparse, low-rank, W8A8, non-integer formats) are refused.

    The report: ``{"directory", "files", "quantized": {name: "int4 g32 sym"}, "ignore": [...],
    "config_groups": n, "requantized": [...]}``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError(f"export_compressed_tensors needs a transformers model with a .config, "
                        f"got {type(model).__name__}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = os.fspath(directory)
    report: Dict[str, Any] = {"directory": directory, "quantized": {}, "ignore": [], "requantized": [],
                              "zero_point_rounding": 0.0}

    quantized: Dict[str, QuantLinear] = {}
    schemes: Dict[Tuple[int, bool, Optional[int]], List[str]] = {}
    ignore: List[str] = []
    tables = _embedding_tables(model)  # {name: QuantEmbedding or the QuantLinear table of one}
    for name, module in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in tables):
            continue
        if isinstance(module, QuantLinear):
            if any(name.startswith(q + ".") for q in quantized):
                continue
            key = _scheme_of(name, module)
            quantized[name] = module
            schemes.setdefault(key, []).append(name)
        elif isinstance(module, CompressedLinear):
            raise ExportError(f"{name}: {type(module).__name__} layers are not exported to compressed-tensors "
                              "(only QuantLinear on an integer grid); merge or remove it first")
        elif isinstance(module, nn.Linear):
            ignore.append(name)
    if not quantized:
        raise ExportError("the model has no QuantLinear layer: nothing to export as pack-quantized "
                          "(use model.save_pretrained for a float model)")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        for name, module in quantized.items():
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if out is module and emb is not None:
                raise ExportError(f"{name}: the output embedding is quantized but the config ties it to the "
                                  "input embedding (tie_word_embeddings=True); loaders would re-tie it")

    tensors: Dict[str, Tensor] = {}
    for name, layer in quantized.items():
        tensors.update(_layer_tensors(name, layer, requantize, report))
    for name, table in tables.items():
        if isinstance(table, QuantEmbedding):
            tensors[f"{name}.weight"] = table.dequantize_weight().detach().cpu().contiguous()
            report.setdefault("dequantized", []).append(name)
            continue
        ignore.append(name)  # a head on the embedding's table: a float Linear for the loader (re-tied if tied)
        if not tied:  # a head sharing an embedding's table in a model whose config does not tie them
            tensors[f"{name}.weight"] = table.dequantize_weight().detach().cpu().contiguous()
            if table.bias is not None:
                tensors[f"{name}.bias"] = table.bias.detach().cpu().contiguous().clone()
            report.setdefault("dequantized", []).append(name)
    seen: Dict[Tuple[int, int], str] = {}
    for key, t in model.state_dict().items():
        if any(key.startswith(q + ".") for q in list(quantized) + list(tables)):
            continue
        if t.device.type == "meta":
            raise ExportError(f"{key} is on the meta device (an offloaded or unloaded model): nothing to write")
        t = t.detach().cpu()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ident is not None and ident in seen and tied:
            continue  # the tied copy (lm_head.weight = embed_tokens.weight): loaders re-tie it
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.contiguous().clone()  # safetensors refuses tensors that share memory

    groups: Dict[str, Any] = {}
    single = len(schemes) == 1
    for i, ((bits, symmetric, group), names) in enumerate(schemes.items()):
        targets = ["Linear"] if single else ["re:^" + re.escape(n) + "$" for n in names]
        groups[f"group_{i}"] = {"targets": targets, "weights": _weights_args(bits, symmetric, group),
                                "input_activations": None, "output_activations": None,
                                "format": "pack-quantized"}
        label = f"int{bits} " + ("channel" if group is None else f"g{group}") + (" sym" if symmetric else " asym")
        for n in names:
            report["quantized"][n] = label
    quant_config = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
    }
    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict["quantization_config"] = quant_config
    report["ignore"] = ignore
    report["config_groups"] = len(groups)

    os.makedirs(directory, exist_ok=True)
    save_id = new_save_id()
    # Tensors first, config.json (what makes the directory a compressed-tensors checkpoint) last.
    report["files"] = _write_safetensors(directory, tensors, save_id, max_shard_bytes)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        try:
            generation.validate()
            write_bytes_atomic(os.path.join(directory, "generation_config.json"),
                               generation.to_json_string(use_diff=True).encode(), save_id=save_id)
        except (ValueError, TypeError):
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_bytes_atomic(os.path.join(directory, "config.json"),
                       (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode(), save_id=save_id)
    return report


# ---------------------------------------------------------------------------------------------- import
def _read_config(directory: str) -> Dict[str, Any]:
    config = read_json_member(directory, "config.json", written_by="a Hugging Face save")
    if not isinstance(config, dict):
        raise LoadError(f"{directory}/config.json is not a JSON object")
    return config


def _tensor_files(directory: str) -> List[str]:
    """The safetensors files of a checkpoint: the index's ``weight_map`` (each file confined to the
    directory) or ``model.safetensors``."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.lexists(index_path):
        index = read_json_member(directory, INDEX_FILE, written_by="a Hugging Face save")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{index_path}: no 'weight_map' object naming the tensor files")
        names = sorted(set(weight_map.values()), key=str)
        return [member_path(directory, n, source=index_path, what="tensor file") for n in names]
    if os.path.lexists(os.path.join(directory, SINGLE_FILE)):
        return [member_path(directory, SINGLE_FILE, source=directory, what="tensor file")]
    raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _read_tensors(directory: str) -> Dict[str, Tensor]:
    from safetensors import safe_open

    tensors: Dict[str, Tensor] = {}
    for path in _tensor_files(directory):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in tensors:
                    raise LoadError(f"{path}: tensor {key!r} appears in two files")
                tensors[key] = f.get_tensor(key)
    return tensors


def _skeleton(config_dict: Dict[str, Any]) -> nn.Module:
    """The architecture of ``config.json`` (without its quantization_config), parameters on meta."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ImportError("importing checkpoints needs transformers and accelerate: pip install 'llmopt[hf]'") from None
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "quantization_config")}
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str):
        raise LoadError("config.json has no 'model_type': not a transformers checkpoint")
    config = AutoConfig.for_model(model_type, **fields)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _linear(model: nn.Module, name: str, source: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise LoadError(f"{source}: quantized layer {name!r} is not a module of the architecture") from None
    if not isinstance(module, nn.Linear):
        raise LoadError(f"{source}: {name!r} is a {type(module).__name__}, not a Linear layer")
    return module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _zero_point_float(zp_signed: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` for llmopt from a signed integer zero point (``w = (q - zp) * s``):
    ``zero_point = -zp * s``, in the scale's dtype when that holds it exactly, else both in float32
    (exact for a float16/bfloat16 scale: its mantissa times a <= 9-bit integer fits float32's 24 bits;
    a float32 scale's product is rounded to float32, the nearest llmopt can store)."""
    zero64 = -zp_signed.to(torch.float64) * scale.to(torch.float64)
    for dtype in (scale.dtype, torch.float32):
        zero = zero64.to(dtype)
        if torch.equal(zero.to(torch.float64), zero64) and torch.equal(scale.to(dtype).to(torch.float64),
                                                                         scale.to(torch.float64)):
            return scale.to(dtype), zero
    dtype = scale.dtype if scale.dtype in (torch.float32, torch.float64) else torch.float32
    return scale.to(dtype), zero64.to(dtype)


def _finish(model: nn.Module, tensors: Dict[str, Tensor], used: set, source: str, device: Union[str, torch.device],
            dtype: torch.dtype) -> nn.Module:
    """Put the remaining (float) tensors of the checkpoint into the skeleton, refuse leftovers and gaps."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            continue
        prefix = name + "." if name else ""
        for leaf, p in list(module._parameters.items()):
            key = prefix + leaf
            if p is None or key not in tensors:
                continue
            t = tensors[key]
            if tuple(t.shape) != tuple(p.shape):
                raise LoadError(f"{source}: {key} has shape {tuple(t.shape)}, the architecture expects "
                                f"{tuple(p.shape)}")
            module._parameters[leaf] = nn.Parameter(t.to(p.dtype if p.dtype.is_floating_point else t.dtype),
                                                    requires_grad=p.requires_grad)
            used.add(key)
        for leaf, b in list(module._buffers.items()):
            key = prefix + leaf
            if b is not None and key in tensors and leaf not in module._non_persistent_buffers_set:
                module._buffers[leaf] = tensors[key].to(b.dtype)
                used.add(key)
    leftovers = sorted(set(tensors) - used)
    if leftovers:
        raise LoadError(f"{source}: tensors the architecture has no place for: {leftovers[:5]}"
                        + (f" (+{len(leftovers) - 5} more)" if len(leftovers) > 5 else ""))
    if any(p.device.type == "meta" for p in model.parameters()) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LoadError(f"{source}: the checkpoint lacks {missing[:5]}" + (f" (+{len(missing) - 5} more)"
                                                                           if len(missing) > 5 else ""))
    model.to(device)
    model.eval()
    return model


def _tokenizer(directory: str, with_tokenizer: bool):
    if with_tokenizer and any(os.path.isfile(os.path.join(directory, f))
                              for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return None


def _target_matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == name:
        return True
    return any(cls.__name__ == target for cls in type(module).__mro__)


def _check_weights_args(group_name: str, scheme: Any, source: str) -> Tuple[int, bool, Optional[int], bool]:
    if not isinstance(scheme, dict) or not isinstance(scheme.get("weights"), dict):
        raise LoadError(f"{source}: config group {group_name!r} has no 'weights' quantization arguments")
    for side in ("input_activations", "output_activations"):
        if scheme.get(side):
            raise LoadError(f"{source}: config group {group_name!r} quantizes {side}; only weight-only "
                            "pack-quantized checkpoints are imported")
    fmt = scheme.get("format")
    if fmt not in (None, "pack-quantized"):
        raise LoadError(f"{source}: config group {group_name!r} has format {fmt!r}; only 'pack-quantized' is imported")
    w = scheme["weights"]
    bits = w.get("num_bits")
    if w.get("type", "int") != "int":
        raise LoadError(f"{source}: config group {group_name!r} has type {w.get('type')!r}; only 'int' is imported")
    if bits not in PACKABLE_BITS:
        raise LoadError(f"{source}: config group {group_name!r} has num_bits={bits!r}; supported: "
                        f"{', '.join(map(str, PACKABLE_BITS))}")
    strategy = w.get("strategy")
    if strategy == "channel":
        group = None
    elif strategy == "group":
        group = w.get("group_size")
        if not isinstance(group, int) or group <= 0:
            raise LoadError(f"{source}: config group {group_name!r}: strategy 'group' needs a positive group_size")
    else:
        raise LoadError(f"{source}: config group {group_name!r} has strategy {strategy!r}; supported: group, channel")
    if w.get("dynamic"):
        raise LoadError(f"{source}: config group {group_name!r} has dynamic weights; not a stored quantization")
    symmetric = w.get("symmetric", True)
    return bits, bool(symmetric), group, bool(w.get("actorder"))


def _check_g_idx(g_idx: Optional[Tensor], in_features: int, group: int, name: str, source: str) -> None:
    """Only the trivial grouping ``i // group_size`` is supported (act-order would permute the input)."""
    if g_idx is None:
        return
    trivial = torch.arange(in_features, dtype=torch.int64) // group
    if tuple(g_idx.shape) != (in_features,) or not torch.equal(g_idx.to(torch.int64), trivial):
        raise LoadError(f"{source}: {name}: g_idx is not the trivial grouping i // group_size (an act-order / "
                        "desc_act checkpoint); llmopt's QuantLinear has contiguous groups and cannot import it "
                        "exactly")


def load_compressed_tensors(
    directory: Union[str, os.PathLike],
    *,
    device: Union[str, torch.device] = "cpu",
    with_tokenizer: bool = True,
    kernel: str = "auto",
) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a compressed-tensors ``pack-quantized`` directory.

    Each packed layer becomes a :class:`~llmopt.nn.QuantLinear` with the file's codes and scales
    (symmetric: llmopt's ``int{bits}`` symmetric grid, the scale in the file's dtype; asymmetric:
    ``zero_point = -zp * scale``, kept in the scale's dtype when exact there, else scale and zero
    point in float32, exact). ``weight_g_idx`` is accepted when trivial, refused otherwise.
    """
    directory = os.fspath(directory)
    source = os.path.join(directory, "config.json")
    config = _read_config(directory)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise LoadError(f"{source} has no quantization_config: not a quantized checkpoint")
    if qc.get("quant_method") != "compressed-tensors":
        raise LoadError(f"{source}: quant_method is {qc.get('quant_method')!r}, expected 'compressed-tensors'")
    if qc.get("format") not in (None, "pack-quantized", "mixed-precision"):
        raise LoadError(f"{source}: format {qc.get('format')!r}; only 'pack-quantized' is imported")
    if qc.get("sparsity_config") or qc.get("transform_config"):
        raise LoadError(f"{source}: sparsity or transform configs are not imported")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise LoadError(f"{source}: quantization_config has no config_groups")
    schemes = []
    for gname, scheme in groups.items():
        args = _check_weights_args(gname, scheme, source)
        targets = scheme.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise LoadError(f"{source}: config group {gname!r} has no list of targets")
        schemes.append((gname, targets, args))
    tensors = _read_tensors(directory)
    model = _skeleton(config)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    used: set = set()
    packed_names = [k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")]
    for name in packed_names:
        linear = _linear(model, name, source)
        matched = [s for s in schemes if any(_target_matches(t, name, linear) for t in s[1])]
        if not matched:
            raise LoadError(f"{source}: {name} has packed weights but no config group targets it")
        gname, _, (bits, symmetric, group, _actorder) = matched[0]
        n, k = linear.out_features, linear.in_features
        group_size = k if group is None else group
        if k % group_size:
            raise LoadError(f"{source}: {name}: in_features {k} is not a multiple of group_size {group_size}")
        keys = {f"{name}.{leaf}" for leaf in ("weight_packed", "weight_scale", "weight_shape")}
        missing = sorted(keys - set(tensors))
        if missing:
            raise LoadError(f"{source}: {name}: missing {missing}")
        shape = tensors[f"{name}.weight_shape"].tolist()
        if shape != [n, k]:
            raise LoadError(f"{source}: {name}: weight_shape {shape}, the architecture has [{n}, {k}]")
        codes = _unpack_rows(tensors[f"{name}.weight_packed"], bits, k).to(torch.uint8)
        if tuple(codes.shape) != (n, k):
            raise LoadError(f"{source}: {name}: weight_packed has {codes.shape[0]} rows, expected {n}")
        scale = tensors[f"{name}.weight_scale"]
        if scale.dim() == 1:
            scale = scale.unsqueeze(1)
        if tuple(scale.shape) != (n, k // group_size) or not scale.is_floating_point():
            raise LoadError(f"{source}: {name}: weight_scale has shape {tuple(scale.shape)} "
                            f"({scale.dtype}), expected ({n}, {k // group_size}) float")
        g_idx = tensors.get(f"{name}.weight_g_idx")
        _check_g_idx(g_idx, k, group_size, name, source)
        zp_key = f"{name}.weight_zero_point"
        if symmetric:
            zero = None
        else:
            if zp_key not in tensors:
                raise LoadError(f"{source}: {name}: asymmetric scheme without weight_zero_point")
            zp = tensors[zp_key]
            if zp.dim() == 1:
                zp = zp.unsqueeze(1)
            if zp.dtype == torch.int32 and zp.shape[0] == -(-n * bits // 32):  # packed along the output dim
                zp = _unpack_rows(zp.t().contiguous(), bits, n).t() - (1 << (bits - 1))
            elif zp.dtype.is_floating_point or zp.dtype == torch.bool:
                raise LoadError(f"{source}: {name}: weight_zero_point is {zp.dtype}, expected an integer tensor")
            zp = zp.to(torch.int64)
            if tuple(zp.shape) != tuple(scale.shape):
                raise LoadError(f"{source}: {name}: weight_zero_point has shape {tuple(zp.shape)}, expected "
                                f"{tuple(scale.shape)}")
            scale, zero = _zero_point_float(zp, scale)
        bias_key = f"{name}.bias"
        bias = tensors.get(bias_key)
        if (bias is not None) != (linear.bias is not None):
            raise LoadError(f"{source}: {name}: bias {'present' if bias is not None else 'missing'} in the "
                            "checkpoint, the architecture disagrees")
        layer = QuantLinear.from_codes(codes, scale, zero, format=AffineFormat(bits, symmetric=symmetric),
                                       group_size=group, bias=bias, dtype=dtype, kernel=kernel)
        _replace(model, name, layer)
        used.update(keys | {zp_key, bias_key, f"{name}.weight_g_idx"})
    if not packed_names:
        raise LoadError(f"{source}: no '.weight_packed' tensor in the checkpoint (format {qc.get('format')!r})")
    model = _finish(model, tensors, used, source, device, dtype)
    return model, _tokenizer(directory, with_tokenizer)


def _gptq_settings(directory: str, config: Dict[str, Any], source: str) -> Dict[str, Any]:
    qc = dict(config.get("quantization_config") or {})
    qpath = os.path.join(directory, "quantize_config.json")
    if os.path.lexists(qpath):
        extra = read_json_member(directory, "quantize_config.json", written_by="AutoGPTQ / GPTQModel")
        if isinstance(extra, dict):
            qc = {**extra, **qc}
    if not qc:
        raise LoadError(f"{source} has no quantization_config (and no quantize_config.json): not a GPTQ checkpoint")
    method = qc.get("quant_method", "gptq")
    if method != "gptq":
        raise LoadError(f"{source}: quant_method is {method!r}, expected 'gptq'"
                        + (" (AWQ's packing differs from GPTQ's and is not imported)" if method == "awq" else ""))
    bits = qc.get("bits")
    if bits not in PACKABLE_BITS:
        raise LoadError(f"{source}: GPTQ bits={bits!r}; supported: {', '.join(map(str, PACKABLE_BITS))}")
    group = qc.get("group_size", 128)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise LoadError(f"{source}: GPTQ group_size={group!r}: a positive integer or -1 (per channel)")
    fmt = qc.get("checkpoint_format") or (qc.get("meta") or {}).get("checkpoint_format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise LoadError(f"{source}: GPTQ checkpoint_format={fmt!r}; supported: 'gptq' (v1), 'gptq_v2'")
    return {"bits": bits, "group_size": group, "v2": fmt == "gptq_v2", "sym": bool(qc.get("sym", True)),
            "desc_act": bool(qc.get("desc_act", False))}


def load_gptq(
    directory: Union[str, os.PathLike],
    *,
    device: Union[str, torch.device] = "cpu",
    with_tokenizer: bool = True,
    kernel: str = "auto",
) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a GPTQ checkpoint (AutoGPTQ / GPTQModel layout, v1 or v2).

    Per layer: ``qweight`` int32 ``[in*bits/32, out]`` (codes packed along the input dim),
    ``qzeros`` int32 ``[groups, out*bits/32]`` (zero points packed along the output dim; v1 files,
    ``checkpoint_format`` ``"gptq"`` or absent, store ``z - 1``, v2 ``"gptq_v2"`` stores ``z``),
    ``scales`` ``[groups, out]``, ``g_idx [in]`` and ``bias``. A layer whose zero points are all
    ``mid`` becomes a symmetric QuantLinear (scales in the file's dtype); otherwise asymmetric with
    ``zero_point = (mid - z) * scale`` (in float32 when the file's dtype cannot hold it exactly).
    Act-order (``g_idx`` not ``i // group_size``) is refused.
    """
    directory = os.fspath(directory)
    source = os.path.join(directory, "config.json")
    config = _read_config(directory)
    settings = _gptq_settings(directory, config, source)
    bits, v2 = settings["bits"], settings["v2"]
    mid = 1 << (bits - 1)
    tensors = _read_tensors(directory)
    model = _skeleton(config)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    used: set = set()
    names = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    if not names:
        raise LoadError(f"{source}: no '.qweight' tensor in the checkpoint")
    for name in names:
        linear = _linear(model, name, source)
        n, k = linear.out_features, linear.in_features
        group_size = k if settings["group_size"] == -1 else settings["group_size"]
        if k % group_size:
            raise LoadError(f"{source}: {name}: in_features {k} is not a multiple of group_size {group_size}")
        groups = k // group_size
        keys = {f"{name}.{leaf}" for leaf in ("qweight", "qzeros", "scales")}
        missing = sorted(keys - set(tensors))
        if missing:
            raise LoadError(f"{source}: {name}: missing {missing}")
        qweight, qzeros, scales = (tensors[f"{name}.{leaf}"] for leaf in ("qweight", "qzeros", "scales"))
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise LoadError(f"{source}: {name}: qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
        per_word = 32 // bits
        if k % per_word or tuple(qweight.shape) != (k // per_word, n):
            raise LoadError(f"{source}: {name}: qweight has shape {tuple(qweight.shape)}, expected "
                            f"({k * bits // 32}, {n}) for {bits}-bit codes")
        if tuple(scales.shape) != (groups, n) or not scales.is_floating_point():
            raise LoadError(f"{source}: {name}: scales has shape {tuple(scales.shape)}, expected ({groups}, {n})")
        if tuple(qzeros.shape) != (groups, -(-n // per_word)):
            raise LoadError(f"{source}: {name}: qzeros has shape {tuple(qzeros.shape)}, expected "
                            f"({groups}, {-(-n // per_word)})")
        g_idx = tensors.get(f"{name}.g_idx")
        _check_g_idx(g_idx, k, group_size, name, source)
        codes = _unpack_rows(qweight.t().contiguous(), bits, k).to(torch.uint8)  # [out, in]
        zeros = _unpack_rows(qzeros, bits, n).t()  # [out, groups]
        if not v2:
            zeros = zeros + 1  # the historic offset: v1 stores z - 1 (a stored 2**bits - 1 means z = 2**bits)
        scale = scales.t().contiguous()
        if bool((zeros == mid).all()):
            zero = None
            fmt = AffineFormat(bits, symmetric=True)
        else:
            scale, zero = _zero_point_float(zeros - mid, scale)
            fmt = AffineFormat(bits, symmetric=False)
        bias_key = f"{name}.bias"
        bias = tensors.get(bias_key)
        if bias is not None and linear.bias is None:
            if bool((bias == 0).all()):
                bias = None  # GPTQ writers store a zero bias for bias-free layers
            else:
                raise LoadError(f"{source}: {name}: the checkpoint has a non-zero bias, the architecture none")
        elif bias is None and linear.bias is not None:
            raise LoadError(f"{source}: {name}: the architecture has a bias, the checkpoint none")
        layer = QuantLinear.from_codes(codes, scale, zero, format=fmt,
                                       group_size=None if group_size == k else group_size,
                                       bias=bias, dtype=dtype, kernel=kernel)
        _replace(model, name, layer)
        used.update(keys | {bias_key, f"{name}.g_idx"})
    model = _finish(model, tensors, used, source, device, dtype)
    return model, _tokenizer(directory, with_tokenizer)


def load_quantized(directory: Union[str, os.PathLike], **kwargs: Any) -> Tuple[nn.Module, Any]:
    """:func:`load_compressed_tensors` or :func:`load_gptq`, by ``quantization_config.quant_method``
    (or a ``quantize_config.json`` next to ``config.json``: GPTQ)."""
    directory = os.fspath(directory)
    config = _read_config(directory)
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "compressed-tensors":
        return load_compressed_tensors(directory, **kwargs)
    if method == "gptq" or (method is None and os.path.lexists(os.path.join(directory, "quantize_config.json"))):
        return load_gptq(directory, **kwargs)
    raise LoadError(f"{directory}/config.json: quantization_config.quant_method is {method!r}; "
                    "supported: 'compressed-tensors' (pack-quantized), 'gptq'")
