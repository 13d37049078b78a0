"""Directories saved by llmopt before the layered redesign (issue 12) still load, and compute what they
computed then.

``tests/io/data/previous_layout/`` was written by the code of commit a6a8757 (``llmopt.save`` of a
seeded ``ToyTransformer(tie=False)`` after each recipe below; ``README.json`` lists the module types),
with the logits that model gave on fixed token ids. Cases: RTN int4 with an NF4 override, Wanda 2:4 +
int4 then LoRA adapters with trained ``B``, magnitude 50% + SVD factors, QuantLowRank + SmoothQuant
W8A8, a QAT-prepared model, and structured channel pruning (resized shapes).
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

import llmopt
from llmopt.nn import QuantLinear
from llmopt.testing import ToyTransformer

DATA = pathlib.Path(__file__).resolve().parent / "data" / "previous_layout"
CASES = json.loads((DATA / "README.json").read_text())["cases"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_directory_saved_before_the_redesign_loads_and_computes_the_same(case, expected_auto_kernel):
    torch.manual_seed(0)  # a skeleton with other weights: every tensor must come from the files
    model = llmopt.load(ToyTransformer(tie=False), DATA / case).eval()
    assert sorted({type(m).__name__ for m in model.modules()}) == CASES[case]
    expected = load_file(str(DATA / case / "expected.safetensors"))
    with torch.no_grad():
        auto_logits = model(expected["input_ids"])
    # The expected logits came from the kernels "auto" picked then, before lowbit_cpu existed: put the
    # layers it serves now back on those kernels (the others are unchanged).
    for layer in model.modules():
        if isinstance(layer, QuantLinear) and layer.kernel.name == "lowbit_cpu":
            layer.set_kernel(expected_auto_kernel(layer, lowbit=False))
    with torch.no_grad():
        logits = model(expected["input_ids"])
    # The same kernels and maths as then; only the summation order of a multi-threaded matmul may differ.
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    # Today's "auto" computes the same function: then's int4pack_cpu multiplied bf16 activations
    # (~3e-3 relative on these logits), lowbit_cpu int16 ones (~1e-4).
    error = float((auto_logits - expected["logits"]).norm() / expected["logits"].norm())
    assert error < 1e-2
