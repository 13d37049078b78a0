"""Compiled decode speed: eager vs ``torch.compile`` batch-1 greedy decoding, int4 and bf16 dense.

Model: ``llmopt.models.speed_model("1b")`` (TinyLlama shapes, random weights) cast to bfloat16; the
int4 variant is the same model after ``compress_(model, RTN(format="int4", group_size=64),
exclude=["lm_head"])`` (kernel ``int4pack_cpu``, bf16 activations; lm_head stays bf16).

For each of the two models, three decoders run side by side (:class:`llmopt.evaluate.DecodeRunner`):

* ``eager``: the ordinary growing KV cache, the protocol of ``evaluate.decode_throughput`` and
  ``bench_models.py``;
* ``eager static``: the same eager model on a ``StaticCache`` (the compiled decoder's protocol, eager);
* ``compiled``: ``torch.compile(decode_step, fullgraph=True, dynamic=False)`` on the ``StaticCache``:
  one graph for every token, compiled during the untimed warm-up (its time is reported).

Each decoder is warmed up, then ``--rounds`` rounds each time every decoder once, in turn (so a change
of machine load hits all alike); tokens/s are medians over the rounds of ``new_tokens - 1`` decode steps
(prefill excluded). Check: compiled int4 >= 1.3x eager int4, against the faster of the two eager
protocols. Also measured between rounds: the weight matmuls alone (every Linear / QuantLinear on one
token, back to back), the floor no decoder can go below without faster kernels; eager step / floor is
the most compilation could gain. And the bytes of weights a step must read against the machine's
read bandwidth (``torch.sum`` over 1 GiB): a bound no decoder can beat at batch 1. ``--profile`` adds a torch.profiler breakdown of one eager and one compiled int4 step
(where the time goes: the int4 matmuls and the bf16 lm_head against everything else).

Output: ``benchmarks/results/compile.{md,jsonl}`` (also printed).
Usage: ``python benchmarks/bench_compile.py [--size 1b|tiny] [--rounds 5] [--new-tokens 64]
[--threads N] [--profile] [--cpp-wrapper] [--keep-module-guards]``. ``--size tiny``: a quick check of the
script (seconds of decoding; its ratio is overhead-bound and says nothing about the 1b target).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import llmopt  # noqa: E402
from llmopt.core.cpu import cpu_info  # noqa: E402
from llmopt.evaluate import DecodeRunner  # noqa: E402
from llmopt.kernels.int4_cpu import int4_kernel_group  # noqa: E402
from llmopt.models import speed_model  # noqa: E402

from timing import _LoadProbe, measure_read_bandwidth, profile_decode, weight_bytes_per_step  # noqa: E402

RESULTS = os.path.join(HERE, "results")
TARGET = 1.3
DECODERS = ("eager", "eager static", "compiled")


def make_runners(model: torch.nn.Module, args: argparse.Namespace) -> Dict[str, DecodeRunner]:
    common = dict(prompt_tokens=args.prompt, new_tokens=args.new_tokens)
    options = {"cpp_wrapper": True} if args.cpp_wrapper else None
    return {
        "eager": DecodeRunner(model, compile=False, cache="dynamic", **common),
        "eager static": DecodeRunner(model, compile=False, cache="static", **common),
        "compiled": DecodeRunner(model, compile=True, options=options,
                                 skip_module_guards=not args.keep_module_guards, **common),
    }


def measure(label: str, model: torch.nn.Module, args: argparse.Namespace, out) -> Dict[str, Any]:
    """Warm up the three decoders of ``model`` (compiling one), then interleaved timed rounds."""
    runners = make_runners(model, args)
    warm: Dict[str, float] = {}
    for name, runner in runners.items():
        start = time.perf_counter()
        runner.warm_up()
        warm[name] = time.perf_counter() - start
        print(f"  {label} {name}: warm-up {warm[name]:.1f} s"
              + (f" (first step, compile included: {runner.compile_s:.1f} s)" if runner.compiled else ""),
              flush=True)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    seconds: Dict[str, List[float]] = {name: [] for name in runners}
    tokens: Dict[str, List[int]] = {}
    floors: List[float] = []
    probe = _LoadProbe().start()
    for _ in range(args.rounds):
        for name, runner in runners.items():
            run = runner.run()
            seconds[name].append(run["seconds"])
            tokens[name] = run["tokens"]
        floors.append(matmul_floor_ms(model))
    foreign = probe.stop()
    steps = args.new_tokens - 1
    tps = {name: steps / statistics.median(v) for name, v in seconds.items()}
    # Greedy tokens of the compiled decoder against the eager decoder on the same (static) cache. A random
    # model's logits are nearly tied, so one bf16 rounding difference can change a token and all after it.
    same = {name: sum(a == b for a, b in zip(tokens[name], tokens["eager static"])) / len(tokens["eager static"])
            for name in runners}
    row = {"type": "row", "model": label, "tokens_per_s": tps,
           "ms_per_step": {k: 1000 / v for k, v in tps.items()},
           "compiled_vs_eager": tps["compiled"] / tps["eager"],
           "compiled_vs_eager_static": tps["compiled"] / tps["eager static"],
           "compiled_vs_best_eager": tps["compiled"] / max(tps["eager"], tps["eager static"]),
           "weight_bytes_per_step": weight_bytes_per_step(model),
           "achieved_gbps": {k: weight_bytes_per_step(model) * v / 1e9 for k, v in tps.items()},
           "matmul_floor_ms": statistics.median(floors),
           "ceiling_vs_best_eager": statistics.median(floors) and
           (1000 / max(tps["eager"], tps["eager static"])) / statistics.median(floors),
           "compile_s": runners["compiled"].compile_s, "warm_up_s": warm,
           "recompiles_while_timed": counters["stats"]["unique_graphs"] - graphs_before,
           "same_tokens_as_eager_static": same, "foreign_cpus": foreign, "rounds": args.rounds,
           "times_s": seconds}
    if args.profile and label.startswith("int4"):
        row["profile"] = {name: profile_step(runners[name]) for name in ("eager static", "compiled")}
    out.write(json.dumps(row) + "\n")
    out.flush()
    print(f"  {label}: " + ", ".join(f"{k} {v:.2f} tok/s" for k, v in tps.items())
          + f"; compiled/eager {row['compiled_vs_eager']:.2f}x, compiled/eager static "
          f"{row['compiled_vs_eager_static']:.2f}x", flush=True)
    del runners
    return row


def matmul_floor_ms(model: torch.nn.Module, repeats: int = 7) -> float:
    """Milliseconds per decode step spent in the weight matmuls alone: every Linear / QuantLinear of the
    model applied to one bf16 token, back to back (the int4 layers call the aten kernel directly). No
    decoder, eager or compiled, can beat this without faster matmul kernels."""
    calls = []
    for module in model.modules():
        if isinstance(module, llmopt.nn.QuantLinear) and module.kernel.name == "int4pack_cpu":
            x = torch.randn(1, module.num_groups * module.group_size, dtype=torch.bfloat16)
            args = (x, module._buffers["qdata"], int4_kernel_group(module.group_size),
                    module._buffers["scale_and_zero"])
            calls.append((torch.ops.aten._weight_int4pack_mm_for_cpu, args))
        elif isinstance(module, llmopt.nn.QuantLinear):
            x = torch.randn(1, module.in_features, dtype=torch.bfloat16)
            calls.append((module.kernel.forward, (module.kernel_spec, module._buffers, x, module.bias)))
        elif isinstance(module, torch.nn.Linear):
            x = torch.randn(1, module.in_features, dtype=module.weight.dtype)
            calls.append((torch.nn.functional.linear, (x, module.weight, module.bias)))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for fn, args in calls:
                fn(*args)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def profile_step(runner: DecodeRunner, steps: int = 6) -> Dict[str, Any]:
    """torch.profiler over ``steps`` decode steps: ms per step in the weight matmuls vs the rest."""
    events, step_ms = profile_decode(runner, steps)
    ops = {e.key: e.self_cpu_time_total / 1000 / steps for e in events}
    int4 = ops.get("aten::_weight_int4pack_mm_for_cpu", 0.0)
    dense = ops.get("aten::mm", 0.0) + ops.get("aten::addmm", 0.0)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:10]
    return {"ms_per_step": step_ms, "int4_mm_ms": int4, "dense_mm_ms": dense,
            "other_ms": step_ms - int4 - dense, "top_self_ms": top}


def markdown(header: Dict[str, Any], rows: List[Dict[str, Any]], checks: List[str]) -> str:
    lines = [f"# Compiled decode benchmark ({header['date']}, {header['size']})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("date", "size")]
    lines += ["", f"| speed_model({header['size']!r}) | eager tok/s | eager static tok/s | compiled tok/s "
              "| compiled / eager | compiled / eager static | compile s | same greedy tokens as eager static "
              "| matmuls alone ms/step | ceiling (best eager / matmuls) | weight MB/step | eager / compiled GB/s "
              "| other CPUs busy |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["tokens_per_s"]
        foreign = f"{r['foreign_cpus']:.2f}" if r["foreign_cpus"] is not None else "?"
        lines.append(f"| {r['model']} | {t['eager']:.2f} | {t['eager static']:.2f} | {t['compiled']:.2f} | "
                     f"{r['compiled_vs_eager']:.2f}x | {r['compiled_vs_eager_static']:.2f}x | "
                     f"{r['compile_s']:.1f} | {r['same_tokens_as_eager_static']['compiled']:.0%} | "
                     f"{r['matmul_floor_ms']:.1f} | {r['ceiling_vs_best_eager']:.2f}x | "
                     f"{r['weight_bytes_per_step'] / 1e6:.0f} | {r['achieved_gbps']['eager']:.1f} / "
                     f"{r['achieved_gbps']['compiled']:.1f} | {foreign} |")
    for r in rows:
        if "profile" not in r:
            continue
        lines += ["", f"Where a decode step's time goes ({r['model']}, torch.profiler, ms per step):", "",
                  "| decoder | step | int4 matmuls | bf16 matmuls (lm_head) | everything else |",
                  "|---|---:|---:|---:|---:|"]
        for name, p in r["profile"].items():
            lines.append(f"| {name} | {p['ms_per_step']:.1f} | {p['int4_mm_ms']:.1f} | {p['dense_mm_ms']:.1f} | "
                         f"{p['other_ms']:.1f} |")
        for name, p in r["profile"].items():
            lines += ["", f"Top self-CPU ops, {name} (ms per step): "
                      + "; ".join(f"`{k}` {v:.2f}" for k, v in p["top_self_ms"][:8])]
    lines += ["", "Checks:"] + [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b", choices=["1b", "tiny"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 (1b), 32 (tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--models", default="bf16,int4", help="comma list of bf16, int4")
    parser.add_argument("--profile", action="store_true", help="profile one eager and one compiled int4 step")
    parser.add_argument("--cpp-wrapper", action="store_true", help="inductor cpp_wrapper (slower compile)")
    parser.add_argument("--keep-module-guards", action="store_true",
                        help="check dynamo's guards on module attributes every step (default: skipped with "
                             "torch.compiler.skip_guard_on_all_nn_modules_unsafe; the modules never change here)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "compile.jsonl"))
    args = parser.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 64 if args.size == "1b" else 32
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "size": args.size, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": cpu_info().describe(), "cpu_model": cpu_info().model,
              "decode": f"batch 1, prompt {args.prompt}, {args.new_tokens} new tokens (greedy), "
                        f"{args.rounds} interleaved rounds, medians",
              "compile": "torch.compile(decode_step, fullgraph=True, dynamic=False), StaticCache"
                         + (", cpp_wrapper" if args.cpp_wrapper else "")
                         + (", module guards skipped" if not args.keep_module_guards else ""),
              "int4": "compress_(RTN(format='int4', group_size=64), exclude=['lm_head']), kernel int4pack_cpu"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    started = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    with open(args.out, "w") as out:
        out.write(json.dumps({"type": "header", **header}) + "\n")
        bandwidth = measure_read_bandwidth(size_mib=1024 if args.size == "1b" else 256)
        header["read bandwidth"] = (f"{bandwidth['gbps']:.1f} GB/s (torch.sum over {bandwidth['size_mib']} MiB, "
                                    f"{torch.get_num_threads()} threads; other CPUs busy "
                                    f"{bandwidth['foreign_cpus'] or 0:.2f})")
        print(f"  read bandwidth {bandwidth['gbps']:.1f} GB/s", flush=True)
        args.bandwidth_gbps = bandwidth["gbps"]
        model = speed_model(args.size, dtype=torch.bfloat16)
        if "bf16" in models:
            rows.append(measure("bf16 dense", model, args, out))
            torch._dynamo.reset()  # drop the graphs (and guards) that reference the dense weights
            gc.collect()
        if "int4" in models:
            start = time.perf_counter()
            llmopt.compress_(model, llmopt.RTN(format="int4", group_size=64), exclude=["lm_head"])
            kernels = sorted({m.kernel.name for m in model.modules() if isinstance(m, llmopt.nn.QuantLinear)})
            header["int4"] += f" (quantized in {time.perf_counter() - start:.0f} s; kernels: {', '.join(kernels)})"
            rows.append(measure("int4 g64", model, args, out))
        checks = []
        for r in rows:
            if r["model"].startswith("int4"):
                ratio = r["compiled_vs_best_eager"]
                verdict = "PASS" if ratio >= TARGET else "MISS"
                note = "" if args.size == "1b" else " (tiny model: not the target measurement)"
                checks.append(f"compiled int4 decode >= {TARGET}x eager int4 (faster eager protocol): {verdict} "
                              f"({ratio:.2f}x; vs eager {r['compiled_vs_eager']:.2f}x, vs eager static "
                              f"{r['compiled_vs_eager_static']:.2f}x){note}")
                best_eager_ms = 1000 / max(r["tokens_per_s"]["eager"], r["tokens_per_s"]["eager static"])
                bytes_ms = r["weight_bytes_per_step"] / 1e9 / args.bandwidth_gbps * 1000
                checks.append(f"int4 step reads >= {r['weight_bytes_per_step'] / 1e6:.0f} MB of weights: "
                              f"{bytes_ms:.1f} ms at the measured {args.bandwidth_gbps:.1f} GB/s; eager runs at "
                              f"{max(r['achieved_gbps']['eager'], r['achieved_gbps']['eager static']):.1f} GB/s, "
                              f"compiled at {r['achieved_gbps']['compiled']:.1f} GB/s; bandwidth bound on any "
                              f"speed-up over the faster eager: {best_eager_ms / bytes_ms:.2f}x")
                checks.append(f"int4 weight matmuls alone: {r['matmul_floor_ms']:.1f} ms of the faster eager step's "
                              f"{best_eager_ms:.1f} ms ({r['matmul_floor_ms'] / best_eager_ms:.0%}): removing all "
                              f"other work would give at most {r['ceiling_vs_best_eager']:.2f}x; compiled step "
                              f"{1000 / r['tokens_per_s']['compiled']:.1f} ms")
            if r["recompiles_while_timed"]:
                checks.append(f"{r['model']}: {r['recompiles_while_timed']} recompiles during the timed runs")
        header["elapsed"] = f"{time.perf_counter() - started:.0f} s"
        text = markdown(header, rows, checks)
        out.write(json.dumps({"type": "checks", "checks": checks, "elapsed_s": time.perf_counter() - started}) + "\n")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
