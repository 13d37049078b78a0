"""GGUF export: a Llama-family decoder, quantized by llmopt, written as one file llama.cpp runs alone.

:func:`export_gguf` writes the weights, the hyper-parameters and the tokenizer with gguf-py's
``GGUFWriter`` (the container is never hand-written). Quantized layers are written **from llmopt's own
codes and parameters, without re-quantizing**:

==========================================  =========  =====================================
llmopt layer (:class:`~llmopt.nn.QuantLinear`)  GGUF type  exact when
==========================================  =========  =====================================
``int4``, ``symmetric=True``                ``Q4_0``   every scale is an fp16 value
``int4`` (asymmetric, float zero point)     ``Q4_1``   every scale and ``min`` is an fp16 value
``int8``, ``symmetric=True``                ``Q8_0``   every scale is an fp16 value
==========================================  =========  =====================================

GGUF blocks hold 32 weights; a group of 64 or 128 (or a whole row, per-channel) is written as 2, 4
(or ``in/32``) blocks sharing the group's parameters, so the group size must be a multiple of 32.
``scale_dtype="float16"`` makes every scale an fp16 value by construction; bf16 / f32 scales are
checked value by value. For ``Q4_1`` the block minimum ``m = zero_point - 8 * scale`` (the value of
code 0) is a derived number: it is exact only when it happens to be an fp16 value.

Exactness is measured, not assumed: every quantized tensor is dequantized back from the bytes written
with gguf-py's own ``gguf.quants.dequantize`` and compared with llmopt's ``dequantize_weight()``;
the report gives the largest and mean absolute difference per tensor. ``Q4_0`` and ``Q8_0`` come out
bit-identical (``d * (q - 8)`` is the very product llmopt computes). ``Q4_1`` computes
``d * q + m`` where llmopt computes ``(q - 8) * scale + zero_point``: with fp16-exact parameters the
two differ only by float32 rounding of the sum (a few ulp of the weight).

Anything else has no exact GGUF type and is refused with an error naming the layer, unless asked for:

* ``requantize=True`` allows lossy conversion: parameters that are not fp16 values are rounded to fp16
  (codes unchanged), and layers with no GGUF type at all (``int3``, ``nf4``, ``fp8``, group 16, an
  input scale, sparse / low-rank / LoRA wrappers, ``int8`` asymmetric) are dequantized and quantized
  again by gguf-py (``gguf.quants.quantize``) to ``fallback`` (default ``"q8_0"``);
* ``fallback="f32"`` / ``"f16"`` / ``"bf16"`` writes such layers as their dequantized float weight
  (``f32``: exact), with or without ``requantize``.

Every lossy step is in the report with the error it added.

A :class:`~llmopt.nn.QuantEmbedding` (``compress_(..., embeddings=...)``) on a GGUF grid is written as
``token_embd`` of that type from its codes, exactly as a projection; one on another grid (or with
parameters that are not fp16 values, unless ``requantize=True``) as its dequantized table in
``float_type``. A head that is the embedding's own table (tied) is not written again.

Plain float weights (embeddings, unquantized linears, an untied ``lm_head``) are written as
``float_type`` (``"f16"`` by default, ``"bf16"`` or ``"f32"``); norms always as F32, as llama.cpp does.
Q and K rows are permuted to llama.cpp's rotary layout (for quantized layers the rows of codes and
parameters move together, which is exact). Supported: ``LlamaForCausalLM`` (Llama, SmolLM2, ...),
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (architecture ``qwen2``: no permutation, Q/K/V biases).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..core.files import fsync_directory, new_save_id, remove_quietly, temp_path
from ..core.formats import AffineFormat
from ..core.scheme import WeightQuant
from ..nn.base import CompressedLinear
from ..nn.quant_embedding import QuantEmbedding
from ..nn.quant_linear import QuantLinear

__all__ = ["export_gguf", "GGUFExportReport", "GGUFTensorReport", "GGUFExportError", "gguf_scheme",
           "GGUF_QUANT_TYPES", "GGUF_FLOAT_TYPES"]

# The quantized types llmopt writes (from its own codes, or by gguf-py when re-quantizing).
GGUF_QUANT_TYPES = ("q4_0", "q4_1", "q8_0")
GGUF_FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK = 32  # weights per block of Q4_0 / Q4_1 / Q8_0

# model_type -> (GGUF architecture, permute Q/K rows)
_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# General file type (llama.cpp's LLAMA_FTYPE_*): what most of the weights are.
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "bf16": 32}


class GGUFExportError(ValueError):
    """A model or layer cannot be written as GGUF as asked: the message names the layer and why."""


@dataclass
class GGUFTensorReport:
    """How one tensor was written."""

    name: str  # GGUF tensor name (``blk.0.attn_q.weight``)
    source: str  # the module / parameter in the PyTorch model
    type: str  # GGUF type written (``Q4_0``, ``F16``, ...)
    shape: Tuple[int, ...]  # PyTorch shape ``[out, in]``
    # "exact": from llmopt's codes, parameters fp16-exact; "rounded": codes kept, parameters rounded
    # to fp16; "requantized": dequantized and quantized again by gguf-py; "float": a float tensor.
    mode: str
    max_abs_error: float = 0.0  # vs llmopt's own weight, measured from the bytes written
    mean_abs_error: float = 0.0
    note: str = ""

    @property
    def bit_exact(self) -> bool:
        return self.max_abs_error == 0.0


@dataclass
class GGUFExportReport:
    """What :func:`export_gguf` wrote: the file, the architecture, and one entry per tensor."""

    path: str
    architecture: str
    file_type: str
    tensors: List[GGUFTensorReport] = field(default_factory=list)
    tokenizer: Optional[str] = None  # tokenizer.ggml.model written, or None
    file_bytes: int = 0
    notes: List[str] = field(default_factory=list)

    def types(self) -> Dict[str, int]:
        """How many tensors of each GGUF type were written."""
        counts: Dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        return counts

    @property
    def lossless(self) -> bool:
        """No quantized layer was rounded or re-quantized: each is written from llmopt's codes with exact
        parameters (or, with ``fallback="f32"``, as its exact float32 weight). Float tensors written as
        ``float_type`` f16/bf16 are a storage choice and do not count."""
        return not self.requantized

    @property
    def requantized(self) -> List[GGUFTensorReport]:
        return [t for t in self.tensors if t.mode in ("rounded", "requantized")]

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "architecture": self.architecture, "file_type": self.file_type,
                "tokenizer": self.tokenizer, "file_bytes": self.file_bytes, "notes": list(self.notes),
                "types": self.types(),
                "tensors": [dict(t.__dict__, shape=list(t.shape)) for t in self.tensors]}

    def summary(self) -> str:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.types().items()))
        lines = [f"GGUF {self.path}: {self.architecture}, {self.file_bytes / 2**20:.1f} MiB, {types}"]
        lossy = self.requantized
        if lossy:
            worst = max(lossy, key=lambda t: t.max_abs_error)
            lines.append(f"  {len(lossy)} tensor(s) re-quantized or rounded; worst {worst.name} "
                         f"max abs error {worst.max_abs_error:.3g}")
        else:
            lines.append("  every quantized tensor written from llmopt's codes with exact parameters")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def gguf_scheme(gguf_type: str, group_size: int = 32) -> WeightQuant:
    """The :class:`~llmopt.WeightQuant` whose layers :func:`export_gguf` writes exactly as ``gguf_type``.

    ``"q4_0"``: int4 symmetric on llama.cpp's full 16-level grid (``full_range=True``: the group's
    largest-magnitude weight on code -8, as llama.cpp's own Q4_0 quantizer does); ``"q8_0"``: int8
    symmetric; ``"q4_1"``: int4 asymmetric with the block minimum stored exactly (``zero_point="min"``).
    Scales are bfloat16: every bf16 value in fp16's normal range is an fp16 value, so they export
    exactly (the exporter checks each one), and ``int4pack_cpu`` runs them in llmopt. ``group_size``
    must be a multiple of 32 (or ``None`` for per-channel, with ``in_features`` a multiple of 32). Pass
    it as a method's fields: ``llmopt.GPTQ(**gguf_scheme("q4_0").to_dict())``.
    """
    kind = gguf_type.lower()
    if group_size is not None and (group_size <= 0 or group_size % BLOCK):
        raise ValueError(f"gguf_scheme: group_size must be a multiple of {BLOCK}, got {group_size}")
    if kind == "q4_0":
        return WeightQuant(format="int4", group_size=group_size, symmetric=True, full_range=True,
                           scale_dtype="bfloat16")
    if kind == "q8_0":
        return WeightQuant(format="int8", group_size=group_size, symmetric=True, scale_dtype="bfloat16")
    if kind == "q4_1":
        return WeightQuant(format="int4", group_size=group_size, zero_point="min", scale_dtype="bfloat16")
    raise ValueError(f"gguf_scheme: unknown GGUF type {gguf_type!r}; choose from {list(GGUF_QUANT_TYPES)}")


# ---------------------------------------------------------------------------------------------- helpers
def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs gguf-py: pip install 'llmopt[export]' (or pip install gguf)") from None
    return gguf


def _permute_rows(t: Tensor, n_head: int) -> Tensor:
    """llama.cpp's rotary row order for Q/K: within each head, rows (0, d/2, 1, d/2+1, ...) become
    adjacent pairs. Works on any tensor whose first dimension is the output rows."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _fp16_exact(x: Tensor) -> bool:
    x = x.to(torch.float32)
    return bool((x.to(torch.float16).to(torch.float32) == x).all())


def _errors(reference: Tensor, written: np.ndarray) -> Tuple[float, float]:
    written_t = torch.from_numpy(np.asarray(written, dtype=np.float32)).reshape(reference.shape)
    diff = torch.sub(written_t, reference.to(torch.float32)).abs_()  # a new tensor: never the data written
    if diff.numel() == 0:
        return 0.0, 0.0
    return float(diff.max()), float(diff.mean())


def _blocks(values: Tensor, group_size: int, in_features: int) -> Tensor:
    """Per-group ``[N, G]`` -> per-block ``[N, K/32]`` (each group split into 32-blocks; a last, narrower
    group, when ``group_size`` does not divide ``K``, gives fewer blocks)."""
    return values.repeat_interleave(group_size // BLOCK, dim=1)[:, :in_features // BLOCK]


def _f16_bytes(values: Tensor) -> np.ndarray:
    """``[N, B]`` float -> ``[N, B, 2]`` uint8: fp16 little-endian bytes."""
    arr = values.to(torch.float16).contiguous().numpy().astype("<f2")
    return arr.view(np.uint8).reshape(*arr.shape, 2)


def _pack_q4(codes: Tensor) -> np.ndarray:
    """``[N, K]`` codes 0..15 -> ``[N, K/32, 16]``: byte j of a block holds element j (low nibble)
    and element j + 16 (high nibble), ggml's layout."""
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2, BLOCK // 2).numpy()
    return c[:, :, 0, :] | (c[:, :, 1, :] << np.uint8(4))


def _quant_bytes(kind: str, codes: Tensor, d: Tensor, m: Optional[Tensor]) -> np.ndarray:
    """Raw GGUF rows ``[N, K/32 * block_bytes]`` from codes ``[N, K]`` and per-block ``d``/``m``."""
    n = codes.shape[0]
    parts = [_f16_bytes(d)]
    if kind == "q4_1":
        parts.append(_f16_bytes(m))
    if kind == "q8_0":
        q = (codes.to(torch.int16) - 128).to(torch.int8).reshape(n, -1, BLOCK).numpy()
        parts.append(q.view(np.uint8))
    else:
        parts.append(_pack_q4(codes))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(n, -1))


@dataclass
class _Options:
    float_type: str
    requantize: bool
    fallback: Optional[str]
    quantize_float: Optional[str] = None


# ---------------------------------------------------------------------------------------------- tensors
class _Writer:
    """Converts modules into GGUF tensors and records the report."""

    def __init__(self, gguf, writer, options: _Options, report: GGUFExportReport):
        self.gguf = gguf
        self.writer = writer
        self.options = options
        self.report = report

    def qtype(self, kind: str):
        return getattr(self.gguf.GGMLQuantizationType, kind.upper())

    def add_float(self, name: str, source: str, weight: Tensor, kind: str, note: str = "") -> None:
        """A float tensor as ``kind`` (``f32`` / ``f16`` / ``bf16``), error vs the float32 values."""
        w32 = weight.detach().to(torch.float32).cpu().contiguous()
        if kind == "f32":
            data = w32.numpy()
            self.writer.add_tensor(name, data)
            err = (0.0, 0.0)
        elif kind == "f16":
            data = w32.to(torch.float16).numpy()
            self.writer.add_tensor(name, data)
            err = _errors(w32, data.astype(np.float32))
        elif kind == "bf16":
            data = self.gguf.quants.quantize(w32.numpy(), self.qtype("bf16"))
            self.writer.add_tensor(name, data, raw_dtype=self.qtype("bf16"))
            err = _errors(w32, self.gguf.quants.dequantize(data, self.qtype("bf16")))
        else:  # pragma: no cover - checked on entry
            raise ValueError(kind)
        self.report.tensors.append(GGUFTensorReport(name, source, kind.upper(), tuple(weight.shape), "float",
                                                    *err, note=note))

    def add_requantized(self, name: str, source: str, weight: Tensor, kind: str, why: str) -> None:
        """Dequantized llmopt weight quantized again by gguf-py (``kind``) or written as float."""
        if kind in GGUF_FLOAT_TYPES:
            self.add_float(name, source, weight, kind, note=f"written as float: {why}")
            self.report.tensors[-1].mode = "float" if kind == "f32" else "rounded"
            return
        if weight.shape[1] % BLOCK:
            raise GGUFExportError(f"{source}: {why}; re-quantizing to {kind.upper()} needs in_features divisible "
                                  f"by {BLOCK}, got {weight.shape[1]}; use fallback='f16' or 'f32'")
        w32 = weight.detach().to(torch.float32).cpu().contiguous()
        qt = self.qtype(kind)
        data = self.gguf.quants.quantize(w32.numpy(), qt)
        self.writer.add_tensor(name, data, raw_dtype=qt)
        err = _errors(w32, self.gguf.quants.dequantize(data, qt))
        self.report.tensors.append(GGUFTensorReport(name, source, kind.upper(), tuple(weight.shape), "requantized",
                                                    *err, note=f"re-quantized by gguf-py: {why}"))

    def add_linear(self, name: str, source: str, module: nn.Module, n_head: Optional[int]) -> None:
        """A projection: ``QuantLinear`` from its codes, ``nn.Linear`` as float, others refused or fallback.

        ``n_head`` (Q/K of a rotary Llama) applies llama.cpp's row permutation.
        """
        perm = (lambda t: _permute_rows(t, n_head)) if n_head else (lambda t: t)
        if isinstance(module, QuantLinear):
            why = _unmappable(module)
            if why is None:
                self._add_quant(name, source, module, perm)
            else:
                self._fallback(name, source, perm(module.dequantize_weight(torch.float32)), why)
        elif isinstance(module, CompressedLinear):
            self._fallback(name, source, perm(module.dequantize_weight(torch.float32)),
                           f"{type(module).__name__} ({module.describe()}) has no GGUF type")
        elif isinstance(module, nn.Linear) and self.options.quantize_float:
            self.add_requantized(name, source, perm(module.weight.detach()), self.options.quantize_float,
                                 "float layer quantized by gguf-py (quantize_float)")
        elif isinstance(module, nn.Linear):
            self.add_float(name, source, perm(module.weight.detach()), self.options.float_type)
        else:
            raise GGUFExportError(f"{source}: {type(module).__name__} is not a linear layer GGUF export knows")
        bias = getattr(module, "bias", None)
        if bias is not None:
            self.add_float(name.replace(".weight", ".bias"), source + ".bias", perm(bias.detach()), "f32")

    def add_embedding(self, name: str, source: str, module: nn.Module) -> None:
        """The token embedding: a ``QuantEmbedding`` from its codes when its grid is a GGUF type and its
        parameters are fp16 values (or ``requantize`` allows rounding them), else its (dequantized) table
        as ``float_type``. Lossless either way up to the float type; never re-quantized."""
        if not isinstance(module, QuantEmbedding):
            self.add_float(name, source, module.weight, self.options.float_type)
            return
        table = module.linear
        why = _unmappable(table)
        if why is None:
            try:
                self._add_quant(name, source, table, lambda t: t)
                return
            except GGUFExportError as exc:  # parameters not fp16 values and no requantize: write it as float
                why = str(exc).split(". ")[0]
        self.add_float(name, source, module.dequantize_weight(torch.float32), self.options.float_type,
                       note=f"dequantized table: {why}")

    def _fallback(self, name: str, source: str, weight: Tensor, why: str) -> None:
        fallback = self.options.fallback
        if fallback in GGUF_FLOAT_TYPES:
            self.add_requantized(name, source, weight, fallback, why)
        elif self.options.requantize:
            self.add_requantized(name, source, weight, fallback or "q8_0", why)
        else:
            raise GGUFExportError(
                f"{source}: {why}, so it cannot be written without re-quantizing. Pass requantize=True "
                f"(re-quantized by gguf-py to fallback, default 'q8_0', error reported) or fallback='f16'/'f32' "
                f"(dequantized weight as float), or quantize it with llmopt.io.gguf.gguf_scheme('q4_0')")

    def _add_quant(self, name: str, source: str, layer: QuantLinear, perm) -> None:
        fmt: AffineFormat = layer.format  # type: ignore[assignment]
        kind = "q8_0" if fmt.bits == 8 else ("q4_0" if fmt.symmetric else "q4_1")
        canonical = layer.canonical_state()
        codes = perm(layer.codes().cpu())
        scale = perm(canonical["scale"].cpu().to(torch.float32))
        reference = perm(layer.dequantize_weight(torch.float32).cpu())
        if kind == "q4_1":
            # The value of code 0: what GGUF calls the block minimum (m), computed as llmopt computes.
            zero = torch.zeros((1, 1), dtype=torch.uint8)
            m = fmt.dequantize(zero.expand(scale.shape), scale, perm(canonical["zero_point"].cpu()))
            m = m.to(torch.float32).reshape(scale.shape)
        else:
            m = None
        inexact = [label for label, t in (("scale", scale), ("min (zero_point - 8 * scale)", m))
                   if t is not None and not _fp16_exact(t)]
        mode, note = "exact", ""
        if inexact:
            what = " and ".join(inexact)
            if not self.options.requantize:
                raise GGUFExportError(
                    f"{source}: {kind.upper()} stores fp16 parameters, but this layer's {what} is not an fp16 value "
                    f"everywhere (scale dtype {str(layer.scale_dtype).replace('torch.', '')}). Quantize with "
                    f"scale_dtype='float16' (llmopt.io.gguf.gguf_scheme('{kind}')), or pass requantize=True to round "
                    "the parameters to fp16 (codes kept; the added error is reported)")
            mode, note = "rounded", f"{what} rounded to fp16, codes kept"
        d_blocks = _blocks(scale, layer.group_size, layer.in_features)
        m_blocks = _blocks(m, layer.group_size, layer.in_features) if m is not None else None
        data = _quant_bytes(kind, codes, d_blocks, m_blocks)
        qt = self.qtype(kind)
        self.writer.add_tensor(name, data, raw_dtype=qt)
        err = _errors(reference, self.gguf.quants.dequantize(data, qt))
        if kind == "q4_1" and mode == "exact" and err[0] > 0:
            note = "d*q + m vs (q - 8)*scale + zero_point: float32 rounding only"
        if layer.act_bits is not None:
            note = (note + "; " if note else "") + f"activations were quantized to int{layer.act_bits} in llmopt"
        self.report.tensors.append(GGUFTensorReport(name, source, kind.upper(), tuple(reference.shape), mode,
                                                    *err, note=note))


def _unmappable(layer: QuantLinear) -> Optional[str]:
    """Why a ``QuantLinear`` has no exact GGUF block type, or ``None`` if it has one."""
    fmt = layer.format
    desc = f"{fmt.name} g{layer.group_size}"
    if not isinstance(fmt, AffineFormat):
        return f"format {fmt.name} ({desc}) has no GGUF block type"
    if fmt.bits == 4:
        pass
    elif fmt.bits == 8 and fmt.symmetric:
        pass
    elif fmt.bits == 8:
        return f"asymmetric int8 ({desc}) has no GGUF block type (Q8_0 is symmetric)"
    else:
        return f"int{fmt.bits} ({desc}) has no GGUF block type (Q4_0/Q4_1: 4 bits, Q8_0: 8 bits)"
    if layer.group_size % BLOCK:
        return f"group size {layer.group_size} ({desc}) is not a multiple of the GGUF block of {BLOCK}"
    if layer.in_features % BLOCK:
        return f"in_features {layer.in_features} ({desc}) is not a multiple of the GGUF block of {BLOCK}"
    if layer.input_scale is not None:
        return f"an input scale ({desc} +input-scale) multiplies each column, which GGUF blocks cannot hold"
    return None


# ---------------------------------------------------------------------------------------------- model
def _config_value(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _rope(config) -> Tuple[float, Optional[Dict[str, Any]]]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    merged = dict(scaling, **params)
    return float(theta if theta is not None else 10000.0), (None if rope_type == "default" else
                                                           dict(merged, rope_type=rope_type))


def _add_hparams(writer, gguf, config, arch: str, report: GGUFExportReport) -> None:
    hidden = config.hidden_size
    n_head = config.num_attention_heads
    n_kv = _config_value(config, "num_key_value_heads", default=n_head)
    head_dim = _config_value(config, "head_dim", default=hidden // n_head)
    writer.add_context_length(int(_config_value(config, "max_position_embeddings", default=2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling is not None:
        if scaling["rope_type"] != "linear":
            raise GGUFExportError(f"rope type {scaling['rope_type']!r} is not supported by the GGUF exporter "
                                  "(only default and linear rope scaling)")
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and arch == "llama" \
            and window < _config_value(config, "max_position_embeddings", default=window):
        report.notes.append(f"sliding_window={window} is not written: llama.cpp's llama architecture attends "
                            "to the whole context")


# ---------------------------------------------------------------------------------------------- tokenizer
def _add_tokenizer(writer, gguf, tokenizer, n_vocab: int, tokenizer_pre: Optional[str],
                   report: GGUFExportReport) -> str:
    """Vocabulary, merges / scores, special ids and chat template, from a transformers tokenizer,
    through gguf-py's own vocabulary readers on a temporary ``save_pretrained`` copy."""
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="llmopt-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        vocab = None
        detected_pre = None
        if (path / "tokenizer.json").is_file():
            spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
            model = spec.get("model") or {}
            split = spec.get("pre_tokenizer") or {}
            if split.get("type") == "ByteLevel" and split.get("use_regex", True):
                detected_pre = "gpt-2"  # GPT-2's own split regex: llama.cpp's "gpt-2" is the same
            if model.get("type") == "BPE" and not model.get("byte_fallback", False):
                vocab = gguf.vocab.BpeVocab(path)
            elif model.get("type") == "BPE":
                vocab = gguf.vocab.LlamaHfVocab(path)
        if vocab is None and (path / "tokenizer.model").is_file():
            vocab = gguf.vocab.SentencePieceVocab(path)
        if vocab is None:
            raise GGUFExportError(f"tokenizer {type(tokenizer).__name__}: only byte-level BPE (GPT-2 style), "
                                  "byte-fallback BPE and SentencePiece tokenizers can be written to GGUF")
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        if len(tokens) > n_vocab:
            raise GGUFExportError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}")
        for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer: unused pads
            tokens.append(f"[PAD{i}]".encode("utf-8"))
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre(tokenizer_pre or detected_pre or "default")
            if tokenizer_pre is None and detected_pre is None:
                report.notes.append("tokenizer.ggml.pre written as 'default' (the pre-tokenizer is not plain GPT-2 "
                                    "byte-level); pass tokenizer_pre= (llama.cpp's name: 'llama-bpe', 'qwen2', "
                                    "'smollm', ...) so llama.cpp splits text as the original does")
        elif tokenizer_pre:
            writer.add_tokenizer_pre(tokenizer_pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if vocab.tokenizer_model == "llama":
            writer.add_token_scores(scores)
        special = gguf.SpecialVocab(path, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
        return vocab.tokenizer_model


# ---------------------------------------------------------------------------------------------- entry point
def export_gguf(
    model: nn.Module,
    path: str,
    *,
    tokenizer: Any = None,
    float_type: str = "f16",
    requantize: bool = False,
    fallback: Optional[str] = None,
    tokenizer_pre: Optional[str] = None,
    name: Optional[str] = None,
    quantize_float: Optional[str] = None,
) -> GGUFExportReport:
    """Write a Llama-family ``*ForCausalLM`` (float or quantized by llmopt) as a GGUF file llama.cpp runs.

    Args:
        model: ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` from transformers,
            possibly holding :class:`~llmopt.nn.QuantLinear` layers.
        path: the ``.gguf`` file to write (replaced atomically: a crash leaves the old file or the new).
        tokenizer: a transformers tokenizer (byte-level BPE, byte-fallback BPE or SentencePiece). Without
            it the file has no vocabulary and llama.cpp cannot run it (transformers can still load it).
        float_type: ``"f16"``, ``"bf16"`` or ``"f32"`` for float weights (embeddings, float linears,
            untied ``lm_head``); norms and biases are always F32.
        requantize: allow lossy conversion (parameters rounded to fp16; layers with no GGUF type
            re-quantized by gguf-py to ``fallback``); every such tensor's added error is in the report.
        fallback: the type for layers with no exact GGUF type: ``"q4_0"``, ``"q4_1"``, ``"q8_0"``
            (re-quantization, needs ``requantize=True``; the default then is ``"q8_0"``), or ``"f32"`` /
            ``"f16"`` / ``"bf16"`` (the dequantized weight as float, allowed without ``requantize``).
        tokenizer_pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``) for BPE tokenizers; by
            default ``"gpt-2"`` when the tokenizer splits with GPT-2's byte-level regex alone, else
            ``"default"`` (with a note in the report).
        name: ``general.name`` (default: the last part of the config's ``_name_or_path``, if any).
        quantize_float: quantize the float ``nn.Linear`` layers (projections, an untied float
            ``lm_head``) with gguf-py to this type (``"q4_0"``, ``"q4_1"``, ``"q8_0"``), as llama.cpp's
            own conversion would: the baseline llmopt's methods are compared with. Embeddings stay
            ``float_type``. Their error is in the report (mode ``"requantized"``).

    Returns a :class:`GGUFExportReport`; raises :class:`GGUFExportError` naming the layer when a
    layer cannot be written as asked (nothing is written then). The converted tensors are held in
    memory until the file is written (about the file's size on top of the model).
    """
    gguf = _gguf()
    float_type = float_type.lower()
    if float_type not in GGUF_FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {list(GGUF_FLOAT_TYPES)}, got {float_type!r}")
    if fallback is not None:
        fallback = fallback.lower()
        if fallback not in GGUF_QUANT_TYPES + GGUF_FLOAT_TYPES:
            raise ValueError(f"fallback must be one of {list(GGUF_QUANT_TYPES + GGUF_FLOAT_TYPES)} or None, "
                             f"got {fallback!r}")
        if fallback in GGUF_QUANT_TYPES and not requantize:
            raise ValueError(f"fallback={fallback!r} re-quantizes: pass requantize=True as well")
    if quantize_float is not None:
        quantize_float = quantize_float.lower()
        if quantize_float not in GGUF_QUANT_TYPES:
            raise ValueError(f"quantize_float must be one of {list(GGUF_QUANT_TYPES)} or None, got {quantize_float!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise GGUFExportError(f"GGUF export supports Llama-family decoders ({sorted(_ARCHITECTURES)}); "
                              f"got model_type {model_type!r} ({type(model).__name__})")
    arch, permute = _ARCHITECTURES[model_type]
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
        raise GGUFExportError(f"{type(model).__name__}: expected .model.layers and .lm_head (a *ForCausalLM)")
    n_head = config.num_attention_heads
    n_kv = _config_value(config, "num_key_value_heads", default=n_head)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(directory, new_save_id(), os.path.basename(path))
    report = GGUFExportReport(path=path, architecture=arch, file_type="")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        out = _Writer(gguf, writer, _Options(float_type, bool(requantize), fallback, quantize_float), report)
        with torch.no_grad():
            embed = base.embed_tokens
            out.add_embedding("token_embd.weight", "model.embed_tokens", embed)
            for i, layer in enumerate(base.layers):
                p = f"model.layers.{i}"
                attn, mlp = layer.self_attn, layer.mlp
                out.add_float(f"blk.{i}.attn_norm.weight", f"{p}.input_layernorm", layer.input_layernorm.weight, "f32")
                out.add_linear(f"blk.{i}.attn_q.weight", f"{p}.self_attn.q_proj", attn.q_proj,
                               n_head if permute else None)
                out.add_linear(f"blk.{i}.attn_k.weight", f"{p}.self_attn.k_proj", attn.k_proj,
                               n_kv if permute else None)
                out.add_linear(f"blk.{i}.attn_v.weight", f"{p}.self_attn.v_proj", attn.v_proj, None)
                out.add_linear(f"blk.{i}.attn_output.weight", f"{p}.self_attn.o_proj", attn.o_proj, None)
                out.add_float(f"blk.{i}.ffn_norm.weight", f"{p}.post_attention_layernorm",
                              layer.post_attention_layernorm.weight, "f32")
                out.add_linear(f"blk.{i}.ffn_gate.weight", f"{p}.mlp.gate_proj", mlp.gate_proj, None)
                out.add_linear(f"blk.{i}.ffn_up.weight", f"{p}.mlp.up_proj", mlp.up_proj, None)
                out.add_linear(f"blk.{i}.ffn_down.weight", f"{p}.mlp.down_proj", mlp.down_proj, None)
            out.add_float("output_norm.weight", "model.norm", base.norm.weight, "f32")
            head = model.lm_head
            tied = ((isinstance(head, nn.Linear) and type(head) is nn.Linear and head.weight is embed.weight)
                    or (isinstance(embed, QuantEmbedding) and head is embed.linear))
            if not tied:
                out.add_linear("output.weight", "lm_head", head, None)
            else:
                report.notes.append("lm_head is tied to the embedding: no output tensor (llama.cpp uses token_embd)")

        counts: Dict[str, int] = {}
        for t in report.tensors:
            if len(t.shape) == 2:
                counts[t.type.lower()] = counts.get(t.type.lower(), 0) + math.prod(t.shape)
        report.file_type = max(counts, key=counts.get) if counts else "f32"
        writer.add_file_type(_FILE_TYPES[report.file_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        source_name = os.path.basename(str(getattr(config, "_name_or_path", "") or "").rstrip("/\\"))
        writer.add_name(name or source_name or f"llmopt {model_type}")  # never a local directory path
        _add_hparams(writer, gguf, config, arch, report)
        if tokenizer is not None:
            report.tokenizer = _add_tokenizer(writer, gguf, tokenizer, config.vocab_size, tokenizer_pre, report)
        else:
            report.notes.append("no tokenizer given: the file has no vocabulary, so llama.cpp cannot run it alone")

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        for f in writer.fout or []:
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            writer.close()
        except Exception:
            pass
        remove_quietly(tmp)
        raise
    fsync_directory(directory)
    report.file_bytes = os.path.getsize(path)
    return report
