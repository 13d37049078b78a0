"""Matmul kernels for quantized weights, behind a registry.

Every kernel converts the canonical stored tensors (``qdata`` packed row by row, ``scale``,
``zero_point``; see :mod:`llmopt.core.packing`) into a *runtime layout* it can multiply with fast,
and converts that layout back exactly. A ``QuantLinear`` keeps only the runtime layout in memory,
so a fast kernel never costs a second copy of the weights; ``state_dict`` and ``llmopt.save`` always
see the canonical form, which is portable across machines and kernels. Kernels see a
:class:`KernelSpec` (format, group size, shape, ...), never the layer.

Kernels (one file per family; each registers its kernels when imported):

* ``reference`` (:mod:`.reference`): dequantize then ``F.linear``; pure torch, any device, any format.
  The oracle, and the fallback of ``kernel="auto"``.
* ``int4pack_cpu`` (:mod:`.int4_cpu`): ``aten._weight_int4pack_mm_for_cpu`` (affine formats of 2-4
  bits, group sizes that are multiples of 32). Activations are cast to bfloat16.
* ``int8pack_cpu`` (:mod:`.int8_cpu`): ``aten._weight_int8pack_mm`` (8-bit affine, one scale per row).
* ``int8_dynamic_cpu`` (:mod:`.int8_cpu`): W8A8 for layers with ``act_bits=8``: activations quantized
  per token to int8, multiplied by symmetric per-channel int8 weights with ``torch._int_mm``.
* ``lowbit_cpu`` (:mod:`.lowbit_cpu`, C++ in ``csrc/lowbit_cpu.cpp`` built at first use by :mod:`.cpp_ext`):
  int2/int3/int4/int8 affine, 4-bit codebooks (nf4, fp4) and fp8 decoded in registers at their real
  width (AVX-512 VNNI, int16 activations per block); falls back cleanly when it cannot be built.
* ``int8_onednn_cpu`` (:mod:`.onednn`): the same W8A8 arithmetic with the weight prepacked once for
  oneDNN (``torch.ops.onednn.qlinear_pointwise``); tried first by ``"auto"`` on CPUs with AMX-INT8,
  where it is 2-3x faster than ``_int_mm`` (without AMX it is 100x+ slower than dense, and skipped).

A new kernel is one file that subclasses :class:`Kernel` and calls :func:`register_kernel`
(see ``docs/add_kernel.md``); :mod:`.registry` decides ``"auto"``, taking a kernel only when
:mod:`.speed` finds it not slower than dense on this CPU (CPU flags, then a bounded, cached probe).
"""

from __future__ import annotations

# Importing a kernel module registers its kernels; reference first, so list_kernels() starts with it.
from . import reference  # noqa: F401
from . import int4_cpu, int8_cpu, onednn  # noqa: F401
from . import lowbit_cpu  # noqa: F401  (registered last: built-in order stays stable)
from . import int4_cuda, triton_lowbit  # noqa: F401  (CUDA; triton is imported at first use)
from .base import Kernel, KernelSpec, log_once
from .registry import auto_order, get_kernel, list_kernels, register_kernel, select_kernel, unregister_kernel
from .speed import KernelDecision, clear_kernel_decisions, kernel_decisions, set_probe_timer

__all__ = ["Kernel", "KernelSpec", "register_kernel", "unregister_kernel", "get_kernel", "list_kernels",
           "auto_order", "select_kernel", "log_once", "KernelDecision", "kernel_decisions",
           "clear_kernel_decisions", "set_probe_timer"]
