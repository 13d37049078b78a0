"""Low-rank compensation benchmark: SmolLM2 perplexity of 3-bit RTN with and without a rank-r
correction of the quantization error (``QuantLowRank``).

Rows (every Linear of the blocks; ``lm_head``, tied to the embeddings, stays dense):

* fp32 baseline;
* RTN int3 g64;
* RTN int3 g64 + rank-``r`` compensation, plain (truncated SVD of ``W - deq(Q)``);
* RTN int3 g64 + rank-``r`` compensation, activation-aware (whitened by the calibration Hessian).

Each row reports perplexity and the stored bits per weight of the targeted layers (``memory_report``:
codes, scales and zero points, plus the bfloat16 factors). Perplexity protocol, evaluation text and
calibration windows are those of ``bench_models.py`` (its ``read_text`` / ``calibration_batches``);
calibration forwards run in bfloat16. Check: at rank 32 the ppl increase over fp32 is at least 25%
smaller with compensation than without (one line per variant).

Output: ``benchmarks/results/compensation.jsonl`` and a markdown table on stdout.
Usage: ``python benchmarks/bench_compensation.py [--quick] [--rank 32]``.
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
from llmopt import RTN, evaluate  # noqa: E402
from llmopt.methods.lowrank.compensation import QuantLowRank  # noqa: E402

from bench_models import load_smollm2_quality  # noqa: E402

RESULTS = os.path.join(HERE, "results")
EXCLUDE = ["lm_head"]
FORMAT, GROUP = "int3", 64
CHECK_RANK = 32
CHECK_FRACTION = 0.75  # compensated increase <= 75% of RTN's: "at least 25% smaller"


def settings(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(eval_tokens=1024, window=512, calib_samples=4, calib_len=128)
    return dict(eval_tokens=4096, window=1024, calib_samples=16, calib_len=256)


def target_bits(model: nn.Module) -> float:
    """Stored bits per weight of the targeted layers (weights only, bias excluded), from memory_report."""
    rows = [row for row in llmopt.memory_report(model).layers if row.name.split(".")[-1] not in EXCLUDE]
    weights = sum(row.num_weights for row in rows)
    return sum(row.bits_per_weight * row.num_weights for row in rows) / weights


def run_row(base: nn.Module, name: str, config, calibration, cfg) -> Dict[str, Any]:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    calib = calibration if config.needs_calibration else None
    report = llmopt.compress_(model, config, exclude=EXCLUDE, calibration=calib,
                              calibration_dtype=torch.bfloat16 if calib else None)
    apply_s = time.perf_counter() - start
    ppl = evaluate.perplexity(model, cfg["eval_ids"], window=cfg["window"], progress=False)
    record = {"row": name, "label": config.label(), "config": config.to_dict(), "ppl": ppl["ppl"],
              "ppl_tokens": ppl["tokens_scored"], "bits_per_weight": target_bits(model),
              "layers": len(report.replaced), "stored_bytes": report.bytes_after, "apply_s": apply_s}
    del model
    gc.collect()
    return record


def markdown(records: List[Dict[str, Any]], header: Dict[str, Any], checks: List[str]) -> str:
    baseline = records[0]["ppl"]
    lines = [f"# Low-rank compensation benchmark ({header['date']}, {header['profile']})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("date", "profile")]
    lines += ["", "| row | bits/weight | ppl | increase over fp32 | apply s |", "|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {r['ppl'] - baseline:+.2f} "
                     f"| {r.get('apply_s', 0.0):.0f} |")
    lines += ["", "Checks:"] + [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer evaluation and calibration tokens")
    parser.add_argument("--rank", type=int, default=CHECK_RANK, help="rank of the correction")
    parser.add_argument("--out", default=os.path.join(RESULTS, "compensation.jsonl"))
    args = parser.parse_args(argv)
    cfg = settings(args.quick)
    torch.manual_seed(0)
    started = time.perf_counter()
    base, tokenizer, info, calibration = load_smollm2_quality(cfg)
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "profile": "quick" if args.quick else "full",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info().describe(), "cpu_model": cpu_info().model,
        "model": info.get("path", "smollm2"),
        "perplexity protocol": f"benchmarks/data/eval.txt, first {cfg['eval_tokens']} tokens, "
                               f"windows of {cfg['window']}, float32 model and activations",
        "calibration": f"{len(calibration)} x {cfg['calib_len']} tokens of benchmarks/data/calib.txt, bfloat16 "
                       "forwards, float propagation (activation-aware row only)",
        "targets": "every Linear of the blocks (lm_head excluded); bits/weight of those layers, factors in "
                   "bfloat16 counted",
    }
    rows = [
        ("rtn", RTN(FORMAT, GROUP)),
        ("plain", QuantLowRank(FORMAT, GROUP, rank=args.rank)),
        ("whitened", QuantLowRank(FORMAT, GROUP, rank=args.rank, activation_aware=True)),
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    records: List[Dict[str, Any]] = []
    with open(args.out, "w") as out:
        out.write(json.dumps({"type": "header", **header}) + "\n")
        start = time.perf_counter()
        ppl = evaluate.perplexity(base, cfg["eval_ids"], window=cfg["window"], progress=False)
        fp32 = {"row": "fp32", "label": "fp32", "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens_scored"],
                "bits_per_weight": target_bits(base), "apply_s": 0.0, "eval_s": time.perf_counter() - start}
        records.append(fp32)
        out.write(json.dumps({"type": "row", **fp32}) + "\n")
        print(f"  {'fp32':<40} ppl {fp32['ppl']:10.2f}  bits/w {fp32['bits_per_weight']:6.3f}", flush=True)
        for name, config in rows:
            record = run_row(base, name, config, calibration, cfg)
            records.append(record)
            out.write(json.dumps({"type": "row", **record}) + "\n")
            out.flush()
            print(f"  {record['label']:<40} ppl {record['ppl']:10.2f}  bits/w {record['bits_per_weight']:6.3f}  "
                  f"({record['apply_s']:.0f} s)", flush=True)
        keyed = {r["row"]: r for r in records}
        d_rtn = keyed["rtn"]["ppl"] - fp32["ppl"]
        checks = []
        for variant in ("plain", "whitened"):
            d = keyed[variant]["ppl"] - fp32["ppl"]
            if args.rank != CHECK_RANK:
                checks.append(f"{variant}: not checked (rank {args.rank}, the check is at rank {CHECK_RANK})")
                continue
            verdict = "PASS" if d <= CHECK_FRACTION * d_rtn else "MISS"
            checks.append(f"low-rank compensation at rank {CHECK_RANK} on 3-bit ({variant}): ppl increase at least "
                          f"25% smaller than without: {verdict} ({d:+.2f} vs RTN {d_rtn:+.2f}, "
                          f"{1 - d / d_rtn:.0%} smaller)")
        out.write(json.dumps({"type": "checks", "checks": checks}) + "\n")
    header["elapsed"] = f"{time.perf_counter() - started:.0f} s"
    print("\n" + markdown(records, header, checks))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
