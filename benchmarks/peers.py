"""Adapters for peer quantization libraries ("peers"), so the model benchmark can compare llmopt with them.

Every peer setting is a :class:`Peer` in a registry::

    from peers import list_peers, get_peer, peer_status, weight_bytes

    for row in peer_status():                 # never raises; one row per setting
        print(row["name"], row["available"], row["version"], row["reason"])

    peer = get_peer("torchao_int4_g64")
    ok, reason = peer.available()             # (False, "...pip install torchao...") when it cannot run here
    info = peer.apply(model)                  # quantizes a Hugging Face causal LM in place
    with peer.run_context():                  # inference_mode(), or no_grad() where the peer needs it
        model.generate(...)
    print(weight_bytes(model, info))          # stored bytes of the targeted layers

What ``apply(model)`` does, for every peer: every ``nn.Linear`` whose dotted name (or an ancestor's) does
not match an ``exclude`` glob (default ``("lm_head",)``, the same rule as
``llmopt.compress_(..., exclude=["lm_head"])``) is quantized in place, by the peer's own public API. Where
the peer's CPU kernel needs another dtype the whole model is converted first (``model.to(dtype)``, so the
excluded ``lm_head``, the embeddings and float buffers such as RoPE's ``inv_freq`` change dtype too, as
in a bf16 dense baseline made the same way) and ``info["compute_dtype"]`` says which. It returns::

    {"peer": name, "package": pip name, "version": ..., "settings": {...},
     "layers_quantized": n, "layers_total": m,           # m = targeted Linear layers
     "quantized_modules": [...], "skipped_modules": {name: why},
     "compute_dtype": "bfloat16" | "float32", "notes": [...], "seconds": quantization time}

A layer the peer leaves as it was (torchao's int4 with group 128 silently skips a Linear whose
``in_features`` is not a multiple of 128: 576 in SmolLM2) is counted in ``layers_total`` but not in
``layers_quantized``, listed in ``skipped_modules`` and summarised in ``notes``. Any exception inside
``apply`` is re-raised as ``RuntimeError("<peer name>: ...")``; the model may then be half converted and
must be discarded.

Peers and what was checked (torch 2.13.0+cpu, Python 3.11, 2-core AVX-512 BF16 CPU). Every setting
converts the model to bfloat16 first: the int4 CPU kernels of torchao and bitsandbytes need it, and for
the others bf16 measured as fast as fp32 or faster on SmolLM2 (quanto int8: 59 vs 24 tok/s).

=================  =================  ======================================================================
setting            package (tested)   what it runs
=================  =================  ======================================================================
torchao_int8       torchao 0.18.0     ``Int8WeightOnlyConfig()``: per-row symmetric int8 weights
torchao_int4_g64   torchao 0.18.0     int4 asymmetric per group in the CPU tinygemm layout
torchao_int4_g128                     (``PrototypeInt4WeightOnlyConfig`` in 0.16+, ``int4_packing_format=
                                      "opaque"`` in 0.14/0.15, ``layout=Int4CPULayout()`` before; only
                                      0.18.0 was run); g128 skips layers with in_features 576
hqq_4bit_g64       hqq 0.2.8.post1    ``HQQLinear(linear, BaseQuantizeConfig(nbits, group_size=64))``,
hqq_3bit_g64                          default PyTorch backend (dequantize the layer, then a dense matmul)
quanto_int8        optimum-quanto     ``quantize(model, weights=qint8)`` + ``freeze(model)`` (per row)
quanto_int4        0.2.7              ``qint4``, group size forced to 64 (quanto's own pick is 128, lowered
                                      to 96 for 576-wide layers); needs ``torch.no_grad()``: under
                                      ``torch.inference_mode()`` its forward fails ("Cannot set
                                      version_counter for inference tensor")
bnb_nf4            bitsandbytes       ``Linear4bit(quant_type="nf4")``, blocksize 64, no double quant; fused
                   0.50.2             AVX-512 BF16 CPU kernel (``gemv_4bit``) from the package's own library
bnb_int8                              ``Linear8bitLt(has_fp16_weights=False, threshold=0.0)``: int8 per-row
                                      weights *and* dynamic int8 activations (``torch._int_mm``)
=================  =================  ======================================================================

Use :meth:`Peer.run_context` around forward/generate: it is ``torch.inference_mode()`` except for
peers with ``inference_mode_ok=False`` (quanto_int4), where it is ``torch.no_grad()``.

Stored bytes (:func:`weight_bytes`, :func:`tensor_bytes`): the sum over the given modules of every tensor
they hold, deduplicated by storage: parameters and buffers, plus tensors the peers keep outside them
(hqq's ``meta`` dict with scales and zeros, bitsandbytes' ``quant_state`` with ``absmax`` and the code
book), found by walking plain attributes, dicts, lists and helper objects. A tensor subclass that
implements ``__tensor_flatten__`` (torchao's ``Int4OpaqueTensor`` / ``Int8Tensor``, quanto's
``WeightQBitsTensor`` / ``WeightQBytesTensor`` and its packed data) is measured through its inner
tensors, because its own ``numel() * element_size()`` is the *logical* bf16/fp32 size of the weight.
A plain tensor counts its whole storage (``untyped_storage().nbytes()``), once. Measure after one
forward: bitsandbytes repacks 4-bit weights for its CPU kernel (and turns ``absmax`` into bf16) on the
first forward; ``apply`` already runs one tiny forward per layer so the runtime layout is in place.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib
import importlib.metadata
import logging
import time
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "Peer",
    "PEERS",
    "list_peers",
    "get_peer",
    "peer_status",
    "target_linears",
    "tensor_bytes",
    "weight_bytes",
]

log = logging.getLogger(__name__)

DEFAULT_EXCLUDE: Tuple[str, ...] = ("lm_head",)


# ----------------------------------------------------------------------------------------------------------
# Selecting the layers (same rule as llmopt: fnmatch globs on the dotted name or one of its ancestors)
# ----------------------------------------------------------------------------------------------------------


def _matches(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pat) for pat in patterns for prefix in prefixes)


def target_linears(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> List[Tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` in ``model`` not matched by an ``exclude`` glob."""
    if isinstance(exclude, str):
        exclude = [exclude]
    return [(name, m) for name, m in model.named_modules()
            if name and isinstance(m, nn.Linear) and not _matches(name, list(exclude))]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _shape_summary(names: Iterable[str], model: nn.Module) -> str:
    """'120 layers (in_features 576: 120)' style summary of skipped layers."""
    by_in: Dict[int, int] = {}
    count = 0
    for name in names:
        count += 1
        m = model.get_submodule(name)
        k = getattr(m, "in_features", -1)
        by_in[k] = by_in.get(k, 0) + 1
    parts = ", ".join(f"in_features {k}: {v}" for k, v in sorted(by_in.items()))
    return f"{count} layers ({parts})"


# ----------------------------------------------------------------------------------------------------------
# Stored bytes
# ----------------------------------------------------------------------------------------------------------

_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def _is_wrapper_subclass(t: torch.Tensor) -> bool:
    return type(t) not in _PLAIN_TYPES and hasattr(t, "__tensor_flatten__")


def _collect_tensors(obj: Any, out: Dict[Any, int], seen: set, depth: int = 0) -> None:
    """Add ``storage key -> bytes`` for every tensor reachable from ``obj`` (see module docstring)."""
    if obj is None or depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if _is_wrapper_subclass(obj):
            try:
                inner_names, _ = obj.__tensor_flatten__()
            except Exception:  # fall back to the logical size below
                inner_names = None
            if inner_names is not None:
                for inner in inner_names:
                    _collect_tensors(getattr(obj, inner, None), out, seen, depth + 1)
                return
        if obj.device.type == "meta":
            return
        try:
            storage = obj.untyped_storage()
            key = ("storage", storage.data_ptr(), obj.device.type)
            nbytes = storage.nbytes()
        except Exception:  # no storage (exotic subclass): count the logical size
            key = ("tensor", id(obj))
            nbytes = obj.numel() * obj.element_size()
        if key[0] == "storage" and key[1] == 0:  # empty storage
            return
        out[key] = max(out.get(key, 0), nbytes)
        # Parameter subclasses (bitsandbytes Params4bit / Int8Params) carry their state as attributes.
        extra = getattr(obj, "__dict__", None)
        if extra:
            _collect_tensors(extra, out, seen, depth + 1)
        return
    if isinstance(obj, nn.Module):
        # Module nesting does not count towards the depth limit (which only guards helper objects):
        # a weight six modules deep in a transformer must still be found.
        for t in list(obj.parameters(recurse=False)) + list(obj.buffers(recurse=False)):
            _collect_tensors(t, out, seen, 0)
        for key, value in vars(obj).items():
            if key in ("_parameters", "_buffers", "_modules") or key.startswith(("_forward", "_backward")):
                continue
            _collect_tensors(value, out, seen, depth + 1)
        for child in obj.children():
            _collect_tensors(child, out, seen, 0)
        return
    if isinstance(obj, dict):
        for value in obj.values():
            _collect_tensors(value, out, seen, depth + 1)
        return
    if isinstance(obj, (list, tuple, set)):
        for value in obj:
            _collect_tensors(value, out, seen, depth + 1)
        return
    if isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device, torch.Size)):
        return
    # helper objects of the peers (bitsandbytes QuantState, ...): walk their attributes
    attrs = getattr(obj, "__dict__", None)
    if attrs is not None and type(obj).__module__.split(".")[0] not in ("builtins", "torch", "typing"):
        _collect_tensors(attrs, out, seen, depth + 1)


def tensor_bytes(*objs: Any) -> int:
    """Bytes of all tensors reachable from ``objs`` (modules, tensors, dicts), each storage once."""
    out: Dict[Any, int] = {}
    seen: set = set()
    for obj in objs:
        _collect_tensors(obj, out, seen)
    return int(sum(out.values()))


def weight_bytes(model: nn.Module, info: Dict[str, Any]) -> Dict[str, int]:
    """Stored bytes after ``apply``: ``quantized`` (modules the peer converted) and ``targets`` (all
    targeted layers, the skipped ones still dense), each deduplicated across its modules."""
    quantized = [model.get_submodule(n) for n in info.get("quantized_modules", [])]
    skipped = [model.get_submodule(n) for n in info.get("skipped_modules", {})]
    return {"quantized": tensor_bytes(*quantized), "targets": tensor_bytes(*(quantized + skipped))}


# ----------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except Exception:
        return None


@dataclass
class Peer:
    """One peer setting. ``apply_fn(model, targets, info)`` quantizes ``targets`` and fills ``info``."""

    name: str
    package: str                      # pip name
    module: str                       # import name
    description: str
    settings: Dict[str, Any]
    apply_fn: Callable[[nn.Module, List[Tuple[str, nn.Linear]], Dict[str, Any]], None]
    check_fn: Optional[Callable[[], Optional[str]]] = None   # extra check after import: reason or None
    inference_mode_ok: bool = True    # False: run under torch.no_grad(), torch.inference_mode() fails

    # -- status ---------------------------------------------------------------------------------------------
    def version(self) -> Optional[str]:
        return _version(self.package)

    def available(self) -> Tuple[bool, str]:
        """``(True, "")`` if this setting runs here, else ``(False, reason)``. Never raises.

        Imports the package, runs the setting's own checks, then quantizes a tiny 2-layer model with
        :meth:`apply` and runs one forward, so a missing CPU kernel shows up here, not in the benchmark."""
        try:
            try:
                importlib.import_module(self.module)
            except BaseException as exc:  # ImportError, OSError from a native lib, ...
                if isinstance(exc, KeyboardInterrupt):
                    raise
                ver = self.version()
                have = f"{self.package} {ver} is installed but " if ver else ""
                return False, (f"{have}import {self.module} failed ({type(exc).__name__}: {exc}); "
                               f"install it with: pip install {self.package}")
            if self.check_fn is not None:
                reason = self.check_fn()
                if reason:
                    return False, f"{self.package} {self.version()}: {reason}"
            reason = self._smoke()
            if reason:
                return False, f"{self.package} {self.version()}: CPU smoke test failed: {reason}"
            return True, ""
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # available() must never raise
            return False, f"{self.package}: availability check raised {type(exc).__name__}: {exc}"

    def _smoke(self) -> Optional[str]:
        try:
            gen = torch.Generator().manual_seed(0)
            model = nn.Sequential(nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 64))
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            model.eval()
            x = torch.randn(2, 128, generator=gen)
            with torch.no_grad():
                ref = model(x)
            info = self.apply(model)
            if info["layers_quantized"] == 0:
                return "no layer was quantized"
            with self.run_context():
                y = model(x.to(getattr(torch, info["compute_dtype"] or "float32")))
            if not torch.isfinite(y.float()).all():
                return "non-finite output"
            err = (y.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            if err > 0.5:
                return f"output too far from the fp32 reference (max rel error {err:.2f})"
            return None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"

    def run_context(self):
        """The grad mode to run the quantized model under."""
        return torch.inference_mode() if self.inference_mode_ok else torch.no_grad()

    # -- quantize --------------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> Dict[str, Any]:
        """Quantize ``model`` in place (see module docstring); errors become ``RuntimeError(name: ...)``."""
        info: Dict[str, Any] = {
            "peer": self.name, "package": self.package, "version": self.version(),
            "settings": dict(self.settings), "layers_quantized": 0, "layers_total": 0,
            "quantized_modules": [], "skipped_modules": {}, "compute_dtype": None,
            "notes": [], "seconds": 0.0,
        }
        t0 = time.perf_counter()
        try:
            targets = target_linears(model, exclude)
            info["layers_total"] = len(targets)
            self.apply_fn(model, targets, info)
        except Exception as exc:
            raise RuntimeError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        info["seconds"] = time.perf_counter() - t0
        info["layers_quantized"] = len(info["quantized_modules"])
        if info["skipped_modules"]:
            summary = _shape_summary(info["skipped_modules"], model)
            info["notes"].append(
                f"{self.name} left {summary} of {info['layers_total']} targeted Linear layers unquantized: "
                + min(set(info["skipped_modules"].values())))
        if not self.inference_mode_ok:
            info["notes"].append("run under torch.no_grad(): torch.inference_mode() fails with this peer "
                                 "(use peer.run_context())")
        ct = info.pop("compute_dtype_torch", None)
        if ct is not None:
            info["compute_dtype"] = str(ct).replace("torch.", "")
        return info


def _to_dtype(model: nn.Module, dtype: torch.dtype, info: Dict[str, Any]) -> None:
    """Convert the whole model (floating point tensors) to ``dtype`` in place, and record it."""
    before = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if before != {dtype}:
        model.to(dtype)
        was = ", ".join(sorted(str(d).replace("torch.", "") for d in before))
        info["notes"].append(f"model converted from {was} to {str(dtype).replace('torch.', '')} "
                             "(model.to: lm_head, embeddings and float buffers such as RoPE inv_freq too)")
    info["compute_dtype_torch"] = dtype


@torch.no_grad()
def _warm_layers(model: nn.Module, names: Iterable[str], dtype: torch.dtype) -> None:
    """One tiny forward per converted layer (bitsandbytes packs for its CPU kernel on the first call)."""
    for name in names:
        m = model.get_submodule(name)
        k = getattr(m, "in_features", None)
        if k is None:
            continue
        was_training = m.training
        m.eval()
        m(torch.zeros(1, k, dtype=dtype))
        m.train(was_training)


# ---------------------------------------------------------------------------------------------- torchao ----


def _torchao_int4_config(group_size: int) -> Tuple[Any, str]:
    """The CPU int4 weight-only config of the installed torchao, and a label for it."""
    try:  # torchao >= 0.16: the CPU layout lives in the prototype namespace
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False), \
            "PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor, aten._weight_int4pack_mm_for_cpu)"
    except ImportError:
        pass
    from torchao.quantization import Int4WeightOnlyConfig

    names = {f.name for f in fields(Int4WeightOnlyConfig)} if is_dataclass(Int4WeightOnlyConfig) else set()
    if "int4_packing_format" in names:  # torchao 0.14 / 0.15
        try:
            from torchao.quantization.quantize_.workflows import Int4PackingFormat

            if "opaque" in {m.value for m in Int4PackingFormat}:
                return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="opaque"), \
                    'Int4WeightOnlyConfig(int4_packing_format="opaque")'
        except ImportError:
            pass
    try:  # older torchao: AffineQuantizedTensor with the CPU layout
        from torchao.dtypes import Int4CPULayout

        kwargs: Dict[str, Any] = {"group_size": group_size, "layout": Int4CPULayout()}
        if "version" in names:
            kwargs["version"] = 1
        return Int4WeightOnlyConfig(**kwargs), "Int4WeightOnlyConfig(layout=Int4CPULayout())"
    except ImportError:
        pass
    raise RuntimeError("this torchao has no CPU int4 layout (tried PrototypeInt4WeightOnlyConfig, "
                       "int4_packing_format='opaque', Int4CPULayout)")


def _torchao_int8_config() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    names = {f.name for f in fields(Int8WeightOnlyConfig)} if is_dataclass(Int8WeightOnlyConfig) else set()
    return Int8WeightOnlyConfig(set_inductor_config=False) if "set_inductor_config" in names \
        else Int8WeightOnlyConfig()


def _torchao_apply(kind: str, group_size: Optional[int]):
    def apply_fn(model, targets, info):
        from torchao.quantization import quantize_

        if kind == "int4":
            config, label = _torchao_int4_config(group_size)
        else:
            config, label = _torchao_int8_config(), "Int8WeightOnlyConfig (per-row symmetric int8 weights)"
        info["notes"].append(f"torchao config: {label}")
        _to_dtype(model, torch.bfloat16, info)
        wanted = {name for name, _ in targets}
        quantize_(model, config, filter_fn=lambda mod, fqn: fqn in wanted and isinstance(mod, nn.Linear))
        for name, _ in targets:
            w = model.get_submodule(name).weight
            if _is_wrapper_subclass(w):
                info["quantized_modules"].append(name)
            else:
                k = model.get_submodule(name).in_features
                why = (f"in_features not a multiple of group_size {group_size} (torchao skips silently)"
                       if group_size and k % group_size else "torchao left the weight as a plain tensor")
                info["skipped_modules"][name] = why
    return apply_fn


def _torchao_check(kind: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        op = "_weight_int4pack_mm_for_cpu" if kind == "int4" else "_weight_int8pack_mm"
        if not hasattr(torch.ops.aten, op):
            return f"torch {torch.__version__} has no aten.{op} CPU kernel"
        if kind == "int4":
            try:
                _torchao_int4_config(64)
            except Exception as exc:
                return str(exc)
        return None
    return check


# -------------------------------------------------------------------------------------------------- hqq ----


def _hqq_apply(nbits: int, group_size: int):
    def apply_fn(model, targets, info):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        dtype = torch.bfloat16
        _to_dtype(model, dtype, info)
        config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
        backend = getattr(getattr(HQQLinear, "backend", None), "name", "?")
        info["notes"].append(f"hqq HQQLinear backend {backend} (dequantize the layer, then a dense matmul)")
        for name, lin in targets:
            q = HQQLinear(lin, config, compute_dtype=dtype, device="cpu", del_orig=True)
            _set_submodule(model, name, q)
            info["quantized_modules"].append(name)
    return apply_fn


def _hqq_check(nbits: int) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        from hqq.core.quantize import Quantizer

        supported = getattr(Quantizer, "SUPPORTED_BITS", None)
        if supported is not None and nbits not in supported:
            return f"hqq does not support {nbits}-bit (supported: {supported})"
        return None
    return check


# ----------------------------------------------------------------------------------------------- quanto ----


def _quanto_apply(kind: str, group_size: Optional[int]):
    def apply_fn(model, targets, info):
        from optimum.quanto import QTensor, freeze, qint4, qint8, quantize

        _to_dtype(model, torch.bfloat16, info)
        names = [name for name, _ in targets]
        if not names:
            return
        quantize(model, weights=qint4 if kind == "int4" else qint8, include=[glob.escape(n) for n in names])
        groups: Dict[Any, int] = {}
        for name in names:
            m = model.get_submodule(name)
            if kind == "int4" and group_size is not None and hasattr(m, "weight_group_size"):
                k = m.weight.shape[1]
                if k % group_size == 0:
                    m.weight_group_size = group_size
            g = getattr(m, "weight_group_size", None)
            groups[g] = groups.get(g, 0) + 1
        freeze(model)
        for name in names:
            w = getattr(model.get_submodule(name), "weight", None)
            if isinstance(w, QTensor):
                info["quantized_modules"].append(name)
            else:
                info["skipped_modules"][name] = "quanto did not quantize this layer"
        if kind == "int4":
            info["notes"].append("quanto qint4 group sizes (None = per row): "
                                 + ", ".join(f"{g}: {n} layers" for g, n in groups.items())
                                 + f" (forced to {group_size} where in_features allows; quanto's own pick "
                                   "is 128, lowered by 32 until it divides in_features)")
    return apply_fn


# ---------------------------------------------------------------------------------------- bitsandbytes ----


class _DropCastWarning(logging.Filter):
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ... to float16' on every int8 matmul."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in str(record.msg)


_DROP_CAST_WARNING = _DropCastWarning()


def _bnb_apply(kind: str):
    def apply_fn(model, targets, info):
        import bitsandbytes as bnb

        if kind == "int8":
            bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
            if _DROP_CAST_WARNING not in bnb_log.filters:
                bnb_log.addFilter(_DROP_CAST_WARNING)

        dtype = torch.bfloat16
        _to_dtype(model, dtype, info)
        for name, lin in targets:
            has_bias = lin.bias is not None
            if kind == "nf4":
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=dtype,
                                        compress_statistics=False, quant_type="nf4", device="meta")
                weight = bnb.nn.Params4bit(lin.weight.data.contiguous(), requires_grad=False, blocksize=64,
                                           compress_statistics=False, quant_type="nf4", module=new)
                new.weight = weight.to("cpu")  # quantizes (Params4bit._quantize)
            else:
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=0.0, device="meta")
                new.weight = bnb.nn.Int8Params(lin.weight.data.contiguous(), requires_grad=False,
                                               has_fp16_weights=False).to("cpu")  # quantizes
            if has_bias:
                new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            new.train(lin.training)
            _set_submodule(model, name, new)
            info["quantized_modules"].append(name)
        _warm_layers(model, info["quantized_modules"], dtype)
        if kind == "nf4":
            from bitsandbytes.functional import has_avx512bf16

            if has_avx512bf16():
                info["notes"].append("bnb nf4: blocksize 64, no double quant; CPU kernel gemv_4bit (AVX-512 "
                                     "BF16, weights repacked and absmax made bf16 on the first forward)")
            else:
                info["notes"].append("bnb nf4: no AVX-512 BF16 here: the slow dequantize + matmul path runs")
        else:
            info["notes"].append("bnb int8: LLM.int8 without outlier columns (threshold=0): per-row int8 "
                                 "weights, activations (bf16) cast to fp16 and quantized to int8 per row "
                                 "at run time, torch._int_mm; its per-call 'inputs will be cast' log "
                                 "warning is filtered")
    return apply_fn


def _bnb_check() -> Optional[str]:
    from bitsandbytes.cextension import lib

    if type(lib).__name__ == "ErrorHandlerMockBNBNativeLibrary":
        return "the bitsandbytes native CPU library did not load"
    return None


# ------------------------------------------------------------------------------------------- registry ----

PEERS: Dict[str, Peer] = {}


def _register(peer: Peer) -> None:
    PEERS[peer.name] = peer


_register(Peer("torchao_int8", "torchao", "torchao", "torchao int8 weight-only, per row",
               {"bits": 8, "group_size": None}, _torchao_apply("int8", None), _torchao_check("int8")))
for _g in (64, 128):
    _register(Peer(f"torchao_int4_g{_g}", "torchao", "torchao",
                   f"torchao int4 weight-only, group {_g}, CPU layout",
                   {"bits": 4, "group_size": _g}, _torchao_apply("int4", _g), _torchao_check("int4")))
for _b in (4, 3):
    _register(Peer(f"hqq_{_b}bit_g64", "hqq", "hqq.core.quantize", f"hqq {_b}-bit, group 64",
                   {"bits": _b, "group_size": 64}, _hqq_apply(_b, 64), _hqq_check(_b)))
_register(Peer("quanto_int4", "optimum-quanto", "optimum.quanto", "optimum-quanto qint4 weights, group 64",
               {"bits": 4, "group_size": 64}, _quanto_apply("int4", 64), inference_mode_ok=False))
_register(Peer("quanto_int8", "optimum-quanto", "optimum.quanto", "optimum-quanto qint8 weights, per row",
               {"bits": 8, "group_size": None}, _quanto_apply("int8", None)))
_register(Peer("bnb_nf4", "bitsandbytes", "bitsandbytes", "bitsandbytes NF4, blocksize 64",
               {"bits": 4, "group_size": 64, "format": "nf4"}, _bnb_apply("nf4"), _bnb_check))
_register(Peer("bnb_int8", "bitsandbytes", "bitsandbytes", "bitsandbytes LLM.int8 (threshold 0), per row",
               {"bits": 8, "group_size": None}, _bnb_apply("int8"), _bnb_check))


def list_peers() -> List[str]:
    """Names of all registered peer settings, in registry order."""
    return list(PEERS)


def get_peer(name: str) -> Peer:
    try:
        return PEERS[name]
    except KeyError:
        raise KeyError(f"unknown peer {name!r}; known: {', '.join(PEERS)}") from None


def peer_status(names: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """``[{"name", "package", "available", "reason", "version"}]`` per peer (all by default); never raises."""
    rows = []
    for name in (list(names) if names is not None else list_peers()):
        peer = PEERS.get(name)
        if peer is None:
            rows.append({"name": name, "package": None, "available": False,
                         "reason": "unknown peer", "version": None})
            continue
        try:
            ok, reason = peer.available()
        except BaseException as exc:  # available() does not raise; belt and braces
            if isinstance(exc, KeyboardInterrupt):
                raise
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        rows.append({"name": name, "package": peer.package, "available": bool(ok),
                     "reason": reason, "version": peer.version()})
    return rows
