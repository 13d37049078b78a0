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

# Without a GPU, Triton's interpreter runs the CUDA kernels (llmopt.kernels.triton_lowbit) on CPU
# tensors, so CI checks the code the GPU would compile. Set before the kernels' module is imported
# (it is imported lazily, at first use); a machine with CUDA runs them for real instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn as nn

from llmopt.core.cpu import cpu_info
from llmopt.core.formats import AffineFormat, CodebookFormat, Float8E4M3Format, get_format
from llmopt.kernels import KernelSpec
from llmopt.testing import ToyTransformer, bit_equal  # noqa: F401  (bit_equal: shared by the fixtures)


def expected_auto_kernel(fmt, group_size=None, *, in_features=None, out_features=64,
                         scale_dtype=torch.bfloat16, act_bits=None, lowbit=None, **format_options) -> str:
    """The kernel ``kernel="auto"`` is meant to pick on this machine's CPU for a weight-only or W8A8 layer,
    with the speed probe off (as in the suite, see above): the intended rules, written out here on
    their own so that a test comparing them with the registry's choice can fail.

    ``fmt`` is a format name (``format_options`` go to :func:`get_format`), a format, a
    :class:`KernelSpec` or a layer with ``kernel_spec``; ``group_size=None`` is per-channel.
    ``lowbit``: whether ``lowbit_cpu`` is a candidate (default: its extension is built and the CPU has
    ``avx512_vnni``); ``False`` gives the choice of the kernels before it (and without it).

    * W8A8 (``act_bits=8``): ``int8_onednn_cpu`` on CPUs with AMX-INT8 (when this PyTorch has it),
      else ``int8_dynamic_cpu``.
    * ``lowbit_cpu`` when its C++ extension is built and the CPU has ``avx512_vnni``, for affine
      int2/3/4/8, 4-bit codebooks (nf4, fp4_e2m1) and fp8_e4m3, group sizes (per-channel: in_features)
      that are multiples of 32, scales in float32/bfloat16/float16.
    * else the PyTorch kernels, which hold bfloat16 scales: ``int8pack_cpu`` for per-channel 8-bit
      affine (bf16 zero points), ``int4pack_cpu`` for 2-4 bit affine with out_features a multiple of
      16 and group sizes a multiple of 32;
    * else ``reference``.
    """
    from llmopt.kernels.lowbit_cpu import lowbit_available
    from llmopt.kernels.onednn import onednn_int8_available

    if hasattr(fmt, "kernel_spec"):
        fmt = fmt.kernel_spec
    if isinstance(fmt, KernelSpec):
        spec = fmt
    else:
        if in_features is None:
            raise TypeError("expected_auto_kernel: in_features is needed with a format")
        spec = KernelSpec(format=get_format(fmt, **format_options), in_features=in_features,
                          out_features=out_features, group_size=group_size or in_features,
                          scale_dtype=scale_dtype, act_bits=act_bits)
    form, cpu = spec.format, cpu_info()
    affine = isinstance(form, AffineFormat)
    per_channel = spec.num_groups == 1
    if spec.act_bits == 8:
        if not (affine and form.bits == 8 and not form.has_zero_point and per_channel):
            return "reference"
        return "int8_onednn_cpu" if cpu.has("amx_int8") and onednn_int8_available() else "int8_dynamic_cpu"
    lowbit_format = ((affine and form.bits in (2, 3, 4, 8))
                     or (isinstance(form, CodebookFormat) and form.bits == 4)
                     or isinstance(form, Float8E4M3Format))
    float_scales = (torch.float32, torch.bfloat16, torch.float16)
    zero_dtype = spec.zero_point_dtype if spec.has_zero_point else torch.bfloat16
    if lowbit is None:
        lowbit = cpu.has("avx512_vnni") and lowbit_available()
    if (lowbit and lowbit_format and spec.group_size % 32 == 0 and spec.scale_dtype in float_scales
            and zero_dtype in float_scales):
        return "lowbit_cpu"
    bf16 = spec.scale_dtype == torch.bfloat16
    if affine and form.bits == 8 and per_channel and bf16 and zero_dtype == torch.bfloat16:
        return "int8pack_cpu"
    if (affine and form.bits <= 4 and bf16 and spec.out_features % 16 == 0 and spec.group_size % 32 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
        return "int4pack_cpu"
    return "reference"


@pytest.fixture(name="expected_auto_kernel")
def _expected_auto_kernel_fixture():
    return expected_auto_kernel


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


@pytest.fixture
def tiny_llama():
    """Factory for a tiny random Hugging Face Llama: ``tiny_llama(tie=True, seed=0)`` (eval mode)."""
    transformers = pytest.importorskip("transformers")

    def build(tie: bool = True, seed: int = 0):
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                          max_position_embeddings=128, tie_word_embeddings=tie)
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).eval()

    return build
