#!/usr/bin/env bash
# The prepared device check for issue 16: one call on the GPU machine (the `device` tool's `run`, which
# copies the working tree and runs this in the repo root). It needs only what that machine has installed
# (torch, triton, transformers, pytest, hypothesis, safetensors, einops, ...); llmopt runs from the tree.
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=560)
# Outputs under $OUT: env.txt, tests.log, bench.log, progress.log, gpu.jsonl, gpu.md.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" LLMOPT_KERNEL_PROBE=0
OUT="${OUT:-/tmp/llmopt-gpu}"
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" 2>&1 | tee "$OUT/env.txt"
# 1. Every CUDA test: the kernels' contract on the GPU, the device-parametrised suite, compile.
timeout 170 python3 -m pytest -q -p no:cacheprovider -k "cuda or triton or tinygemm" \
    tests/kernels/test_gpu_kernels.py tests/kernels/test_kernels.py tests/test_devices.py \
    tests/kernels/test_kernel_contract.py 2>&1 | tee "$OUT/tests.log" | tail -25
# 2. The benchmark (kernel table, decode, GPTQ; sections stop at the budget and say SKIP).
timeout 340 python3 benchmarks/bench_gpu.py --budget-s 300 --out "$OUT/gpu.jsonl" \
    2>"$OUT/progress.log" | tee "$OUT/bench.log" | tail -40
