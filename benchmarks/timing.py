"""Shared timing and memory-bandwidth helpers for the ``llmopt`` benchmarks.

Everything here is plain PyTorch + the standard library so that any benchmark script can do::

    from timing import time_fn, measure_read_bandwidth, gbps

Methodology (used by every benchmark that imports this module):

* ``time_fn`` runs the callable under ``torch.inference_mode()`` with the garbage collector paused.
  It first warms up (at least ``warmup`` calls *and* at least ``warmup_s`` seconds, so lazy
  initialisation, allocator growth and oneDNN primitive caching are out of the way), estimates the
  cost of one call from the warm-up, then picks the number of timed calls so the timed phase lasts
  about ``target_s`` seconds, clamped to ``[min_repeats, max_repeats]``. Every call is timed on its
  own with ``time.perf_counter``; the result reports the median and the inter-quartile range
  (IQR = p75 - p25) in milliseconds. Median/IQR are robust to the occasional preemption of a
  shared machine, which a mean/stddev are not.
* ``measure_read_bandwidth`` streams a tensor much larger than the last-level cache through a
  reduction (``x.sum()``): this reads every byte once and writes nothing, so ``bytes / time`` is the
  sustained DRAM *read* bandwidth the machine actually gives to PyTorch with the current thread
  count. It is the roofline a weight-streaming (memory-bound) kernel can hope to reach.
* Shared machines: other processes competing for the same cores make a multi-threaded kernel wait
  at its barrier for a descheduled thread (on a 2-core box every call can then take a whole
  scheduler slice, e.g. 4-8 ms). ``time_fn`` therefore records ``foreign_cpus``: the CPUs kept busy
  by *other* processes during the timed phase (system busy time from ``/proc/stat`` minus this
  process's CPU time, divided by wall time; Linux only, ~0.05 CPU resolution over 0.3 s).
  ``time_fn_stable`` re-measures when that exceeds a threshold and keeps the fastest attempt, since
  contention can only slow a kernel down; the load is reported, never hidden.
* Caches: a small weight matrix fits in the last-level cache and would be timed from cache, not
  from DRAM, if the same tensor is reused call after call. ``rotation_count`` tells how many
  independent copies of an object to cycle through so the working set exceeds the cache;
  ``Rotator`` cycles through them.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from llmopt.evaluate import sync_device

__all__ = [
    "MiB",
    "TimingResult",
    "time_fn",
    "time_fn_stable",
    "RetryBudget",
    "foreign_cpu_load",
    "wait_for_quiet",
    "is_contended",
    "better",
    "percentile",
    "gbps",
    "measure_read_bandwidth",
    "weight_bytes_per_step",
    "measure_copy_bandwidth",
    "last_level_cache_bytes",
    "kernel_decisions_record",
    "rotation_count",
    "Rotator",
    "machine_info",
]

MiB = 1024 * 1024


# --------------------------------------------------------------------------------------- statistics
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of an already sorted, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac)


@dataclass
class TimingResult:
    """Per-call timing statistics, all in milliseconds."""

    median_ms: float
    iqr_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    warmup: int
    foreign_cpus: Optional[float] = None   # CPUs busy with other processes while timing (None: unknown)
    attempts: int = 1                      # measurements taken by time_fn_stable (best one kept)
    samples_ms: List[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples_s: Sequence[float], warmup: int,
                     foreign_cpus: Optional[float] = None) -> "TimingResult":
        ms = sorted(s * 1e3 for s in samples_s)
        p25, p75 = percentile(ms, 25), percentile(ms, 75)
        return cls(
            median_ms=percentile(ms, 50), iqr_ms=p75 - p25, p25_ms=p25, p75_ms=p75, min_ms=ms[0],
            mean_ms=sum(ms) / len(ms), repeats=len(ms), warmup=warmup, foreign_cpus=foreign_cpus,
            samples_ms=ms,
        )

    def to_dict(self, with_samples: bool = False) -> Dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            d.pop("samples_ms")
        return d


# --------------------------------------------------------------------------------------- contention
def _system_busy_s() -> Optional[float]:
    """Seconds of CPU time all processes have used since boot (``/proc/stat``), None if unknown."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        busy = sum(ticks) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _LoadProbe:
    """Measures the CPU time other processes use between ``start()`` and ``stop()``."""

    def start(self) -> "_LoadProbe":
        self.busy0 = _system_busy_s()
        self.own0 = time.process_time()
        self.wall0 = time.perf_counter()
        return self

    def stop(self) -> Optional[float]:
        busy1 = _system_busy_s()
        wall = time.perf_counter() - self.wall0
        if busy1 is None or self.busy0 is None or wall <= 0:
            return None
        foreign = (busy1 - self.busy0) - (time.process_time() - self.own0)
        return max(foreign, 0.0) / wall


def foreign_cpu_load(interval_s: float = 0.5) -> Optional[float]:
    """CPUs used by other processes over the next ``interval_s`` seconds (this one sleeps)."""
    probe = _LoadProbe().start()
    time.sleep(interval_s)
    return probe.stop()


def wait_for_quiet(max_wait_s: float, max_foreign_cpus: float = 0.3, interval_s: float = 0.25) -> float:
    """Sleep until other processes use at most ``max_foreign_cpus`` CPUs over one ``interval_s``
    (or ``max_wait_s`` has passed). Returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        load = foreign_cpu_load(interval_s)
        if load is None or load <= max_foreign_cpus:
            break
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------- timing
def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    warmup_s: float = 0.05,
    target_s: float = 0.5,
    min_repeats: int = 5,
    max_repeats: int = 500,
    max_warmup: int = 200,
) -> TimingResult:
    """Time ``fn()`` call by call; see the module docstring for the methodology.

    ``fn`` is called with no arguments; to rotate through several copies of a layer (cold caches),
    pass a :class:`Rotator` or any closure that advances on each call.
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    # CUDA work is asynchronous: once this process has used CUDA, every timed call is bracketed by a
    # device synchronisation so that the clock measures the work, not its launch (a no-op on CPU).
    def clock() -> float:
        sync_device()
        return time.perf_counter()

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            warm: List[float] = []
            start = clock()
            while len(warm) < max(warmup, 1) or (clock() - start < warmup_s and len(warm) < max_warmup):
                t0 = clock()
                fn()
                warm.append(clock() - t0)
            # The tail of the warm-up is the best estimate of the steady-state cost of one call.
            tail = sorted(warm[len(warm) // 2:])
            estimate = max(tail[len(tail) // 2], 1e-7)
            repeats = int(min(max(math.ceil(target_s / estimate), min_repeats), max_repeats))
            samples = [0.0] * repeats
            load = _LoadProbe().start()
            for i in range(repeats):
                t0 = clock()
                fn()
                samples[i] = clock() - t0
            foreign = load.stop()
    finally:
        if gc_was_enabled:
            gc.enable()
    return TimingResult.from_samples(samples, warmup=len(warm), foreign_cpus=foreign)


def is_contended(res: TimingResult, max_foreign_cpus: float = 0.3) -> bool:
    """Whether other processes used more than ``max_foreign_cpus`` CPUs while ``res`` was timed."""
    return res.foreign_cpus is not None and res.foreign_cpus > max_foreign_cpus


def better(a: Optional[TimingResult], b: TimingResult, max_foreign_cpus: float = 0.3) -> TimingResult:
    """The more trustworthy of two measurements of the same thing: an uncontended one beats a
    contended one; otherwise the lower median wins (interference only ever adds time)."""
    if a is None:
        return b
    ca, cb = is_contended(a, max_foreign_cpus), is_contended(b, max_foreign_cpus)
    if ca != cb:
        return a if cb else b
    return b if b.median_ms < a.median_ms else a


class RetryBudget:
    """Total seconds ``time_fn_stable`` may spend on re-measurements across a whole benchmark."""

    def __init__(self, seconds: float) -> None:
        self.left = float(seconds)
        self.retries = 0

    def spend(self, seconds: float) -> None:
        self.left -= seconds
        self.retries += 1


def time_fn_stable(
    fn: Callable[[], Any],
    *,
    max_foreign_cpus: float = 0.3,
    retries: int = 3,
    backoff_s: float = 1.0,
    budget: Optional[RetryBudget] = None,
    **kwargs: Any,
) -> TimingResult:
    """``time_fn`` that re-measures while other processes used more than ``max_foreign_cpus`` CPUs,
    at most ``retries`` times and while ``budget`` lasts. Before retry ``i`` (0-based) it waits up
    to ``backoff_s * 2**i`` seconds for the machine to become quiet (see :func:`wait_for_quiet`).

    Returns the best attempt by :func:`better` (``attempts`` says how many were taken); its
    ``foreign_cpus`` tells whether it was still contended.
    """
    best: Optional[TimingResult] = None
    attempts = 0
    while True:
        t0 = time.perf_counter()
        res = time_fn(fn, **kwargs)
        attempts += 1
        best = better(best, res, max_foreign_cpus)
        contended = is_contended(res, max_foreign_cpus)
        if not contended or attempts > retries or (budget is not None and budget.left <= 0):
            break
        wait_for_quiet(backoff_s * 2 ** (attempts - 1), max_foreign_cpus)
        if budget is not None:
            budget.spend(time.perf_counter() - t0)
    best.attempts = attempts
    return best


def gbps(num_bytes: float, ms: float) -> float:
    """Throughput in GB/s (10^9 bytes per second) for ``num_bytes`` moved in ``ms`` milliseconds."""
    return num_bytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


# --------------------------------------------------------------------------------------- bandwidth
def measure_read_bandwidth(size_mib: int = 1024, repeats: int = 9, warmup: int = 2,
                           retries: int = 3) -> Dict[str, Any]:
    """Sustained read bandwidth: median time of ``x.sum()`` over a ``size_mib`` float32 tensor.

    Re-measured (up to ``retries`` times, fastest kept) while other processes load the CPUs.
    Returns ``{"gbps", "iqr_gbps", "size_mib", "median_ms", "repeats", "foreign_cpus", "method"}``.
    """
    n = size_mib * MiB // 4
    # Distinct values on every page: first-touch page faults are not timed, and no page can be
    # deduplicated (KSM, hypervisor) into one cached physical page, as a constant fill could be.
    x = torch.arange(n, dtype=torch.float32)
    res = time_fn_stable(x.sum, retries=retries, warmup=warmup, warmup_s=0.0, target_s=0.0,
                         min_repeats=repeats, max_repeats=repeats)
    nbytes = x.numel() * x.element_size()
    out = {
        "method": "torch.sum over a float32 tensor (read only)",
        "size_mib": size_mib,
        "median_ms": res.median_ms,
        "repeats": res.repeats,
        "gbps": gbps(nbytes, res.median_ms),
        "iqr_gbps": gbps(nbytes, res.p25_ms) - gbps(nbytes, res.p75_ms),
        "foreign_cpus": res.foreign_cpus,
        "attempts": res.attempts,
    }
    return out


def measure_copy_bandwidth(size_mib: int = 512, repeats: int = 9, warmup: int = 2,
                           retries: int = 3) -> Dict[str, Any]:
    """``dst.copy_(src)`` of ``size_mib`` MiB; reported GB/s counts read + write bytes (2 x size)."""
    n = size_mib * MiB // 4
    src = torch.arange(n, dtype=torch.float32)
    dst = torch.zeros_like(src)
    res = time_fn_stable(lambda: dst.copy_(src), retries=retries, warmup=warmup, warmup_s=0.0,
                         target_s=0.0, min_repeats=repeats, max_repeats=repeats)
    nbytes = 2 * src.numel() * src.element_size()
    out = {
        "method": "Tensor.copy_ of float32 (read + write bytes counted)",
        "size_mib": size_mib,
        "median_ms": res.median_ms,
        "repeats": res.repeats,
        "gbps": gbps(nbytes, res.median_ms),
        "foreign_cpus": res.foreign_cpus,
    }
    return out


# --------------------------------------------------------------------------------------- caches
def last_level_cache_bytes(default: int = 32 * MiB) -> int:
    """Size of the largest CPU cache as reported by Linux sysfs (``default`` when unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            mult = 1
            if text.endswith("K"):
                mult, text = 1024, text[:-1]
            elif text.endswith("M"):
                mult, text = MiB, text[:-1]
            if text.isdigit():
                best = max(best, int(text) * mult)
    except OSError:
        pass
    return best or default


def rotation_count(bytes_per_copy: int, working_set_bytes: int, max_copies: int = 1024) -> int:
    """How many copies of a ``bytes_per_copy`` object to cycle through to touch ``working_set_bytes``."""
    if working_set_bytes <= 0 or bytes_per_copy <= 0:
        return 1
    return int(min(max(math.ceil(working_set_bytes / bytes_per_copy), 1), max_copies))


class Rotator:
    """Callable that applies ``fn`` to the next item of ``items`` on every call (round robin)."""

    def __init__(self, items: Sequence[Any], fn: Callable[[Any], Any]) -> None:
        if not items:
            raise ValueError("Rotator needs at least one item")
        self.items = list(items)
        self.fn = fn
        self.i = 0

    def __call__(self) -> Any:
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return self.fn(item)


# --------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    """The CPU model name (``llmopt.core.cpu.cpu_model``; this module stays importable without llmopt)."""
    try:
        from llmopt.core.cpu import cpu_model
        return cpu_model()
    except ImportError:  # pragma: no cover - llmopt not on the path
        return platform.processor() or "unknown"


def _cpu_line() -> str:
    try:
        from llmopt.core.cpu import cpu_info
        return cpu_info().describe()
    except ImportError:  # pragma: no cover
        return f"{_cpu_model()} ({platform.machine()})"


def kernel_decisions_record() -> List[Dict[str, Any]]:
    """What ``kernel="auto"`` decided in this process (``llmopt.kernels.kernel_decisions``), as dicts."""
    try:
        from llmopt.kernels import kernel_decisions
    except ImportError:  # pragma: no cover
        return []
    return [d.as_dict() for d in kernel_decisions()]


def machine_info() -> Dict[str, Any]:
    """Facts about the machine and PyTorch build that a benchmark record should carry."""
    return {
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu": _cpu_line(),
        "llc_bytes": last_level_cache_bytes(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step must read at least: every Linear / QuantLinear weight (in its runtime
    layout, scales included) once. Embedding (one row), norms and the small KV cache are left out."""
    from llmopt.nn import QuantLinear  # imported here: this module stays importable without llmopt

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.runtime_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def profile_decode(runner: Any, steps: int) -> "tuple[Any, float]":
    """``torch.profiler`` over ``steps`` decode steps of an ``llmopt.evaluate.DecodeRunner`` (after its
    prefill and one untimed step): ``(prof.key_averages(), wall ms per step)``."""
    from torch.profiler import ProfilerActivity, profile

    runner.model.eval()
    with runner.context():
        token = runner.step(runner.prefill())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                token = runner.step(token)
            int(token[0, 0])  # a host read: the steps have really finished
            wall = time.perf_counter() - start
    return prof.key_averages(), 1000 * wall / steps
