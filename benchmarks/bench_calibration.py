"""Time and memory to quantize SmolLM2-135M with each method, at the issue's calibration size.

Protocol: 128 calibration sequences of 512 tokens from ``benchmarks/data/calib.txt`` (the file holds
~56k tokens, so consecutive windows overlap by ~14%: content does not change the timing), every
``nn.Linear`` of the 30 blocks quantized (``lm_head`` kept dense, as in ``bench_models.py``), on this
machine's CPU threads. Each method runs on a fresh copy of the float32 model and is timed end to end
(``compress_`` wall time, calibration forwards included). Peak memory is the process's RSS
high-water mark during ``compress_`` minus the RSS when it started, plus the model's own float bytes;
the budget is ``model + 2 x one block's hidden states for all calibration tokens``, + 20%. Each
calibrated method first runs once on two 64-token sequences (not measured), so one-time library
initialisation (oneDNN kernel caches, allocator pools) is not counted as calibration memory.

Usage: ``python benchmarks/bench_calibration.py [--samples 128 --length 512] [--methods rtn,hqq,gptq,awq,sq]
[--dtype bfloat16|float32] [--ppl]``. Writes ``benchmarks/results/calibration.jsonl`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import llmopt  # noqa: E402
from llmopt.core.cpu import cpu_info  # noqa: E402
from llmopt import evaluate  # noqa: E402
from llmopt.models import load_causal_lm  # noqa: E402

from bench_models import read_text  # noqa: E402

RESULTS = os.path.join(HERE, "results")

# name -> (config, issue time target in seconds)
METHODS = {
    "rtn": (llmopt.RTN("int4", 64), 2.0),
    "hqq": (llmopt.HQQ("int4", 64, round_zero=True), 15.0),
    "gptq": (llmopt.GPTQ("int4", 64, act_order=True), 120.0),
    "gptq-float": (llmopt.GPTQ("int4", 64, act_order=True, propagate="float"), 120.0),
    "awq": (llmopt.AWQ("int4", 64), 120.0),
    "sq": (llmopt.SmoothQuant(alpha=0.5), None),
}


def calibration_windows(tokenizer, samples: int, length: int) -> List[torch.Tensor]:
    """``samples`` windows of ``length`` tokens spread evenly over calib.txt (overlapping if needed)."""
    ids = tokenizer(read_text("calib.txt"), return_tensors="pt").input_ids[0]
    if ids.numel() < length:
        raise ValueError(f"calib.txt has {ids.numel()} tokens, fewer than one window of {length}")
    last = ids.numel() - length
    starts = [round(i * last / max(samples - 1, 1)) for i in range(samples)]
    return [ids[s:s + length].unsqueeze(0) for s in starts]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="sequences per calibration batch (same data, fewer "
                   "and larger forwards)")
    p.add_argument("--methods", default="rtn,hqq,gptq,awq,sq")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the calibration forwards (compress_(calibration_dtype=...))")
    p.add_argument("--ppl", action="store_true", help="also measure perplexity (eval.txt, 4096 tokens)")
    p.add_argument("--out", default=os.path.join(RESULTS, "calibration.jsonl"))
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    calib_dtype = getattr(torch, args.dtype)

    base, tokenizer, info = load_causal_lm("smollm2", dtype=torch.float32)
    base.eval()
    windows = calibration_windows(tokenizer, args.samples, args.length)
    batches = [torch.cat(windows[i:i + args.batch]) for i in range(0, len(windows), args.batch)]
    eval_ids = tokenizer(read_text("eval.txt"), return_tensors="pt").input_ids[0][:4096] if args.ppl else None
    unique = {t.data_ptr(): t for t in list(base.parameters()) + list(base.buffers())}  # tied head once
    model_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    hidden = base.config.hidden_size
    tokens = args.samples * args.length
    block_act_bytes = tokens * hidden * torch.empty((), dtype=calib_dtype).element_size()
    budget = 1.2 * (model_bytes + 2 * block_act_bytes)
    header = {"type": "header", "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
              "cpu": cpu_info().describe(), "cpu_model": cpu_info().model,
              "threads": torch.get_num_threads(), "samples": args.samples, "length": args.length,
              "batch": args.batch,
              "calibration_dtype": args.dtype, "model_mib": model_bytes / 2**20,
              "block_activations_mib": block_act_bytes / 2**20, "memory_budget_mib": budget / 2**20}
    print(json.dumps(header), flush=True)
    records: List[Dict[str, Any]] = []
    with open(args.out, "w") as out:
        out.write(json.dumps(header) + "\n")
        for key in args.methods.split(","):
            cfg, target = METHODS[key.strip()]
            if cfg.needs_calibration:
                # Warm-up outside the measurement: one-time library costs (kernel caches, thread pools,
                # first-use allocations) are not calibration memory. Two short sequences, discarded.
                warm = copy.deepcopy(base)
                llmopt.compress_(warm, cfg, exclude=["lm_head"], calibration=[w[:, :64] for w in windows[:2]],
                                 calibration_dtype=calib_dtype)
                del warm
            model = copy.deepcopy(base)
            gc.collect()
            with evaluate.PeakMemory() as peak, evaluate.timed() as t:
                report = llmopt.compress_(model, cfg, exclude=["lm_head"],
                                          calibration=batches if cfg.needs_calibration else None,
                                          calibration_dtype=calib_dtype if cfg.needs_calibration else None)
            mem = peak.to_dict()
            extra_mib = mem["peak_rss_mib"] - mem["start_rss_mib"]
            rec: Dict[str, Any] = {
                "type": "row", "method": cfg.label(), "seconds": t["seconds"], "target_s": target,
                "time_ok": None if target is None else t["seconds"] <= target,
                "peak_extra_rss_mib": extra_mib, "peak_reset": mem["peak_reset"],
                "peak_model_plus_extra_mib": model_bytes / 2**20 + extra_mib,
                "memory_ok": (model_bytes + extra_mib * 2**20) <= budget if cfg.needs_calibration else None,
                "layers": len(report.replaced), "rescaled": len(report.rescaled),
            }
            if eval_ids is not None:
                model.to(torch.bfloat16)
                with torch.inference_mode():
                    rec["ppl"] = evaluate.perplexity(model, eval_ids, window=1024, progress=False)["ppl"]
            records.append(rec)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(json.dumps(rec), flush=True)
            del model
            gc.collect()
    lines = [f"# Calibration time and memory (SmolLM2-135M, {args.samples} x {args.length} tokens in batches of "
             f"{args.batch}, "
             f"{args.dtype} forwards, {torch.get_num_threads()} threads)", "",
             f"Model {model_bytes / 2**20:.0f} MiB; one block's hidden states for all tokens "
             f"{block_act_bytes / 2**20:.0f} MiB; memory budget (model + 2 blocks) x 1.2 = {budget / 2**20:.0f} MiB.",
             "", "| method | seconds | target | peak (model + extra RSS) MiB | memory | ppl |",
             "|---|---:|---:|---:|---|---:|"]
    for r in records:
        target = "-" if r["target_s"] is None else f"<= {r['target_s']:.0f} s " + ("PASS" if r["time_ok"] else "MISS")
        memory = "-" if r["memory_ok"] is None else ("PASS" if r["memory_ok"] else "MISS")
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        lines.append(f"| {r['method']} | {r['seconds']:.1f} | {target} | {r['peak_model_plus_extra_mib']:.0f} | "
                     f"{memory} | {ppl} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
