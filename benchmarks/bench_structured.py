"""Structured pruning benchmark: 25% of MLP channels removed, quality and decode speed.

1. **Quality** (SmolLM2-135M, float32): perplexity of the dense model, after removing 25% of every
   block's MLP intermediate channels (``PruneChannels``, ``round_to=64``) with ``magnitude`` and
   ``wanda`` importance, and after a short LoRA recovery (``LoRA`` rank 8 on every projection,
   AdamW on random windows of ``data/calib.txt``, never the evaluation text; then ``merge_lora_`` so
   the model is plain ``nn.Linear`` again). Linear parameters of the blocks before/after (lm_head is
   tied to the embedding and untouched). Perplexity protocol as ``bench_models.py``.
2. **Speed** (``llmopt.models.speed_model("1b", dtype=bfloat16)``, TinyLlama shapes, random weights):
   greedy decode tokens/s of the dense model and of the same model with 25% of MLP channels removed,
   measured in one run, alternating dense / pruned rounds, medians. Check: pruned >= 1.2x dense.

Output: ``benchmarks/results/structured.jsonl`` and ``structured.md`` (also printed).
Usage: ``python benchmarks/bench_structured.py [--quick] [--speed-size 1b|tiny] [--steps 40]
[--importances magnitude,wanda,fluctuation] [--skip quality|speed]``.
``--quick``: fewer evaluation tokens, 4 LoRA steps and the ``tiny`` speed model (a smoke run; the
numbers of the check only mean something with the default ``1b``).
"""

from __future__ import annotations

import argparse
import copy
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
import torch.nn as nn  # noqa: E402

import llmopt  # noqa: E402
from llmopt.core.cpu import cpu_info  # noqa: E402
from llmopt import evaluate  # noqa: E402
from llmopt.models import speed_model  # noqa: E402
from llmopt.methods.prune.structured import PruneChannels  # noqa: E402

from bench_models import load_smollm2_quality, read_text, write_markdown  # noqa: E402

RESULTS = os.path.join(HERE, "results")
RATIO = 0.25
ROUND_TO = 64
PROJECTIONS = ["*q_proj", "*k_proj", "*v_proj", "*o_proj", "*gate_proj", "*up_proj", "*down_proj"]
CHECK_SPEEDUP = 1.2


def settings(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(eval_tokens=1024, window=512, calib_samples=4, calib_len=128, steps=4, seq=128, batch=4,
                    speed_size="tiny", prompt=16, new_tokens=16, rounds=3)
    return dict(eval_tokens=4096, window=1024, calib_samples=16, calib_len=256, steps=40, seq=128, batch=4,
                speed_size="1b", prompt=32, new_tokens=64, rounds=5)


def block_linear_params(model: nn.Module) -> Dict[str, int]:
    """Weights + biases of the ``nn.Linear``s inside the decoder blocks, all and MLP only."""
    total = mlp = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in f".{name}":
            n = sum(p.numel() for p in m.parameters(recurse=False))
            total += n
            mlp += n if name.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") else 0
    return {"linear": total, "mlp": mlp}


def ppl(model: nn.Module, cfg) -> float:
    model.eval()
    with torch.inference_mode():
        return evaluate.perplexity(model, cfg["eval_ids"], window=cfg["window"], progress=False)["ppl"]


def lora_recovery(model: nn.Module, cfg) -> Dict[str, Any]:
    """A short LoRA fine-tune on the calibration text, merged back into plain Linears."""
    llmopt.compress_(model, llmopt.LoRA(rank=8, alpha=16), include=PROJECTIONS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = cfg["train_ids"]
    model.train()
    losses = []
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        starts = torch.randint(0, ids.numel() - cfg["seq"] - 1, (cfg["batch"],), generator=gen)
        batch = torch.stack([ids[s:s + cfg["seq"]] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    llmopt.merge_lora_(model)
    model.requires_grad_(False)
    return {"steps": cfg["steps"], "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "train_s": seconds}


def quality_rows(cfg, out) -> List[Dict[str, Any]]:
    base, tokenizer, info, calibration = load_smollm2_quality(cfg)
    cfg["train_ids"] = tokenizer(read_text("calib.txt"), return_tensors="pt").input_ids[0]
    params = block_linear_params(base)
    rows = [{"part": "quality", "model": "SmolLM2-135M", "variant": "dense fp32", "ppl": ppl(base, cfg),
             "block_linear_params": params["linear"], "mlp_params": params["mlp"]}]
    _emit(out, rows[-1])
    for importance in cfg["importances"]:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        config = PruneChannels(RATIO, importance=importance, round_to=ROUND_TO)
        report = llmopt.compress_(model, config, calibration=calibration if config.needs_calibration else None)
        report = report.details[0]  # the StructuredReport: kept channels, Linear parameters
        prune_s = time.perf_counter() - start
        after = block_linear_params(model)
        row = {"part": "quality", "model": "SmolLM2-135M",
               "variant": f"{RATIO:.0%} MLP channels, {importance}", "importance": importance,
               "ppl": ppl(model, cfg), "prune_s": prune_s,
               "block_linear_params": after["linear"], "mlp_params": after["mlp"],
               "block_linear_removed": 1 - after["linear"] / params["linear"],
               "mlp_removed": 1 - after["mlp"] / params["mlp"],
               "intermediate_size": model.config.intermediate_size,
               "model_linear_removed": report.removed_fraction}
        _emit(out, row)
        rows.append(row)
        rec = lora_recovery(model, cfg)
        row2 = {**row, "variant": row["variant"] + f" + LoRA {rec['steps']} steps", "ppl": ppl(model, cfg),
                **rec}
        assert block_linear_params(model) == after, "merge_lora_ must leave the pruned shapes"
        _emit(out, row2)
        rows.append(row2)
        del model
        gc.collect()
    del base
    gc.collect()
    return rows


def speed_rows(cfg, out) -> List[Dict[str, Any]]:
    dense = speed_model(cfg["speed_size"], dtype=torch.bfloat16)
    pruned = copy.deepcopy(dense)
    report = llmopt.compress_(pruned, PruneChannels(RATIO, round_to=ROUND_TO)).details[0]
    kwargs = dict(prompt_tokens=cfg["prompt"], new_tokens=cfg["new_tokens"], repeats=1, warmup=1)
    times: Dict[str, List[float]] = {"dense": [], "pruned": []}
    for _ in range(cfg["rounds"]):  # alternate so drift of a shared machine hits both alike
        for name, model in (("dense", dense), ("pruned", pruned)):
            times[name] += evaluate.decode_throughput(model, **kwargs)["times_s"]
    steps = cfg["new_tokens"] - 1
    tps = {k: steps / statistics.median(v) for k, v in times.items()}
    row = {"part": "speed", "model": f"speed_model({cfg['speed_size']!r}) bf16",
           "dense_tokens_per_s": tps["dense"], "pruned_tokens_per_s": tps["pruned"],
           "speedup": tps["pruned"] / tps["dense"], "rounds": cfg["rounds"],
           "intermediate_size": [dense.config.intermediate_size, pruned.config.intermediate_size],
           "model_linear_removed": report.removed_fraction,
           "block_linear_removed": 1 - (block_linear_params(pruned)["linear"]
                                        / block_linear_params(dense)["linear"]),
           "times_s": times}
    _emit(out, row)
    return [row]


def _emit(out, row: Dict[str, Any]) -> None:
    out.write(json.dumps({"type": "row", **row}) + "\n")
    out.flush()
    if row["part"] == "quality":
        print(f"  {row['variant']:<45} ppl {row['ppl']:9.2f}", flush=True)
    else:
        print(f"  {row['model']}: dense {row['dense_tokens_per_s']:.2f} tok/s, pruned "
              f"{row['pruned_tokens_per_s']:.2f} tok/s ({row['speedup']:.2f}x)", flush=True)


def markdown(header: Dict[str, Any], quality: List[Dict[str, Any]], speed: List[Dict[str, Any]],
             checks: List[str]) -> str:
    lines = [f"# Structured pruning benchmark ({header['date']}, {header['profile']})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("date", "profile")]
    if quality:
        lines += ["", "| SmolLM2-135M | ppl | block Linear params | removed (blocks / MLP) |",
                  "|---|---:|---:|---|"]
        for r in quality:
            removed = "-"
            if "mlp_removed" in r:
                removed = f"{r['block_linear_removed']:.1%} / {r['mlp_removed']:.1%}"
            lines.append(f"| {r['variant']} | {r['ppl']:.2f} | {r['block_linear_params']:,} | {removed} |")
    for r in speed:
        lines += ["", f"| {r['model']} | tokens/s (median of {r['rounds']}) |", "|---|---:|",
                  f"| dense | {r['dense_tokens_per_s']:.2f} |",
                  f"| {RATIO:.0%} MLP channels removed ({r['block_linear_removed']:.1%} of block Linear "
                  f"params) | {r['pruned_tokens_per_s']:.2f} |", f"| ratio | {r['speedup']:.2f}x |"]
    lines += ["", "Checks:"] + [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run (tiny speed model, 4 LoRA steps)")
    parser.add_argument("--speed-size", choices=["1b", "tiny"], default=None)
    parser.add_argument("--steps", type=int, default=None, help="LoRA recovery steps")
    parser.add_argument("--importances", default="magnitude,wanda",
                        help="comma list of importance criteria (magnitude, wanda, fluctuation)")
    parser.add_argument("--skip", choices=["quality", "speed"], default=None, help="leave one part out")
    parser.add_argument("--out", default=os.path.join(RESULTS, "structured.jsonl"))
    args = parser.parse_args(argv)
    cfg = settings(args.quick)
    if args.speed_size:
        cfg["speed_size"] = args.speed_size
    cfg["importances"] = [s.strip() for s in args.importances.split(",") if s.strip()]
    if args.steps is not None:
        cfg["steps"] = args.steps
    torch.manual_seed(0)
    started = time.perf_counter()
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "profile": "quick" if args.quick else "full",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info().describe(), "cpu_model": cpu_info().model,
        "pruning": f"PruneChannels(ratio={RATIO}, round_to={ROUND_TO}) on every block's MLP",
        "perplexity protocol": f"benchmarks/data/eval.txt, first {cfg['eval_tokens']} tokens, windows of "
                               f"{cfg['window']}",
        "wanda calibration": f"{cfg['calib_samples']} x {cfg['calib_len']} tokens of "
                             "benchmarks/data/calib.txt",
        "LoRA recovery": f"rank 8, alpha 16, AdamW lr 5e-4, {cfg['steps']} steps of {cfg['batch']} x "
                         f"{cfg['seq']} tokens of calib.txt, merged",
        "decode": f"prompt {cfg['prompt']}, {cfg['new_tokens']} new tokens, batch 1, greedy, "
                  "alternating rounds",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    quality: List[Dict[str, Any]] = []
    speed: List[Dict[str, Any]] = []
    checks: List[str] = []
    with open(args.out, "w") as out:
        out.write(json.dumps({"type": "header", **header}) + "\n")
        if args.skip != "quality":
            quality = quality_rows(cfg, out)
        if args.skip != "speed":
            speed = speed_rows(cfg, out)
            s = speed[0]["speedup"]
            note = "" if cfg["speed_size"] == "1b" else " (tiny model: not the target measurement)"
            checks.append(f"decode tokens/s with {RATIO:.0%} MLP channels removed >= {CHECK_SPEEDUP}x dense: "
                          f"{'PASS' if s >= CHECK_SPEEDUP else 'MISS'} ({s:.2f}x){note}")
        out.write(json.dumps({"type": "checks", "checks": checks}) + "\n")
    header["elapsed"] = f"{time.perf_counter() - started:.0f} s"
    text = markdown(header, quality, speed, checks)
    write_markdown(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
