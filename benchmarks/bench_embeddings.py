"""Quantized embeddings on SmolLM2-135M: weight bytes in memory and perplexity, with and without them.

Rows (all bf16 compute, RTN int4 g64 on the projections, as in bench_models.py):

* ``float embedding``: the tied embedding / lm_head stay one bf16 tensor (``exclude=["lm_head"]``).
* ``head int4, float embedding``: lm_head quantized on its own (the tie is broken: a bf16 embedding
  plus an int4 head).
* ``embedding int4 (tied)``: ``compress_(..., embeddings=WeightQuant("int4", 64))``: one packed table
  for the lookup and the head.

    python benchmarks/bench_embeddings.py [--eval-tokens 4096] [--window 1024] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llmopt  # noqa: E402
from llmopt import evaluate  # noqa: E402
from llmopt.models import load_causal_lm  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--json", default=None, help="append one JSON line per row to this file")
    args = parser.parse_args()
    rtn = llmopt.RTN("int4", args.group_size)
    rows = {
        "float embedding": dict(exclude=["lm_head"]),
        "head int4, float embedding": {},
        "embedding int4 (tied)": dict(embeddings=llmopt.WeightQuant("int4", args.group_size)),
    }
    with open(os.path.join(DATA, "eval.txt"), encoding="utf-8") as f:
        text = f.read()
    for label, kwargs in rows.items():
        model, tokenizer, _ = load_causal_lm("smollm2", dtype=torch.float32)
        ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.eval_tokens]
        start = time.perf_counter()
        report = llmopt.compress_(model, rtn, **kwargs)
        model.to(torch.bfloat16)
        seconds = time.perf_counter() - start
        memory = llmopt.memory_report(model)
        tied = model.lm_head is getattr(model.model.embed_tokens, "linear", None)
        ppl = evaluate.perplexity(model, ids, window=args.window, progress=False)
        row = {"row": label, "stored_mb": memory.stored_bytes / 1e6, "runtime_mb": memory.runtime_bytes / 1e6,
               "ppl": ppl["ppl"], "tokens_scored": ppl["tokens_scored"], "one_packed_table": tied,
               "compress_s": round(seconds, 2), "notes": report.notes}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        del model


if __name__ == "__main__":
    main()
