"""Pruning benchmark: perplexity of SmolLM2-135M after magnitude, Wanda and SparseGPT pruning.

Rows: the fp32 baseline; magnitude / Wanda / SparseGPT at 50% unstructured; the same three at 2:4;
SparseGPT 50% + int4 g64 (joint sparsity and quantization in one sweep). Every ``nn.Linear`` of the
30 blocks is pruned (``lm_head``, tied to the embedding, stays dense). Float rows store the kept
values in bfloat16 (``value_dtype="bfloat16"``), so the bytes column compares like with like against
a dense bf16 model. Columns: ppl, increase over the baseline, stored bytes of the pruned Linears
(``memory_report``: values + mask / N:M indices (+ scales)) against the same Linears dense in
bf16, and seconds to prune (calibration included).

Protocol: evaluation text ``benchmarks/data/eval.txt`` (first 4096 tokens, windows of 1024, as
``bench_models.py``); calibration 32 windows of 256 tokens of ``benchmarks/data/calib.txt``,
forwards in bfloat16 (``calibration_dtype=torch.bfloat16``), each block calibrated on the outputs of
the already-pruned blocks (the methods' default ``propagate="quantized"``). ``--quick``: 8 x 128
calibration tokens, 1024 evaluation tokens in windows of 512 (a smoke run, numbers not comparable:
1024 calibration tokens are fewer than ``down_proj``'s 1536 inputs, so SparseGPT's Hessian is singular
and its weight update overfits; it measured worse than Wanda there, better with the full 8192).

Checks (printed PASS / MISS): at 50% unstructured, Wanda's ppl increase <= 0.3 x magnitude's;
SparseGPT's increase <= Wanda's; stored bytes of every 50% row <= 0.6 x dense bf16.

Output: ``benchmarks/results/pruning.jsonl`` and ``pruning.md`` (``--out`` changes the path).
Usage: ``python benchmarks/bench_pruning.py [--quick] [--rows magnitude-50,wanda-50,...]``.
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
from llmopt.core.measure import memory_report  # noqa: E402
from llmopt.methods.prune.magnitude import Magnitude  # noqa: E402
from llmopt.methods.prune.sparsegpt import SparseGPT  # noqa: E402
from llmopt.methods.prune.wanda import Wanda  # noqa: E402

from bench_models import load_smollm2_quality, write_markdown  # noqa: E402

RESULTS = os.path.join(HERE, "results")
EXCLUDE = ["lm_head"]
BF16 = "bfloat16"

# key -> config; the order is the table's
ROWS = {
    "magnitude-50": Magnitude(0.5, value_dtype=BF16),
    "wanda-50": Wanda(0.5, value_dtype=BF16),
    "sparsegpt-50": SparseGPT(0.5, value_dtype=BF16),
    "magnitude-2:4": Magnitude(pattern="2:4", value_dtype=BF16),
    "wanda-2:4": Wanda(pattern="2:4", value_dtype=BF16),
    "sparsegpt-2:4": SparseGPT(pattern="2:4", value_dtype=BF16),
    "sparsegpt-50-int4": SparseGPT(0.5, format="int4", group_size=64),
}


def settings(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(eval_tokens=1024, window=512, calib_samples=8, calib_len=128)
    return dict(eval_tokens=4096, window=1024, calib_samples=32, calib_len=256)


def linear_bytes(model: torch.nn.Module) -> Dict[str, int]:
    """Stored bytes of the targeted Linears (``lm_head`` excluded) and the same weights dense in bf16."""
    layers = [layer for layer in memory_report(model).layers if layer.name.split(".")[-1] not in EXCLUDE]
    return {"stored": sum(layer.stored_bytes for layer in layers),
            "dense_bf16": sum(2 * layer.num_weights for layer in layers), "layers": len(layers)}


def run_row(base: torch.nn.Module, key: str, calibration, cfg: Dict[str, Any]) -> Dict[str, Any]:
    config = ROWS[key]
    model = copy.deepcopy(base)
    start = time.perf_counter()
    report = llmopt.compress_(model, config, exclude=EXCLUDE,
                              calibration=calibration if config.needs_calibration else None,
                              calibration_dtype=torch.bfloat16 if config.needs_calibration else None)
    seconds = time.perf_counter() - start
    sizes = linear_bytes(model)
    sparsities = [m.sparsity() for m in model.modules() if hasattr(m, "sparsity") and hasattr(m, "mask")]
    ppl = evaluate.perplexity(model, cfg["eval_ids"], window=cfg["window"], progress=False)
    record = {"key": key, "label": config.label(), "config": config.to_dict(), "ppl": ppl["ppl"],
              "ppl_tokens": ppl["tokens_scored"], "seconds": seconds, "layers": len(report.replaced),
              "stored_bytes": sizes["stored"], "dense_bf16_bytes": sizes["dense_bf16"],
              "bytes_ratio": sizes["stored"] / sizes["dense_bf16"],
              "mean_sparsity": sum(sparsities) / len(sparsities) if sparsities else None}
    del model
    gc.collect()
    return record


def checks(baseline: float, records: List[Dict[str, Any]]) -> List[str]:
    by_key = {r["key"]: r for r in records}
    inc = {k: r["ppl"] - baseline for k, r in by_key.items()}
    out = []
    if {"magnitude-50", "wanda-50"} <= inc.keys():
        ok = inc["wanda-50"] <= 0.3 * inc["magnitude-50"]
        out.append(f"Wanda 50% ppl increase <= 0.3 x magnitude's: {'PASS' if ok else 'MISS'} "
                   f"(wanda {inc['wanda-50']:+.2f}, magnitude {inc['magnitude-50']:+.2f}, "
                   f"ratio {inc['wanda-50'] / inc['magnitude-50']:.3f})" if inc["magnitude-50"] else
                   "Wanda vs magnitude: magnitude's increase is 0, ratio undefined: MISS")
    else:
        out.append("Wanda vs magnitude at 50%: not measured")
    if {"wanda-50", "sparsegpt-50"} <= inc.keys():
        ok = inc["sparsegpt-50"] <= inc["wanda-50"]
        out.append(f"SparseGPT 50% ppl increase <= Wanda's: {'PASS' if ok else 'MISS'} "
                   f"(sparsegpt {inc['sparsegpt-50']:+.2f}, wanda {inc['wanda-50']:+.2f})")
    else:
        out.append("SparseGPT vs Wanda at 50%: not measured")
    for r in records:
        if r["key"].endswith("-50") or r["key"].endswith("-50-int4") or "2:4" in r["key"]:
            ok = r["bytes_ratio"] <= 0.6
            out.append(f"{r['label']}: stored bytes <= 0.6 x dense bf16: {'PASS' if ok else 'MISS'} "
                       f"({r['bytes_ratio']:.3f})")
    return out


def markdown(baseline: float, records: List[Dict[str, Any]], header: Dict[str, Any], check_lines: List[str]) -> str:
    lines = [f"# Pruning benchmark ({header['date']}, {header['profile']})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("date", "profile")]
    lines += ["", "| method | ppl | increase | Linear stored MiB | vs dense bf16 | seconds |",
              "|---|---:|---:|---:|---:|---:|",
              f"| fp32 baseline | {baseline:.2f} | - | - | - | - |"]
    for r in records:
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r['ppl'] - baseline:+.2f} | {r['stored_bytes'] / 2**20:.1f} "
                     f"| {r['bytes_ratio']:.3f}x | {r['seconds']:.0f} |")
    lines += ["", "Checks:"] + [f"- {c}" for c in check_lines]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 x 128 calibration tokens, 1024 evaluation tokens")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list out of {', '.join(ROWS)}")
    parser.add_argument("--out", default=os.path.join(RESULTS, "pruning.jsonl"))
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    cfg = settings(args.quick)
    torch.manual_seed(0)
    started = time.perf_counter()
    base, tokenizer, info, calibration = load_smollm2_quality(cfg)
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "profile": "quick" if args.quick else "full",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info().describe(), "cpu_model": cpu_info().model,
        "model": info.get("path", "smollm2"),
        "perplexity protocol": f"benchmarks/data/eval.txt, first {cfg['eval_tokens']} tokens, windows of "
                               f"{cfg['window']}",
        "calibration": f"{len(calibration)} x {cfg['calib_len']} tokens of benchmarks/data/calib.txt, bfloat16 "
                       "forwards, pruned-block propagation",
        "targets": "every Linear of the blocks (lm_head excluded); float rows keep bfloat16 values",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    records: List[Dict[str, Any]] = []
    with open(args.out, "w") as out:
        out.write(json.dumps({"type": "header", **header}) + "\n")
        ppl = evaluate.perplexity(base, cfg["eval_ids"], window=cfg["window"], progress=False)
        baseline = ppl["ppl"]
        out.write(json.dumps({"type": "row", "key": "fp32", "ppl": baseline, "ppl_tokens": ppl["tokens_scored"]})
                  + "\n")
        print(f"fp32: ppl {baseline:.2f}", flush=True)
        for key in keys:
            record = run_row(base, key, calibration, cfg)
            records.append(record)
            out.write(json.dumps({"type": "row", **record}) + "\n")
            out.flush()
            print(f"  {record['label']:<30} ppl {record['ppl']:9.2f} ({record['ppl'] - baseline:+.2f})  "
                  f"bytes {record['bytes_ratio']:.3f}x dense bf16  ({record['seconds']:.0f} s)", flush=True)
        check_lines = checks(baseline, records)
        out.write(json.dumps({"type": "checks", "checks": check_lines}) + "\n")
    header["elapsed"] = f"{time.perf_counter() - started:.0f} s"
    text = markdown(baseline, records, header, check_lines)
    write_markdown(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
