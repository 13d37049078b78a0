"""Shared fixtures for the llmopt test suite: seeding, toy inputs, calibration data, model snapshots."""

from __future__ import annotations

import os

# kernel="auto" decides from the CPU's flags alone in the suite: its speed probe (llmopt.kernels.speed)
# times real calls, and on a busy machine two runs could pick different kernels for the same tiny
# layer. tests/kernels/test_kernel_speed_choice.py turns the probe on where it is the subject.
# Run the suite with LLMOPT_KERNEL_PROBE=1 to exercise it everywhere.
os.environ.setdefault("LLMOPT_KERNEL_PROBE", "0")

import pytest
import torch
import torch.nn as nn

from llmopt.testing import ToyTransformer, bit_equal  # noqa: F401  (bit_equal: shared by the fixtures)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)


def example_input(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    """A deterministic input batch for a toy model (token ids for ToyTransformer, floats otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, ToyTransformer):
        return torch.randint(0, model.embed.num_embeddings, (batch, seq), generator=gen)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear) or hasattr(m, "in_features"))
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, seq, first.in_features, generator=gen).to(dtype)


def calibration_batches(model: nn.Module, n: int = 3):
    """A few input batches, for methods with ``needs_calibration=True``."""
    return [example_input(model, seed=100 + i) for i in range(n)]


class Snapshot:
    """Records a model's modules, parameter objects and tensor values; ``check()`` asserts none changed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = {name: m for name, m in model.named_modules()}
        self.params = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
        self.values = {k: v.detach().clone() for k, v in model.state_dict().items()
                       if v.device.type != "meta"}

    def check(self) -> None:
        now = dict(self.model.named_modules())
        assert now.keys() == self.modules.keys()
        for name, module in now.items():
            assert module is self.modules[name], f"module {name!r} was replaced"
        now_params = dict(self.model.named_parameters(remove_duplicate=False))
        assert now_params.keys() == self.params.keys()
        for name, p in now_params.items():
            assert p is self.params[name], f"parameter {name!r} was replaced"
        state = self.model.state_dict()
        for key, value in self.values.items():
            assert bit_equal(state[key], value), f"{key} changed"


@pytest.fixture
def snapshot():
    return Snapshot


@pytest.fixture
def toy_input():
    return example_input


@pytest.fixture
def calibration():
    return calibration_batches


@pytest.fixture(name="bit_equal")
def _bit_equal_fixture():
    return bit_equal


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny matmuls: faster there, and immune to a busy machine (two
    OpenMP threads spin-wait ~10x slower when the other core is taken). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
