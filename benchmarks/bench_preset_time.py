"""How long the calibrated presets take on the 1.1B shape (TinyLlama dimensions, random weights), issue 17.

    python benchmarks/bench_preset_time.py --blocks 2 --presets w4-best,w3-best

A full 22-block run of a LearnedRound preset takes about an hour on 2 cores, so this times the
first ``--blocks`` blocks (same widths, same calibration: 64 windows of 256 random tokens, bf16
calibration forwards) and extrapolates linearly to 22 blocks: every block costs the same (same
shapes, same number of training steps). Prints the CPU and one JSON line per preset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import llmopt  # noqa: E402
from llmopt.models import SPEED_MODEL_SHAPES, speed_model  # noqa: E402

from llmopt.core.cpu import cpu_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="blocks to time (of 22)")
    parser.add_argument("--presets", default="w4-best,w3-best")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=256)
    args = parser.parse_args()
    print(f"cpu: {cpu_info().describe()}, {torch.get_num_threads()} threads", flush=True)
    total_blocks = SPEED_MODEL_SHAPES["1b"]["num_hidden_layers"]
    gen = torch.Generator().manual_seed(0)
    vocab = SPEED_MODEL_SHAPES["1b"]["vocab_size"]
    calibration = [torch.randint(0, vocab, (1, args.calib_len), generator=gen) for _ in range(args.calib_samples)]
    for name in args.presets.split(","):
        model = speed_model("1b")
        del model.model.layers[args.blocks:]  # the first blocks only: every block costs the same
        model.config.num_hidden_layers = args.blocks
        start = time.perf_counter()
        llmopt.compress_(model, llmopt.Recipe.preset(name), calibration=calibration,
                         calibration_dtype=torch.bfloat16)
        seconds = time.perf_counter() - start
        print(json.dumps({"preset": name, "blocks": args.blocks, "seconds": round(seconds, 1),
                          "per_block_s": round(seconds / args.blocks, 1),
                          "estimated_22_blocks_min": round(seconds / args.blocks * total_blocks / 60, 1)}),
              flush=True)
        del model


if __name__ == "__main__":
    main()
