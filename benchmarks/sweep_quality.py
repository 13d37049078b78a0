"""Quality sweep on SmolLM2 with bench_models.py's protocol (issue 17): one JSON line per setting.

    python benchmarks/sweep_quality.py 'GPTQ("int3", 64)' '[Rotate(), GPTQ("int3", 64)]' --calib-samples 16

Each argument is a method config or a list of them (a recipe), written with the names llmopt exports
(``RTN``, ``GPTQ``, ``AWQ``, ``HQQ``, ``Rotate``, ...), or ``preset:NAME``. ``lm_head`` is excluded
from every quantization stage (Rotate must see it). Prints ppl (first 4096 eval tokens, 1024-token
windows, bf16 compute), apply seconds and stored bits per weight of the Linear layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import llmopt  # noqa: E402
from llmopt import evaluate  # noqa: E402

import bench_models  # noqa: E402


def _stages(text: str):
    if text.startswith("preset:"):
        return llmopt.Recipe.preset(text[len("preset:"):]).stages
    names = {name: getattr(llmopt, name) for name in llmopt.__all__}
    value = eval(text, {"__builtins__": {}}, names)  # a developer's own command line, llmopt names only
    configs = value if isinstance(value, (list, tuple)) else [value]
    return [c if c.name == "rotate" else llmopt.Stage(c, exclude=["lm_head"]) for c in configs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()
    cfg = bench_models.settings(False)
    cfg["calib_samples"] = args.calib_samples
    base, _tokenizer, _info, calibration = bench_models.load_smollm2_quality(cfg)
    for text in args.settings:
        stages = _stages(text)
        needs = any((s.config if isinstance(s, llmopt.Stage) else s).needs_calibration for s in stages)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        llmopt.compress_(model, stages, calibration=calibration if needs else None,
                         calibration_dtype=torch.bfloat16 if needs else None)
        apply_s = time.perf_counter() - start
        model.to(torch.bfloat16)
        ppl = evaluate.perplexity(model, cfg["eval_ids"], window=cfg["window"], progress=False)["ppl"]
        bits = evaluate.weight_bytes(model, exclude=("lm_head",))["linear_bits_per_weight"]
        print(json.dumps({"setting": text, "ppl": round(ppl, 3), "apply_s": round(apply_s, 1),
                          "bits": round(bits, 4)}), flush=True)


if __name__ == "__main__":
    main()
