"""Every registered kernel against every registered format: the contract of llmopt.testing.check_kernel.

Adding a kernel: one file in llmopt/kernels/ plus one row in ROWS below (its tolerances and the formats
it serves on a CPU that has its ops).
"""

from dataclasses import dataclass
from typing import Dict, FrozenSet, Union

import pytest
import torch

from llmopt.core.formats import list_formats
from llmopt.kernels import list_kernels
from llmopt.kernels.reference import ReferenceKernel
from llmopt.testing import check_kernel, format_variants

ALL = frozenset(list_formats())
# Kernels that compute in bfloat16 (activations or output): bf16 rounding, measured ~3e-3 of the norm.
BF16 = 1e-2
# Kernels that compute in float32 from float32 input: accumulation rounding only (K <= 256 here).
FP32 = 1e-5


@dataclass(frozen=True)
class Row:
    rtol: Union[float, Dict[torch.dtype, float]]
    serves: FrozenSet[str]  # format names it must serve at least one spec of (and no other format)
    device: str = "cpu"  # where the full grid runs; CUDA rows are skipped without a GPU


ROWS = {
    "reference": Row({torch.float32: FP32, torch.bfloat16: BF16}, ALL),
    "int4pack_cpu": Row(BF16, frozenset({"int2", "int3", "int4"})),
    "int8pack_cpu": Row(BF16, frozenset({"int8"})),
    "int8_dynamic_cpu": Row({torch.float32: FP32, torch.bfloat16: BF16}, frozenset({"int8"})),
    "int8_onednn_cpu": Row({torch.float32: FP32, torch.bfloat16: BF16}, frozenset({"int8"})),
    # int16 activations per block (~1e-4 of the norm, see tests/kernels/test_lowbit_cpu.py).
    "lowbit_cpu": Row({torch.float32: 1e-3, torch.bfloat16: BF16},
                      frozenset({"int2", "int3", "int4", "int8", "nf4", "fp4_e2m1", "fp8_e4m3"})),
    # GPU kernels. Without a GPU, tests/kernels/test_gpu_kernels.py runs lowbit_triton's contract on a
    # reduced grid under Triton's interpreter (the full grid would take minutes there).
    "lowbit_triton": Row({torch.float32: FP32, torch.bfloat16: BF16}, ALL, device="cuda"),
    "int4_tinygemm_cuda": Row(BF16, frozenset({"int4"}), device="cuda"),
}


def test_every_kernel_has_a_row():
    missing = sorted(set(list_kernels()) - set(ROWS))
    assert not missing, f"add a row to ROWS in {__file__} for: {missing}"


@pytest.mark.parametrize("fmt", sorted(ALL))
@pytest.mark.parametrize("kernel", list_kernels())
def test_kernel_contract(kernel, fmt):
    row = ROWS[kernel]
    if row.device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{kernel} runs on CUDA: no GPU here")
    report = check_kernel(kernel, format_variants(fmt), rtol=row.rtol, device=row.device)
    if fmt not in row.serves:
        assert not report.served, f"{kernel} serves {fmt} but its row says it does not: {report.served[:3]}"
        return
    if not report.served:
        missing_op = [reason for _, reason in report.refused
                      if reason.startswith("this PyTorch has no") or "C++" in reason]
        if missing_op:
            pytest.skip(f"{kernel}: {missing_op[0]}")
    reasons = sorted({reason for _, reason in report.refused})
    assert report.served, f"{kernel} served no spec of {fmt}; reasons: {reasons}"


def test_check_kernel_catches_a_broken_round_trip():
    """The contract check is not vacuous: a kernel whose runtime layout loses information fails it."""
    class LossyScales(ReferenceKernel):
        name = "lossy_scales"

        def to_runtime(self, spec, canonical):
            return {**canonical, "scale": canonical["scale"].to(torch.float16).to(canonical["scale"].dtype)}

    with pytest.raises(AssertionError, match="changed 'scale'"):
        check_kernel(LossyScales(), ["int4"], scale_dtypes=(torch.float32,))


def test_check_kernel_catches_a_wrong_forward():
    class NoBias(ReferenceKernel):
        name = "no_bias"

        def forward(self, spec, runtime, x, bias):
            return super().forward(spec, runtime, x, None)

    with pytest.raises(AssertionError, match="forward relative error"):
        check_kernel(NoBias(), ["int8"], biases=(True,))


def test_check_kernel_needs_a_reason_for_refusals():
    class Mute(ReferenceKernel):
        name = "mute"

        def unsupported_reason(self, spec, device):
            return "" if spec.format.name == "nf4" else None

    with pytest.raises(AssertionError, match="refused without a reason"):
        check_kernel(Mute(), ["nf4"])
    assert check_kernel(Mute(), ["int4"], group_sizes=(32,), shapes=((16, 64),)).served
