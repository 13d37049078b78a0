"""Evaluation helpers: perplexity, decode/prefill throughput, memory and timing, as plain dicts.

Protocols are fixed and recorded in every result so numbers from different runs compare:

* **Perplexity**: the token stream (optionally cut to ``max_tokens``) is split into windows of
  ``window`` tokens starting every ``stride`` tokens. Each window is run with a fresh context (no
  cache across windows) and scores only tokens not scored before that have at least one token of
  context inside the window. With ``stride == window`` (the default, non-overlapping windows) that
  is every token but the first of each window; with ``stride < window`` each token after the first
  window is scored once with at least ``window - stride`` tokens of context.
  ppl = exp(mean negative log-likelihood over scored tokens), accumulated in float64.
* **Decode throughput**: greedy decoding with a KV cache, ``batch_size`` identical prompts of
  ``prompt_tokens`` tokens, ``new_tokens`` generated; time from the first decode step to the last
  (prefill excluded), ``warmup`` untimed runs, median of ``repeats`` timed runs.
* **Prefill throughput**: one forward over ``batch_size x prompt_tokens`` tokens, median of
  ``repeats`` after ``warmup``.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import statistics
import time
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional, Sequence

import torch
import torch.nn as nn

__all__ = [
    "perplexity",
    "decode_throughput",
    "prefill_throughput",
    "PeakMemory",
    "timed",
    "weight_bytes",
]


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _logits(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, a tuple whose first item is logits, or ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def perplexity(
    model: nn.Module,
    token_ids: "torch.Tensor | Sequence[int]",
    *,
    window: int = 1024,
    stride: Optional[int] = None,
    max_tokens: Optional[int] = None,
    progress: bool = True,
    context: Callable[[], ContextManager] = torch.inference_mode,
) -> Dict[str, Any]:
    """Perplexity of a causal LM on one token stream (protocol in the module docstring).

    ``model(input_ids)`` must return logits ``[1, T, vocab]`` (a Hugging Face CausalLM output, a
    tuple, or a tensor). Returns ``{"ppl", "nll", "tokens_scored", "window", "stride", ...}``.
    ``context`` is the grad mode to run under (``torch.no_grad`` for models that cannot run in
    inference mode).
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {ids.numel()}")
    stride = window if stride is None else stride
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    device = _model_device(model)
    total_nll = 0.0
    scored = 0
    starts = list(range(0, ids.numel() - 1, stride))
    previous_end = 0  # tokens [0, previous_end) already scored (position 0 is never scored)
    was_training = model.training
    model.eval()
    start_time = time.perf_counter()
    try:
        with context():
            for start in _progress(starts, len(starts), "perplexity", progress):
                end = min(start + window, ids.numel())
                chunk = ids[start:end].unsqueeze(0).to(device)
                logits = _logits(model(chunk))
                if logits.dtype != torch.float64:
                    logits = logits.float()  # log-softmax in at least float32
                # Position j of the window predicts token start + j + 1.
                first_new = max(previous_end, start + 1)
                targets = ids[first_new:end].to(device)
                preds = logits[0, first_new - start - 1: end - start - 1]
                nll = torch.nn.functional.cross_entropy(preds, targets, reduction="sum")
                total_nll += float(nll.double())
                scored += targets.numel()
                previous_end = end
                if end == ids.numel():
                    break
    finally:
        model.train(was_training)
    mean_nll = total_nll / scored
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens_scored": scored,
        "tokens_total": int(ids.numel()),
        "window": window,
        "stride": stride,
        "seconds": time.perf_counter() - start_time,
    }


def _cache_argument(model: nn.Module) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, cache_arg: str) -> float:
    """Prefill then ``new_tokens`` greedy steps with the model's KV cache; returns decode seconds."""
    output = model(input_ids=prompt, use_cache=True)
    next_token = _logits(output)[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        output = model(input_ids=next_token, use_cache=True, **{cache_arg: getattr(output, cache_arg)})
        next_token = _logits(output)[:, -1:].argmax(-1)
    return time.perf_counter() - start


def _random_prompt(model: nn.Module, vocab_size: Optional[int], tokens: int, seed: int) -> torch.Tensor:
    """A seeded random prompt ``[1, tokens]`` on the model's device."""
    vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None) or 1000
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, tokens), generator=gen).to(_model_device(model))


def _repeat_timed(model: nn.Module, run: Callable[[], float], warmup: int, repeats: int,
                  context: Callable[[], ContextManager]) -> list:
    """``warmup`` untimed then ``repeats`` timed calls of ``run`` (which returns its own seconds), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with context():
            for _ in range(warmup):
                run()
            return [run() for _ in range(repeats)]
    finally:
        model.train(was_training)


def decode_throughput(
    model: nn.Module,
    *,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    vocab_size: Optional[int] = None,
    seed: int = 0,
    context: Callable[[], ContextManager] = torch.inference_mode,
) -> Dict[str, Any]:
    """Tokens per second of greedy decoding with a KV cache (Hugging Face-style model API).

    The model must accept ``input_ids``, ``use_cache`` and a cache argument (``cache`` in
    transformers >= 5, ``past_key_values`` before) and return ``.logits`` and that cache.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (the first token comes from the prefill)")
    prompt = _random_prompt(model, vocab_size, prompt_tokens, seed).repeat(batch_size, 1)
    cache_arg = _cache_argument(model)
    times = _repeat_timed(model, lambda: _greedy_decode(model, prompt, new_tokens, cache_arg),
                          warmup, repeats, context)
    median = statistics.median(times)
    steps = new_tokens - 1
    return {
        "tokens_per_s": batch_size * steps / median,
        "ms_per_step": 1000 * median / steps,
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "times_s": times,
    }


def prefill_throughput(
    model: nn.Module,
    *,
    prompt_tokens: int = 256,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    vocab_size: Optional[int] = None,
    seed: int = 0,
    context: Callable[[], ContextManager] = torch.inference_mode,
) -> Dict[str, Any]:
    """Tokens per second of one forward pass over ``batch_size x prompt_tokens`` tokens."""
    ids = _random_prompt(model, vocab_size, prompt_tokens, seed).repeat(batch_size, 1)

    def forward() -> float:
        start = time.perf_counter()
        model(ids)
        return time.perf_counter() - start

    median = statistics.median(_repeat_timed(model, forward, warmup, repeats, context))
    return {"tokens_per_s": batch_size * prompt_tokens / median, "ms": 1000 * median,
            "batch_size": batch_size, "prompt_tokens": prompt_tokens, "repeats": repeats}


def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process during a ``with`` block (Linux ``VmHWM``).

    On entry, freed heap memory is handed back to the OS (``gc`` + glibc ``malloc_trim``), then the
    high-water mark is reset (``/proc/self/clear_refs``) where the kernel allows it;
    ``reset`` in the result says whether it was. Also reports CUDA peak allocation when CUDA is used.
    """

    def __enter__(self) -> "PeakMemory":
        # Start from what is really live: memory freed before the block (a float model replaced by a
        # quantized one, a cast) otherwise stays in the heap and in the RSS the peak is measured from.
        from .calibration.runner import _release_freed_memory

        gc.collect()
        _release_freed_memory()
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            pass
        self.start_rss_kib = _read_status_kib("VmRSS")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_rss_kib = _read_status_kib("VmHWM")
        self.end_rss_kib = _read_status_kib("VmRSS")
        self.cuda_peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    def to_dict(self) -> Dict[str, Any]:
        mib = lambda kib: None if kib is None else kib / 1024  # noqa: E731
        return {"peak_rss_mib": mib(self.peak_rss_kib), "start_rss_mib": mib(self.start_rss_kib),
                "end_rss_mib": mib(self.end_rss_kib), "peak_reset": self.reset,
                "cuda_peak_mib": None if self.cuda_peak_bytes is None else self.cuda_peak_bytes / 2**20}


@contextlib.contextmanager
def timed() -> Iterator[Dict[str, float]]:
    """``with timed() as t: ...`` then ``t["seconds"]``: wall time of the block (e.g. applying a method)."""
    result: Dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start


def weight_bytes(model: nn.Module, exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """Stored and in-memory bytes of the model, and stored bits per weight of its Linear layers.

    ``exclude``: last components of layer names left out of the bits-per-weight average
    (e.g. ``("lm_head",)`` when that layer is deliberately kept dense).
    """
    from .analysis import memory_report

    report = memory_report(model)
    layers = [layer for layer in report.layers if layer.name.split(".")[-1] not in exclude]
    linear_weights = sum(layer.num_weights for layer in layers)
    linear_bits = sum(layer.bits_per_weight * layer.num_weights for layer in layers)
    return {
        "stored_bytes": report.stored_bytes,
        "runtime_bytes": report.runtime_bytes,
        "linear_bits_per_weight": linear_bits / linear_weights if linear_weights else float("nan"),
        "layers": [vars(layer) for layer in report.layers],
    }
