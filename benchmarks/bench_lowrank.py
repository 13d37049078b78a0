"""Low-rank benchmark: perplexity of SmolLM2 after plain vs activation-aware (whitened) SVD.

For each ratio of Linear parameters removed (``lm_head`` excluded), four rows:

* plain SVD / whitened SVD (SVD-LLM), and for each
* **uniform** allocation (every layer loses the same fraction: ``SVD(param_ratio=...)``) and
  **global** allocation (one model-wide budget spent where it buys the most, ``plan_ranks`` then
  ``SVD(ranks=plan)``),

plus the fp32 baseline. Perplexity protocol, evaluation text and calibration windows are those of
``bench_models.py`` (its ``read_text`` / ``calibration_batches``); calibration runs in bfloat16 as
there. Check: the whitened ppl increase at 20% is at most 1/3 of plain SVD's (per allocation).

Output: ``benchmarks/results/lowrank.jsonl`` and a markdown table on stdout.
Usage: ``python benchmarks/bench_lowrank.py [--quick] [--ratios 0.1,0.2,0.3]``.
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
import torch.nn as nn  # noqa: E402

import llmopt  # noqa: E402
from llmopt.core.cpu import cpu_info  # noqa: E402
from llmopt import SVD, evaluate  # noqa: E402
from llmopt.methods.lowrank import plan_ranks  # noqa: E402

from bench_models import load_smollm2_quality  # noqa: E402

RESULTS = os.path.join(HERE, "results")
EXCLUDE = ["lm_head"]
CHECK_RATIO = 0.2


def settings(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(eval_tokens=1024, window=512, calib_samples=4, calib_len=128)
    return dict(eval_tokens=4096, window=1024, calib_samples=16, calib_len=256)


def linear_params(model: nn.Module) -> int:
    """Weights of the targeted layers as they are now (dense Linears, or both factors of a LowRankLinear)."""
    total = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] in EXCLUDE or getattr(module, "llmopt_lowrank_factor", None):
            continue
        if isinstance(module, llmopt.nn.LowRankLinear):
            total += module.rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
    return total


def run_row(base: nn.Module, method: str, allocation: str, ratio: float, calibration, cfg) -> Dict[str, Any]:
    aware = method == "whiten"
    model = copy.deepcopy(base)
    before = linear_params(model)
    start = time.perf_counter()
    calib = calibration if aware else None
    if allocation == "global":
        plan = plan_ranks(model, ratio, exclude=EXCLUDE, calibration=calib, activation_aware=aware,
                          calibration_dtype=torch.bfloat16 if aware else None)
        config = SVD(ranks=plan, activation_aware=aware)
    else:
        config = SVD(param_ratio=ratio, activation_aware=aware)
    report = llmopt.compress_(model, config, exclude=EXCLUDE, calibration=calib,
                              calibration_dtype=torch.bfloat16 if aware else None)
    apply_s = time.perf_counter() - start
    removed = 1 - linear_params(model) / before
    ppl = evaluate.perplexity(model, cfg["eval_ids"], window=cfg["window"], progress=False)
    record = {"method": method, "allocation": allocation, "param_ratio": ratio, "params_removed": removed,
              "layers_factorized": len(report.replaced), "layers_dense": len(report.skipped),
              "label": config.label() if allocation == "uniform" else f"svd global {ratio:.0%} "
                       + ("whitened" if aware else "plain"),
              "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens_scored"], "apply_s": apply_s}
    del model
    gc.collect()
    return record


def markdown(baseline: float, records: List[Dict[str, Any]], header: Dict[str, Any], checks: List[str]) -> str:
    lines = [f"# Low-rank benchmark ({header['date']}, {header['profile']})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("date", "profile")]
    lines += ["", f"fp32 baseline ppl: **{baseline:.2f}**", "",
              "| params removed | allocation | plain ppl | whitened ppl | plain increase | whitened increase "
              "| dense layers (plain / whitened) | apply s (plain / whitened) |",
              "|---:|---|---:|---:|---:|---:|---|---|"]
    keyed = {(r["param_ratio"], r["allocation"], r["method"]): r for r in records}
    for ratio in sorted({r["param_ratio"] for r in records}):
        for allocation in ("uniform", "global"):
            plain, white = keyed.get((ratio, allocation, "plain")), keyed.get((ratio, allocation, "whiten"))
            if plain is None or white is None:
                continue
            lines.append(
                f"| {ratio:.0%} (actual {plain['params_removed']:.1%} / {white['params_removed']:.1%}) | {allocation} "
                f"| {plain['ppl']:.2f} | {white['ppl']:.2f} | {plain['ppl'] - baseline:+.2f} "
                f"| {white['ppl'] - baseline:+.2f} | {plain['layers_dense']} / {white['layers_dense']} "
                f"| {plain['apply_s']:.0f} / {white['apply_s']:.0f} |")
    lines += ["", "Checks:"] + [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer evaluation and calibration tokens")
    parser.add_argument("--ratios", default="0.1,0.2,0.3", help="comma list of parameter ratios to remove")
    parser.add_argument("--out", default=os.path.join(RESULTS, "lowrank.jsonl"))
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    cfg = settings(args.quick)
    torch.manual_seed(0)
    started = time.perf_counter()
    base, tokenizer, info, calibration = load_smollm2_quality(cfg)
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "profile": "quick" if args.quick else "full",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info().describe(), "cpu_model": cpu_info().model,
        "model": info.get("path", "smollm2"),
        "perplexity protocol": f"benchmarks/data/eval.txt, first {cfg['eval_tokens']} tokens, "
                               f"windows of {cfg['window']}",
        "calibration": f"{len(calibration)} x {cfg['calib_len']} tokens of benchmarks/data/calib.txt, bfloat16 "
                       "forwards, float propagation (whitened rows only)",
        "targets": "every Linear of the blocks (lm_head excluded); factors stay float32",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    records: List[Dict[str, Any]] = []
    with open(args.out, "w") as out:
        out.write(json.dumps({"type": "header", **header}) + "\n")
        ppl = evaluate.perplexity(base, cfg["eval_ids"], window=cfg["window"], progress=False)
        baseline = ppl["ppl"]
        out.write(json.dumps({"type": "row", "method": "fp32", "ppl": baseline, "ppl_tokens": ppl["tokens_scored"]})
                  + "\n")
        print(f"fp32: ppl {baseline:.2f}", flush=True)
        for ratio in ratios:
            for allocation in ("uniform", "global"):
                for method in ("plain", "whiten"):
                    record = run_row(base, method, allocation, ratio, calibration, cfg)
                    records.append(record)
                    out.write(json.dumps({"type": "row", **record}) + "\n")
                    out.flush()
                    print(f"  {record['label']:<34} ppl {record['ppl']:10.2f}  removed {record['params_removed']:.1%}  "
                          f"dense layers {record['layers_dense']}  ({record['apply_s']:.0f} s)", flush=True)
        checks = []
        keyed = {(r["param_ratio"], r["allocation"], r["method"]): r for r in records}
        for allocation in ("uniform", "global"):
            plain, white = keyed.get((CHECK_RATIO, allocation, "plain")), keyed.get((CHECK_RATIO, allocation, "whiten"))
            if plain is None or white is None:
                checks.append(f"{allocation}: not measured (ratio {CHECK_RATIO} not in --ratios)")
                continue
            d_plain, d_white = plain["ppl"] - baseline, white["ppl"] - baseline
            verdict = "PASS" if d_white <= d_plain / 3 else "MISS"
            checks.append(f"activation-aware ppl increase <= 1/3 of plain SVD's at {CHECK_RATIO:.0%} ({allocation}): "
                          f"{verdict} (whitened {d_white:+.2f}, plain {d_plain:+.2f})")
        out.write(json.dumps({"type": "checks", "checks": checks}) + "\n")
    header["elapsed"] = f"{time.perf_counter() - started:.0f} s"
    print("\n" + markdown(baseline, records, header, checks))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
