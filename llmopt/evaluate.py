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

from .calibration.runner import _release_freed_memory
from .core.measure import memory_report

__all__ = [
    "sync_device",
    "perplexity",
    "decode_throughput",
    "prefill_throughput",
    "PeakMemory",
    "timed",
    "weight_bytes",
    "DecodeRunner",
    "compiled_decode_throughput",
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


def sync_device(device: "torch.device | str | None" = None) -> None:
    """Wait for the queued work of a CUDA ``device`` before a clock is read (no-op elsewhere).

    CUDA kernels run asynchronously: without this a timer stops when the work is queued, not done.
    ``None``: the current CUDA device, if CUDA has been used in this process.
    """
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    sync_device(device)
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
    sync_device(device)
    seconds = time.perf_counter() - start_time
    mean_nll = total_nll / scored
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens_scored": scored,
        "tokens_total": int(ids.numel()),
        "window": window,
        "stride": stride,
        "seconds": seconds,
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
    sync_device(prompt.device)  # the prefill is not timed: let it finish first
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        output = model(input_ids=next_token, use_cache=True, **{cache_arg: getattr(output, cache_arg)})
        next_token = _logits(output)[:, -1:].argmax(-1)
    sync_device(prompt.device)
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
        sync_device(ids.device)
        start = time.perf_counter()
        model(ids)
        sync_device(ids.device)
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
    sync_device()  # CUDA work queued before the block is not the block's
    start = time.perf_counter()
    try:
        yield result
    finally:
        sync_device()
        result["seconds"] = time.perf_counter() - start


def weight_bytes(model: nn.Module, exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """Stored and in-memory bytes of the model, and stored bits per weight of its Linear layers.

    ``exclude``: last components of layer names left out of the bits-per-weight average
    (e.g. ``("lm_head",)`` when that layer is deliberately kept dense).
    """
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


# ----------------------------------------------------------------------------------------------------------------
# Compiled decoding: a static KV cache, one compiled decode step


class DecodeRunner:
    """Greedy decoding of a Hugging Face causal LM (batch 1 by default), eager or with a
    ``torch.compile``d decode step.

    ``cache="static"`` uses a ``transformers.StaticCache`` sized ``prompt_tokens + new_tokens``: every
    decode step sees the same shapes (the write position is a tensor inside the cache), so the step
    compiles once (``dynamic=False``) and never recompiles per token. The prefill always runs eagerly
    (its shape differs from a step's). ``cache="dynamic"`` (eager only) is the ordinary growing cache,
    the protocol of :func:`decode_throughput`.

    :meth:`warm_up` runs one untimed generation (which compiles) and returns its first step's seconds;
    :meth:`run` times one generation: ``new_tokens - 1`` decode steps after the prefill (the first new
    token comes from the prefill). Runners for different variants of one model can be interleaved
    (eager, compiled, eager, ...) so that a change in machine load hits all of them alike.

    Args:
        model: a causal LM taking ``input_ids``, ``use_cache`` and a cache argument (``cache`` in
            transformers >= 5, ``past_key_values`` before) and returning ``.logits``; it needs a
            ``config`` for the static cache.
        compile: compile the decode step (``torch.compile(step, fullgraph=fullgraph, dynamic=False)``).
        mode, options: passed to ``torch.compile`` (``options`` are inductor settings, e.g.
            ``{"cpp_wrapper": True}``); give at most one of them. A ``mode`` together with
            ``skip_module_guards`` is passed as the options that mode stands for (``torch.compile`` takes
            a mode or options, not both). With CUDA graphs (``mode="reduce-overhead"``) each step's token
            is copied out of the graph's memory before the next replay.
        batch: sequences decoded together (the same random prompt repeated); ``tokens`` in the results
            are the first sequence's, ``tokens_per_s`` counts every sequence.
        skip_module_guards: skip dynamo's guards on module attributes (``guard_filter_fn`` =
            ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``): checking them costs ~1-2 ms per step
            on a 22-layer model; only safe while the model's modules are not changed after compiling.
        context: grad mode every run executes under (the compiled step is built and called in it).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prompt_tokens: int = 32,
        new_tokens: int = 64,
        compile: bool = True,
        cache: str = "static",
        fullgraph: bool = True,
        mode: Optional[str] = None,
        options: Optional[Dict[str, Any]] = None,
        skip_module_guards: bool = False,
        vocab_size: Optional[int] = None,
        seed: int = 0,
        context: Callable[[], ContextManager] = torch.inference_mode,
        batch: int = 1,
    ) -> None:
        if new_tokens < 2:
            raise ValueError("new_tokens must be >= 2 (the first token comes from the prefill)")
        if cache not in ("static", "dynamic"):
            raise ValueError(f"cache must be 'static' or 'dynamic', got {cache!r}")
        if compile and cache != "static":
            raise ValueError("a compiled decode step needs cache='static' (a growing cache changes shapes "
                             "every token and would recompile)")
        if mode is not None and options is not None:
            raise ValueError("give torch.compile a mode or options, not both")
        self.model = model
        self.prompt_tokens, self.new_tokens = int(prompt_tokens), int(new_tokens)
        self.compiled, self.cache_kind, self.context = bool(compile), cache, context
        self.cache_arg = _cache_argument(model)
        try:
            accepts_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            accepts_keep = False
        # Only the last position's logits are needed: skips the vocabulary projection of the prompt.
        self._keep = {"logits_to_keep": 1} if accepts_keep else {}
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        self.batch = batch
        self.prompt = _random_prompt(model, vocab_size, prompt_tokens, seed).repeat(batch, 1)
        self._cache = None
        self._dynamic = None
        if cache == "static":
            config = getattr(model, "config", None)
            if config is None:
                raise TypeError("a static cache needs a Hugging Face model with a .config")
            from transformers import StaticCache

            self._cache = StaticCache(config=config, max_cache_len=self.prompt_tokens + self.new_tokens)
        self.step: Callable[[torch.Tensor], torch.Tensor] = self._eager_step
        if self.compiled:
            kwargs: Dict[str, Any] = {"fullgraph": fullgraph, "dynamic": False}
            opts = dict(options or {})
            if skip_module_guards:
                opts["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            if mode is not None and opts:
                # torch.compile refuses a mode plus options: pass the options the mode stands for.
                from torch._inductor import list_mode_options

                opts = {**list_mode_options(mode), **opts}
            elif mode is not None:
                kwargs["mode"] = mode
            if opts:
                kwargs["options"] = opts
            self.step = torch.compile(self._eager_step, **kwargs)
        self.compile_s: Optional[float] = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """One model call on the runner's cache (static, or the growing one of the previous call);
        returns the greedy next token."""
        cache = self._cache if self._cache is not None else self._dynamic
        extra = {self.cache_arg: cache} if cache is not None else {}
        output = self.model(input_ids=ids, use_cache=True, **extra, **self._keep)
        if self._cache is None:
            self._dynamic = getattr(output, self.cache_arg)
        return _logits(output)[:, -1:].argmax(-1)

    def _eager_step(self, token: torch.Tensor) -> torch.Tensor:
        return self._forward(token)

    def prefill(self) -> torch.Tensor:
        """Reset the cache and run the prompt (always eagerly: its shape differs from a step's); returns
        the first new token ``[batch, 1]``, what :attr:`step` takes. Call it under :attr:`context`."""
        if self._cache is not None:
            self._cache.reset()
        self._dynamic = None
        return self._forward(self.prompt)

    def _generate(self) -> "tuple[list, list]":
        """Prefill then the decode steps; returns (per-step seconds, generated token ids)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.context():
                token = self.prefill()
                tokens, times = [int(token[0, 0])], []
                for _ in range(self.new_tokens - 1):
                    sync_device(token.device)
                    start = time.perf_counter()
                    if self.compiled:
                        # Under CUDA graphs a step's output lives in the graph's memory, which the next
                        # replay overwrites: copy it, and mark the step boundary (no-ops otherwise).
                        token = token.clone()
                        torch.compiler.cudagraph_mark_step_begin()
                    token = self.step(token)
                    sync_device(token.device)
                    tokens.append(int(token[0, 0]))  # reads the token: the step has really finished
                    times.append(time.perf_counter() - start)
        finally:
            self.model.train(was_training)
            self._dynamic = None
        return times, tokens

    def warm_up(self) -> float:
        """One untimed generation; returns the seconds of its first decode step (the compile, if any)."""
        times, _ = self._generate()
        if self.compiled and self.compile_s is None:
            self.compile_s = times[0]
        return times[0]

    def run(self) -> Dict[str, Any]:
        """One timed generation: ``{"seconds", "tokens_per_s", "ms_per_step", "tokens"}``."""
        times, tokens = self._generate()
        seconds = sum(times)
        return {"seconds": seconds, "tokens_per_s": self.batch * len(times) / seconds,
                "ms_per_step": 1000 * seconds / len(times), "tokens": tokens}


def compiled_decode_throughput(
    model: nn.Module,
    new_tokens: int = 64,
    *,
    prompt_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    compile: bool = True,
    fullgraph: bool = True,
    mode: Optional[str] = None,
    options: Optional[Dict[str, Any]] = None,
    skip_module_guards: bool = False,
    vocab_size: Optional[int] = None,
    seed: int = 0,
    context: Callable[[], ContextManager] = torch.inference_mode,
) -> Dict[str, Any]:
    """Tokens per second of batch-1 greedy decoding with a static KV cache and a compiled decode step.

    Same protocol as :func:`decode_throughput` (prefill excluded, median of ``repeats`` timed runs after
    ``warmup`` untimed ones) but on a ``StaticCache``, with the decode step compiled once by
    ``torch.compile(..., fullgraph=True, dynamic=False)`` (``compile=False``: the same protocol eagerly).
    Warm-up runs, and with them the compile, are not timed; ``compile_s`` is the first warm-up step
    (compile plus one step), ``recompiles`` counts graphs compiled during the timed runs (0 expected).
    See :class:`DecodeRunner` for the arguments.
    """
    runner = DecodeRunner(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, compile=compile,
                          fullgraph=fullgraph, mode=mode, options=options, skip_module_guards=skip_module_guards,
                          vocab_size=vocab_size, seed=seed, context=context)
    for _ in range(max(warmup, 1 if compile else 0)):
        runner.warm_up()
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    runs = [runner.run() for _ in range(repeats)]
    median = statistics.median(run["seconds"] for run in runs)
    steps = new_tokens - 1
    return {
        "tokens_per_s": steps / median,
        "ms_per_step": 1000 * median / steps,
        "compiled": bool(compile),
        "compile_s": runner.compile_s,
        "recompiles": counters["stats"]["unique_graphs"] - graphs_before,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "times_s": [run["seconds"] for run in runs],
        "tokens": runs[-1]["tokens"] if runs else None,
    }
