"""What a matmul kernel for quantized weights is: :class:`Kernel`, the :class:`KernelSpec` it serves,
and the helpers the built-in kernels share.

A kernel never sees the layer that uses it. It gets a :class:`KernelSpec` (the few facts about the
layer it needs: format, group size, shape, scale dtype, activation bits, whether there is a bias) and
the tensors themselves: the *canonical* form (``qdata`` packed row by row, ``scale``, ``zero_point``;
see :mod:`llmopt.core.packing`), its own *runtime* layout, the input and the bias. That keeps
kernels below ``llmopt.nn`` in the layer diagram and lets them be tested without building a layer.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.formats import WeightFormat
from ..core.packing import unpack_codes
from ..core.primitives import ACT_BITS, dequantize_weight, num_groups

__all__ = ["Kernel", "KernelSpec", "Tensors", "log_once", "bf16_rows", "finish_output", "is_cpu"]

logger = logging.getLogger("llmopt")

Tensors = Dict[str, Tensor]


@functools.lru_cache(maxsize=None)
def log_once(message: str) -> None:
    """Log a kernel fallback the first time it happens (per distinct message)."""
    logger.warning(message)


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel may know about the layer it serves. Frozen and hashable.

    ``group_size`` is already resolved (per-channel layers have ``group_size == in_features``).
    ``act_bits`` is ``None`` for weight-only layers, else the bits activations are quantized to per
    token (W8A8: 8). ``has_bias`` says whether ``forward`` will be handed a bias.
    """

    format: WeightFormat
    in_features: int
    out_features: int
    group_size: int
    scale_dtype: torch.dtype = torch.bfloat16
    act_bits: Optional[int] = None
    has_bias: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.format, WeightFormat):
            raise TypeError(f"KernelSpec.format must be a WeightFormat, got {type(self.format).__name__}")
        for name in ("in_features", "out_features", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KernelSpec.{name} must be a positive integer, got {value!r}")
        if self.group_size > self.in_features:
            raise ValueError(f"KernelSpec.group_size={self.group_size} exceeds "
                             f"in_features={self.in_features} "
                             "(resolve it first: per-channel is group_size == in_features)")
        if not isinstance(self.scale_dtype, torch.dtype) or not self.scale_dtype.is_floating_point:
            raise TypeError(f"KernelSpec.scale_dtype must be a floating torch.dtype, "
                            f"got {self.scale_dtype!r}")
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise ValueError(f"KernelSpec.act_bits must be None or one of {ACT_BITS}, got {self.act_bits!r}")

    @property
    def num_groups(self) -> int:
        """Groups per row, a padded last group included."""
        return num_groups(self.in_features, self.group_size)

    @property
    def has_zero_point(self) -> bool:
        """True if the canonical form carries a ``zero_point`` tensor (asymmetric formats)."""
        return self.format.has_zero_point

    @property
    def zero_point_dtype(self) -> torch.dtype:
        """dtype of the canonical ``zero_point`` (``scale_dtype``, or float32 for the formats' "int" and
        "min" zero-point modes, whose exact values need it)."""
        return self.format.zero_point_dtype(self.scale_dtype)

    def describe(self) -> str:
        """``"int4 g64 256->128 scales=bfloat16"`` plus ``a8`` / ``+bias`` when set: for messages."""
        extras = f" a{self.act_bits}" if self.act_bits is not None else ""
        extras += " +bias" if self.has_bias else ""
        scale = str(self.scale_dtype).replace("torch.", "")
        return (f"{self.format.name or type(self.format).__name__} g{self.group_size} "
                f"{self.in_features}->{self.out_features} scales={scale}{extras}")


class Kernel:
    """One way of computing ``x @ W.T (+ bias)`` for quantized weights. Stateless: data lives in the layer.

    A subclass sets ``name`` and implements :meth:`unsupported_reason` and :meth:`forward`. It keeps
    the canonical tensors as they are unless it overrides :meth:`to_runtime` and its exact inverse
    :meth:`to_canonical`; :meth:`codes` and :meth:`dequantize` then work through the canonical form
    (override them when the runtime layout offers a shorter way). Register it with
    :func:`llmopt.kernels.register_kernel`; check it with :func:`llmopt.testing.check_kernel`.
    """

    name: ClassVar[str] = ""
    # True if forward() quantizes the activations itself (layers with act_bits); otherwise the layer
    # hands it fake-quantized activations, so every kernel computes the same function.
    quantizes_activations: ClassVar[bool] = False
    # CPU flags (as Linux's /proc/cpuinfo names them, e.g. "amx_int8") of which the CPU must have at
    # least one for ``kernel="auto"`` to consider this kernel on a CPU; () means no requirement. The
    # kernel still has to pass the speed probe (llmopt.kernels.speed); naming it explicitly skips both.
    cpu_flags: ClassVar[Tuple[str, ...]] = ()
    # Device types ("cuda", "cpu", ...) on which ``kernel="auto"`` may choose this kernel; ``None``: any
    # it serves. A GPU kernel that can also run on CPU tensors for tests (Triton's interpreter) says
    # ``("cuda",)`` so that ``"auto"`` never picks it on a CPU.
    auto_device_types: ClassVar[Optional[Tuple[str, ...]]] = None

    def unsupported_reason(self, spec: KernelSpec, device: torch.device) -> Optional[str]:
        """``None`` if this kernel can serve ``spec`` on ``device``, else a short reason (shown to users)."""
        raise NotImplementedError

    def to_runtime(self, spec: KernelSpec, canonical: Tensors) -> Tensors:
        """Canonical tensors -> this kernel's runtime tensors (may reuse the inputs)."""
        return dict(canonical)

    def to_canonical(self, spec: KernelSpec, runtime: Tensors) -> Tensors:
        """Exact inverse of :meth:`to_runtime`."""
        return dict(runtime)

    def codes(self, spec: KernelSpec, runtime: Tensors) -> Tensor:
        """Unpacked uint8 codes ``[out_features, in_features]``."""
        canonical = self.to_canonical(spec, runtime)
        return unpack_codes(canonical["qdata"], spec.format.bits, spec.in_features)

    def dequantize(self, spec: KernelSpec, runtime: Tensors, dtype: torch.dtype) -> Tensor:
        """The float weight ``[out_features, in_features]`` the runtime tensors represent, in ``dtype``."""
        canonical = self.to_canonical(spec, runtime)
        codes = unpack_codes(canonical["qdata"], spec.format.bits, spec.in_features)
        return dequantize_weight(
            codes, canonical["scale"], canonical.get("zero_point"), spec.format, spec.group_size, dtype
        )

    def dequantize_rows(self, spec: KernelSpec, runtime: Tensors, rows: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows ``rows`` (int64, 1-D) of the float weight, ``[len(rows), in_features]`` in ``dtype``.

        What a quantized embedding looks up (and a tied ``lm_head`` shares). The default dequantizes
        the whole weight; kernels whose runtime layout keeps rows apart override it with a gather.
        """
        return self.dequantize(spec, runtime, dtype).index_select(0, rows)

    def forward(self, spec: KernelSpec, runtime: Tensors, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``x [..., in_features] @ W.T + bias`` in ``x``'s dtype. ``runtime`` may hold extra entries."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def is_cpu(device: torch.device) -> bool:
    """True for a CPU device (given as a ``torch.device`` or a string)."""
    return torch.device(device).type == "cpu"


def bf16_rows(x: Tensor, k_pad: int) -> Tensor:
    """Activations as a contiguous bf16 ``[rows, k_pad]`` matrix, zero-padded past ``in_features``."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if k_pad != x2.shape[-1]:
        x2 = F.pad(x2, (0, k_pad - x2.shape[-1]))
    return x2.contiguous()


def finish_output(y: Tensor, x: Tensor, bias: Optional[Tensor], out_features: int,
                  lead: Sequence[int]) -> Tensor:
    """Add the bias in the kernel's output dtype, cast back to the input dtype, restore leading dims."""
    if bias is not None:
        y = y + bias.to(y.dtype) if y.dtype != torch.float32 else y + bias
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*lead, out_features)
