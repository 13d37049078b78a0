"""How a :class:`~llmopt.nn.sparse_linear.SparseLinear` computes its forward (``runtime=``).

* ``"dense"`` (default): the dense weight, zeros included, is materialised once in the compute dtype
  (buffer ``dense_weight``, not saved) and the forward is ``F.linear``: as fast as a dense layer, and
  *not* smaller in memory, which ``runtime_bytes()`` reports.
* ``"compressed"``: only the stored tensors are held; the dense weight is rebuilt inside every forward
  (memory saving, slower).
* ``"semi_structured"``: CUDA, ``nm=(2, 4)``, float16/bfloat16 compute dtype: PyTorch's 2:4 sparse kernels
  (``torch.sparse.to_sparse_semi_structured``), the only runtime that can be faster than dense.

A runtime is stateless: what it derives from the stored tensors lives on the layer, rebuilt by
:meth:`Runtime.build` after every load, move or cast and dropped by :func:`drop_runtime_state`.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import ClassVar, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...core.measure import tensor_bytes

__all__ = ["Runtime", "DenseRuntime", "CompressedRuntime", "SemiStructuredRuntime", "RUNTIMES", "get_runtime",
           "RuntimeSwitch"]

# Where the derived forms live on the layer: a non-persistent buffer, and (outside _buffers, since a
# sparse tensor subclass cannot go through state_dict or deepcopy) the semi-structured tensor.
DENSE_BUFFER = "dense_weight"
SEMI_ATTR = "_semi"


def drop_runtime_state(layer: nn.Module) -> None:
    """Forget whatever any runtime derived (the stored tensors stay)."""
    layer._buffers.pop(DENSE_BUFFER, None)
    layer.__dict__.pop(SEMI_ATTR, None)


def runtime_state_bytes(layer: nn.Module) -> int:
    """Bytes of whatever the runtimes derived: a dense copy, or the packed 2:4 tensor and its metadata."""
    semi = layer.__dict__.get(SEMI_ATTR)
    parts = [getattr(semi, attr, None) for attr in ("packed", "meta", "packed_t", "meta_t")]
    return tensor_bytes(layer._buffers.get(DENSE_BUFFER), *parts)


class Runtime:
    """One forward path. ``layer`` is the SparseLinear (``dequantize_weight``, ``weight_dtype``, ...)."""

    name: ClassVar[str]
    # The runtime to use instead when this one cannot be built here (after a load or a move).
    fallback: ClassVar[Optional[str]] = None

    def check(self, layer: nn.Module) -> None:
        """Raise ValueError if this runtime cannot serve ``layer`` (device, dtype, layout)."""

    def build(self, layer: nn.Module) -> None:
        """Derive what the forward needs from the stored tensors (after ``drop_runtime_state``)."""

    def weight(self, layer: nn.Module, dtype: torch.dtype) -> Tensor:
        """The dense weight the forward multiplies by, in ``dtype``."""
        return layer.dequantize_weight(dtype)

    def forward(self, layer: nn.Module, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, self.weight(layer, x.dtype), bias)



class DenseRuntime(Runtime):
    name = "dense"

    def build(self, layer: nn.Module) -> None:
        layer.register_buffer(DENSE_BUFFER, layer.dequantize_weight(layer.weight_dtype), persistent=False)

    def weight(self, layer: nn.Module, dtype: torch.dtype) -> Tensor:
        weight = layer._buffers[DENSE_BUFFER]
        return weight if weight.dtype == dtype else weight.to(dtype)


class CompressedRuntime(Runtime):
    name = "compressed"


class SemiStructuredRuntime(Runtime):
    name = "semi_structured"
    fallback = "dense"

    def check(self, layer: nn.Module) -> None:
        if layer.nm != (2, 4):
            raise ValueError(f"semi_structured runtime needs nm=(2, 4), layer has layout {layer.layout}")
        if layer.device.type != "cuda":
            raise ValueError(f"semi_structured runtime needs a CUDA device, layer is on {layer.device}")
        if layer.weight_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"semi_structured runtime needs float16/bfloat16, compute dtype is "
                             f"{layer.weight_dtype}")
        if not hasattr(torch.sparse, "to_sparse_semi_structured"):
            raise ValueError("this PyTorch has no torch.sparse.to_sparse_semi_structured")

    def build(self, layer: nn.Module) -> None:
        self.check(layer)
        weight = layer.dequantize_weight(layer.weight_dtype)
        layer.__dict__[SEMI_ATTR] = torch.sparse.to_sparse_semi_structured(weight)

    def forward(self, layer: nn.Module, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        semi = layer.__dict__.get(SEMI_ATTR)
        if semi is None or x.dtype != layer.weight_dtype:  # the kernels take the compute dtype only
            return super().forward(layer, x, bias)
        y = F.linear(x.reshape(-1, layer.in_features), semi, bias)
        return y.reshape(*x.shape[:-1], layer.out_features)


RUNTIMES = ("dense", "compressed", "semi_structured")
_BY_NAME: Dict[str, Runtime] = {runtime.name: runtime
                                for runtime in (DenseRuntime(), CompressedRuntime(), SemiStructuredRuntime())}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name`` (one of :data:`RUNTIMES`)."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"SparseLinear: runtime must be one of {RUNTIMES}, got {name!r}")
    return _BY_NAME[name]


class RuntimeSwitch:
    """Mixin for a layer with a switchable runtime (see module docs): the ``runtime`` name, the derived
    form's life cycle, and its bytes. The layer provides ``device``, ``weight_dtype``,
    ``dequantize_weight`` and ``stored_bytes``."""

    _runtime: Runtime
    opaque_attrs: ClassVar[tuple] = (SEMI_ATTR,)  # deepcopy rebuilds the semi-structured tensor

    @property
    def runtime(self) -> str:
        """The forward path: ``"dense"``, ``"compressed"`` or ``"semi_structured"``."""
        return self._runtime.name

    @runtime.setter
    def runtime(self, name: str) -> None:
        # Only names the path; the derived form is built by set_runtime or the next install or move.
        self._runtime = get_runtime(name)

    @property
    def kernel(self) -> SimpleNamespace:
        """The runtime path as a named object (``layer.kernel.name``), as for :class:`QuantLinear`."""
        return SimpleNamespace(name=self.runtime)

    def set_runtime(self, runtime: str) -> "RuntimeSwitch":
        """Switch the runtime path (``"dense"``, ``"compressed"``, ``"semi_structured"``); returns self.
        A runtime that cannot serve this layer is refused and the layer stays as it was."""
        new = get_runtime(runtime)
        new.check(self)
        previous, self._runtime = self._runtime, new
        try:
            self._build_runtime()
        except BaseException:
            self._runtime = previous
            self._build_runtime()
            raise
        return self

    def runtime_bytes(self) -> int:
        """Bytes held in memory: stored tensors, bias and the runtime copy (a full dense weight with
        ``runtime="dense"``; the packed 2:4 tensor with ``"semi_structured"``)."""
        return self.stored_bytes() + runtime_state_bytes(self)

    def _drop_runtime(self) -> None:
        drop_runtime_state(self)

    def _build_runtime(self) -> None:
        drop_runtime_state(self)
        if self.device.type != "meta":
            self._runtime.build(self)

    def _rebuild_runtime(self) -> None:
        """Build the runtime form after a load or move; one that cannot be built here falls back."""
        try:
            self._build_runtime()
        except (RuntimeError, ValueError) as exc:
            if self._runtime.fallback is None:
                raise
            warnings.warn(f"SparseLinear: {self.runtime} runtime unavailable here ({exc}); using "
                          f"{self._runtime.fallback!r}", stacklevel=3)
            self.runtime = self._runtime.fallback
            self._build_runtime()
