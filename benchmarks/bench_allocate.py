"""Mixed precision by budget: ``llmopt.allocate`` against uniform and naive mixed choices, same bytes.

Model: SmolLM2-135M (fp32). Targets: every ``nn.Linear`` of the 30 blocks (``lm_head``, tied to the
embedding, stays dense). Every row stores the targeted weights in the same number of bytes, an
average of 3.5 bits per weight (codes + bfloat16 scales and zero points, bias excluded):

* ``uniform int3 g64``: RTN int3 g64 everywhere (3.5 b/w).
* ``half int4 (first blocks)``: RTN int4 g64 (4.5 b/w) in blocks 0-14, int2 g64 (2.5 b/w) in 15-29.
* ``half int4 (alternating)``: int4 g64 in the even blocks, int2 g64 in the odd ones.
* ``allocate <sensitivity>``: ``llmopt.allocate(target_bits=3.5)`` over RTN candidates int2/int3/int4 at
  g64 and g128 plus int8 per channel, one row per sensitivity estimate (``fisher``: diagonal
  empirical Fisher of the weights, the default; ``kfac``: output error weighted by the squared loss
  gradient of each output channel; ``output``: output error only), applied with
  ``compress_(model, allocation.recipe)``.
* ``--hqq``: also ``allocate fisher +hqq`` with HQQ int2/int3/int4 g64 candidates added.

Columns: ppl, bits/weight and stored bytes of the targeted weights (``memory_report``), seconds to
allocate (sensitivity measurement + knapsack) and, for every measured sensitivity, the estimated
loss each row's choice would have under it (how well the estimate ranks the rows).

Protocol (as ``bench_models.py``): evaluation text ``benchmarks/data/eval.txt``, first 4096 tokens in
windows of 1024; calibration 16 windows of 256 tokens of ``benchmarks/data/calib.txt`` (fp32).
``--quick``: 4 x 128 calibration tokens and 1024 evaluation tokens in windows of 512 (a smoke run).

Checks (PASS / MISS): the default allocation's ppl is below uniform int3 g64's and below both
half-int4 rows', at no more bytes.

Output: ``benchmarks/results/allocate.jsonl`` and ``allocate.md`` (``--out`` changes the path).
Usage: ``python benchmarks/bench_allocate.py [--quick] [--sensitivities fisher,kfac,output] [--hqq]
[--sweep 3.25,4.0]``.
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
from llmopt import HQQ, RTN, evaluate  # noqa: E402
from llmopt.core.measure import memory_report  # noqa: E402
from llmopt.core.targets import find_linears  # noqa: E402

from bench_models import load_smollm2_quality, write_markdown  # noqa: E402

RESULTS = os.path.join(HERE, "results")
EXCLUDE = ["lm_head"]
TARGET_BITS = 3.5
INT2, INT3, INT4 = RTN("int2", 64), RTN("int3", 64), RTN("int4", 64)
CANDIDATES = [RTN("int2", 64), RTN("int2", 128), RTN("int3", 64), RTN("int3", 128), RTN("int4", 64),
              RTN("int4", 128), RTN("int8", None)]
HQQ_CANDIDATES = [HQQ("int2", 64), HQQ("int3", 64), HQQ("int4", 64)]
DEFAULT = "fisher"


def settings(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(eval_tokens=1024, window=512, calib_samples=4, calib_len=128)
    return dict(eval_tokens=4096, window=1024, calib_samples=16, calib_len=256)


def block_index(name: str) -> int:
    parts = name.split(".")
    return next(int(p) for p in parts if p.isdigit())


def naive_rows(names: List[str]) -> Dict[str, Dict[str, Any]]:
    blocks = sorted({block_index(n) for n in names})
    half = set(blocks[: len(blocks) // 2])
    return {
        "uniform-int3": {name: INT3 for name in names},
        "half-first": {name: INT4 if block_index(name) in half else INT2 for name in names},
        "half-alternating": {name: INT4 if block_index(name) % 2 == 0 else INT2 for name in names},
    }


LABELS = {"uniform-int3": "uniform int3 g64", "half-first": "half int4 g64 (blocks 0-14) / int2 g64",
          "half-alternating": "half int4 g64 (even blocks) / int2 g64"}


def apply_assignments(model: torch.nn.Module, assignments: Dict[str, Any]) -> None:
    """One ``compress_`` per distinct config, on exactly its layers."""
    groups: Dict[str, List[str]] = {}
    configs: Dict[str, Any] = {}
    for name, cfg in assignments.items():
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        groups.setdefault(key, []).append(name)
        configs[key] = cfg
    for key, names in groups.items():
        llmopt.compress_(model, configs[key], include=names)


def weight_bytes(model: torch.nn.Module, names: List[str]) -> int:
    rows = {row.name: row for row in memory_report(model).layers}
    return sum(int(round(rows[n].bits_per_weight * rows[n].num_weights / 8)) for n in names)


def estimate(allocation, assignments: Dict[str, Any]) -> Optional[float]:
    """The loss ``allocation``'s measurements predict for another choice (None if a config was not a candidate)."""
    total = 0.0
    for name, cfg in assignments.items():
        if cfg not in allocation.candidates:
            return None
        total += allocation.errors[name][allocation.candidates.index(cfg)]
    return total


def evaluate_row(base, key: str, label: str, assignments: Dict[str, Any], cfg: Dict[str, Any],
                 recipe=None, calibration=None) -> Dict[str, Any]:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    if recipe is not None:
        llmopt.compress_(model, recipe, calibration=calibration)
    else:
        apply_assignments(model, assignments)
    apply_seconds = time.perf_counter() - start
    names = list(assignments)
    nbytes = weight_bytes(model, names)
    weights = sum(row.num_weights for row in memory_report(model).layers if row.name in assignments)
    ppl = evaluate.perplexity(model, cfg["eval_ids"], window=cfg["window"], progress=False)
    del model
    gc.collect()
    return {"key": key, "label": label, "ppl": ppl["ppl"], "nll": ppl["nll"], "ppl_tokens": ppl["tokens_scored"],
            "bytes": nbytes, "bits_per_weight": 8 * nbytes / weights, "apply_seconds": apply_seconds,
            "assignments": {n: c.label() for n, c in assignments.items()}}


def checks(records: List[Dict[str, Any]]) -> List[str]:
    by_key = {r["key"]: r for r in records}
    main = by_key.get(f"allocate-{DEFAULT}")
    out = []
    if main is None:
        return [f"allocate {DEFAULT}: not measured"]
    for key in ("uniform-int3", "half-first", "half-alternating"):
        if key not in by_key:
            continue
        other = by_key[key]
        ok = main["ppl"] < other["ppl"] and main["bytes"] <= other["bytes"]
        out.append(f"allocate ({DEFAULT}) ppl < {other['label']} at no more bytes: {'PASS' if ok else 'MISS'} "
                   f"({main['ppl']:.2f} vs {other['ppl']:.2f}; {main['bytes']:,} vs {other['bytes']:,} bytes)")
    return out


def markdown(baseline: float, records: List[Dict[str, Any]], header: Dict[str, Any], modes: List[str],
             check_lines: List[str]) -> str:
    lines = [f"# Mixed precision by budget ({header['date']}, {header['profile']})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("date", "profile")]
    est_cols = "".join(f" est. loss ({m}) |" for m in modes)
    lines += ["", f"| choice | ppl | bits/weight | bytes | allocate s |{est_cols}",
              "|---|---:|---:|---:|---:|" + "---:|" * len(modes),
              f"| fp32 baseline | {baseline:.2f} | 32 | - | - |" + " - |" * len(modes)]
    for r in records:
        est = "".join(f" {r['estimates'][m]:.4f} |" if r["estimates"].get(m) is not None else " - |"
                      for m in modes)
        secs = f"{r['allocate_seconds']:.0f}" if r.get("allocate_seconds") is not None else "-"
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r['bits_per_weight']:.4f} | {r['bytes']:,} | {secs} |{est}")
    mixes = [r for r in records if r.get("summary")]
    if mixes:
        lines += ["", "Choices of the allocations (share of the targeted weights):", ""]
        for r in mixes:
            parts = ", ".join(f"{label} {100 * row['weights']:.1f}%" for label, row in
                              sorted(r["summary"].items(), key=lambda kv: -kv[1]["weights"]))
            lines.append(f"- {r['label']}: {parts}")
    lines += ["", "Checks:"] + [f"- {c}" for c in check_lines]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 x 128 calibration tokens, 1024 evaluation tokens")
    parser.add_argument("--sensitivities", default="fisher,kfac,output",
                        help="comma list out of fisher, kfac, output (one allocate row each)")
    parser.add_argument("--hqq", action="store_true", help="also an allocation with HQQ candidates added")
    parser.add_argument("--sweep", default="",
                        help="comma list of other bits/weight targets: each allocation re-solved there "
                             "(Allocation.with_budget, no new measurement) and evaluated too")
    parser.add_argument("--out", default=os.path.join(RESULTS, "allocate.jsonl"))
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.sensitivities.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("fisher", "kfac", "output")]
    if bad:
        parser.error(f"unknown sensitivities {bad}")
    cfg = settings(args.quick)
    torch.manual_seed(0)
    started = time.perf_counter()
    base, tokenizer, info, calibration = load_smollm2_quality(cfg)
    names = list(find_linears(base, exclude=EXCLUDE))
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "profile": "quick" if args.quick else "full",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info().describe(), "cpu_model": cpu_info().model,
        "model": info.get("path", "smollm2") + " (fp32)",
        "perplexity protocol": f"benchmarks/data/eval.txt, first {cfg['eval_tokens']} tokens, windows of "
                               f"{cfg['window']}",
        "calibration": f"{len(calibration)} x {cfg['calib_len']} tokens of benchmarks/data/calib.txt (fp32)",
        "targets": f"{len(names)} Linears of the blocks (lm_head excluded); budget {TARGET_BITS} bits/weight "
                   "stored (codes + bf16 scales/zero points, bias excluded)",
        "candidates": ", ".join(c.label() for c in CANDIDATES),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    records: List[Dict[str, Any]] = []
    allocations: Dict[str, Any] = {}
    with open(args.out, "w") as out:
        out.write(json.dumps({"type": "header", **header}) + "\n")
        ppl = evaluate.perplexity(base, cfg["eval_ids"], window=cfg["window"], progress=False)
        baseline = ppl["ppl"]
        out.write(json.dumps({"type": "row", "key": "fp32", "ppl": baseline, "nll": ppl["nll"]}) + "\n")
        print(f"fp32: ppl {baseline:.2f}", flush=True)

        jobs = [(m, CANDIDATES, f"allocate-{m}", f"allocate ({m})") for m in modes]
        if args.hqq:
            jobs.append((DEFAULT, CANDIDATES + HQQ_CANDIDATES, f"allocate-{DEFAULT}-hqq",
                         f"allocate ({DEFAULT}, RTN + HQQ candidates)"))
        pending = []
        for mode, cands, key, label in jobs:
            start = time.perf_counter()
            allocation = llmopt.allocate(base, candidates=cands, target_bits=TARGET_BITS, calibration=calibration,
                                         exclude=EXCLUDE, sensitivity=mode, progress=False)
            seconds = time.perf_counter() - start
            if cands is CANDIDATES:
                allocations[mode] = allocation
            print(f"  allocate {mode}: {allocation.bits_per_weight:.4f} b/w, {seconds:.0f} s", flush=True)
            pending.append((key, label, allocation, seconds))

        rows = [(key, LABELS[key], assignments, None, None) for key, assignments in naive_rows(names).items()]
        rows += [(key, label, a.assignments, a, s) for key, label, a, s in pending]
        for bits in [float(b) for b in args.sweep.split(",") if b.strip()]:
            for key, label, a, s in pending:
                other = a.with_budget(target_bits=bits)
                rows.append((f"{key}@{bits:g}", f"{label} at {bits:g} b/w", other.assignments, other, s))
        for key, label, assignments, allocation, seconds in rows:
            record = evaluate_row(base, key, label, assignments, cfg,
                                  recipe=allocation.recipe if allocation is not None else None,
                                  calibration=calibration)
            record["estimates"] = {m: estimate(a, assignments) for m, a in allocations.items()}
            if allocation is not None:
                record.update(allocate_seconds=seconds, estimated_loss=allocation.estimated_loss,
                              sensitivity=allocation.sensitivity, summary=allocation.summary(),
                              budget_bytes=allocation.budget_bytes, allocation_bytes=allocation.total_bytes)
                assert record["bytes"] == allocation.total_bytes, (record["bytes"], allocation.total_bytes)
            records.append(record)
            out.write(json.dumps({"type": "row", **record}) + "\n")
            out.flush()
            print(f"  {label:<45} ppl {record['ppl']:8.2f}  {record['bits_per_weight']:.4f} b/w  "
                  f"{record['bytes']:,} B", flush=True)
        check_lines = checks(records)
        out.write(json.dumps({"type": "checks", "checks": check_lines}) + "\n")
    header["elapsed"] = f"{time.perf_counter() - started:.0f} s"
    text = markdown(baseline, records, header, list(allocations), check_lines)
    write_markdown(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
