"""Whether a kernel is fast enough for ``kernel="auto"`` on this machine: capabilities, then a probe.

A kernel that computes exactly can still be slow on a given CPU: oneDNN's int8 GEMM is several times
faster than bf16 dense on an Intel Xeon with AMX, and 100-2000x *slower* than it on an AMD EPYC with
AVX-512 VNNI (issue 13). So ``"auto"`` (and only ``"auto"``: a kernel named explicitly is always
used) takes a kernel only when

1. the CPU has the flags the kernel declares it needs (:attr:`Kernel.cpu_flags`, e.g. ``amx_int8``
   for ``int8_onednn_cpu``), and
2. a one-time micro-probe finds it not slower than the dense path on this CPU, at the spec's shape
   class, at batch sizes 1 and 32 (:data:`PROBE_BATCHES`):
   ``t_kernel <= TOLERANCE * t_dense``, where ``t_dense`` is ``F.linear`` with a dense weight in the
   faster of float32 and bfloat16. A kernel slower than that is still kept when the reference kernel
   (``"auto"``'s fallback: dequantize, then the same dense matmul) is slower still, because then the
   fallback could only make the layer slower: ``t_kernel <= max(TOLERANCE * t_dense, t_reference)``.

The probe runs on synthetic tensors built through the kernel's own ``to_runtime`` from random
canonical tensors, at the shape class of the spec (out/in features rounded up to a power of two and
clamped to [:data:`PROBE_MIN_DIM`, :data:`PROBE_MAX_DIM`], so it is cheap and a model's layers share
a few classes), on one thread (see :func:`decide`). Each figure is the minimum of a few warm calls.
It is bounded: about :data:`PROBE_BUDGET_S` seconds per kernel and class (setup included; a call in
flight when the budget runs out is finished, never interrupted), a warm call over
:data:`ABORT_FACTOR` times the bound (a cold first call: also over :data:`FIRST_CALL_GRACE_S`) ends
the probe with "slow" at once, and the first batch size that fails ends it. Decisions are cached per
process in a plain dict keyed by kernel, device type and shape class (read as a constant by
``torch.compile``; a probe never runs while compiling).

``LLMOPT_KERNEL_PROBE=0`` (or ``off``/``false``/``no``) skips the probe: the decision then rests on
the CPU flags alone. :func:`kernel_decisions` shows every decision with its timings and reason;
tests inject timings with :func:`set_probe_timer`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.cpu import CPUInfo, cpu_info
from ..core.packing import packed_row_bytes
from .base import Kernel, KernelSpec, is_cpu

__all__ = ["KernelDecision", "kernel_decisions", "clear_kernel_decisions", "set_probe_timer",
           "probe_enabled", "decide", "cached_decision", "probe_spec", "cpu_flags_reason", "TOLERANCE", "PROBE_BATCHES",
           "PROBE_BUDGET_S", "PROBE_MIN_DIM", "PROBE_MAX_DIM", "ABORT_FACTOR", "FIRST_CALL_GRACE_S"]

# A kernel within 10% of dense counts as "not slower": medians of 5 calls on a shared machine vary by
# about that much, and at parity the kernel still keeps its 2-4x smaller weight in memory.
TOLERANCE = 1.1
# Decode (one token) and a small prefill chunk: the two regimes a CPU layer serves.
PROBE_BATCHES: Tuple[int, ...] = (1, 32)
# Shape class bounds: below 256 every path is call overhead; above 2048 the probe would cost more
# without changing the verdict (a 2048x2048 bf16 weight, 8 MiB, already exceeds the L2 cache).
PROBE_MIN_DIM = 256
PROBE_MAX_DIM = 2048
# Time one kernel may spend being probed for one shape class (setup included).
PROBE_BUDGET_S = 0.3
# Warm kernel calls per batch size (after one cold call); dense and reference get 2 after a warm-up.
PROBE_REPS = 3
# A warm kernel call this many times over the bound ends the probe at once: it is slow.
ABORT_FACTOR = 3.0
# A first (cold) call may include one-time set-up (oneDNN primitive creation, lazy init: measured
# 6-20 ms on a busy 2-core machine); it only aborts the probe when it is also longer than this.
FIRST_CALL_GRACE_S = 0.1

_ENV = "LLMOPT_KERNEL_PROBE"

# One call of `what` ("kernel", "dense" or "reference") at batch m for this kernel and probe spec,
# in seconds. Injected by tests (set_probe_timer); None: time the real call.
ProbeTimer = Callable[[Kernel, KernelSpec, int, str], float]
_TIMER: Optional[ProbeTimer] = None


@dataclass(frozen=True)
class KernelDecision:
    """Why ``"auto"`` may (``fast``) or may not use ``kernel`` for a shape class on a device.

    ``timings`` maps each probed batch size to ``{"kernel": s, "dense": s, "reference": s}``
    (median seconds; ``reference`` only when it was needed). ``source``: ``"probe"``, ``"injected"``
    (a test timer), ``"cpu_flags"`` (refused by the capability gate) or ``"no_probe"`` (probing off,
    or a device/moment where it cannot run).
    """

    kernel: str
    device: str
    shape: str
    fast: bool
    reason: str
    source: str
    cpu: str
    timings: Dict[int, Dict[str, float]] = dataclasses.field(default_factory=dict)
    probe_s: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_DECISIONS: Dict[tuple, KernelDecision] = {}


def kernel_decisions() -> List[KernelDecision]:
    """Every speed decision ``"auto"`` made in this process (probe results, gates), oldest first."""
    return list(_DECISIONS.values())


def clear_kernel_decisions() -> None:
    """Forget the cached decisions (the next ``"auto"`` choice probes again)."""
    _DECISIONS.clear()


def set_probe_timer(timer: Optional[ProbeTimer]) -> Optional[ProbeTimer]:
    """Replace the probe's clock (tests): ``timer(kernel, probe_spec, m, what) -> seconds`` is called
    instead of running one call of ``what`` (``"kernel"``, ``"dense"``, ``"reference"``) at batch
    ``m``. ``None`` restores real timing. Clears the cache; returns the previous timer."""
    global _TIMER
    previous, _TIMER = _TIMER, timer
    clear_kernel_decisions()
    return previous


def probe_enabled() -> bool:
    """False when ``LLMOPT_KERNEL_PROBE`` is ``0``/``off``/``false``/``no`` (read at every decision)."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cpu_flags_reason(kernel: Kernel, cpu: CPUInfo) -> Optional[str]:
    """Why ``kernel`` is not fast on ``cpu`` by its declared :attr:`Kernel.cpu_flags`, or None."""
    needed = tuple(kernel.cpu_flags)
    if not needed or any(cpu.has(flag) for flag in needed):
        return None
    return (f"needs a CPU with {' or '.join(needed)} to be fast, and this {cpu.model} "
            f"({cpu.capability}) has none")


def _bucket(n: int) -> int:
    return min(PROBE_MAX_DIM, max(PROBE_MIN_DIM, 1 << (max(n, 1) - 1).bit_length()))


def probe_spec(spec: KernelSpec) -> KernelSpec:
    """The shape class of ``spec``: the same spec at bucketed sizes, without bias."""
    k, n = _bucket(spec.in_features), _bucket(spec.out_features)
    if spec.group_size == spec.in_features:
        group = k  # one scale per row stays one scale per row
    else:
        group = min(spec.group_size, k)
    return dataclasses.replace(spec, in_features=k, out_features=n, group_size=group, has_bias=False)


class _Bench:
    """Synthetic tensors for one (kernel, probe spec, device), built lazily, and one-call timing."""

    def __init__(self, kernel: Kernel, reference: Kernel, spec: KernelSpec, device: torch.device):
        self.kernel, self.reference, self.spec, self.device = kernel, reference, spec, device
        self._built = False

    def _build(self) -> None:
        spec, device = self.spec, self.device
        gen = torch.Generator().manual_seed(0)
        n, g = spec.out_features, spec.num_groups
        canonical = {
            "qdata": torch.randint(0, 256, (n, packed_row_bytes(spec.in_features, spec.format.bits)),
                                   dtype=torch.uint8, generator=gen).to(device),
            "scale": (torch.rand(n, g, generator=gen) * 0.01 + 1e-3).to(spec.scale_dtype).to(device),
        }
        if spec.has_zero_point:
            canonical["zero_point"] = torch.zeros(n, g, dtype=spec.scale_dtype, device=device)
        self.runtime = self.kernel.to_runtime(spec, dict(canonical))
        try:
            self.ref_runtime = self.reference.to_runtime(spec, dict(canonical))
        except Exception as error:  # not the probed kernel's fault
            raise _ProbeError(f"the reference layout failed: {type(error).__name__}: {error}") from error
        w = (torch.rand(n, spec.in_features, generator=gen) - 0.5).to(device)
        self.weights = {torch.float32: w, torch.bfloat16: w.to(torch.bfloat16)}
        self.inputs: Dict[Tuple[int, torch.dtype], Tensor] = {}
        self._built = True

    def _x(self, m: int, dtype: torch.dtype) -> Tensor:
        key = (m, dtype)
        if key not in self.inputs:
            gen = torch.Generator().manual_seed(m)
            self.inputs[key] = torch.randn(m, self.spec.in_features, generator=gen).to(dtype).to(self.device)
        return self.inputs[key]

    def once(self, what: str, m: int, dtype: torch.dtype = torch.float32) -> float:
        if _TIMER is not None:
            if what == "kernel":
                return float(_TIMER(self.kernel, self.spec, m, what))
            try:
                return float(_TIMER(self.kernel, self.spec, m, what))
            except Exception as error:
                raise _ProbeError(f"timing {what} failed: {type(error).__name__}: {error}") from error
        if not self._built:
            self._build()
        x = self._x(m, dtype)
        with torch.inference_mode():
            start = time.perf_counter()
            if what == "kernel":
                self.kernel.forward(self.spec, self.runtime, x, None)
                return time.perf_counter() - start
            try:
                if what == "reference":
                    self.reference.forward(self.spec, self.ref_runtime, x, None)
                else:
                    F.linear(x, self.weights[dtype])
            except Exception as error:  # a failing baseline says nothing about the probed kernel
                raise _ProbeError(f"timing {what} failed: {type(error).__name__}: {error}") from error
            return time.perf_counter() - start


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


class _OutOfTime(Exception):
    pass


class _ProbeError(Exception):
    """The probe could not time a baseline (dense or reference): no verdict on the kernel."""


def _measure(bench: _Bench, start: float, budget: float) -> Tuple[bool, str, Dict[int, Dict[str, float]]]:
    """Probe every batch size in order; stop at the first that fails. Returns (fast, reason, timings).

    Every figure is the *minimum* over a few warm calls: on a shared machine other processes can only
    make a call slower, so the minimum is the best estimate of what the code itself costs.
    Raises :class:`_OutOfTime` when the budget runs out before the first batch size is judged.
    """
    timings: Dict[int, Dict[str, float]] = {}
    reported: List[float] = []  # every call's time, for an injected timer's clock

    def spent() -> float:
        # An injected timer's clock is the sum of the times it reported; otherwise the wall clock.
        return sum(reported) if _TIMER is not None else time.perf_counter() - start

    def judged_so_far() -> Tuple[bool, str, Dict[int, Dict[str, float]]]:
        done = {m: row for m, row in timings.items() if "kernel" in row}
        if not done:
            raise _OutOfTime
        parts = []
        for m, row in done.items():
            part = f"batch {m}: {_ms(row['kernel'])} vs dense {_ms(row['dense'])}"
            if row["kernel"] > TOLERANCE * row["dense"]:
                part += f" (slower than dense, but the reference fallback takes {_ms(row['reference'])})"
            parts.append(part)
        if len(done) < len(PROBE_BATCHES):
            parts.append("the probe's time budget ran out before the other batch sizes")
        return True, "; ".join(parts), done

    for m in PROBE_BATCHES:
        row: Dict[str, float] = {}
        timings[m] = row

        def timed(what: str, dtype: torch.dtype) -> float:
            if spent() > budget:
                raise _OutOfTime
            seconds = bench.once(what, m, dtype)
            reported.append(seconds)
            return seconds

        def best(what: str, dtype: torch.dtype, calls: int = 2) -> float:
            timed(what, dtype)  # warm-up
            return min(timed(what, dtype) for _ in range(calls))

        try:
            # Dense: the faster of float32 and bfloat16.
            dense = {dtype: best("dense", dtype) for dtype in (torch.float32, torch.bfloat16)}
            dtype = min(dense, key=dense.__getitem__)
            row["dense"] = dense[dtype]
            bound = TOLERANCE * row["dense"]
            calls = [timed("kernel", dtype)]  # cold: may include one-time set-up
        except _OutOfTime:
            del timings[m]
            return judged_so_far()
        aborted = False
        try:
            while True:
                warm = calls[0] if len(calls) == 1 else min(calls[1:])
                if warm > bound and "reference" not in row:
                    row["reference"] = best("reference", dtype)
                    bound = max(bound, row["reference"])
                limit = FIRST_CALL_GRACE_S if len(calls) == 1 else ABORT_FACTOR * bound
                if warm > max(limit, ABORT_FACTOR * bound):
                    aborted = True
                    break
                if len(calls) > PROBE_REPS:
                    break
                calls.append(timed("kernel", dtype))
        except _OutOfTime:
            pass  # judge on the calls made so far
        row["kernel"] = calls[0] if len(calls) == 1 else min(calls[1:])
        if row["kernel"] > bound:
            what = f"at batch {m}: {_ms(row['kernel'])} vs dense {_ms(row['dense'])}"
            if "reference" in row:
                what += f", reference fallback {_ms(row['reference'])}"
            return False, f"slower than dense here {what}{' (stopped early)' if aborted else ''}", timings
    return judged_so_far()


def _key(kernel: Kernel, spec: KernelSpec, device: torch.device) -> tuple:
    return (kernel.name, torch.device(device).type, probe_spec(spec))


def cached_decision(kernel: Kernel, spec: KernelSpec, device: torch.device) -> Optional[KernelDecision]:
    """The decision already made for ``kernel``, ``spec``'s shape class and ``device``, or None."""
    return _DECISIONS.get(_key(kernel, spec, device))


def decide(kernel: Kernel, spec: KernelSpec, device: torch.device, reference: Kernel) -> KernelDecision:
    """The (cached) decision for ``kernel`` serving ``spec`` on ``device``; see the module docstring."""
    device = torch.device(device)
    cpu = cpu_info()
    pspec = probe_spec(spec)
    key = _key(kernel, spec, device)
    if key in _DECISIONS:
        return _DECISIONS[key]

    def record(fast: bool, reason: str, source: str, timings=None, probe_s: float = 0.0,
               cache: bool = True) -> KernelDecision:
        decision = KernelDecision(kernel=kernel.name, device=device.type, shape=pspec.describe(),
                                  fast=fast, reason=reason, source=source, cpu=cpu.model,
                                  timings=timings or {}, probe_s=probe_s)
        if cache:
            _DECISIONS[key] = decision
        return decision

    if is_cpu(device):
        reason = cpu_flags_reason(kernel, cpu)
        if reason is not None:
            return record(False, reason, "cpu_flags")
    if not is_cpu(device):
        # Only CPU kernels are probed (timing other devices needs synchronisation): trust the kernel.
        return record(True, f"not probed on {device.type}", "no_probe")
    if not probe_enabled():
        return record(True, f"probe disabled ({_ENV}=0): CPU flags only", "no_probe", cache=False)
    if torch.compiler.is_compiling():
        return record(True, "not probed while compiling: CPU flags only", "no_probe", cache=False)
    if kernel.unsupported_reason(pspec, device) is not None:
        return record(True, f"cannot probe its shape class {pspec.describe()}: CPU flags only", "no_probe")
    start = time.perf_counter()
    bench = _Bench(kernel, reference, pspec, device)
    threads = torch.get_num_threads()
    try:
        # One thread: with several, a call on a busy machine waits for whichever thread the OS has
        # descheduled (measured: every call a 4-8 ms scheduler slice on a shared 2-core box, which
        # drowns a 0.05 ms kernel). Kernel and dense are compared at the same thread count.
        torch.set_num_threads(1)
        fast, reason, timings = _measure(bench, start, PROBE_BUDGET_S)
    except _OutOfTime:
        return record(True, f"the probe ran out of its {PROBE_BUDGET_S} s before timing the kernel "
                      "(a busy machine?): CPU flags only", "no_probe", probe_s=time.perf_counter() - start)
    except _ProbeError as error:
        return record(True, f"the probe could not run its baseline ({error}): CPU flags only", "no_probe",
                      probe_s=time.perf_counter() - start, cache=False)
    except Exception as error:  # a kernel that fails on synthetic data would fail on real data too
        return record(False, f"failed on a probe of {pspec.describe()}: {type(error).__name__}: {error}",
                      "probe", probe_s=time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return record(fast, reason, "injected" if _TIMER is not None else "probe", timings,
                  time.perf_counter() - start)
