#!/usr/bin/env python
"""GPU benchmark (issue 16): llmopt's CUDA kernels, decode speed and GPTQ time on one GPU.

One prepared script for a machine with one NVIDIA GPU (sized for an H200: under 6 minutes), which
runs in this order and skips, with the reason, whatever would overrun the time budget (``--budget-s``,
330 s by default):

1. **Kernel table**, 4096x4096 first, then 14336x4096 and 4096x14336 (N x K), at M = 1, 16, 256:
   ``bf16 dense`` (``F.linear``); ``aten int4pack g64`` (``aten._weight_int4pack_mm`` called directly on
   a weight converted by ``aten._convert_weight_to_int4pack(..., inner_k_tiles=8)``: the anchor); the
   llmopt kernels by name: ``int4_tinygemm_cuda`` (int4 g64), ``lowbit_triton`` (int4/int3/int2 g64,
   int8 per channel, nf4 g64, fp4 g64, fp8 per channel) and ``reference`` (int4 g64, the baseline). A
   kernel that is not registered in this build, or whose ``unsupported_reason`` refuses the layer, is
   listed as SKIP with the reason. Time: each call goes to the next of several copies of the weight (so
   the weight set is >= 4x the L2 cache and every call reads its weight from HBM), the calls are captured
   in a CUDA graph, and the graph replay is timed with CUDA events (median of ``reps`` replays / calls):
   GPU time without Python launch overhead. The eager per-call time (a loop of plain calls between two
   events, launch overhead included) is reported next to it. GB/s counts weight + activation bytes
   (input and output); % HBM is against the read bandwidth measured here (``torch.sum`` over a 2 GiB
   tensor; the vendor's figure, 4.8 TB/s, is printed beside it). ``err`` is the relative error of the
   row's output against the ``reference`` kernel on the same codes (a sanity check, not a target).
2. **Decode tokens/s** of ``speed_model("1b")`` (TinyLlama-1.1B shapes, random weights) in bf16 on the
   GPU, batch 1 (then 8): bf16, RTN int4 g64, int8 per channel, nf4 g64 (``compress_``, ``kernel="auto"``,
   ``lm_head`` left bf16; the kernels each format got are printed), eager (growing cache) and compiled
   (``llmopt.evaluate.DecodeRunner``: ``torch.compile`` of the decode step on a ``StaticCache`` with
   inductor's CUDA graphs, ``options={"triton.cudagraphs": True}``), 16-token prompt, 32 new tokens,
   median of 3 timed runs after a warm-up (which compiles).
3. **GPTQ int4 g64** (act-order) wall time on the same model on the GPU, 128 x 512 random token ids.
4. **Targets** (PASS / MISS / SKIP), each a ratio of two numbers of this run: int4 g64 at M = 1 on
   4096x4096 >= 2.5x bf16 dense, >= 70 % of HBM bandwidth and at least as fast as the aten anchor (per
   llmopt int4 kernel); int3 and int2 faster than int4 (lowbit_triton); nf4 >= 2x bf16; 1.1B decode
   batch 1 int4 >= 1.8x bf16 (compiled when both were compiled, else eager); GPTQ <= 3 minutes.

Usage::

    python benchmarks/bench_gpu.py                       # everything the budget allows (~5.5 min on an H200)
    python benchmarks/bench_gpu.py --quick               # 4096x4096 only, batch 1 only, fewer repeats
    python benchmarks/bench_gpu.py --sections gptq       # a subset: any of kernels,decode,gptq
    python benchmarks/bench_gpu.py --smoke               # CPU check of the whole script on tiny shapes (< 60 s)

Writes ``benchmarks/results/gpu.jsonl`` and ``gpu.md`` (``--out``; ``--smoke`` writes nothing unless
``--out`` is given). Needs nothing beyond torch, triton (for the Triton kernels) and llmopt (plus
transformers for the decode and GPTQ sections, which are skipped without it).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import llmopt  # noqa: E402
from llmopt.kernels import get_kernel, list_kernels  # noqa: E402
from llmopt.nn import QuantLinear  # noqa: E402
from timing import measure_read_bandwidth, weight_bytes_per_step  # noqa: E402

MiB = 1024 * 1024
RESULTS = os.path.join(_HERE, "results")
SPEC_HBM_GBPS = 4800.0  # H200 datasheet; the % HBM column uses the bandwidth measured in the run

SHAPES: List[Tuple[int, int]] = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K): out x in
SMOKE_SHAPES: List[Tuple[int, int]] = [(256, 256), (512, 256), (256, 512)]
M_VALUES: List[int] = [1, 16, 256]
TARGET_SHAPE = (4096, 4096)
TINYGEMM = "int4_tinygemm_cuda"
TRITON = "lowbit_triton"
BUDGET_S = 330.0          # 5.5 minutes: the whole run must end inside 6
GPTQ_TARGET_S = 180.0
SMOKE_BUDGET_S = 50.0


@dataclass(frozen=True)
class Row:
    """One line of the kernel table at every shape and M."""

    name: str
    kind: str                    # "dense", "anchor" (aten called directly) or "quant" (QuantLinear)
    format: Optional[str] = None
    group_size: Optional[int] = None
    kernel: str = ""             # llmopt kernel requested by name ("quant" rows)

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "bf16 dense (F.linear)"
        if self.kind == "anchor":
            return "aten int4pack g64"
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.format} {group} [{self.kernel}]"


ROWS: List[Row] = [
    Row("bf16_dense", "dense"),
    Row("aten_int4pack_g64", "anchor", "int4", 64),
    Row("int4_g64_tinygemm", "quant", "int4", 64, TINYGEMM),
    Row("int4_g64_triton", "quant", "int4", 64, TRITON),
    Row("int3_g64_triton", "quant", "int3", 64, TRITON),
    Row("int2_g64_triton", "quant", "int2", 64, TRITON),
    Row("int8_pc_triton", "quant", "int8", None, TRITON),
    Row("nf4_g64_triton", "quant", "nf4", 64, TRITON),
    Row("fp4_g64_triton", "quant", "fp4_e2m1", 64, TRITON),
    Row("fp8_pc_triton", "quant", "fp8_e4m3", None, TRITON),
    Row("int4_g64_reference", "quant", "int4", 64, "reference"),
]

# (label, format, group size); bf16 is the model as built.
DECODE_FORMATS: List[Tuple[str, Optional[str], Optional[int]]] = [
    ("bf16", None, None), ("int4 g64", "int4", 64), ("int8 per-channel", "int8", None), ("nf4 g64", "nf4", 64),
]


def log(msg: str) -> None:
    """Progress goes to stderr; results go to stdout."""
    print(msg, file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------------------- budget
class Budget:
    """Wall-clock budget of the whole run; every task asks it before starting."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s

    def why_not(self, need_s: float) -> str:
        return (f"time budget: {self.left():.0f} s of {self.seconds:.0f} s left, this needs ~{need_s:.0f} s "
                "(rerun with --sections or --budget-s)")


# ------------------------------------------------------------------------------------------- output
class Output:
    """Records to the JSONL file as they come (a killed run keeps them); markdown at the end."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = os.path.abspath(path) if path else None
        self.records: List[Dict[str, Any]] = []
        self.md: List[str] = []
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            open(self.path, "w").close()

    def record(self, rec: Dict[str, Any]) -> None:
        self.records.append(rec)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, default=str) + "\n")

    def say(self, line: str) -> None:
        """One result line on stdout now (the section's table comes later, and goes to the markdown)."""
        print(line, flush=True)

    def emit(self, lines: Sequence[str]) -> None:
        """Print a finished block on stdout at once (a run killed later still shows it) and keep it."""
        text = "\n".join(lines)
        print(text, flush=True)
        self.md.extend(lines)
        self.write_md()  # rewritten after every block: a run stopped at its time limit keeps what it had

    def write_md(self) -> Optional[str]:
        if not self.path:
            return None
        md_path = os.path.splitext(self.path)[0] + ".md"
        with open(md_path, "w") as f:
            f.write("\n".join(self.md) + "\n")
        return md_path


# ------------------------------------------------------------------------------------------- machine
def versions() -> Dict[str, str]:
    try:
        import triton  # noqa: F401
        triton_version = triton.__version__
    except Exception as error:  # noqa: BLE001 - any import failure just means "not usable here"
        triton_version = f"not available ({first_line(error)})"
    try:
        import transformers
        tf_version = transformers.__version__
    except Exception:  # noqa: BLE001
        tf_version = "not installed"
    return {"torch": torch.__version__, "cuda": str(torch.version.cuda), "triton": triton_version,
            "transformers": tf_version, "llmopt": llmopt.__version__, "python": platform.python_version()}


def cpu_line() -> str:
    try:
        from llmopt.core.cpu import cpu_info
        return cpu_info().describe()
    except Exception:  # noqa: BLE001
        return platform.processor() or platform.machine()


def gpu_facts(device: torch.device) -> Dict[str, Any]:
    if device.type != "cuda":
        return {"gpu": "none (CPU smoke run)", "l2_bytes": 0}
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "sm": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30,
            "l2_bytes": int(getattr(props, "L2_cache_size", 0) or 50 * MiB)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _event_ms(fn: Callable[[], Any]) -> float:
    """Milliseconds of one ``fn()`` on the current CUDA stream, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def gpu_bandwidth(device: torch.device, size_mib: int = 2048, reps: int = 9) -> Dict[str, float]:
    """HBM read bandwidth: ``x.sum()`` over ``size_mib`` of float32 (reads every byte once), and a
    ``copy_`` of half that size (read + write bytes). Medians of CUDA-event timings after warm-up."""
    x = torch.randn(size_mib * MiB // 4, device=device)
    dst = torch.empty(x.numel() // 2, device=device)

    def timed(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        return statistics.median(_event_ms(fn) for _ in range(reps))

    read_ms = timed(x.sum)
    copy_ms = timed(lambda: dst.copy_(x[: dst.numel()]))
    return {"read_gbps": x.numel() * 4 / (read_ms * 1e-3) / 1e9,
            "copy_gbps": 2 * dst.numel() * 4 / (copy_ms * 1e-3) / 1e9, "size_mib": size_mib}


# ------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-call times of one row at one M, in microseconds."""

    us: float                     # primary: GPU time per call (CUDA graph replay), or eager on CPU
    eager_us: float               # per call in a plain Python loop (launch overhead included)
    timer: str
    note: str = ""


def time_calls(calls: Sequence[Callable[[], Any]], device: torch.device, reps: int) -> Timing:
    """Per-call time of ``calls`` (one per weight copy, run round robin).

    CUDA: a pass over all copies is repeated until it holds >= 32 calls; the eager time is a loop of such
    passes between two events; the primary time is the same passes captured in one CUDA graph, replayed
    ``reps`` times (median). A call that cannot be captured (host sync, CPU tensors) falls back on the
    eager time, with a note. CPU (smoke): ``time.perf_counter`` around passes, median."""
    # >= 32 calls per timed pass on a GPU (a 2 us call is near the event timer's resolution); 4 on the CPU.
    passes = max(1, math.ceil((32 if device.type == "cuda" else 4) / len(calls)))
    n_calls = passes * len(calls)

    def run() -> None:
        for _ in range(passes):
            for call in calls:
                call()

    with torch.inference_mode():
        run()  # warm-up: Triton JIT, cuBLAS handles, allocator
        run()
        if device.type != "cuda":
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            us = statistics.median(times) / n_calls * 1e6
            return Timing(us, us, "perf_counter (CPU)")
        torch.cuda.synchronize(device)
        eager_us = statistics.median(_event_ms(run) for _ in range(max(3, reps // 2))) / n_calls * 1e3
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                run()  # warm-up on the capture stream, as torch.cuda.graphs asks
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            torch.cuda.synchronize(device)
            replay_ms = statistics.median(_event_ms(graph.replay) for _ in range(reps))
            del graph
            return Timing(replay_ms / n_calls * 1e3, eager_us, "cuda graph")
        except Exception as error:  # noqa: BLE001 - an uncapturable kernel is a finding, not a crash
            try:
                torch.cuda.synchronize(device)
            except Exception:  # noqa: BLE001
                pass
            return Timing(eager_us, eager_us, "eager events", f"graph capture failed: {first_line(error)}")


# ------------------------------------------------------------------------------------------- kernels
@dataclass
class Built:
    calls_for: Callable[[torch.Tensor], List[Callable[[], Any]]]
    one: Callable[[torch.Tensor], torch.Tensor]
    weight_bytes: int
    kernel: str
    copies: int


class SkipRow(Exception):
    """The row cannot run here (kernel not registered, refused, CUDA only): reported as SKIP."""


def rotation(weight_bytes: int, working_set: int, cap: int = 64) -> int:
    if working_set <= 0:
        return 1
    return int(min(max(math.ceil(working_set / max(weight_bytes, 1)), 1), cap))


def build_row(row: Row, weight: torch.Tensor, refs: Dict[Tuple[str, Optional[int]], QuantLinear],
              device: torch.device, working_set: int) -> Built:
    """Copies of ``row``'s layer for ``weight`` (bf16 ``[N, K]``); ``refs`` caches one reference-kernel
    QuantLinear per format (RTN once, every kernel converts from the same codes)."""
    n, k = weight.shape
    if row.kind == "dense":
        copies = [weight] + [weight.clone() for _ in range(rotation(weight.numel() * 2, working_set) - 1)]
        return Built(lambda x: [(lambda w=w: F.linear(x, w)) for w in copies], lambda x: F.linear(x, weight),
                     weight.numel() * 2, "cuBLAS" if device.type == "cuda" else "ATen", len(copies))
    key = (row.format, row.group_size)
    if key not in refs:
        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=weight.dtype)
        with torch.no_grad():
            base.weight.copy_(weight)
        refs[key] = QuantLinear.from_linear(base, format=row.format, group_size=row.group_size, kernel="reference")
    ref = refs[key]
    if row.kind == "anchor":
        return build_anchor(ref, device, working_set)
    if row.kernel not in list_kernels():
        raise SkipRow(f"kernel {row.kernel} not registered in this build")
    reason = get_kernel(row.kernel).unsupported_reason(ref.kernel_spec, device)
    if reason is not None:
        raise SkipRow(f"kernel {row.kernel} refuses {ref.kernel_spec.describe()} on {device.type}: {reason}")
    layer = copy.deepcopy(ref).set_kernel(row.kernel)
    layers = [layer] + [copy.deepcopy(layer) for _ in range(rotation(layer.runtime_bytes(), working_set) - 1)]
    return Built(lambda x: [(lambda q=q: q(x)) for q in layers], layer, layer.runtime_bytes(), layer.kernel.name,
                 len(layers))


def build_anchor(ref: QuantLinear, device: torch.device, working_set: int) -> Built:
    """``aten._weight_int4pack_mm`` called directly on the same int4 g64 codes. llmopt's int4 affine
    dequantization is tinygemm's, ``(q - 8) * scale + zero``, so scale_and_zero is [K/64, N, 2] of
    (scale, zero_point) and the output matches the reference kernel up to bf16 rounding."""
    if device.type != "cuda":
        raise SkipRow("CUDA only (aten._weight_int4pack_mm with inner_k_tiles=8 is the CUDA tinygemm kernel)")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        raise SkipRow("this torch has no aten._weight_int4pack_mm")
    codes = ref.codes().to(torch.int32)                          # [N, K], values 0..15
    packed_uint8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
    canonical = ref.canonical_state()
    scale_and_zero = torch.stack([canonical["scale"].to(torch.bfloat16),
                                  canonical["zero_point"].to(torch.bfloat16)], dim=-1)   # [N, G, 2]
    scale_and_zero = scale_and_zero.transpose(0, 1).contiguous()                            # [G, N, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_uint8, 8)
    nbytes = packed.numel() * packed.element_size() + scale_and_zero.numel() * scale_and_zero.element_size()
    pairs = [(packed, scale_and_zero)] + [(packed.clone(), scale_and_zero.clone())
                                          for _ in range(rotation(nbytes, working_set) - 1)]
    mm = torch.ops.aten._weight_int4pack_mm

    def one(x: torch.Tensor) -> torch.Tensor:
        return mm(x, packed, 64, scale_and_zero)

    return Built(lambda x: [(lambda p=p, s=s: mm(x, p, 64, s)) for p, s in pairs], one, nbytes,
                 "aten._weight_int4pack_mm", len(pairs))


def rel_err(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    y, y_ref = y.float(), y_ref.float()
    return float((y - y_ref).norm() / y_ref.norm().clamp_min(1e-12))


def run_kernel_shape(n: int, k: int, m_values: Sequence[int], device: torch.device, args: argparse.Namespace,
                     budget: Budget, out: Output, bw_gbps: float, working_set: int) -> List[Dict[str, Any]]:
    """Every row of the table at one shape and every M; returns the records (status ok/skip/error)."""
    shape = f"{n}x{k}"
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    weight = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device=device, dtype=torch.bfloat16)
    xs = {m: torch.randn(m, k, generator=gen).to(device=device, dtype=torch.bfloat16) for m in m_values}
    refs: Dict[Tuple[str, Optional[int]], QuantLinear] = {}
    records: List[Dict[str, Any]] = []
    row_s = 1.0  # seconds the slowest row of this shape took so far: what the next one is assumed to need
    for row in ROWS:
        base = {"type": "kernel", "shape": shape, "N": n, "K": k, "row": row.name, "label": row.label,
                "format": row.format or "bf16", "group_size": row.group_size, "requested_kernel": row.kernel}
        if not budget.allows(row_s * 1.5):
            for m in m_values:
                records.append({**base, "M": m, "status": "skip", "note": budget.why_not(row_s * 1.5)})
            continue
        t0 = time.perf_counter()
        try:
            built = build_row(row, weight, refs, device, working_set)
        except SkipRow as why:
            records += [{**base, "M": m, "status": "skip", "note": str(why)} for m in m_values]
            log(f"  {shape} {row.name}: SKIP {why}")
            continue
        except Exception as error:  # noqa: BLE001 - a broken kernel is reported, the run goes on
            note = f"build: {first_line(error)}"
            records += [{**base, "M": m, "status": "error", "note": note} for m in m_values]
            log(f"  {shape} {row.name}: ERROR building: {first_line(error)}")
            continue
        for m in m_values:
            x = xs[m]
            rec = {**base, "M": m, "kernel": built.kernel, "copies": built.copies,
                   "weight_bytes": built.weight_bytes}
            try:
                with torch.inference_mode():
                    y = built.one(x)
                    ref_key = (row.format, row.group_size)
                    rec["rel_err"] = rel_err(y, refs[ref_key](x)) if ref_key in refs else None
                timing = time_calls(built.calls_for(x), device, args.reps)
            except Exception as error:  # noqa: BLE001
                rec.update(status="error", note=first_line(error))
                log(f"  {shape} M={m} {row.name}: ERROR {first_line(error)}")
                records.append(rec)
                continue
            nbytes = built.weight_bytes + 2 * m * k + 2 * m * n  # bf16 activations in and out
            gbps = nbytes / (timing.us * 1e-6) / 1e9
            rec.update(status="ok", us=timing.us, eager_us=timing.eager_us, timer=timing.timer, note=timing.note,
                       bytes=nbytes, gbps=gbps, pct_hbm=100.0 * gbps / bw_gbps if bw_gbps else None,
                       tflops=2.0 * m * n * k / (timing.us * 1e-6) / 1e12)
            records.append(rec)
            log(f"  {shape} M={m:<3} {row.name:<20} {built.kernel:<24} {timing.us:9.2f} us "
                f"(eager {timing.eager_us:8.2f}) {gbps:8.1f} GB/s{'  ' + timing.note if timing.note else ''}")
        row_s = max(row_s, time.perf_counter() - t0)
        del built
    for m in m_values:  # speed-ups against bf16 dense at the same shape and M
        dense = next((r for r in records
                      if r["row"] == "bf16_dense" and r["M"] == m and r["status"] == "ok"), None)
        for r in records:
            if r["M"] == m and r["status"] == "ok":
                r["speedup_vs_bf16"] = dense["us"] / r["us"] if dense else None
    for r in records:
        out.record(r)
    del weight, xs, refs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def kernel_table_md(records: List[Dict[str, Any]], bw_gbps: float) -> List[str]:
    """The measured rows as a markdown table, then one line per distinct skip/error/timer note with the
    rows it concerns (a missing kernel is one line, not one per row and M)."""
    lines = [f"| shape | M | row | kernel | us | eager us | GB/s | % HBM ({bw_gbps:.0f} GB/s) | vs bf16 | err |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    notes: Dict[str, List[str]] = {}
    for r in records:
        if r.get("note"):
            where = notes.setdefault(f"{r['status'].upper() if r['status'] != 'ok' else 'NOTE'}: {r['note']}", [])
            if r["row"] not in where:
                where.append(r["row"])
        if r["status"] != "ok":
            continue
        err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
        speed = "-" if r.get("speedup_vs_bf16") is None else f"{r['speedup_vs_bf16']:.2f}x"
        pct = "-" if r.get("pct_hbm") is None else f"{r['pct_hbm']:.0f}"
        lines.append(f"| {r['shape']} | {r['M']} | {r['label']} | {r['kernel']} | {r['us']:.2f} "
                     f"| {r['eager_us']:.2f} | {r['gbps']:.0f} | {pct} | {speed} | {err} |")
    lines += [f"- {note} ({', '.join(rows)})" for note, rows in notes.items()]
    return lines


# ------------------------------------------------------------------------------------------- decode
def _decode_runner_class():
    """``llmopt.evaluate.DecodeRunner``: batches, and copies each step's token out of CUDA-graph memory."""
    from llmopt.evaluate import DecodeRunner

    return DecodeRunner


class DecodeBench:
    """The 1.1B speed model (bf16 on the device) and its RTN-quantized copies, made on first use."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.models: Dict[str, torch.nn.Module] = {}
        self.kernels: Dict[str, str] = {}
        self._master: Optional[torch.nn.Module] = None

    def master(self) -> torch.nn.Module:
        if self._master is None:
            from llmopt.models import speed_model
            t0 = time.perf_counter()
            self._master = speed_model(self.args.model_size, dtype=torch.bfloat16).to(self.device).eval()
            log(f"  speed_model({self.args.model_size!r}) built on {self.device} "
                f"in {time.perf_counter() - t0:.1f} s")
        return self._master

    def model(self, label: str) -> torch.nn.Module:
        if label not in self.models:
            fmt, group = next((f, g) for name, f, g in DECODE_FORMATS if name == label)
            model = self.master() if fmt is None else copy.deepcopy(self.master())
            if fmt is not None:
                t0 = time.perf_counter()
                llmopt.compress_(model, llmopt.RTN(fmt, group, kernel=self.args.quant_kernel), exclude=["lm_head"])
                sync(self.device)
                log(f"  RTN {label}: {time.perf_counter() - t0:.1f} s")
            self.models[label] = model
            self.kernels[label] = layer_kernels(model)
        return self.models[label]


def layer_kernels(model: torch.nn.Module) -> str:
    """``"154x int4 g64 [int4_tinygemm_cuda], 1x dense bf16"``: what each layer runs on."""
    counts: Dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            key = module.describe()
        elif isinstance(module, torch.nn.Linear):
            key = f"dense {str(module.weight.dtype).replace('torch.', '')}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{v}x {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def measure_decode(bench: DecodeBench, label: str, batch: int, compiled: bool,
                   fullgraph: bool = True) -> Dict[str, Any]:
    """Tokens/s of one (format, batch, eager/compiled) cell: a warm-up run (the compile), then
    ``decode_repeats`` timed runs; tokens/s = batch x steps / median seconds (prefill excluded)."""
    args, device = bench.args, bench.device
    model = bench.model(label)
    runner_cls = _decode_runner_class()
    common = dict(batch=batch, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    rec: Dict[str, Any] = {"type": "decode", "format": label, "batch": batch,
                           "mode": "compiled" if compiled else "eager", "kernels": bench.kernels[label],
                           "notes": []}
    if compiled:
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.reset()  # graphs of the previous model (and their CUDA graph pools) go
        counters.clear()
        cuda = device.type == "cuda"
        # Inductor's CUDA graphs (what mode="reduce-overhead" turns on), given as an option: DecodeRunner's
        # module-guard filter is an option too, and torch.compile takes a mode or options, not both.
        # Skipping dynamo's guards on module attributes saves ~1-2 ms per step (the modules never change here).
        skip_guards = hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")
        runner = runner_cls(model, compile=True, cache="static", fullgraph=fullgraph,
                            skip_module_guards=skip_guards,
                            options={"triton.cudagraphs": True} if cuda else None, **common)
        if not cuda:
            # Smoke run: dynamo traces the same step (fullgraph) but inductor's C++ build (~20 s on 2 cores)
            # is skipped; the CUDA run uses the runner's own torch.compile call.
            runner.step = torch.compile(runner._eager_step, backend="eager", fullgraph=fullgraph, dynamic=False)
        rec["compile"] = (f"torch.compile(step, fullgraph={fullgraph}, dynamic=False, triton.cudagraphs), "
                          "StaticCache"
                          if cuda else "smoke: torch.compile(backend='eager', fullgraph=True), StaticCache")
        if not fullgraph:
            rec["notes"].append("fullgraph=False (fullgraph=True failed)")
    else:
        runner = runner_cls(model, compile=False, cache="dynamic", **common)
    t0 = time.perf_counter()
    runner.warm_up()
    rec["warm_up_s"] = time.perf_counter() - t0
    graphs = None
    if compiled:
        from torch._dynamo.utils import counters
        graphs = counters["stats"]["unique_graphs"]
    runs = [runner.run()["seconds"] for _ in range(args.decode_repeats)]
    steps = args.new_tokens - 1
    median = statistics.median(runs)
    rec.update(tokens_per_s=batch * steps / median, ms_per_step=1000 * median / steps, times_s=runs,
               prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
               weight_bytes_per_step=weight_bytes_per_step(model))
    rec["weight_gbps"] = rec["weight_bytes_per_step"] / (median / steps) / 1e9
    if compiled:
        from torch._dynamo.utils import counters
        rec["recompiles_while_timed"] = counters["stats"]["unique_graphs"] - graphs
        # A graph inductor ran without CUDA graphs (a mutated input, a CPU tensor) says so here.
        rec["cudagraph_skips"] = int(sum(v for key, v in counters["inductor"].items() if "cudagraph_skip" in key))
        if rec["recompiles_while_timed"]:
            rec["notes"].append(f"{rec['recompiles_while_timed']} recompiles while timed")
        if rec["cudagraph_skips"]:
            rec["notes"].append(f"{rec['cudagraph_skips']} graphs ran without CUDA graphs")
    del runner
    return rec


def decode_table_md(records: List[Dict[str, Any]]) -> List[str]:
    lines = ["| format | batch | mode | tok/s | ms/step | weight MB/step | weight GB/s | warm-up s | layers "
             "| notes |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['format']} | {r['batch']} | {r['mode']} | {r['status'].upper()} | | | | | "
                         f"| {r['note']} |")
            continue
        lines.append(f"| {r['format']} | {r['batch']} | {r['mode']} | {r['tokens_per_s']:.1f} "
                     f"| {r['ms_per_step']:.2f} "
                     f"| {r['weight_bytes_per_step'] / 1e6:.0f} | {r['weight_gbps']:.0f} | {r['warm_up_s']:.1f} "
                     f"| {r['kernels']} | {'; '.join(r.get('notes') or []) or '-'} |")
    return lines


# ------------------------------------------------------------------------------------------- GPTQ
class GPTQDeadline(Exception):
    """Raised from a block's forward pre-hook once GPTQ has run past its time limit."""


def measure_gptq(bench: DecodeBench, args: argparse.Namespace, limit_s: float) -> Dict[str, Any]:
    """GPTQ int4 g64 act-order over ``samples x length`` random token ids on a fresh copy of the model
    (on the device): ``compress_`` wall time, calibration forwards included.

    ``compress_`` cannot be interrupted from outside, so a forward pre-hook on every transformer block
    raises once ``limit_s`` has passed (``compress_`` then rolls the model back): the record says
    ``aborted`` with the blocks reached and the time extrapolated to all blocks."""
    from llmopt.calibration.runner import find_blocks

    device = bench.device
    model = copy.deepcopy(bench.master())
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.gptq_samples, args.gptq_length), generator=gen)
    batches = [ids[i:i + args.gptq_batch] for i in range(0, args.gptq_samples, args.gptq_batch)]
    config = llmopt.GPTQ("int4", 64, act_order=True, kernel=args.quant_kernel)
    _, blocks = find_blocks(model)
    reached = {"block": -1}
    t0 = 0.0

    def guard(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: Any) -> None:
            reached["block"] = max(reached["block"], index)
            if time.perf_counter() - t0 > limit_s:
                raise GPTQDeadline(f"stopped after {limit_s:.0f} s in block {index + 1} of {len(blocks)}")
        return hook

    # The calibration runner calls each block (or a deep copy of it, which keeps the hook) per batch.
    handles = [block.register_forward_pre_hook(guard(i)) for i, block in enumerate(blocks)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rec: Dict[str, Any] = {"type": "gptq", "method": config.label(), "samples": args.gptq_samples,
                           "length": args.gptq_length, "batch": args.gptq_batch, "limit_s": limit_s,
                           "blocks": len(blocks)}
    sync(device)
    t0 = time.perf_counter()
    try:
        report = llmopt.compress_(model, config, exclude=["lm_head"], calibration=batches,
                                  calibration_dtype=torch.bfloat16)
        sync(device)
        rec.update(status="ok", seconds=time.perf_counter() - t0, layers=len(report.replaced),
                   kernels=layer_kernels(model))
    except Exception as error:  # noqa: BLE001 - compress_ wraps the hook's exception in CompressionError
        seconds = time.perf_counter() - t0
        chain, cause = [], error
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if not any(isinstance(e, GPTQDeadline) for e in chain):
            raise
        done = max(reached["block"], 0)  # blocks finished before the one that was stopped
        rec.update(status="aborted", seconds=seconds, blocks_done=done,
                   extrapolated_s=seconds / done * len(blocks) if done else None,
                   note=f"stopped at the {limit_s:.0f} s limit in block {done + 1} of {len(blocks)}"
                        + (f"; ~{seconds / done * len(blocks):.0f} s extrapolated to all blocks" if done else ""))
    finally:
        for handle in handles:
            handle.remove()
    rec["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


# ------------------------------------------------------------------------------------------- checks
def _kernel_row(records: List[Dict[str, Any]], row: str, m: int = 1) -> Optional[Dict[str, Any]]:
    n, k = TARGET_SHAPE
    return next((r for r in records if r["type"] == "kernel" and r["N"] == n and r["K"] == k and r["M"] == m
                 and r["row"] == row), None)


def evaluate_checks(records: List[Dict[str, Any]], bw_gbps: float, shape_note: str,
                    model_note: str = "1.1B model") -> List[Dict[str, str]]:
    """The issue's targets -> [{status, name, detail}], each from numbers of this run."""
    checks: List[Dict[str, str]] = []

    def add(status: str, name: str, detail: str) -> None:
        checks.append({"status": status, "name": name, "detail": detail})

    def missing(*recs: Optional[Dict[str, Any]]) -> Optional[str]:
        for r in recs:
            if r is None:
                return "not measured in this run (section or shape not selected)"
            if r["status"] != "ok":
                return f"{r['row']}: {r['status']}: {r['note']}"
        return None

    def ratio_check(name: str, row: str, base: str, threshold: float) -> None:
        a, b = _kernel_row(records, row), _kernel_row(records, base)
        why = missing(a, b)
        if why:
            add("SKIP", name, why)
            return
        ratio = b["us"] / a["us"]
        add("PASS" if ratio >= threshold else "MISS", name,
            f"{ratio:.2f}x ({a['us']:.2f} us [{a['kernel']}] vs {b['us']:.2f} us [{b['kernel']}], {a['timer']})")

    tgt = f"{shape_note} M=1"
    for row, kernel in (("int4_g64_tinygemm", TINYGEMM), ("int4_g64_triton", TRITON)):
        ratio_check(f"{tgt}: int4 g64 [{kernel}] >= 2.5x bf16 dense", row, "bf16_dense", 2.5)
        r = _kernel_row(records, row)
        name = f"{tgt}: int4 g64 [{kernel}] >= 70% of HBM read bandwidth ({bw_gbps:.0f} GB/s measured)"
        why = missing(r)
        if why:
            add("SKIP", name, why)
        else:
            add("PASS" if r["pct_hbm"] >= 70.0 else "MISS", name,
                f"{r['pct_hbm']:.0f}% ({r['gbps']:.0f} GB/s of weight + activations in {r['us']:.2f} us; "
                f"{100.0 * r['gbps'] / SPEC_HBM_GBPS:.0f}% of the 4.8 TB/s datasheet)")
        # The same kernel as the anchor for tinygemm: 3% is the run-to-run noise of a 2-3 us call.
        ratio_check(f"{tgt}: int4 g64 [{kernel}] at least as fast as aten._weight_int4pack_mm (>= 0.97x)",
                    row, "aten_int4pack_g64", 0.97)
    ratio_check(f"{tgt}: int3 g64 faster than int4 g64 (both {TRITON})", "int3_g64_triton", "int4_g64_triton", 1.0)
    ratio_check(f"{tgt}: int2 g64 faster than int4 g64 (both {TRITON})", "int2_g64_triton", "int4_g64_triton", 1.0)
    ratio_check(f"{tgt}: nf4 g64 [{TRITON}] >= 2x bf16 dense", "nf4_g64_triton", "bf16_dense", 2.0)

    # Decode: compiled when both formats were compiled (eager batch-1 decode on a GPU is bound by Python
    # and launch overhead, which hides the kernels), else eager.
    name = f"{model_note} decode batch 1: int4 g64 >= 1.8x bf16"

    def decode(fmt: str, mode: str) -> Optional[Dict[str, Any]]:
        return next((r for r in records if r["type"] == "decode" and r["format"] == fmt and r["batch"] == 1
                     and r["mode"] == mode and r.get("status") == "ok"), None)

    pairs = {mode: (decode("int4 g64", mode), decode("bf16", mode)) for mode in ("compiled", "eager")}
    judged = next((mode for mode in ("compiled", "eager") if all(pairs[mode])), None)
    if judged is None:
        add("SKIP", name, "no int4 g64 and bf16 batch-1 decode of the same mode in this run")
    else:
        q, d = pairs[judged]
        ratio = q["tokens_per_s"] / d["tokens_per_s"]
        other = "eager" if judged == "compiled" else "compiled"
        extra = ""
        if all(pairs[other]):
            extra = f"; {other}: {pairs[other][0]['tokens_per_s'] / pairs[other][1]['tokens_per_s']:.2f}x"
        add("PASS" if ratio >= 1.8 else "MISS", name,
            f"{judged}: {ratio:.2f}x ({q['tokens_per_s']:.1f} vs {d['tokens_per_s']:.1f} tok/s; int4 layers: "
            f"{q['kernels']}){extra}")

    gptq = next((r for r in records if r["type"] == "gptq"), None)
    name = f"GPTQ int4 g64 on the {model_note} <= {GPTQ_TARGET_S:.0f} s"
    if gptq is None or gptq.get("status") not in ("ok", "aborted"):
        add("SKIP", name, gptq["note"] if gptq else "not run (section not selected)")
    elif gptq["status"] == "aborted":
        # Stopped past the target: a MISS; stopped earlier by the run's budget: no verdict.
        add("MISS" if gptq["seconds"] > GPTQ_TARGET_S else "SKIP", name, gptq["note"])
    else:
        add("PASS" if gptq["seconds"] <= GPTQ_TARGET_S else "MISS", name,
            f"{gptq['seconds']:.1f} s ({gptq['samples']} x {gptq['length']} tokens, batches of {gptq['batch']})")
    return checks


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="4096x4096 only, batch 1 only, fewer repeats")
    p.add_argument("--smoke", action="store_true",
                   help="CPU run of the whole script on tiny shapes (< 60 s): CUDA-only rows say SKIP")
    p.add_argument("--sections", default="kernels,decode,gptq", help="comma list of kernels, decode, gptq")
    p.add_argument("--budget-s", type=float, default=None, help=f"time budget of the run (default {BUDGET_S:g})")
    p.add_argument("--out", default=None,
                   help="JSONL path, markdown next to it (default benchmarks/results/gpu.jsonl; --smoke: none)")
    p.add_argument("--reps", type=int, default=None, help="timed replays per kernel row (default 15, quick 7)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"kernels", "decode", "gptq"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from kernels, decode, gptq")
    if args.out is None and not args.smoke:
        args.out = os.path.join(RESULTS, "gpu.jsonl")
    if args.budget_s is None:
        args.budget_s = SMOKE_BUDGET_S if args.smoke else BUDGET_S
    if args.reps is None:
        args.reps = 3 if args.smoke else (7 if args.quick else 15)
    # Protocol sizes: the smoke run keeps every step but shrinks the work.
    args.shapes = (SMOKE_SHAPES if args.smoke else SHAPES)[: 1 if args.quick else None]
    args.m_values = M_VALUES
    args.model_size = "tiny" if args.smoke else "1b"
    args.prompt_tokens, args.new_tokens = (8, 6) if args.smoke else (16, 32)
    args.decode_repeats = 2 if (args.smoke or args.quick) else 3
    args.batches = [1] if args.quick else [1, 8]
    args.gptq_samples, args.gptq_length, args.gptq_batch = (4, 32, 2) if args.smoke else (128, 512, 1)
    # On CPU, "auto" would build and probe llmopt's CPU kernels (tens of seconds); the smoke run checks
    # this script, not kernel choice, so it quantizes onto the reference kernel.
    args.quant_kernel = "reference" if args.smoke else "auto"
    return args


@dataclass
class Task:
    name: str
    section: str
    need_s: Callable[[], float]
    run: Callable[[], None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; `--smoke` runs the script's logic on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    budget = Budget(args.budget_s)
    out = Output(args.out)
    torch.manual_seed(args.seed)
    facts, vers = gpu_facts(device), versions()

    # Machine first: whoever reads a pasted result sees what it ran on.
    if device.type == "cuda":
        bw = gpu_bandwidth(device)
        torch.cuda.empty_cache()  # the probe's 3 GiB go back before the kernels' copies are made
        bw_line = (f"HBM read {bw['read_gbps']:.0f} GB/s (torch.sum over {bw['size_mib']} MiB fp32, median of 9; "
                   f"{100 * bw['read_gbps'] / SPEC_HBM_GBPS:.0f}% of the 4.8 TB/s datasheet), copy "
                   f"{bw['copy_gbps']:.0f} GB/s (read + write)")
    else:
        probe = measure_read_bandwidth(size_mib=64, repeats=5, retries=0)
        bw = {"read_gbps": probe["gbps"], "copy_gbps": None, "size_mib": 64}
        bw_line = f"CPU read {bw['read_gbps']:.1f} GB/s (torch.sum over 64 MiB; smoke run)"
    bw_gbps = bw["read_gbps"]
    l2 = facts["l2_bytes"]
    working_set = 4 * l2  # weights rotated over >= 4x L2: each call reads its weight from HBM
    header_lines = [
        f"# llmopt GPU benchmark ({_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
        f"{', SMOKE (CPU, tiny shapes)' if args.smoke else ''}{', quick' if args.quick else ''})", "",
        f"- GPU: **{facts['gpu']}**" + (f" (sm {facts['sm']}, {facts['sms']} SMs, {facts['memory_gib']:.0f} GiB, "
                                        f"L2 {l2 / MiB:.0f} MiB)" if device.type == "cuda" else ""),
        f"- torch {vers['torch']} (CUDA {vers['cuda']}), triton {vers['triton']}, transformers "
        f"{vers['transformers']}, llmopt {vers['llmopt']}, Python {vers['python']}",
        f"- CPU: {cpu_line()}, {os.cpu_count()} CPUs",
        f"- {bw_line}",
        f"- kernels registered: {', '.join(list_kernels())}",
        f"- sections: {', '.join(args.sections)}; budget {args.budget_s:.0f} s",
        ("- kernel rows: `us` = GPU time per call: calls round robin over weight copies totalling >= "
         f"{working_set / MiB:.0f} MiB (4x L2), captured in a CUDA graph, median of {args.reps} replays "
         "(CUDA events); `eager us` = the same calls in a Python loop (launch overhead included); GB/s = "
         if device.type == "cuda" else
         f"- kernel rows (smoke): `us` = perf_counter per call, median of {args.reps} passes; GB/s = ")
        +
        "(weight + bf16 input + output bytes) / us; % HBM against the read bandwidth above; `err` = relative "
        "error against the reference kernel on the same codes",
    ]
    out.emit(header_lines)
    out.record({"type": "header", "timestamp": _dt.datetime.now().isoformat(timespec="seconds"), **facts, **vers,
                "cpu": cpu_line(), "bandwidth": bw, "kernels": list_kernels(), "smoke": args.smoke,
                "quick": args.quick, "sections": args.sections, "budget_s": args.budget_s,
                "working_set_bytes": working_set, "reps": args.reps})

    kernel_records: List[Dict[str, Any]] = []
    decode_records: List[Dict[str, Any]] = []
    gptq_records: List[Dict[str, Any]] = []
    errors: List[str] = []
    bench = DecodeBench(args, device)
    est = {"eager": 20.0 if not args.smoke else 3.0, "compiled": 75.0 if not args.smoke else 8.0,
           "gptq": 45.0 if not args.smoke else 5.0, "shape": 40.0 if not args.smoke else 3.0}
    # Initial guesses for an H200 (eager: quantize + 4 short generations; compiled: inductor's cold
    # compile of a 22-layer decode step); each is raised to the longest task of its kind measured.
    # GPTQ stops itself at its limit (and extrapolates), so it only needs room to get going.

    def kernels_task(n: int, k: int) -> Task:
        def run() -> None:
            t0 = time.perf_counter()
            recs = run_kernel_shape(n, k, args.m_values, device, args, budget, out, bw_gbps, working_set)
            if (n, k) == args.shapes[0]:
                est["shape"] = time.perf_counter() - t0
            kernel_records.extend(recs)
            errors.extend(f"kernel {r['shape']} M={r['M']} {r['row']}: {r['note']}" for r in recs
                          if r["status"] == "error")
            out.emit(["", f"## Kernels {n}x{k} (N x K)", ""] + kernel_table_md(recs, bw_gbps))

        # Each row asks the budget again, so a shape only needs room for its first rows; the first shape
        # (its Triton JIT included) tells how long one takes.
        first = (n, k) == args.shapes[0]
        return Task(f"kernels {n}x{k}", "kernels", lambda: 5.0 if first else max(5.0, 0.5 * est["shape"]), run)

    def decode_task(label: str, batch: int, compiled: bool) -> Task:
        mode = "compiled" if compiled else "eager"

        def run() -> None:
            t0 = time.perf_counter()
            try:
                rec = measure_decode(bench, label, batch, compiled)
            except Exception as error:  # noqa: BLE001
                # fullgraph=True fails when a kernel's forward breaks dynamo's graph; with graph breaks the
                # step still compiles (and runs partly in CUDA graphs): worth a second compile if time allows.
                if not compiled or not budget.allows(est["compiled"]):
                    raise
                log(f"  decode {label} batch {batch} compiled, fullgraph=True failed ({first_line(error)}); "
                    "retrying with fullgraph=False")
                try:
                    rec = measure_decode(bench, label, batch, compiled, fullgraph=False)
                except Exception as second:  # noqa: BLE001 - both reasons go to the report
                    raise RuntimeError(f"fullgraph=True: {first_line(error)}; fullgraph=False: "
                                       f"{first_line(second)}") from second
                rec["notes"].insert(0, f"fullgraph=True: {first_line(error)}")
            rec["status"] = "ok"
            est[mode] = max(est[mode], time.perf_counter() - t0)
            decode_records.append(rec)
            out.record(rec)
            out.say(f"decode {label} batch {batch} {mode}: {rec['tokens_per_s']:.1f} tok/s "
                    f"(warm-up {rec['warm_up_s']:.1f} s; {rec['kernels']}"
                    + (f"; {'; '.join(rec['notes'])}" if rec["notes"] else "") + ")")
        return Task(f"decode {label} batch {batch} {mode}", "decode", lambda: est[mode], run)

    def gptq_task() -> Task:
        def run() -> None:
            # Stopped (and extrapolated) at the target plus 20 %, or where the budget ends (less the time
            # compress_ takes to roll back and the run to write its report).
            margin = 1.0 if args.smoke else 10.0
            rec = measure_gptq(bench, args, limit_s=max(min(GPTQ_TARGET_S * 1.2, budget.left() - margin), 1.0))
            gptq_records.append(rec)
            out.record(rec)
            peak = f"{rec['cuda_peak_gib']:.1f} GiB" if rec["cuda_peak_gib"] is not None else "-"
            if rec["status"] == "ok":
                line = (f"- {rec['method']}: **{rec['seconds']:.1f} s** for {rec['samples']} x {rec['length']} "
                        f"random tokens (batches of {rec['batch']}), {rec['layers']} layers on {device.type}; "
                        f"peak CUDA memory {peak}; layers: {rec['kernels']}")
            else:
                line = f"- {rec['method']}: ABORTED: {rec['note']}; peak CUDA memory {peak}"
            out.emit(["", "## GPTQ", "", line])
        return Task("gptq int4 g64", "gptq", lambda: est["gptq"], run)

    # Most important first: the 4096x4096 table, batch-1 decode (eager, then compiled bf16 and int4), GPTQ;
    # then the wide shapes, the other compiled formats and batch 8.
    labels = [name for name, _, _ in DECODE_FORMATS]
    tasks: List[Task] = [kernels_task(*args.shapes[0])]
    tasks += [decode_task(label, 1, False) for label in labels]
    tasks += [decode_task(label, 1, True) for label in ("bf16", "int4 g64")]
    tasks.append(gptq_task())
    tasks += [kernels_task(n, k) for n, k in args.shapes[1:]]
    tasks += [decode_task(label, 1, True) for label in labels if label not in ("bf16", "int4 g64")]
    for batch in args.batches[1:]:
        tasks += [decode_task(label, batch, False) for label in labels]
        tasks += [decode_task(label, batch, True) for label in labels]

    no_transformers = vers["transformers"] == "not installed"
    for task in tasks:
        if task.section not in args.sections:
            continue
        skip_note = None
        if task.section in ("decode", "gptq") and no_transformers:
            skip_note = "transformers is not installed (llmopt.models.speed_model needs it)"
        elif not budget.allows(task.need_s()):
            skip_note = budget.why_not(task.need_s())
        if skip_note is not None:
            out.say(f"SKIP {task.name}: {skip_note}")
            rec = {"task": task.name, "status": "skip", "note": skip_note}
            if task.section == "decode":
                label, batch, mode = _split_decode(task.name)
                decode_records.append({"type": "decode", "format": label, "batch": batch, "mode": mode, **rec})
            elif task.section == "gptq":
                gptq_records.append({"type": "gptq", **rec})
            else:
                n, k = (int(v) for v in task.name.split()[1].split("x"))
                kernel_records.extend({"type": "kernel", "shape": f"{n}x{k}", "N": n, "K": k, "M": m,
                                       "row": r.name, "label": r.label, **rec}
                                      for r in ROWS for m in args.m_values)
            out.record({"type": "skipped", **rec})
            continue
        log(f"# {task.name} (elapsed {budget.elapsed():.0f} s)")
        try:
            task.run()
        except Exception as error:  # noqa: BLE001 - one broken cell must not cost the rest of the run
            note = first_line(error)
            errors.append(f"{task.name}: {note}")
            out.say(f"ERROR {task.name}: {note}")
            log(traceback.format_exc(limit=8))
            rec = {"task": task.name, "status": "error", "note": note}
            if task.section == "decode":
                label, batch, mode = _split_decode(task.name)
                decode_records.append({"type": "decode", "format": label, "batch": batch, "mode": mode, **rec})
            elif task.section == "gptq":
                gptq_records.append({"type": "gptq", **rec})
            out.record({"type": "error", **rec})
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if "decode" in args.sections:
        out.emit(["", f"## Decode: speed_model({args.model_size!r}) bf16 on {device.type}, prompt "
                  f"{args.prompt_tokens}, {args.new_tokens} new tokens, median of {args.decode_repeats}", ""]
                 + decode_table_md(decode_records))
    if "gptq" in args.sections and not any(r.get("status") in ("ok", "aborted") for r in gptq_records):
        out.emit(["", "## GPTQ", ""] + [f"- {r['status'].upper()}: {r['note']}" for r in gptq_records])

    all_records = kernel_records + decode_records + gptq_records
    shape_note = f"{TARGET_SHAPE[0]}x{TARGET_SHAPE[1]}"
    if args.smoke:
        # The smoke run's first shape stands in for 4096x4096, so the checks' code runs too.
        n, k = SMOKE_SHAPES[0]
        all_records = [dict(r, N=4096, K=4096) if r["type"] == "kernel" and r["N"] == n and r["K"] == k else r
                       for r in all_records if not (r["type"] == "kernel" and r["N"] == 4096 and r["K"] == 4096)]
        shape_note = f"{n}x{k} (smoke, standing in for 4096x4096)"
    model_note = "tiny speed model (smoke)" if args.smoke else "1.1B model"
    checks = evaluate_checks(all_records, bw_gbps, shape_note, model_note)
    lines = ["", "## Targets (benchmark checks, not unit tests)", "", "```"]
    lines += [f"{c['status']:<4} {c['name']}: {c['detail']}" for c in checks]
    lines += [f"ERROR {e}" for e in errors]
    lines += ["```", "", f"Elapsed {budget.elapsed():.0f} s of a {args.budget_s:.0f} s budget."]
    out.emit(lines)
    out.record({"type": "summary", "checks": checks, "errors": errors, "elapsed_s": budget.elapsed()})
    md = out.write_md()
    if md:
        log(f"# wrote {out.path} and {md}")
    return 1 if errors else 0


def _split_decode(name: str) -> Tuple[str, int, str]:
    """``"decode int4 g64 batch 1 compiled"`` -> ("int4 g64", 1, "compiled")."""
    words = name.split()
    i = words.index("batch")
    return " ".join(words[1:i]), int(words[i + 1]), words[i + 2]


if __name__ == "__main__":
    sys.exit(main())
