"""QLoRA fine-tuning of SmolLM2-135M on this CPU: does it help, and what does it cost?

Protocol: SmolLM2 float32 -> RTN int4 g64 on every Linear but ``lm_head`` (``--base bf16`` keeps a
dense bf16 base instead: plain LoRA, for the memory comparison) -> the rest of the model in bf16 ->
LoRA adapters (float32) on every projection -> AdamW for ``--steps`` steps on random windows of
``data/calib.txt`` (never the evaluation text), gradient checkpointing on. Perplexity on the first
4096 tokens of ``data/eval.txt`` (windows of 1024, as ``bench_models.py``) before and after.
Reports trainable parameters, optimizer-state bytes, seconds per step and the peak RSS of training.

Usage: ``python benchmarks/train_qlora.py [--steps 200] [--base int4|bf16] [--smoke]``.
JSON lines go to ``benchmarks/results/train_qlora.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

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
PROJECTIONS = ["*q_proj", "*k_proj", "*v_proj", "*o_proj", "*gate_proj", "*up_proj", "*down_proj"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (AdamW: two moments per trainable value)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--base", default="int4", choices=["int4", "bf16"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity (memory/time only)")
    p.add_argument("--smoke", action="store_true", help="3 steps, 512 eval tokens")
    p.add_argument("--out", default=os.path.join(RESULTS, "train_qlora.jsonl"))
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.eval_tokens = 3, 512
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.manual_seed(0)

    model, tokenizer, _ = load_causal_lm("smollm2", dtype=torch.float32)
    eval_ids = tokenizer(read_text("eval.txt"), return_tensors="pt").input_ids[0][: args.eval_tokens]
    train_ids = tokenizer(read_text("calib.txt"), return_tensors="pt").input_ids[0]
    window = min(1024, args.eval_tokens)
    if args.base == "int4":
        llmopt.compress_(model, llmopt.RTN("int4", 64), exclude=["lm_head"])
    model.to(torch.bfloat16)

    def ppl() -> Optional[float]:
        if args.no_eval:
            return None
        model.eval()
        with torch.inference_mode():
            return evaluate.perplexity(model, eval_ids, window=window, progress=False)["ppl"]

    ppl_before = ppl()
    report = llmopt.compress_(model, llmopt.LoRA(rank=args.rank, alpha=args.alpha), include=PROJECTIONS)
    for layer in model.modules():  # adapters train in float32; the frozen base stays bf16 / int4
        if isinstance(layer, llmopt.nn.LoRALinear):
            layer.lora_A.float()
            layer.lora_B.float()
    trainable = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in trainable)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    started = time.perf_counter()
    with evaluate.PeakMemory() as peak, evaluate.timed() as t:
        for step in range(args.steps):
            starts = torch.randint(0, train_ids.numel() - args.seq - 1, (args.batch,), generator=gen)
            batch = torch.stack([train_ids[s:s + args.seq] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 20 == 0 or step == args.steps - 1:
                print(f"step {step:4d} loss {losses[-1]:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    ppl_after = ppl()
    record = {
        "base": args.base, "steps": args.steps, "rank": args.rank, "alpha": args.alpha, "lr": args.lr,
        "seq": args.seq, "batch": args.batch, "layers_with_adapters": len(report.replaced),
        "trainable_parameters": n_trainable, "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "seconds_per_step": t["seconds"] / max(args.steps, 1), "train_peak_rss_mib": peak.to_dict()["peak_rss_mib"],
        "train_start_rss_mib": peak.to_dict()["start_rss_mib"],
        "loss_first10": sum(losses[:10]) / max(len(losses[:10]), 1), "loss_last10": sum(losses[-10:]) / max(len(losses[-10:]), 1),
        "ppl_before": ppl_before, "ppl_after": ppl_after, "eval_tokens": args.eval_tokens,
        "cpu": cpu_info().describe(), "cpu_model": cpu_info().model, "threads": torch.get_num_threads(),
    }
    print(json.dumps(record), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    if ppl_before is not None and ppl_after is not None:
        verdict = "PASS" if ppl_after < ppl_before else "MISS"
        print(f"{verdict} {args.base} LoRA: ppl {ppl_before:.2f} -> {ppl_after:.2f} after {args.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
