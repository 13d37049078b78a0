"""QAT benchmark: fine-tune SmolLM2-135M through fake quantization, convert, and compare with RTN.

Steps:

1. load SmolLM2-135M-Instruct in float32 (``llmopt.models.load_causal_lm("smollm2")``);
2. **fp32** row: perplexity of the float model;
3. **RTN** row: ``llmopt.compress_(copy, RTN(format, group_size), exclude=["lm_head"])``, model in bf16
   (what a QAT run starts from: converting before any step gives exactly these layers);
4. **QAT** row: ``compress_(model, QAT(format, group_size))`` on every Linear but ``lm_head`` (tied to the embedding, left float as in
   every benchmark row), AdamW on all parameters (``--train linear``: only the QAT layers' weights
   and biases) over windows of ``benchmarks/data/calib.txt`` (never ``eval.txt``), gradient
   checkpointing on, linear warm-up then cosine decay to 10% of ``--lr``; then ``QAT(step="convert")``,
   model to bf16, perplexity;
5. optional **fp32 fine-tuned** row (``--float-control``): the same training without quantization,
   to separate what QAT recovers from what fine-tuning on this text alone changes.

Perplexity protocol of ``bench_models.py``: ``eval.txt``, first 4096 tokens, non-overlapping windows of
1024, fresh context per window. Check: "QAT ppl below RTN at the same format" (PASS/MISS).

Output: ``benchmarks/results/qat.jsonl`` (``qat_smoke.jsonl`` with ``--smoke``) and a markdown table.
Usage::

    python benchmarks/train_qat.py                        # int3 g64, 200 steps (long: see README)
    python benchmarks/train_qat.py --format int4 --steps 100 --lr 2e-5
    python benchmarks/train_qat.py --smoke                # 3 steps, 512 eval tokens
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for `import llmopt` without install
sys.path.insert(0, HERE)

import torch  # noqa: E402

import llmopt  # noqa: E402
from llmopt.core.cpu import cpu_info  # noqa: E402
from llmopt import evaluate  # noqa: E402
from llmopt.models import load_causal_lm  # noqa: E402
from llmopt.methods.quant.qat import QAT  # noqa: E402
from llmopt.nn.qat_linear import qat_layers

from bench_models import read_text  # noqa: E402

RESULTS = os.path.join(HERE, "results")
EXCLUDE = ["lm_head"]


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    if args.smoke:
        return dict(steps=3, eval_tokens=512, window=512)
    return dict(steps=args.steps, eval_tokens=4096, window=1024)


# ----------------------------------------------------------------------------------------------
# Data


class Windows:
    """Non-overlapping windows of ``length`` tokens of the calibration text, shuffled each epoch."""

    def __init__(self, ids: torch.Tensor, length: int, seed: int = 0) -> None:
        n = ids.numel() // length
        if n < 1:
            raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {length}")
        self.windows = ids[: n * length].view(n, length)
        self.gen = torch.Generator().manual_seed(seed)
        self.order: List[int] = []
        self.epochs = 0.0
        self.used = 0

    def batch(self, size: int) -> torch.Tensor:
        rows = []
        for _ in range(size):
            if not self.order:
                self.order = torch.randperm(len(self.windows), generator=self.gen).tolist()
            rows.append(self.order.pop())
            self.used += 1
        self.epochs = self.used / len(self.windows)
        return self.windows[rows]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``0.1 * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# Rows


def ppl_of(model: torch.nn.Module, eval_ids: torch.Tensor, cfg: Dict[str, Any]) -> Dict[str, Any]:
    result = evaluate.perplexity(model, eval_ids, window=cfg["window"], progress=False)
    return {"ppl": result["ppl"], "ppl_tokens": result["tokens_scored"], "ppl_s": result["seconds"]}


def bits_of(model: torch.nn.Module) -> float:
    return evaluate.weight_bytes(model, exclude=tuple(EXCLUDE))["linear_bits_per_weight"]


def train(model: torch.nn.Module, data: Windows, args: argparse.Namespace, steps: int, label: str
          ) -> Dict[str, Any]:
    """AdamW fine-tuning with gradient checkpointing; returns losses and timings."""
    if args.train == "linear" and qat_layers(model):
        params = [p for layer in qat_layers(model).values() for p in layer.parameters()]
    else:
        params = list(model.parameters())
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    warmup = min(10, steps // 10)
    losses, times = [], []
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, args.lr, warmup)
            batch = data.batch(args.batch)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
            if args.smoke or step % 10 == 0 or step == steps - 1:
                print(f"  {label} step {step + 1}/{steps}: loss {losses[-1]:.4f}, lr {optimizer.param_groups[0]['lr']:.2e}, "
                      f"{times[-1]:.1f} s", flush=True)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        del optimizer
        gc.collect()
    tail = losses[-min(10, len(losses)):]
    return {
        "steps": steps, "loss_first": losses[0], "loss_last10": statistics.mean(tail),
        "step_s_first": times[0], "step_s_median": statistics.median(times[1:] or times),
        "train_s": sum(times), "params_trained": sum(p.numel() for p in params),
        "epochs": round(data.epochs, 2),
    }


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(value, digits=2):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(records: List[Dict[str, Any]], header: Dict[str, Any], checks: List[str]) -> str:
    lines = ["# llmopt QAT benchmark (SmolLM2-135M)", ""] + [f"- {k}: {v}" for k, v in header.items()] + [""]
    base = next((r["ppl"] for r in records if r["method"] == "fp32"), None)
    head = ("| method | bits/weight (Linears but lm_head) | ppl | delta vs fp32 | train loss first -> last 10 | "
            "s/step (median) | peak RSS MiB | notes |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        ppl = r.get("ppl")
        loss = (f"{r['loss_first']:.3f} -> {r['loss_last10']:.3f}" if "loss_first" in r else "-")
        cells = [r["method"], _fmt(r.get("linear_bits_per_weight")), _fmt(ppl),
                 _fmt(None if ppl is None or base is None else ppl - base), loss, _fmt(r.get("step_s_median")),
                 _fmt(r.get("peak_rss_mib"), 0), r.get("notes", "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Check", "", "```"] + checks + ["```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="int3", help="weight format (default int3; e.g. int4, nf4)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate (try 1e-5 .. 5e-5)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train", choices=("all", "linear"), default="all",
                        help="all parameters (default) or only the QAT layers' weights and biases")
    parser.add_argument("--float-control", action="store_true",
                        help="also fine-tune the float model the same way (a control row; doubles the time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="directory to llmopt.save the converted QAT model to")
    parser.add_argument("--smoke", action="store_true", help="3 steps, 512 eval tokens (for tests)")
    parser.add_argument("--out", default=None, help="JSONL output (default results/qat.jsonl, qat_smoke.jsonl)")
    args = parser.parse_args(argv)
    cfg = settings(args)
    fmt = llmopt.get_format(args.format)  # unknown format: fail before loading anything
    out_path = args.out or os.path.join(RESULTS, "qat_smoke.jsonl" if args.smoke else "qat.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    base, tokenizer, info = load_causal_lm("smollm2", dtype=torch.float32)
    print(f"loaded {info['path']} ({info['parameters'] / 1e6:.1f} M parameters, float32)", flush=True)
    eval_ids = tokenizer(read_text("eval.txt"), return_tensors="pt").input_ids[0][: cfg["eval_tokens"]]
    calib_ids = tokenizer(read_text("calib.txt"), return_tensors="pt").input_ids[0]
    label = f"{fmt.name} g{args.group_size}"
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
        "cpu": f"{cpu_info().describe()}, {torch.get_num_threads()} threads", "cpu_model": cpu_info().model,
        "profile": "smoke" if args.smoke else "full", "format": label,
        "training": f"{cfg['steps']} steps x batch {args.batch} x {args.seq_len} tokens of calib.txt "
                    f"({calib_ids.numel()} tokens, {calib_ids.numel() // args.seq_len} windows), AdamW lr {args.lr:g} "
                    f"(warm-up, cosine to 10%), grad clip 1.0, {args.train} parameters, gradient checkpointing, fp32",
        "perplexity protocol": f"benchmarks/data/eval.txt, first {cfg['eval_tokens']} tokens, windows of "
                               f"{cfg['window']} (non-overlapping, fresh context each); quantized rows in bf16",
    }
    records: List[Dict[str, Any]] = []

    with open(out_path, "w") as out:
        out.write(json.dumps({"type": "header", **header}) + "\n")

        def emit(record: Dict[str, Any]) -> None:
            records.append(record)
            out.write(json.dumps({"type": "row", **record}) + "\n")
            out.flush()
            print(f"  {record['method']:<26} ppl {_fmt(record.get('ppl'))}", flush=True)

        emit({"method": "fp32", "linear_bits_per_weight": bits_of(base), **ppl_of(base, eval_ids, cfg)})

        model = copy.deepcopy(base)
        report = llmopt.compress_(model, llmopt.RTN(fmt.name, args.group_size), exclude=EXCLUDE)
        model.to(torch.bfloat16)
        emit({"method": f"rtn {label}", "linear_bits_per_weight": bits_of(model), "layers": len(report.replaced),
              **ppl_of(model, eval_ids, cfg)})
        del model
        gc.collect()

        if args.float_control:
            model = copy.deepcopy(base)
            with evaluate.PeakMemory() as peak:
                stats = train(model, Windows(calib_ids, args.seq_len, args.seed), args, cfg["steps"], "float")
            emit({"method": "fp32 fine-tuned (control)", "linear_bits_per_weight": bits_of(model), **stats,
                  "peak_rss_mib": peak.to_dict()["peak_rss_mib"], **ppl_of(model, eval_ids, cfg),
                  "notes": "same training, no quantization"})
            del model
            gc.collect()

        model = base  # the last row trains the loaded model itself: no third copy in memory
        with evaluate.PeakMemory() as peak:
            prep = llmopt.compress_(model, QAT(fmt, args.group_size), exclude=EXCLUDE)
            stats = train(model, Windows(calib_ids, args.seq_len, args.seed), args, cfg["steps"], "qat")
            conv = llmopt.compress_(model, QAT(step="convert"))
        model.to(torch.bfloat16)
        kernels = sorted({m.kernel.name for m in model.modules() if hasattr(m, "kernel")})
        record = {"method": f"qat {label}", "linear_bits_per_weight": bits_of(model), "layers": len(conv.replaced),
                  **stats, "peak_rss_mib": peak.to_dict()["peak_rss_mib"], "prepare_s": prep.seconds,
                  "convert_s": conv.seconds, "kernels": kernels, **ppl_of(model, eval_ids, cfg),
                  "notes": ", ".join(kernels) + (f"; {'; '.join(prep.notes)}" if prep.notes else "")}
        emit(record)
        if args.save:
            llmopt.save(model, args.save, metadata={"qat": label, "steps": cfg["steps"], "lr": args.lr})
            print(f"saved the converted model to {args.save}")

        rtn = next(r["ppl"] for r in records if r["method"].startswith("rtn"))
        qat = record["ppl"]
        checks = [f"{'PASS' if qat < rtn else 'MISS'} smollm2: QAT {label} ppl {qat:.2f} below RTN {label} "
                  f"{rtn:.2f} (after {cfg['steps']} steps)"]
        out.write(json.dumps({"type": "checks", "checks": checks}) + "\n")

    header["elapsed"] = f"{time.perf_counter() - started:.0f} s"
    print("\n" + markdown(records, header, checks))
    print(f"time per training step: {stats['step_s_median']:.1f} s (median; first step {stats['step_s_first']:.1f} s), "
          f"peak RSS {record['peak_rss_mib']:.0f} MiB")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
