"""Block-sequential calibration: capture the first block's inputs, then compress block by block.

The runner knows no architecture. It finds the model's repeated blocks (the largest ``nn.ModuleList``
whose children share one class), runs the model on each calibration batch only until block 0 is
called (a forward pre-hook records block 0's positional and keyword arguments, then stops the
forward), and from there on drives the blocks itself:

    for each block i:
        hook every linear of block i -> LayerStats          (stats of the inputs it really sees)
        run block i on every batch's current hidden states   (outputs discarded)
        process_block(i, block, stats)                       (the method compresses block i in place)
        run the compressed block i again -> hidden states fed to block i+1

so block ``i+1`` always sees the outputs of the *already compressed* block ``i``. Only the current
hidden states (one tensor per batch) are kept; the other arguments of block 0 (attention mask,
position embeddings, position ids, ...) are reused unchanged for every block. With ``device=...`` each
block is moved there for its turn and moved back afterwards, so a model larger than the device's
memory can be calibrated.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import difflib
import functools
import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..core.targets import Patterns, _as_list, _matches, is_compressed
from .graph import SourceTracer
from .stats import LayerStats, StatsSpec, compute_increment

__all__ = [
    "find_blocks", "capture_block_inputs", "run_blocks", "collect_stats", "CalibrationRun",
    "linear_like_modules", "check_calibration_data", "forward_keywords", "BlockIO",
]

Batch = Union[torch.Tensor, Mapping]
PROPAGATE = ("quantized", "float")
ProcessBlock = Callable[[int, nn.Module, Dict[str, LayerStats]], Any]
TEACHERS = ("local", "float")

_EXPECTED = ("a tensor of token ids of shape (batch, seq), or a dict of keyword arguments for the "
             "model's forward (input_ids, attention_mask, ...)")


class _StopForward(Exception):
    """Raised by the block-0 pre-hook to end the model's forward once block 0's inputs are recorded."""


# --------------------------------------------------------------------------------------------------
# Which modules: blocks and linear layers
# --------------------------------------------------------------------------------------------------
def _is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (subclasses included) or Hugging Face's ``Conv1D`` (GPT-2: ``y = x @ W + b``)."""
    if is_compressed(module):
        return False
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]  # Conv1D stores its weight as (in, out)


def linear_like_modules(root: nn.Module, prefix: str = "", include: Patterns = None,
                        exclude: Patterns = None) -> Dict[str, nn.Module]:
    """``{full_name: module}`` of the linear layers under ``root`` whose stats the runner collects.

    Names are ``prefix + "." + name inside root``; ``include``/``exclude`` are ``fnmatch`` globs on
    those full names (a pattern matching a module covers everything inside it). Already-compressed
    llmopt wrappers are left out.
    """
    inc, exc = _as_list(include), _as_list(exclude)
    found = {}
    for name, module in root.named_modules():
        full = ".".join(p for p in (prefix, name) if p)
        if not full or not _is_linear_like(module):
            continue
        if inc and not _matches(full, inc):
            continue
        if exc and _matches(full, exc):
            continue
        found[full] = module
    return found


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, path: Optional[str] = None, *, argument: str = "path"
                ) -> Tuple[str, nn.ModuleList]:
    """``(dotted_path, blocks)``: the model's repeated blocks.

    Without ``path``: the ``nn.ModuleList`` holding the most parameters among those whose children
    all have the same class (``model.layers`` for Llama, ``transformer.h`` for GPT-2, ``layers`` for
    a hand-written model). ``path`` overrides the search (an ``nn.ModuleList`` or ``nn.Sequential``).
    ``argument``: the caller's name for ``path`` (``"blocks_path"``), which the errors tell the user to pass.
    """
    if path is not None:
        try:
            blocks = model.get_submodule(path) if path else model
        except AttributeError:
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
            raise ValueError(f"block path {path!r} does not exist in {type(model).__name__} "
                             f"(ModuleLists in the model: {lists[:8] or 'none'})") from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(f"block path {path!r} points to a {type(blocks).__name__}; expected a non-empty "
                             "nn.ModuleList (or nn.Sequential) of blocks")
        return path, blocks
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        size = _n_params(module)
        if size > 0 and size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"no repeated blocks found in {type(model).__name__}: it has no nn.ModuleList whose "
                         f"children share one class; pass {argument}='...' (e.g. 'model.layers') to name them")
    return best


# --------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------
def _input_embedding(model: nn.Module) -> Optional[nn.Embedding]:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except Exception:  # some models do not implement it
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _input_device(model: nn.Module) -> torch.device:
    """Where calibration batches go: the input embedding's device (else the model's first parameter's)."""
    emb = _input_embedding(model)
    return _module_device(emb if emb is not None else model)


def _check_ids(index: int, ids: Any, emb: Optional[nn.Embedding], what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"calibration batch {index}: {what} is a {type(ids).__name__}; expected {_EXPECTED}")
    if ids.numel() == 0:
        raise ValueError(f"calibration batch {index}: {what} is empty (shape {tuple(ids.shape)}); "
                         f"expected {_EXPECTED}")
    if emb is None:
        return ids
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"calibration batch {index}: {what} has dtype {ids.dtype}; expected integer token "
                         "ids (torch.long) of shape (batch, seq) for this model's embedding")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)  # one sequence
    if ids.dim() != 2:
        raise ValueError(f"calibration batch {index}: {what} has shape {tuple(ids.shape)}; expected token "
                         "ids of shape (batch, seq)")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= emb.num_embeddings:
        raise ValueError(f"calibration batch {index}: {what} holds token ids in [{lo}, {hi}]; the model's "
                         f"vocabulary is [0, {emb.num_embeddings - 1}]")
    return ids


# Keyword arguments every Hugging Face model's forward takes, in some version, explicitly or through an
# untyped ``**kwargs`` that it passes on to its layers (which would drop a misspelt key silently).
_HF_FORWARD_KWARGS = frozenset({
    "input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds", "labels", "use_cache",
    "past_key_values", "cache", "cache_position", "head_mask", "output_attentions", "output_hidden_states",
    "return_dict", "logits_to_keep", "num_logits_to_keep", "num_items_in_batch",
})


def forward_keywords(model: nn.Module) -> Optional[frozenset]:
    """The keyword arguments ``model.forward`` is known to take, or ``None`` when they cannot be known.

    Explicit parameters, plus the keys of a typed ``**kwargs: Unpack[SomeTypedDict]`` (Hugging Face's
    ``TransformersKwargs``), plus the usual Hugging Face keyword arguments for a ``PreTrainedModel``
    (they are often read from an untyped ``**kwargs``). ``None`` for a forward with no named parameter
    at all (``(*args, **kwargs)``, e.g. a wrapper): nothing can be checked then.
    """
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = [p for p in params if p.kind == p.VAR_KEYWORD]
    if not var_kw:
        return frozenset(names)
    typed = getattr(var_kw[0].annotation, "__args__", None)  # Unpack[TD] -> (TD,)
    if typed and isinstance(typed[0], type) and issubclass(typed[0], dict):
        names |= set(getattr(typed[0], "__required_keys__", set())) | set(getattr(typed[0], "__optional_keys__",
                                                                                   set()))
    if any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__):
        names |= _HF_FORWARD_KWARGS
    return frozenset(names) if names else None


def _check_keys(index: int, batch: Mapping, accepted: Optional[frozenset], model: nn.Module) -> None:
    """A key the forward does not take would be swallowed by a ``**kwargs`` (a misspelt ``attention_mask``
    then silently calibrates without a mask): refuse it, naming it and what the forward takes."""
    if accepted is None:
        return
    unknown = sorted(str(k) for k in batch if k not in accepted)
    if not unknown:
        return
    hints = [f"{close[0]!r} for {k!r}" for k in unknown
             for close in [difflib.get_close_matches(k, sorted(accepted), 1)] if close]
    var_kw = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    raise ValueError(
        f"calibration batch {index}: key(s) {unknown} are not keyword arguments of "
        f"{type(model).__name__}.forward" + (f" (did you mean {', '.join(hints)}?)" if hints else "")
        + f"; it takes {sorted(accepted)}"
        + (". A key the forward only reads from **kwargs cannot be checked: make it a named parameter"
           if var_kw else ""))


def check_calibration_data(batches: Any) -> None:
    """The one mistake that can be seen without the model: a single batch (a tensor or a dict) or ``None``
    where a list of batches is expected. Raises ``ValueError`` saying what is expected."""
    if batches is None:
        raise ValueError(f"calibration data is empty (got None); pass a list of batches, each {_EXPECTED}")
    if isinstance(batches, (torch.Tensor, Mapping)):
        shape = f" of shape {tuple(batches.shape)}" if isinstance(batches, torch.Tensor) else ""
        raise ValueError(f"calibration data must be a list of batches, got a single {type(batches).__name__}"
                         f"{shape}; wrap it in a list (calibration=[batch]), each batch {_EXPECTED}")


def _normalize_batches(model: nn.Module, batches: Iterable[Batch]) -> List[Tuple[tuple, dict]]:
    """Check every batch before anything runs; returns ``(args, kwargs)`` for the model's forward."""
    check_calibration_data(batches)
    batches = list(batches)
    if not batches:
        raise ValueError(f"calibration data is empty; pass a list of batches, each {_EXPECTED}")
    emb = _input_embedding(model)
    accepted = forward_keywords(model) if any(isinstance(b, Mapping) for b in batches) else None
    out = []
    for i, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            out.append(((_check_ids(i, batch, emb, "the tensor"),), {}))
        elif isinstance(batch, Mapping):
            if not batch:
                raise ValueError(f"calibration batch {i} is an empty dict; expected {_EXPECTED}")
            _check_keys(i, batch, accepted, model)
            kwargs = dict(batch)
            if "input_ids" in kwargs and kwargs["input_ids"] is not None:
                kwargs["input_ids"] = ids = _check_ids(i, kwargs["input_ids"], emb, "input_ids")
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape != ids.shape:
                    raise ValueError(f"calibration batch {i}: attention_mask has shape {tuple(mask.shape)} "
                                     f"but input_ids has shape {tuple(ids.shape)}; expected the same "
                                     "(batch, seq)")
            out.append(((), kwargs))
        else:
            raise ValueError(f"calibration batch {i} is a {type(batch).__name__}; expected {_EXPECTED}")
    return out


def _to(obj: Any, device: Optional[torch.device]) -> Any:
    """Move the tensors in ``obj`` (nested tuples/lists/dicts) to ``device``; other objects unchanged."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to(o, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` if this process has it (Linux), else ``None``."""
    try:
        libc = ctypes.CDLL(None)
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Hand memory freed by the last block back to the OS. Each block's work frees hundreds of MB of
    temporaries in pieces that glibc keeps in its heap; without this the process's RSS creeps up
    block after block (trimming lowered GPTQ's peak on SmolLM2 by ~40 MB), which is what the user sees."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _dense_copy(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``block`` in ``dtype`` whose weight-only quantized layers are dense ``nn.Linear``s of
    their dequantized weights: the same function (up to ``dtype`` rounding), but at the hundreds of
    rows of a calibration batch a dense matmul beats the int4/int8 kernels (0.65 s of 2.2 s per
    SmolLM2 block at 128 x 512 tokens). Layers that quantize activations are kept as they are."""
    runner = copy.deepcopy(block)
    dense = {name: module.to_linear(dtype) for name, module in runner.named_modules()
             if is_compressed(module) and hasattr(module, "to_linear")
             and getattr(module, "act_bits", None) is None}
    for name, linear in dense.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(runner.get_submodule(parent_name) if parent_name else runner, attr, linear)
    return runner.to(dtype)


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors in ``obj`` (nested tuples/lists/dicts) to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_cast_floats(o, dtype) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _is_cache(obj: Any) -> bool:
    """A key/value cache object (``transformers.Cache`` and look-alikes), which calibration never keeps."""
    return (not isinstance(obj, (torch.Tensor, str, int, float, bool, tuple, list, dict))
            and obj is not None and any(c.__name__.endswith("Cache") for c in type(obj).__mro__))


def _no_cache_kwargs(model: nn.Module) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


class _TrainingState:
    """Puts every module in eval mode (no dropout during calibration) and restores the flags after."""

    def __init__(self, model: nn.Module):
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        for m, _ in self.flags:
            m.training = False
        return self

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


# --------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------
def _clean_arg(value: Any) -> Any:
    return None if _is_cache(value) else value


def _capture(model: nn.Module, block0: nn.Module, prepared: List[Tuple[tuple, dict]],
             store_device: Optional[torch.device] = None) -> List[Tuple[tuple, dict]]:
    extra = _no_cache_kwargs(model)
    in_device = _input_device(model)
    captured: List[Tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _TrainingState(model), torch.no_grad():
            for i, (args, kwargs) in enumerate(prepared):
                n_before = len(captured)
                call_kwargs = {**_to(kwargs, in_device), **extra}
                try:
                    model(*_to(args, in_device), **call_kwargs)
                except _StopForward:
                    pass
                except Exception as e:
                    raise ValueError(f"calibration batch {i} could not be run through the model up to its "
                                     f"first block ({type(e).__name__}: {e}); expected {_EXPECTED}") from e
                if len(captured) == n_before:
                    raise ValueError(f"calibration batch {i}: the model's forward finished without calling "
                                     "its first block; pass path='...' to name the repeated blocks")
    finally:
        handle.remove()
    out = []
    for args, kwargs in captured:
        args = tuple(_to(_clean_arg(a), store_device) for a in args)
        kwargs = {k: _to(_clean_arg(v), store_device) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        out.append((args, kwargs))
    return out


def capture_block_inputs(model: nn.Module, blocks: Union[nn.ModuleList, nn.Module],
                         batches: Iterable[Batch]) -> List[Tuple[tuple, dict]]:
    """Block 0's ``(args, kwargs)`` for each calibration batch (the model is run only up to block 0).

    ``batches``: token-id tensors ``(batch, seq)`` or dicts of keyword arguments for the model's
    forward. Caches are disabled (``use_cache=False`` when the forward accepts it) and any cache object
    block 0 receives is replaced by ``None``; every other argument (hidden states, attention mask,
    position embeddings, position ids, ...) is kept as given, per batch. Raises ``ValueError`` naming
    the batch on empty or malformed data; the model is never modified.
    """
    block0 = blocks[0] if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else blocks
    return _capture(model, block0, _normalize_batches(model, batches))


# --------------------------------------------------------------------------------------------------
# Stats hooks
# --------------------------------------------------------------------------------------------------
class _StatsHooks:
    """Forward pre-hooks that feed each linear's input to its :class:`LayerStats`.

    Layers reading the very same input tensor (q/k/v, gate/up) share one ``x^T x`` computation
    (found by tensor identity and version counter within a pass). Inputs are copied into a buffer per
    group of layers and their statistics computed once ``rows_per_product`` rows have gathered (and at
    :meth:`finish`): one tall ``x^T x`` runs ~30% faster than many short ones (bf16, K=1536: 178 vs
    133 GFLOP/s for 4096 vs 512 rows), at the cost of a bounded buffer (4096 x 1536 bf16 = 12 MiB).
    """

    def __init__(self, modules: Dict[str, nn.Module], spec: StatsSpec, rows_per_product: int = 4096):
        self.spec = spec
        self.rows_per_product = rows_per_product
        self.stats: Dict[str, LayerStats] = {}
        self.handles = []
        # this pass: id(x) -> (x, version, copied rows, names of the layers that read it)
        self.pass_inputs: Dict[int, Tuple[torch.Tensor, int, torch.Tensor, List[str]]] = {}
        self.pending: Dict[Tuple[str, ...], List[torch.Tensor]] = {}
        for name, module in modules.items():
            stats = LayerStats(_in_features(module), spec)
            self.stats[name] = stats
            self.handles.append(module.register_forward_pre_hook(self._hook(name, stats), with_kwargs=True))

    def _hook(self, name: str, stats: LayerStats):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if not isinstance(x, torch.Tensor):
                return None
            if x.shape[-1] != stats.in_features:
                raise ValueError(f"layer {name!r}: input has {x.shape[-1]} features in its last dimension, "
                                 f"expected {stats.in_features}")
            entry = self.pass_inputs.get(id(x))
            if entry is not None and entry[0] is x and entry[1] == x._version:
                entry[3].append(name)
            else:
                # A copy: the model may modify the tensor in place after the layer has read it.
                rows = x.detach().reshape(-1, stats.in_features).clone()
                self.pass_inputs[id(x)] = (x, x._version, rows, [name])
            return None
        return hook

    def _flush(self, key: Tuple[str, ...]) -> None:
        parts = self.pending.pop(key)
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)
        inc = compute_increment(rows, rows.shape[-1], self.spec)
        for name in key:
            self.stats[name].add(inc)

    def new_pass(self) -> None:
        """End of one batch's forward: queue its inputs, computing statistics for full buffers."""
        for _x, _version, rows, names in self.pass_inputs.values():
            key = tuple(names)
            self.pending.setdefault(key, []).append(rows)
            if sum(p.shape[0] for p in self.pending[key]) >= self.rows_per_product:
                self._flush(key)
        self.pass_inputs.clear()

    def finish(self) -> None:
        """Compute the statistics of everything still buffered (call before reading ``stats``)."""
        self.new_pass()
        for key in list(self.pending):
            self._flush(key)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.finish()


# --------------------------------------------------------------------------------------------------
# Block-sequential run
# --------------------------------------------------------------------------------------------------
def _hidden_slot(args: tuple, kwargs: dict) -> Union[int, str]:
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):  # named explicitly: no doubt
        return "hidden_states"
    if args and isinstance(args[0], torch.Tensor):
        return 0
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return k
    raise ValueError("could not tell which argument of block 0 is the hidden states (no tensor positional "
                     f"argument, no 'hidden_states' keyword; keywords: {sorted(kwargs)})")


def _first_output(out: Any, index: int) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()[0]
    elif isinstance(out, Mapping):
        out = out["hidden_states"] if "hidden_states" in out else next(iter(out.values()), None)
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"block {index} returned {type(out).__name__}; expected a tensor or a tuple whose "
                        "first element is the hidden states")
    return out


@dataclass
class BlockIO:
    """One block's calibration data, for methods that train the compressed block on it
    (:func:`run_blocks` with ``block_io=``).

    Attributes:
        inputs: the hidden states fed to the block, one tensor per batch (what the compressed block
            will see: the outputs of the already compressed previous blocks, with ``propagate="quantized"``).
        targets: what the block should output for each of ``inputs``: the uncompressed block's outputs,
            on ``inputs`` (``teacher="local"``) or on the uncompressed model's own hidden states
            (``teacher="float"``: the block also learns to undo the error of the blocks before it).
        dtype: the calibration dtype (``None``: the block's own); ``inputs`` and ``targets`` are in it.
    """

    inputs: List[torch.Tensor]
    targets: List[torch.Tensor]
    dtype: Optional[torch.dtype]
    _call: Callable[[nn.Module, int], torch.Tensor]

    def run(self, block: nn.Module, index: int) -> torch.Tensor:
        """``block`` (a copy of this block, possibly modified) on batch ``index``'s inputs, with the batch's
        other arguments (attention mask, position embeddings, ...); gradients flow."""
        return self._call(block, index)

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class CalibrationRun:
    """What :func:`run_blocks` did."""

    path: str
    num_blocks: int
    num_batches: int
    tokens: int  # rows (batch * seq) per block pass
    seconds: float = 0.0
    capture_seconds: float = 0.0
    block_seconds: List[float] = field(default_factory=list)


def run_blocks(
    model: nn.Module,
    batches: Iterable[Batch],
    process_block: ProcessBlock,
    *,
    stats_spec: Optional[StatsSpec] = None,
    path: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    offload_activations: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    progress: bool = True,
    trace_sources: bool = False,
    dtype: Optional[torch.dtype] = None,
    propagate: str = "quantized",
    block_io: Optional[str] = None,
) -> CalibrationRun:
    """Calibrate ``model`` block by block, each block seeing the outputs of the compressed previous one.

    ``process_block(block_index, block, stats)`` is called once per block with
    ``stats = {linear_name: LayerStats}`` (names relative to the model, e.g.
    ``"model.layers.3.self_attn.q_proj"``) holding the statistics of the inputs each linear layer of
    the block received; it compresses the block in place (it may replace modules). The compressed
    block is then run again to produce the next block's inputs (skipped after the last block).

    ``device``: each block (and its inputs) is moved there for its turn and moved back afterwards;
    ``None`` runs each block where it lives. The current hidden states (one tensor per batch) stay on
    the execution device, or on the CPU with ``offload_activations=True``. ``include``/``exclude``:
    globs on linear names (default: every linear layer of the block; a block with no match gets ``{}``,
    and patterns for layers outside the blocks, like ``lm_head``, are simply not used). Empty or
    malformed calibration data raises ``ValueError`` before anything is modified; an error in
    ``process_block`` propagates (after the block is moved back and the hooks are removed); rolling
    back is the caller's job.

    ``trace_sources=True``: during the first batch of each block, every submodule is hooked to find
    which module produced each linear's input (:class:`~llmopt.calibration.graph.InputSource`), and
    ``process_block`` is called with a fourth argument ``{linear_name: InputSource}``.

    ``dtype`` (e.g. ``torch.bfloat16``): run the calibration forwards in this dtype, on a temporary
    copy of each block (the model's own weights are never cast, so nothing is lost when it goes
    back); hidden states are kept in ``dtype`` too. About 2.5x faster on CPUs with bf16 support;
    the statistics are still accumulated in ``stats_spec.dtype``.

    ``propagate``: what feeds block ``i+1``. ``"quantized"`` (default, GPTQ's choice): the outputs of
    block ``i`` *after* ``process_block`` compressed it, which costs a second forward per block.
    ``"float"`` (AWQ's and SmoothQuant's reference choice): the outputs of the uncompressed block,
    taken from the statistics pass itself, so each block runs once.

    ``block_io`` (``"local"`` or ``"float"``): ``process_block`` also gets ``io=``, a :class:`BlockIO`
    with the block's inputs and the outputs the uncompressed block gives on them (``"local"``) or on
    the uncompressed model's hidden states (``"float"``, which keeps a second stream of hidden states
    and runs each uncompressed block once more on it).
    """
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    if block_io is not None and block_io not in TEACHERS:
        raise ValueError(f"block_io must be None or one of {TEACHERS}, got {block_io!r}")
    # Float-stream targets differ from the local ones only when the stream the block sees is quantized.
    float_stream = block_io == "float" and propagate == "quantized"
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype or None, got {dtype!r}")
    spec = stats_spec if stats_spec is not None else StatsSpec()
    start = time.perf_counter()
    prepared = _normalize_batches(model, batches)
    path, blocks = find_blocks(model, path)
    exec_device = torch.device(device) if device is not None else None
    cpu = torch.device("cpu")
    store_device = cpu if offload_activations else exec_device
    captured = _capture(model, blocks[0], prepared, store_device)
    if dtype is not None:
        captured = _cast_floats(captured, dtype)
    slot = _hidden_slot(*captured[0])
    hidden: List[torch.Tensor] = []
    rest: List[Tuple[tuple, dict]] = []
    for args, kwargs in captured:
        if isinstance(slot, int):
            hidden.append(args[0])
            rest.append((args[1:], kwargs))
        else:
            kwargs = dict(kwargs)
            hidden.append(kwargs.pop(slot))
            rest.append((args, kwargs))
    del captured
    teacher_hidden = list(hidden) if float_stream else None
    run = CalibrationRun(path=path, num_blocks=len(blocks), num_batches=len(hidden),
                         tokens=sum(h.numel() // h.shape[-1] for h in hidden),
                         capture_seconds=time.perf_counter() - start)

    def call(block: nn.Module, j: int, index: int, dev: Optional[torch.device],
             source: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        args, kwargs = _to(rest[j], dev)
        h = _to((hidden if source is None else source)[j], dev)
        if isinstance(slot, int):
            out = block(h, *args, **kwargs)
        else:
            out = block(*args, **{**kwargs, slot: h})
        return _first_output(out, index)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = None
    if tqdm is not None:
        bar = tqdm(total=len(blocks), desc=f"calibrating {path}", unit="block", disable=not progress)
    try:
        with _TrainingState(model):
            for i, block in enumerate(blocks):
                t0 = time.perf_counter()
                home = _module_device(block)
                dev = exec_device if exec_device is not None else home
                keep = store_device if store_device is not None else dev
                if exec_device is not None:
                    block.to(exec_device)
                hooks = None
                try:
                    prefix = f"{path}.{i}" if path else str(i)
                    # The block the forwards run on: the block itself, or a copy cast to ``dtype``.
                    runner = copy.deepcopy(block).to(dtype) if dtype is not None else block
                    hooks = _StatsHooks(linear_like_modules(runner, prefix, include, exclude), spec)
                    sources = None
                    io = None
                    if block_io is not None:
                        io = BlockIO(inputs=list(hidden), targets=[], dtype=dtype,
                                     _call=functools.partial(call, index=i, dev=dev))
                    with torch.no_grad():
                        for j in range(len(hidden)):
                            tracer = SourceTracer(runner, prefix) if trace_sources and j == 0 else None
                            with tracer if tracer is not None else contextlib.nullcontext():
                                out = call(runner, j, i, dev)
                            if io is not None and not float_stream:
                                io.targets.append(out.to(keep))
                            if propagate == "float" and i + 1 < len(blocks):
                                hidden[j] = out.to(keep)  # this (uncompressed) output feeds block i+1
                            del out
                            if tracer is not None:
                                sources = tracer.sources(hooks.stats)
                                tracer.clear()
                            hooks.new_pass()
                    hooks.remove()
                    if teacher_hidden is not None:
                        # The uncompressed model's own stream: its block i output is the target, and
                        # the input of block i+1's target.
                        with torch.no_grad():
                            for j in range(len(teacher_hidden)):
                                teacher_hidden[j] = call(runner, j, i, dev, source=teacher_hidden).to(keep)
                        io.targets.extend(teacher_hidden)
                    stats, hooks.stats = hooks.stats, {}
                    extra = {"io": io} if io is not None else {}
                    if trace_sources:
                        process_block(i, block, stats, sources or {}, **extra)
                    else:
                        process_block(i, block, stats, **extra)
                    del io
                    del stats
                    if propagate == "quantized" and i + 1 < len(blocks):
                        # the compressed block's outputs feed the next block
                        runner = _dense_copy(block, dtype) if dtype is not None else block
                        with torch.no_grad():
                            for j in range(len(hidden)):
                                hidden[j] = call(runner, j, i, dev).to(keep)
                    del runner
                    _release_freed_memory()
                finally:
                    if hooks is not None:
                        hooks.remove()
                    if exec_device is not None and home != exec_device:
                        block.to(home)
                run.block_seconds.append(time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    run.seconds = time.perf_counter() - start
    return run


def collect_stats(
    model: nn.Module,
    batches: Iterable[Batch],
    stats_spec: Optional[StatsSpec] = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> Dict[str, LayerStats]:
    """``{linear_name: LayerStats}`` from plain forwards of the (unmodified) model, no block-sequential run.

    For methods that need the input statistics of the original model all at once (SmoothQuant-style
    smoothing factors). ``include``/``exclude`` are globs on the full linear names; an include pattern
    that matches no linear layer is an error.
    """
    spec = stats_spec if stats_spec is not None else StatsSpec()
    prepared = _normalize_batches(model, batches)
    modules = linear_like_modules(model, "", include, exclude)
    if not modules:
        raise ValueError(f"no linear layer matches include={include!r} exclude={exclude!r}")
    extra = _no_cache_kwargs(model)
    in_device = _input_device(model)
    hooks = _StatsHooks(modules, spec)
    try:
        with _TrainingState(model), torch.no_grad():
            for i, (args, kwargs) in enumerate(prepared):
                try:
                    model(*_to(args, in_device), **{**_to(kwargs, in_device), **extra})
                except Exception as e:
                    raise ValueError(f"calibration batch {i} could not be run through the model "
                                     f"({type(e).__name__}: {e}); expected {_EXPECTED}") from e
                hooks.new_pass()
    finally:
        hooks.remove()
    return hooks.stats


def spec_for_dtype(spec: StatsSpec, dtype: Optional[torch.dtype]) -> StatsSpec:
    """``spec`` for calibration forwards run in ``dtype``: with bf16/fp16 activations the ``x^T x``
    products are computed in that dtype too (~4x faster); their rounding (2**-9) then dominates any
    accumulation error, so float32 sums are as good as float64 ones and 3x cheaper (measured on
    SmolLM2: 0.8 s instead of 2.3 s per block at 128 x 512 tokens)."""
    if dtype in (torch.bfloat16, torch.float16) and spec.hessian:
        return dataclasses.replace(spec, product_dtype=dtype, dtype=torch.float32)
    return spec


def float_layer_stats(
    model: nn.Module,
    batches: Iterable[Batch],
    stats_spec: StatsSpec,
    names: Sequence[str],
    on_stats: Callable[[str, Optional[LayerStats]], None],
    *,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> None:
    """Statistics of the **float** model's inputs to each linear in ``names``, one layer at a time:
    ``on_stats(name, stats)`` is called once per name (``stats`` is ``None`` for a layer that saw no
    input). Layers of the repeated blocks are served block by block (only one block's statistics live
    at a time), the others (``lm_head``, a model without blocks) by one plain forward afterwards. For
    measurements on the unmodified model (rank planning, sensitivity), never for compression."""
    done: set = set()
    wanted = set(names)

    def serve(stats: Dict[str, LayerStats]) -> None:
        for name, layer_stats in stats.items():
            if name in wanted and name not in done:
                done.add(name)
                on_stats(name, layer_stats)

    try:
        find_blocks(model)
        has_blocks = True
    except ValueError:
        has_blocks = False
    if has_blocks:
        run_blocks(model, batches, lambda index, block, stats: serve(stats), stats_spec=stats_spec,
                   include=sorted(wanted), dtype=dtype, propagate="float", progress=progress)
    rest = [name for name in names if name not in done]
    if rest:
        stats = collect_stats(model, batches, stats_spec, include=rest)
        for name in rest:
            done.add(name)
            on_stats(name, stats.get(name))
