"""Demo: quantize a toy transformer with several formats; print quality, memory and a save/load check.

A later version turns this into the full benchmark report on a real model (see benchmarks/).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import List, Optional

import torch

from . import RTN, compress_, load, memory_report, save
from .core.measure import sqnr
from .testing import ToyTransformer


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmopt", description=__doc__)
    parser.add_argument("--dim", type=int, default=576, help="model width (SmolLM2-135M uses 576)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    base = ToyTransformer(vocab=2048, dim=args.dim, n_layers=args.layers, tie=False,
                          n_heads=9 if args.dim % 9 == 0 else 8, n_kv_heads=3 if args.dim % 9 == 0 else 4,
                          hidden=int(args.dim * 8 / 3) // 64 * 64).eval()
    ids = torch.randint(0, 2048, (1, 64))
    with torch.inference_mode():
        reference = base(ids)
    dense_bytes = memory_report(base).stored_bytes
    print(f"toy Llama-like model: dim={args.dim}, layers={args.layers}, {dense_bytes / 2**20:.2f} MiB float32\n")
    print(f"{'config':<34} {'SQNR dB':>8} {'MiB':>7} {'ratio':>6} {'time s':>7}")
    configs = [RTN("int8", None), RTN("int4", 128), RTN("int4", 64), RTN("nf4", 64), RTN("int3", 64),
               RTN("fp8_e4m3", 128)]
    last = None
    for cfg in configs:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        compress_(model, cfg, exclude=["lm_head"])
        seconds = time.perf_counter() - start
        with torch.inference_mode():
            out = model(ids)
        size = memory_report(model).stored_bytes
        label = f"{cfg.format} group={cfg.group_size or 'channel'}"
        print(f"{label:<34} {sqnr(reference, out):8.2f} {size / 2**20:7.2f} {dense_bytes / size:6.2f} {seconds:7.2f}")
        last = (cfg, model, out)
    cfg, model, out = last
    print(f"\nmemory report for {cfg.format}:\n{memory_report(model)}\n")
    with tempfile.TemporaryDirectory() as directory:
        save(model, directory)
        with torch.device("meta"):
            skeleton = copy.deepcopy(base).to("meta")
        reloaded = load(skeleton, directory)
        with torch.inference_mode():
            same = torch.equal(reloaded(ids), out)
    print(f"save -> load round trip bit-exact: {same}")
    return 0 if same else 1
